"""Where each millisecond and each cpu-millisecond of a task goes, for one or more server variants, in one run.

Run: .venv/bin/python benchmarks/breakdown.py [--requests 2000] [--rounds 2] [--body '{"code": ...}']
     [--variant 'name[@CHECKOUT]:WARMPOOL_CPU_PERIOD_US=10000,...' ...] [--tiers-file FILE] [--markdown FILE]

Each variant is a `warmpool serve` (embedded, default tiers unless --tiers-file) with those environment
variables (and that checkout's code, e.g. a worktree of main, for a before/after); the variants
are measured in turn, round after round, so each sees the same machine noise, and the table quotes
the median over rounds. One keep-alive client (httpx, in this process) sends the requests one after
another. Wall time: the round trip, and of it the runner's run_ms and the pool's
queue_ms (the rest is HTTP, the server and the frames). Cpu per task (benchmarks/cpu_account.py): the
server, the client, the sandboxes (the runner's PID 1, its lasting processes, the per-task processes),
the Docker daemon and the containers' shims (the attached socket's path), and what the rest of the
machine used meanwhile (other people's work: a busy machine shows here, not in the per-task figures);
and the sandboxes' CFS throttling (cpu.stat): throttled periods and time, the p99's usual cause.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_account import per_task, snapshot  # noqa: E402
from latency import percentile  # noqa: E402
from load import sequential  # noqa: E402
from machine import describe_load  # noqa: E402
from serving import REPO, instance_id_of, server  # noqa: E402

HELLO = {"code": "print('hello')"}


def measure(env: dict[str, str], tiers: dict[str, Any] | None, body: dict[str, Any], requests: int,
            checkout: Path) -> dict[str, Any]:
    with server(env, tiers, checkout) as (url, pid):
        with httpx.Client(base_url=url, timeout=30) as client:
            sequential(client, body, 50)  # the connection, the server's code paths, every warm container once
            before = snapshot(pid, instance_id_of(url))
            rtt, answers = sequential(client, body, requests)
            after = snapshot(pid, instance_id_of(url))
    cpu = per_task(before, after, requests, {os.getpid(), pid})
    run = [a["timings"]["run_ms"] for a in answers]
    queue = [a["timings"]["queue_ms"] for a in answers]
    tiers_seen = {a.get("tier") for a in answers}
    rest = [total - r - q for total, r, q in zip(rtt, run, queue, strict=True)]
    return {"rtt_p50": statistics.median(rtt), "rtt_p99": percentile(rtt, 0.99), "run_p50": statistics.median(run),
            "run_p99": percentile(run, 0.99), "queue_p99": percentile(queue, 0.99),
            "rest_p50": statistics.median(rest), "tiers": sorted(str(t) for t in tiers_seen), **cpu}


def parse_variant(text: str) -> tuple[str, dict[str, str], Path]:
    """`name[@checkout]:ENV=VALUE,...`: a server of that checkout (default this one) with that environment."""
    head, _, assignments = text.partition(":")
    name, _, checkout = head.partition("@")
    env = dict(item.split("=", 1) for item in assignments.split(",") if item)
    return name, env, Path(checkout).resolve() if checkout else REPO


WALL = (("rtt_p50", "round trip p50"), ("rtt_p99", "round trip p99"), ("run_p50", "run_ms p50"),
        ("run_p99", "run_ms p99"), ("queue_p99", "queue_ms p99"), ("rest_p50", "HTTP + server + frames p50"))
CPU = (("server", "server (uvicorn, FastAPI, pool)"), ("server_sys", "... of which kernel"),
       ("client", "client (httpx, this process)"), ("sandbox", "sandbox cgroups (all)"),
       ("sandbox_sys", "... of which kernel"), ("runner_pid1", "... runner PID 1"),
       ("lasting", "... template and helpers"),
       ("per_task_procs", "... per-task processes (the task's child; under gVisor also an intermediate)"),
       ("dockerd", "dockerd (attach stream; shared daemon)"), ("shims", "containerd shims"),
       ("others", "rest of the machine (not ours)"))


def render(results: dict[str, list[dict[str, Any]]], command: str, load_before: str) -> str:
    names = list(results)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
           for n, rs in results.items()}
    head = "| | " + " | ".join(names) + " |\n| --- |" + " --- |" * len(names)
    lines = [f"Command: `{command}`", ""] + ([f"Machine before: {load_before}", ""] if load_before else []) + [
             "Client: one httpx.Client, keep-alive (one connection), requests one after another; medians over "
             f"{len(next(iter(results.values())))} rounds, variants alternated. Tiers served: "
             + "; ".join(f"{n}: {', '.join(results[n][0]['tiers'])}" for n in names), "",
             "Wall time per task (ms):", "", head]
    lines += [f"| {label} | " + " | ".join(f"{med[n][key]:.2f}" for n in names) + " |" for key, label in WALL]
    lines += ["", "Cpu per task (ms):", "", head]
    lines += [f"| {label} | " + " | ".join(f"{med[n][key]:.2f}" for n in names) + " |" for key, label in CPU]
    lines.append("| machine busy during the run (% of all cpus) | "
                 + " | ".join(f"{med[n]['machine_busy_pct']:.0f}%" for n in names) + " |")
    lines += ["", "CFS throttling of the sandboxes over the run (sums over the tier's containers):", "", head]
    for key, label in (("periods", "periods with runnable work"), ("throttled", "periods throttled"),
                       ("throttled_ms", "time throttled (ms)"), ("containers", "containers measured")):
        lines.append(f"| {label} | " + " | ".join(f"{med[n][key]:.0f}" for n in names) + " |")
    lines.append("| throttled periods per 100 tasks | " + " | ".join(
        f"{100 * med[n]['throttled'] / max(1, _requests(results[n])):.1f}" for n in names) + " |")
    busiest = {n: results[n][-1]["_others_top"] for n in names}
    lines += ["", "Busiest other processes during the last round: " + "; ".join(
        f"{n}: " + ", ".join(f"{name} {ms / 1000:.1f} s" for name, ms in top) for n, top in busiest.items())]
    return "\n".join(lines) + "\n"


def _requests(rounds: list[dict[str, Any]]) -> int:
    return int(rounds[0].get("requests", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--body", type=json.loads, default=HELLO, help="the request body, JSON")
    parser.add_argument("--variant", action="append", default=[], help="name:ENV=VALUE,ENV=VALUE (repeatable)")
    parser.add_argument("--tiers-file", type=Path)
    parser.add_argument("--markdown", type=Path, help="append the section to this file")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # stop the servers on the way out
    variants = [parse_variant(v) for v in args.variant] or [("default", {}, REPO)]
    tiers: dict[str, Any] | None = json.loads(args.tiers_file.read_text()) if args.tiers_file else None
    load_before = describe_load()
    print(f"machine before: {load_before}", flush=True)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in variants}
    for round_index in range(args.rounds):
        for name, env, checkout in variants:
            figures = measure(env, tiers, args.body, args.requests, checkout)
            figures["requests"] = args.requests
            results[name].append(figures)
            print(f"round {round_index + 1} {name}: " + ", ".join(
                f"{k} {v:.2f}" for k, v in figures.items() if isinstance(v, float)), flush=True)
    table = render(results, "python benchmarks/breakdown.py " + " ".join(sys.argv[1:]), load_before)
    print(table)
    if args.markdown:
        with args.markdown.open("a") as out:
            out.write("\n" + table)


if __name__ == "__main__":
    main()
