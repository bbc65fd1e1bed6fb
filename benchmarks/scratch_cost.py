"""What disk scratch costs against a tmpfs: per task (the reset), per replacement (a new filesystem), and
for the seed's 900 MiB write.

Run: .venv/bin/python benchmarks/scratch_cost.py [--tasks N] [--replacements N] [--markdown FILE]
Starts `warmpool serve` on loopback with WARMPOOL_SCRATCH=disk and then =memory, same tiers, one after the
other, and times the scratch store's own make/release in this process. With --markdown, replaces (or
appends) the section "## Disk scratch" of that file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import replacement_run  # noqa: E402
from latency import summary  # noqa: E402
from serving import server  # noqa: E402

from pool.engine.container import CreateOptions, start_container  # noqa: E402
from pool.engine.docker_backend import DockerBackend  # noqa: E402
from pool.engine.sandbox_spec import owner_token  # noqa: E402
from pool.engine.scratch import ScratchStore  # noqa: E402
from pool.model.tiers import tier_from_dict  # noqa: E402
from pool.settings import Settings  # noqa: E402

HEADING = "## Disk scratch"
MIB = 1024 ** 2
ONE = {"tiers": [{"name": "one", "cpu": 1, "ram": "512MiB", "storage": "1GiB", "min_idle": 1, "max_size": 1}]}
WRITE = "chunk = b'x' * (1 << 20)\nwith open('f', 'wb') as f:\n    for _ in range({mib}):\n        f.write(chunk)"


def one_task_ms(client: httpx.Client, code: str) -> float:
    started = time.perf_counter()
    body = client.post("/v1/execute", json={"code": code, "timeout_s": 60}).json()
    elapsed_ms = (time.perf_counter() - started) * 1000
    if body.get("status") != "succeeded":
        raise SystemExit(f"unexpected answer: {body}")
    return elapsed_ms


def per_task(count: int) -> dict[str, dict[str, dict[str, float]]]:
    """Both servers at once, one task to each in turn (the machine is shared: both see the same load),
    back to back on each one's single container, so each task also waits for the reset before it."""
    with server({"WARMPOOL_SCRATCH": "disk"}, ONE) as (disk_url, _), \
            server({"WARMPOOL_SCRATCH": "memory"}, ONE) as (memory_url, _), \
            httpx.Client(base_url=disk_url, timeout=120) as disk, \
            httpx.Client(base_url=memory_url, timeout=120) as memory:
        clients = {"disk": disk, "memory": memory}
        samples: dict[str, dict[str, list[float]]] = {"disk": {}, "memory": {}}
        for label, code, n in (("warm-up", "pass", 20), ("print('hello')", "print('hello')", count),
                               ("write 16 MiB", WRITE.format(mib=16), count // 4)):
            for _ in range(n):
                for scratch, client in clients.items():
                    samples[scratch].setdefault(label, []).append(one_task_ms(client, code))
        for _ in range(3):  # a tmpfs cannot hold it: 512 MiB of ram
            samples["disk"].setdefault("write 900 MiB", []).append(one_task_ms(disk, WRITE.format(mib=900)))
            # The task after a 900 MiB one waits for the reset that deletes it.
            samples["disk"].setdefault("print('hello') after 900 MiB", []).append(one_task_ms(disk, "print('hello')"))
    return {scratch: {label: summary(values) for label, values in rows.items() if label != "warm-up"}
            for scratch, rows in samples.items()}


def replacement_rate(scratch: str, count: int) -> float:
    statuses, elapsed_s, _ = replacement_run({"WARMPOOL_SCRATCH": scratch}, count)
    if statuses.count("succeeded") != count:
        raise SystemExit(f"replacement run: {statuses}")
    return count / elapsed_s[0]


def store_ms(size_bytes: int, count: int) -> tuple[dict[str, float], dict[str, float]]:
    """make (sparse file, mkfs, loop, mount) and release (unmount, unlink) of one slot, in this process."""
    store = ScratchStore(Settings.scratch_dir, f"bench-store-{secrets.token_hex(3)}", owner_token())
    store.open()
    made, released = [], []
    try:
        for i in range(count):
            started = time.perf_counter()
            slot = store.make(f"s-{i}", size_bytes)
            made.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            store.release(slot)
            released.append((time.perf_counter() - started) * 1000)
    finally:
        store.close()
    return summary(made), summary(released)


async def container_ms(rounds: int) -> dict[str, dict[str, float]]:
    """One container started (create, attach, start, handshake) and removed at a time, with a disk scratch
    and with a tmpfs in turn, in this process: p50 ms of each step."""
    backend = DockerBackend()
    tier = tier_from_dict({"name": "fresh", "cpu": 0.5, "ram": "128MiB", "storage": "64MiB"}, 0)
    instance_id = f"bench-start-{secrets.token_hex(3)}"
    store = ScratchStore(Settings.scratch_dir, instance_id, owner_token())
    store.open()
    steps: dict[str, dict[str, list[float]]] = {"disk": {}, "memory": {}}
    try:
        for _ in range(rounds):
            for scratch, given in (("disk", store), ("memory", None)):
                options = CreateOptions(image=os.environ.get("WARMPOOL_IMAGE", Settings.image),
                                        instance_id=instance_id, owner=owner_token(),
                                        nofile_limit=256, scratch=given)
                started = time.perf_counter()
                handle = await start_container(backend, tier, options)
                steps[scratch].setdefault("start", []).append((time.perf_counter() - started) * 1000)
                handle.close_channel()
                started = time.perf_counter()
                await asyncio.to_thread(backend.remove, handle.container_id)
                steps[scratch].setdefault("docker rm", []).append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                await handle.release_scratch()
                steps[scratch].setdefault("release", []).append((time.perf_counter() - started) * 1000)
    finally:
        store.close()
        backend.close()
    return {scratch: {step: statistics.median(values) for step, values in rows.items()}
            for scratch, rows in steps.items()}


def render(tasks: dict[str, dict[str, dict[str, float]]], rates: dict[str, list[float]],
           store: dict[int, tuple[dict[str, float], dict[str, float]]], starts: dict[str, dict[str, float]],
           args: argparse.Namespace) -> str:
    lines = [HEADING, "",
             f"Command: `python benchmarks/scratch_cost.py --tasks {args.tasks} --replacements {args.replacements} "
             f"--rounds {args.rounds}` "
             f"on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cpus, load average "
             f"{os.getloadavg()[0]:.1f} at the end (the machine is shared).", "",
             "Per task: a server with disk scratch and one with a tmpfs, running at once, sent one task each in "
             "turn; each has one container (1 cpu, 512 MiB ram, 1 GiB storage), so each task also waits for the "
             "reset after the one before it:", "",
             "| task | scratch | n | p50 ms | p95 ms |", "| --- | --- | --- | --- | --- |"]
    for label in tasks["disk"]:
        for scratch in ("disk", "memory"):
            if label in tasks[scratch]:
                row = tasks[scratch][label]
                lines.append(f"| {label} | {scratch} | {row['n']} | {row['p50']:.1f} | {row['p95']:.1f} |")
    def runs(scratch: str) -> str:
        return " and ".join(f"{rate:.1f}" for rate in rates[scratch])

    lines += ["", f"Replacement ({args.replacements} tasks on a `max_uses: 1` tier, 64 MiB storage, 8 clients, "
              f"4 warm, at most 8; two runs of each, alternated): **{runs('disk')} containers/s with disk "
              f"scratch, {runs('memory')}/s with a tmpfs**.", "",
              "One scratch filesystem on its own (this process; sparse file, mkfs.ext4, loop device, mount; then "
              "unmount and unlink):", "", "| size | n | make p50 ms | make p95 ms | release p50 ms |",
              "| --- | --- | --- | --- | --- |"]
    for size, (made, released) in store.items():
        lines.append(f"| {size // MIB} MiB | {made['n']} | {made['p50']:.1f} | {made['p95']:.1f} | "
                     f"{released['p50']:.1f} |")
    lines += ["", f"A container on its own, started (create, attach, start, handshake) then removed, one at a time, "
              f"disk and tmpfs in turn, {args.rounds} of each (p50 ms; the start includes making the "
              "filesystem, `release` is its unmount and unlink after `docker rm`):", "",
              "| scratch | start | docker rm | release |", "| --- | --- | --- | --- |"]
    for scratch, row in starts.items():
        lines.append(f"| {scratch} | {row['start']:.0f} | {row['docker rm']:.0f} | {row['release']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--replacements", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=20, help="containers started and removed, per scratch")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    store = {size: store_ms(size, 20) for size in (128 * MIB, 1024 * MIB)}
    tasks = per_task(args.tasks)
    rates: dict[str, list[float]] = {"disk": [], "memory": []}
    for _ in range(2):  # alternated, so that both see the shared machine's load alike
        for scratch in ("disk", "memory"):
            rates[scratch].append(replacement_rate(scratch, args.replacements))
    starts = asyncio.run(container_ms(args.rounds))
    text = render(tasks, rates, store, starts, args)
    print(text)
    if args.markdown:
        old = args.markdown.read_text() if args.markdown.exists() else ""
        start = old.find(HEADING)
        if start < 0:
            new = old.rstrip() + "\n\n" + text
        else:
            end = old.find("\n## ", start + len(HEADING))
            new = old[:start] + text + (old[end + 1:] if end >= 0 else "")
        args.markdown.write_text(new)


if __name__ == "__main__":
    main()
