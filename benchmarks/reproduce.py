"""Whether a second `make bench` run reproduced the first: every figure of issue 15 side by side.

Run: .venv/bin/python benchmarks/reproduce.py FIRST.md SECOND.md [--within 0.15]

Reads the sections bench.py writes (load on each image, runsc beside runc, the replacement rate, latency.py,
where the time goes) from two RESULTS files and prints a table of each figure in both runs, their ratio,
and whether it moved by more than `--within` (issue 15: 15%). Exits 1 when a figure is missing.
"""

from __future__ import annotations

import argparse
import re
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


SPEED_LINE = re.compile(rf"^(## [^\n]*)\n\nMachine before this section:[^\n]*interpreter {NUMBER} ms, "
                        rf"on every cpu at once {NUMBER} ms, fork {NUMBER} ms", re.MULTILINE)
SPEED_NAMES = ("interpreter ms", "on every cpu at once ms", "fork ms")


def machine_speed(text: str) -> dict[str, dict[str, float]]:
    """Each section's fixed-work times (machine.Speed, taken before it), by heading; empty for a file
    written before bench.py measured them."""
    return {heading.removeprefix("## "): dict(zip(SPEED_NAMES, map(float, times), strict=True))
            for heading, *times in SPEED_LINE.findall(text)}


def speed_table(first_run: dict[str, dict[str, float]], second_run: dict[str, dict[str, float]]) -> str:
    """The machine's speed before each section in both runs: a figure that moved with it moved with the host."""
    lines = ["| section | " + " | ".join(f"{name}: run 1 -> run 2" for name in SPEED_NAMES) + " |",
             "| --- |" + " --- |" * len(SPEED_NAMES)]
    for heading, first_times in first_run.items():
        second_times = second_run.get(heading)
        if second_times is None:
            continue
        lines.append(f"| {heading} | " + " | ".join(
            f"{first_times[name]:.1f} -> {second_times[name]:.1f} (x{second_times[name] / first_times[name]:.2f})"
            for name in SPEED_NAMES) + " |")
    return "\n".join(lines)


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
        print("\nThe machine itself: the same fixed work before each section (machine.Speed, best of 5), ms:\n")
        print(speed_table(*speeds))


if __name__ == "__main__":
    main()
