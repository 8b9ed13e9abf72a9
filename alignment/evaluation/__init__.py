"""Evaluation beyond sampling: prompt sets, the scorer table, resumable storage, the HTML table.

``alignment.evaluate`` samples base and aligned models on a (prompt, seed) grid
and builds the report; this package holds what it reads and writes:

* :mod:`~alignment.evaluation.prompt_sets`: the prompt sets (toy world, a list,
  Pick-a-Pic captions, PartiPrompts, HPDv2, any prompt file) and their formats;
* :mod:`~alignment.evaluation.scoring`: loading each table scorer once and the
  per-scorer statistics (mean, median, paired win rate with a bootstrap CI);
* :mod:`~alignment.evaluation.store`: samples and scores on disk, for resuming;
* :mod:`~alignment.evaluation.table`: the table as HTML and text;
* :mod:`~alignment.evaluation.candidate`: a checkpoint or LoRA to evaluate against its base.

No ZenML here.
"""
