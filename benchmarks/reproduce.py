"""Whether a second `make bench` run reproduced the first: every figure of issue 15 side by side.

Run: .venv/bin/python benchmarks/reproduce.py FIRST.md SECOND.md [--within 0.15]

Reads the sections bench.py writes (load on each image, runsc beside runc, the replacement rate, latency.py,
where the time goes) from two RESULTS files and prints a table of each figure in both runs, their ratio,
and whether it moved by more than `--within` (issue 15: 15%). Exits 1 when a figure is missing.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

IMAGES = ("python", "datascience")
CLOSED_LOOPS = ((10, "keep-alive"), (50, "keep-alive"), (100, "keep-alive"), (50, "a new connection per request"))
BREAKDOWN_PARTS = ("server (uvicorn, FastAPI, pool)", "sandbox cgroups (all)", "dockerd (attach stream; shared daemon)")
NUMBER = r"([\d.]+)"


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + 3)
    return text[start:end if end > 0 else None]


def first(pattern: str, text: str, what: str) -> tuple[float, ...]:
    found = re.search(pattern, text)
    if found is None:
        raise LookupError(f"no figure for {what}")
    return tuple(float(group) for group in found.groups())


def image_figures(text: str, image: str) -> Iterator[tuple[str, float]]:
    part = section(text, f"## Load on the {image} image")
    p50, _, p99 = first(rf"\| {image} \| [\w-]+ \| one httpx\.Client[^|]*\| \d+ \| {NUMBER} \| {NUMBER} \| {NUMBER} \|",
                        part, f"{image} one client")
    yield f"{image} one client p50 ms", p50
    yield f"{image} one client p99 ms", p99
    for users, how in CLOSED_LOOPS:
        client = f"locust FastHttpUser x{users}, {re.escape(how)}"
        (rate,) = first(rf"\| {image} \| hello \| {client} \| \d+ \| \d+ \| (\d+) \|", part, f"{image} {client}")
        yield f"{image} x{users} {'keep-alive' if how == 'keep-alive' else 'new connection'} req/s", rate
    # capacity | rate asked | rate sent | requests | failures | p50 | p90 | p99
    _, _, sent, p50, _, p99 = first(rf"\| {image} \| open loop[^|]*\| (\d+) \| (\d+) \| (\d+) \| \d+ \| \d+ \| "
                                    rf"{NUMBER} \| {NUMBER} \| {NUMBER} \|", part, f"{image} open loop")
    yield f"{image} open loop rate sent /s", sent
    yield f"{image} open loop p50 ms", p50
    yield f"{image} open loop p99 ms", p99


def figures(text: str) -> dict[str, float]:
    """Every figure of issue 15 that bench.py writes, by name."""
    found: dict[str, float] = {}
    for image in IMAGES:
        found.update(image_figures(text, image))
    part = section(text, "## runsc beside runc")
    found["runsc/runc one-client p50 ratio"], found["runsc/runc throughput ratio"] = first(
        rf"one-client p50 x{NUMBER}, throughput x{NUMBER}\.", part, "runsc beside runc")
    part = section(text, "## Replacement rate")
    for image in IMAGES:
        (found[f"{image} replacements /s"],) = first(rf"`{image}`: .*?\*\*{NUMBER} containers replaced", part,
                                                     f"{image} replacements")
    part = section(text, "## Latency of print('hello')")
    for name, label in (("warm p50", "warm pool (HTTP, keep-alive)"), ("docker run p50", "docker run per task")):
        (found[f"latency.py {name} ms"],) = first(rf"\| {re.escape(label)} \| \d+ \| {NUMBER} \|", part, label)
    part = section(text, "## Where the time goes (benchmarks/breakdown.py")
    for label in BREAKDOWN_PARTS:
        (found[f"cpu per task, nano: {label} ms"],) = first(rf"\| {re.escape(label)} \| {NUMBER} \|", part, label)
    return found


def machine_speed(text: str) -> dict[str, float]:
    """The fixed work's times (machine.Speed) before the run's sections, median over the sections; empty
    for a file written before bench.py measured them."""
    found = re.findall(rf"interpreter {NUMBER} ms, on every cpu at once {NUMBER} ms, fork {NUMBER} ms", text)
    if not found:
        return {}
    return {name: statistics.median(float(times[i]) for times in found)
            for i, name in enumerate(("interpreter ms", "on every cpu at once ms", "fork ms"))}


def compare(first_run: dict[str, float], second_run: dict[str, float], within: float) -> tuple[str, list[str]]:
    """The side-by-side table, and the names of the figures that moved by more than `within`."""
    lines = ["| figure | run 1 | run 2 | run 2 / run 1 |", "| --- | --- | --- | --- |"]
    moved = []
    for name, value in first_run.items():
        ratio = second_run[name] / value if value else float("inf")
        over = abs(ratio - 1) > within
        if over:
            moved.append(name)
        lines.append(f"| {name} | {value:g} | {second_run[name]:g} | x{ratio:.2f}"
                     f"{f' **(over {100 * within:.0f}%)**' if over else ''} |")
    return "\n".join(lines), moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--within", type=float, default=0.15)
    args = parser.parse_args()
    texts = [path.read_text() for path in (args.first, args.second)]
    try:
        runs = [figures(text) for text in texts]
    except (LookupError, ValueError) as exc:
        sys.exit(f"reproduce: {exc}")
    table, moved = compare(runs[0], runs[1], args.within)
    print(table)
    print(f"\n{len(runs[0]) - len(moved)} of {len(runs[0])} figures within {100 * args.within:.0f}%"
          + (f"; moved more: {', '.join(moved)}" if moved else ""))
    speeds = [machine_speed(text) for text in texts]
    if all(speeds):
        first_speed, second_speed = speeds
        print("\nThe machine itself (the same fixed work before each section, median over sections; machine.Speed): "
              + "; ".join(f"{name} {first_speed[name]:.1f} -> {second_speed[name]:.1f} ms "
                          f"(x{second_speed[name] / first_speed[name]:.2f})" for name in first_speed))


if __name__ == "__main__":
    main()
