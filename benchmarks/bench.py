"""`make bench`: every figure of issue 15 in one run, each section with the machine's state before it.

Sections (each a fresh server on loopback, default tiers unless said): for each image (python, then
datascience) one keep-alive client's latency, closed loops of 10, 50 and 100 locust users with keep-alive
and 50 with a new connection per request, then an open loop at 60% of the best closed-loop rate; a
runsc tier beside a runc one; short tasks beside long ones in another tier; the replacement rate; cold
mode; `docker run` and `docker exec` per task; and where the cpu goes (benchmarks/breakdown.py). The
server is pinned to cpu 0 and the load generators to cpu 1 (load.py); the containers are not pinned.
So that a figure is not one moment of a shared machine: one-client figures are medians of 3 runs, the
replacement rate and the breakdown medians of 3 rounds; the open loop runs on a freshly drained tier
(no max_uses replacement inside it), and each load row counts the containers started while it ran.
`benchmarks/reproduce.py` compares two runs' figures.

Before each section, benchmarks/machine.py looks at the load average, steal and the busy processes, and
times a fixed piece of work (machine.Speed); the section says what it saw. When the machine was busy
before any section, RESULTS.md is left alone and the run is written to RESULTS.busy.md, unless
--allow-busy (then the busy sections are marked in RESULTS.md).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import breakdown  # noqa: E402
import load  # noqa: E402
from latency import measure_cold, measure_exec, measure_warm, render, summary  # noqa: E402
from load import locust  # noqa: E402
from machine import look  # noqa: E402
from report import Section, destination, kept_sections  # noqa: E402
from serving import ADMIN_KEY, REPO, fresh_containers, pool_counters, server  # noqa: E402


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
    lines = ["| short tasks (hello, nano tier; locust FastHttpUser x10, keep-alive) | req/s | p50 ms | p99 ms "
             "| p99 vs alone |",
             "| --- | --- | --- | --- | --- |"]
    for label, r in rows:
        change = 100 * (r["p99"] / base - 1)
        lines.append(f"| {label} | {r['rps']:.0f} | {r['p50']:.0f} | {r['p99']:.0f} | {change:+.0f}% |")
    return "\n".join(lines)


# Every task needs a fresh container (max_uses 1).
FRESH_MIN_IDLE = 4
FRESH_TIERS = {"tiers": [{"name": "fresh", "cpu": 0.5, "ram": "128MiB", "storage": "64MiB", "min_idle": FRESH_MIN_IDLE,
                          "max_size": 8, "max_uses": 1}]}
# The same for the datascience image: its idle interpreter holds ~75 MiB, so the tier gets more memory.
FRESH_TIERS_BY_IMAGE = {"python": FRESH_TIERS,
                        "datascience": {"tiers": [{**FRESH_TIERS["tiers"][0], "ram": "512MiB",
                                                   "image": "datascience"}]}}


def replacement_run(env_extra: dict[str, str], count: int, image: str = "python",
                    rounds: int = 1) -> tuple[list[str], list[float], list[dict[str, Any]]]:
    """`rounds` times `count` tasks from 8 clients on a max_uses=1 tier of `image`, in one server: their
    statuses, the seconds each round took, /v1/tiers after."""
    with server({"WARMPOOL_LEASE_TIMEOUT_S": "30", **env_extra}, FRESH_TIERS_BY_IMAGE[image]) as (url, _):
        with httpx.Client(base_url=url, timeout=60) as client:
            def one(_: int) -> str:
                body = {"code": "print(1)", **({} if image == "python" else {"image": image})}
                return str(client.post("/v1/execute", json=body).json().get("status"))
            statuses: list[str] = []
            elapsed_s: list[float] = []
            for _ in range(rounds):
                wait_idle(client, FRESH_MIN_IDLE)
                started = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(8) as pool:
                    statuses += pool.map(one, range(count))
                elapsed_s.append(time.perf_counter() - started)
            return statuses, elapsed_s, client.get("/v1/tiers").json()


def wait_idle(client: httpx.Client, idle: int, timeout_s: float = 120) -> None:
    """Until the (only) tier has `idle` warm containers: each round starts from the same warm pool."""
    deadline_s = time.monotonic() + timeout_s
    while client.get("/v1/tiers").json()[0]["idle"] < idle and time.monotonic() < deadline_s:
        time.sleep(0.2)


# The rate is the median over this many rounds in one server (one round of 100 moved by a fifth between
# two `make bench` runs); every round's rate stands beside it.
REPLACEMENT_ROUNDS = 3


def replacement_rate(count_by_image: dict[str, int]) -> str:
    """How many containers/s the pool replaces when every task needs a fresh one, on each image."""
    lines = []
    for image, count in count_by_image.items():
        statuses, elapsed_s, admin_view = replacement_run({}, count, image, REPLACEMENT_ROUNDS)
        ok = statuses.count("succeeded")
        rates = [count / s for s in elapsed_s]
        rate = statistics.median(rates)
        lines.append(
            f"- `{image}`: {REPLACEMENT_ROUNDS} rounds of {count} tasks on a tier with `max_uses: 1` (every task "
            f"gets a fresh container; client: 8 threads sharing one httpx.Client, keep-alive; 4 warm, at most 8; "
            f"each round starts once 4 are warm): {ok} of {len(statuses)} succeeded; rounds "
            f"{', '.join(f'{r:.1f}' for r in rates)}/s, median **{rate:.1f} containers replaced per second** "
            f"(tier after the run: {admin_view[0]['idle']} idle). Target (issue 15): >= "
            f"{TARGET_REPLACEMENTS_PER_S:g}/s {verdict(rate >= TARGET_REPLACEMENTS_PER_S)}.")
    return "\n".join(lines)


# Targets of issue 15 (this machine, one run).
TARGET_KEEP_ALIVE_PER_S = 500
TARGET_NEW_CONNECTION_PER_S = 400
TARGET_ONE_CLIENT_P50_MS, TARGET_ONE_CLIENT_P99_MS = 3.0, 10.0
TARGET_OPEN_LOOP_P99_MS = 20.0
TARGET_REPLACEMENTS_PER_S = 10.0
OPEN_LOOP_SHARE = 0.6
WARMUP_S = 10


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def image_load(image: str, run_time_s: int, one_client_count: int) -> str:
    """One server, default tiers, tasks on `image`: one client, closed loops, then the open loop."""
    ask = None if image == "python" else image
    with server({"WARMPOOL_ADMIN_KEY": ADMIN_KEY}) as (url, _):
        single = load.one_client(url, one_client_count, ask)
        # Not recorded: under load the pool starts more containers of the tier (demand warming), which costs
        # cpu; without this the first closed loop measured that growth (a first run after a start gave
        # half the rate of a second one, whichever client it was).
        locust(url, 100, WARMUP_S, image=ask)

        def counted(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
            """A load run, with the containers the tier started (and replaced) while it ran."""
            created_before, replaced_before = pool_counters(url, single["tier"])
            row = run()
            created_after, replaced_after = pool_counters(url, single["tier"])
            return row | {"started_during": created_after - created_before,
                          "replaced_during": replaced_after - replaced_before}

        closed = [counted(functools.partial(locust, url, users, run_time_s, image=ask)) for users in (10, 50, 100)]
        closed.append(counted(functools.partial(locust, url, 50, run_time_s, image=ask, keep_alive=False)))
        if image == "python":
            closed.append(counted(functools.partial(locust, url, 50, run_time_s, mix="mixed")))
        capacity = max(r["rps"] for r in closed if r["keep_alive"] and r["mix"] == "hello")
        fresh = fresh_containers(url, single["tier"])
        opened = counted(functools.partial(load.open_loop, url, OPEN_LOOP_SHARE * capacity, run_time_s, ask))
        opened.update(capacity=capacity, fresh=fresh)
    best_new = max(r["rps"] for r in closed if not r["keep_alive"])
    failures = sum(r["failures"] for r in closed) + opened["failures"]
    targets = (f"Targets (issue 15): >= {TARGET_KEEP_ALIVE_PER_S}/s keep-alive: {capacity:.0f}/s "
               f"{verdict(capacity >= TARGET_KEEP_ALIVE_PER_S)}; >= {TARGET_NEW_CONNECTION_PER_S}/s with a new "
               f"connection per request: {best_new:.0f}/s {verdict(best_new >= TARGET_NEW_CONNECTION_PER_S)}; "
               f"one client p50 <= {TARGET_ONE_CLIENT_P50_MS:g} ms and p99 <= {TARGET_ONE_CLIENT_P99_MS:g} ms: "
               f"{single['p50']:.2f} / {single['p99']:.2f} ms "
               f"{verdict(single['p50'] <= TARGET_ONE_CLIENT_P50_MS and single['p99'] <= TARGET_ONE_CLIENT_P99_MS)}; "
               f"open loop at {100 * OPEN_LOOP_SHARE:.0f}% p99 <= {TARGET_OPEN_LOOP_P99_MS:g} ms: "
               f"{opened['p99']:.1f} ms {verdict(opened['p99'] <= TARGET_OPEN_LOOP_P99_MS)}; failures: {failures}.")
    return "\n\n".join([
        f"Tasks: `print('hello')` on the {image} image (mixed: the locustfile's mix), default tiers, one server; "
        f"the closed loops follow an unrecorded {WARMUP_S} s one of 100 users, so the tier has grown first.",
        "One client:\n\n" + load.one_client_table([single]),
        "Closed loop (locust; each user sends its next request when the answer came, so at saturation the "
        "rate is the capacity and the wait is users / rate):\n\n" + load.closed_table(closed),
        f"Open loop at {100 * OPEN_LOOP_SHARE:.0f}% of the best keep-alive closed-loop rate above, on fresh "
        f"containers: the tier was drained first ({fresh} replaced) and settled, so that none wears out "
        "(max_uses) inside the loop wherever the closed loops left their use counts (what a replacement "
        "costs the tasks beside it: \"Open loop tail\" below):\n\n"
        + load.open_table([opened]),
        targets])


def runtime_tiers(runtime: str) -> dict[str, Any]:
    # gVisor's Sentry needs more memory than the task (tests/hostile/conftest.py sizes it the same way).
    ram = "128MiB" if runtime == "runc" else "1GiB"
    return {"tiers": [{"name": f"nano-{runtime}", "cpu": 0.5, "ram": ram, "storage": "128MiB", "min_idle": 4,
                       "max_size": 16, "runtime": runtime, "pids_limit": 64}]}


RUNTIMES = ("runc", "runsc")


def runsc_beside_runc(run_time_s: int, count: int) -> str:
    with contextlib.ExitStack() as servers:
        urls = {runtime: servers.enter_context(server({}, runtime_tiers(runtime)))[0] for runtime in RUNTIMES}
        runs: dict[str, list[dict[str, float]]] = {runtime: [] for runtime in RUNTIMES}
        for _ in range(load.ONE_CLIENT_RUNS):  # alternated: a drift of the machine falls on both runtimes
            for runtime in RUNTIMES:
                runs[runtime] += load.one_client(urls[runtime], count, runs=1)["runs"]
        rows = [load.combined({"image": "python", "tier": f"nano-{runtime} (0.5 cpu)", "n": count}, runs[runtime])
                for runtime in RUNTIMES]
        closed = []
        for runtime in RUNTIMES:
            row = locust(urls[runtime], 20, run_time_s)
            row["image"] = f"python, nano-{runtime}"
            closed.append(row)
    ratio = rows[1]["p50"] / rows[0]["p50"]
    return "\n\n".join([
        "Each runtime in its own server (both up at once), one tier of 0.5 cpu, 4 warm (runsc's with 1 GiB: the "
        "Sentry's own memory); the one-client runs alternate between the two servers.",
        load.one_client_table(rows), load.closed_table(closed),
        f"runsc/runc: one-client p50 x{ratio:.1f}, throughput x{closed[1]['rps'] / closed[0]['rps']:.2f}."])


BREAKDOWN_ROUNDS = 3  # medians over rounds, tiers alternated: one round's server cpu moved by a fifth between runs


def where_the_time_goes(count: int) -> str:
    bodies: dict[str, dict[str, Any]] = {"nano (default request)": breakdown.HELLO,
              "small (`\"cpu\": 1`)": {**breakdown.HELLO, "resources": {"cpu": 1}}}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in bodies}
    for _ in range(BREAKDOWN_ROUNDS):
        for name, body in bodies.items():
            results[name].append(breakdown.measure({}, None, body, count, REPO) | {"requests": count})
    return breakdown.render(results, f"benchmarks/bench.py (breakdown.measure, {count} requests per tier and round)",
                            "")


def isolation_section(run_time_s: int) -> str:
    with server({}) as (url, _):
        return isolation(url, run_time_s)


def cold_section(run_time_s: int) -> str:
    with server({"WARMPOOL_MODE": "cold"}) as (url, _):
        return load.closed_table([locust(url, 10, run_time_s)])


def latency_section() -> str:
    results = {"warm pool (HTTP, keep-alive)": summary(measure_warm(1000)),
               "docker run per task": summary(measure_cold(30)),
               "docker exec into a running container": summary(measure_exec(30))}
    return render(results, "python benchmarks/latency.py --warm 1000 --cold 30 --exec 30")


SECTION_HEADINGS = {
    "python": "## Load on the python image (default tiers)",
    "datascience": "## Load on the datascience image (default tiers)",
    "runsc": "## runsc beside runc",
    "isolation": "## Tier isolation: short tasks beside long ones in another tier",
    "replacement": "## Replacement rate",
    "cold": "## Cold mode (a container started per task)",
    "latency": "## Latency of print('hello'), one client (benchmarks/latency.py)",
    "breakdown": "## Where the time goes (benchmarks/breakdown.py, from make bench)",
}
# Headings this script wrote before (replaced by the ones above when it runs); every other section of
# RESULTS.md belongs to another script or was written by hand, and is kept as it is.
OLD_HEADINGS = ("## Load (locust", "## Cold mode", "## Latency of print")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-time", type=int, default=60, help="seconds per load session (issue 15: 60)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    parser.add_argument("--allow-busy", action="store_true", help="write RESULTS.md even when the machine was busy "
                        "before a section (the section is marked)")
    parser.add_argument("--only", nargs="+", choices=sorted(SECTION_HEADINGS), help="run these sections only")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # stop the servers on the way out
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    short_s = min(args.run_time, 20)
    work: dict[str, Callable[[], str]] = {
        "python": lambda: image_load("python", args.run_time, 2000),
        "datascience": lambda: image_load("datascience", args.run_time, 2000),
        "runsc": lambda: runsc_beside_runc(short_s, 500),
        "isolation": lambda: isolation_section(short_s),
        "replacement": lambda: replacement_rate({"python": 100, "datascience": 30}),
        "cold": lambda: cold_section(short_s),
        "latency": latency_section,
        "breakdown": lambda: where_the_time_goes(600),
    }
    sections = []
    for key in args.only or list(work):
        before = look(speed=True)
        print(f"{SECTION_HEADINGS[key]}: machine before: {before.describe()}", flush=True)
        section = Section(SECTION_HEADINGS[key], work[key](), before)
        print(section.render(), flush=True)
        sections.append(section)
    path, why = destination(args.output, sections, args.allow_busy)
    header = (f"# Benchmark results\n\nProduced by `make bench` (`python benchmarks/bench.py {' '.join(sys.argv[1:])}`"
              f") from {started}; {os.cpu_count()} cpus. Server pinned to cpu 0 and the load generators to cpu 1: "
              f"{'yes' if load.PIN else 'no (taskset missing or one cpu)'}; sandbox containers unpinned. {why}.\n")
    kept = kept_sections(args.output, tuple(s.heading for s in sections) + OLD_HEADINGS)
    path.write_text(header + "\n" + "\n".join(s.render() for s in sections) + ("\n" + kept if kept else ""))
    print(f"wrote {path}: {why}")
    if path != args.output:
        sys.exit(3)


if __name__ == "__main__":
    main()
