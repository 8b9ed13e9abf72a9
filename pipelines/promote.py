"""Promotion: move a registered model version to staging or production behind gates.

    python run.py --pipeline promote --model smpo_sdxl --to staging
    python run.py --pipeline promote --model smpo_sdxl --to production

The gates are in ``alignment/promotion.py``; the thresholds in ``configs/promote.yaml``.
"""

from __future__ import annotations

from zenml import pipeline

from alignment.promotion import PromotionConfig
from steps.promote import promote_model


@pipeline(enable_cache=False)
def promote(promotion: PromotionConfig) -> None:
    """Check the gates for ``promotion.to`` and, if they all pass, set the version's stage."""
    promote_model(promotion=promotion)
