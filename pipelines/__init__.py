"""ZenML pipelines: composition only. ``PIPELINES`` is what run.py offers."""

from pipelines.alignment import dpo_sd15, dpo_sdxl, sft_sd15, sft_sdxl, smpo_sd15, smpo_sdxl
from pipelines.promote import promote

PIPELINES = {
    "dpo_sdxl": dpo_sdxl,
    "dpo_sd15": dpo_sd15,
    "sft_sdxl": sft_sdxl,
    "sft_sd15": sft_sd15,
    "smpo_sdxl": smpo_sdxl,
    "smpo_sd15": smpo_sd15,
    "promote": promote,
}

__all__ = ["PIPELINES", "promote", "dpo_sd15", "dpo_sdxl", "sft_sd15", "sft_sdxl", "smpo_sd15", "smpo_sdxl"]
