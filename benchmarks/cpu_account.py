"""Where the cpu goes: snapshots of /proc and of the sandboxes' cgroups (v1, as Docker's cgroupfs driver
lays them out here), and their difference per task.

A snapshot reads, for one server: the server process (utime/stime, its threads included), the client
(this process, os.times), each sandbox container's cgroup (cpuacct.usage and cpuacct.stat for user/system
time, cpu.stat for CFS throttling) and, inside it, the runner's PID 1 and the processes that live across
tasks (the template, its helpers) by /proc/<pid>/schedstat; the Docker daemon and each container's
containerd shim (every frame to and from a runner goes through them: the channel is an attached socket);
the whole machine (/proc/stat) and every other process, so the rest of the machine's load is named.
What the per-task processes (each task's child; under gVisor also the template's intermediate) cost is
the cgroup's total less the processes that lived through the run: they have exited by the time it ends.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
CPU_CGROUP = Path("/sys/fs/cgroup/cpu/docker")
CPUACCT_CGROUP = Path("/sys/fs/cgroup/cpuacct/docker")


def read_int(path: Path, default: int = 0) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def read_keyed(path: Path) -> dict[str, int]:
    """A `key value` file (cpu.stat, cpuacct.stat) as a dict; empty when it is gone."""
    try:
        return {key: int(value) for key, value in (line.split() for line in path.read_text().splitlines())}
    except (OSError, ValueError):
        return {}


def proc_stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 is the state); None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_cpu_ms(pid: int) -> tuple[float, float]:
    """(user, system) cpu ms of a live process, its threads included (clock-tick resolution)."""
    fields = proc_stat_fields(pid)
    if fields is None:
        return 0.0, 0.0
    return int(fields[11]) * 1000 / CLK_TCK, int(fields[12]) * 1000 / CLK_TCK


def schedstat_ms(pid: int) -> float:
    """On-cpu ms of a process's main thread (ns resolution); 0 when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e6
    except (OSError, ValueError, IndexError):
        return 0.0


def command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def machine_busy_ms() -> tuple[float, float]:
    """(busy, total) cpu ms of the whole machine since boot, from /proc/stat's first line."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return (total - idle) * 1000 / CLK_TCK, total * 1000 / CLK_TCK


def all_processes_ms() -> dict[int, tuple[str, float]]:
    """Every process's name and cpu ms (user+system) so far."""
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = proc_stat_fields(int(entry.name))
            if fields is not None:
                found[int(entry.name)] = (command_name(int(entry.name)),
                                          (int(fields[11]) + int(fields[12])) * 1000 / CLK_TCK)
    return found


def pids_named(name: str) -> list[int]:
    return [pid for pid, (comm, _) in all_processes_ms().items() if comm == name]


@dataclass
class ContainerSnap:
    usage_ms: float
    user_ms: float
    system_ms: float
    periods: int
    throttled: int
    throttled_ms: float
    pid1: int
    pid1_ms: float
    shim_pid: int
    shim_ms: float
    lasting_ms: dict[int, float]  # pid -> on-cpu ms of every process but PID 1 in the cgroup now


@dataclass
class Snapshot:
    server_ms: tuple[float, float]
    client_ms: tuple[float, float]
    machine_ms: tuple[float, float]
    dockerd_ms: dict[int, float]  # per daemon process (several engines may run)
    containers: dict[str, ContainerSnap]
    processes: dict[int, tuple[str, float]] = field(default_factory=dict)


def container_pids(instance_id: str) -> dict[str, int]:
    """Full container id -> host pid of its PID 1, for one server's running sandboxes."""
    ids = subprocess.run(["docker", "ps", "-q", "--no-trunc", "--filter", f"label=warmpool.instance={instance_id}"],
                         capture_output=True, text=True, check=True).stdout.split()
    if not ids:
        return {}
    lines = subprocess.run(["docker", "inspect", "-f", "{{.Id}} {{.State.Pid}}", *ids], capture_output=True,
                           text=True).stdout.split("\n")
    return {cid: int(pid) for cid, pid in (line.split() for line in lines if line.strip())}


def snap_container(container_id: str, pid1: int) -> ContainerSnap:
    cpu_stat = read_keyed(CPU_CGROUP / container_id / "cpu.stat")
    acct = read_keyed(CPUACCT_CGROUP / container_id / "cpuacct.stat")
    procs = [int(p) for p in (CPU_CGROUP / container_id / "cgroup.procs").read_text().split()] \
        if (CPU_CGROUP / container_id).exists() else []
    shim = proc_stat_fields(pid1)
    shim_pid = int(shim[1]) if shim else 0
    return ContainerSnap(
        usage_ms=read_int(CPUACCT_CGROUP / container_id / "cpuacct.usage") / 1e6,
        user_ms=acct.get("user", 0) * 1000 / CLK_TCK, system_ms=acct.get("system", 0) * 1000 / CLK_TCK,
        periods=cpu_stat.get("nr_periods", 0), throttled=cpu_stat.get("nr_throttled", 0),
        throttled_ms=cpu_stat.get("throttled_time", 0) / 1e6,
        pid1=pid1, pid1_ms=schedstat_ms(pid1), shim_pid=shim_pid, shim_ms=sum(process_cpu_ms(shim_pid)),
        lasting_ms={pid: schedstat_ms(pid) for pid in procs if pid != pid1})


def snapshot(server_pid: int, instance_id: str, with_processes: bool = True) -> Snapshot:
    times = os.times()
    dockerd = {pid: sum(process_cpu_ms(pid)) for pid in pids_named("dockerd")}
    return Snapshot(server_ms=process_cpu_ms(server_pid), client_ms=(times.user * 1000, times.system * 1000),
                    machine_ms=machine_busy_ms(), dockerd_ms=dockerd,
                    containers={cid: snap_container(cid, pid) for cid, pid in container_pids(instance_id).items()},
                    processes=all_processes_ms() if with_processes else {})


def per_task(before: Snapshot, after: Snapshot, tasks: int, own_pids: set[int]) -> dict[str, Any]:
    """Cpu ms per task of each part, CFS throttling over the run, and what the rest of the machine used.

    Only containers present in both snapshots count (one replaced during the run is left out, and named
    in `containers_lost`)."""
    both = [cid for cid in after.containers if cid in before.containers]
    sandbox = pid1 = lasting = shim = user = system = 0.0
    periods = throttled = 0
    throttled_ms = 0.0
    for cid in both:
        b, a = before.containers[cid], after.containers[cid]
        sandbox += a.usage_ms - b.usage_ms
        user += a.user_ms - b.user_ms
        system += a.system_ms - b.system_ms
        pid1 += a.pid1_ms - b.pid1_ms
        shim += a.shim_ms - b.shim_ms
        lasting += sum(a.lasting_ms[p] - b.lasting_ms[p] for p in a.lasting_ms if p in b.lasting_ms)
        periods += a.periods - b.periods
        throttled += a.throttled - b.throttled
        throttled_ms += a.throttled_ms - b.throttled_ms
    server = sum(after.server_ms) - sum(before.server_ms)
    client = sum(after.client_ms) - sum(before.client_ms)
    dockerd = sum(ms - before.dockerd_ms[pid] for pid, ms in after.dockerd_ms.items() if pid in before.dockerd_ms)
    busy = after.machine_ms[0] - before.machine_ms[0]
    wall_cpus_ms = after.machine_ms[1] - before.machine_ms[1]
    ours = server + client + sandbox + dockerd + shim
    return {
        "server": server / tasks, "server_sys": (after.server_ms[1] - before.server_ms[1]) / tasks,
        "client": client / tasks,
        "sandbox": sandbox / tasks, "sandbox_sys": system / tasks * (sandbox / (user + system) if user + system else 1),
        "runner_pid1": pid1 / tasks, "lasting": lasting / tasks, "per_task_procs": (sandbox - pid1 - lasting) / tasks,
        "dockerd": dockerd / tasks, "shims": shim / tasks,
        "others": (busy - ours) / tasks, "machine_busy_pct": 100 * busy / wall_cpus_ms if wall_cpus_ms else 0.0,
        "periods": periods, "throttled": throttled, "throttled_ms": throttled_ms,
        "containers": len(both), "containers_lost": len(before.containers) - len(both),
        "_others_top": top_others(before, after, own_pids | sandbox_side_pids(after)),
    }


def sandbox_side_pids(snap: Snapshot) -> set[int]:
    pids = {pid for c in snap.containers.values() for pid in (c.pid1, c.shim_pid)}
    pids.update(pid for c in snap.containers.values() for pid in c.lasting_ms)
    pids.update(pids_named("dockerd"))
    return pids


def top_others(before: Snapshot, after: Snapshot, exclude: set[int], count: int = 4) -> list[tuple[str, float]]:
    """The busiest processes over the interval that are not ours (name, cpu ms)."""
    used = []
    for pid, (name, ms) in after.processes.items():
        if pid in exclude or pid not in before.processes:
            continue
        delta = ms - before.processes[pid][1]
        if delta > 0:
            used.append((name, delta))
    return sorted(used, key=lambda item: -item[1])[:count]
