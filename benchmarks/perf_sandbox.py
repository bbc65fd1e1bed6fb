"""Where a sandbox's cpu goes, by process and by kernel path: `perf record` of one container's runner.

Run (root, perf installed): .venv/bin/python benchmarks/perf_sandbox.py [--image python] [--seconds 10]
It serves one tier of one container (1 cpu) of the image, sends 30 hello tasks to warm it, then records
cpu-clock samples (4 kHz, call graphs) of the runner's PID 1 and the template, and of everything they fork
from then on (perf follows children: the task children, and under gVisor the intermediates), while one keep-alive
client sends hello tasks for `--seconds`. Prints the sandbox cpu per task, its share by process (PID 1,
the template, the processes forked per task) and by path (fork, page faults and of them copy-on-write,
the interpreter), from `perf report`.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_account import container_pids  # noqa: E402
from serving import instance_id_of, server  # noqa: E402

FREQUENCY_HZ = 4000
# (label, symbol as perf names it): the share of samples with that symbol on their stack.
PATHS = (("fork (copy_process: page tables, vmas)", "copy_process"),
         ("... of which copy_page_range", "copy_page_range"),
         ("page faults (all)", "exc_page_fault"), ("... of which copy-on-write (do_wp_page)", "do_wp_page"),
         ("process exit", "do_exit"), ("the interpreter (_PyEval_EvalFrameDefault)", "_PyEval_EvalFrameDefault"),
         ("pipe writes", "anon_pipe_write"), ("mkdir", "do_mkdirat"), ("openat", "do_sys_openat2"))


def tiers_for(image: str) -> dict[str, Any]:
    ram = "256MiB" if image == "python" else "1GiB"
    return {"tiers": [{"name": "one", "image": image, "cpu": 1, "ram": ram, "storage": "64MiB", "min_idle": 1,
                       "max_size": 1}]}


def record(image: str, seconds: float, data: Path) -> tuple[int, int, int]:
    """(tasks sent while recording, PID 1's host pid, the template's)."""
    body = {"code": "print('hello')", **({"image": image} if image != "python" else {})}
    with server({}, tiers_for(image)) as (url, _):
        ((_, pid1),) = container_pids(instance_id_of(url)).items()
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(30):
                client.post("/v1/execute", json=body)
            # The template is PID 1's oldest child (the waiting task child is a younger one, and changes).
            template = int(subprocess.run(["pgrep", "-o", "-P", str(pid1)], capture_output=True, text=True,
                                          check=True).stdout.split()[0])
            recorder = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", str(FREQUENCY_HZ), "-g",
                                         "-o", str(data), "-p", f"{pid1},{template}"])
            time.sleep(0.5)
            tasks, stop_at = 0, time.monotonic() + seconds
            while time.monotonic() < stop_at:
                answer = client.post("/v1/execute", json=body).json()
                if answer.get("status") != "succeeded":
                    raise SystemExit(f"unexpected answer: {answer}")
                tasks += 1
            recorder.send_signal(signal.SIGINT)
            recorder.wait(60)
    return tasks, pid1, template


def report(data: Path, *args: str) -> str:
    return subprocess.run(["perf", "report", "-i", str(data), "--stdio", "-g", "none", *args],
                          capture_output=True, text=True, check=True).stdout


def cpu_ms_in(data: Path) -> float:
    """The cpu time recorded: cpu-clock's event count is in nanoseconds."""
    found = re.search(r"# Event count \(approx.\): (\d+)", report(data, "--sort", "pid"))
    return int(found.group(1)) / 1e6 if found else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="python")
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        tasks, pid1, template = record(args.image, args.seconds, data)
        total_ms = cpu_ms_in(data)
        by_pid = {int(m.group(2)): float(m.group(1)) for m in
                  re.finditer(r"^\s+([\d.]+)%\s+(\d+):", report(data, "--no-children", "--sort", "pid"), re.M)}
        by_symbol = {m.group(2): float(m.group(1)) for m in
                     re.finditer(r"^\s+([\d.]+)%\s+[\d.]+%\s+\[[.k]\]\s+(\S+)",
                                 report(data, "--children", "--sort", "sym"), re.M)}
    cpu_ms = total_ms / max(1, tasks)
    print(f"image {args.image}: {tasks} hello tasks in {args.seconds:g} s, one keep-alive client, "
          f"{total_ms:.0f} ms of sandbox cpu sampled at {FREQUENCY_HZ} Hz: {cpu_ms:.2f} ms per task\n")
    print("| part | share of the sandbox's cpu | ms per task |\n| --- | --- | --- |")
    per_task = 100 - by_pid.get(pid1, 0) - by_pid.get(template, 0)
    for label, share in (("runner PID 1", by_pid.get(pid1, 0)), ("template (forks the task children)",
                                                                  by_pid.get(template, 0)),
                         ("per-task processes (the task's child)", per_task)):
        print(f"| {label} | {share:.1f}% | {share * cpu_ms / 100:.2f} |")
    for label, symbol in PATHS:
        share = by_symbol.get(symbol, 0.0)
        print(f"| {label} | {share:.1f}% | {share * cpu_ms / 100:.2f} |")


if __name__ == "__main__":
    main()
