"""The prompt sets an evaluation samples: toy world splits, a list, Pick-a-Pic captions, prompt files.

=================  ==========================================================================
``prompt_set``     prompts
=================  ==========================================================================
toyworld_heldout   the toy world's 48 test scenes (what the toy results are reported on)
toyworld_validation the toy world's 24 validation scenes
list               ``evaluation.prompts``
pickapic           unique captions of a Pick-a-Pic split (``prompt_path``: the dataset directory,
                   default ``data/pickapic_v2``; ``prompt_split``: default ``test``)
partiprompts       PartiPrompts' ``PartiPrompts.tsv`` (columns Prompt, Category, ...);
                   ``prompt_split`` keeps one Category
hpdv2              HPDv2's test prompts: its ``test.json`` (objects with ``prompt``) or the
                   benchmark files (``anime.json`` ... lists of strings, or a directory of them);
                   ``prompt_split`` keeps one style
file               any prompt file
=================  ==========================================================================

Prompt files (``prompt_path``), by extension:

* ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped;
* ``.tsv`` / ``.csv``: a header row; the column ``prompt`` / ``Prompt`` / ``caption`` / ``text``
  (else the first column); a ``Category`` / ``category`` / ``style`` column is what ``prompt_split`` filters;
* ``.json``: a list of strings, a list of objects with one of those keys, or an object mapping a
  category (``prompt_split``) to such a list;
* ``.jsonl``: one object (or string) per line;
* a directory: every ``.json`` / ``.txt`` / ``.tsv`` file in it, the file's stem being its category.

Prompts are stripped; empty ones are dropped; repeats are dropped (first kept), so
every prompt is one group of the bootstrap. ``max_prompts`` keeps the first N.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPT_KEYS = ("prompt", "Prompt", "caption", "text")
CATEGORY_KEYS = ("Category", "category", "style")
FILE_SETS = ("partiprompts", "hpdv2", "file")
PICKAPIC_DEFAULT_PATH = "data/pickapic_v2"
PICKAPIC_DEFAULT_SPLIT = "test"
REPO_ROOT = Path(__file__).resolve().parents[2]


class PromptSetError(ValueError):
    """A prompt set that cannot be read: the message names the file, line or key."""


@dataclass(frozen=True)
class PromptSet:
    """The prompts of one evaluation, with what is needed to state and reproduce them.

    Attributes:
        name: The ``prompt_set``.
        prompts: Unique prompts, in file order.
        split: The split / category kept (None: all).
        source: The file or directory read (None for the toy world and lists).
        sha256: Digest of the prompt list (one per line, UTF-8): equal digests, equal prompts.
        duplicates_dropped: Repeated prompts left out.
        total: Unique prompts before ``max_prompts``.
    """

    name: str
    prompts: list[str]
    split: str | None
    source: str | None
    sha256: str
    duplicates_dropped: int = 0
    total: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "split": self.split,
            "source": self.source,
            "prompts": len(self.prompts),
            "prompts_available": self.total,
            "duplicates_dropped": self.duplicates_dropped,
            "sha256": self.sha256,
        }


def prompts_digest(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def _resolve(path: str) -> Path:
    """A path as given, else relative to the repository (steps may run from elsewhere)."""
    given = Path(path).expanduser()
    if given.exists() or given.is_absolute():
        return given
    in_repo = REPO_ROOT / given
    return in_repo if in_repo.exists() else given


def _entry(value: Any, where: str) -> tuple[str, str | None]:
    """``(prompt, category)`` of one JSON entry."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict):
        for key in PROMPT_KEYS:
            if isinstance(value.get(key), str):
                category = next((str(value[k]) for k in CATEGORY_KEYS if value.get(k) is not None), None)
                return value[key], category
        raise PromptSetError(f"{where}: an object without a prompt; expected one of the keys {', '.join(PROMPT_KEYS)}")
    raise PromptSetError(f"{where}: expected a string or an object with a prompt, got {type(value).__name__}")


def _json_entries(data: Any, where: str, category: str | None = None) -> list[tuple[str, str | None]]:
    if isinstance(data, list):
        entries = [_entry(item, f"{where}[{i}]") for i, item in enumerate(data)]
        return [(prompt, own or category) for prompt, own in entries]
    if isinstance(data, dict):
        if any(isinstance(data.get(key), str) for key in PROMPT_KEYS):
            return [_entry(data, where)]
        out: list[tuple[str, str | None]] = []
        for name, items in data.items():
            if not isinstance(items, list):
                raise PromptSetError(
                    f"{where}: key {name!r} holds a {type(items).__name__}, expected a list of prompts"
                )
            out += _json_entries(items, f"{where}[{name!r}]", str(name))
        return out
    raise PromptSetError(f"{where}: expected a list of prompts or an object of lists, got {type(data).__name__}")


def _table_entries(path: Path, delimiter: str) -> list[tuple[str, str | None]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        if not reader.fieldnames:
            raise PromptSetError(f"{path}: no header row")
        column = next((key for key in PROMPT_KEYS if key in reader.fieldnames), reader.fieldnames[0])
        category = next((key for key in CATEGORY_KEYS if key in reader.fieldnames), None)
        return [(row.get(column) or "", row.get(category) if category else None) for row in reader]


def read_prompt_file(path: str | Path, category: str | None = None) -> list[tuple[str, str | None]]:
    """``(prompt, category)`` of every entry of a prompt file or directory (formats in the module doc)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl", ".txt", ".tsv", ".csv"))
        if not files:
            raise PromptSetError(f"{path}: a directory with no .json, .jsonl, .txt, .tsv or .csv prompt file")
        return [(prompt, own or p.stem) for p in files for prompt, own in read_prompt_file(p)]
    if not path.is_file():
        raise PromptSetError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [(line, category) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if suffix in (".tsv", ".csv"):
        return _table_entries(path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise PromptSetError(f"{path}: not valid JSON: {error}") from error
        return _json_entries(data, str(path), category)
    if suffix == ".jsonl":
        entries = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    entries.append(_entry(json.loads(line), f"{path}:{number}"))
                except json.JSONDecodeError as error:
                    raise PromptSetError(f"{path}:{number}: not valid JSON: {error}") from error
        return entries
    raise PromptSetError(f"{path}: unknown prompt file type {suffix!r}; use .txt, .tsv, .csv, .json or .jsonl")


def pickapic_captions(path: str | Path, split: str) -> list[str]:
    """The captions of a Pick-a-Pic split (parquet shards), in row order (duplicates kept)."""
    import pyarrow.parquet as pq

    from alignment.data import find_split_files

    captions: list[str] = []
    for file in find_split_files(path, split):
        schema = pq.read_schema(file)
        if "caption" not in schema.names:
            raise PromptSetError(f"{file}: no 'caption' column (columns: {', '.join(schema.names)})")
        captions += [c or "" for c in pq.read_table(file, columns=["caption"]).column("caption").to_pylist()]
    return captions


def _unique(prompts: list[str]) -> tuple[list[str], int]:
    seen: dict[str, None] = {}
    for prompt in prompts:
        text = prompt.strip()
        if text:
            seen.setdefault(text, None)
    kept = list(seen)
    return kept, sum(1 for p in prompts if p.strip()) - len(kept)


def load_prompt_set(evaluation: Any) -> PromptSet:
    """The prompts an ``EvalConfig`` names, unique and in order, with their provenance.

    Raises:
        PromptSetError: A missing file, a bad entry, an empty set, or a split that keeps nothing.
    """
    name, split, source = evaluation.prompt_set, evaluation.prompt_split, None
    if name == "list":
        if not evaluation.prompts:
            raise ValueError("evaluation.prompt_set is 'list' but evaluation.prompts is empty")
        raw = list(evaluation.prompts)
    elif name in ("toyworld_heldout", "toyworld_validation"):
        from alignment.toyworld.world import split_scenes

        scenes = split_scenes()
        raw = [scene.prompt for scene in (scenes.validation if name == "toyworld_validation" else scenes.test)]
    elif name == "pickapic":
        split = split or PICKAPIC_DEFAULT_SPLIT
        path = _resolve(evaluation.prompt_path or PICKAPIC_DEFAULT_PATH)
        source = str(path)
        raw = pickapic_captions(path, split)
    elif name in FILE_SETS:
        path = _resolve(evaluation.prompt_path)
        source = str(path)
        entries = read_prompt_file(path)
        if split is not None:
            categories = sorted({c for _, c in entries if c is not None})
            entries = [(p, c) for p, c in entries if c == split]
            if not entries:
                raise PromptSetError(
                    f"evaluation.prompt_split {split!r} keeps no prompt of {path}; "
                    f"its categories: {', '.join(categories) or 'none'}"
                )
        raw = [prompt for prompt, _ in entries]
    else:
        raise ValueError(f"unknown evaluation.prompt_set {name!r}")
    prompts, duplicates = _unique(raw)
    if not prompts:
        raise PromptSetError(f"prompt set {name!r} ({source or 'config'}) holds no prompt")
    total = len(prompts)
    if evaluation.max_prompts is not None:
        prompts = prompts[: evaluation.max_prompts]
    return PromptSet(name, prompts, split, source, prompts_digest(prompts), duplicates, total)
