"""Scale-out (Redis): the latency the Redis hop adds over embedded mode, and throughput with 1 and 2 workers.

Run: .venv/bin/python benchmarks/scaleout.py [--latency N] [--seconds S] [--concurrency C] [--markdown FILE]

All in one run, on this machine, default tiers, `print('hello')`: it starts a redis-server of its own on a
free loopback port, then (1) an embedded API, (2) an API and one worker, (3) the same API with a second
worker, each a separate process. Latency: N sequential requests through one keep-alive client. Throughput:
C concurrent keep-alive clients for S seconds. The load generator runs on the same cores as everything
else, so the figures are ratios within one run, not capacity claims.
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


def measure_latency(url: str, count: int) -> list[float]:
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(min(50, count)):  # warm the connection and both sides' code paths
            client.post("/v1/execute", json=HELLO)
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            response = client.post("/v1/execute", json=HELLO)
            samples.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200 or response.json()["stdout"] != "hello\n":
                raise SystemExit(f"unexpected answer: {response.status_code} {response.text[:300]}")
        return samples


async def _throughput(url: str, seconds: float, concurrency: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    done: list[float] = []
    errors: collections.Counter[int] = collections.Counter()
    by_worker: collections.Counter[str] = collections.Counter()
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def one_client(deadline: float) -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                response = await client.post("/v1/execute", json=HELLO)
                if response.status_code == 200 and response.json()["status"] == "succeeded":
                    done.append((time.perf_counter() - started) * 1000)
                    by_worker[response.json().get("worker", "")] += 1
                else:
                    errors[response.status_code] += 1

        await asyncio.gather(*(one_client(time.perf_counter() + 2) for _ in range(concurrency)))  # warm-up
        done.clear()
        errors.clear()
        by_worker.clear()
        started = time.perf_counter()
        await asyncio.gather(*(one_client(started + seconds) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"tasks_per_s": len(done) / elapsed, "completed": len(done), "errors": dict(errors),
            "latency": summary(done or [0.0]), "by_worker": dict(by_worker)}


def measure_throughput(url: str, seconds: float, concurrency: int) -> dict[str, Any]:
    return asyncio.run(_throughput(url, seconds, concurrency))


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
    procs = Processes(workdir)
    results: dict[str, Any] = {}
    try:
        embedded, url = serve(procs, "embedded", {})
        wait_until(url, ready)
        results["latency_embedded"] = summary(measure_latency(url, args.latency))
        results["throughput_embedded"] = measure_throughput(url, args.seconds, args.concurrency)
        procs.stop(embedded)

        redis_env = {"WARMPOOL_REDIS_URL": start_redis(procs, workdir), "WARMPOOL_REDIS_PREFIX": "bench"}
        procs.start("worker-1", [sys.executable, "-m", "warmpool", "worker"],
                    {**redis_env, "WARMPOOL_INSTANCE_ID": "bench-worker-1"})
        _api, url = serve(procs, "scaleout-api", redis_env)
        wait_until(url, workers_serving(1))
        results["latency_scaleout"] = summary(measure_latency(url, args.latency))
        results["throughput_1_worker"] = measure_throughput(url, args.seconds, args.concurrency)

        procs.start("worker-2", [sys.executable, "-m", "warmpool", "worker"],
                    {**redis_env, "WARMPOOL_INSTANCE_ID": "bench-worker-2"})
        wait_until(url, workers_serving(2))
        results["throughput_2_workers"] = measure_throughput(url, args.seconds, args.concurrency)
    finally:
        procs.stop_all()
    return results


def render(results: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    emb, out = results["latency_embedded"], results["latency_scaleout"]
    lines = ["## Scale-out (Redis)", "", f"Command: `{command}`", "",
             f"Machine: {os.cpu_count()} cpus, {platform.python_implementation()} {platform.python_version()}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; API, workers, redis-server, containers and "
             "the load generator all share these cpus.", "",
             f"Latency of `print('hello')`, {args.latency} sequential requests, one keep-alive client:", "",
             "| mode | n | p50 ms | p95 ms | p99 ms | mean ms |", "| --- | --- | --- | --- | --- | --- |"]
    for name, stats in (("embedded (in-process pool)", emb), ("scale-out (API -> Redis -> 1 worker)", out)):
        lines.append(f"| {name} | {stats['n']:.0f} | {stats['p50']:.2f} | {stats['p95']:.2f} | {stats['p99']:.2f} "
                     f"| {stats['mean']:.2f} |")
    lines += ["", f"Added by the Redis hop: p50 +{out['p50'] - emb['p50']:.2f} ms, p99 +{out['p99'] - emb['p99']:.2f} "
                  "ms.", "",
              f"Throughput, {args.concurrency} concurrent keep-alive clients for {args.seconds:g} s (after a 2 s "
              "warm-up):", "",
              "| mode | tasks/s | completed | errors | p50 ms | p99 ms | tasks per worker |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, key in (("embedded", "throughput_embedded"), ("scale-out, 1 worker", "throughput_1_worker"),
                      ("scale-out, 2 workers", "throughput_2_workers")):
        t = results[key]
        split = ", ".join(f"{n}" for _, n in sorted(t["by_worker"].items())) if key != "throughput_embedded" else "-"
        lines.append(f"| {name} | {t['tasks_per_s']:.0f} | {t['completed']} | {t['errors'] or 0} "
                     f"| {t['latency']['p50']:.1f} | {t['latency']['p99']:.1f} | {split} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=int, default=1000, help="sequential requests per mode")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each throughput run")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients in throughput runs")
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
