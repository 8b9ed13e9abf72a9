"""What a person sees when a run ends: its headline numbers, the promotion gates, and where to look.

Plain text built from plain dicts (no ZenML here: ``pipelines.runs`` reads the
finished run and fills in a :class:`RunSummary`). Short lines, one fact each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from alignment.promotion import gate_mark


@dataclass
class Artifact:
    """An artifact worth opening: its name, a command that shows it, and its file (or directory) on disk."""

    name: str
    command: str | None = None
    path: str | None = None


@dataclass
class RunSummary:
    """Everything the end-of-run summary shows; every part but ``run`` is optional.

    Attributes:
        run: The run's name.
        pipeline: The pipeline's name.
        status: The run's status (``completed``, ``failed``, ...).
        model_version: The registered model version, e.g. ``dpo_sdxl version 3``.
        eval_report: The ``eval_report`` artifact (``win_rate_vs_base``, ``win_rate_ci95``,
            ``oracle_reward_mean``, ``oracle_reward_base_mean``, ``samples``, ``prompts``,
            ``extra.all_correct_rate(_base)``).
        production: The current production version, when there is one (and it is not this run's):
            ``{"label": ..., "eval_report": {...}}``.
        drift: The ``drift_summary`` artifact (``reference``, ``reward_mean_delta``, ...).
        style: The ``style_summary`` artifact (``reference``, ``per_style``).
        curation: The ``richpo_curation_summary`` artifact (``candidates``, ``kept``, ``dropped``).
        gates: ``PromotionDecision.to_dict()`` of the staging gates, as the promote step would decide now.
        gates_source: Where the thresholds came from (``configs/promote.yaml``).
        promote_command: The command that promotes this version.
        artifacts: What to open, and how.
        artifact_store: The artifact store's root; artifact paths under it are shown relative to it.
        dashboard: The run's dashboard URL, when a ZenML server is up.
    """

    run: str
    pipeline: str | None = None
    status: str | None = None
    model_version: str | None = None
    eval_report: dict[str, Any] | None = None
    production: dict[str, Any] | None = None
    drift: dict[str, Any] | None = None
    style: dict[str, Any] | None = None
    curation: dict[str, Any] | None = None
    gates: dict[str, Any] | None = None
    gates_source: str = "configs/promote.yaml"
    promote_command: str | None = None
    artifacts: list[Artifact] = field(default_factory=list)
    artifact_store: str | None = None
    dashboard: str | None = None


def _num(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _signed(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def _ci(interval: Sequence[float] | None) -> str:
    return "" if not interval else f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def _share(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _table(rows: list[tuple[str, ...]], indent: str = "  ") -> list[str]:
    """Left-aligned columns, two spaces apart; trailing blanks trimmed."""
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(map(len, rows)))]
    return [(indent + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row))).rstrip() for row in rows]


def metric_lines(report: dict[str, Any], production: dict[str, Any] | None = None) -> list[str]:
    """The headline numbers: aligned against base (and the production version's, when given)."""
    extra = report.get("extra") or {}
    prod_report = (production or {}).get("eval_report") or {}
    header = ("", "aligned (this run)", "base")
    rows: list[tuple[str, ...]] = [header]
    win = report.get("win_rate_vs_base")
    rows.append(("win rate vs base", f"{_num(win)} {_ci(report.get('win_rate_ci95'))}".strip(), "0.500"))
    rows.append(("mean reward", _num(report.get("oracle_reward_mean")), _num(report.get("oracle_reward_base_mean"))))
    if "all_correct_rate" in extra:
        rows.append(
            ("all attributes right", _share(extra.get("all_correct_rate")), _share(extra.get("all_correct_rate_base")))
        )
    if production is not None:
        rows[0] = (*header, f"production ({production['label']})")
        prod_extra = prod_report.get("extra") or {}
        values = [
            f"{_num(prod_report.get('win_rate_vs_base'))} {_ci(prod_report.get('win_rate_ci95'))}".strip(),
            _num(prod_report.get("oracle_reward_mean")),
        ]
        if "all_correct_rate" in extra:
            values.append(_share(prod_extra.get("all_correct_rate")))
        rows = [rows[0]] + [(*row, value) for row, value in zip(rows[1:], values, strict=True)]
    lines = _table(rows)
    samples, prompts, seeds = report.get("samples"), report.get("prompts"), report.get("seeds_per_prompt")
    if samples is not None:
        lines.append(
            f"  {samples} samples ({prompts} prompts x {seeds} seed{'' if seeds == 1 else 's'}), "
            f"scorer {report.get('scorer', 'n/a')}; 95% CI: bootstrap over prompts"
        )
    if win is None:
        lines.append("  no scorer: no win rate or reward (evaluation.scorer 'none')")
    return lines


def scorer_lines(report: dict[str, Any]) -> list[str]:
    """The scorer table (``eval_report["scorers"]``), one row per scorer, the primary marked ``*``."""
    from alignment.evaluation.table import table_cells

    rows = table_cells(report)
    if not rows:
        return []
    header = ("scorer", "aligned mean", "base mean", "aligned median", "base median", "win rate vs base")
    rows = [(r[0], r[1], r[2], r[3], r[4], r[6]) for r in rows]
    protocol = report.get("protocol") or {}
    prompts = protocol.get("prompt_set") or {}
    split = f" ({prompts['split']})" if prompts.get("split") else ""
    lines = [f"scorers (* primary), prompts {prompts.get('name', 'n/a')}{split}:"] if protocol else ["scorers:"]
    return lines + _table([header, *rows])


def drift_lines(drift: dict[str, Any]) -> list[str]:
    """The drift report's verdict against its reference (production when there is one, else the base)."""
    reference = drift.get("reference", "reference")
    lines = [f"drift vs {reference}:"]
    parts = [f"drift share {_num(drift.get('drift_share'), 2)}"]
    if drift.get("embedding_drift_score") is not None:
        verdict = "drift" if drift.get("embedding_drift") else "no drift"
        parts.append(f"embedding MMD {drift['embedding_drift_score']:.3g} ({verdict})")
    lines.append("  " + ", ".join(parts))
    if drift.get("reward_mean_delta") is not None:
        lines.append(
            f"  mean reward {_num(drift.get('reward_mean_candidate'))} vs {_num(drift.get('reward_mean_reference'))} "
            f"({_signed(drift.get('reward_mean_delta'))}); prompts worse: {_share(drift.get('prompts_worse_share'))}"
        )
    return lines


def style_lines(style: dict[str, Any]) -> list[str]:
    lines = [f"style vs {style.get('reference', 'reference')}:"]
    rows: list[tuple[str, ...]] = [("", "style win rate", "style delta", "content delta")]
    for name, numbers in (style.get("per_style") or {}).items():
        win = f"{_num(numbers.get('style_win_rate'))} {_ci(numbers.get('style_win_rate_ci95'))}".strip()
        rows.append((name, win, _signed(numbers.get("style_delta")), _signed(numbers.get("content_delta"))))
    return lines + (_table(rows) if len(rows) > 1 else [])


def curation_lines(curation: dict[str, Any]) -> list[str]:
    kept, candidates = curation.get("kept"), curation.get("candidates")
    line = f"Rich-PO curation: kept {kept} of {candidates} candidates ({_share(curation.get('kept_share'))})"
    dropped = curation.get("dropped") or {}
    lines = [line]
    if dropped:
        lines.append("  dropped: " + ", ".join(f"{reason} {count}" for reason, count in dropped.items()))
    return lines


def gate_lines(gates: dict[str, Any], source: str, promote_command: str | None) -> list[str]:
    """The staging gates as the promote step would decide them now (``PromotionDecision.to_dict()``)."""
    verdict = "would pass" if gates.get("approved") else "would FAIL"
    lines = [f"promotion to {gates.get('target', 'staging')} ({source}): {verdict}"]
    for name, gate in (gates.get("gates") or {}).items():
        lines.append(f"  [{gate_mark(gate['passed'], gate.get('skipped', False))}] {name}: {gate['message']}")
    if promote_command and gates.get("approved"):
        lines.append(f"  promote: {promote_command}")
    return lines


def artifact_lines(artifacts: Sequence[Artifact], dashboard: str | None, store: str | None = None) -> list[str]:
    width = max([len("dashboard"), *(len(artifact.name) for artifact in artifacts)])
    lines = ["open:", f"  {'dashboard':<{width}}  {dashboard or 'not running (zenml login --local starts it)'}"]
    root = store.rstrip("/") + "/" if store else None
    if root and any(artifact.path and artifact.path.startswith(root) for artifact in artifacts):
        lines.append(f"  {'files in':<{width}}  {root}")
    for artifact in artifacts:
        if artifact.path:
            path = artifact.path.removeprefix(root) if root else artifact.path
            lines.append(f"  {artifact.name:<{width}}  {path}")
        if artifact.command:
            lines.append(f"  {'' if artifact.path else artifact.name:<{width}}  {artifact.command}")
    return lines


def format_run_summary(summary: RunSummary) -> str:
    """The end-of-run text: one block per part the run has, blank lines between."""
    status = f" ({summary.status})" if summary.status else ""
    title = f"run {summary.run}{status}"
    blocks: list[list[str]] = [["=" * min(len(title), 100), title]]
    if summary.model_version:
        blocks[0].append(f"model version: {summary.model_version}")
    if summary.eval_report is not None:
        blocks.append(metric_lines(summary.eval_report, summary.production))
        if len(summary.eval_report.get("scorers") or {}) > 1:
            blocks.append(scorer_lines(summary.eval_report))
    if summary.drift is not None:
        blocks.append(drift_lines(summary.drift))
    if summary.style is not None:
        blocks.append(style_lines(summary.style))
    if summary.curation is not None:
        blocks.append(curation_lines(summary.curation))
    if summary.gates is not None:
        blocks.append(gate_lines(summary.gates, summary.gates_source, summary.promote_command))
    blocks.append(artifact_lines(summary.artifacts, summary.dashboard, summary.artifact_store))
    return "\n\n".join("\n".join(block) for block in blocks)
