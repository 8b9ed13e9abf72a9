"""Promotion gates: may this model version move to staging, or to production?

Pure decision logic: metrics in (read by the promote step from the model
versions' artifacts), a decision out that names every gate with its numbers.

- **staging**: the version's preference data passed validation, and its win
  rate against the base model is at least ``min_win_rate_vs_base``;
- **production**: the version is in staging, it was evaluated with the same
  protocol (prompts, seeds, sampler, scorer, resolution) as the current
  production version, and its mean reward on those prompts is not lower than
  production's by more than ``max_regression``. With no production version
  yet, the comparison gates pass and say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Stage = Literal["staging", "production"]

# Evaluation settings that change what is measured. batch_size and grid_columns
# only change how samples are batched and drawn, so they may differ.
PROTOCOL_KEYS = (
    "scorer",
    "prompt_set",
    "prompts",
    "seeds_per_prompt",
    "seed_offset",
    "num_inference_steps",
    "guidance_scale",
)


class PromotionConfig(BaseModel):
    """Which model version goes where, and the gates' thresholds (``configs/promote.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, description="registered model name, e.g. smpo_sdxl")
    to: Stage = Field(..., description="target stage")
    version: str | None = Field(
        None,
        description="version name or number; default: latest (to staging) or the current staging version (to production)",
    )
    min_win_rate_vs_base: float = Field(
        0.5, ge=0.0, description="staging: the aligned model must beat its base this often"
    )
    max_regression: float = Field(
        0.0, ge=0.0, description="production: largest allowed drop of mean reward vs the current production version"
    )


@dataclass(frozen=True)
class VersionMetrics:
    """What the gates know about one model version (read from its artifacts)."""

    model: str
    version: str
    stage: str | None = None
    validation_passed: bool | None = None
    """``validation_report["passed"]``; None when the version has no validation report."""
    win_rate_vs_base: float | None = None
    win_rate_ci95: tuple[float, float] | None = None
    reward_mean: float | None = None
    """``eval_report["oracle_reward_mean"]``: mean reward of the aligned model."""
    reward_base_mean: float | None = None
    samples: int | None = None
    evaluation: dict[str, Any] | None = None
    """The evaluation protocol (see :func:`evaluation_protocol`); None when unknown."""

    @property
    def label(self) -> str:
        return f"{self.model} version {self.version}"


@dataclass(frozen=True)
class Gate:
    name: str
    passed: bool
    message: str


@dataclass(frozen=True)
class PromotionDecision:
    model: str
    version: str
    target: Stage
    gates: tuple[Gate, ...] = field(default_factory=tuple)

    @property
    def approved(self) -> bool:
        return bool(self.gates) and all(gate.passed for gate in self.gates)

    @property
    def failed(self) -> list[Gate]:
        return [gate for gate in self.gates if not gate.passed]

    def summary(self) -> str:
        head = (
            f"promoted {self.model} version {self.version} to {self.target}"
            if self.approved
            else f"refused to promote {self.model} version {self.version} to {self.target}: "
            + "; ".join(f"gate {gate.name!r} failed" for gate in self.failed)
        )
        lines = [head] + [f"  [{'pass' if g.passed else 'FAIL'}] {g.name}: {g.message}" for g in self.gates]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "version": self.version,
            "target": self.target,
            "approved": self.approved,
            "gates": {g.name: {"passed": g.passed, "message": g.message} for g in self.gates},
        }


def evaluation_protocol(evaluation: dict[str, Any], resolution: int | None) -> dict[str, Any]:
    """The part of an evaluation config that decides what is measured, plus the sampling resolution."""
    protocol = {key: evaluation.get(key) for key in PROTOCOL_KEYS}
    if protocol.get("prompt_set") != "list":
        protocol["prompts"] = None  # a named prompt set fixes the prompts; the list is unused
    protocol["resolution"] = resolution
    return protocol


def _fmt(value: float | None) -> str:
    # Six significant digits: reward differences between versions can be ~1e-5.
    return "n/a" if value is None else f"{value:.6g}"


def _validation_gate(candidate: VersionMetrics) -> Gate:
    if candidate.validation_passed is None:
        return Gate("validation", False, f"{candidate.label} has no validation_report artifact")
    if not candidate.validation_passed:
        return Gate(
            "validation", False, f"{candidate.label}'s data failed validation (validation_report.passed = False)"
        )
    return Gate("validation", True, "validation_report.passed = True")


def _win_rate_gate(candidate: VersionMetrics, threshold: float) -> Gate:
    rate = candidate.win_rate_vs_base
    if rate is None:
        return Gate(
            "win_rate_vs_base",
            False,
            f"{candidate.label} has no win rate vs base (its eval_report has none: evaluation.scorer 'none'?); "
            f"required >= {threshold:.4f}",
        )
    ci = candidate.win_rate_ci95
    detail = f"win rate vs base {rate:.4f}"
    if ci is not None:
        detail += f" (95% CI {ci[0]:.4f}-{ci[1]:.4f}"
        detail += f", {candidate.samples} samples)" if candidate.samples is not None else ")"
    if rate >= threshold:
        return Gate("win_rate_vs_base", True, f"{detail} >= {threshold:.4f} required")
    return Gate("win_rate_vs_base", False, f"{detail} < {threshold:.4f} required")


def staging_decision(candidate: VersionMetrics, config: PromotionConfig) -> PromotionDecision:
    gates = (_validation_gate(candidate), _win_rate_gate(candidate, config.min_win_rate_vs_base))
    return PromotionDecision(candidate.model, candidate.version, "staging", gates)


def _protocol_differences(candidate: dict[str, Any], production: dict[str, Any]) -> list[str]:
    keys = sorted(set(candidate) | set(production))
    return [
        f"{k}: {candidate.get(k)!r} (candidate) vs {production.get(k)!r} (production)"
        for k in keys
        if candidate.get(k) != production.get(k)
    ]


def production_decision(
    candidate: VersionMetrics, production: VersionMetrics | None, config: PromotionConfig
) -> PromotionDecision:
    gates: list[Gate] = []
    if candidate.stage == "staging":
        gates.append(Gate("in_staging", True, f"{candidate.label} is in staging"))
    else:
        gates.append(
            Gate(
                "in_staging",
                False,
                f"{candidate.label} is in stage {candidate.stage or 'none'!r}, not staging; promote it to staging first",
            )
        )

    if production is None:
        gates.append(Gate("same_evaluation", True, "no current production version to compare with"))
        gates.append(Gate("no_regression", True, "no current production version to compare with"))
        return PromotionDecision(candidate.model, candidate.version, "production", tuple(gates))

    same = False
    if candidate.evaluation is None or production.evaluation is None:
        missing = candidate.label if candidate.evaluation is None else production.label
        gates.append(
            Gate(
                "same_evaluation",
                False,
                f"the evaluation config of {missing} is unknown (no eval_report producer step)",
            )
        )
    else:
        differences = _protocol_differences(candidate.evaluation, production.evaluation)
        same = not differences
        if same:
            gates.append(Gate("same_evaluation", True, f"same evaluation protocol as production ({production.label})"))
        else:
            gates.append(
                Gate(
                    "same_evaluation",
                    False,
                    f"evaluated differently from production ({production.label}), so the rewards are not comparable: "
                    + "; ".join(differences),
                )
            )

    if not same:
        gates.append(
            Gate("no_regression", False, "not compared: the two versions were not evaluated on the same protocol")
        )
    elif candidate.reward_mean is None or production.reward_mean is None:
        gates.append(
            Gate(
                "no_regression",
                False,
                f"no mean reward to compare: candidate {_fmt(candidate.reward_mean)}, production {_fmt(production.reward_mean)}",
            )
        )
    else:
        drop = production.reward_mean - candidate.reward_mean
        numbers = (
            f"mean reward {_fmt(candidate.reward_mean)} ({candidate.label}) vs {_fmt(production.reward_mean)} "
            f"(production, {production.label}): drop {_fmt(drop)}"
        )
        if drop <= config.max_regression:
            gates.append(Gate("no_regression", True, f"{numbers} <= tolerance {_fmt(config.max_regression)}"))
        else:
            gates.append(Gate("no_regression", False, f"{numbers} > tolerance {_fmt(config.max_regression)}"))
    return PromotionDecision(candidate.model, candidate.version, "production", tuple(gates))


def decide(candidate: VersionMetrics, production: VersionMetrics | None, config: PromotionConfig) -> PromotionDecision:
    """Apply the gates of ``config.to`` to ``candidate``."""
    if config.to == "staging":
        return staging_decision(candidate, config)
    return production_decision(candidate, production, config)


class PromotionRefused(RuntimeError):
    """A gate failed; the message lists every gate with its numbers."""

    def __init__(self, decision: PromotionDecision) -> None:
        super().__init__(decision.summary())
        self.decision = decision
