"""Tables to text for the CLI: rich for people; csv, markdown and json for machines.

Machine formats carry no colour codes and keep the table's column order. A missing value is a
dash for people, empty in csv and null in json.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

FORMATS = ("table", "csv", "markdown", "json")
MISSING = "-"


def human(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value.is_integer() and abs(value) < 1e6:
            return str(int(value))
        if abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def to_csv(table) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(table.columns)
    writer.writerows([["" if v is None else repr(v) if isinstance(v, float) else v for v in row] for row in table.rows])
    return out.getvalue()


def to_markdown(table) -> str:
    lines = [f"| {' | '.join(table.columns)} |", f"|{'|'.join('---' for _ in table.columns)}|"]
    lines += [f"| {' | '.join(human(v) for v in row)} |" for row in table.rows]
    return "\n".join(lines) + "\n"


def to_json(table) -> str:
    def plain(value: Any) -> Any:
        return None if isinstance(value, float) and math.isnan(value) else value

    return json.dumps([{c: plain(v) for c, v in zip(table.columns, row)} for row in table.rows], indent=2) + "\n"


HIDDEN_FOR_PEOPLE = ("run_id",)  # 32 hex digits: in csv and json, too wide for a terminal table


def _is_number(value: Any) -> bool:
    if isinstance(value, (int, float)) or value is None:
        return True
    try:
        float(value)
        return True
    except ValueError:
        return False


def to_rich(table):
    from rich.table import Table as RichTable

    shown = [i for i, c in enumerate(table.columns) if c not in HIDDEN_FOR_PEOPLE]
    rich_table = RichTable(title=table.title)
    for i in shown:
        numeric = all(_is_number(row[i]) for row in table.rows)
        rich_table.add_column(table.columns[i], justify="right" if numeric else "left", no_wrap=True)
    for row in table.rows:
        rich_table.add_row(*(human(row[i]) for i in shown))
    return rich_table


def print_rich(table, file=None) -> None:
    """At the table's natural width: squeezed into 80 columns a wide ranking is unreadable."""
    from rich.console import Console

    rich_table = to_rich(table)
    probe = Console()
    width = probe.measure(rich_table, options=probe.options.update_width(10_000)).maximum
    console = Console(file=file, width=max(width, 80), no_color=file is not None)
    console.print(rich_table)


def render_text(table, fmt: str) -> str:
    """csv, markdown or json text of the table."""
    return {"csv": to_csv, "markdown": to_markdown, "json": to_json}[fmt](table)
