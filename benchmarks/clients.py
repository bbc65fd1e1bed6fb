"""`make bench-clients`: a 100-task batch's throughput, and what warmpool.client adds over raw HTTP.

One server (default tiers, started on loopback as bench.py starts it). Batch: submit 100 `print(i)` tasks
in one POST /v1/tasks/batch, then long-poll each until it ended; tasks/s = 100 over the time from the
submission to the last end (all long-polled at once), over several rounds. Client overhead: `print('hello')` through
`Client.execute` and through a bare `httpx.Client.post` (both keep-alive), alternating one for one, so
both see the same machine; the overhead is the difference of their medians. Writes its section of
RESULTS.md (replacing an earlier one) and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import percentile  # noqa: E402
from results_section import replace_section  # noqa: E402
from serving import server  # noqa: E402

from warmpool.client import AsyncClient, Client  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HEADING = "## Batches and the Python client (benchmarks/clients.py)"
HELLO = "print('hello')"


def batch_round(url: str, size: int) -> float:
    """Tasks per second for one batch of `size`, from submission to the last end (every task long-polled
    at once, so the time is the server's, not that of reading results one after another)."""
    async def go() -> float:
        async with AsyncClient(url) as client:
            started = time.perf_counter()
            accepted = await client.batch([f"print({i})" for i in range(size)])
            results = await asyncio.gather(*(client.wait(task.id, timeout_s=300) for task in accepted))
            elapsed_s = time.perf_counter() - started
        assert all(r.ok and r.stdout == f"{i}\n" for i, r in enumerate(results)), [r.status for r in results]
        return size / elapsed_s
    return asyncio.run(go())


def overhead(url: str, count: int) -> tuple[list[float], list[float]]:
    """Latency samples (ms) of the same task through the client and through raw httpx, alternating."""
    ours: list[float] = []
    raw: list[float] = []
    with Client(url) as client, httpx.Client(base_url=url, timeout=60) as http:
        for _ in range(20):  # warm both connections and the pool
            client.execute(HELLO)
            http.post("/v1/execute", json={"code": HELLO}).raise_for_status()
        for _ in range(count):
            started = time.perf_counter()
            result = client.execute(HELLO)
            ours.append((time.perf_counter() - started) * 1000)
            assert result.stdout == "hello\n"
            started = time.perf_counter()
            response = http.post("/v1/execute", json={"code": HELLO})
            body = response.json()
            raw.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200 and body["stdout"] == "hello\n"
    return ours, raw


def render(rates: list[float], ours: list[float], raw: list[float], size: int, command: str, started: str) -> str:
    load = os.getloadavg()
    lines = [HEADING, "", f"Command: `{command}`", "",
             f"Machine: {os.cpu_count()} cpus, CPython {sys.version.split()[0]}, {started}; load average before "
             f"the run {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min). Default tiers (`print(i)` "
             "goes to `nano`: 4 warm, at most 16).", "",
             f"Batch throughput: one POST /v1/tasks/batch of {size} `print(i)` tasks, then a long poll "
             "(`wait_s`) on every task at once (AsyncClient) until each ended; from the submission to the last "
             "end:", "",
             "| rounds | tasks/s median | min | max |", "| --- | --- | --- | --- |",
             f"| {len(rates)} | {statistics.median(rates):.0f} | {min(rates):.0f} | {max(rates):.0f} |", "",
             f"Client overhead: `{HELLO}` through `warmpool.client.Client.execute` and through a bare "
             f"`httpx.Client.post` (keep-alive both), {len(ours)} each, alternating:", "",
             "| path | n | p50 ms | p99 ms | mean ms |", "| --- | --- | --- | --- | --- |"]
    for name, samples in (("httpx.Client.post (raw)", raw), ("warmpool.client.Client.execute", ours)):
        lines.append(f"| {name} | {len(samples)} | {percentile(samples, 0.5):.2f} | {percentile(samples, 0.99):.2f} "
                     f"| {statistics.fmean(samples):.2f} |")
    delta_ms = percentile(ours, 0.5) - percentile(raw, 0.5)
    lines += ["", f"Overhead of the client at the median: {delta_ms:+.2f} ms per task "
                  f"({delta_ms / percentile(raw, 0.5) * 100:+.1f}%): building the body, reading the JSON into "
                  "the result dataclass, and the retry check."]
    return "\n".join(lines) + "\n"




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--count", type=int, default=500, help="tasks per path for the client overhead")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with server({}) as (url, _):
        batch_round(url, args.batch)  # warm-up: the pool grows to the demand
        rates = [batch_round(url, args.batch) for _ in range(args.rounds)]
        ours, raw = overhead(url, args.count)
    command = (f"python benchmarks/clients.py --rounds {args.rounds} --batch {args.batch} --count {args.count}")
    section = render(rates, ours, raw, args.batch, command, started)
    replace_section(args.output, HEADING, section)
    print(section)


if __name__ == "__main__":
    main()
