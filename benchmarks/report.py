"""RESULTS.md's sections as `make bench` writes them: each with the machine's state before it was measured,
marked when the machine was busy; the sections other scripts own are kept as they are."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from machine import Look

BUSY_MARK = " [taken on a busy machine]"


@dataclass(frozen=True)
class Section:
    heading: str  # "## ..." without the busy mark
    body: str
    before: Look

    def render(self) -> str:
        mark = BUSY_MARK if self.before.busy else ""
        return (f"{self.heading}{mark}\n\nMachine before this section: {self.before.describe()}\n\n"
                f"{self.body.rstrip()}\n")


def kept_sections(path: Path, own_headings: tuple[str, ...]) -> str:
    """The sections of `path` whose headings do not start with one of `own_headings`, in their order."""
    if not path.exists():
        return ""
    text = path.read_text()
    starts = [i for i in range(len(text)) if text.startswith("## ", i) and (i == 0 or text[i - 1] == "\n")]
    kept = []
    for start, end in zip(starts, starts[1:] + [len(text)], strict=True):
        section = text[start:end]
        if not section.startswith(own_headings):
            kept.append(section.rstrip() + "\n")
    return "\n".join(kept)


def destination(output: Path, sections: list[Section], allow_busy: bool) -> tuple[Path, str]:
    """Where to write and why: `output`, unless a section was measured on a busy machine and that was not
    allowed, in which case a sibling file (RESULTS.busy.md) so that the quiet figures are not overwritten."""
    busy = [s.heading.removeprefix("## ") for s in sections if s.before.busy]
    if not busy:
        return output, "the machine was quiet before every section"
    if allow_busy:
        return output, f"--allow-busy: {len(busy)} section(s) marked as taken on a busy machine"
    return (output.with_suffix(".busy.md"),
            f"refusing to overwrite {output.name}: the machine was busy before {len(busy)} section(s) "
            f"({'; '.join(busy)}); rerun on a quiet machine, or pass --allow-busy to write it with the marks")
