"""benchmarks/: the open loop's table says how many containers the tier started during the loop; one-client
figures are medians of runs; reproduce.py reads every figure of RESULTS.md and flags the ones that moved."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import reproduce  # noqa: E402
from load import closed_table, combined, one_client_table, open_table  # noqa: E402

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


def test_a_one_client_figure_is_the_median_of_its_runs_with_each_run_beside_it():
    runs = [{"p50": 5.0, "p95": 6.0, "p99": 9.0, "run_p50": 2.0, "run_p99": 3.0},
            {"p50": 4.0, "p95": 5.0, "p99": 30.0, "run_p50": 2.1, "run_p99": 3.1},
            {"p50": 4.5, "p95": 5.5, "p99": 8.0, "run_p50": 1.9, "run_p99": 2.9}]
    row = combined({"image": "python", "tier": "nano", "n": 2000}, runs)
    assert (row["p50"], row["p99"]) == (4.5, 9.0)  # one run's stall does not set the figure
    header, _, line = one_client_table([row]).splitlines()
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in line.strip("|").split("|")],
                     strict=True))
    assert cells["each run: p50 / p99 ms"] == "5.00 / 9.00, 4.00 / 30.00, 4.50 / 8.00"
    assert cells["client"].endswith("median of 3 runs")


def test_reproduce_reads_every_figure_of_the_results_file_and_flags_what_moved():
    text = (REPO / "benchmarks" / "RESULTS.md").read_text()
    first = reproduce.figures(text)
    assert len(first) == 27 and all(value > 0 for value in first.values())
    _, moved = reproduce.compare(first, first, 0.15)
    assert moved == []
    second = {**first, "python one client p99 ms": first["python one client p99 ms"] * 1.2}
    table, moved = reproduce.compare(first, second, 0.15)
    assert moved == ["python one client p99 ms"] and "x1.20 **(over 15%)**" in table


def test_reproduce_names_a_missing_figure():
    with pytest.raises(LookupError, match="datascience"):
        reproduce.figures((REPO / "benchmarks" / "RESULTS.md").read_text().replace("| datascience | hello |", "|"))


def test_a_closed_loop_row_says_how_many_containers_started_while_it_ran():
    row = {"image": "datascience", "mix": "hello", "client": "locust FastHttpUser x10, keep-alive", "requests": 5000,
           "failures": 0, "rps": 83.0, "p50": 110.0, "p95": 140.0, "p99": 150.0, "little_ms": 120.0}
    assert closed_table([{**row, "started_during": 2, "replaced_during": 2}]).splitlines()[2].endswith("| 2 (2) |")
    assert closed_table([row]).splitlines()[2].endswith("| not recorded |")


def test_reproduce_reads_the_machine_s_speed_before_each_section():
    def section(heading: str, interpreter: float) -> str:
        return (f"## {heading}\n\nMachine before this section: quiet: ...; fixed work (best of 5): interpreter "
                f"{interpreter} ms, on every cpu at once 30.0 ms, fork 80.0 ms\n\nfigures\n\n")
    first = reproduce.machine_speed(section("Load on the python image", 25.7) + section("Replacement rate", 16.0))
    second = reproduce.machine_speed(section("Load on the python image", 15.2) + section("Replacement rate", 16.0))
    assert first["Load on the python image"] == {"interpreter ms": 25.7, "on every cpu at once ms": 30.0,
                                                 "fork ms": 80.0}
    table = reproduce.speed_table(first, second)
    assert "| Load on the python image | 25.7 -> 15.2 (x0.59) | 30.0 -> 30.0 (x1.00)" in table
    assert reproduce.machine_speed("no such line") == {}
