"""Rich-PO's curation: which (edited, original) pairs become training data, and the report that says why.

Every base-model sample is a *candidate*; it passes these stages in order and
is dropped at the first one it fails, with the reason counted:

=================  ===========================================================================
stage              dropped as
=================  ===========================================================================
critiqued          the critic's failure reason (``no_json``, ``invalid_json``, ``schema``,
                   ``no_instructions``, ``critic_error``): the critic could not say
has issues         ``no_issue``: the critic found nothing to fix (no pair to make)
edited             ``edit_failed``: the editor failed or understood no instruction
changed            ``near_duplicate``: the edit moved the pixels less than ``min_change``
reward prefers     ``reward_margin``: the reward model (never the oracle) does not prefer the
                   edit by more than ``min_margin``
unique             ``duplicate``: another kept pair of the prompt has (nearly) the same two images
under the cap      ``over_cap``: the prompt already has ``max_pairs_per_prompt`` pairs (the
                   largest reward margins are kept)
=================  ===========================================================================

The kept pairs are Pick-a-Pic rows (edited preferred), the edit in a seeded
random column so neither column is always the winner, with the critique and
the instruction as extra columns. Everything here is a pure function of its
inputs: the reward scores come in as arrays (the step scores them).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from alignment.richpo.config import CurationConfig
from alignment.richpo.critique import FAILURE_REASONS

__all__ = [
    "CANDIDATE_COLUMNS",
    "DROP_REASONS",
    "STAGES",
    "Curated",
    "curate",
    "curation_report_html",
    "mean_pixel_change",
]

# One row per base-model sample, what the critique and edit steps produce.
CANDIDATE_COLUMNS = (
    "sample_id",  # "<prompt index>-<sample index>"
    "prompt",
    "seed",
    "image",  # PNG bytes of the base-model sample
    "critique",  # the critique as JSON ("" when the critic failed)
    "critique_failure",  # one of FAILURE_REASONS, or ""
    "critique_raw",  # the critic's text, kept for the report
    "instruction",  # the instructions joined by "; "
    "edited",  # PNG bytes of the edit, or None
    "edit_error",  # why the edit failed, or ""
)
STAGES = ("sampled", "critiqued", "has_issues", "edited", "changed", "reward_prefers", "unique", "kept")
DROP_REASONS = (*FAILURE_REASONS, "no_issue", "edit_failed", "near_duplicate", "reward_margin", "duplicate", "over_cap")
EXTRA_COLUMNS = ("critique", "instruction")
_THUMBNAIL = 96


def decode_png(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(data: bytes, side: int | None = None) -> np.ndarray:
    image = decode_png(data)
    if side is not None and image.size != (side, side):
        image = image.resize((side, side), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255.0


def mean_pixel_change(original: bytes, edited: bytes) -> float:
    """Mean absolute per-channel difference in [0, 1], at the original's size (an editor may change the size)."""
    before = decode_png(original)
    after = decode_png(edited)
    if after.size != before.size:
        after = after.resize(before.size, Image.Resampling.BILINEAR)
    return float(np.abs(np.asarray(before, np.float32) - np.asarray(after, np.float32)).mean() / 255.0)


@dataclass
class Curated:
    """The kept pairs (Pick-a-Pic rows), every candidate's fate, and the counts the report shows."""

    rows: list[dict[str, Any]]
    decisions: pd.DataFrame  # one row per candidate: sample_id, prompt, stage reached, dropped_as, margin, change
    counts: dict[str, Any]


def _check_candidates(candidates: pd.DataFrame, original_scores: np.ndarray, edited_scores: np.ndarray) -> None:
    missing = [column for column in CANDIDATE_COLUMNS if column not in candidates.columns]
    if missing:
        raise ValueError(f"the Rich-PO candidates lack column(s) {missing}; expected {list(CANDIDATE_COLUMNS)}")
    for name, scores in (("original", original_scores), ("edited", edited_scores)):
        if len(scores) != len(candidates):
            raise ValueError(f"{len(scores)} {name} reward scores for {len(candidates)} candidates")


def curate(
    candidates: pd.DataFrame,
    original_scores: Sequence[float],
    edited_scores: Sequence[float],
    config: CurationConfig,
    *,
    seed: int = 0,
    models: tuple[str, str] = ("richpo-edit", "base"),
) -> Curated:
    """Keep the pairs the reward model says the edit improved; record why every other candidate was dropped.

    Args:
        candidates: One row per base-model sample (``CANDIDATE_COLUMNS``).
        original_scores / edited_scores: The reward model's score of each
            candidate's original and edit (NaN where there is no edit).
        config: Thresholds (``CurationConfig``).
        seed: Which column the edit goes in, per pair.
        models: ``model_0`` / ``model_1`` names of the edit and the original.
    """
    original_scores = np.asarray(original_scores, dtype=np.float64)
    edited_scores = np.asarray(edited_scores, dtype=np.float64)
    _check_candidates(candidates, original_scores, edited_scores)
    decisions = []
    survivors: list[tuple[int, float, float]] = []  # (row, margin, change)
    for row, candidate in enumerate(candidates.itertuples(index=False)):
        decision = {"sample_id": candidate.sample_id, "prompt": candidate.prompt, "margin": np.nan, "change": np.nan}
        if candidate.critique_failure:
            decisions.append({**decision, "stage": "sampled", "dropped_as": candidate.critique_failure})
            continue
        critique = json.loads(candidate.critique)
        if not critique["instructions"]:
            decisions.append({**decision, "stage": "critiqued", "dropped_as": "no_issue"})
            continue
        if candidate.edited is None or candidate.edit_error:
            decisions.append({**decision, "stage": "has_issues", "dropped_as": "edit_failed"})
            continue
        change = mean_pixel_change(candidate.image, candidate.edited)
        margin = float(edited_scores[row] - original_scores[row])
        decision.update(margin=margin, change=change)
        if not np.isfinite(margin):
            decisions.append({**decision, "stage": "has_issues", "dropped_as": "edit_failed"})
            continue
        if change < config.min_change:
            decisions.append({**decision, "stage": "edited", "dropped_as": "near_duplicate"})
            continue
        if margin <= config.min_margin:
            decisions.append({**decision, "stage": "changed", "dropped_as": "reward_margin"})
            continue
        decisions.append({**decision, "stage": "reward_prefers", "dropped_as": ""})
        survivors.append((row, margin, change))

    kept = _dedupe_and_cap(candidates, survivors, config, decisions)
    rng = np.random.default_rng(seed)
    rows = []
    for row in kept:
        candidate = candidates.iloc[row]
        edit_first = bool(rng.integers(2))
        images = (candidate.edited, candidate.image) if edit_first else (candidate.image, candidate.edited)
        names = models if edit_first else models[::-1]
        rows.append(
            {
                "caption": candidate.prompt,
                "jpg_0": images[0],
                "jpg_1": images[1],
                "label_0": 1.0 if edit_first else 0.0,
                "model_0": names[0],
                "model_1": names[1],
                "ranking_id": len(rows),
                "critique": candidate.critique,
                "instruction": candidate.instruction,
            }
        )
    frame = pd.DataFrame(decisions, columns=["sample_id", "prompt", "stage", "dropped_as", "margin", "change"])
    return Curated(rows=rows, decisions=frame, counts=_counts(frame))


def _dedupe_and_cap(
    candidates: pd.DataFrame, survivors: list[tuple[int, float, float]], config: CurationConfig, decisions: list[dict]
) -> list[int]:
    """Per prompt, the largest-margin survivors first; drop near-copies of a kept pair, then anything over the cap."""
    kept: list[int] = []
    by_prompt: dict[str, list[int]] = {}
    for row, _margin, _change in sorted(survivors, key=lambda item: (-item[1], item[0])):
        by_prompt.setdefault(candidates.iloc[row].prompt, []).append(row)
    thumbnails: dict[tuple[int, str], np.ndarray] = {}

    def pixels(row: int, column: str) -> np.ndarray:
        if (row, column) not in thumbnails:
            thumbnails[row, column] = _pixels(candidates.iloc[row][column], side=32)
        return thumbnails[row, column]

    for rows in by_prompt.values():
        taken: list[int] = []
        for row in rows:
            duplicate = any(
                np.abs(pixels(row, "image") - pixels(other, "image")).mean() < config.duplicate_distance
                and np.abs(pixels(row, "edited") - pixels(other, "edited")).mean() < config.duplicate_distance
                for other in taken
            )
            decision = decisions[row]  # one decision per candidate, in order
            if duplicate:
                decision.update(stage="reward_prefers", dropped_as="duplicate")
            elif config.max_pairs_per_prompt is not None and len(taken) >= config.max_pairs_per_prompt:
                decision.update(stage="unique", dropped_as="over_cap")
            else:
                decision.update(stage="kept", dropped_as="")
                taken.append(row)
        kept.extend(taken)
    return sorted(kept)


def _counts(decisions: pd.DataFrame) -> dict[str, Any]:
    """How many candidates reached each stage, and how many were dropped for each reason."""
    reached = Counter()
    for stage in decisions["stage"]:
        for earlier in STAGES[: STAGES.index(stage) + 1]:
            reached[earlier] += 1
    dropped = Counter(reason for reason in decisions["dropped_as"] if reason)
    kept = int((decisions["stage"] == "kept").sum())
    return {
        "candidates": len(decisions),
        "kept": kept,
        "kept_share": kept / len(decisions) if len(decisions) else 0.0,
        "reached": {stage: int(reached[stage]) for stage in STAGES},
        "dropped": {reason: int(dropped[reason]) for reason in DROP_REASONS if dropped[reason]},
    }


# --- the report ---------------------------------------------------------------------------------


def _image_tag(data: bytes | None, caption: str) -> str:
    if data is None:
        return "<div class='missing'>no edit</div>"
    image = decode_png(data)
    scale = max(1, _THUMBNAIL // max(image.size))
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    encoded = base64.b64encode(png_bytes(image)).decode()
    return (
        f"<figure><img src='data:image/png;base64,{encoded}'><figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _critique_html(critique_json: str, raw: str) -> str:
    if not critique_json:
        return f"<pre>{html.escape(raw[:400])}</pre>"
    critique = json.loads(critique_json)
    issues = "".join(
        f"<li><b>{html.escape(issue['aspect'])}</b> ({issue['severity']:.2f}): {html.escape(issue['evidence'])}</li>"
        for issue in critique["issues"]
    )
    return f"<ul>{issues or '<li>no issue found</li>'}</ul>"


def _pick_examples(candidates: pd.DataFrame, decisions: pd.DataFrame, count: int) -> list[int]:
    """Kept pairs first, then one of each drop reason, so the report shows what each stage does."""
    chosen: list[int] = []
    kept = decisions.index[decisions["stage"] == "kept"].tolist()
    per_reason = [decisions.index[decisions["dropped_as"] == reason].tolist()[:1] for reason in DROP_REASONS]
    dropped = [rows[0] for rows in per_reason if rows]
    for row in kept[: max(count - len(dropped), count // 2)] + dropped:
        if row not in chosen and len(chosen) < count:
            chosen.append(row)
    return chosen


def curation_report_html(
    candidates: pd.DataFrame, curated: Curated, *, critic: str, editor: str, reward: str, config: CurationConfig
) -> str:
    """The curation report: the funnel, the drop reasons, and examples with their critique and before / after."""
    counts = curated.counts
    funnel = "".join(
        f"<tr><td>{stage.replace('_', ' ')}</td><td>{counts['reached'][stage]}</td>"
        f"<td>{counts['reached'][stage] / max(counts['candidates'], 1):.1%}</td></tr>"
        for stage in STAGES
    )
    reasons = (
        "".join(
            f"<tr><td>{html.escape(reason)}</td><td>{number}</td></tr>" for reason, number in counts["dropped"].items()
        )
        or "<tr><td colspan=2>none</td></tr>"
    )
    margins = curated.decisions["margin"].dropna()
    margin_line = (
        f"Reward margin (edit minus original) over {len(margins)} edits: median {margins.median():+.3f}, "
        f"{(margins > config.min_margin).mean():.0%} above the threshold {config.min_margin:g}."
        if len(margins)
        else "No edit was scored."
    )
    examples = []
    for row in _pick_examples(candidates, curated.decisions, config.report_examples):
        candidate = candidates.iloc[row]
        decision = curated.decisions.iloc[row]
        fate = "kept" if decision["stage"] == "kept" else f"dropped: {decision['dropped_as']}"
        margin = "" if np.isnan(decision["margin"]) else f", margin {decision['margin']:+.3f}"
        examples.append(
            "<div class='example'>"
            f"<h4>{html.escape(candidate.prompt)} <small>({html.escape(fate)}{margin})</small></h4>"
            f"<div class='images'>{_image_tag(candidate.image, 'original')}{_image_tag(candidate.edited, 'edit')}</div>"
            f"{_critique_html(candidate.critique, candidate.critique_raw)}"
            f"<p><i>{html.escape(candidate.instruction or '(no instruction)')}</i></p></div>"
        )
    style = (
        "body{font-family:sans-serif;margin:16px 24px}table{border-collapse:collapse;margin:0 16px 12px 0}"
        "th,td{border:1px solid #ccc;padding:3px 8px}figure{display:inline-block;margin:4px;text-align:center}"
        "img{image-rendering:pixelated}.example{border-top:1px solid #ddd;padding:6px 0}"
        ".tables{display:flex;flex-wrap:wrap}.missing{display:inline-block;width:96px;color:#999}"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Rich-PO curation</title>"
        f"<style>{style}</style></head><body>"
        f"<section id='curation-headline'><h2>Rich-PO curation: {counts['kept']} pairs kept of "
        f"{counts['candidates']} samples ({counts['kept_share']:.0%})</h2>"
        f"<p>Critic: {html.escape(critic)}. Editor: {html.escape(editor)}. Reward model: {html.escape(reward)} "
        f"(the edit must beat the original by more than {config.min_margin:g}; edits changing less than "
        f"{config.min_change:g} of the pixel range are near-duplicates).</p><p>{html.escape(margin_line)}</p></section>"
        "<section id='curation-counts' class='tables'>"
        f"<table><tr><th>stage</th><th>reached</th><th>share</th></tr>{funnel}</table>"
        f"<table><tr><th>dropped as</th><th>count</th></tr>{reasons}</table></section>"
        f"<section id='curation-examples'><h3>Examples</h3>{''.join(examples)}</section>"
        "</body></html>"
    )
