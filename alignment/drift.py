"""Model drift: a candidate model against a reference model on the same (prompt, seed) grid, with Evidently 0.7.

The reference is the current production version of a pipeline's model, or the
base model when there is none; the candidate is the freshly aligned model. Both
are described by per-image rows (``alignment.evaluate.samples_frame``): the
prompt, the seed, the reward score and an image embedding.

What the report holds:

- **distributions** (Evidently, unpaired): the reward's distribution and the
  first principal components of the image embeddings, each tested for drift
  (``DataDriftPreset``: Kolmogorov-Smirnov up to 1000 images, Wasserstein above), and the
  whole embedding tested at once (``EmbeddingsDrift`` with the MMD method);
- **per-prompt deltas** (paired): the same seed gives the same initial noise
  to both models, so each image of the candidate has a twin in the reference;
  per prompt, the mean reward change, the share of seeds the candidate wins,
  and how far its images moved in embedding space.

Embeddings in Evidently 0.7: the new API tests an embedding as a whole with
``EmbeddingsDrift`` over the columns named in ``DataDefinition.embeddings``
(the preset's own ``embeddings`` argument is not used by 0.7.23's
``DataDriftPreset``). Of its four methods we use MMD (unbiased MMD² with an
RBF kernel whose bandwidth is the median pairwise distance): the median
heuristic makes it scale-free, so one threshold serves CLIP embeddings, the toy
reward model's and raw pixels alike; it compares whole distributions, not only
their means ("distance"); and it needs no train/test split, which the
classifier method ("model") cannot afford on a hundred images. Its bootstrap
mode is not used: in 0.7.23 it compares the statistic with the 5th percentile
of the null, which flags nearly everything. Per-column tests on every raw
embedding dimension would be hundreds of tests (5% of them "drift" by chance),
so only the reference's leading principal components get one each; they are
the directions in which the images actually vary.

``evidently`` and ``sklearn`` are imported when a report is built: importing
Evidently takes seconds.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from alignment.evaluate import EMBEDDING_PREFIX, EMBEDDING_SOURCE_COLUMN, PIXEL_EMBEDDING

KEY_COLUMNS = ("prompt", "seed")
REQUIRED_COLUMNS = ("prompt", "seed", "reward", EMBEDDING_SOURCE_COLUMN)
PC_PREFIX = "image_pc"
EMBEDDING_NAME = "image_embedding"

DEFAULT_PCA_COMPONENTS = 4
# Evidently's defaults: MMD² above 0.015 is drift; a dataset drifts when half its tested columns do.
DEFAULT_MMD_THRESHOLD = 0.015
DEFAULT_DRIFT_SHARE = 0.5
TSNE_MIN_SAMPLES = 30


@dataclass
class DriftResult:
    """A built drift report.

    Attributes:
        html: The whole report, standalone (Evidently's widgets with the summary above them).
        summary: Headline numbers, JSON-able (see :func:`build_drift_report`).
        per_prompt: One row per prompt, worst reward change first.
    """

    html: str
    summary: dict[str, Any]
    per_prompt: pd.DataFrame


def _embedding_columns(frame: pd.DataFrame) -> list[str]:
    return sorted(column for column in frame.columns if str(column).startswith(EMBEDDING_PREFIX))


def check_frames(reference: pd.DataFrame, candidate: pd.DataFrame) -> list[str]:
    """Check both frames describe the same grid with the same embedding; return the embedding columns.

    Raises:
        ValueError: Naming the frame and the column, key or embedding that is wrong.
    """
    for name, frame in (("reference", reference), ("candidate", candidate)):
        missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
        if missing:
            raise ValueError(f"the {name} samples lack the column(s) {missing}; they have {list(frame.columns)[:12]}")
        if frame.empty:
            raise ValueError(f"the {name} samples are empty")
        duplicated = frame.duplicated(list(KEY_COLUMNS))
        if duplicated.any():
            row = frame[duplicated].iloc[0]
            raise ValueError(
                f"the {name} samples hold (prompt={row['prompt']!r}, seed={row['seed']}) more than once "
                f"({int(duplicated.sum())} duplicate rows)"
            )
        sources = frame[EMBEDDING_SOURCE_COLUMN].unique()
        if len(sources) != 1:
            raise ValueError(f"the {name} samples mix embeddings {sorted(map(str, sources))}")
        if not _embedding_columns(frame):
            raise ValueError(f"the {name} samples have no embedding columns ({EMBEDDING_PREFIX}...)")
    columns = _embedding_columns(reference)
    if columns != _embedding_columns(candidate):
        raise ValueError(
            f"the reference has {len(columns)} embedding columns and the candidate "
            f"{len(_embedding_columns(candidate))}: they were embedded differently"
        )
    reference_source = reference[EMBEDDING_SOURCE_COLUMN].iloc[0]
    candidate_source = candidate[EMBEDDING_SOURCE_COLUMN].iloc[0]
    if reference_source != candidate_source:
        raise ValueError(
            f"the reference is embedded with {reference_source!r} and the candidate with {candidate_source!r}"
        )
    reference_keys = set(zip(reference["prompt"], reference["seed"], strict=True))
    candidate_keys = set(zip(candidate["prompt"], candidate["seed"], strict=True))
    if reference_keys != candidate_keys:
        only_reference = sorted(reference_keys - candidate_keys)[:3]
        only_candidate = sorted(candidate_keys - reference_keys)[:3]
        raise ValueError(
            "the reference and the candidate were not sampled on the same (prompt, seed) grid: "
            f"only in the reference {only_reference}, only in the candidate {only_candidate}"
        )
    for name, frame in (("reference", reference), ("candidate", candidate)):
        if not np.isfinite(frame[columns].to_numpy(dtype=np.float64)).all():
            raise ValueError(f"the {name} samples have non-finite embedding values")
    return columns


def _has_rewards(frame: pd.DataFrame) -> bool:
    rewards = frame["reward"].to_numpy(dtype=np.float64)
    if np.isnan(rewards).all():
        return False
    if np.isnan(rewards).any():
        raise ValueError(f"{int(np.isnan(rewards).sum())} of {len(rewards)} samples have no reward; either all or none")
    return True


def per_prompt_deltas(reference: pd.DataFrame, candidate: pd.DataFrame, embedding_columns: list[str]) -> pd.DataFrame:
    """Paired per-prompt changes from reference to candidate.

    Columns: ``prompt``, ``seeds``; with rewards ``reward_reference``,
    ``reward_candidate``, ``reward_delta`` (mean over seeds of candidate minus
    reference) and ``win_rate`` (share of seeds where the candidate scores
    higher, ties half); always ``image_change``, the mean cosine distance
    between the two images of a seed. Sorted worst reward change first (or
    largest image change first without rewards).
    """
    keys = list(KEY_COLUMNS)
    pairs = reference.merge(candidate, on=keys, suffixes=("_ref", "_cand"), validate="one_to_one")
    ref = pairs[[f"{c}_ref" for c in embedding_columns]].to_numpy(dtype=np.float64)
    cand = pairs[[f"{c}_cand" for c in embedding_columns]].to_numpy(dtype=np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cosine = np.divide((ref * cand).sum(axis=1), norms, out=np.ones(len(pairs)), where=norms > 0)
    table = pd.DataFrame({"prompt": pairs["prompt"], "image_change": np.clip(1.0 - cosine, 0.0, 2.0)})
    with_rewards = _has_rewards(reference) and _has_rewards(candidate)
    if with_rewards:
        delta = pairs["reward_cand"].to_numpy(dtype=np.float64) - pairs["reward_ref"].to_numpy(dtype=np.float64)
        table["reward_reference"] = pairs["reward_ref"].to_numpy(dtype=np.float64)
        table["reward_candidate"] = pairs["reward_cand"].to_numpy(dtype=np.float64)
        table["reward_delta"] = delta
        table["win_rate"] = np.where(delta > 0, 1.0, np.where(delta < 0, 0.0, 0.5))
    grouped = table.groupby("prompt", sort=True)
    result = grouped.mean()
    result.insert(0, "seeds", grouped.size())
    result = result.reset_index()
    order = ["prompt", "seeds"]
    if with_rewards:
        order += ["reward_reference", "reward_candidate", "reward_delta", "win_rate"]
        result = result[[*order, "image_change"]].sort_values(["reward_delta", "prompt"], ascending=[True, True])
    else:
        result = result[[*order, "image_change"]].sort_values(["image_change", "prompt"], ascending=[False, True])
    return result.reset_index(drop=True)


def _principal_components(
    reference: np.ndarray, candidate: np.ndarray, components: int
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Both embeddings projected on the reference's leading principal components (fitted on the reference only)."""
    from sklearn.decomposition import PCA

    components = min(components, reference.shape[1], reference.shape[0] - 1)
    if components < 1:
        raise ValueError(f"need at least two reference samples for principal components, got {reference.shape[0]}")
    pca = PCA(n_components=components, random_state=0).fit(reference)
    return pca.transform(reference), pca.transform(candidate), [float(v) for v in pca.explained_variance_ratio_]


def _column_drift(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per tested column: Evidently's drift score, its method and threshold, and whether its test failed.

    Evidently picks the method by sample size (a K-S p-value up to 1000 rows,
    a normed Wasserstein distance above), so "drifted" is read from its test,
    not re-derived from the score.
    """
    columns: dict[str, dict[str, Any]] = {}
    for metric in results["metrics"]:
        config = metric["config"]
        if config["type"].endswith(":ValueDrift"):
            columns[config["column"]] = {
                "score": float(metric["value"]),
                "method": config.get("method"),
                "threshold": config.get("threshold"),
            }
    for test in results["tests"]:
        params = test["metric_config"]["params"]
        if params["type"].endswith(":ValueDrift") and params["column"] in columns:
            columns[params["column"]]["drift"] = test["status"] == "FAIL"
    missing = [column for column, values in columns.items() if "drift" not in values]
    if missing:
        raise RuntimeError(f"Evidently returned no drift test for the column(s) {missing}")
    return columns


def build_drift_report(
    reference: pd.DataFrame,
    candidate: pd.DataFrame,
    *,
    reference_label: str = "reference",
    candidate_label: str = "candidate",
    pca_components: int = DEFAULT_PCA_COMPONENTS,
    mmd_threshold: float = DEFAULT_MMD_THRESHOLD,
    drift_share: float = DEFAULT_DRIFT_SHARE,
    notes: list[str] | None = None,
) -> DriftResult:
    """Evidently drift report of ``candidate`` against ``reference``, with the paired per-prompt table.

    Args:
        reference: Per-image rows of the reference model (``samples_frame`` schema).
        candidate: Per-image rows of the candidate, on the same (prompt, seed) grid.
        reference_label: What the reference is, e.g. ``"production version 3"``.
        candidate_label: What the candidate is.
        pca_components: Principal components of the embeddings tested one by one.
        mmd_threshold: MMD² above which the embedding has drifted.
        drift_share: Share of tested columns that must drift for the whole set to drift.
        notes: Extra lines for the report's header (e.g. why the base model is the reference).

    Returns:
        The report. ``summary`` holds ``drift_share`` (share of tested columns
        that drifted), ``drifted_columns``, ``tested_columns``, ``dataset_drift``,
        ``embedding_drift_score`` (MMD²), ``embedding_drift``, ``embedding``
        (the embedding's name), ``image_change_mean``, and with rewards
        ``reward_drift_score`` / ``_method`` (Evidently's choice by sample size,
        a K-S p-value up to 1000 rows), ``reward_drift``, ``reward_mean_reference``,
        ``reward_mean_candidate``, ``reward_mean_delta`` and
        ``prompts_worse_share`` (share of prompts whose mean reward fell);
        without rewards those are None.

    Raises:
        ValueError: If the frames do not describe the same grid (see :func:`check_frames`).
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift, MeanValue
    from evidently.metrics.embeddings import MMDDriftMethod
    from evidently.presets import DataDriftPreset

    embedding_columns = check_frames(reference, candidate)
    with_rewards = _has_rewards(reference) and _has_rewards(candidate)
    keys = list(KEY_COLUMNS)
    # Same row order in both frames, so row i of each is one (prompt, seed).
    reference = reference.sort_values(keys).reset_index(drop=True)
    candidate = candidate.sort_values(keys).reset_index(drop=True)
    ref_embeddings = reference[embedding_columns].to_numpy(dtype=np.float64)
    cand_embeddings = candidate[embedding_columns].to_numpy(dtype=np.float64)
    ref_pcs, cand_pcs, explained = _principal_components(ref_embeddings, cand_embeddings, pca_components)
    pc_columns = [f"{PC_PREFIX}{i + 1}" for i in range(ref_pcs.shape[1])]

    def evidently_frame(frame: pd.DataFrame, pcs: np.ndarray) -> pd.DataFrame:
        parts = [frame[keys].reset_index(drop=True)]
        if with_rewards:
            parts.append(frame[["reward"]].astype(np.float64))
        parts += [pd.DataFrame(pcs, columns=pc_columns), frame[embedding_columns].astype(np.float64)]
        return pd.concat(parts, axis=1)

    tested = (["reward"] if with_rewards else []) + pc_columns
    definition = DataDefinition(
        numerical_columns=[*tested, *embedding_columns],
        categorical_columns=["prompt", "seed"],
        embeddings={EMBEDDING_NAME: embedding_columns},
    )
    mmd = MMDDriftMethod(threshold=mmd_threshold)
    metrics: list[Any] = [DataDriftPreset(columns=tested, drift_share=drift_share)]
    # Evidently's embedding widget draws a t-SNE map with perplexity 30, which needs more than
    # 30 images in all; below that only its drift method runs (the same one, called directly).
    embedding_widget = len(reference) + len(candidate) > TSNE_MIN_SAMPLES
    if embedding_widget:
        metrics.append(EmbeddingsDrift(embeddings_name=EMBEDDING_NAME, drift_method=mmd))
    if with_rewards:
        metrics.append(MeanValue(column="reward"))
    snapshot = Report(metrics, include_tests=True).run(
        Dataset.from_pandas(evidently_frame(candidate, cand_pcs), data_definition=definition),
        Dataset.from_pandas(evidently_frame(reference, ref_pcs), data_definition=definition),
    )

    summary: dict[str, Any] = {
        "reference": reference_label,
        "candidate": candidate_label,
        "embedding": str(reference[EMBEDDING_SOURCE_COLUMN].iloc[0]),
        "embedding_dims": len(embedding_columns),
        "samples": len(reference),
        "prompts": int(reference["prompt"].nunique()),
        "tested_columns": tested,
        "pca_explained_variance": explained,
    }
    results = snapshot.dict()
    for metric in results["metrics"]:
        if metric["config"]["type"].endswith(":DriftedColumnsCount"):
            summary["drifted_columns"] = int(metric["value"]["count"])
            summary["drift_share"] = float(metric["value"]["share"])
    column_drift = _column_drift(results)
    embedding_score, _, _ = mmd(
        pd.DataFrame(cand_embeddings, columns=embedding_columns),
        pd.DataFrame(ref_embeddings, columns=embedding_columns),
    )
    summary["embedding_drift_score"] = float(embedding_score)
    summary["dataset_drift"] = summary["drift_share"] >= drift_share
    summary["embedding_drift"] = summary["embedding_drift_score"] > mmd_threshold
    summary["embedding_drift_method"] = f"mmd (threshold {mmd_threshold})"
    summary["column_drift"] = column_drift
    per_prompt = per_prompt_deltas(reference, candidate, embedding_columns)
    summary["image_change_mean"] = float(per_prompt["image_change"].mean())
    if with_rewards:
        summary["reward_drift_score"] = column_drift["reward"]["score"]
        summary["reward_drift_method"] = column_drift["reward"]["method"]
        summary["reward_drift"] = column_drift["reward"]["drift"]
        summary["reward_mean_reference"] = float(reference["reward"].mean())
        summary["reward_mean_candidate"] = float(candidate["reward"].mean())
        summary["reward_mean_delta"] = summary["reward_mean_candidate"] - summary["reward_mean_reference"]
        summary["prompts_worse_share"] = float((per_prompt["reward_delta"] < 0).mean())
    else:
        for key in ("reward_drift_score", "reward_drift_method", "reward_drift", "reward_mean_reference"):
            summary[key] = None
        summary["reward_mean_candidate"] = summary["reward_mean_delta"] = summary["prompts_worse_share"] = None

    all_notes = list(notes or [])
    if summary["embedding"] == PIXEL_EMBEDDING:
        all_notes.append(
            "The evaluation's scorer offers no image embedding (or its embedding model is not on this machine), "
            f"so images are embedded as their pixels box-downsampled to {PIXEL_EMBEDDING.removeprefix('pixels_')}: "
            "this sees layout and colour, not content."
        )
    if not with_rewards:
        all_notes.append("No reward scorer was configured: the report covers image embeddings only.")
    if not embedding_widget:
        all_notes.append(
            f"Only {len(reference) + len(candidate)} images: too few for Evidently's embedding map "
            f"(t-SNE needs more than {TSNE_MIN_SAMPLES}); the embedding drift score above uses the same MMD method."
        )
    header = _summary_html(summary, per_prompt, all_notes)
    return DriftResult(
        html=_insert_after_body(snapshot.get_html_str(as_iframe=False), header), summary=summary, per_prompt=per_prompt
    )


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers worth logging as model-version metadata (scalars only)."""
    keys = (
        "reference",
        "embedding",
        "samples",
        "drift_share",
        "dataset_drift",
        "embedding_drift_score",
        "embedding_drift",
        "image_change_mean",
        "reward_drift_score",
        "reward_drift_method",
        "reward_drift",
        "reward_mean_reference",
        "reward_mean_candidate",
        "reward_mean_delta",
        "prompts_worse_share",
    )
    return {key: summary[key] for key in keys if summary.get(key) is not None}


# Evidently draws its widgets from JSON with JavaScript and has no widget for a
# paired per-prompt table, so the summary and that table are plain HTML placed
# above its dashboard.


def _format(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "n/a"}[value]
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _summary_html(summary: dict[str, Any], per_prompt: pd.DataFrame, notes: list[str]) -> str:
    rows = [
        ("Reference", summary["reference"]),
        ("Candidate", summary["candidate"]),
        ("Samples (prompts x seeds)", f"{summary['samples']} ({summary['prompts']} prompts)"),
        ("Image embedding", f"{summary['embedding']} ({summary['embedding_dims']} dims)"),
        ("Drift share (columns drifted / tested)", f"{summary['drift_share']:.3g} of {summary['tested_columns']}"),
        (
            "Embedding drift (MMD²)",
            f"{summary['embedding_drift_score']:.4g}, drift: {_format(summary['embedding_drift'])}",
        ),
        ("Mean image change (cosine distance, paired)", summary["image_change_mean"]),
        (
            "Reward mean: reference / candidate",
            f"{_format(summary['reward_mean_reference'])} / {_format(summary['reward_mean_candidate'])}",
        ),
        ("Reward mean delta", summary["reward_mean_delta"]),
        (
            f"Reward distribution drift ({summary['reward_drift_method'] or 'score'})",
            f"{_format(summary['reward_drift_score'])}, drift: {_format(summary['reward_drift'])}",
        ),
        ("Share of prompts that got worse", summary["prompts_worse_share"]),
    ]
    table = "".join(f"<tr><th>{html.escape(name)}</th><td>{_format(value)}</td></tr>" for name, value in rows)
    note_items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    deltas = per_prompt.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, classes="per-prompt")
    style = (
        "<style>#model-drift-summary{font-family:sans-serif;margin:16px 24px}"
        "#model-drift-summary table{border-collapse:collapse;margin-bottom:12px}"
        "#model-drift-summary th,#model-drift-summary td{border:1px solid #ccc;padding:3px 8px;text-align:left}</style>"
    )
    return (
        f'{style}<div id="model-drift-summary">'
        f'<section id="drift-headline"><h2>Model drift: {html.escape(summary["candidate"])} vs '
        f"{html.escape(summary['reference'])}</h2><table>{table}</table>"
        f"{f'<ul>{note_items}</ul>' if note_items else ''}</section>"
        f'<section id="per-prompt-deltas"><h3>Per-prompt deltas (same seeds, candidate minus reference)</h3>'
        f"{deltas}</section>"
        '<section id="evidently-report"><h3>Distributions (Evidently)</h3></section></div>'
    )


def _insert_after_body(document: str, fragment: str) -> str:
    start = document.find("<body")
    if start < 0:
        raise ValueError("Evidently's HTML has no <body> to put the summary in")
    end = document.index(">", start) + 1
    return document[:end] + fragment + document[end:]
