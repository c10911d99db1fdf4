"""Plain-text tables for the terminal and JSON files for machines."""
from __future__ import annotations

import json
from pathlib import Path


def fmt(v) -> str:
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "-" if v is None else str(v)


def table(rows: list[dict], columns: list[str] | None = None, title: str | None = None) -> str:
    """Rows of dicts as an aligned text table (numbers right-aligned)."""
    if not rows:
        return (title + "\n" if title else "") + "(no rows)"
    columns = columns or list(rows[0])
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in columns]

    def line(vals):
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(vals, widths, numeric)).rstrip()

    out = ([title] if title else []) + [line(columns), line(["-" * w for w in widths])]
    return "\n".join(out + [line(r) for r in cells])


def write_json(path: Path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
