"""Diffusion-RPO (Gu et al. 2024; research/algorithms.md §2): relative preference over the batch.

Diffusion-DPO contrasts each winner with its own loser; RPO contrasts every
winner with every loser of the batch (a B x B matrix of implicit-reward
differences), each contrast weighted by how similar the two pairs are in a
CLIP-type embedding space (``alignment.losses.rpo_loss``). The matrix is an
outer difference of the 2B per-sample errors DPO already computes, so a step
costs what a DPO step costs.

The contrasts only carry information when a batch holds related pairs with
different prompts, so by default batches are *mined* (``alignment.mining``):
a seed pair and its nearest neighbours among the other prompts, every pair
once per epoch, a pure function of the seed. ``batches: random`` keeps
DPO's random batches (what the group's LLM code does).

Data steps (``pipelines/methods/rpo.py``): ``embed_pairs`` embeds every pair's
prompt and both images once (an artifact, cached), ``mine_pairs`` turns them
into this bundle. Per-pair inputs: ``rpo_embed_w`` / ``rpo_embed_l`` [N, D]
(what the weights compare, by ``mining.similarity``), ``rpo_neighbours``
[N, k] and ``rpo_prompt_id`` [N] (what the mined batches are made from).

On sharded data (``rpo_*_sharded``) the pairs are embedded per shard and
mined within fixed groups of shards, and a batch never leaves its group
(``alignment.shard_mining``).

Under multi-process training the errors and embeddings of every process are
gathered, so the matrix spans the global micro-batch and N processes train
like one; with gradient accumulation it spans one micro-batch.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from alignment.config import RewardConfig
from alignment.encoding import EncodedPairs
from alignment.inputs import BatchSource, RandomBatches, TrainingInputs
from alignment.losses import RPO_DIAGONAL_WEIGHT, LossOutput, rpo_loss
from alignment.methods.base import PreferenceMethod
from alignment.mining import MinedBatches, MiningConfig, PairEmbeddings

EMBED_W, EMBED_L = "rpo_embed_w", "rpo_embed_l"
NEIGHBOURS = "rpo_neighbours"
PROMPT_ID = "rpo_prompt_id"


class RpoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tau: float = Field(0.5, gt=0, description="temperature of the weights softmax_j(-d_ij/tau); 0.5 in the LLM code")
    variant: Literal["paired", "unpaired", "diagonal"] = Field(
        "paired", description="full weighted matrix (paired), winners vs other pairs' losers only, or 0.8 diag + 0.2 rest"
    )
    diagonal_weight: float = Field(RPO_DIAGONAL_WEIGHT, ge=0, le=1, description="the diagonal's share (variant diagonal)")
    batches: Literal["mined", "random"] = Field(
        "mined", description="batches of related pairs with distinct prompts (mined) or DPO's random batches"
    )


class DiffusionRPO(PreferenceMethod):
    name = "rpo"
    summary = "Diffusion-RPO (similarity-weighted contrasts across the batch)"
    Options = RpoOptions
    pair_inputs = (EMBED_W, EMBED_L, NEIGHBOURS, PROMPT_ID)
    pipeline_parameters = {"embedding": RewardConfig, "mining": MiningConfig}

    def batch_source(self, inputs: TrainingInputs) -> BatchSource:
        if self.options.batches == "random":
            return RandomBatches(num_pairs=len(inputs), seed=self.config.seed)
        return MinedBatches(
            neighbours=inputs.pair_inputs[NEIGHBOURS], prompts=inputs.pair_inputs[PROMPT_ID], seed=self.config.seed
        )

    def sharded_batch_source(self, inputs: TrainingInputs, shard_order: BatchSource) -> BatchSource:
        """Mined: batches within one mining group of shards (``alignment.shard_mining``); random: the shard order."""
        if self.options.batches == "random":
            return shard_order
        from alignment.shard_mining import grouped_mined_batches

        return grouped_mined_batches(inputs, seed=self.config.seed)

    def prepare_inputs(self, pairs, encoded, components, parameters) -> tuple[TrainingInputs, dict]:
        """Embed the pairs with the configured embedder, then mine (the pipeline's two steps)."""
        from alignment.mining import embed_pairs

        embeddings = embed_pairs(pairs, load_embedder(parameters["embedding"]), show_progress=False)
        batch_size = self.config.train_batch_size * self.config.num_processes
        return build_inputs(encoded, embeddings, parameters["mining"], batch_size=batch_size, seed=self.config.seed)

    def loss(self, step, batch) -> LossOutput:
        noisy, target, timesteps = step.forward_noised_pairs(batch)
        errors = step.pair_errors(noisy, target, timesteps, batch.pair_conditioning())
        # The matrix spans every process's pairs; each process back-propagates through its own rows only.
        gathered = [step.gather_pairs(e) for e in (errors.policy_w, errors.policy_l, errors.ref_w, errors.ref_l)]
        embed_w, embed_l = (step.gather_pairs(batch.extras[name]) for name in (EMBED_W, EMBED_L))
        out = rpo_loss(
            *gathered,
            self.config.beta,
            embed_w,
            embed_l,
            tau=self.options.tau,
            variant=self.options.variant,
            diagonal_weight=self.options.diagonal_weight,
        )
        # Every process computes the same global loss; data parallelism averages the N processes'
        # gradients, each of which holds only its own rows' share: scale so the average is the total.
        return LossOutput(loss=out.loss * step.num_processes, metrics=out.metrics)


METHOD = DiffusionRPO


# ----------------------------------------------------------------------------
# the bundle RPO trains on


def load_embedder(config: RewardConfig):
    """A CLIP-type model that embeds prompts and images into one space (a registered scorer that can)."""
    from alignment.config import resolve_device
    from alignment.rewards.base import load_scorer

    embedder = load_scorer(config.scorer, config.source, device=resolve_device(config.device), **config.options)
    if not (hasattr(embedder, "text_embeddings") and hasattr(embedder, "image_embeddings")):
        raise ValueError(
            f"embedding.scorer {config.scorer!r} does not embed prompts and images into one space; "
            "use a CLIP-type scorer (clip_score, pickscore, toy_reward)"
        )
    embedder.batch_size = config.batch_size
    return embedder


def build_inputs(
    encoded: EncodedPairs, embeddings: PairEmbeddings, mining: MiningConfig, *, batch_size: int, seed: int = 0
) -> tuple[TrainingInputs, dict]:
    """The RPO bundle: per-pair embeddings for the weights and the neighbour table for the batches.

    Args:
        encoded: The encoded pairs (their order is the bundle's).
        embeddings: ``embed_pairs``' output for the same pairs, in any order.
        mining: Similarity space, neighbours and index settings.
        batch_size: The global micro-batch the plan is summarised for.
        seed: Seed of the batch plan summarised in the returned statistics
            (training uses its own ``training.seed``).

    Returns:
        The bundle, and statistics of the plan: mean within-batch similarity
        of mined vs random batches, and how the neighbours were found.
    """
    from alignment.mining import mining_keys, nearest_other_prompts, pair_vectors, plan_summary, prompt_ids

    index = {pair_id: i for i, pair_id in enumerate(embeddings.pair_ids)}
    missing = [p for p in encoded.pair_ids if p not in index]
    if missing:
        raise ValueError(
            f"the pair embeddings lack {len(missing)} of the {len(encoded)} encoded pairs, e.g. {missing[:3]}: "
            "were they made from other data?"
        )
    order = torch.tensor([index[p] for p in encoded.pair_ids])
    prompts = [embeddings.prompts[i] for i in order.tolist()]
    embed_w, embed_l = (v[order].float().contiguous() for v in pair_vectors(embeddings, mining.similarity, joint=mining.joint))
    keys = mining_keys(embeddings, mining.similarity, joint=mining.joint)[order].contiguous()
    search: dict = {}
    neighbours = nearest_other_prompts(
        keys, prompts, mining.neighbours, one_per_prompt=mining.one_per_prompt, stats=search, **mining.index_options()
    )
    prompt_id = prompt_ids(prompts)
    inputs = TrainingInputs(
        encoded=encoded,
        pair_inputs={EMBED_W: embed_w, EMBED_L: embed_l, NEIGHBOURS: neighbours, PROMPT_ID: prompt_id},
        metadata={"embedder": embeddings.embedder, "similarity": mining.similarity},
    )
    source = MinedBatches(neighbours=neighbours, prompts=prompt_id, seed=seed)
    summary = plan_summary(keys, source, size=batch_size, seed=seed)
    return inputs, {"embedder": embeddings.embedder, "similarity": mining.similarity, "search": search, **summary}
