"""Rich Preference Optimization (Zhao et al., arXiv 2503.11720; research/algorithms.md §4): pairs made, not collected.

    sample the base model -> critique (critic) -> edit instructions -> edit (editor) -> curate -> Diffusion-DPO

``critique``: the data types and the :class:`Critic` / :class:`Editor`
interfaces; ``config``: the recipe's settings; ``toy``: the toy critic (an
attribute classifier of its own, never the oracle) and the toy editor;
``vlm_critic`` and ``editors``: the real backends (transformers, diffusers);
``curation``: the reward-margin filter, the pairs in the Pick-a-Pic schema and
the curation report. Called "Rich-PO" / ``richpo`` everywhere: "RPO" is
Diffusion-RPO (``alignment.methods.rpo``).
"""

from alignment.richpo.critique import (
    Critic,
    Critique,
    CritiqueError,
    CritiqueIssue,
    CritiqueOutcome,
    Editor,
    EditOutcome,
    parse_critique,
    parse_instructions,
)

__all__ = [
    "Critic",
    "Critique",
    "CritiqueError",
    "CritiqueIssue",
    "CritiqueOutcome",
    "EditOutcome",
    "Editor",
    "parse_critique",
    "parse_instructions",
]
