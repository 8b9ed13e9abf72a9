"""ZenML pipelines: composition only. ``PIPELINES`` is what run.py offers."""

from pipelines.alignment import dpo_sd15, dpo_sdxl, sft_sd15, sft_sdxl, smpo_sd15, smpo_sdxl

PIPELINES = {
    "dpo_sdxl": dpo_sdxl,
    "dpo_sd15": dpo_sd15,
    "sft_sdxl": sft_sdxl,
    "sft_sd15": sft_sd15,
    "smpo_sdxl": smpo_sdxl,
    "smpo_sd15": smpo_sd15,
}

__all__ = ["PIPELINES", "dpo_sd15", "dpo_sdxl", "sft_sd15", "sft_sdxl", "smpo_sd15", "smpo_sdxl"]
