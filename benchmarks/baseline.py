"""Hello throughput of another checkout beside this one, with the closed-loop client `make bench` uses.

Run: .venv/bin/python benchmarks/baseline.py --before-checkout DIR --before-image IMAGE [--rounds 2]
     [--seconds 20] [--users 20]

Issue 15's targets come from a run of the code before issue 9 (a quiet machine "of this kind": 510 hello
tasks/s keep-alive at 20 users, 387/s with a new connection per request). This puts that code (a worktree
of it and its own runner image) and this checkout side by side on this machine, in one run: each round
starts `warmpool serve` (embedded, default tiers; not pinned) for each, warms its tier with 100 users for
10 s, then runs locust FastHttpUser at `--users` keep-alive and with a new connection per request for
`--seconds` each. The checkouts alternate round by round, so both see the same machine; the table gives
the median over rounds and the ratio, and the machine's load before each round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402
import serving  # noqa: E402
from machine import describe_load  # noqa: E402
from serving import REPO  # noqa: E402


def measure(checkout: Path, image: str | None, users: int, seconds: int) -> dict[str, float]:
    env = {"WARMPOOL_IMAGE": image} if image else {}
    with serving.server(env, checkout=checkout) as (url, _pid):
        load.locust(url, 100, 10)  # grow the tier first, as make bench does
        keep_alive = load.locust(url, users, seconds)
        fresh = load.locust(url, users, seconds, keep_alive=False)
    return {"keep_alive": keep_alive["rps"], "new_connection": fresh["rps"],
            "failures": keep_alive["failures"] + fresh["failures"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before-checkout", type=Path, required=True)
    parser.add_argument("--before-image", required=True, help="the runner image built from that checkout")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--users", type=int, default=20)
    args = parser.parse_args()
    # Both servers unpinned here (the figures were taken so); make bench pins its server to cpu 0.
    load.PIN = False
    variants = {f"before ({args.before_checkout.name})": (args.before_checkout.resolve(), args.before_image),
                "this checkout": (REPO, None)}
    figures: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    loads = []
    for _ in range(args.rounds):
        for name, (checkout, image) in variants.items():
            loads.append(describe_load())
            figures[name].append(measure(checkout, image, args.users, args.seconds))
    print(f"Command: `python benchmarks/baseline.py {' '.join(sys.argv[1:])}`\n")
    print("Machine before each measurement: " + "; ".join(loads) + "\n")
    print(f"| code | hello tasks/s, locust FastHttpUser x{args.users}, keep-alive | the same, a new connection "
          "per request | failures |")
    print("| --- | --- | --- | --- |")
    medians = {}
    for name, rows in figures.items():
        medians[name] = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
        print(f"| {name} | {medians[name]['keep_alive']:.0f} | {medians[name]['new_connection']:.0f} | "
              f"{sum(row['failures'] for row in rows):.0f} |")
    before, after = (medians[name] for name in variants)
    print(f"\nthis checkout / before: keep-alive x{after['keep_alive'] / before['keep_alive']:.2f}, "
          f"new connection x{after['new_connection'] / before['new_connection']:.2f} "
          f"(medians of {args.rounds} rounds, {args.seconds} s each)")


if __name__ == "__main__":
    main()
