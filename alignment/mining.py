"""Cross-modal pair mining for Diffusion-RPO: embeddings, similarity, neighbour batches.

Diffusion-RPO contrasts every winner of a batch with every loser, each
contrast weighted by how similar the two pairs are (``research/algorithms.md``
§2). This module owns everything before the loss:

- :class:`PairEmbeddings`: every pair's prompt and both images embedded once by
  a dual encoder (CLIP, PickScore, the toy reward model), cached as an artifact.
- :func:`pair_vectors`: the vectors the loss compares, ``d_ij = 1 - cos(E_w[i], E_l[j])``.
- :func:`mining_keys`: the vector each pair is searched by.
- :class:`NeighbourIndex` / :func:`nearest_other_prompts`: nearest pairs with
  another prompt, exact for small sets and approximate (faiss IVF) at Pick-a-Pic scale.
- :class:`MinedBatches`: a ``BatchSource`` whose batches are a seed pair and
  its nearest neighbours, so the B x B contrast matrix holds related pairs.
- :func:`batch_similarity` / :func:`plan_summary`: mined against random batches.

Whether the paper mines related pairs into a batch at all could not be read
(§2.2: the LLM code it extends uses random batches), so random batches stay an
option (the ``rpo`` method's ``batches``) and the benchmark answers the question.
The embedder is chosen by the pipeline's ``embedding`` section (a registered
CLIP-type scorer), so a change of the mining settings never embeds again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import faiss
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from alignment.data import decode_image

Similarity = Literal["text", "image", "joint"]
"""What makes two pairs similar: their prompts, their images, or both (text ⊕ image)."""
JointMode = Literal["concat", "mean"]
"""How ``joint`` combines the text and the image side (§2.3 leaves it open): concatenation or average."""
Codes = Literal["sq8", "sqfp16", "sq4", "flat"]
"""How an IVF index stores vectors: 8-bit / float16 / 4-bit scalar quantisation, or raw float32."""

SIMILARITIES: tuple[str, ...] = get_args(Similarity)
REPO_ROOT = Path(__file__).resolve().parents[1]
PAIR_COLUMNS = ("row_id", "caption", "image_w", "image_l")
EMBEDDINGS_FILE = "pair_embeddings.safetensors"
META_FILE = "pair_embeddings.json"
FORMAT_VERSION = 1
NORM_TOLERANCE = 1e-3
CHUNK_ROWS = 65_536
"""Rows converted to float32 at a time: a 1M x 768 float16 matrix is never copied whole."""
MINING_STREAM = 11
"""``derived_seed`` stream of the mined epoch order (RandomBatches uses stream 0)."""


class MiningConfig(BaseModel):
    """How Diffusion-RPO's pairs are compared and their neighbours found.

    Every choice marked [unverified] in ``research/algorithms.md`` §2.3 is an
    option here, defaulting to the reconstruction's suggestion.
    """

    model_config = ConfigDict(extra="forbid")

    similarity: Similarity = Field(
        "text",
        description="what the contrast weights compare: text (prompt embeddings, as in LLM-RPO), image "
        "(winner vs loser image), joint (text ⊕ image) [unverified]",
    )
    joint: JointMode = Field(
        "concat",
        description="joint similarity: concat (normalised text ⊕ image: the mean of the two cosines) or mean "
        "(normalised text + image) [unverified]",
    )
    neighbours: int = Field(32, ge=1, description="nearest other-prompt pairs kept per pair (the batch candidates)")
    one_per_prompt: bool = Field(
        True,
        description="each neighbouring prompt appears once, by its most similar pair (a batch takes one pair per "
        "prompt, so more would waste neighbour slots)",
    )
    exact_below: int = Field(
        20_000,
        ge=1,
        description="exact search (faiss IndexFlatIP, N² dot products) below this many pairs; an IVF index from here on",
    )
    nlist: int | None = Field(None, ge=1, description="IVF lists; None: sqrt(nprobe * N), which balances the cost")
    nprobe: int | None = Field(None, ge=1, description="IVF lists searched per query (recall against time); None: 4")
    codes: Codes = Field("sq8", description="IVF vector storage: sq8 (1 byte/dim), sqfp16, sq4, flat (float32)")
    train_points_per_list: int = Field(32, ge=1, description="k-means training sample size per IVF list")
    kmeans_iterations: int = Field(10, ge=1, description="k-means iterations of the IVF coarse quantiser")
    on_disk: str | None = Field(
        None, description="write the index here and memory-map it (for sets whose index does not fit in memory)"
    )
    threads: int | None = Field(None, ge=1, description="faiss threads; None: faiss's default (all cores)")
    seed: int = Field(0, description="seed of the IVF k-means training sample (the batch order follows training.seed)")

    def index_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`NeighbourIndex` (and :func:`nearest_other_prompts`)."""
        return {
            "exact_below": self.exact_below,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "codes": self.codes,
            "train_points_per_list": self.train_points_per_list,
            "kmeans_iterations": self.kmeans_iterations,
            "on_disk": self.on_disk,
            "threads": self.threads,
            "seed": self.seed,
        }


# ----------------------------------------------------------------------------
# the cached artifact


@dataclass
class PairEmbeddings:
    """Every pair's prompt and both images, embedded once in one space (L2-normalised float32).

    Attributes:
        pair_ids: The pairs' ``row_id``, in training order.
        prompts: Each pair's caption.
        text: ``[N, D]`` embedding of the pair's prompt.
        image_w: ``[N, D]`` embedding of the winner image.
        image_l: ``[N, D]`` embedding of the loser image.
        embedder: What made them, e.g. ``"clip_score openai/clip-vit-large-patch14"``.
    """

    pair_ids: list[str]
    prompts: list[str]
    text: Tensor
    image_w: Tensor
    image_l: Tensor
    embedder: str
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.pair_ids = [str(pair_id) for pair_id in self.pair_ids]
        self.prompts = list(self.prompts)
        n = len(self.pair_ids)
        if n == 0:
            raise ValueError("PairEmbeddings: no pairs")
        if len(self.prompts) != n:
            raise ValueError(f"PairEmbeddings: {n} pair ids but {len(self.prompts)} prompts")
        duplicated = pd.Series(self.pair_ids).duplicated()
        if duplicated.any():
            duplicate = self.pair_ids[int(np.flatnonzero(duplicated)[0])]
            raise ValueError(f"PairEmbeddings: pair id {duplicate!r} occurs more than once")
        for name in ("text", "image_w", "image_l"):
            tensor = getattr(self, name)
            if not isinstance(tensor, Tensor) or tensor.ndim != 2 or tensor.shape[0] != n or tensor.shape[1] == 0:
                shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
                raise ValueError(f"PairEmbeddings.{name} must be [N={n}, D], got {shape}")
            if tensor.dtype != torch.float32:
                raise ValueError(f"PairEmbeddings.{name} must be float32, got {tensor.dtype}")
            bad = _first_bad_row(tensor)
            if bad is not None:
                row, reason = bad
                raise ValueError(f"PairEmbeddings.{name}: pair {self.pair_ids[row]!r} has {reason}")
        if self.image_w.shape != self.image_l.shape:
            raise ValueError(
                f"PairEmbeddings: image_w {tuple(self.image_w.shape)} and image_l {tuple(self.image_l.shape)} differ"
            )

    def __len__(self) -> int:
        return len(self.pair_ids)

    def fingerprint(self) -> str:
        """Content hash of the ids, prompts, embedder and every embedding."""
        if self._fingerprint:
            return self._fingerprint
        digest = hashlib.sha256()
        digest.update(json.dumps([self.embedder, self.pair_ids, self.prompts]).encode())
        for name, tensor in self.tensors().items():
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
        self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def tensors(self) -> dict[str, Tensor]:
        return {"text": self.text, "image_w": self.image_w, "image_l": self.image_l}

    def summary(self) -> dict[str, Any]:
        return {
            "pairs": len(self),
            "prompts": len(set(self.prompts)),
            "text_dim": int(self.text.shape[1]),
            "image_dim": int(self.image_w.shape[1]),
            "embedder": self.embedder,
            "fingerprint": self.fingerprint(),
        }

    # -- storage: safetensors + json, never pickle ---------------------------

    def save(self, directory: str | Path) -> Path:
        """Write the embeddings to ``directory``, atomically.

        Everything is written to a temporary sibling directory that is renamed
        into place, so an interrupted save leaves either the previous content
        or nothing, never a half-written artifact. An existing ``directory``
        is replaced only if it is empty or holds a previous save.
        """
        directory = Path(directory)
        if directory.exists():
            foreign = sorted(p.name for p in directory.iterdir() if p.name not in (EMBEDDINGS_FILE, META_FILE))
            if foreign:
                raise FileExistsError(f"{directory} holds other files ({', '.join(foreign)}); not replacing it")
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
        try:
            save_file(
                {name: t.contiguous() for name, t in self.tensors().items()},
                str(staging / EMBEDDINGS_FILE),
                metadata={"format": "alignment.mining.PairEmbeddings", "version": str(FORMAT_VERSION)},
            )
            meta = {
                "version": FORMAT_VERSION,
                "embedder": self.embedder,
                "fingerprint": self.fingerprint(),
                "pair_ids": self.pair_ids,
                "prompts": self.prompts,
            }
            (staging / META_FILE).write_text(json.dumps(meta))
            _move_into_place(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> PairEmbeddings:
        """Read embeddings written by :meth:`save`.

        Raises:
            FileNotFoundError: Naming the missing file.
            ValueError: On an unknown format version or inconsistent content.
        """
        directory = Path(directory)
        for name in (META_FILE, EMBEDDINGS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"no pair embeddings file {directory / name}; write one with PairEmbeddings.save"
                )
        meta = json.loads((directory / META_FILE).read_text())
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{directory / META_FILE}: format version {meta.get('version')!r}, expected {FORMAT_VERSION}"
            )
        tensors = load_file(str(directory / EMBEDDINGS_FILE))
        missing = [name for name in ("text", "image_w", "image_l") if name not in tensors]
        if missing:
            raise ValueError(f"{directory / EMBEDDINGS_FILE}: missing tensor(s) {missing}")
        return cls(
            pair_ids=meta["pair_ids"],
            prompts=meta["prompts"],
            text=tensors["text"],
            image_w=tensors["image_w"],
            image_l=tensors["image_l"],
            embedder=meta["embedder"],
            _fingerprint=meta.get("fingerprint"),
        )


def _move_into_place(staging: Path, directory: Path) -> None:
    """Rename ``staging`` to ``directory``; a previous ``directory`` is swapped out first, then deleted."""
    if not directory.exists():
        os.replace(staging, directory)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
    retired.rmdir()
    os.replace(directory, retired)
    try:
        os.replace(staging, directory)
    except BaseException:
        os.replace(retired, directory)  # put the previous save back
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _first_bad_row(tensor: Tensor) -> tuple[int, str] | None:
    """The first row that is non-finite or not unit-norm, with what is wrong with it."""
    for start in range(0, tensor.shape[0], CHUNK_ROWS):
        chunk = tensor[start : start + CHUNK_ROWS].float()
        finite = torch.isfinite(chunk).all(dim=1)
        if not bool(finite.all()):
            return start + int((~finite).nonzero()[0, 0]), "a non-finite embedding"
        norms = chunk.norm(dim=1)
        off = (norms - 1).abs() > NORM_TOLERANCE
        if bool(off.any()):
            row = int(off.nonzero()[0, 0])
            return start + row, f"an embedding of norm {float(norms[row]):.4f} (expected L2-normalised)"
    return None


# ----------------------------------------------------------------------------
# embedding the pairs


def embedder_name(embedder: Any) -> str:
    """``"<scorer name> <weights source>"``, e.g. ``"toy_reward data/toyworld/reward_model"``."""
    name = getattr(embedder, "name", "") or type(embedder).__name__
    metadata = getattr(embedder, "metadata", None) or {}
    source = metadata.get("source") or metadata.get("backbone")
    if source and Path(str(source)).is_absolute():
        with contextlib.suppress(ValueError):  # a path inside the repository is named relative to it
            source = Path(str(source)).resolve().relative_to(REPO_ROOT).as_posix()
    return f"{name} {source}" if source else name


def embed_pairs(
    pairs: pd.DataFrame, embedder: Any, *, show_progress: bool = True, batch_size: int | None = None
) -> PairEmbeddings:
    """Embed every pair's prompt and both images.

    Args:
        pairs: Winner-first pairs (``alignment.data.prepare_pairs``) with
            ``row_id``, ``caption``, ``image_w`` and ``image_l`` (encoded bytes).
        embedder: Anything with ``text_embeddings(list[str])`` and
            ``image_embeddings(list[PIL.Image])`` returning L2-normalised
            ``[n, D]`` tensors: ``ToyRewardScorer``, ``ClipScoreScorer``, ``PickScoreScorer``.
        show_progress: Show tqdm bars.
        batch_size: Pairs decoded and embedded at a time; default the embedder's ``batch_size``.

    Each distinct caption is embedded once (Pick-a-Pic repeats prompts).

    Raises:
        ValueError: On an empty frame, a missing column, a duplicate ``row_id``
            or a non-finite / zero embedding (naming the row and column).
        TypeError: If ``embedder`` lacks the embedding methods.
        PreferenceDataError: On undecodable image bytes (naming the row and column).
    """
    if not isinstance(pairs, pd.DataFrame):
        raise TypeError(f"pairs must be a pandas DataFrame, got {type(pairs).__name__}")
    missing = [column for column in PAIR_COLUMNS if column not in pairs.columns]
    if missing:
        raise ValueError(f"pairs frame: missing column(s) {missing} (columns present: {list(pairs.columns)})")
    if len(pairs) == 0:
        raise ValueError("pairs frame is empty: no pairs to embed")
    for method in ("text_embeddings", "image_embeddings"):
        if not callable(getattr(embedder, method, None)):
            raise TypeError(f"{type(embedder).__name__} has no {method}() method; it cannot embed pairs")
    row_ids = [str(row_id) for row_id in pairs["row_id"]]
    if len(set(row_ids)) != len(row_ids):
        duplicated = pairs["row_id"][pairs["row_id"].astype(str).duplicated()].iloc[0]
        raise ValueError(f"pairs frame: row_id {duplicated!r} occurs more than once")
    captions = list(pairs["caption"])
    for row_id, caption in zip(row_ids, captions, strict=True):
        if not isinstance(caption, str):
            raise ValueError(f"row {row_id}, column caption: expected a string, got {caption!r}")
    step = batch_size or int(getattr(embedder, "batch_size", 32) or 32)

    distinct = list(dict.fromkeys(captions))
    first_row = {}
    for row_id, caption in zip(row_ids, captions, strict=True):
        first_row.setdefault(caption, row_id)
    text_parts = []
    with tqdm(total=len(distinct), desc="embedding prompts", unit="prompt", disable=not show_progress) as bar:
        for start in range(0, len(distinct), step):
            texts = distinct[start : start + step]
            embedded = _checked_embeddings(embedder.text_embeddings(texts), len(texts), "text_embeddings")
            bad = _first_unusable(embedded)
            if bad is not None:
                caption = texts[bad[0]]
                raise ValueError(
                    f"row {first_row[caption]}, column caption: {bad[1]} text embedding of {caption[:80]!r}"
                )
            text_parts.append(F.normalize(embedded, dim=1))
            bar.update(len(texts))
    distinct_text = torch.cat(text_parts)
    position = {caption: i for i, caption in enumerate(distinct)}
    text = distinct_text[torch.tensor([position[caption] for caption in captions])]

    winners, losers = [], []
    images_w, images_l = list(pairs["image_w"]), list(pairs["image_l"])
    with tqdm(total=len(pairs), desc="embedding images", unit="pair", disable=not show_progress) as bar:
        for start in range(0, len(pairs), step):
            ids = row_ids[start : start + step]
            decoded = [
                decode_image(data, row_id=row_id, column=column)
                for column, images in (("image_w", images_w), ("image_l", images_l))
                for row_id, data in zip(ids, images[start : start + step], strict=True)
            ]
            embedded = _checked_embeddings(embedder.image_embeddings(decoded), len(decoded), "image_embeddings")
            bad = _first_unusable(embedded)
            if bad is not None:
                column = "image_w" if bad[0] < len(ids) else "image_l"
                raise ValueError(f"row {ids[bad[0] % len(ids)]}, column {column}: {bad[1]} image embedding")
            embedded = F.normalize(embedded, dim=1)
            winners.append(embedded[: len(ids)])
            losers.append(embedded[len(ids) :])
            bar.update(len(ids))
    return PairEmbeddings(
        pair_ids=row_ids,
        prompts=captions,
        text=text.contiguous(),
        image_w=torch.cat(winners),
        image_l=torch.cat(losers),
        embedder=embedder_name(embedder),
    )


def _checked_embeddings(output: Any, count: int, method: str) -> Tensor:
    if not isinstance(output, Tensor):
        raise TypeError(f"{method}() returned {type(output).__name__}, expected a tensor (does the model have one?)")
    if output.ndim != 2 or output.shape[0] != count or output.shape[1] == 0:
        raise ValueError(f"{method}() returned shape {tuple(output.shape)} for {count} inputs, expected [{count}, D]")
    return output.detach().float().cpu()


def _first_unusable(embedded: Tensor) -> tuple[int, str] | None:
    finite = torch.isfinite(embedded).all(dim=1)
    if not bool(finite.all()):
        return int((~finite).nonzero()[0, 0]), "non-finite"
    zero = embedded.norm(dim=1) == 0
    if bool(zero.any()):
        return int(zero.nonzero()[0, 0]), "all-zero"
    return None


# ----------------------------------------------------------------------------
# what the loss compares, what pairs are searched by


def _check_similarity(similarity: str) -> None:
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")


def _check_joint(joint: str) -> None:
    if joint not in get_args(JointMode):
        raise ValueError(f"joint must be one of {get_args(JointMode)}, got {joint!r}")


def _combine(text: Tensor, image: Tensor, joint: JointMode) -> Tensor:
    if joint == "concat":
        return F.normalize(torch.cat([text.float(), image.float()], dim=1), dim=1)
    if text.shape[1] != image.shape[1]:
        raise ValueError(
            f"joint='mean' needs text and image embeddings of one width, got {text.shape[1]} and {image.shape[1]}"
        )
    return F.normalize(text.float() + image.float(), dim=1)


def pair_vectors(
    embeddings: PairEmbeddings, similarity: Similarity, *, joint: JointMode = "concat"
) -> tuple[Tensor, Tensor]:
    """The winner-side and loser-side vectors the RPO loss compares: ``d_ij = 1 - cos(E_w[i], E_l[j])``.

    - ``text``: both sides are the prompt embedding (LLM-RPO's choice).
    - ``image``: the winner and the loser image embeddings.
    - ``joint``: text ⊕ image side, normalised; with ``joint="concat"`` the
      cosine is the mean of the text cosine and the image cosine.

    Returns:
        ``(E_w, E_l)``, each ``[N, D']`` float32, L2-normalised.
    """
    _check_similarity(similarity)
    _check_joint(joint)
    if similarity == "text":
        return embeddings.text, embeddings.text
    if similarity == "image":
        return embeddings.image_w, embeddings.image_l
    return _combine(embeddings.text, embeddings.image_w, joint), _combine(embeddings.text, embeddings.image_l, joint)


def mining_keys(
    embeddings: PairEmbeddings,
    similarity: Similarity,
    *,
    joint: JointMode = "concat",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The vector each pair is searched by, ``[N, D']`` L2-normalised.

    ``text``: the prompt; ``image``: ``normalize(image_w + image_l)`` (the
    pair's two images together); ``joint``: the prompt ⊕ that image key.
    Computed in chunks; ``dtype=torch.float16`` halves the memory at Pick-a-Pic scale.
    """
    _check_similarity(similarity)
    _check_joint(joint)
    if similarity == "text":
        return embeddings.text.to(dtype)
    n = len(embeddings)
    width = embeddings.image_w.shape[1]
    if similarity == "joint" and joint == "concat":
        width += embeddings.text.shape[1]
    keys = torch.empty(n, width, dtype=dtype)
    for start in range(0, n, CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        image = F.normalize(embeddings.image_w[rows] + embeddings.image_l[rows], dim=1)
        keys[rows] = image if similarity == "image" else _combine(embeddings.text[rows], image, joint)
    return keys


# ----------------------------------------------------------------------------
# nearest neighbours
#
# Why faiss and not a hand-written search: at Pick-a-Pic scale (~1M pairs)
# all-pairs similarity is 10^12 dot products and an N x N matrix is 4 TB, so
# the search must be approximate, compressed and streamed. faiss is the
# reference implementation of exactly that (k-means IVF partitioning, SIMD
# scalar-quantised codes, blocked BLAS exact search, memory-mapped indexes),
# tested at billion scale; a hand-written version would be slower and would
# need its own proof of recall.

DEFAULT_NPROBE = 4
BIG_BATCH_MIN_QUERIES = 4_096
"""From this many queries an IVF index is searched list by list (one GEMM per list) instead of query by query."""
HEAP_BUDGET_BYTES = 128 << 20
"""Result memory per search block (float32 + int64 per result): 1M rows are searched in a few blocks."""
SELECT_ROWS = 16_384


def _as_matrix(vectors: Tensor | np.ndarray, what: str) -> np.ndarray:
    """A 2-D float16 / float32 numpy view of ``vectors`` (no copy when it already is one)."""
    if isinstance(vectors, Tensor):
        vectors = vectors.detach().cpu()
        if vectors.dtype not in (torch.float16, torch.float32):
            vectors = vectors.float()
        array = vectors.numpy()
    elif isinstance(vectors, np.ndarray):
        array = vectors if vectors.dtype in (np.float16, np.float32) else vectors.astype(np.float32)
    else:
        raise TypeError(f"{what} must be a torch tensor or a numpy array, got {type(vectors).__name__}")
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty [N, D] matrix, got shape {tuple(array.shape)}")
    return array


def _float32_rows(array: np.ndarray, start: int, stop: int) -> np.ndarray:
    return np.ascontiguousarray(array[start:stop], dtype=np.float32)


def _check_finite(array: np.ndarray, what: str) -> None:
    for start in range(0, array.shape[0], CHUNK_ROWS):
        finite = np.isfinite(array[start : start + CHUNK_ROWS]).all(axis=1)
        if not finite.all():
            raise ValueError(f"{what}: row {start + int(np.flatnonzero(~finite)[0])} is not finite (NaN or inf)")


@contextlib.contextmanager
def _faiss_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def auto_nlist(num_vectors: int, nprobe: int) -> int:
    """IVF lists for ``num_vectors`` rows: ``sqrt(nprobe * N)``.

    Searching every row costs about ``N * nlist`` (assigning queries to lists)
    plus ``N * nprobe * N / nlist`` (scanning the probed lists); this is where
    the two are equal, so their sum is smallest.
    """
    return max(1, min(num_vectors, round(math.sqrt(nprobe * num_vectors))))


class NeighbourIndex:
    """Nearest neighbours by inner product (cosine on L2-normalised vectors), through faiss.

    Below ``exact_below`` rows the search is exact (``IndexFlatIP``). From
    there on it is an IVF index: k-means lists (trained on a seeded sample, so
    a build is deterministic) holding compressed codes (``sq8``: 1 byte per
    dimension, 1M x 768 in 0.75 GiB). Many queries at once (every row of the
    set) are searched list by list, one matrix product per list (faiss's
    ``contrib.big_batch_search``), about twice as fast on 2 cores as faiss's
    per-query scan. ``benchmarks/mining.py`` measures time, memory and recall.

    Args:
        exact_below: Rows below which the search is exact.
        nlist: IVF lists; default :func:`auto_nlist`.
        nprobe: Lists searched per query (recall against speed); default 4.
        codes: ``sq8``, ``sqfp16``, ``sq4`` or ``flat`` (float32).
        train_points_per_list: k-means sample size per list.
        kmeans_iterations: k-means iterations.
        seed: Seed of the k-means sample and initialisation.
        on_disk: Write the built index to this file and memory-map it
            (``IO_FLAG_MMAP``): the codes are paged in from disk as needed.
        threads: faiss threads while building and searching (default: faiss's).
    """

    def __init__(
        self,
        *,
        exact_below: int = 20_000,
        nlist: int | None = None,
        nprobe: int | None = None,
        codes: Codes = "sq8",
        train_points_per_list: int = 32,
        kmeans_iterations: int = 10,
        seed: int = 0,
        on_disk: str | Path | None = None,
        threads: int | None = None,
    ) -> None:
        for name, value in (
            ("exact_below", exact_below),
            ("train_points_per_list", train_points_per_list),
            ("kmeans_iterations", kmeans_iterations),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, value in (("nlist", nlist), ("nprobe", nprobe), ("threads", threads)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if codes not in get_args(Codes):
            raise ValueError(f"codes must be one of {get_args(Codes)}, got {codes!r}")
        self.exact_below = exact_below
        self.nlist = nlist
        self.nprobe = nprobe
        self.codes = codes
        self.train_points_per_list = train_points_per_list
        self.kmeans_iterations = kmeans_iterations
        self.seed = seed
        self.on_disk = Path(on_disk) if on_disk is not None else None
        self.threads = threads
        self.index: faiss.Index | None = None
        self.kind: str = "unbuilt"
        self._vectors: np.ndarray | None = None
        self._assign: np.ndarray | None = None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal) if self.index is not None else 0

    @property
    def dim(self) -> int:
        return int(self.index.d) if self.index is not None else 0

    def describe(self) -> dict[str, Any]:
        """What was built, for metadata: kind, rows, lists, probes, codes."""
        info: dict[str, Any] = {"kind": self.kind, "rows": self.ntotal, "dim": self.dim}
        if self.index is not None and self.kind.startswith("ivf"):
            ivf = faiss.extract_index_ivf(self.index)
            info.update(nlist=int(ivf.nlist), nprobe=int(ivf.nprobe), codes=self.codes)
        if self.on_disk is not None:
            info["on_disk"] = str(self.on_disk)
        return info

    def build(self, vectors: Tensor | np.ndarray) -> NeighbourIndex:
        """Index ``vectors`` ([N, D] float16 / float32, kept by reference, not copied)."""
        array = _as_matrix(vectors, "vectors")
        _check_finite(array, "vectors")
        n, dim = array.shape
        with _faiss_threads(self.threads):
            if n < self.exact_below:
                self.index, self.kind, self._assign = faiss.IndexFlatIP(dim), "exact", None
                for start in range(0, n, CHUNK_ROWS):
                    self.index.add(_float32_rows(array, start, start + CHUNK_ROWS))
            else:
                self._build_ivf(array)
            if self.on_disk is not None:
                self._map_from_disk()
        self._vectors = array
        return self

    def _build_ivf(self, array: np.ndarray) -> None:
        from faiss.contrib.ivf_tools import add_preassigned

        n, dim = array.shape
        nprobe = self.nprobe or DEFAULT_NPROBE
        nlist = min(self.nlist or auto_nlist(n, nprobe), n)
        nprobe = min(nprobe, nlist)
        quantizer = faiss.IndexFlatIP(dim)
        if self.codes == "flat":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            qtype = {
                "sq8": faiss.ScalarQuantizer.QT_8bit,
                "sqfp16": faiss.ScalarQuantizer.QT_fp16,
                "sq4": faiss.ScalarQuantizer.QT_4bit,
            }[self.codes]
            index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, qtype, faiss.METRIC_INNER_PRODUCT)
            # Codes of the vectors themselves, not of residuals: for inner products the residual form needs a
            # per-list correction that the list-by-list search does not apply, and unit vectors quantise well.
            index.by_residual = False
        index.cp.seed = self.seed
        index.cp.niter = self.kmeans_iterations
        index.cp.min_points_per_centroid = 1  # a small sample is a choice here, not a mistake to warn about
        index.cp.max_points_per_centroid = self.train_points_per_list
        sample_size = min(n, self.train_points_per_list * nlist)
        sample = np.sort(np.random.default_rng(self.seed).choice(n, size=sample_size, replace=False))
        index.train(np.ascontiguousarray(array[sample], dtype=np.float32))
        # Each row's nprobe nearest lists, computed once: the first is where it is stored, all of them are
        # where its own neighbours are searched (search_indexed), so the costly assignment is not repeated.
        assign = np.empty((n, nprobe), dtype=np.int32)
        for start in range(0, n, CHUNK_ROWS):
            chunk = _float32_rows(array, start, start + CHUNK_ROWS)
            _, lists = quantizer.search(chunk, nprobe)
            assign[start : start + len(chunk)] = lists
            add_preassigned(index, chunk, np.ascontiguousarray(lists[:, 0], dtype=np.int64))
        index.nprobe = nprobe
        self.index, self.kind, self._assign = index, f"ivf_{self.codes}", assign

    def _map_from_disk(self) -> None:
        assert self.index is not None and self.on_disk is not None
        self.on_disk.parent.mkdir(parents=True, exist_ok=True)
        partial = self.on_disk.with_name(self.on_disk.name + ".partial")
        faiss.write_index(self.index, str(partial))
        os.replace(partial, self.on_disk)
        flags = faiss.IO_FLAG_READ_ONLY | (faiss.IO_FLAG_MMAP if self.kind != "exact" else faiss.IO_FLAG_MMAP_IFC)
        mapped = faiss.read_index(str(self.on_disk), flags)
        if self.kind != "exact":
            faiss.extract_index_ivf(mapped).nprobe = faiss.extract_index_ivf(self.index).nprobe
        self.index = mapped
        self.kind += "_mmap"

    # -- search ----------------------------------------------------------------

    def search(self, queries: Tensor | np.ndarray, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` most similar indexed rows of each query.

        Returns:
            ``(similarities [n, k] float32, ids [n, k] int64)``, most similar
            first; ``-1`` ids (and ``-inf`` similarities) where fewer exist.
        """
        array = _as_matrix(queries, "queries")
        self._check_search(array.shape[1], k)
        return self._search(array, None, k)

    def search_indexed(self, k: int, rows: np.ndarray | Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """Neighbours of the indexed vectors themselves (``rows``, default all), each row included in its own result.

        Reuses the list assignment made while building, so searching every
        row of a large set pays for it once.
        """
        if self._vectors is None:
            raise RuntimeError("NeighbourIndex.search_indexed before build()")
        self._check_search(self.dim, k)
        rows = np.arange(self.ntotal) if rows is None else np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= self.ntotal)):
            raise ValueError(f"rows must be indices into the {self.ntotal} indexed vectors")
        return self._search(self._vectors, rows, k)

    def _check_search(self, dim: int, k: int) -> None:
        if self.index is None:
            raise RuntimeError("NeighbourIndex.search before build()")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if dim != self.dim:
            raise ValueError(f"queries have {dim} dimensions, the index {self.dim}")

    def _search(self, source: np.ndarray, rows: np.ndarray | None, k: int) -> tuple[Tensor, Tensor]:
        count = len(rows) if rows is not None else source.shape[0]
        take = min(k, self.ntotal)
        big_batch = self.kind.startswith("ivf") and count >= BIG_BATCH_MIN_QUERIES
        block = max(1, HEAP_BUDGET_BYTES // (12 * take)) if big_batch else CHUNK_ROWS
        parts = []
        with _faiss_threads(self.threads):
            for start in range(0, count, block):
                stop = min(count, start + block)
                if big_batch:
                    block_rows = rows[start:stop] if rows is not None else np.arange(start, stop)
                    parts.append(self._big_batch(source, block_rows, take, from_index=rows is not None))
                else:
                    queries = source[rows[start:stop]] if rows is not None else source[start:stop]
                    parts.append(self.index.search(np.ascontiguousarray(queries, dtype=np.float32), take))
        if len(parts) == 1 and take == k:  # the usual case: no copy
            similarities, ids = parts[0]
        else:
            similarities = np.full((count, k), -np.inf, dtype=np.float32)
            ids = np.full((count, k), -1, dtype=np.int64)
            position = 0
            for part_similarities, part_ids in parts:
                similarities[position : position + len(part_ids), :take] = part_similarities
                ids[position : position + len(part_ids), :take] = part_ids
                position += len(part_ids)
        missing = ids < 0
        ids[missing] = -1
        similarities[missing] = -np.inf
        return torch.from_numpy(similarities), torch.from_numpy(ids)

    def _big_batch(
        self, source: np.ndarray, rows: np.ndarray, k: int, *, from_index: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """faiss's list-by-list search (``contrib.big_batch_search``) of ``source[rows]``."""
        from faiss.contrib.big_batch_search import big_batch_search

        whole = rows.size == source.shape[0] and bool((rows == np.arange(rows.size)).all())
        queries = source if whole else _Rows(source, rows)
        ivf = faiss.extract_index_ivf(self.index)
        if from_index and self._assign is not None:
            assign = np.ascontiguousarray(self._assign[rows])  # copied: the search sorts it in place
        else:
            assign = np.empty((len(queries), ivf.nprobe), dtype=np.int32)
            for start in range(0, len(queries), CHUNK_ROWS):
                chunk = np.ascontiguousarray(
                    queries[np.arange(start, min(len(queries), start + CHUNK_ROWS))], dtype=np.float32
                )
                _, lists = ivf.quantizer.search(chunk, ivf.nprobe)
                assign[start : start + len(chunk)] = lists
        workers = self.threads or faiss.omp_get_max_threads()
        previous = faiss.omp_get_max_threads()

        def knn(xq: np.ndarray, xb: np.ndarray, k: int, metric: int, thread_id: int | None = None):
            return faiss.knn(xq, xb, k, metric=metric)

        # One list per worker thread, each product single-threaded: twice as fast on 2 cores as one list at a time
        # with threaded BLAS (the products are small). The helper prints progress even when asked not to.
        faiss.omp_set_num_threads(1)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                similarities, ids = big_batch_search(
                    self.index,
                    queries,
                    k,
                    knn=knn,
                    q_assign=assign,
                    threaded=2 if workers > 1 else 0,
                    computation_threads=workers,
                )
        finally:
            faiss.omp_set_num_threads(previous)
        return similarities, ids


class _Rows:
    """``source[rows]`` without copying it: all that faiss's big-batch search reads of its queries."""

    def __init__(self, source: np.ndarray, rows: np.ndarray) -> None:
        self.source, self.rows = source, rows

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), self.source.shape[1]

    @property
    def nbytes(self) -> int:
        return len(self.rows) * self.source.shape[1] * self.source.itemsize

    def __getitem__(self, local: np.ndarray) -> np.ndarray:
        return self.source[self.rows[local]]


def prompt_ids(prompts: Sequence[str] | Tensor | np.ndarray) -> Tensor:
    """``[N]`` int64 ids, equal for pairs with the same prompt (numbered in order of first appearance)."""
    return torch.from_numpy(_prompt_groups(prompts, None))


def _prompt_groups(prompts: Sequence[str] | Tensor | np.ndarray, count: int | None) -> np.ndarray:
    if isinstance(prompts, Tensor | np.ndarray):
        values = prompts.detach().cpu().numpy() if isinstance(prompts, Tensor) else prompts
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"prompt ids must be a 1-D integer tensor, got {values.dtype} {tuple(values.shape)}")
        groups = pd.factorize(values.astype(np.int64), sort=False)[0]
    elif isinstance(prompts, str):
        raise TypeError("prompts must be one prompt per pair, not a single string")
    else:
        groups = pd.factorize(pd.Series(list(prompts), dtype=object), sort=False)[0]
        if (groups < 0).any():
            raise ValueError(f"prompt of pair {int(np.flatnonzero(groups < 0)[0])} is missing (None / NaN)")
    if count is not None and len(groups) != count:
        raise ValueError(f"{len(groups)} prompts for {count} pairs")
    return groups.astype(np.int64)


def nearest_other_prompts(
    keys: Tensor | np.ndarray,
    prompts: Sequence[str] | Tensor,
    k: int,
    *,
    one_per_prompt: bool = True,
    show_progress: bool = False,
    stats: dict[str, Any] | None = None,
    **index_options: Any,
) -> Tensor:
    """Each pair's ``k`` nearest pairs whose prompt differs from its own.

    Pick-a-Pic and the toy world have several pairs per prompt; those are
    never a pair's neighbours. The search goes deeper (for the rows that need
    it) until ``k`` qualify, and pads with ``-1`` where fewer exist. Rows are
    searched through a :class:`NeighbourIndex` in blocks: no N x N matrix.

    Args:
        keys: ``[N, D]`` L2-normalised search vectors (:func:`mining_keys`), float32 or float16.
        prompts: Each pair's prompt, or ``[N]`` prompt ids (:func:`prompt_ids`).
        k: Neighbours per pair.
        one_per_prompt: Keep only the most similar pair of each neighbouring
            prompt (pairs with identical keys and prompt, as with text keys,
            are then searched and indexed once).
        show_progress: Show a tqdm bar over the search blocks.
        stats: If given, filled with what was done: the index (:meth:`NeighbourIndex.describe`),
            the rows indexed and queried, the search depths.
        index_options: :class:`NeighbourIndex` arguments (``exact_below``, ``nprobe``, ...).

    Returns:
        ``[N, k]`` int64 pair indices, most similar first, ``-1`` padded.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    vectors = _as_matrix(keys, "keys")
    _check_finite(vectors, "keys")
    n = vectors.shape[0]
    groups = _prompt_groups(prompts, n)
    duplicate = _same_key_as_prompt_leader(vectors, groups)
    query_rows = np.flatnonzero(~duplicate)
    index_rows = query_rows if one_per_prompt else np.arange(n)
    started = time.perf_counter()
    index = NeighbourIndex(**index_options).build(vectors if len(index_rows) == n else vectors[index_rows])
    build_seconds = time.perf_counter() - started
    index_groups = groups[index_rows]
    own_sizes = np.bincount(index_groups, minlength=int(groups.max()) + 1)
    # Queries' positions among the indexed rows (queries are always indexed: duplicates are neither).
    query_positions = np.searchsorted(index_rows, query_rows)

    if one_per_prompt:  # neighbours arrive with their prompt's other pairs: read k prompts deep
        per_prompt = len(index_rows) / max(1, len(np.unique(index_groups)))
        depth = math.ceil((k + 1) * per_prompt) + 1
    else:
        depth = k + int(np.quantile(own_sizes[groups[query_rows]], 0.9))
    depth = min(depth, len(index_rows))

    result = np.full((n, k), -1, dtype=np.int64)
    pending = np.arange(len(query_rows))
    rounds = []
    bar = tqdm(total=len(query_rows), desc="nearest other prompts", unit="pair", disable=not show_progress)
    while pending.size:
        started = time.perf_counter()
        retry = []
        block = max(1, min(len(pending), HEAP_BUDGET_BYTES // (12 * depth)))
        for start in range(0, len(pending), block):
            chosen = pending[start : start + block]
            similarities, found = (t.numpy() for t in index.search_indexed(depth, query_positions[chosen]))
            for offset in range(0, len(chosen), SELECT_ROWS):  # small steps: the selection's temporaries stay small
                part, rows = found[offset : offset + SELECT_ROWS], chosen[offset : offset + SELECT_ROWS]
                # Equal similarities (identical keys) in index order, whatever order the search met them in.
                part = np.take_along_axis(part, np.lexsort((part, -similarities[offset : offset + SELECT_ROWS])), 1)
                pair_ids = np.where(part >= 0, index_rows[np.maximum(part, 0)], -1)
                selected, counts = _select_other_prompts(pair_ids, groups, groups[query_rows[rows]], k, one_per_prompt)
                result[query_rows[rows]] = selected
                # Rows whose probed lists held fewer than `depth` rows (a -1) cannot gain from a deeper search.
                short = (counts < k) & (part >= 0).all(axis=1)
                if depth < len(index_rows):
                    retry.append(rows[short])
                bar.update(int((~short).sum()) if depth < len(index_rows) else len(rows))
            del similarities, found
        rounds.append({"depth": depth, "rows": int(pending.size), "seconds": round(time.perf_counter() - started, 2)})
        pending = np.concatenate(retry) if retry else np.empty(0, dtype=np.int64)
        depth = min(len(index_rows), depth * 2)
    bar.close()
    leaders = _prompt_leaders(groups)
    duplicates = np.flatnonzero(duplicate)
    result[duplicates] = result[leaders[groups[duplicates]]]
    if stats is not None:
        stats.update(
            index=index.describe(),
            indexed_rows=len(index_rows),
            query_rows=len(query_rows),
            build_seconds=round(build_seconds, 2),
            rounds=rounds,
            padded_rows=int((result[:, -1] < 0).sum()),
        )
    return torch.from_numpy(result)


def _prompt_leaders(groups: np.ndarray) -> np.ndarray:
    """The first row of each prompt group."""
    leaders = np.full(int(groups.max()) + 1, -1, dtype=np.int64)
    rows = np.arange(len(groups))[::-1]
    leaders[groups[::-1]] = rows  # the last write wins: the first row of each group
    return leaders


def _same_key_as_prompt_leader(vectors: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Rows whose key equals the first row of their prompt bit for bit (text keys: all but the first)."""
    leaders = _prompt_leaders(groups)
    duplicate = np.zeros(len(groups), dtype=bool)
    for start in range(0, len(groups), CHUNK_ROWS):
        rows = np.arange(start, min(len(groups), start + CHUNK_ROWS))
        leader = leaders[groups[rows]]
        candidates = rows[leader != rows]
        if candidates.size:
            same = (vectors[candidates] == vectors[leaders[groups[candidates]]]).all(axis=1)
            duplicate[candidates[same]] = True
    return duplicate


def _select_other_prompts(
    pair_ids: np.ndarray, groups: np.ndarray, query_groups: np.ndarray, k: int, one_per_prompt: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` candidates (in similarity order) with another prompt; how many qualified per row."""
    if pair_ids.shape[1] < k:
        pad = np.full((pair_ids.shape[0], k - pair_ids.shape[1]), -1, dtype=np.int64)
        pair_ids = np.concatenate([pair_ids, pad], axis=1)
    present = pair_ids >= 0
    candidate_groups = np.where(present, groups[np.maximum(pair_ids, 0)], -1)
    valid = present & (candidate_groups != query_groups[:, None])
    if one_per_prompt:
        # A stable sort by prompt keeps similarity order within each prompt: its first entry is its best pair.
        order = np.argsort(candidate_groups, axis=1, kind="stable")
        sorted_groups = np.take_along_axis(candidate_groups, order, axis=1)
        first = np.ones_like(valid)
        first[:, 1:] = sorted_groups[:, 1:] != sorted_groups[:, :-1]
        keep = np.empty_like(valid)
        np.put_along_axis(keep, order, first, axis=1)
        valid &= keep
    counts = valid.sum(axis=1)
    position = np.argsort(~valid, axis=1, kind="stable")[:, :k]
    selected = np.take_along_axis(pair_ids, position, axis=1)
    selected[~np.take_along_axis(valid, position, axis=1)] = -1
    return selected, counts


# ----------------------------------------------------------------------------
# batches


@dataclass(frozen=True, eq=False)
class MinedBatches:
    """Batches of related pairs: a seed pair and its nearest pairs with other prompts (a ``BatchSource``).

    Epoch ``e`` covers micro-batches ``e * ceil(N / size)`` to the next epoch's
    first. Its plan is a pure function of ``(seed, e, size)``: seed pairs are
    visited in a seeded random order; each unused seed starts a batch, joined
    by its nearest neighbours (``neighbours[seed]``) whose prompt is not in
    the batch yet. A neighbour already used this epoch is replaced by an
    unused pair with the same prompt (with text keys that pair has the same
    key). If the neighbours run out, the batch is filled with the next unused
    pairs of the random order, distinct prompts where possible. Every pair is
    used once per epoch; a short last batch is topped up with pairs already
    used in the epoch (the first ones in the order, distinct prompts first).

    Attributes:
        neighbours: ``[N, k]`` int64 from :func:`nearest_other_prompts`.
        prompts: Each pair's prompt, or ``[N]`` prompt ids (:func:`prompt_ids`).
        seed: Seed of the epoch orders.
    """

    neighbours: Tensor
    prompts: tuple[str, ...] | Tensor
    seed: int = 0
    _groups: np.ndarray = field(init=False, repr=False)
    _members: np.ndarray = field(init=False, repr=False)
    _starts: np.ndarray = field(init=False, repr=False)
    _plans: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        neighbours = self.neighbours
        if not isinstance(neighbours, Tensor) or neighbours.ndim != 2 or neighbours.shape[0] == 0:
            shape = tuple(neighbours.shape) if isinstance(neighbours, Tensor) else type(neighbours).__name__
            raise ValueError(f"neighbours must be a non-empty [N, k] tensor, got {shape}")
        if neighbours.dtype.is_floating_point or neighbours.dtype == torch.bool:
            raise ValueError(f"neighbours must hold integer pair indices, got {neighbours.dtype}")
        n = neighbours.shape[0]
        if neighbours.numel() and (int(neighbours.min()) < -1 or int(neighbours.max()) >= n):
            raise ValueError(f"neighbours must be pair indices in [0, {n}) or -1")
        if not isinstance(self.prompts, Tensor):
            object.__setattr__(self, "prompts", tuple(self.prompts))
        groups = _prompt_groups(self.prompts, n)
        members = np.argsort(groups, kind="stable")
        starts = np.searchsorted(groups[members], np.arange(int(groups.max()) + 2))
        object.__setattr__(self, "neighbours", neighbours.to(torch.int64).contiguous())
        object.__setattr__(self, "_groups", groups)
        object.__setattr__(self, "_members", members)
        object.__setattr__(self, "_starts", starts)

    @property
    def num_pairs(self) -> int:
        return int(self.neighbours.shape[0])

    def batches_per_epoch(self, size: int) -> int:
        return math.ceil(self.num_pairs / size)

    def global_batch(self, micro_index: int, size: int) -> list[int]:
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        if micro_index < 0:
            raise ValueError(f"micro_index must be >= 0, got {micro_index}")
        epoch, position = divmod(micro_index, self.batches_per_epoch(size))
        return self.epoch_plan(epoch, size)[position].tolist()

    def epoch_plan(self, epoch: int, size: int) -> np.ndarray:
        """``[ceil(N / size), size]`` pair indices: every batch of ``epoch``."""
        key = (epoch, size)
        if key not in self._plans:
            if len(self._plans) >= 3:  # a run moves forward: keep the last few epochs only
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = self._plan(epoch, size)
        return self._plans[key]

    def _plan(self, epoch: int, size: int) -> np.ndarray:
        from alignment.inputs import derived_seed  # imported here: alignment.inputs loads diffusers

        n = self.num_pairs
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, stream=MINING_STREAM))
        order_array = torch.randperm(n, generator=generator).numpy()
        order = order_array.tolist()
        position_of = np.empty(n, dtype=np.int64)
        position_of[order_array] = np.arange(n)
        position_of = position_of.tolist()
        group_of = self._groups.tolist()
        members = self._members.tolist()
        member_next = self._starts[:-1].tolist()  # per prompt: first member not known to be used
        member_end = self._starts[1:].tolist()
        neighbours = self.neighbours.numpy()
        used = bytearray(n)
        # next_free[p]: a position >= p in the order whose pair may be unused (skips used runs, path-compressed).
        next_free = list(range(n + 1))

        def free_from(p: int) -> int:
            root = p
            while next_free[root] != root:
                root = next_free[root]
            while next_free[p] != root:
                next_free[p], p = root, next_free[p]
            return root

        def take(pair: int, batch: list[int], prompts_in: set[int]) -> None:
            used[pair] = 1
            position = position_of[pair]
            next_free[position] = position + 1
            batch.append(pair)
            prompts_in.add(group_of[pair])

        def unused_member(group: int) -> int:
            cursor, end = member_next[group], member_end[group]
            while cursor < end and used[members[cursor]]:
                cursor += 1
            member_next[group] = cursor
            return members[cursor] if cursor < end else -1

        window = 4 * size + 16  # same-prompt pairs skipped before distinct prompts are given up on
        batches: list[list[int]] = []
        remaining = n
        while remaining:
            seed_pair = order[free_from(0)]
            batch: list[int] = []
            prompts_in: set[int] = set()
            take(seed_pair, batch, prompts_in)
            if size > 1:
                for candidate in neighbours[seed_pair].tolist():
                    if candidate < 0:
                        break
                    group = group_of[candidate]
                    if group in prompts_in:
                        continue
                    if used[candidate]:
                        candidate = unused_member(group)
                        if candidate < 0:
                            continue
                    take(candidate, batch, prompts_in)
                    if len(batch) == size:
                        break
            if len(batch) < size:
                skipped: list[int] = []
                position = free_from(0)
                while len(batch) < size and position < n:
                    candidate = order[position]
                    if not used[candidate]:
                        if group_of[candidate] not in prompts_in:
                            take(candidate, batch, prompts_in)
                        elif len(skipped) < window:
                            skipped.append(candidate)
                        else:
                            break
                    position = free_from(position + 1)
                for candidate in skipped:  # no other prompt within reach: repeat a prompt
                    if len(batch) == size:
                        break
                    if not used[candidate]:
                        take(candidate, batch, prompts_in)
                while len(batch) < size and free_from(0) < n:
                    take(order[free_from(0)], batch, prompts_in)
            remaining -= len(batch)
            batches.append(batch)

        last = batches[-1]
        if len(last) < size:
            in_last = set(last)
            prompts_in = {group_of[pair] for pair in last}
            for distinct_only in (True, False):
                for pair in order:
                    if len(last) == size:
                        break
                    if pair in in_last or (distinct_only and group_of[pair] in prompts_in):
                        continue
                    last.append(pair)
                    in_last.add(pair)
                    prompts_in.add(group_of[pair])
            while len(last) < size:  # more batch slots than pairs: repeat the order
                last.extend(order[: size - len(last)])
        return np.asarray(batches, dtype=np.int64)


def batch_similarity(keys: Tensor, batches: Sequence[Sequence[int]]) -> float:
    """Mean pairwise cosine between different members of a batch, averaged over batches (NaN if none has two).

    Uses ``sum_{i != j} k_i . k_j = |sum k|^2 - sum |k|^2`` per batch: linear in the batch size.
    """
    if not isinstance(keys, Tensor) or keys.ndim != 2:
        raise ValueError(f"keys must be an [N, D] tensor, got {getattr(keys, 'shape', type(keys).__name__)}")
    by_size: dict[int, list[Sequence[int]]] = {}
    for batch in batches:
        if len(batch) >= 2:
            by_size.setdefault(len(batch), []).append(batch)
    total, count = 0.0, 0
    for size, group in by_size.items():
        rows = torch.as_tensor(np.asarray(group, dtype=np.int64))
        if int(rows.min()) < 0 or int(rows.max()) >= keys.shape[0]:
            raise ValueError(f"batches hold pair indices outside [0, {keys.shape[0]})")
        step = max(1, (64 << 20) // (4 * size * keys.shape[1]))
        for start in range(0, len(rows), step):
            members = F.normalize(keys[rows[start : start + step]].float(), dim=-1)
            summed = members.sum(dim=1)
            off_diagonal = (summed * summed).sum(dim=-1) - (members * members).sum(dim=(1, 2))
            total += float((off_diagonal / (size * (size - 1))).sum())
        count += len(group)
    return total / count if count else float("nan")


def plan_summary(keys: Tensor, source: MinedBatches, size: int, seed: int) -> dict[str, Any]:
    """Epoch 0 of ``source`` against ``RandomBatches(N, seed)`` of the same size, for metadata."""
    from alignment.inputs import RandomBatches  # imported here: alignment.inputs loads diffusers

    if keys.shape[0] != source.num_pairs:
        raise ValueError(f"{keys.shape[0]} keys for {source.num_pairs} pairs")
    count = source.batches_per_epoch(size)
    mined = source.epoch_plan(0, size).tolist()
    random_source = RandomBatches(source.num_pairs, seed)
    shuffled = [random_source.global_batch(b, size) for b in range(count)]
    groups = source._groups

    def distinct_share(batches: list[list[int]]) -> float:
        return float(np.mean([len(set(groups[batch].tolist())) / len(batch) for batch in batches]))

    similarity_mined = batch_similarity(keys, mined)
    similarity_random = batch_similarity(keys, shuffled)
    return {
        "pairs": source.num_pairs,
        "prompts": int(groups.max()) + 1,
        "batch_size": size,
        "batches": count,
        "similarity_mined": similarity_mined,
        "similarity_random": similarity_random,
        "similarity_gain": similarity_mined - similarity_random,
        "distinct_prompt_share_mined": distinct_share(mined),
        "distinct_prompt_share_random": distinct_share(shuffled),
    }
