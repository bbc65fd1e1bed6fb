"""Is the machine quiet enough to benchmark? Its load average and the processes busy right now.

`look()` samples every process's cpu time over a second or two and names those that used more than a
little of it; benchmarks call it before each section, print it beside the figures, and mark (or refuse
to write) figures taken while other work ran.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cpu_account import all_processes_ms

# Busy means: any process not ours using more than 10% of a cpu while we looked. The load average is
# printed beside it but does not decide: it trails by minutes, so a section that follows another of the
# same run saw that section's own load (12 on a quiet machine) and was marked busy.
BUSY_PROCESS_SHARE = 0.10
# Or: the hypervisor took more than this share of the cpus' time (steal, /proc/stat) while we looked. No
# process here shows it, yet it slows everything: on 2026-11-30 a top snapshot in a run showed 43% steal,
# and that run's figures were 20-50% off the run before (benchmarks/RESULTS.md).
BUSY_STEAL_SHARE = 0.10


@dataclass(frozen=True)
class Speed:
    """How long this machine took, just now, for fixed pieces of work (best of SPEED_REPEATS): the
    interpreter's (a pure-Python loop), the same loop in one process per cpu at once (what the cpus give
    together: a host that lends us less than all of them shows here, and in no steal figure), and the
    kernel's (FORKS forks of a process holding FORK_HEAP_MIB, each child exiting at once: page tables
    copied and torn down, as for each task). The host is shared: the same code gave throughputs 15-38%
    apart in two runs 25 minutes apart, with no other process and no steal while the cpu per task stayed
    within 2%; these say whether the machine itself gave less."""

    interpreter_ms: float
    all_cpus_ms: float
    fork_ms: float

    def describe(self) -> str:
        return (f"fixed work (best of {SPEED_REPEATS}): interpreter {self.interpreter_ms:.1f} ms, "
                f"on every cpu at once {self.all_cpus_ms:.1f} ms, fork {self.fork_ms:.1f} ms")


@dataclass(frozen=True)
class Look:
    load: tuple[float, float, float]
    cpus: int
    busy_processes: tuple[tuple[str, float], ...]  # (name, share of one cpu) over the sample
    steal_share: float = 0.0  # of all cpus' time over the sample, taken by the hypervisor
    speed: Speed | None = field(default=None, compare=False)

    @property
    def busy(self) -> bool:
        return (any(share > BUSY_PROCESS_SHARE for _, share in self.busy_processes)
                or self.steal_share > BUSY_STEAL_SHARE)

    def describe(self) -> str:
        procs = ", ".join(f"{name} {100 * share:.0f}%" for name, share in self.busy_processes) or "none"
        verdict = "BUSY" if self.busy else "quiet"
        return (f"{verdict}: load average {self.load[0]:.2f} / {self.load[1]:.2f} / {self.load[2]:.2f} on "
                f"{self.cpus} cpus; steal {100 * self.steal_share:.0f}%; "
                f"processes using more than 2% of a cpu: {procs}"
                + (f"; {self.speed.describe()}" if self.speed else ""))


def look(sample_s: float = 2.0, exclude: frozenset[int] = frozenset(), speed: bool = False) -> Look:
    """The load average and the processes (other than `exclude` and this one) busy over `sample_s`; with
    `speed`, then how fast the machine did a fixed piece of work (`measure_speed`)."""
    before, ticks_before = all_processes_ms(), cpu_ticks()
    time.sleep(sample_s)
    after, ticks_after = all_processes_ms(), cpu_ticks()
    skip = exclude | {os.getpid()}
    shares = [(name, (ms - before[pid][1]) / (sample_s * 1000)) for pid, (name, ms) in after.items()
              if pid in before and pid not in skip]
    busy = tuple(sorted(((n, s) for n, s in shares if s > 0.02), key=lambda item: -item[1])[:6])
    deltas = [b - a for a, b in zip(ticks_before, ticks_after, strict=True)]
    steal_share = deltas[STEAL_FIELD] / sum(deltas) if sum(deltas) else 0.0
    return Look(load=os.getloadavg(), cpus=os.cpu_count() or 1, busy_processes=busy, steal_share=steal_share,
                speed=measure_speed() if speed else None)


SPEED_REPEATS = 5
INTERPRETER_LOOPS = 300_000
FORKS = 20
FORK_HEAP_MIB = 64


def measure_speed() -> Speed:
    """Time the fixed work `Speed` describes, in this process (a fraction of a second)."""
    def interpreter() -> None:
        total = 0
        for i in range(INTERPRETER_LOOPS):
            total += i * i

    heap = bytearray(FORK_HEAP_MIB << 20)
    heap[::4096] = b"x" * len(heap[::4096])  # touch every page, so each fork copies its page tables

    def forks() -> None:
        for _ in range(FORKS):
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)

    def on_every_cpu() -> None:
        children = []
        for _ in range(os.cpu_count() or 1):
            pid = os.fork()
            if pid == 0:
                interpreter()
                os._exit(0)
            children.append(pid)
        for pid in children:
            os.waitpid(pid, 0)

    return Speed(interpreter_ms=best_ms(interpreter), all_cpus_ms=best_ms(on_every_cpu), fork_ms=best_ms(forks))


def best_ms(work: Callable[[], None]) -> float:
    times = []
    for _ in range(SPEED_REPEATS):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000)
    return min(times)


STEAL_FIELD = 7  # /proc/stat's cpu line: user nice system idle iowait irq softirq steal guest guest_nice


def cpu_ticks() -> list[int]:
    """The whole machine's cpu time by kind (/proc/stat's first line), in clock ticks."""
    with open("/proc/stat") as stat:
        return [int(field) for field in stat.readline().split()[1:]]


def describe_load() -> str:
    return look().describe()
