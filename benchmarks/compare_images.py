"""Warm-path latency and throughput of two runner images, measured in alternation in one run.

Run: .venv/bin/python benchmarks/compare_images.py BEFORE_IMAGE AFTER_IMAGE [--rounds 2] [--latency 1000]
     [--seconds 15] [--clients 16] [--before-checkout DIR]

With --before-checkout, the "before" server is that checkout's own (its .venv and code, e.g. a worktree of
an older commit), so that a change to the server is measured too, not only the image.

Each round starts `warmpool serve` (embedded mode, default tiers) once per image: one keep-alive client
sends `--latency` hello requests, then `--clients` keep-alive clients send hello requests for `--seconds`.
Alternating the images round by round gives both the same machine noise; the table quotes the median
over rounds of each figure and the after/before ratio. Used for issue 9 (the runner's pristine template).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from latency import REPO, free_port, summary, wait_ready

HELLO = {"code": "print('hello')"}


def serve(image: str, checkout: Path, instance_id: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "WARMPOOL_IMAGE": image, "WARMPOOL_INSTANCE_ID": instance_id}
    python = checkout / ".venv" / "bin" / "python" if checkout != REPO else Path(sys.executable)
    server = subprocess.Popen([str(python), "-m", "warmpool", "serve", "--host", "127.0.0.1", "--port",
                               str(port)], cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return server, f"http://127.0.0.1:{port}"


def latency_ms(base_url: str, count: int) -> dict[str, float]:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for _ in range(50):
            client.post("/v1/execute", json=HELLO)
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            response = client.post("/v1/execute", json=HELLO)
            samples.append((time.perf_counter() - started) * 1000)
            if response.json().get("stdout") != "hello\n":
                raise SystemExit(f"unexpected answer: {response.text}")
    return summary(samples)


def containers_cpu_ns(instance_id: str) -> int:
    """CPU time used so far by every sandbox container of one server (cgroup v1 cpuacct, where the engine
    puts them); with the server's own CPU time, the cost per task that machine load does not change."""
    ids = subprocess.run(["docker", "ps", "-q", "--no-trunc", "--filter", f"label=warmpool.instance={instance_id}"],
                         capture_output=True, text=True, check=True).stdout.split()
    total = 0
    for container_id in ids:
        try:
            total += int(Path(f"/sys/fs/cgroup/cpuacct/docker/{container_id}/cpuacct.usage").read_text())
        except (OSError, ValueError):
            pass
    return total


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput_per_s(base_url: str, seconds: float, clients: int) -> tuple[float, int]:
    """Hello tasks per second from `clients` keep-alive clients for `seconds`; also the failures."""
    done, failed = [0] * clients, [0] * clients
    stop_at = time.monotonic() + seconds

    def work(index: int) -> None:
        with httpx.Client(base_url=base_url, timeout=30) as client:
            while time.monotonic() < stop_at:
                response = client.post("/v1/execute", json=HELLO)
                if response.status_code == 200 and response.json().get("stdout") == "hello\n":
                    done[index] += 1
                else:
                    failed[index] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.monotonic() - started), sum(failed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--latency", type=int, default=1000, help="requests from one client per round")
    parser.add_argument("--seconds", type=float, default=15, help="throughput phase per round")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--before-checkout", type=Path, default=REPO, help="checkout whose server runs BEFORE")
    args = parser.parse_args()
    figures: dict[str, dict[str, list[float]]] = {args.before: {}, args.after: {}}
    for _ in range(args.rounds):
        for image, checkout in ((args.before, args.before_checkout), (args.after, REPO)):
            instance_id = f"compare-{os.getpid()}-{time.monotonic_ns()}"
            server, base_url = serve(image, checkout.resolve(), instance_id)
            try:
                with httpx.Client(base_url=base_url) as probe:
                    if not wait_ready(probe, 120):
                        raise SystemExit(f"server with {image} did not become ready")
                lat = latency_ms(base_url, args.latency)
                cpu_before, server_before = containers_cpu_ns(instance_id), process_cpu_s(server.pid)
                rate, failures = throughput_per_s(base_url, args.seconds, args.clients)
                tasks = rate * args.seconds
                sandbox_ms = (containers_cpu_ns(instance_id) - cpu_before) / 1e6 / tasks
                server_ms = (process_cpu_s(server.pid) - server_before) * 1000 / tasks
            finally:
                server.terminate()
                server.wait(60)
            for key, value in (("p50", lat["p50"]), ("p99", lat["p99"]), ("rate", rate), ("failures", failures),
                               ("sandbox_ms", sandbox_ms), ("server_ms", server_ms)):
                figures[image].setdefault(key, []).append(value)
    load = os.getloadavg()
    print(f"Command: `python benchmarks/compare_images.py {' '.join(sys.argv[1:])}`; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average after: "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}\n")
    print(f"| image | hello p50 ms (1 client) | p99 ms | tasks/s ({args.clients} keep-alive clients) | failures "
          "| sandbox cpu ms/task | server cpu ms/task |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for image, values in figures.items():
        med = {key: statistics.median(v) for key, v in values.items()}
        print(f"| {image} | {med['p50']:.2f} | {med['p99']:.2f} | {med['rate']:.0f} | {sum(values['failures']):.0f} "
              f"| {med['sandbox_ms']:.2f} | {med['server_ms']:.2f} |")
    before, after = ({k: statistics.median(v) for k, v in figures[i].items()} for i in (args.before, args.after))
    print(f"\nafter/before: p50 x{after['p50'] / before['p50']:.2f}, p99 x{after['p99'] / before['p99']:.2f}, "
          f"tasks/s x{after['rate'] / before['rate']:.2f}, "
          f"sandbox cpu/task x{after['sandbox_ms'] / before['sandbox_ms']:.2f}")


if __name__ == "__main__":
    main()
