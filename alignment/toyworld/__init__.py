"""The toy world: a small world with a known ground truth, for checking alignment on a CPU.

Scenes (``world``), a renderer (``render``), the ground-truth reward
(``oracle``), simulated annotators with varied tastes (``annotators``), a tiny
SDXL-architecture base model trained on renders (``base_model``, built from
``base_arch``, ``base_training`` and ``base_measure``), and the
Pick-a-Pic-schema preference data sampled from it (``preferences``).
"""
