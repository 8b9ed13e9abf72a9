"""Rich-PO's data types: a critique, its edit instructions, and the critic / editor interfaces.

A critic looks at one generated image and its prompt and writes a structured
critique: a list of issues, each with an ``aspect`` (what is wrong: colour,
shape, position, quality, ...), a ``severity`` in [0, 1] and the ``evidence``
it saw, then concrete edit instructions that would fix them. An editor carries
the instructions out on the image. Both are interfaces (:class:`Critic`,
:class:`Editor`) with a toy backend (``alignment.richpo.toy``) and real ones
(a vision-language model through transformers, diffusers editors).

Model output is text, often not quite JSON: :func:`parse_critique` extracts
the first JSON object from whatever a model wrote, accepts the common variants
(severity as a word, instructions inside or outside the object) and raises
:class:`CritiqueError` with a short *reason* (``no_json``, ``invalid_json``,
``schema``, ``no_instructions``) that callers count. A failure never stops a
run: the critic retries, then records the reason (:class:`CritiqueOutcome`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image

__all__ = [
    "FAILURE_REASONS",
    "Critic",
    "Critique",
    "CritiqueError",
    "CritiqueIssue",
    "CritiqueOutcome",
    "EditOutcome",
    "Editor",
    "check_edit_batch",
    "parse_critique",
    "parse_instructions",
]

# Why a critique can fail; curation reports count each.
FAILURE_REASONS = ("no_json", "invalid_json", "schema", "no_instructions", "critic_error")

# Severity words some models write instead of numbers.
_SEVERITY_WORDS = {
    "none": 0.0,
    "minor": 0.25,
    "low": 0.25,
    "moderate": 0.5,
    "medium": 0.5,
    "major": 0.8,
    "high": 0.8,
    "severe": 1.0,
    "critical": 1.0,
}
_MAX_INSTRUCTION_CHARS = 300
_LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|step \d+:?)\s*", re.IGNORECASE)


class CritiqueError(ValueError):
    """A model's output that is not a usable critique; ``reason`` is one of ``FAILURE_REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class CritiqueIssue:
    """One thing wrong with an image."""

    aspect: str
    severity: float
    evidence: str

    def as_dict(self) -> dict[str, Any]:
        return {"aspect": self.aspect, "severity": round(float(self.severity), 4), "evidence": self.evidence}


@dataclass(frozen=True)
class Critique:
    """What is wrong with an image and how to edit it; ``instructions`` may be empty when nothing is."""

    issues: tuple[CritiqueIssue, ...]
    instructions: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"issues": [issue.as_dict() for issue in self.issues], "instructions": list(self.instructions)}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Critique:
        """The inverse of :meth:`to_json` (strict: a stored critique is always well formed)."""
        return parse_critique(text, require_instructions=False)

    @property
    def instruction_text(self) -> str:
        """The instructions as one sentence list, the editor's prompt and the pairs' ``instruction`` column."""
        return "; ".join(self.instructions)


@dataclass(frozen=True)
class CritiqueOutcome:
    """One image's critique, or why there is none, with the raw model text kept for the report."""

    critique: Critique | None
    failure: str | None = None
    attempts: int = 1
    raw: str = ""

    def __post_init__(self) -> None:
        if (self.critique is None) == (self.failure is None):
            raise ValueError("a CritiqueOutcome holds either a critique or a failure reason")
        if self.failure is not None and self.failure not in FAILURE_REASONS:
            raise ValueError(f"unknown critique failure {self.failure!r}; known: {', '.join(FAILURE_REASONS)}")


@dataclass(frozen=True)
class EditOutcome:
    """One edited image, or why the edit failed (``error`` text, counted as ``edit_failed``)."""

    image: Image.Image | None
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.image is None) == (self.error is None):
            raise ValueError("an EditOutcome holds either an image or an error")


@runtime_checkable
class Critic(Protocol):
    """(image, prompt) -> critique, batched. ``name`` and ``fingerprint`` go into the pairs and the report."""

    name: str

    def critique(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[CritiqueOutcome]: ...


@runtime_checkable
class Editor(Protocol):
    """(image, instructions, prompt, seed) -> edited image, batched; the same seed gives the same edit."""

    name: str

    def edit(
        self,
        images: Sequence[Image.Image],
        instructions: Sequence[Sequence[str]],
        prompts: Sequence[str],
        seeds: Sequence[int],
    ) -> list[EditOutcome]: ...


def check_edit_batch(
    images: Sequence[Any], instructions: Sequence[Any], prompts: Sequence[str], seeds: Sequence[int]
) -> None:
    """Every editor's first check: one instruction list, prompt and seed per image."""
    if not len(images) == len(instructions) == len(prompts) == len(seeds):
        raise ValueError(
            f"got {len(images)} images, {len(instructions)} instruction lists, {len(prompts)} prompts and "
            f"{len(seeds)} seeds"
        )


def _first_json_object(text: str) -> str:
    """The first balanced ``{...}`` in ``text`` (strings and escapes respected); CritiqueError(no_json) otherwise."""
    start = text.find("{")
    while start != -1:
        depth, in_string, escaped = 0, False, False
        for position in range(start, len(text)):
            char = text[position]
            if in_string:
                if escaped:
                    escaped = False
                elif char == "\\":
                    escaped = True
                elif char == '"':
                    in_string = False
            elif char == '"':
                in_string = True
            elif char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    return text[start : position + 1]
        start = text.find("{", start + 1)
    raise CritiqueError("no_json", f"no complete JSON object in {_excerpt(text)}")


def _excerpt(text: str, limit: int = 80) -> str:
    flat = " ".join(str(text).split())
    return repr(flat if len(flat) <= limit else flat[: limit - 3] + "...")


def _severity(value: Any, index: int) -> float:
    if isinstance(value, bool):
        raise CritiqueError("schema", f"issue {index}: severity {value!r} is not a number or a severity word")
    if isinstance(value, int | float):
        number = float(value)
        # Models write 0-1, 1-5 or 1-10 scales; map the larger ones onto [0, 1].
        if number > 1.0:
            number = number / 10.0 if number > 5.0 else number / 5.0
    elif isinstance(value, str) and value.strip().lower() in _SEVERITY_WORDS:
        number = _SEVERITY_WORDS[value.strip().lower()]
    else:
        try:
            return _severity(float(value), index)
        except (TypeError, ValueError):
            raise CritiqueError(
                "schema", f"issue {index}: severity {_excerpt(value, 30)} is not a number or a severity word"
            ) from None
    if not 0.0 <= number <= 1.0 or number != number:
        raise CritiqueError("schema", f"issue {index}: severity {value!r} is outside [0, 1] (or 1-5, 1-10)")
    return number


def _clean_instruction(text: str) -> str:
    return _LIST_MARKER.sub("", " ".join(str(text).split())).strip().rstrip(".;")


def parse_instructions(value: Any) -> tuple[str, ...]:
    """Edit instructions from a JSON list, or from text with one instruction per line (bullets, numbers).

    Empty and duplicate entries are dropped, order kept; an over-long entry is
    cut at ``_MAX_INSTRUCTION_CHARS`` (an editor prompt has a token limit).
    """
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            try:
                return parse_instructions(json.loads(stripped))
            except json.JSONDecodeError:
                pass
        items: list[Any] = [line for line in stripped.splitlines() if line.strip()]
    elif isinstance(value, list | tuple):
        items = list(value)
    elif value is None:
        items = []
    else:
        raise CritiqueError("schema", f"instructions must be a list or text, got {type(value).__name__}")
    seen: list[str] = []
    for item in items:
        if isinstance(item, dict):  # {"instruction": "..."} or {"edit": "..."}
            item = next((v for k, v in item.items() if k in ("instruction", "edit", "text")), "")
        text = _clean_instruction(item)[:_MAX_INSTRUCTION_CHARS]
        if text and text not in seen:
            seen.append(text)
    return tuple(seen)


def parse_critique(text: str, *, instructions: Any = None, require_instructions: bool = True) -> Critique:
    """A :class:`Critique` from a model's text; :class:`CritiqueError` with a reason otherwise.

    Args:
        text: The critic's output: a JSON object with ``issues`` (a list of
            ``{aspect, severity, evidence}``) and optionally ``instructions``,
            possibly surrounded by other text or a code fence.
        instructions: Instructions from a separate call (the critic's second
            prompt), used when the object has none.
        require_instructions: An image with issues but no instructions is
            useless to the editor: ``no_instructions``. An image with no
            issues is a valid critique with no instructions either way.
    """
    try:
        data = json.loads(_first_json_object(str(text)))
    except json.JSONDecodeError as error:
        raise CritiqueError("invalid_json", f"{error.msg} at character {error.pos}") from None
    if not isinstance(data, dict):
        raise CritiqueError("schema", "the critique is not a JSON object")
    raw_issues = data.get("issues", data.get("problems"))
    if raw_issues is None:
        raise CritiqueError("schema", f"no 'issues' list (keys: {sorted(data)})")
    if not isinstance(raw_issues, list):
        raise CritiqueError("schema", f"'issues' is a {type(raw_issues).__name__}, not a list")
    issues = []
    for index, raw in enumerate(raw_issues):
        if not isinstance(raw, dict):
            raise CritiqueError("schema", f"issue {index} is a {type(raw).__name__}, not an object")
        aspect = " ".join(str(raw.get("aspect", "")).split()).lower()
        if not aspect:
            raise CritiqueError("schema", f"issue {index} has no aspect")
        severity = _severity(raw.get("severity", 0.5), index)
        evidence = " ".join(str(raw.get("evidence", "")).split())
        issues.append(CritiqueIssue(aspect=aspect, severity=severity, evidence=evidence))
    found = parse_instructions(data.get("instructions", data.get("edits")))
    if not found and instructions is not None:
        found = parse_instructions(instructions)
    if require_instructions and issues and not found:
        raise CritiqueError("no_instructions", f"{len(issues)} issue(s) but no edit instruction")
    return Critique(issues=tuple(issues), instructions=found)
