"""The linear MLP head shared by the LAION aesthetic predictor and ImageReward."""

from __future__ import annotations

from torch import Tensor, nn

HEAD_WIDTHS = (1024, 128, 64, 16, 1)


class RewardMLP(nn.Module):
    """``in → 1024 → 128 → 64 → 16 → 1`` linear layers with dropouts and no activations.

    Both published heads (``improved-aesthetic-predictor``'s ``MLP`` and
    ImageReward's ``MLP``) have their ReLUs commented out, so the head is an
    affine map in a deep disguise; it is kept layer for layer so that their
    state dicts load unchanged. Module indices in ``layers`` are therefore
    0, 2, 4, 6, 7 for the linear layers (1, 3, 5 are dropouts).

    Args:
        input_size: 768 for both published heads (CLIP ViT-L/14 image
            embeddings; BLIP's BERT-base hidden state).
    """

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, HEAD_WIDTHS[0]),
            nn.Dropout(0.2),
            nn.Linear(HEAD_WIDTHS[0], HEAD_WIDTHS[1]),
            nn.Dropout(0.2),
            nn.Linear(HEAD_WIDTHS[1], HEAD_WIDTHS[2]),
            nn.Dropout(0.1),
            nn.Linear(HEAD_WIDTHS[2], HEAD_WIDTHS[3]),
            nn.Linear(HEAD_WIDTHS[3], HEAD_WIDTHS[4]),
        )

    def forward(self, features: Tensor) -> Tensor:
        """``[N, input_size]`` → ``[N]``."""
        return self.layers(features).squeeze(-1)
