"""`make bench`: bounded headless locust sessions against servers started on loopback, plus latency.py.

Everything in RESULTS.md comes from one run of this script. The server (uvicorn, one process) is pinned
to cpu 0 and locust to cpu 1 with `taskset` where the machine has two or more cpus; the sandbox
containers are not pinned (they share both cpus, as they would in production).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import free_port, measure_cold, measure_exec, measure_warm, render, summary, wait_ready  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LOCUSTFILE = REPO / "benchmarks" / "locustfile.py"
PIN = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None


def pinned(cpu: int, command: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *command] if PIN else command


def instance_id_of(base_url: str) -> str:
    """The instance id `server` gave the server at `base_url` (its containers carry it as a label)."""
    return f"bench-{base_url.rsplit(':', 1)[1]}"


@contextmanager
def server(env_extra: dict[str, str], tiers: dict | None = None):
    port = free_port()
    instance_id = f"bench-{port}"
    env = {**os.environ, "WARMPOOL_INSTANCE_ID": instance_id, **env_extra}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as tiers_file:
        json.dump(tiers or {}, tiers_file)
    if tiers:
        env["WARMPOOL_TIERS_FILE"] = tiers_file.name
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115 - closed below
    process = subprocess.Popen(pinned(0, [sys.executable, "-m", "warmpool", "serve", "--host", "127.0.0.1",
                                          "--port", str(port)]), cwd=REPO, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base_url, timeout=10) as client:
            if not wait_ready(client, 300):
                log.seek(0)
                raise SystemExit(f"server did not become ready:\n{log.read()[-3000:]}")
        yield base_url, process.pid
    finally:
        process.terminate()
        process.wait(120)
        wait_until_removed(instance_id)
        os.unlink(tiers_file.name)
        log.close()
        os.unlink(log.name)


def wait_until_removed(instance_id: str, timeout_s: float = 120) -> None:
    """Let the engine finish removing a stopped server's containers before the next one starts."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=warmpool.instance={instance_id}"],
                                capture_output=True, text=True).stdout.split()
        if not listed:
            return
        time.sleep(1)


def locust(base_url: str, users: int, run_time_s: int, mix: str = "hello", ram: str | None = None) -> dict:
    """One bounded headless locust session; returns the aggregated row of its stats."""
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "run"
        env = {**os.environ, "WARMPOOL_MIX": mix}
        if ram:
            env["WARMPOOL_BENCH_RAM"] = ram
        subprocess.run(pinned(1, [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
                                  "-u", str(users), "-r", str(users), "-t", f"{run_time_s}s", "--host", base_url,
                                  "--csv", str(prefix), "--only-summary", "--stop-timeout", "5",
                                  "--exit-code-on-error", "0"]),
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=run_time_s + 60)
        with open(f"{prefix}_stats.csv") as stats:
            rows = {row["Name"]: row for row in csv.DictReader(stats)}
    row = rows["Aggregated"]
    return {"users": users, "mix": mix, "requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
            "rps": float(row["Requests/s"]), "p50": float(row["50%"]), "p95": float(row["95%"]),
            "p99": float(row["99%"]), "by_name": {k: v for k, v in rows.items() if k != "Aggregated"}}


def background_long_tasks(url: str, code: str, ram: str, clients: int, stop: threading.Event) -> list[str]:
    """Keep `clients` long tasks running in another tier until `stop` is set; returns their statuses."""
    statuses: list[str] = []

    def loop() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                body = client.post("/v1/execute", json={"code": code, "timeout_s": 30, "resources": {"ram": ram}})
                statuses.append(body.json().get("status", str(body.status_code)))

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    stop.wait()
    for thread in threads:
        thread.join(timeout=60)
    return statuses


def isolation(url: str, run_time_s: int) -> str:
    """p99 of short tasks on the smallest tier, alone and beside long tasks in the largest tier."""
    rows = [("alone", locust(url, 10, run_time_s))]
    for label, code in (("beside 2 long sleeping tasks (large tier)", "import time\ntime.sleep(3)"),
                        ("beside 2 long cpu-bound tasks (large tier, 2-cpu quota)",
                         "import time\nend = time.time() + 3\nwhile time.time() < end:\n    pass")):
        stop = threading.Event()
        thread = threading.Thread(target=background_long_tasks, args=(url, code, "1GiB", 2, stop))
        thread.start()
        time.sleep(1)
        rows.append((label, locust(url, 10, run_time_s)))
        stop.set()
        thread.join()
    base = rows[0][1]["p99"]
    lines = ["| short tasks (hello, nano tier, 10 users) | req/s | p50 ms | p99 ms | p99 vs alone |",
             "| --- | --- | --- | --- | --- |"]
    for label, r in rows:
        change = 100 * (r["p99"] / base - 1)
        lines.append(f"| {label} | {r['rps']:.0f} | {r['p50']:.0f} | {r['p99']:.0f} | {change:+.0f}% |")
    return "\n".join(lines)


# Every task needs a fresh container (max_uses 1).
FRESH_TIERS = {"tiers": [{"name": "fresh", "cpu": 0.5, "ram": "128MiB", "storage": "64MiB", "min_idle": 4,
                          "max_size": 8, "max_uses": 1}]}


def replacement_run(env_extra: dict[str, str], count: int) -> tuple[list[str], float, list[dict]]:
    """`count` tasks from 8 clients on FRESH_TIERS: their statuses, the seconds taken, /v1/tiers after."""
    with server({"WARMPOOL_LEASE_TIMEOUT_S": "30", **env_extra}, FRESH_TIERS) as (url, _):
        with httpx.Client(base_url=url, timeout=60) as client:
            def one(_: int) -> str:
                return str(client.post("/v1/execute", json={"code": "print(1)"}).json().get("status"))
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                statuses = list(pool.map(one, range(count)))
            elapsed_s = time.perf_counter() - started
            return statuses, elapsed_s, client.get("/v1/tiers").json()


def replacement_rate(count: int) -> str:
    """How many containers/s the pool replaces when every task needs a fresh one."""
    statuses, elapsed_s, admin_view = replacement_run({}, count)
    ok = statuses.count("succeeded")
    return (f"{count} tasks on a tier with `max_uses: 1` (every task gets a fresh container; 8 concurrent clients, "
            f"4 warm, at most 8): {ok} succeeded in {elapsed_s:.1f} s, i.e. **{count / elapsed_s:.1f} containers "
            f"replaced per second** (tier after the run: {admin_view[0]['idle']} idle).")


# Sections this script does not write: scaleout.py's, and the hand-measured cpu breakdown.
# The sections this script writes; every other section of RESULTS.md belongs to another benchmark script
# (scaleout.py, compare_images.py, ...) or was written by hand, and is kept as it is.
OWN_HEADINGS = ("## Load (locust", "## Tier isolation", "## Replacement rate", "## Cold mode", "## Latency of print")


def kept_sections(path: Path) -> str:
    """The sections of RESULTS.md that this script does not write, kept as they are, in their order."""
    if not path.exists():
        return ""
    text = path.read_text()
    starts = [i for i in range(len(text)) if text.startswith("## ", i) and (i == 0 or text[i - 1] == "\n")]
    kept = []
    for start, end in zip(starts, starts[1:] + [len(text)], strict=True):
        section = text[start:end]
        if not section.startswith(OWN_HEADINGS):
            kept.append(section.rstrip() + "\n")
    return "\n".join(kept)


def table(rows: list[dict]) -> str:
    lines = ["| mix | users | requests | failures | req/s | p50 ms | p95 ms | p99 ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['mix']} | {r['users']} | {r['requests']} | {r['failures']} | {r['rps']:.0f} | "
                     f"{r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-time", type=int, default=20, help="seconds per locust session")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    sections: list[str] = []

    load_rows = []
    with server({}) as (url, _):
        for users in (10, 50, 100):
            load_rows.append(locust(url, users, args.run_time))
            print(table(load_rows[-1:]), flush=True)
        load_rows.append(locust(url, 50, args.run_time, mix="mixed"))
    sections.append("## Load (locust, warm pool, default tiers)\n\n" + table(load_rows))

    with server({}) as (url, _):
        sections.append("## Tier isolation: short tasks beside long ones in another tier\n\n" +
                        isolation(url, args.run_time))
    sections.append("## Replacement rate\n\n" + replacement_rate(100))

    with server({"WARMPOOL_MODE": "cold"}) as (url, _):
        cold_rows = [locust(url, 10, args.run_time)]
    sections.append("## Cold mode (a container started per task), same locust settings\n\n" + table(cold_rows))

    warm = summary(measure_warm(1000))
    results = {"warm pool (HTTP, keep-alive)": warm, "docker run per task": summary(measure_cold(30)),
               "docker exec into a running container": summary(measure_exec(30))}
    sections.append("## Latency of print('hello'), one client (benchmarks/latency.py)\n\n" +
                    render(results, "python benchmarks/latency.py --warm 1000 --cold 30 --exec 30"))

    header = (f"# Benchmark results\n\nProduced by `make bench` (`python benchmarks/bench.py --run-time "
              f"{args.run_time}`) on {started}; {os.cpu_count()} cpus. Server pinned to cpu 0 and locust to cpu 1: "
              f"{'yes' if PIN else 'no (taskset missing or one cpu)'}; sandbox containers unpinned.\n")
    kept = kept_sections(args.output)
    args.output.write_text(header + "\n" + "\n\n".join(sections) + "\n" + ("\n" + kept if kept else ""))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
