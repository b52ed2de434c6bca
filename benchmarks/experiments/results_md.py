"""Appending a row to one experiment's section of benchmarks/RESULTS.md, leaving other sections untouched."""

from __future__ import annotations

from pathlib import Path


def add_results_row(results: Path, section: str, intro: str, header: str, row: str) -> None:
    """Add `row` under `section` (created at the end with `intro` and the table `header` when missing)."""
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    lines = text.splitlines()
    if section not in lines:
        results.write_text(text.rstrip("\n") + f"\n\n{section}\n\n{intro}\n\n{header}\n{row}\n")
        return
    start = lines.index(section)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    last_row = max((i for i in range(start, end) if lines[i].startswith("|")), default=None)
    if last_row is None:
        lines[end:end] = ["", header, row, ""]
    else:
        lines.insert(last_row + 1, row)
    results.write_text("\n".join(lines) + "\n")
