"""Diffusion-RPO's data steps: embed every pair once, then mine the neighbours its batches are made of."""

from __future__ import annotations

from alignment.config import RewardConfig
from alignment.mining import MiningConfig
from steps.embed_pairs import embed_pairs
from steps.mine_pairs import mine_pairs


def training_inputs(pairs, encoded, model, training, embedding: RewardConfig, mining: MiningConfig):
    embeddings = embed_pairs(pairs=pairs, embedding=embedding)
    return mine_pairs(encoded=encoded, embeddings=embeddings, mining=mining, training=training)
