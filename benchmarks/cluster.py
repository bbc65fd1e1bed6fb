"""Cluster operations on two Docker engines: time from an admin PATCH to warm containers on both workers, and
the time a SIGKILLed worker's in-flight task takes to be answered (detection), with the default settings.

Run: .venv/bin/python benchmarks/cluster.py [--resizes N] [--kills N] [--markdown FILE]

It starts the second engine (scripts/ensure-docker2.sh), a redis-server of its own on a free loopback port,
an API and two workers as separate processes, one per engine, each with --metrics-port. Resize: tier "two"
(256 MiB) goes from min_idle 1 to 4 on both workers at once (warming off, so min_idle is the target); the
time runs from sending the PATCH until both workers' /metrics show 4 idle and none starting (polled every
20 ms), and the PATCH's own answer time (the workers' confirmations) is given beside it; then back to 1.
Kill: an async task that sleeps is submitted, the worker that marked it running is SIGKILLed, and the time
runs until the task's answer (`worker lost`) can be read (polled every 20 ms); then a fresh worker takes
the dead one's place on its engine (and removes what it left there). `--markdown` replaces (or appends)
the section "Cluster operations" of that file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_section import replace_section  # noqa: E402
from scaleout import Processes, free_port, serve, start_redis, wait_until  # noqa: E402
from serving import ADMIN_KEY  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOCKER2 = "unix:///run/warmpool-docker2.sock"
HEADING = "## Cluster operations (two engines)"
TIERS = {"tiers": [
    {"name": "one", "cpu": 0.5, "ram": "96MiB", "storage": "32MiB", "min_idle": 1, "max_size": 2},
    {"name": "two", "cpu": 1, "ram": "256MiB", "storage": "128MiB", "min_idle": 1, "max_size": 6},
]}
POLL_S = 0.02


class Worker:
    def __init__(self, procs: Processes, env: dict[str, str], name: str, engine: str | None) -> None:
        self.name = name
        self.engine = engine
        self.port = free_port()
        extra = {"WARMPOOL_INSTANCE_ID": name, **({"DOCKER_HOST": engine} if engine else {})}
        self.process = procs.start(name, [sys.executable, "-m", "warmpool", "worker", "--metrics-port",
                                          str(self.port)], {**env, **extra})
        self.metrics = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=5)

    def idle_and_starting(self, tier: str) -> tuple[float, float]:
        found = {"idle": -1.0, "starting": -1.0}
        for line in self.metrics.get("/metrics").text.splitlines():
            if line.startswith("warmpool_containers{") and f'tier="{tier}"' in line:
                for state in found:
                    if f'state="{state}"' in line:
                        found[state] = float(line.rsplit(" ", 1)[1])
        return found["idle"], found["starting"]


def wait_warm(workers: list[Worker], idle: int, timeout_s: float = 120) -> float:
    started = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if all(w.idle_and_starting("two") == (idle, 0) for w in workers):
                return time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(POLL_S)
    raise SystemExit(f"the workers did not reach {idle} idle in {timeout_s} s")


def measure_resizes(api: httpx.Client, workers: list[Worker], runs: int) -> dict[str, list[float]]:
    warm_s, answer_s = [], []
    for _ in range(runs):
        started = time.perf_counter()
        response = api.patch("/v1/admin/pools/two", json={"min_idle": 4})
        answered = time.perf_counter() - started
        body = response.json()
        if response.status_code != 200 or {w["status"] for w in body["workers"]} != {"applied"}:
            raise SystemExit(f"resize failed: {response.status_code} {response.text[:300]}")
        wait_warm(workers, 4)
        warm_s.append(time.perf_counter() - started)
        answer_s.append(answered)
        api.patch("/v1/admin/pools/two", json={"min_idle": 1})
        wait_warm(workers, 1)
    return {"warm_s": warm_s, "answer_s": answer_s}


def running_worker(task_id: str, redis_url: str, prefix: str) -> str | None:
    out = subprocess.run(["redis-cli", "-u", redis_url, "hget", f"{prefix}:task:{task_id}", "worker"],
                         capture_output=True, text=True, check=False).stdout.strip()
    return out or None


def measure_kills(procs: Processes, env: dict[str, str], api: httpx.Client, workers: list[Worker], runs: int,
                  redis_url: str, prefix: str) -> list[float]:
    detect_s = []
    for run in range(runs):
        task = api.post("/v1/tasks", json={"code": "import time; time.sleep(30)", "resources": {"ram": "200MiB"},
                                           "timeout_s": 40}).json()
        deadline = time.monotonic() + 30
        owner = None
        while owner is None and time.monotonic() < deadline:
            owner = running_worker(task["id"], redis_url, prefix)
            time.sleep(POLL_S)
        (victim,) = [w for w in workers if w.name == owner]
        time.sleep(0.5)  # mid-task, not at its very start
        victim.process.send_signal(signal.SIGKILL)
        killed = time.perf_counter()
        victim.process.wait()
        while True:
            body = api.get(f"/v1/tasks/{task['id']}").json()
            if body["status"] not in ("queued", "running"):
                break
            if time.perf_counter() - killed > 60:
                raise SystemExit("the dead worker's task was not answered within 60 s")
            time.sleep(POLL_S)
        detect_s.append(time.perf_counter() - killed)
        if not body.get("message", "").startswith("worker lost"):
            raise SystemExit(f"unexpected answer: {body}")
        procs.started.remove(victim.process)
        workers.remove(victim)
        fresh = Worker(procs, env, f"{victim.name.rsplit('-', 1)[0]}-{run + 2}", victim.engine)
        workers.append(fresh)
        wait_until(str(api.base_url), lambda c: all(t["workers"] == 2 for t in c.get("/v1/tiers").json()))
        wait_warm(workers, 1)
    return detect_s


def stats(samples: list[float]) -> str:
    return (f"p50 {statistics.median(samples):.2f} s, max {max(samples):.2f} s "
            f"(n={len(samples)}: {', '.join(f'{s:.2f}' for s in samples)})")


def render(results: dict[str, Any], command: str) -> str:
    load = os.getloadavg()
    return "\n".join([
        HEADING, "",
        f"Command: `{command}` ({results['when']}, {platform.machine()}, {os.cpu_count()} cpus, load average "
        f"before {results['load_before']}, after {load[0]:.2f}). One API, two workers (one per Docker engine on "
        "this machine), default heartbeat (1 s) and visibility timeout (3 s), warming off.",
        "",
        "| what | figure |",
        "| --- | --- |",
        f"| PATCH `min_idle` 1 → 4 of tier two, until both workers hold 4 warm (3 new containers each) | "
        f"{stats(results['resize']['warm_s'])} |",
        f"| the PATCH's own answer (both workers confirmed) | {stats(results['resize']['answer_s'])} |",
        f"| SIGKILLed worker: kill → its in-flight task answered `worker lost` | {stats(results['kills'])} |",
        "",
        "Detection is the beat's expiry (three 1 s beats) or the entry's idle time (3 s), whichever is later, "
        "plus up to one claim round (0.5 s). Before issue 14 (visibility timeout 10 s, idle entries looked "
        "for every 5 s) it was about 13 s.",
        "",
    ])




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resizes", type=int, default=5)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    subprocess.run(["bash", str(REPO / "scripts" / "ensure-docker2.sh"), "start"], check=True)
    results: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "load_before": f"{os.getloadavg()[0]:.2f}"}
    with tempfile.TemporaryDirectory(prefix="warmpool-cluster-bench-") as tmp:
        workdir = Path(tmp)
        tiers = workdir / "tiers.json"
        tiers.write_text(json.dumps(TIERS))
        procs = Processes(workdir)
        try:
            redis_url = start_redis(procs, workdir)
            prefix = "bench-cluster"
            env = {"WARMPOOL_REDIS_URL": redis_url, "WARMPOOL_REDIS_PREFIX": prefix, "WARMPOOL_TIERS_FILE": str(tiers),
                   "WARMPOOL_WARMING": "off", "WARMPOOL_ADMIN_KEY": ADMIN_KEY}
            workers = [Worker(procs, env, "bench-a-1", None), Worker(procs, env, "bench-b-1", DOCKER2)]
            _api, url = serve(procs, "api", env)
            wait_until(url, lambda c: all(t["workers"] == 2 for t in c.get("/v1/tiers").json()))
            wait_warm(workers, 1)
            with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as api:
                results["resize"] = measure_resizes(api, workers, args.resizes)
                print(stats(results["resize"]["warm_s"]), flush=True)
                results["kills"] = measure_kills(procs, env, api, workers, args.kills, redis_url, prefix)
                print(stats(results["kills"]), flush=True)
        finally:
            procs.stop_all()
    command = "python benchmarks/cluster.py " + " ".join(sys.argv[1:])
    section = render(results, command.strip())
    print(section)
    if args.markdown:
        replace_section(args.markdown, HEADING, section)


if __name__ == "__main__":
    main()
