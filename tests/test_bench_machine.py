"""benchmarks/machine.py: what makes `make bench` call the machine busy."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from machine import Look  # noqa: E402


def test_another_process_using_the_cpu_makes_it_busy():
    assert Look(load=(0.1, 0.1, 0.1), cpus=2, busy_processes=(("pytest", 0.44),)).busy


def test_the_run_s_own_trailing_load_average_does_not():
    # Right after a section of the same run the 1-minute load average is still high while nothing else runs.
    look = Look(load=(12.4, 16.2, 9.4), cpus=2, busy_processes=(("containerd", 0.03),))
    assert not look.busy
    assert look.describe().startswith("quiet: load average 12.40")


def test_the_hypervisor_taking_the_cpus_makes_it_busy():
    look = Look(load=(0.5, 0.5, 0.5), cpus=2, busy_processes=(), steal_share=0.4)
    assert look.busy
    assert "steal 40%" in look.describe()


def test_look_measures_steal_as_a_share():
    from machine import look as look_now
    assert 0.0 <= look_now(sample_s=0.2).steal_share <= 1.0


def test_the_machine_s_speed_is_the_time_of_fixed_work_and_stands_in_the_line():
    from machine import measure_speed
    speed = measure_speed()
    assert speed.interpreter_ms > 0 and speed.all_cpus_ms > 0 and speed.fork_ms > 0
    look = Look(load=(0.5, 0.5, 0.5), cpus=2, busy_processes=(), speed=speed)
    assert (f"interpreter {speed.interpreter_ms:.1f} ms, on every cpu at once {speed.all_cpus_ms:.1f} ms, "
            f"fork {speed.fork_ms:.1f} ms") in look.describe()
