"""Style alignment, Diffusion-RPO's second evaluation: style scorers, style preference pairs, the style report.

The task (research/algorithms.md §2): fine-tune a model on preference pairs
whose preferred image shows a target style and whose dispreferred image is the
same content without it; then, on held-out prompts, measure how strongly the
model's samples show the style and whether their content survived, against the
base model on the same (prompt, seed) grid.

- **Scoring** (:class:`StyleScorer`): ``style_scores(images, prompts)`` in
  [0, 1], how strongly each image shows the target style, and
  ``content_scores(images, prompts)``, how well it still shows its prompt.
  Real: :class:`ClipStyleScorer`, CLIP zero-shot (softmax of the style
  descriptions against neutral ones) and the CLIP cosine to the prompt. Toy:
  ``alignment.toyworld.style.ToyStyleScorer`` (the toy style classifier and
  the oracle's all-correct indicator); :func:`load_style_scorer` makes either.
- **Pairs**: :func:`make_style_pairs` edits Pick-a-Pic images with an img2img
  or InstructPix2Pix pipeline (:func:`load_style_editor`): edited preferred,
  original dispreferred, Pick-a-Pic columns out. The toy world's pairs are
  ``alignment.toyworld.style.toy_style_pairs``.
- **Report**: :func:`style_samples_frame` turns images, prompts and scorers
  into per-image rows (:data:`STYLE_COLUMNS`); :func:`build_style_report`
  compares a candidate's rows with a reference's (base model) per style, with
  bootstrap CIs over prompts, paired win rates and an image grid. Importing
  this module registers it as ``"style"`` in :mod:`alignment.reports`.

Nothing is downloaded: CLIP models and editors come from local paths or hub ids
already in the Hugging Face cache. transformers, diffusers and the toy world
are imported when a scorer, an editor or a report needs them.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import Tensor

from alignment.reports import STYLE_REPORT, comparison_builder, register_report

logger = logging.getLogger(__name__)

__all__ = [
    "CONTENT_SCORE_COLUMN",
    "IMAGE_COLUMN",
    "NEUTRAL_DESCRIPTIONS",
    "STYLE_COLUMN",
    "STYLE_COLUMNS",
    "STYLE_DESCRIPTIONS",
    "STYLE_SCORE_COLUMN",
    "ClipStyleScorer",
    "StyleReport",
    "StyleScorer",
    "build_style_report",
    "load_style_editor",
    "load_style_scorer",
    "make_style_pairs",
    "style_headline",
    "style_samples_frame",
]

# --------------------------------------------------------------------------------------------
# The rows a style report reads
# --------------------------------------------------------------------------------------------

STYLE_COLUMN = "style"
"""Which target style a row's scores are about (one image gets one row per style it is scored for)."""
STYLE_SCORE_COLUMN = "style_score"
"""How strongly the image shows that style, in [0, 1]."""
CONTENT_SCORE_COLUMN = "content_score"
"""How well the image still shows its prompt (toy: 0/1 oracle all-correct; CLIP: cosine to the prompt)."""
IMAGE_COLUMN = "image_png"
"""Optional: the image as PNG bytes (a thumbnail), for the report's grid."""
KEY_COLUMNS = (STYLE_COLUMN, "prompt", "seed")
STYLE_COLUMNS = ("prompt", "seed", STYLE_COLUMN, STYLE_SCORE_COLUMN, CONTENT_SCORE_COLUMN)
"""The columns every row of a style report needs (``model``, ``image_png`` and others are optional)."""

DEFAULT_THUMBNAIL_SIDE = 256
DEFAULT_RESAMPLES = 2000
DEFAULT_GRID_PROMPTS = 6

ImageInput = Sequence[Image.Image] | Tensor


@runtime_checkable
class StyleScorer(Protocol):
    """How strongly images show one target style, and how well they keep their content.

    Attributes:
        style: The target style's name (what the report's ``style`` column says).
        name: What scores it, for the report (e.g. ``"clip:openai/clip-vit-large-patch14"``).
    """

    style: str
    name: str

    def style_scores(self, images: ImageInput, prompts: Sequence[str]) -> Tensor:
        """``[N]`` float in [0, 1]: 1 is the style fully shown."""
        ...

    def content_scores(self, images: ImageInput, prompts: Sequence[str]) -> Tensor:
        """``[N]`` float: higher is more of the prompt's content kept."""
        ...


# --------------------------------------------------------------------------------------------
# CLIP zero-shot
# --------------------------------------------------------------------------------------------

STYLE_DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "van_gogh": ("a Van Gogh painting",),
    "pencil_sketch": ("a pencil sketch",),
}
"""Default text descriptions of the paper's example styles; pass ``style_texts`` for any other."""
NEUTRAL_DESCRIPTIONS: tuple[str, ...] = ("a photo",)


class ClipStyleScorer:
    """CLIP zero-shot style score and CLIP content score.

    ``style_scores``: the image's CLIP logits (``scale`` x cosine) against every
    style text and every neutral text go through one softmax; the score is the
    probability mass on the style texts. With one style and one neutral text it
    is ``sigmoid(scale * (cos(image, style) - cos(image, neutral)))``.

    ``content_scores``: the cosine between the image and its prompt, in [-1, 1]
    (about 0.2-0.35 for a matching image under OpenAI CLIP): how much of the
    prompt the stylised image still shows.

    Images are PIL images or tensors as :func:`alignment.rewards.to_pil_images`
    takes them (uint8, or float in [0, 1]).

    Args:
        encoder: A CLIP dual encoder scorer (e.g. ``ClipScoreScorer.load(...)``), used for its embeddings.
        style: The style's name.
        style_texts: Descriptions of the style; ``STYLE_DESCRIPTIONS[style]`` if None.
        neutral_texts: Descriptions of the unstyled alternative.
        scale: Logit scale; the model's ``logit_scale.exp()`` if None (100 for OpenAI CLIP).
    """

    def __init__(
        self,
        encoder: Any,
        style: str,
        style_texts: Sequence[str] | None = None,
        neutral_texts: Sequence[str] = NEUTRAL_DESCRIPTIONS,
        *,
        scale: float | None = None,
    ) -> None:
        if style_texts is None:
            if style not in STYLE_DESCRIPTIONS:
                raise ValueError(
                    f"unknown style {style!r} and no style_texts: pass descriptions of the style, or use one of "
                    f"{sorted(STYLE_DESCRIPTIONS)}"
                )
            style_texts = STYLE_DESCRIPTIONS[style]
        self.style_texts, self.neutral_texts = list(style_texts), list(neutral_texts)
        if not self.style_texts or not self.neutral_texts:
            raise ValueError("a CLIP style scorer needs at least one style text and one neutral text")
        if scale is None:
            scale = float(encoder.model.logit_scale.detach().float().exp())
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.encoder, self.style, self.scale = encoder, style, scale
        self.name = f"clip:{encoder.metadata.get('source', type(encoder).__name__)}"
        self._text_bank: Tensor | None = None

    @classmethod
    def load(
        cls,
        style: str,
        source: str | None = None,
        *,
        style_texts: Sequence[str] | None = None,
        neutral_texts: Sequence[str] = NEUTRAL_DESCRIPTIONS,
        processor_source: str | None = None,
        scale: float | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 8,
    ) -> ClipStyleScorer:
        """Load a CLIP model offline (local directory or cached hub id; default ``openai/clip-vit-large-patch14``).

        Raises:
            ModelNotAvailableError: If the model is not on this machine.
        """
        from alignment.rewards.clip_scorers import ClipScoreScorer

        encoder = ClipScoreScorer.load(source, processor_source=processor_source, batch_size=batch_size)
        encoder.to(device, dtype)
        return cls(encoder, style, style_texts, neutral_texts, scale=scale)

    def _texts(self) -> Tensor:
        if self._text_bank is None:
            self._text_bank = self.encoder.text_embeddings([*self.style_texts, *self.neutral_texts])
        return self._text_bank

    @torch.no_grad()
    def style_scores(self, images: ImageInput, prompts: Sequence[str]) -> Tensor:
        image_embeddings = self._image_embeddings(images, prompts)
        probabilities = (self.scale * image_embeddings @ self._texts().T).softmax(dim=1)
        return probabilities[:, : len(self.style_texts)].sum(dim=1)

    @torch.no_grad()
    def content_scores(self, images: ImageInput, prompts: Sequence[str]) -> Tensor:
        image_embeddings = self._image_embeddings(images, prompts)
        return (image_embeddings * self.encoder.text_embeddings(list(prompts))).sum(dim=1)

    def _image_embeddings(self, images: ImageInput, prompts: Sequence[str]) -> Tensor:
        count = len(images)
        if len(prompts) != count:
            raise ValueError(f"got {count} images but {len(prompts)} prompts")
        return self.encoder.image_embeddings(images)


def load_style_scorer(style: str, kind: str = "toy", source: str | None = None, **kwargs: Any) -> StyleScorer:
    """A style scorer by kind: ``"toy"`` (toy classifier + oracle; ``source`` the classifier dir) or ``"clip"``.

    Raises:
        ValueError: For an unknown kind or style.
    """
    if kind == "toy":
        from alignment.toyworld.style import DEFAULT_STYLE_CLASSIFIER_DIR, ToyStyleScorer

        return ToyStyleScorer(style, classifier_dir=source or DEFAULT_STYLE_CLASSIFIER_DIR, **kwargs)
    if kind == "clip":
        return ClipStyleScorer.load(style, source, **kwargs)
    raise ValueError(f"unknown style scorer kind {kind!r}; use 'toy' or 'clip'")


# --------------------------------------------------------------------------------------------
# Per-image rows
# --------------------------------------------------------------------------------------------


def _thumbnail_png(image: Image.Image, side: int | None) -> bytes:
    image = image.convert("RGB")
    if side is not None and max(image.size) > side:
        image = image.copy()
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _as_pil(images: ImageInput) -> list[Image.Image]:
    """PIL images from PIL images or an ``[N, 3, H, W]`` tensor in [-1, 1] (the diffusion and toy-world convention)."""
    if not isinstance(images, Tensor):
        return list(images)
    pixels = images.detach().float().cpu()
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"image tensors must be [N, 3, H, W], got shape {tuple(pixels.shape)}")
    if pixels.numel() and (pixels.min() < -1.001 or pixels.max() > 1.001):
        raise ValueError(f"image tensors must lie in [-1, 1], got values in [{pixels.min():.3f}, {pixels.max():.3f}]")
    array = ((pixels.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(item), mode="RGB") for item in array]


def style_samples_frame(
    label: str,
    prompts: Sequence[str],
    seeds: Sequence[int],
    images: ImageInput,
    scorers: StyleScorer | Sequence[StyleScorer],
    *,
    keep_images: bool = True,
    thumbnail_side: int | None = DEFAULT_THUMBNAIL_SIDE,
) -> pd.DataFrame:
    """Per-image style rows of one model: ``model, style, prompt, seed, style_score, content_score[, image_png]``.

    One row per (scorer, image): an image scored for two styles gives two rows.
    The rows can be merged onto :func:`alignment.evaluate.samples_frame` rows on
    ``(prompt, seed)``.

    Args:
        label: The model (``"base"``, ``"aligned"``).
        prompts, seeds: One per image (the evaluation grid).
        images: PIL images or an ``[N, 3, H, W]`` tensor in [-1, 1] (what the toy scorer reads; the
            CLIP scorer takes PIL images or tensors in [0, 1], see :class:`ClipStyleScorer`).
        scorers: One scorer per target style.
        keep_images: Store each image as PNG bytes (``image_png``) for the report's grid.
        thumbnail_side: Longest side of the stored images (None: full size).

    Raises:
        ValueError: If the counts differ, a scorer returns the wrong shape or a style score outside [0, 1].
    """
    count = len(images)
    if len(prompts) != count or len(seeds) != count:
        raise ValueError(f"{label}: got {count} images, {len(prompts)} prompts and {len(seeds)} seeds")
    scorers = [scorers] if isinstance(scorers, StyleScorer) else list(scorers)
    if not scorers:
        raise ValueError("no style scorer given")
    styles = [scorer.style for scorer in scorers]
    if len(set(styles)) != len(styles):
        raise ValueError(f"two scorers score the same style: {styles}")
    pngs = [_thumbnail_png(image, thumbnail_side) for image in _as_pil(images)] if keep_images else None
    frames = []
    for scorer in scorers:
        style = scorer.style_scores(images, list(prompts)).detach().cpu().to(torch.float64).numpy()
        content = scorer.content_scores(images, list(prompts)).detach().cpu().to(torch.float64).numpy()
        for what, values in (("style", style), ("content", content)):
            if values.shape != (count,):
                raise ValueError(f"{scorer.name} returned {what} scores of shape {values.shape} for {count} images")
        if ((style < 0) | (style > 1)).any() or not np.isfinite(style).all():
            raise ValueError(f"{scorer.name} returned style scores outside [0, 1]")
        frame = pd.DataFrame(
            {
                "model": label,
                STYLE_COLUMN: scorer.style,
                "prompt": list(prompts),
                "seed": np.asarray(seeds, dtype=np.int64),
                STYLE_SCORE_COLUMN: style,
                CONTENT_SCORE_COLUMN: content,
                "scorer": scorer.name,
            }
        )
        if pngs is not None:
            frame[IMAGE_COLUMN] = pngs
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass
class StyleReport:
    """A built style report.

    Attributes:
        html: Standalone HTML: the per-style table, notes and the image grid.
        summary: JSON-able: labels, counts and per style every number of the table.
        per_style: One row per style (the table's numbers).
        per_prompt: One row per (style, prompt): mean scores of both models and the style win rate.
    """

    html: str
    summary: dict[str, Any]
    per_style: pd.DataFrame
    per_prompt: pd.DataFrame


def check_style_frames(reference: pd.DataFrame, candidate: pd.DataFrame) -> None:
    """Both frames hold style rows on the same (style, prompt, seed) keys with usable scores.

    Raises:
        ValueError: Naming the frame and the column, key or value that is wrong.
    """
    for name, frame in (("reference", reference), ("candidate", candidate)):
        missing = [column for column in STYLE_COLUMNS if column not in frame.columns]
        if missing:
            raise ValueError(
                f"the {name} rows lack the column(s) {missing} (a style report needs {list(STYLE_COLUMNS)}; "
                f"they have {list(frame.columns)[:12]}); make them with alignment.style.style_samples_frame"
            )
        if frame.empty:
            raise ValueError(f"the {name} rows are empty")
        duplicated = frame.duplicated(list(KEY_COLUMNS))
        if duplicated.any():
            row = frame[duplicated].iloc[0]
            raise ValueError(
                f"the {name} rows hold (style={row[STYLE_COLUMN]!r}, prompt={row['prompt']!r}, seed={row['seed']}) "
                f"more than once ({int(duplicated.sum())} duplicate rows)"
            )
        for column in (STYLE_SCORE_COLUMN, CONTENT_SCORE_COLUMN):
            values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
            if not np.isfinite(values).all():
                bad = frame[~np.isfinite(values)].iloc[0]
                raise ValueError(
                    f"the {name} rows have a non-numeric or non-finite {column} "
                    f"(first at style={bad[STYLE_COLUMN]!r}, prompt={bad['prompt']!r}, seed={bad['seed']})"
                )
        scores = frame[STYLE_SCORE_COLUMN].to_numpy(dtype=np.float64)
        if ((scores < 0) | (scores > 1)).any():
            raise ValueError(f"the {name} rows have {STYLE_SCORE_COLUMN} outside [0, 1]")
    reference_keys = set(map(tuple, reference[list(KEY_COLUMNS)].itertuples(index=False)))
    candidate_keys = set(map(tuple, candidate[list(KEY_COLUMNS)].itertuples(index=False)))
    if reference_keys != candidate_keys:
        only_reference = sorted(reference_keys - candidate_keys, key=str)[:3]
        only_candidate = sorted(candidate_keys - reference_keys, key=str)[:3]
        raise ValueError(
            "the reference and the candidate were not scored on the same (style, prompt, seed) grid: "
            f"only in the reference {only_reference}, only in the candidate {only_candidate}"
        )


def bootstrap_mean(
    values: np.ndarray, groups: Sequence[Any], *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> tuple[float, tuple[float, float]]:
    """Mean of ``values`` with a 95% percentile-bootstrap CI that resamples whole groups (prompts).

    The same scheme as ``alignment.evaluate.paired_win_rate``: a resample draws
    as many groups as there are, with replacement, and takes the mean over all
    their values. With one group the interval is the mean itself.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) != len(groups) or len(values) == 0:
        raise ValueError("values and groups must be 1-D, non-empty and of one length")
    _, index = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    sums = np.bincount(index, weights=values)
    counts = np.bincount(index).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, len(sums), size=(resamples, len(sums)))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), (float(low), float(high))


def _style_numbers(pairs: pd.DataFrame, resamples: int, seed: int) -> dict[str, Any]:
    """The table's numbers for one style; ``pairs`` has one row per (prompt, seed) with ``_ref`` / ``_cand`` scores."""
    from alignment.evaluate import paired_win_rate

    prompts = pairs["prompt"].astype(str).to_numpy()
    numbers: dict[str, Any] = {"prompts": int(pairs["prompt"].nunique()), "images": len(pairs)}
    for what, column in (("style", STYLE_SCORE_COLUMN), ("content", CONTENT_SCORE_COLUMN)):
        reference = pairs[f"{column}_ref"].to_numpy(dtype=np.float64)
        candidate = pairs[f"{column}_cand"].to_numpy(dtype=np.float64)
        for side, values in (("reference", reference), ("candidate", candidate), ("delta", candidate - reference)):
            mean, ci = bootstrap_mean(values, prompts, resamples=resamples, seed=seed)
            numbers[f"{what}_{side}"] = mean
            numbers[f"{what}_{side}_ci95"] = list(ci)
        rate, ci = paired_win_rate(candidate, reference, prompts, resamples=resamples, seed=seed)
        numbers[f"{what}_win_rate"] = rate
        numbers[f"{what}_win_rate_ci95"] = list(ci)
    return numbers


def build_style_report(
    reference: pd.DataFrame,
    candidate: pd.DataFrame,
    *,
    reference_label: str = "base",
    candidate_label: str = "aligned",
    notes: Sequence[str] = (),
    styles: Sequence[str] | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    grid_prompts: int = DEFAULT_GRID_PROMPTS,
) -> StyleReport:
    """Style alignment of ``candidate`` against ``reference`` (the base model) on the same grid.

    Per style: the mean style score and content score of both models and the
    paired change (candidate minus reference), each with a 95% bootstrap CI
    over prompts, and the paired win rate of the candidate over the reference
    (share of (prompt, seed) pairs where its score is higher, ties half; CI over
    prompts) on style and on content. The HTML adds a grid of a few prompts'
    images, reference above candidate, when the rows carry ``image_png``.

    Args:
        reference: Rows of the reference model (:func:`style_samples_frame`).
        candidate: Rows of the candidate, on the same (style, prompt, seed) keys.
        reference_label, candidate_label: What the two models are.
        notes: Extra lines for the header.
        styles: The styles to report (all in the rows if None).
        resamples: Bootstrap resamples.
        seed: Bootstrap seed.
        grid_prompts: Prompts in the image grid (their first seed each).

    Raises:
        ValueError: On missing columns, mismatched grids, bad scores, or a style not in the rows.
    """
    check_style_frames(reference, candidate)
    present = sorted(reference[STYLE_COLUMN].astype(str).unique())
    if styles is None:
        styles = present
    unknown = [style for style in styles if style not in present]
    if unknown:
        raise ValueError(f"unknown style(s) {unknown}: the rows score {present}")
    keys = list(KEY_COLUMNS)
    scores = [STYLE_SCORE_COLUMN, CONTENT_SCORE_COLUMN]
    pairs = reference[keys + scores].merge(
        candidate[keys + scores], on=keys, suffixes=("_ref", "_cand"), validate="one_to_one"
    )
    per_style, per_prompt = [], []
    for style in styles:
        rows = pairs[pairs[STYLE_COLUMN] == style].sort_values(["prompt", "seed"])
        per_style.append({STYLE_COLUMN: style, **_style_numbers(rows, resamples, seed)})
        delta = rows[f"{STYLE_SCORE_COLUMN}_cand"] - rows[f"{STYLE_SCORE_COLUMN}_ref"]
        prompt_rows = rows.assign(style_win=np.where(delta > 0, 1.0, np.where(delta < 0, 0.0, 0.5)))
        grouped = prompt_rows.groupby("prompt", sort=True)
        table = grouped[[f"{STYLE_SCORE_COLUMN}_ref", f"{STYLE_SCORE_COLUMN}_cand", "style_win"]].mean()
        table[f"{CONTENT_SCORE_COLUMN}_ref"] = grouped[f"{CONTENT_SCORE_COLUMN}_ref"].mean()
        table[f"{CONTENT_SCORE_COLUMN}_cand"] = grouped[f"{CONTENT_SCORE_COLUMN}_cand"].mean()
        table.insert(0, "seeds", grouped.size())
        table.insert(0, STYLE_COLUMN, style)
        per_prompt.append(table.reset_index())
    per_style_frame = pd.DataFrame(per_style)
    per_prompt_frame = pd.concat(per_prompt, ignore_index=True)
    summary: dict[str, Any] = {
        "reference": reference_label,
        "candidate": candidate_label,
        "styles": list(styles),
        "prompts": int(reference["prompt"].nunique()),
        "seeds_per_prompt": float(reference.groupby([STYLE_COLUMN, "prompt"]).size().mean()),
        "scorers": sorted(map(str, reference["scorer"].unique())) if "scorer" in reference.columns else [],
        "bootstrap": {"resamples": resamples, "seed": seed, "level": 0.95, "unit": "prompt"},
        "per_style": {row[STYLE_COLUMN]: {k: v for k, v in row.items() if k != STYLE_COLUMN} for row in per_style},
    }
    document = _report_html(summary, reference, candidate, list(notes), grid_prompts)
    return StyleReport(document, summary, per_style_frame, per_prompt_frame)


def style_headline(summary: dict[str, Any]) -> dict[str, Any]:
    """Scalars worth logging as model-version metadata: ``style/<style>/<number>`` plus the reference's label."""
    headline: dict[str, Any] = {"reference": summary["reference"], "prompts": summary["prompts"]}
    for style, numbers in summary["per_style"].items():
        for key in (
            "style_reference",
            "style_candidate",
            "style_delta",
            "style_win_rate",
            "content_reference",
            "content_candidate",
            "content_delta",
        ):
            headline[f"style/{style}/{key}"] = numbers[key]
        low, high = numbers["style_win_rate_ci95"]
        headline[f"style/{style}/style_win_rate_ci_low"] = low
        headline[f"style/{style}/style_win_rate_ci_high"] = high
    return headline


register_report(STYLE_REPORT, comparison_builder(STYLE_REPORT, build_style_report, style_headline), replace=True)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------


def _number(value: float) -> str:
    return f"{value:.3f}"


def _with_ci(numbers: dict[str, Any], key: str) -> str:
    low, high = numbers[f"{key}_ci95"]
    return f"{_number(numbers[key])} <small>[{_number(low)}, {_number(high)}]</small>"


def _table_html(summary: dict[str, Any]) -> str:
    reference, candidate = html.escape(summary["reference"]), html.escape(summary["candidate"])
    head = (
        "<tr><th rowspan=2>style</th><th rowspan=2>prompts / images</th>"
        "<th colspan=4>style score</th><th colspan=4>content score</th></tr>"
        f"<tr><th>{reference}</th><th>{candidate}</th><th>change</th><th>win rate of {candidate}</th>"
        f"<th>{reference}</th><th>{candidate}</th><th>change</th><th>win rate of {candidate}</th></tr>"
    )
    body = []
    for style, numbers in summary["per_style"].items():
        cells = [f"<td>{html.escape(style)}</td>", f"<td>{numbers['prompts']} / {numbers['images']}</td>"]
        for what in ("style", "content"):
            cells += [
                f"<td>{_with_ci(numbers, f'{what}_{side}')}</td>"
                for side in ("reference", "candidate", "delta", "win_rate")
            ]
        body.append(f'<tr class="style-row" data-style="{html.escape(style)}">{"".join(cells)}</tr>')
    return f'<table id="style-table">{head}{"".join(body)}</table>'


def _grid_html(reference: pd.DataFrame, candidate: pd.DataFrame, summary: dict[str, Any], prompts: int) -> str:
    if IMAGE_COLUMN not in reference.columns or IMAGE_COLUMN not in candidate.columns:
        return "<p>The rows carry no images (<code>image_png</code>), so there is no image grid.</p>"
    style = summary["styles"][0]
    keys = ["prompt", "seed"]
    ref = reference[reference[STYLE_COLUMN] == style].sort_values(keys).drop_duplicates("prompt")
    cand = candidate[candidate[STYLE_COLUMN] == style].set_index(keys)
    chosen = ref.head(max(0, prompts))
    header = "".join(
        f"<th>{html.escape(str(p))}<br><small>seed {s}</small></th>"
        for p, s in zip(chosen["prompt"], chosen["seed"], strict=True)
    )
    rows = []
    for label, frame in ((summary["reference"], chosen.set_index(keys)), (summary["candidate"], cand)):
        cells = []
        for prompt, seed in zip(chosen["prompt"], chosen["seed"], strict=True):
            row = frame.loc[(prompt, seed)]
            scores = (
                f"<small>{html.escape(style)} {_number(float(row[STYLE_SCORE_COLUMN]))}, content "
                f"{_number(float(row[CONTENT_SCORE_COLUMN]))}</small>"
            )
            if not isinstance(row[IMAGE_COLUMN], (bytes, bytearray, memoryview)):
                cells.append(f"<td>(no image)<br>{scores}</td>")
                continue
            data = base64.b64encode(bytes(row[IMAGE_COLUMN])).decode("ascii")
            alt = f"{html.escape(label)}: {html.escape(str(prompt))}"
            cells.append(f'<td><img src="data:image/png;base64,{data}" alt="{alt}"><br>{scores}</td>')
        rows.append(f"<tr><th>{html.escape(label)}</th>{''.join(cells)}</tr>")
    return (
        f'<table id="style-grid"><tr><th></th>{header}</tr>{"".join(rows)}</table>'
        f"<p><small>Scores under each image: {html.escape(style)} style score, content score.</small></p>"
    )


def _report_html(
    summary: dict[str, Any], reference: pd.DataFrame, candidate: pd.DataFrame, notes: list[str], grid_prompts: int
) -> str:
    title = f"Style alignment: {summary['candidate']} vs {summary['reference']}"
    explain = [
        "Style score: how strongly an image shows the style, in [0, 1]; content score: how well it keeps its prompt.",
        "Means over all images; change = candidate minus reference on the same (prompt, seed); win rate = share of "
        "(prompt, seed) pairs where the candidate scores higher (ties count half). Brackets: 95% bootstrap "
        f"intervals over prompts ({summary['bootstrap']['resamples']} resamples).",
        *(f"Scored by {scorer}." for scorer in summary["scorers"]),
        *notes,
    ]
    items = "".join(f"<li>{html.escape(line)}</li>" for line in explain)
    style_sheet = (
        "body{font-family:sans-serif;margin:16px 24px}table{border-collapse:collapse;margin-bottom:12px}"
        "th,td{border:1px solid #ccc;padding:3px 8px;text-align:center}"
        "#style-grid img{width:128px;height:128px;image-rendering:pixelated}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style_sheet}</style></head><body>"
        f'<section id="style-headline"><h2>{html.escape(title)}</h2>'
        f"<p>{summary['prompts']} prompts, {summary['seeds_per_prompt']:g} seeds each.</p><ul>{items}</ul></section>"
        f'<section id="style-per-style"><h3>Per style</h3>{_table_html(summary)}</section>'
        f'<section id="style-images"><h3>Samples (same seed, {html.escape(summary["reference"])} above '
        f"{html.escape(summary['candidate'])})</h3>{_grid_html(reference, candidate, summary, grid_prompts)}</section>"
        "</body></html>"
    )


# --------------------------------------------------------------------------------------------
# Real style pairs: an image editor stylises Pick-a-Pic images
# --------------------------------------------------------------------------------------------

EDITOR_KINDS = ("img2img", "instruct_pix2pix")
_EDITOR_CLASSES = {
    # model_index.json _class_name -> the pipeline that edits with it
    "StableDiffusionPipeline": "StableDiffusionImg2ImgPipeline",
    "StableDiffusionImg2ImgPipeline": "StableDiffusionImg2ImgPipeline",
    "StableDiffusionXLPipeline": "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLImg2ImgPipeline": "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionInstructPix2PixPipeline": "StableDiffusionInstructPix2PixPipeline",
    "StableDiffusionXLInstructPix2PixPipeline": "StableDiffusionXLInstructPix2PixPipeline",
}


def load_style_editor(
    source: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Any:
    """An img2img (SD1.5 / SDXL) or InstructPix2Pix pipeline from a local directory or a cached hub id, offline.

    A text-to-image checkpoint (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``)
    is loaded as its img2img pipeline; an InstructPix2Pix checkpoint as itself.

    Raises:
        ModelNotAvailableError: If the checkpoint is not on this machine.
        ValueError: If its ``model_index.json`` names a pipeline that cannot edit images.
    """
    import json

    import diffusers

    from alignment.models import find_local_model

    directory = find_local_model(source, what="style editor")
    index = directory / "model_index.json"
    if not index.is_file():
        raise ValueError(f"the style editor {source} ({directory}) has no model_index.json: not a diffusers pipeline")
    class_name = json.loads(index.read_text())["_class_name"]
    if class_name not in _EDITOR_CLASSES:
        raise ValueError(
            f"the style editor {source} is a {class_name}; an editor must be one of {sorted(_EDITOR_CLASSES)}"
        )
    pipeline_class = getattr(diffusers, _EDITOR_CLASSES[class_name])
    extra = {"safety_checker": None, "requires_safety_checker": False} if "XL" not in class_name else {}
    pipeline = pipeline_class.from_pretrained(directory, dtype=dtype, local_files_only=True, **extra)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def _editor_kind(editor: Any) -> str:
    name = type(editor).__name__
    if "InstructPix2Pix" in name:
        return "instruct_pix2pix"
    if "Img2Img" in name:
        return "img2img"
    raise ValueError(
        f"the editor is a {name}; make_style_pairs needs an img2img or InstructPix2Pix pipeline "
        "(load one with alignment.style.load_style_editor)"
    )


def _source_images(pairs: pd.DataFrame, source_image: str) -> list[tuple[int, str, str, bytes]]:
    """(row position, caption, source uid, image bytes) of every image to stylise."""
    from alignment.data import PreferenceDataError

    needed = ["caption", "jpg_0", "jpg_1"] + (["label_0"] if source_image == "winner" else [])
    missing = [column for column in needed if column not in pairs.columns]
    if missing:
        raise PreferenceDataError(
            f"the pairs to stylise lack the column(s) {missing} (Pick-a-Pic v2 columns; they have {list(pairs.columns)})"
        )
    if source_image not in ("winner", "both", "jpg_0", "jpg_1"):
        raise ValueError(f"source_image must be 'winner', 'both', 'jpg_0' or 'jpg_1', got {source_image!r}")
    chosen = []
    for position, row in enumerate(pairs.to_dict(orient="records")):
        ranking = row.get("ranking_id", position)
        if source_image == "winner":
            label = float(row["label_0"])
            if abs(label - 0.5) < 1e-6:
                continue  # a tie has no winner to stylise
            if label not in (0.0, 1.0):
                raise PreferenceDataError(f"row {ranking}, column label_0: {label} is not 0, 0.5 or 1")
            columns = ["jpg_0" if label == 1.0 else "jpg_1"]
        elif source_image == "both":
            columns = ["jpg_0", "jpg_1"]
        else:
            columns = [source_image]
        for column in columns:
            uid = row.get(f"image_{column[-1]}_uid") or f"{ranking}-{column[-1]}"
            chosen.append((position, str(row["caption"]), str(uid), row[column]))
    return chosen


def _fit(image: Image.Image, resolution: int | None, multiple: int) -> Image.Image:
    """Centre-cropped square of ``resolution`` px, or the image cut to a multiple of the VAE's factor."""
    if resolution is not None:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        return image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    width, height = image.width // multiple * multiple, image.height // multiple * multiple
    if (width, height) == image.size:
        return image
    if width == 0 or height == 0:
        raise ValueError(f"an image of {image.size} is smaller than the editor's latent factor {multiple}")
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def make_style_pairs(
    pairs: pd.DataFrame,
    editor: Any,
    style_prompt: str,
    *,
    style: str = "style",
    strength: float = 0.6,
    guidance_scale: float = 7.5,
    image_guidance_scale: float = 1.5,
    num_inference_steps: int = 30,
    negative_prompt: str | None = None,
    seed: int = 0,
    batch_size: int = 4,
    source_image: str = "winner",
    resolution: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """Style preference pairs from Pick-a-Pic rows: the edited (stylised) image preferred over the original.

    Each chosen image is edited once:

    - img2img (SD1.5 / SDXL): prompt ``style_prompt`` with ``{caption}`` filled
      in, or ``"<caption>, <style_prompt>"`` when it has no placeholder; the
      image is noised to ``strength`` and denoised, so content survives for
      strengths well below 1;
    - InstructPix2Pix: ``style_prompt`` is the instruction (``{caption}``
      filled in if present), e.g. "make it a Van Gogh painting";
      ``image_guidance_scale`` holds the edit to the original.

    Image ``k`` (in order) gets its own generator seeded ``seed + k``, so the
    result does not depend on ``batch_size``. The pair keeps the original
    caption (the style is learned unconditionally, as in the paper) and the
    original image, re-encoded losslessly after the same crop the edited one got,
    as the dispreferred image; the side of the preferred image is drawn from
    ``seed`` and ``label_0`` says which it is.

    Args:
        pairs: Pick-a-Pic rows (``caption``, ``jpg_0``, ``jpg_1``, ``label_0`` for ``source_image="winner"``).
        editor: An img2img or InstructPix2Pix pipeline (:func:`load_style_editor`).
        style_prompt: What to ask the editor for, e.g. "in the style of a Van Gogh painting".
        style: The style's name, recorded in ``model_0`` / ``model_1``.
        strength: img2img noise strength in (0, 1].
        guidance_scale: Text guidance.
        image_guidance_scale: InstructPix2Pix image guidance.
        num_inference_steps: Editor steps.
        negative_prompt: Optional negative prompt.
        seed: Seeds the edits and the sides.
        batch_size: Images per editor call.
        source_image: ``"winner"`` (ties skipped), ``"both"``, ``"jpg_0"`` or ``"jpg_1"``.
        resolution: Centre-crop and resize every image to this square first; else keep its size
            (cut down to a multiple of the VAE's factor).
        progress: Called with (done, total) after every batch.

    Returns:
        A frame of Pick-a-Pic columns (``caption``, ``jpg_0``, ``jpg_1`` as PNG bytes,
        ``label_0``, ``label_1``, ``ranking_id``, ``model_0/1``, ``image_0/1_uid``,
        ``best_image_uid``), one row per edited image; ``write_pickapic_parquet`` writes it.

    Raises:
        PreferenceDataError: On missing columns or a bad label (naming the row).
        ValueError: On a bad option or an editor that cannot edit.
    """
    from alignment.data import decode_image

    kind = _editor_kind(editor)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if batch_size < 1 or num_inference_steps < 1:
        raise ValueError(
            f"batch_size and num_inference_steps must be positive, got {batch_size}, {num_inference_steps}"
        )
    chosen = _source_images(pairs, source_image)
    multiple = int(getattr(editor, "vae_scale_factor", 8))
    originals = [
        _fit(decode_image(data, row_id=uid, column="image"), resolution, multiple) for _, _, uid, data in chosen
    ]

    def edit_prompt(caption: str) -> str:
        if "{caption}" in style_prompt:
            return style_prompt.replace("{caption}", caption)
        return style_prompt if kind == "instruct_pix2pix" else f"{caption}, {style_prompt}"

    edited: list[Image.Image] = []
    start = 0
    while start < len(chosen):
        # One call per run of same-sized images: a pipeline batch shares one size.
        stop = start + 1
        while stop < len(chosen) and stop - start < batch_size and originals[stop].size == originals[start].size:
            stop += 1
        kwargs: dict[str, Any] = {
            "prompt": [edit_prompt(caption) for _, caption, _, _ in chosen[start:stop]],
            "image": originals[start:stop],
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "generator": [torch.Generator("cpu").manual_seed(seed + k) for k in range(start, stop)],
            "output_type": "pil",
        }
        if negative_prompt is not None:
            kwargs["negative_prompt"] = [negative_prompt] * (stop - start)
        if kind == "instruct_pix2pix":
            kwargs["image_guidance_scale"] = image_guidance_scale
        else:
            kwargs["strength"] = strength
        with torch.no_grad():
            images = editor(**kwargs).images
        for original, image in zip(originals[start:stop], images, strict=True):
            edited.append(image if image.size == original.size else image.resize(original.size, Image.BICUBIC))
        start = stop
        if progress is not None:
            progress(start, len(chosen))

    sides = np.random.default_rng([seed, 1]).integers(2, size=len(chosen)).astype(bool)
    rows = []
    for k, ((_, caption, uid, _), original, image, edited_first) in enumerate(
        zip(chosen, originals, edited, sides, strict=True)
    ):
        edited_uid, original_uid = f"{uid}-{style}-{seed}", uid
        first, second = (image, original) if edited_first else (original, image)
        rows.append(
            {
                "caption": caption,
                "jpg_0": _png_bytes(first),
                "jpg_1": _png_bytes(second),
                "label_0": 1.0 if edited_first else 0.0,
                "label_1": 0.0 if edited_first else 1.0,
                "ranking_id": k,
                "model_0": f"edit:{style}" if edited_first else "original",
                "model_1": "original" if edited_first else f"edit:{style}",
                "image_0_uid": edited_uid if edited_first else original_uid,
                "image_1_uid": original_uid if edited_first else edited_uid,
                "best_image_uid": edited_uid,
            }
        )
    return pd.DataFrame(rows)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()
