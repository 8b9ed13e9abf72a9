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

**Gates per scorer** (``scorer_gates`` in ``configs/promote.yaml``) read the
scorer table of ``eval_report["scorers"]``: ``win_rate_vs_base[<scorer>]`` on
the way to staging, ``no_regression[<scorer>]`` (the scorer's mean against
production's, same scorer weights) on the way to production. A scorer the
version was not evaluated with is skipped (the gate passes and says so) unless
the gate is ``required``.

A version made by ``--pipeline evaluate`` (a given checkpoint, no training data
of ours) has no validation report; its validation gate passes and says why.
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
    "prompt_path",
    "prompt_split",
    "max_prompts",
    "seeds_per_prompt",
    "seed_offset",
    "num_inference_steps",
    "guidance_scale",
)


class ScorerGate(BaseModel):
    """Thresholds on one scorer of the evaluation table."""

    model_config = ConfigDict(extra="forbid")

    min_win_rate_vs_base: float | None = Field(
        None, ge=0.0, description="staging: the aligned model must beat its base this often under this scorer"
    )
    max_regression: float | None = Field(
        None, ge=0.0, description="production: largest allowed drop of this scorer's mean vs production"
    )
    required: bool = Field(False, description="fail (instead of skip) when the version was not scored by it")


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
    scorer_gates: dict[str, ScorerGate] = Field(
        default_factory=dict, description="per scorer of eval_report.scorers: its own thresholds"
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
    scorers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``eval_report["scorers"]``: per scorer its mean, median, win rate vs base, ..."""
    evaluation_only: bool = False
    """Made by ``--pipeline evaluate`` (a given checkpoint): no training data to validate."""

    @property
    def label(self) -> str:
        return f"{self.model} version {self.version}"


@dataclass(frozen=True)
class Gate:
    name: str
    passed: bool
    message: str
    skipped: bool = False
    """Not checked (the version was not scored by an optional gate's scorer): it does not block."""

    @property
    def mark(self) -> str:
        return gate_mark(self.passed, self.skipped)


def gate_mark(passed: bool, skipped: bool = False) -> str:
    """The bracketed word a gate line starts with: a skipped gate must not read as a passed one."""
    return "skip" if skipped else ("pass" if passed else "FAIL")


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
        lines = [head] + [f"  [{g.mark}] {g.name}: {g.message}" for g in self.gates]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "version": self.version,
            "target": self.target,
            "approved": self.approved,
            "gates": {g.name: {"passed": g.passed, "skipped": g.skipped, "message": g.message} for g in self.gates},
        }


def evaluation_protocol(evaluation: dict[str, Any], resolution: int | None) -> dict[str, Any]:
    """The part of an evaluation config that decides what is measured, plus the sampling resolution."""
    protocol = {key: evaluation.get(key) for key in PROTOCOL_KEYS}
    if protocol.get("scorer") == "none" and evaluation.get("scorers"):
        # The primary scorer: the first of the table when `scorer` is none.
        first = evaluation["scorers"][0]
        protocol["scorer"] = first if isinstance(first, str) else first.get("name")
    if protocol.get("prompt_set") != "list":
        protocol["prompts"] = None  # a named prompt set fixes the prompts; the list is unused
    protocol["resolution"] = resolution
    return protocol


def _fmt(value: float | None) -> str:
    # Six significant digits: reward differences between versions can be ~1e-5.
    return "n/a" if value is None else f"{value:.6g}"


def _validation_gate(candidate: VersionMetrics) -> Gate:
    if candidate.validation_passed is None and candidate.evaluation_only:
        return Gate("validation", True, f"{candidate.label} is an evaluation-only version (no training data to validate)")
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


def _scorer_win_rate_gate(candidate: VersionMetrics, scorer: str, gate: ScorerGate) -> Gate:
    name = f"win_rate_vs_base[{scorer}]"
    threshold = gate.min_win_rate_vs_base
    row = candidate.scorers.get(scorer)
    if row is None or row.get("win_rate_vs_base") is None:
        scored = ", ".join(candidate.scorers) or "none"
        if gate.required:
            return Gate(name, False, f"{candidate.label} was not scored by {scorer} (its scorers: {scored}); required")
        return Gate(name, True, f"{candidate.label} was not scored by {scorer} (its scorers: {scored})", skipped=True)
    rate, ci = row["win_rate_vs_base"], row.get("win_rate_ci95")
    detail = f"{scorer} win rate vs base {rate:.4f}"
    if ci:
        detail += f" (95% CI {ci[0]:.4f}-{ci[1]:.4f}, {row.get('samples')} samples)"
    if rate >= threshold:
        return Gate(name, True, f"{detail} >= {threshold:.4f} required")
    return Gate(name, False, f"{detail} < {threshold:.4f} required")


def staging_decision(candidate: VersionMetrics, config: PromotionConfig) -> PromotionDecision:
    gates = [_validation_gate(candidate), _win_rate_gate(candidate, config.min_win_rate_vs_base)]
    for scorer, gate in config.scorer_gates.items():
        if gate.min_win_rate_vs_base is not None:
            gates.append(_scorer_win_rate_gate(candidate, scorer, gate))
    return PromotionDecision(candidate.model, candidate.version, "staging", tuple(gates))


def _scorer_regression_gate(
    candidate: VersionMetrics, production: VersionMetrics, scorer: str, gate: ScorerGate, same: bool
) -> Gate:
    name = f"no_regression[{scorer}]"
    ours, theirs = candidate.scorers.get(scorer), production.scorers.get(scorer)
    if ours is None or theirs is None:
        missing = candidate.label if ours is None else f"production ({production.label})"
        if gate.required:
            return Gate(name, False, f"{missing} was not scored by {scorer}; required")
        return Gate(name, True, f"{missing} was not scored by {scorer}", skipped=True)
    if not same:
        return Gate(name, False, "not compared: the two versions were not evaluated on the same protocol")
    weights = [(row.get("scorer") or {}).get("source") for row in (ours, theirs)]
    if weights[0] != weights[1]:
        return Gate(
            name, False, f"not compared: {scorer} weights differ ({weights[0]!r} vs {weights[1]!r} in production)"
        )
    drop = theirs["mean"] - ours["mean"]
    numbers = (
        f"{scorer} mean {_fmt(ours['mean'])} ({candidate.label}) vs {_fmt(theirs['mean'])} "
        f"(production, {production.label}): drop {_fmt(drop)}"
    )
    if drop <= gate.max_regression:
        return Gate(name, True, f"{numbers} <= tolerance {_fmt(gate.max_regression)}")
    return Gate(name, False, f"{numbers} > tolerance {_fmt(gate.max_regression)}")


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
    for scorer, gate in config.scorer_gates.items():
        if gate.max_regression is not None:
            gates.append(_scorer_regression_gate(candidate, production, scorer, gate, same))
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
