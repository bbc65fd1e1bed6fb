"""The loads `make bench` puts on a server, each described with its client beside its figures.

- closed loop: locust FastHttpUser sessions (N users, each sending its next request when the answer came),
  over keep-alive connections or a new connection per request;
- open loop: benchmarks/open_loop.py at a constant arrival rate;
- one client: requests one after another over one keep-alive connection.
Locust and the open-loop client run pinned to cpu 1 and the server to cpu 0 (bench.py), where there are two.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import percentile  # noqa: E402

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"
PIN = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
HELLO = "print('hello')"


def pinned(cpu: int, command: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *command] if PIN else command


def closed_client(users: int, keep_alive: bool) -> str:
    how = "keep-alive" if keep_alive else "a new connection per request"
    return f"locust FastHttpUser x{users}, {how}"


def locust(base_url: str, users: int, run_time_s: int, mix: str = "hello", ram: str | None = None,
           image: str | None = None, keep_alive: bool = True) -> dict[str, Any]:
    """One bounded headless locust session; returns the aggregated row of its stats, with its client."""
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "run"
        env = {**os.environ, "WARMPOOL_MIX": mix}
        if ram:
            env["WARMPOOL_BENCH_RAM"] = ram
        if image:
            env["WARMPOOL_BENCH_IMAGE"] = image
        if not keep_alive:
            env["WARMPOOL_BENCH_CONNECTION"] = "close"
        subprocess.run(pinned(1, [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
                                  "-u", str(users), "-r", str(users), "-t", f"{run_time_s}s", "--host", base_url,
                                  "--csv", str(prefix), "--only-summary", "--stop-timeout", "5",
                                  "--exit-code-on-error", "0"]),
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=run_time_s + 60)
        with open(f"{prefix}_stats.csv") as stats:
            rows = {row["Name"]: row for row in csv.DictReader(stats)}
    row = rows["Aggregated"]
    rps = float(row["Requests/s"])
    return {"users": users, "mix": mix, "image": image or "python", "client": closed_client(users, keep_alive),
            "keep_alive": keep_alive, "requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
            "rps": rps, "p50": float(row["50%"]), "p95": float(row["95%"]), "p99": float(row["99%"]),
            "little_ms": 1000 * users / rps if rps else float("nan"),
            "by_name": {k: v for k, v in rows.items() if k != "Aggregated"}}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def closed_table(rows: list[dict[str, Any]]) -> str:
    return markdown_table(
        ["image", "mix", "client", "requests", "failures", "req/s", "p50 ms", "p95 ms", "p99 ms",
         "users / req/s (Little's law wait, ms)", "containers started during it (of them replacements)"],
        [[r["image"], r["mix"], r["client"], str(r["requests"]), str(r["failures"]), f"{r['rps']:.0f}",
          f"{r['p50']:.0f}", f"{r['p95']:.0f}", f"{r['p99']:.0f}", f"{r['little_ms']:.0f}", starts_cell(r)]
         for r in rows])


def open_loop(base_url: str, rate_per_s: float, seconds: float, image: str | None = None,
              connections: int = 64) -> dict[str, Any]:
    """benchmarks/open_loop.py at `rate_per_s` for `seconds` (pinned to cpu 1); its JSON figures."""
    body = {"code": HELLO, **({"image": image} if image else {})}
    command = [sys.executable, str(HERE / "open_loop.py"), base_url, "--rate", f"{rate_per_s:.1f}",
               "--seconds", str(seconds), "--connections", str(connections), "--body", json.dumps(body)]
    done = subprocess.run(pinned(1, command),
                          capture_output=True, text=True, check=True, timeout=seconds + 120)
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    figures["image"] = image or "python"
    figures["client"] = (f"open loop (benchmarks/open_loop.py), {connections} keep-alive connections, "
                         "latency from each request's due time")
    return figures


def open_table(rows: list[dict[str, Any]]) -> str:
    return markdown_table(
        ["image", "client", "capacity req/s (closed loop, best)", "rate asked", "rate sent", "requests", "failures",
         "p50 ms", "p90 ms", "p99 ms", "max ms", "requests over 50 ms (in how many seconds)",
         "containers started during it (of them replacements)", "sent > 1 ms late",
         "client cpu ms/req"],
        [[r["image"], r["client"], f"{r['capacity']:.0f}", f"{r['rate_asked']:.0f}", f"{r['rate_done']:.0f}",
          str(r["count"]), str(r["failures"]), f"{r['p50']:.1f}", f"{r['p90']:.1f}", f"{r['p99']:.1f}",
          f"{r['max']:.0f}", slow_cell(r.get("slow_by_second", {})), starts_cell(r), f"{100 * r['late_share']:.1f}%",
          f"{r['client_cpu_ms']:.2f}"] for r in rows])


def starts_cell(row: dict[str, Any]) -> str:
    """Containers the tier started while the loop ran, and how many of them replaced worn ones: a start is
    a `docker run`, which slows the tasks beside it (benchmarks/open_loop_tail.py)."""
    if "started_during" not in row:
        return "not recorded"
    return f"{row['started_during']} ({row['replaced_during']})"


def slow_cell(slow_by_second: dict[str, int]) -> str:
    """Whether the open loop's tail was one stall or spread out: its slow requests, and over how many seconds."""
    return f"{sum(slow_by_second.values())} ({len(slow_by_second)})"


def sequential(client: httpx.Client, body: dict[str, Any], count: int) -> tuple[list[float], list[dict[str, Any]]]:
    """`count` requests of `body`, one after another on `client`: the round trips (ms) and the answers, each
    checked to have succeeded."""
    samples, answers = [], []
    for _ in range(count):
        started = time.perf_counter()
        answer = client.post("/v1/execute", json=body).json()
        samples.append((time.perf_counter() - started) * 1000)
        if answer.get("status") != "succeeded":
            raise SystemExit(f"unexpected answer: {answer}")
        answers.append(answer)
    return samples, answers


# A one-client figure is the median over this many runs of it: one run is a few seconds, and a stall of
# the shared machine inside one of them moved its p99 by a third between two `make bench` runs (issue 15:
# the figures must hold within 15%). Every run's p50 and p99 stand beside the medians.
ONE_CLIENT_RUNS = 3


def one_client(base_url: str, count: int, image: str | None = None, runs: int = ONE_CLIENT_RUNS) -> dict[str, Any]:
    """`runs` runs of `count` hello requests one after another over one keep-alive connection (httpx), after
    50 to warm; each figure is its median over the runs."""
    body = {"code": HELLO, **({"image": image} if image else {})}
    each, tiers = [], set()
    with httpx.Client(base_url=base_url, timeout=30) as client:
        sequential(client, body, 50)
        for _ in range(runs):
            samples, answers = sequential(client, body, count)
            if any(a.get("stdout") != "hello\n" for a in answers):
                raise SystemExit("a hello task did not print hello")
            tiers |= {str(a.get("tier")) for a in answers}
            each.append(run_figures(samples, [a["timings"]["run_ms"] for a in answers]))
    return combined({"image": image or "python", "tier": ", ".join(sorted(tiers)), "n": count}, each)


def combined(row: dict[str, Any], runs: list[dict[str, float]]) -> dict[str, Any]:
    """A one-client row whose figures are the medians over `runs` (each run's figures kept beside them)."""
    medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    return {**row, "runs": runs, **medians,
            "client": f"one httpx.Client, keep-alive, sequential; median of {len(runs)} runs"}


def run_figures(samples_ms: list[float], run_ms: list[float]) -> dict[str, float]:
    """One run's round-trip percentiles, and the runner's own run time (the answer's timings.run_ms)."""
    return {"p50": statistics.median(samples_ms), "p95": percentile(samples_ms, 0.95),
            "p99": percentile(samples_ms, 0.99), "run_p50": statistics.median(run_ms),
            "run_p99": percentile(run_ms, 0.99)}


def one_client_table(rows: list[dict[str, Any]]) -> str:
    return markdown_table(
        ["image", "tier", "client", "n (each run)", "p50 ms", "p95 ms", "p99 ms", "run_ms p50", "run_ms p99",
         "each run: p50 / p99 ms"],
        [[r["image"], r["tier"], r["client"], str(r["n"]), f"{r['p50']:.2f}", f"{r['p95']:.2f}", f"{r['p99']:.2f}",
          f"{r['run_p50']:.2f}", f"{r['run_p99']:.2f}", runs_cell(r.get("runs", []))] for r in rows])


def runs_cell(runs: list[dict[str, float]]) -> str:
    return ", ".join(f"{run['p50']:.2f} / {run['p99']:.2f}" for run in runs) or "one run"
