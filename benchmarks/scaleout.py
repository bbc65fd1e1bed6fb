"""Scale-out (Redis): the latency the Redis hop adds over embedded mode, and throughput with 1 and 2 workers.

Run: .venv/bin/python benchmarks/scaleout.py [--latency N] [--rounds R] [--seconds S] [--concurrency C]
                                             [--markdown FILE]

All in one run, on this machine, default tiers, `print('hello')`. It starts a redis-server of its own on a
free loopback port and, as separate processes, an embedded API, a scale-out API with one worker and another
with two workers (each cluster under its own key prefix), all up for the whole run. Latency: N sequential
requests to the embedded and the one-worker API, alternating. Throughput: C concurrent keep-alive clients,
R rounds of S seconds per mode in rotation. Measuring in alternation spreads the machine's noise over every
mode; the load generator shares the cores with everything else, so the figures are ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
HELLO = {"code": "print('hello')"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary(samples_ms: list[float]) -> dict[str, float]:
    return {"n": len(samples_ms), "p50": statistics.median(samples_ms), "p95": percentile(samples_ms, 0.95),
            "p99": percentile(samples_ms, 0.99), "mean": statistics.fmean(samples_ms)}


class Processes:
    """Everything this run starts, stopped in reverse order."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 - the child keeps it
        process = subprocess.Popen(args, cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        self.started.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.started.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self.started)):
            self.stop(process)


def serve(procs: Processes, name: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = procs.start(name, [sys.executable, "-m", "warmpool", "serve", "--host", "127.0.0.1", "--port",
                                 str(port)], {**env, "WARMPOOL_INSTANCE_ID": f"bench-{name}"})
    return process, f"http://127.0.0.1:{port}"


def wait_until(url: str, check: Any, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=10) as client:
        while time.monotonic() < deadline:
            try:
                if check(client):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise SystemExit(f"{url} did not get ready in {timeout_s} s")


def ready(client: httpx.Client) -> bool:
    return client.get("/readyz").status_code == 200


def workers_serving(count: int) -> Any:
    return lambda client: all(t.get("workers") == count for t in client.get("/v1/tiers").json())


def measure_latency(urls: dict[str, str], count: int) -> dict[str, list[float]]:
    """Sequential requests, alternating between the services so that both see the same machine noise."""
    samples: dict[str, list[float]] = {name: [] for name in urls}
    clients = {name: httpx.Client(base_url=url, timeout=30) for name, url in urls.items()}
    try:
        for i in range(min(50, count) + count):  # the first 50 rounds warm connections and code paths
            for name, client in clients.items():
                started = time.perf_counter()
                response = client.post("/v1/execute", json=HELLO)
                elapsed_ms = (time.perf_counter() - started) * 1000
                if response.status_code != 200 or response.json()["stdout"] != "hello\n":
                    raise SystemExit(f"unexpected answer: {response.status_code} {response.text[:300]}")
                if i >= min(50, count):
                    samples[name].append(elapsed_ms)
    finally:
        for client in clients.values():
            client.close()
    return samples


async def _throughput(url: str, seconds: float, concurrency: int, warmup_s: float) -> dict[str, Any]:
    """`url` is a service's base URL, or ends in /healthz for the HTTP-only ceiling (no task at all)."""
    ceiling = url.endswith("/healthz")
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    done: list[float] = []
    errors: collections.Counter[int] = collections.Counter()
    by_worker: collections.Counter[str] = collections.Counter()
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def one_client(deadline: float) -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                if ceiling:
                    response = await client.get(url)
                    if response.status_code == 200:
                        done.append((time.perf_counter() - started) * 1000)
                        continue
                response = await client.post("/v1/execute", json=HELLO)
                if response.status_code == 200 and response.json()["status"] == "succeeded":
                    done.append((time.perf_counter() - started) * 1000)
                    by_worker[response.json().get("worker", "")] += 1
                else:
                    errors[response.status_code] += 1

        await asyncio.gather(*(one_client(time.perf_counter() + warmup_s) for _ in range(concurrency)))
        done.clear()
        errors.clear()
        by_worker.clear()
        started = time.perf_counter()
        await asyncio.gather(*(one_client(started + seconds) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"elapsed_s": elapsed, "samples": done, "errors": errors, "by_worker": by_worker}


def measure_throughput(urls: dict[str, str], rounds: int, seconds: float, concurrency: int) -> dict[str, Any]:
    """`rounds` rounds of `seconds` per service, in rotation, so that machine noise spreads over all of them."""
    totals: dict[str, dict[str, Any]] = {name: {"elapsed_s": 0.0, "samples": [], "errors": collections.Counter(),
                                                "by_worker": collections.Counter()} for name in urls}
    for round_ in range(rounds):
        for name, url in urls.items():
            part = asyncio.run(_throughput(url, seconds, concurrency, warmup_s=2.0 if round_ == 0 else 0.5))
            totals[name]["elapsed_s"] += part["elapsed_s"]
            totals[name]["samples"] += part["samples"]
            totals[name]["errors"].update(part["errors"])
            totals[name]["by_worker"].update(part["by_worker"])
    return {name: {"tasks_per_s": len(t["samples"]) / t["elapsed_s"], "completed": len(t["samples"]),
                   "errors": dict(t["errors"]), "latency": summary(t["samples"] or [0.0]),
                   "by_worker": dict(t["by_worker"])} for name, t in totals.items()}


def measure_redis_rtt(url: str, count: int = 300) -> dict[str, float]:
    """Round trips to the benchmark's redis-server, spaced like sequential requests (a few ms apart)."""
    import redis

    client = redis.Redis.from_url(url)
    samples = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            client.ping()
            samples.append((time.perf_counter() - started) * 1000)
            time.sleep(0.005)
    finally:
        client.close()
    return summary(samples)


def start_redis(procs: Processes, workdir: Path) -> str:
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is required (make redis installs it)")
    port = free_port()
    procs.start("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(workdir)], {})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return f"redis://127.0.0.1:{port}/0"
        time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Everything up at once (idle services cost little), then measured in alternation."""
    procs = Processes(workdir)
    try:
        _embedded, embedded_url = serve(procs, "embedded", {})
        redis_url = start_redis(procs, workdir)
        urls = {"embedded": embedded_url}
        for cluster, workers in (("1-worker", 1), ("2-workers", 2)):
            env = {"WARMPOOL_REDIS_URL": redis_url, "WARMPOOL_REDIS_PREFIX": f"bench-{cluster}"}
            for n in range(1, workers + 1):
                procs.start(f"{cluster}-worker-{n}", [sys.executable, "-m", "warmpool", "worker"],
                            {**env, "WARMPOOL_INSTANCE_ID": f"bench-{cluster}-worker-{n}"})
            _api, urls[cluster] = serve(procs, f"{cluster}-api", env)
        wait_until(embedded_url, ready)
        wait_until(urls["1-worker"], workers_serving(1))
        wait_until(urls["2-workers"], workers_serving(2))
        latency = measure_latency({"embedded": embedded_url, "scale-out": urls["1-worker"]}, args.latency)
        redis_rtt = measure_redis_rtt(redis_url)
        urls["healthz"] = f"{embedded_url}/healthz"
        throughput = measure_throughput(urls, args.rounds, args.seconds, args.concurrency)
    finally:
        procs.stop_all()
    return {"latency": {name: summary(samples) for name, samples in latency.items()}, "throughput": throughput,
            "redis_rtt": redis_rtt}


def render(results: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    emb, out = results["latency"]["embedded"], results["latency"]["scale-out"]
    lines = ["## Scale-out (Redis)", "", f"Command: `{command}`", "",
             f"Machine: {os.cpu_count()} cpus, {platform.python_implementation()} {platform.python_version()}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. The APIs, workers, redis-server, containers "
             "and the load generator all share these cpus; every service is up for the whole run and they are "
             "measured in alternation, so each sees the same machine noise.", "",
             f"Latency of `print('hello')`: {args.latency} sequential requests to each, alternating, one "
             "keep-alive client each:", "",
             "| mode | n | p50 ms | p95 ms | p99 ms | mean ms |", "| --- | --- | --- | --- | --- | --- |"]
    for name, stats in (("embedded (in-process pool)", emb), ("scale-out (API -> Redis -> 1 worker)", out)):
        lines.append(f"| {name} | {stats['n']:.0f} | {stats['p50']:.2f} | {stats['p95']:.2f} | {stats['p99']:.2f} "
                     f"| {stats['mean']:.2f} |")
    rtt = results["redis_rtt"]
    lines += ["", f"Added by the Redis hop: p50 {out['p50'] - emb['p50']:+.2f} ms, p99 {out['p99'] - emb['p99']:+.2f} "
                  "ms. A task crosses Redis five times (submit, the worker's read, mark running, store result, "
                  "the API's wake-up), four of them in sequence on the critical path; one loopback round trip "
                  f"to this redis-server, spaced like the requests, takes p50 {rtt['p50']:.2f} ms, p99 "
                  f"{rtt['p99']:.2f} ms here.", "",
              f"Throughput: {args.concurrency} concurrent keep-alive clients, {args.rounds} rounds of "
              f"{args.seconds:g} s per mode in rotation:", "",
              "| mode | tasks/s | completed | errors | p50 ms | p99 ms | tasks per worker |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, key in (("GET /healthz (no task: the HTTP ceiling here)", "healthz"), ("embedded", "embedded"),
                      ("scale-out, 1 worker", "1-worker"), ("scale-out, 2 workers", "2-workers")):
        t = results["throughput"][key]
        split = ", ".join(str(n) for _, n in sorted(t["by_worker"].items())) if "worker" in key else "-"
        lines.append(f"| {name} | {t['tasks_per_s']:.0f} | {t['completed']} | {t['errors'] or 0} "
                     f"| {t['latency']['p50']:.1f} | {t['latency']['p99']:.1f} | {split} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=int, default=1000, help="sequential requests per mode")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each throughput round")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per mode")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients in throughput runs")
    parser.add_argument("--markdown", type=Path, help="also append the section to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="warmpool-bench-") as tmp:
        results = run(args, Path(tmp))
    command = ("python benchmarks/scaleout.py " + " ".join(sys.argv[1:])).strip()
    section = render(results, args, command)
    print(section)
    if args.markdown:
        with args.markdown.open("a") as out:
            out.write(("\n" if out.tell() else "") + section)


if __name__ == "__main__":
    main()
