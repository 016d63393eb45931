"""Plain-text tables for the CLI: left-aligned columns, two spaces apart, no trailing blanks."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Render ``rows`` under ``headers`` as aligned columns.

    Args:
        headers: column titles.
        rows: one sequence of cells per row; cells are turned into strings with ``str``.

    Returns:
        The table as lines joined by newlines, without a trailing newline.
    """
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) if i < len(row) else 0 for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)
