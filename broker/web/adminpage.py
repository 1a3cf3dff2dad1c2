"""The ``/admin`` page's HTML, drawn here from an ``overview.Overview``: pure functions,
no I/O. Every value is escaped (group ids, integration names and error codes come from
users and providers). The chart is an inline SVG of stacked bars drawn with presentation
attributes only (no script, no inline style: the page's CSP forbids both)."""

from __future__ import annotations

import html
import json
from datetime import datetime
from typing import Any

from ..overview import ATTENTION, OUTCOME_KINDS, Overview
from .pages import page

__all__ = ["COLORS", "admin_body", "enter_body", "outcome_chart", "render_admin"]

COLORS = {
    "refreshed": "#2da44e",
    "recovered": "#0969da",
    "refresh_failed": "#d4a72c",
    "reauth_required": "#cf222e",
}
STATUS_ORDER = ("connected", *ATTENTION)


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value), quote=True)


def _table(columns: list[str], rows: list[list[Any]], *, cls: str) -> str:
    head = "".join(f"<th scope=\"col\">{_e(c)}</th>" for c in columns)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in rows
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>'


def outcome_chart(hourly: list[dict[str, Any]], *, width: int = 720, height: int = 200) -> str:
    """Stacked bars, one per hour, one colour per outcome (``OUTCOME_KINDS``), with the
    largest hour's total on the axis and a legend. Each bar has a ``<title>`` (the hour
    and its counts), which a browser shows on hover and a screen reader reads."""
    left, bottom, top = 40, 24, 10
    plot_w, plot_h = width - left - 10, height - bottom - top
    peak = max([sum(h[k] for k in OUTCOME_KINDS) for h in hourly] + [1])
    slot = plot_w / max(len(hourly), 1)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" id="outcomes" '
        f'viewBox="0 0 {width} {height + 24}" width="{width}" height="{height + 24}" '
        f'role="img" aria-labelledby="outcomes-title">',
        '<title id="outcomes-title">Refresh outcomes per hour, last 24 hours</title>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
        'stroke="currentColor" stroke-width="1"/>',
        f'<text x="{left - 4}" y="{top + 4}" text-anchor="end" font-size="11" '
        f'fill="currentColor">{peak}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end" font-size="11" '
        'fill="currentColor">0</text>',
    ]
    for i, hour in enumerate(hourly):
        x = left + i * slot + 1
        y = top + plot_h
        label = _e(hour["hour"][11:16] if isinstance(hour["hour"], str) else hour["hour"])
        counts = ", ".join(f"{k} {hour[k]}" for k in OUTCOME_KINDS)
        parts.append(f'<g class="bar" data-hour="{_e(hour["hour"])}">'
                     f"<title>{label}: {_e(counts)}</title>")
        for kind in OUTCOME_KINDS:
            n = hour[kind]
            if not n:
                continue
            h = plot_h * n / peak
            y -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(slot - 2, 1):.1f}" '
                f'height="{h:.1f}" fill="{COLORS[kind]}" data-kind="{kind}" data-count="{n}"/>'
            )
        parts.append("</g>")
        if i % 6 == 0:
            parts.append(
                f'<text x="{x:.1f}" y="{top + plot_h + 14}" font-size="11" '
                f'fill="currentColor">{label}</text>'
            )
    x = left
    for kind in OUTCOME_KINDS:
        parts.append(
            f'<rect x="{x}" y="{height + 8}" width="10" height="10" fill="{COLORS[kind]}"/>'
            f'<text x="{x + 14}" y="{height + 17}" font-size="11" fill="currentColor">'
            f"{kind}</text>"
        )
        x += 30 + 7 * len(kind)
    parts.append("</svg>")
    return "\n".join(parts)


def _when(value: str | None) -> str:
    return value[:19].replace("T", " ") if value else "-"


def admin_body(found: Overview, *, session_ends: datetime) -> str:
    providers = sorted(found.by_provider.items())
    statuses = list(STATUS_ORDER) + sorted(
        {s for _, per in providers for s in per} - set(STATUS_ORDER)
    )
    provider_rows = [
        [name, *[per.get(s, 0) for s in statuses], sum(per.values())]
        for name, per in providers
    ]
    attention = [
        [a["group"], a["integration"], a["status"], a["last_error"], a["failures"],
         _when(a["updated_at"])]
        for a in found.attention
    ]
    recent = [
        [_when(e["created_at"]), e["group_id"], e["integration"], e["kind"],
         json.dumps(e.get("detail") or {}, sort_keys=True, default=str)]
        for e in found.recent
    ]
    total = sum(sum(h[k] for k in OUTCOME_KINDS) for h in found.hourly)
    return f"""<main class="admin" role="main">
<header><h1>Broker</h1>
<p class="meta">As of {_e(_when(found.now.isoformat()))} UTC · read-only ·
this session ends at {_e(_when(session_ends.isoformat()))} UTC</p></header>
<section id="providers"><h2>Providers</h2>
{_table(["provider", *statuses, "total"], provider_rows, cls="providers")
 if provider_rows else '<p class="empty">No connections yet.</p>'}
</section>
<section id="attention"><h2>Needs attention</h2>
{_table(["group", "integration", "status", "last error", "failures", "since"], attention,
        cls="attention")
 if attention else '<p class="empty">Nothing needs attention.</p>'}
</section>
<section id="outcomes-section"><h2>Refresh outcomes, last 24 hours</h2>
<p class="meta">{total} in all</p>
{outcome_chart(found.hourly)}
</section>
<section id="events"><h2>Recent events</h2>
{_table(["at", "group", "integration", "kind", "detail"], recent, cls="events")
 if recent else '<p class="empty">No events yet.</p>'}
</section>
</main>"""


def render_admin(found: Overview, *, session_ends: datetime) -> str:
    return page(title="Broker · operator", stylesheet="admin.css", data_id="broker-admin",
                data={}, scripts=[], body=admin_body(found, session_ends=session_ends))


def enter_body(message: str) -> str:
    return f"""<main class="result starting" role="main">
<h1 id="title">Broker · operator</h1>
<p id="message">{_e(message)}</p>
</main>"""
