"""benchmarks/REPORT.md is shared: each benchmark owns one section, between markers, and rewrites only that.

    <!-- begin NAME -->
    ...markdown...
    <!-- end NAME -->
"""

from __future__ import annotations

import re
from pathlib import Path

REPORT = Path(__file__).resolve().parent / "REPORT.md"


def write_section(name: str, markdown: str, report: Path = REPORT) -> Path:
    """Replace section `name` of `report` with `markdown` (appended if the report has none; the file made if absent)."""
    report = Path(report)
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = report.read_text() if report.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text.rstrip("\n") + "\n")
    return report
