"""Streaming and sessions: how soon a flushed chunk reaches the client, and a session call against a plain one.

Run: .venv/bin/python benchmarks/stream_sessions.py [--streams N] [--calls N] [--markdown FILE]

All in one run, on this machine, default tiers. It starts, as separate processes, an embedded API and a
scale-out API with one worker over a redis-server of its own (benchmarks/scaleout.py's helpers).

- First chunk: N streamed tasks (`Accept: text/event-stream`), one after the other on a keep-alive client,
  each printing `time.time()` and flushing as its first act, then sleeping 0.2 s. The latency is the
  client's clock when that first `stdout` event arrived minus the task's timestamp: flush to client. The
  sandboxes run on this host's kernel (runc), so both clocks are the same clock.
- Every chunk: N/10 tasks printing a timestamp every 20 ms, 20 times; each event's arrival minus the
  newest timestamp it holds (a chunk may carry several lines when they came together).
- Session vs plain call: `print('hello')`, N calls each, alternating plain `/v1/execute` and a call in one
  open session, on the same tier.
With `--markdown FILE` it replaces its section of FILE (or appends it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_section import replace_section  # noqa: E402
from scaleout import Processes, ready, serve, start_redis, summary, wait_until, workers_serving  # noqa: E402

HEADING = "## Streaming and sessions (benchmarks/stream_sessions.py)"
SSE = {"accept": "text/event-stream"}
FIRST_CHUNK = "import time\nprint(time.time(), flush=True)\ntime.sleep(0.2)"
EVERY_CHUNK = "import time\nfor _ in range(20):\n    print(time.time(), flush=True)\n    time.sleep(0.02)"
HELLO = "print('hello')"


def stream_events(client: httpx.Client, code: str) -> list[tuple[float, str, Any]]:
    """(arrival time, event, data) of one streamed task."""
    found, name, data = [], "", []
    with client.stream("POST", "/v1/execute", headers=SSE, json={"code": code}) as response:
        if response.status_code != 200:
            raise SystemExit(f"stream refused: {response.status_code} {response.read()[:300]!r}")
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif not line and data:
                found.append((time.time(), name, json.loads("".join(data))))
                data = []
    return found


def first_chunk_ms(url: str, count: int) -> list[float]:
    samples = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(10 + count):  # the first ten warm the connection and code paths
            arrived, name, data = stream_events(client, FIRST_CHUNK)[0]
            if name != "stdout":
                raise SystemExit(f"expected a stdout event first, got {name}: {data}")
            if i >= 10:
                samples.append((arrived - float(data["text"].split()[0])) * 1000)
    return samples


def every_chunk_ms(url: str, count: int) -> list[float]:
    samples = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(count):
            for arrived, name, data in stream_events(client, EVERY_CHUNK):
                if name == "stdout":
                    samples.append((arrived - float(data["text"].split()[-1])) * 1000)
    return samples


def session_vs_plain(url: str, count: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"plain": [], "session": []}
    with httpx.Client(base_url=url, timeout=30) as client:
        opened = client.post("/v1/sessions", json={"idle_timeout_s": 600})
        if opened.status_code != 201:
            raise SystemExit(f"session refused: {opened.status_code} {opened.text}")
        paths = {"plain": "/v1/execute", "session": f"/v1/sessions/{opened.json()['id']}/execute"}
        try:
            for i in range(50 + count):
                for name, path in paths.items():
                    started = time.perf_counter()
                    response = client.post(path, json={"code": HELLO})
                    elapsed_ms = (time.perf_counter() - started) * 1000
                    if response.status_code != 200 or response.json()["stdout"] != "hello\n":
                        raise SystemExit(f"unexpected answer: {response.status_code} {response.text[:300]}")
                    if i >= 50:
                        samples[name].append(elapsed_ms)
        finally:
            client.delete(paths["session"].removesuffix("/execute"))
    return samples


def run(args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, dict[str, float]]]:
    procs = Processes(workdir)
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        _embedded, embedded_url = serve(procs, "embedded", {})
        redis_url = start_redis(procs, workdir)
        env = {"WARMPOOL_REDIS_URL": redis_url, "WARMPOOL_REDIS_PREFIX": "bench-stream"}
        procs.start("worker", [sys.executable, "-m", "warmpool", "worker"],
                    {**env, "WARMPOOL_INSTANCE_ID": "bench-stream-worker"})
        _api, scaleout_url = serve(procs, "scaleout-api", env)
        wait_until(embedded_url, ready)
        wait_until(scaleout_url, workers_serving(1))
        for mode, url in (("embedded", embedded_url), ("scale-out", scaleout_url)):
            calls = session_vs_plain(url, args.calls)
            results[mode] = {"first chunk": summary(first_chunk_ms(url, args.streams)),
                             "every chunk": summary(every_chunk_ms(url, max(1, args.streams // 10))),
                             "plain call": summary(calls["plain"]), "session call": summary(calls["session"])}
    finally:
        procs.stop_all()
    return results


def render(results: dict[str, dict[str, dict[str, float]]], command: str, load_before: float) -> str:
    lines = [HEADING, "", f"Command: `{command}`", "",
             f"Machine: {os.cpu_count()} cpus, {platform.python_implementation()} {platform.python_version()}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average before the run "
             f"{load_before:.2f}. One client, keep-alive; the API, the worker, redis-server, "
             "the containers and the client share these cpus.", "",
             "Streamed output, flush to client (the task's `time.time()` at its flush against the client's at the "
             "event's arrival):", "",
             "| mode | what | n | p50 ms | p95 ms | p99 ms | mean ms |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for mode in ("embedded", "scale-out"):
        for what in ("first chunk", "every chunk"):
            s = results[mode][what]
            lines.append(f"| {mode} | {what} | {s['n']:.0f} | {s['p50']:.2f} | {s['p95']:.2f} | {s['p99']:.2f} "
                         f"| {s['mean']:.2f} |")
    lines += ["", "A call in a session against a plain call, `print('hello')`, alternating, same tier:", "",
              "| mode | call | n | p50 ms | p95 ms | p99 ms | mean ms | p50 vs plain |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode in ("embedded", "scale-out"):
        plain = results[mode]["plain call"]["p50"]
        for what in ("plain call", "session call"):
            s = results[mode][what]
            lines.append(f"| {mode} | {what} | {s['n']:.0f} | {s['p50']:.2f} | {s['p95']:.2f} | {s['p99']:.2f} "
                         f"| {s['mean']:.2f} | {s['p50'] / plain:.2f}x |")
    return "\n".join(lines + ["", targets(results)]) + "\n"


def targets(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """The DESIGN.md targets against this run: a flushed chunk at the client within 100 ms; a session call's p50
    the same as a plain call's."""
    def met(ok: bool) -> str:
        return "**met**" if ok else "**not met**"
    chunk = "; ".join(f"{mode} first chunk p99 {results[mode]['first chunk']['p99']:.0f} ms, every chunk p99 "
                      f"{results[mode]['every chunk']['p99']:.0f} ms: "
                      f"{met(max(results[mode][w]['p99'] for w in ('first chunk', 'every chunk')) <= 100)}"
                      for mode in ("embedded", "scale-out"))
    p50s = {mode: (results[mode]["session call"]["p50"], results[mode]["plain call"]["p50"])
            for mode in ("embedded", "scale-out")}
    calls = "; ".join(f"{mode} {session:.2f} ms against {plain:.2f} ms: {met(session <= plain * 1.1)}"
                      for mode, (session, plain) in p50s.items())
    return (f"Targets (DESIGN.md section 4). A flushed chunk at the client within 100 ms: {chunk}. A session "
            f"call's p50 the same as a plain call's (within 10%): {calls}. A session call skips the lease, the "
            "fork of a task child and the reset, which is why it is a little faster.")




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=300, help="streamed tasks for the first-chunk latency")
    parser.add_argument("--calls", type=int, default=500, help="plain and session calls each")
    parser.add_argument("--markdown", type=Path, help="write the section into this file")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="warmpool-bench-") as tmp:
        results = run(args, Path(tmp))
    command = ("python benchmarks/stream_sessions.py " + " ".join(sys.argv[1:])).strip()
    section = render(results, command, load_before)
    print(section)
    if args.markdown:
        replace_section(args.markdown, HEADING, section)


if __name__ == "__main__":
    main()
