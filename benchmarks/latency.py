"""Latency of `print('hello')`: warm pool through HTTP vs a container per task vs `docker exec`.

Run: .venv/bin/python benchmarks/latency.py [--warm N] [--cold N] [--exec N] [--markdown FILE]
It starts `warmpool serve` on a loopback port (embedded mode, default tiers), measures with a keep-alive
client, then measures `docker run --rm` and `docker exec` with the same image, all in one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("WARMPOOL_IMAGE", "warmpool-runner:latest")
HELLO = "print('hello')"


def percentile(samples_ms: list[float], fraction: float) -> float:
    ordered = sorted(samples_ms)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary(samples_ms: list[float]) -> dict[str, float]:
    return {"n": len(samples_ms), "p50": statistics.median(samples_ms), "p95": percentile(samples_ms, 0.95),
            "p99": percentile(samples_ms, 0.99), "mean": statistics.fmean(samples_ms)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(client: httpx.Client, timeout_s: float) -> bool:
    """Poll /readyz until it answers 200; False when it did not within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.get("/readyz").status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return False


def measure_warm(count: int, env_extra: dict[str, str] | None = None) -> list[float]:
    port = free_port()
    env = {**os.environ, **(env_extra or {})}
    server = subprocess.Popen([sys.executable, "-m", "warmpool", "serve", "--host", "127.0.0.1", "--port",
                               str(port)], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            if not wait_ready(client, 120):
                raise SystemExit("server did not become ready")
            body = {"code": HELLO}
            for _ in range(min(50, count)):  # warm the client connection and the server's code paths
                client.post("/v1/execute", json=body)
            samples = []
            for _ in range(count):
                started = time.perf_counter()
                response = client.post("/v1/execute", json=body)
                samples.append((time.perf_counter() - started) * 1000)
                if response.json().get("stdout") != "hello\n":
                    raise SystemExit(f"unexpected answer: {response.text}")
            return samples
    finally:
        server.terminate()
        server.wait(60)


def measure_cold(count: int) -> list[float]:
    """`docker run --rm` per task, with the same network and read-only flags as the pool."""
    command = ["docker", "run", "--rm", "--network", "none", "--read-only", "--log-driver", "none",
               "--entrypoint", "python3", IMAGE, "-c", HELLO]
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        samples.append((time.perf_counter() - started) * 1000)
        assert output == "hello\n"
    return samples


def measure_exec(count: int) -> list[float]:
    """`docker exec` into one running container."""
    name = f"warmpool-bench-exec-{os.getpid()}"
    subprocess.run(["docker", "run", "-d", "--rm", "--name", name, "--label", "warmpool.pool=bench",
                    "--network", "none", "--entrypoint", "sleep", IMAGE, "infinity"], check=True,
                   capture_output=True)
    try:
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            output = subprocess.run(["docker", "exec", name, "python3", "-c", HELLO], capture_output=True,
                                    text=True, check=True).stdout
            samples.append((time.perf_counter() - started) * 1000)
            assert output == "hello\n"
        return samples
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def render(results: dict[str, dict[str, float]], command: str) -> str:
    warm = results["warm pool (HTTP, keep-alive)"]
    lines = [f"Command: `{command}`", "",
             f"Machine: {os.cpu_count()} cpus, {platform.python_implementation()} {platform.python_version()}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "| path | n | p50 ms | p95 ms | p99 ms | mean ms | p50 vs warm |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, stats in results.items():
        ratio = stats["p50"] / warm["p50"]
        lines.append(f"| {name} | {stats['n']:.0f} | {stats['p50']:.2f} | {stats['p95']:.2f} | {stats['p99']:.2f} "
                     f"| {stats['mean']:.2f} | {ratio:.1f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm", type=int, default=1000, help="warm-pool requests")
    parser.add_argument("--cold", type=int, default=30, help="containers started per task")
    parser.add_argument("--exec", type=int, default=30, dest="exec_", help="docker exec calls")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    results = {"warm pool (HTTP, keep-alive)": summary(measure_warm(args.warm)),
               "docker run per task": summary(measure_cold(args.cold)),
               "docker exec into a running container": summary(measure_exec(args.exec_))}
    command = "python benchmarks/latency.py " + " ".join(sys.argv[1:])
    table = render(results, command.strip())
    print(table)
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
