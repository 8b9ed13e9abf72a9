"""The evaluation table as standalone HTML (the dashboard's view of ``eval_report``) and as text lines."""

from __future__ import annotations

import html
from typing import Any


def _num(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(interval: Any) -> str:
    return "" if not interval else f"[{interval[0]:.3f}, {interval[1]:.3f}]"


COLUMNS = (
    "scorer",
    "aligned mean",
    "base mean",
    "aligned median",
    "base median",
    "mean gain",
    "win rate vs base [95% CI]",
)


def table_cells(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row of strings per scorer of ``report["scorers"]``, the primary first and marked ``*``."""
    primary = report.get("primary_scorer")
    rows = []
    for name, row in (report.get("scorers") or {}).items():
        rows.append(
            (
                f"{name}{' *' if name == primary else ''}",
                _num(row.get("mean")),
                _num(row.get("base_mean")),
                _num(row.get("median")),
                _num(row.get("base_median")),
                f"{row['mean_gain']:+.4f}" if row.get("mean_gain") is not None else "n/a",
                f"{_num(row.get('win_rate_vs_base'), 3)} {_ci(row.get('win_rate_ci95'))}".strip(),
            )
        )
    return rows


def protocol_lines(protocol: dict[str, Any]) -> list[str]:
    """The pinned protocol, one fact per line."""
    if not protocol:
        return []
    prompts = protocol.get("prompt_set") or {}
    split = f", split {prompts['split']}" if prompts.get("split") else ""
    source = f" from {prompts['source']}" if prompts.get("source") else ""
    return [
        f"prompts: {prompts.get('name')}{split}{source}: {prompts.get('prompts')} prompts "
        f"(of {prompts.get('prompts_available')}; sha256 {str(prompts.get('sha256'))[:12]})",
        f"seeds: {protocol.get('seeds')}",
        f"sampler: {protocol.get('sampler')}, {protocol.get('num_inference_steps')} steps, "
        f"CFG {protocol.get('guidance_scale')}, {protocol.get('resolution')} px",
        f"statistics: {', '.join(protocol.get('statistics') or [])}; win rate: {protocol.get('win_rate')}",
    ]


def eval_table_html(report: dict[str, Any], title: str = "Evaluation: aligned vs base") -> str:
    """A standalone HTML page: the scorer table and the protocol it was measured under."""
    rows = table_cells(report)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    if not rows:
        body = f'<tr><td colspan="{len(COLUMNS)}">no scorer (evaluation.scorer none): samples only</td></tr>'
    protocol = "".join(f"<li>{html.escape(line)}</li>" for line in protocol_lines(report.get("protocol") or {}))
    samples = report.get("samples")
    note = (
        f"{samples} samples ({report.get('prompts')} prompts x {report.get('seeds_per_prompt')} seeds); "
        "* primary scorer (the top-level numbers the promotion gates read)"
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
th {{ background: #f3f3f3; }}
</style></head>
<body>
<h2>{html.escape(title)}</h2>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<p>{html.escape(note)}</p>
<h3>Protocol</h3>
<ul>{protocol}</ul>
</body></html>
"""
