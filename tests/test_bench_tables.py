"""benchmarks/load.py: the open loop's table says how many containers the tier started during the loop."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from load import open_table  # noqa: E402

ROW = {"image": "python", "client": "open loop", "capacity": 280.0, "rate_asked": 168.0, "rate_done": 168.0,
       "count": 10080, "failures": 0, "p50": 4.0, "p90": 5.0, "p99": 7.0, "max": 17.0,
       "slow_by_second": {"12": 30, "13": 4}, "late_share": 0.0, "client_cpu_ms": 0.3}


def test_the_starts_during_the_loop_stand_beside_its_tail():
    header, _, row = open_table([{**ROW, "started_during": 3, "replaced_during": 2}]).splitlines()
    cells = [c.strip() for c in row.strip("|").split("|")]
    names = [c.strip() for c in header.strip("|").split("|")]
    assert cells[names.index("requests over 50 ms (in how many seconds)")] == "34 (2)"
    assert cells[names.index("containers started during it (of them replacements)")] == "3 (2)"


def test_a_row_without_the_counts_says_so():
    assert "| not recorded |" in open_table([ROW])
