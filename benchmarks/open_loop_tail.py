"""Where the open loop's slow bursts come from: container replacements. Two measurements, rerunnable.

Run: .venv/bin/python benchmarks/open_loop_tail.py [--rate 150] [--seconds 60] [--warm-s 60] [--rounds 1]

1. A replacement's own cost to the tasks beside it: one keep-alive client sends hello tasks one after
   another while, six times, a runner container is started with `docker run` (what a replacement does),
   then removed. The requests in the second after each start are compared with those in the second before.
2. The open loop with the nano tier's `max_uses` at 1,000 (the default before issue 15's last change) and
   at the default (pool/model/tiers.py), alternated round by round. Each round is a fresh server, 100
   locust users for `--warm-s` (as `make bench`'s closed loops age the pool before its open loop), then
   the open loop at `--rate` for `--seconds`. The admin view, polled every 0.1 s, counts the containers
   replaced during the loop and the most leases seen waiting at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402
import serving  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pool.model.tiers import DEFAULT_MAX_USES, Tier, default_tiers  # noqa: E402

HELLO = {"code": "print('hello')"}
STALL_CONTAINER = f"warmpool-bench-stall-{os.getpid()}"


def tier_entry(tier: Tier) -> dict[str, Any]:
    """A tiers-file entry for `tier`, as the tiers file spells it."""
    r = tier.resources
    return {"name": tier.name, "cpu": r.cpu, "gpu": r.gpu, "ram": r.ram_bytes, "storage": r.storage_bytes,
            "min_idle": tier.min_idle, "max_size": tier.max_size, "runtime": tier.runtime,
            "pids_limit": tier.pids_limit, "max_uses": tier.max_uses, "max_age_s": tier.max_age_s,
            "image": tier.image}


def tiers_with_nano_max_uses(max_uses: int) -> dict[str, Any]:
    tiers = [dataclasses.replace(t, max_uses=max_uses) if t.name == "nano" else t for t in default_tiers()]
    return {"tiers": [tier_entry(t) for t in tiers]}


def quantile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values or [0.0])[0]


def replacement_cost(image: str) -> str:
    """Measurement 1: a sequential client's latency in the second after a `docker run` vs the one before."""
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    with serving.server({}) as (url, _):
        def client() -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                while not stop.is_set():
                    start = time.monotonic()
                    http.post("/v1/execute", json=HELLO)
                    samples.append((start, (time.monotonic() - start) * 1000))

        thread = threading.Thread(target=client)
        thread.start()
        time.sleep(5)
        before: list[float] = []
        after: list[float] = []
        run_ms: list[float] = []
        try:
            for _ in range(6):
                start = time.monotonic()
                subprocess.run(["docker", "run", "-d", "-i", "--name", STALL_CONTAINER, "--label",
                                "warmpool.pool=bench", "--network", "none", "--memory", "256m", image],
                               capture_output=True, check=True)
                run_ms.append((time.monotonic() - start) * 1000)
                time.sleep(1.5)
                subprocess.run(["docker", "rm", "-f", STALL_CONTAINER], capture_output=True)
                time.sleep(1.5)
                before += [ms for s, ms in samples if start - 1.0 <= s < start]
                after += [ms for s, ms in samples if start <= s < start + 1.0]
        finally:
            stop.set()
            thread.join()
            subprocess.run(["docker", "rm", "-f", STALL_CONTAINER], capture_output=True)
    return "\n".join([
        "| one keep-alive client, hello tasks one after another | requests | p50 ms | p99 ms | max ms |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {label} | {len(xs)} | {quantile(xs, 50):.1f} | {quantile(xs, 99):.1f} | {max(xs):.0f} |"
          for label, xs in (("the second before each `docker run`", before),
                            ("the second after it starts", after))),
        "",
        f"`docker run -d` of the runner image: p50 {statistics.median(run_ms):.0f} ms over {len(run_ms)} starts.",
    ])


def open_loop_round(max_uses: int, rate_per_s: float, seconds: float, warm_s: int) -> dict[str, Any]:
    """Measurement 2, one round: the open loop's tail and what the pool did during it."""
    polled: list[dict[str, Any]] = []
    stop = threading.Event()
    env = {"WARMPOOL_ADMIN_KEY": serving.ADMIN_KEY}
    with serving.server(env, tiers=tiers_with_nano_max_uses(max_uses)) as (url, _):
        load.locust(url, 100, warm_s)

        def poll() -> None:
            with serving.admin_client(url) as admin:
                while not stop.is_set():
                    polled.append(serving.tier_view(serving.pool_views(admin), "nano"))
                    time.sleep(0.1)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            figures = load.open_loop(url, rate_per_s, seconds)
        finally:
            stop.set()
            poller.join()
    replaced = sum(polled[-1]["replaced"].values()) - sum(polled[0]["replaced"].values()) if polled else 0
    slow = figures.get("slow_by_second", {})
    return {"max_uses": max_uses, "p50": figures["p50"], "p99": figures["p99"], "max": figures["max"],
            "slow": sum(slow.values()), "slow_seconds": len(slow), "replaced": replaced,
            "most_waiting": max((t["waiting"] for t in polled), default=0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=150.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warm-s", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--image", default="warmpool-runner:latest")
    args = parser.parse_args()
    print(replacement_cost(args.image), flush=True)
    rows = [open_loop_round(max_uses, args.rate, args.seconds, args.warm_s)
            for _ in range(args.rounds) for max_uses in (1000, DEFAULT_MAX_USES)]
    print()
    print(f"Open loop at {args.rate:g}/s for {args.seconds:g} s (64 keep-alive connections, latency from each "
          f"request's due time), after 100 locust users for {args.warm_s} s; nano's max_uses as shown:")
    print()
    print("| nano max_uses | p50 ms | p99 ms | max ms | requests over 50 ms (seconds) | containers replaced "
          "during the loop | most leases waiting |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['max_uses']} | {r['p50']:.1f} | {r['p99']:.1f} | {r['max']:.0f} | {r['slow']} "
              f"({r['slow_seconds']}) | {r['replaced']} | {r['most_waiting']} |")


if __name__ == "__main__":
    main()
