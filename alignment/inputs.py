"""What training reads: one bundle of per-pair inputs, and where batches come from.

``TrainingInputs`` is the encoded pairs plus whatever per-pair tensors a
method declared (SmPO: soft labels and inverted latents; a later method: a
batch plan or embeddings). It travels as one artifact from the method's data
step to the training step, to the multi-process launcher and into the
trainer, so a new method adds entries to the bundle, never arguments to every
layer. Every per-pair tensor has the pairs on its first axis, in the order of
``encoded.pair_ids``: a shard of the bundle is a slice of every tensor.

A ``BatchSource`` says which pairs make up global micro-batch ``k``. It is a
pure function of its seed and ``k``, so a resumed run sees the batches the
uninterrupted run would have seen and N processes, each keeping its slice of
the same global batch, train like one process.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

from alignment.encoding import EncodedPairs

PAIR_INPUTS_FILE = "pair_inputs.safetensors"
BUNDLE_META_FILE = "training_inputs.json"
ENCODED_DIR = "encoded"


@dataclass
class TrainingInputs:
    """Encoded pairs and the per-pair tensors the training method declared."""

    encoded: EncodedPairs
    pair_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    encoded_source: str | None = None
    """Where the encoded pairs are already stored (e.g. their artifact's URI): saved as a pointer, not copied."""
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.encoded)
        wrong = {name: tuple(t.shape) for name, t in self.pair_inputs.items() if t.ndim == 0 or t.shape[0] != n}
        if wrong:
            raise ValueError(f"per-pair inputs must have the {n} pairs on their first axis, got {wrong}")

    def __len__(self) -> int:
        return len(self.encoded)

    def require(self, method: str, names: tuple[str, ...]) -> None:
        """Refuse a bundle that lacks an input ``method`` declared, naming it."""
        missing = [name for name in names if name not in self.pair_inputs]
        if missing:
            have = ", ".join(sorted(self.pair_inputs)) or "none"
            raise ValueError(
                f"method {method!r} needs the per-pair input(s) {', '.join(missing)} (this bundle has: {have}); "
                "run the method's data steps, e.g. through its pipeline"
            )

    def fingerprint(self) -> str:
        """Content hash of everything training reads: the latents, embeddings, ids and every per-pair input."""
        if self._fingerprint:
            return self._fingerprint
        digest = hashlib.sha256()
        digest.update(json.dumps([self.encoded.arch, self.encoded.resolution, self.encoded.pair_ids]).encode())
        for source in (self.encoded.tensors(), self.pair_inputs):
            for name in sorted(source):
                tensor = source[name].detach().cpu().contiguous()
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def summary(self) -> dict:
        return {
            **self.encoded.summary(),
            "pair_inputs": {name: list(t.shape[1:]) for name, t in sorted(self.pair_inputs.items())},
            "fingerprint": self.fingerprint(),
        }

    # -- storage: safetensors + json, never pickle ----------------------------

    def save(self, directory: str | Path) -> Path:
        """Write the bundle; with ``encoded_source`` set the latents are not copied, the bundle points at them."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.encoded_source is None:
            self.encoded.save(directory / ENCODED_DIR)
        save_file({name: t.contiguous() for name, t in self.pair_inputs.items()}, str(directory / PAIR_INPUTS_FILE))
        meta = {"metadata": self.metadata, "fingerprint": self.fingerprint(), "encoded_source": self.encoded_source}
        (directory / BUNDLE_META_FILE).write_text(json.dumps(meta))
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, load_encoded=EncodedPairs.load) -> TrainingInputs:
        """Read a bundle written by :meth:`save`; ``load_encoded(source)`` reads pointed-at encoded pairs."""
        directory = Path(directory)
        meta = json.loads((directory / BUNDLE_META_FILE).read_text())
        source = meta.get("encoded_source")
        encoded = load_encoded(source) if source else EncodedPairs.load(directory / ENCODED_DIR)
        return cls(
            encoded=encoded,
            pair_inputs=dict(load_file(str(directory / PAIR_INPUTS_FILE))),
            metadata=meta["metadata"],
            encoded_source=source,
            _fingerprint=meta.get("fingerprint"),
        )


def as_training_inputs(data: TrainingInputs | EncodedPairs) -> TrainingInputs:
    """Encoded pairs alone are a bundle without per-pair inputs (SFT, DPO)."""
    return data if isinstance(data, TrainingInputs) else TrainingInputs(encoded=data)


def swap_winner_and_loser(inputs: TrainingInputs, swap: torch.Tensor) -> TrainingInputs:
    """Exchange winner and loser of the pairs where ``swap`` is set, in every ``*_w`` / ``*_l`` tensor.

    Methods that re-order pairs (SmPO's reward ordering) do it once here, when
    the bundle is made, so the trainer never knows which pairs were swapped.
    """
    swap = swap.to(torch.bool)
    if swap.shape != (len(inputs),):
        raise ValueError(f"swap must have one flag per pair ({len(inputs)}), got {tuple(swap.shape)}")

    def exchange(winner: torch.Tensor, loser: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = swap.view(-1, *([1] * (winner.ndim - 1)))
        return torch.where(mask, loser, winner), torch.where(mask, winner, loser)

    encoded = inputs.encoded
    latents_w, latents_l = exchange(encoded.latents_w, encoded.latents_l)
    time_ids_w, time_ids_l = encoded.time_ids_w, encoded.time_ids_l
    if time_ids_w is not None:
        time_ids_w, time_ids_l = exchange(time_ids_w, time_ids_l)
    swapped = EncodedPairs(
        **{**vars(encoded), "latents_w": latents_w, "latents_l": latents_l, "time_ids_w": time_ids_w, "time_ids_l": time_ids_l}
    )
    pair_inputs = dict(inputs.pair_inputs)
    for name in [n for n in pair_inputs if n.endswith("_w")]:
        partner = name[:-2] + "_l"
        if partner in pair_inputs:
            pair_inputs[name], pair_inputs[partner] = exchange(pair_inputs[name], pair_inputs[partner])
    return TrainingInputs(encoded=swapped, pair_inputs=pair_inputs, metadata=dict(inputs.metadata))


# ----------------------------------------------------------------------------
# where batches come from


class BatchSource(Protocol):
    """Which pairs make up a global micro-batch: a pure function of the micro-batch index."""

    def global_batch(self, micro_index: int, size: int) -> list[int]: ...


def derived_seed(seed: int, micro_index: int, stream: int) -> int:
    """The seed of one random stream at one micro-batch: every draw in training is keyed this way."""
    return (seed * 1_000_003 + micro_index * 7_919 + stream * 104_729) % (2**63 - 1)


@functools.lru_cache(maxsize=4)
def _epoch_order(num_pairs: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(derived_seed(seed, epoch, stream=0))
    return tuple(torch.randperm(num_pairs, generator=generator).tolist())


def global_batch_indices(num_pairs: int, global_batch: int, micro_index: int, seed: int) -> list[int]:
    """Pair indices of one global micro-batch: consecutive slices of per-epoch shuffles."""
    indices: list[int] = []
    position = micro_index * global_batch
    while len(indices) < global_batch:
        epoch, offset = divmod(position, num_pairs)
        order = _epoch_order(num_pairs, seed, epoch)
        take = min(num_pairs - offset, global_batch - len(indices))
        indices.extend(order[offset : offset + take])
        position += take
    return indices


@dataclass(frozen=True)
class RandomBatches:
    """Every pair once per epoch, in a fresh seeded shuffle each epoch (the default)."""

    num_pairs: int
    seed: int

    def global_batch(self, micro_index: int, size: int) -> list[int]:
        return global_batch_indices(self.num_pairs, size, micro_index, self.seed)
