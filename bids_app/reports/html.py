"""HTML helpers of the reports: values written as a person writes them, tables that wrap, swatches.

Pure string functions (no file access): :func:`format_value` turns what a JSON summary holds
into text (lists joined with ", ", ``None`` as an em dash, booleans as yes/no, floats rounded),
:func:`table` and :func:`key_value_table` build tables from it, :func:`swatch_legend` draws a
legend of coloured squares.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

#: text of a missing value (None, n/a)
MISSING = "\u2014"

STYLE = """
body{font-family:Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1340px;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:1.6em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;font-size:12px;margin:.5em 0;max-width:100%;table-layout:auto}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right;vertical-align:top;white-space:normal;
overflow-wrap:anywhere;word-break:break-word}
th{background:#eee}table.kv td:first-child{text-align:left;font-weight:bold;background:#f6f6f6;white-space:nowrap}
table.kv td{text-align:left;max-width:60em}
.warn{background:#fff3cd;border:1px solid #e0b000;padding:.4em .8em;margin:.4em 0}
.caveat{background:#fff3cd;border-left:6px solid #e0b000;padding:.3em .8em;margin:.4em 0;font-weight:bold}
.demo{background:#fde2e1;border:1px solid #d33;padding:.5em 1em}.ok{color:#176f2c}
img{max-width:100%;height:auto}.small{font-size:11px;color:#555}code{font-size:11px;overflow-wrap:anywhere}
.legend{margin:.3em 0;font-size:13px;display:flex;flex-wrap:wrap;gap:.25em 1.6em}
.swatch{display:inline-block;width:.95em;height:.95em;border:1px solid #333;vertical-align:-.12em;margin-right:.35em}
"""


def format_value(value: Any, digits: int = 4) -> str:
    """A value as a person writes it (plain text, not escaped).

    Parameters
    ----------
    value : any
        ``None`` and NaN become an em dash; booleans ``yes``/``no``; floats are rounded to
        ``digits`` significant digits (integers stay integers); lists, tuples and sets are
        joined with ", "; dicts are written ``key: value`` joined with "; ".
    digits : int
        Significant digits of floats.

    Returns
    -------
    str
    """
    if value is None:
        return MISSING
    if isinstance(value, (bool,)) or type(value).__name__ == "bool_":
        return "yes" if bool(value) else "no"
    if isinstance(value, str):
        return value if value.strip() and value != "n/a" else MISSING
    if isinstance(value, dict):
        return "; ".join(f"{k}: {format_value(v, digits)}" for k, v in value.items()) or MISSING
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return ", ".join(format_value(v, digits) for v in items) or MISSING
    if hasattr(value, "tolist") and not isinstance(value, (int, float)):  # numpy scalars and arrays
        return format_value(value.tolist(), digits)
    if isinstance(value, float):
        if not math.isfinite(value):
            return MISSING
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.{digits}g}"
    return str(value)


def esc(value: Any, digits: int = 4) -> str:
    """:func:`format_value`, HTML-escaped."""
    return html.escape(format_value(value, digits))


def table(rows: Sequence[dict], columns: Sequence[str], headers: dict[str, str] | None = None) -> str:
    """A table with one row per dict; cells through :func:`format_value`."""
    headers = headers or {}
    head = "".join(f"<th>{esc(headers.get(c, c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def key_value_table(items: dict[str, Any] | Iterable[tuple[str, Any]], caption: str | None = None) -> str:
    """A two-column (name, value) table: long values wrap instead of widening the page."""
    pairs = items.items() if isinstance(items, dict) else items
    body = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{esc(v)}</td></tr>" for k, v in pairs)
    cap = f"<caption style='text-align:left;font-weight:bold'>{html.escape(caption)}</caption>" if caption else ""
    return f"<table class='kv'>{cap}{body}</table>"


def swatch_legend(entries: Sequence[tuple[str, str]]) -> str:
    """A legend of coloured squares: ``entries`` = (colour, label) pairs."""
    items = "".join(f"<span class='item'><span class='swatch' style='background:{html.escape(colour)}'></span>"
                    f"{html.escape(label)}</span>" for colour, label in entries)
    return f"<div class='legend'>{items}</div>"
