"""One section of benchmarks/RESULTS.md, replaced in place by the script that owns it (the others stay)."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, heading: str, section: str) -> None:
    """Put `section` (which starts with `heading`) where the section under `heading` is, up to the next
    `## ` heading, or append it to the file; every other section is kept as it is."""
    text = path.read_text() if path.exists() else ""
    section = section.rstrip("\n") + "\n"
    start = text.find(heading)
    if start < 0:
        path.write_text((text.rstrip("\n") + "\n\n" if text.strip() else "") + section)
        return
    end = text.find("\n## ", start + len(heading))
    path.write_text(text[:start] + section + ("\n" + text[end + 1:] if end >= 0 else ""))
