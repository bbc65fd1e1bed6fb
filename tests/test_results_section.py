"""benchmarks/results_section.py: a script replaces its own section of RESULTS.md and keeps the others."""
from __future__ import annotations

from benchmarks.results_section import replace_section


def test_a_section_is_replaced_in_place_and_the_others_are_kept(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\n## A\n\nold a\n\n## B\n\nold b\n\n## C\n\nc\n")
    replace_section(path, "## B", "## B\n\nnew b\n")
    assert path.read_text() == "# Results\n\n## A\n\nold a\n\n## B\n\nnew b\n\n## C\n\nc\n"


def test_the_last_section_and_a_missing_one(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("## A\n\na\n\n## B\n\nold\n")
    replace_section(path, "## B", "## B\n\nnew\n\n\n")
    replace_section(path, "## D", "## D\n\nd")
    assert path.read_text() == "## A\n\na\n\n## B\n\nnew\n\n## D\n\nd\n"
    fresh = tmp_path / "new.md"
    replace_section(fresh, "## A", "## A\n\na\n")
    assert fresh.read_text() == "## A\n\na\n"
