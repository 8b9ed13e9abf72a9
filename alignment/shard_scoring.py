"""SmPO's reward scoring on sharded data: scores per shard, smoothing bounds over all of them.

SmPO's soft label of a pair is ``sigmoid(n_w - n_l)`` on rewards min-max
normalised with bounds taken over the *whole* data set (``alignment.smoothing``).
On Pick-a-Pic at full size the scoring is the expensive part (two reward-model
passes per pair), so it is split like the encoding (``alignment.shards``):

* ``score_shard``: one shard's pairs, exactly the pairs ``encode_shard`` encodes
  (the same ``validate_shard`` call: ties dropped, winner first, quarantined rows
  left out), scored winner and loser; a small record per shard (ids and two
  floats per pair). A cluster scores the shards in parallel, and a shard scored
  before is never scored again (``score_shards`` here, the step's cache in the
  pipeline);
* ``reduce_shard_scores``: the records in manifest order, joined, then
  ``alignment.smoothing.smooth_labels`` once over the join. The bounds are
  global and the labels are the very floats scoring the whole table at once
  gives (tests/test_shards_smpo.py). Each shard's pairs are checked against the
  latent shard's ids, so label ``i`` belongs to pair ``i`` of the manifest;
* ``labelled_streaming_inputs``: a streaming training bundle
  (``alignment.streaming.streaming_inputs``) with the soft labels as the
  per-pair ``soft_label`` tensor and the reward ordering applied lazily: the
  pairs the reward model ranks the other way are swapped when a batch is
  gathered, since the latents stay in their shards.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from alignment.config import RewardConfig, ValidationConfig
from alignment.inputs import TrainingInputs
from alignment.shards import (
    LatentShard,
    ShardInfo,
    ShardManifest,
    encoded_shard_pairs,
    plan_shards,
)
from alignment.smoothing import SmoothingConfig, smooth_labels

__all__ = [
    "score_shard",
    "score_shards",
    "reduce_shard_scores",
    "labelled_streaming_inputs",
    "SwappedRows",
]

Scorer = Callable[..., dict]
"""``(winner-first pairs frame, reward config) -> alignment.rewards.pairs.score_pairs``'s dict."""


def _score_pairs(pairs, reward: RewardConfig) -> dict:
    from alignment.rewards.pairs import score_pairs

    return score_pairs(pairs, reward)


def score_shard(
    shard: ShardInfo,
    options: dict,
    validation: ValidationConfig | None,
    reward: RewardConfig,
    *,
    max_rows: int | None = None,
    scorer: Scorer = _score_pairs,
) -> dict:
    """Reward of the winner and the loser of each pair of one shard, for the pairs its latent shard holds.

    The pairs come from ``validate_shard`` with the arguments ``encode_shard``
    gets, so they are the encoded pairs in the encoded order. A shard that
    fails validation or is quarantined whole is returned with no pairs and a
    ``skipped`` reason: its encode step is the one that reports it. With
    ``validation=None`` the GX suite is skipped, as ``build_latent_shards``
    skips it (``prepare_pairs`` still drops ties and puts winners first).

    Returns:
        ``{"shard": ShardInfo dict, "rows", "pair_ids", "score_w", "score_l", "scorer",
        "human_agreement", "skipped"}``.
    """
    record = {
        "shard": shard.to_dict(), "rows": max_rows, "pair_ids": [], "score_w": [], "score_l": [], "scorer": reward.scorer,
    }  # fmt: skip
    pairs, skipped = encoded_shard_pairs(shard, options, validation, max_rows=max_rows)
    if skipped is not None:
        return {**record, "human_agreement": None, "skipped": skipped}
    scores = scorer(pairs, reward)
    return {
        **record,
        "pair_ids": list(scores["pair_ids"]),
        "score_w": list(scores["score_w"]),
        "score_l": list(scores["score_l"]),
        "human_agreement": scores.get("human_agreement"),
        "skipped": None,
    }


def score_shards(
    shards: Sequence[ShardInfo],
    options: dict,
    validation: ValidationConfig | None,
    reward: RewardConfig,
    *,
    max_rows: int | None = None,
    done: Sequence[dict] = (),
    scorer: Scorer = _score_pairs,
) -> tuple[list[dict], list[str]]:
    """Every shard's scores in one process, reusing the records in ``done`` (an earlier call's).

    What the pipeline's per-shard cache does, without ZenML: a shard whose
    fingerprint and row limit were scored before is not scored again.

    Returns:
        The records in shard order, and the names of the shards scored in this call.
    """
    known = {_record_key(r["shard"]["fingerprint"], r.get("rows")): r for r in done}
    records, scored = [], []
    for shard, rows in plan_shards(shards, max_rows):
        key = _record_key(shard.fingerprint, rows)
        if key not in known:
            known[key] = score_shard(shard, options, validation, reward, max_rows=rows, scorer=scorer)
            scored.append(shard.name)
        records.append(known[key])
    return records, scored


def _record_key(fingerprint: str, rows: int | None) -> str:
    return f"{fingerprint}:{rows}"


def reduce_shard_scores(
    records: Sequence[dict],
    manifest: ShardManifest,
    smoothing: SmoothingConfig,
    *,
    pair_ids_of: Callable[[LatentShard], list[str]] | None = None,
) -> tuple[dict, dict]:
    """Soft labels of every pair of ``manifest``, in its order, smoothed with bounds over all shards.

    Args:
        records: ``score_shard`` outputs, any order; those of shards the manifest
            leaves out (quarantined whole) are ignored.
        manifest: The latent shards training streams from.
        smoothing: Bounds and ordering, as in the non-sharded pipeline.
        pair_ids_of: Reads a latent shard's pair ids (its json sidecar); given,
            every shard's scored ids must equal its encoded ids, in order.

    Returns:
        ``labels`` (``smooth_labels``' {pair_ids, soft_label, swap} for the
        manifest's pairs in order, plus ``manifest``: its fingerprint, and
        ``shards``: [{name, pairs}]) and the smoothing statistics.

    Raises:
        ValueError: Naming the shard, when a manifest shard has no scores or
            its scores are not for its encoded pairs.
    """
    by_name = {record["shard"]["name"]: record for record in records}
    pair_ids: list[str] = []
    score_w: list[float] = []
    score_l: list[float] = []
    for entry in manifest.shards:
        record = by_name.get(entry.name)
        if record is None or record.get("skipped"):
            why = "was not scored" if record is None else f"was not scored ({record['skipped']})"
            raise ValueError(f"latent shard {entry.name} {why}; every shard training reads needs reward scores")
        if record["shard"]["fingerprint"] != entry.source_fingerprint:
            raise ValueError(
                f"shard {entry.name}: scored at fingerprint {record['shard']['fingerprint']} but encoded at "
                f"{entry.source_fingerprint}; the shard changed between the two"
            )
        if len(record["pair_ids"]) != entry.pairs:
            raise ValueError(f"shard {entry.name}: {len(record['pair_ids'])} pairs scored, {entry.pairs} encoded")
        if pair_ids_of is not None:
            encoded = [str(p) for p in pair_ids_of(entry)]
            if encoded != [str(p) for p in record["pair_ids"]]:
                raise ValueError(f"shard {entry.name}: the scored pairs are not the encoded pairs (ids or order differ)")
        pair_ids += [str(p) for p in record["pair_ids"]]
        score_w += record["score_w"]
        score_l += record["score_l"]
    if not pair_ids:
        raise ValueError("the shard manifest lists no pairs to label")
    labels, stats = smooth_labels(pair_ids, torch.tensor(score_w), torch.tensor(score_l), smoothing)
    labels["manifest"] = manifest.fingerprint()
    labels["shards"] = [{"name": entry.name, "pairs": entry.pairs} for entry in manifest.shards]
    return labels, {**stats, "shards": len(manifest.shards), "pairs": len(pair_ids)}


def read_pair_ids(uri: str | Path) -> list[str]:
    """A local latent shard's pair ids, from its json sidecar alone (no latents read)."""
    import json

    from alignment.encoding import META_FILE

    return list(json.loads((Path(uri) / META_FILE).read_text())["pair_ids"])


# ----------------------------------------------------------------------------
# the streaming bundle with soft labels


class SwappedRows:
    """A tensor-like view of the winner (or loser) rows with some pairs' winner and loser exchanged.

    ``winner``/``loser`` are anything indexable by a tensor of pair indices
    (``alignment.streaming.ShardRows``, or tensors); only the rows asked for are read.
    """

    def __init__(self, winner, loser, swap: torch.Tensor, *, side: str) -> None:
        if side not in ("w", "l"):
            raise ValueError(f"side must be 'w' or 'l', got {side!r}")
        self.winner, self.loser, self.side = winner, loser, side
        self.swap = swap.to(torch.bool)
        self.shape = winner.shape
        self.dtype = winner.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int):
            return self[torch.tensor([index])][0]
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        own, other = (self.winner, self.loser) if self.side == "w" else (self.loser, self.winner)
        kept, swapped = own[index], other[index]
        mask = self.swap[index].view(-1, *([1] * (kept.ndim - 1)))
        return torch.where(mask, swapped, kept)

    def to(self, *args, **kwargs):  # pragma: no cover - guard
        raise TypeError("swapped rows stream from shards and cannot be moved whole; index them first")


def labels_in_manifest_order(labels: dict, manifest: ShardManifest) -> tuple[torch.Tensor, torch.Tensor]:
    """``(soft_label [N] float32, swap [N] bool)`` of ``reduce_shard_scores``' labels, for ``manifest``."""
    if labels.get("manifest") != manifest.fingerprint():
        raise ValueError(
            f"the soft labels were made for manifest {labels.get('manifest')} but training reads {manifest.fingerprint()}"
        )
    if len(labels["soft_label"]) != len(manifest):
        raise ValueError(f"{len(labels['soft_label'])} soft labels for {len(manifest)} pairs")
    return torch.tensor(labels["soft_label"], dtype=torch.float32), torch.tensor([bool(s) for s in labels["swap"]])


def labelled_streaming_inputs(inputs: TrainingInputs, labels: dict) -> TrainingInputs:
    """``streaming_inputs(manifest)`` with SmPO's per-pair ``soft_label`` and its reward ordering.

    Equal, batch for batch, to ``alignment.methods.smpo.build_inputs`` on the
    in-memory pairs (tests/test_shards_smpo.py). The fingerprint covers the
    manifest and the labels, so a run with other labels never resumes this
    one's checkpoints.
    """
    from alignment.methods.smpo import SOFT_LABEL

    encoded = inputs.encoded
    manifest = encoded.manifest
    soft, swap = labels_in_manifest_order(labels, manifest)
    labelled = copy.copy(encoded)
    labelled.latents_w = SwappedRows(encoded.latents_w, encoded.latents_l, swap, side="w")
    labelled.latents_l = SwappedRows(encoded.latents_w, encoded.latents_l, swap, side="l")
    if encoded.time_ids_w is not None:
        labelled.time_ids_w = SwappedRows(encoded.time_ids_w, encoded.time_ids_l, swap, side="w")
        labelled.time_ids_l = SwappedRows(encoded.time_ids_w, encoded.time_ids_l, swap, side="l")
    digest = hashlib.sha256(manifest.fingerprint().encode())
    digest.update(soft.numpy().tobytes())
    digest.update(swap.numpy().tobytes())
    return TrainingInputs(
        encoded=labelled,
        pair_inputs={SOFT_LABEL: soft},
        metadata={**inputs.metadata, "swapped_pairs": int(swap.sum())},
        _fingerprint=digest.hexdigest()[:16],
    )
