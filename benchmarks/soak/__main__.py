"""`make soak`: the mixed load and the fault injector, in embedded mode and then in scale-out mode (two
workers, a redis-server of the soak's own), each for half of --seconds; then the ledger, and exit 1 on any
violation.

Run: .venv/bin/python -m benchmarks.soak [--seconds S] [--clients N] [--seed N] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.results_section import replace_section
from benchmarks.soak import after
from benchmarks.soak.faults import EMBEDDED_KINDS, SCALEOUT_KINDS, Injector
from benchmarks.soak.ledger import RESULT_STATUSES, AsyncTask, Fault, Record, judge, outcome, render
from benchmarks.soak.load import Load
from benchmarks.soak.receiver import Receiver
from benchmarks.soak.stack import Engine, Processes, Redis, Stack

HEADING = "## Chaos soak (make soak)"
CALLBACK_WAIT_S = 75.0  # callbacks retry for about a minute
ASYNC_DRAIN_S = 120.0
PHASE_STOP_S = 100.0  # clients finish the request in hand, the injector its fault


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.run_id = secrets.token_hex(3)
        self.workdir = Path(tempfile.mkdtemp(prefix="wpsoak-"))
        self.procs = Processes(self.workdir)
        self.engine = Engine()
        self.keys = tuple(f"soak-key-{i}-{secrets.token_hex(4)}" for i in range(3))
        self.admin_key = secrets.token_hex(8)
        self.secret = secrets.token_hex(8)
        self.receiver = Receiver(self.secret)
        self.records: list[Record] = []
        self.tasks: list[AsyncTask] = []
        self.faults: list[Fault] = []
        self.checks: dict[str, str] = {}
        self.notes: list[str] = []

    def clock(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        print(f"[soak {self.clock():7.1f}s] {text}", flush=True)

    async def phase(self, mode: str, seconds: float, seed: int) -> None:
        redis_server = Redis(self.procs, self.args.redis_port, self.workdir / "redis") if mode == "scaleout" else None
        stack = Stack(self.procs, self.engine, f"{self.run_id}{mode[0]}", self.workdir / mode, self.keys,
                      self.admin_key, self.secret, redis=redis_server)
        if redis_server is not None:
            redis_server.start()
            stack.start_worker()
            stack.start_worker()
        stack.start_api()
        try:
            await asyncio.to_thread(stack.wait_ready)
            rss_start = after.rss_bytes(stack.api_pid())
            self.say(f"{mode}: ready on {stack.url}, API RSS {rss_start // after.MIB} MiB; load for {seconds:.0f} s")
            load = Load(stack.url, mode, self.keys, self.clock, self.receiver.url)
            gap = tuple(float(x) for x in self.args.fault_gap_s.split(","))
            injector = Injector(self.engine, stack, load, self.clock, random.Random(seed), (gap[0], gap[1]))
            async with asyncio.TaskGroup() as group:
                group.create_task(load.run(self.args.clients, seed))
                group.create_task(injector.run(SCALEOUT_KINDS if redis_server else EMBEDDED_KINDS))
                group.create_task(self.supervise(stack, load.stopping))
                await asyncio.sleep(seconds)
                load.stopping.set()
                self.say(f"{mode}: stopping the load and the injector")
            self.records += load.records
            self.faults += injector.faults
            self.notes += [f"fault not fired: {e}" for e in injector.errors]
            self.notes += [f"{mode}: dockerd restart: stopped after {stop_s:.1f} s, answering again after "
                           f"{up_s:.1f} s (recovery counts from the stop's start)"
                           for stop_s, up_s in injector.engine_restarts_s]
            await self.settle(stack, load)
            recovered_s = await asyncio.to_thread(after.wait_pools_at_target, stack)
            self.checks[f"{mode}: pool back to targets (bound {after.POOL_RECOVERY_BOUND_S:.0f} s)"] = (
                "" if recovered_s is not None else "not within the bound")
            self.notes.append(f"{mode}: pool back to targets {recovered_s and round(recovered_s, 1)} s "
                              "after the load and faults stopped")
            rss_end = after.rss_bytes(stack.api_pid())
            self.notes.append(f"{mode}: API RSS {rss_start // after.MIB} MiB when ready, "
                              f"{rss_end // after.MIB} MiB at the end")
            self.checks[f"{mode}: API memory (within {after.RSS_SLACK_BYTES // after.MIB} MiB of the start)"] = (
                after.memory_check(rss_start, rss_end))
        finally:
            await asyncio.to_thread(stack.stop)
        if redis_server is not None:
            left = after.redis_keys_left(redis_server.url, f"soak{stack.run_id}")
            self.checks[f"{mode}: Redis keys without expiry (idle bookkeeping aside)"] = left
            redis_server.stop()
        self.checks[f"{mode}: containers"] = await asyncio.to_thread(after.containers_left, self.engine,
                                                                     stack.instance_ids)
        self.checks[f"{mode}: scratch mounts, loop devices"] = await asyncio.to_thread(after.scratch_left,
                                                                                      stack.scratch_dir)
        self.checks[f"{mode}: temporary files"] = after.tmp_left(stack.tmp_dir)

    async def supervise(self, stack: Stack, stopping: asyncio.Event) -> None:
        """Restart workers that exited by themselves, after a supervisor's usual delay."""
        while not stopping.is_set():
            await asyncio.sleep(2)
            for line in stack.revive_exited_workers():
                self.say(f"supervisor: {line}")
                self.notes.append(f"supervisor: {line}")

    async def settle(self, stack: Stack, load: Load) -> None:
        """Follow async tasks still pending, then give callbacks their retry window."""
        pending = [t for t in load.tasks if not _final(t.final)]
        if pending:
            self.say(f"{load.mode}: following {len(pending)} pending async task(s)")
            async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
                deadline = time.monotonic() + ASYNC_DRAIN_S
                await asyncio.gather(*(load.follow(client, t, deadline) for t in pending))
        wanted = [t for t in load.tasks if t.callback_wanted and _final(t.final)]
        deadline = time.monotonic() + CALLBACK_WAIT_S
        # The receiver runs in threads of its own: polled.
        while time.monotonic() < deadline and any(not self.receiver.received(t.task_id)[0] for t in wanted):  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        await asyncio.sleep(3)  # a duplicate would come right after
        for task in load.tasks:
            task.callbacks, task.callback_bad_signature = self.receiver.received(task.task_id)
        self.tasks += load.tasks

    async def main(self) -> int:
        self.say(f"starting the soak's own engine ({self.engine.host}); work dir {self.workdir}")
        await asyncio.to_thread(self.engine.start)
        self.receiver.start()
        try:
            modes = [m for m in self.args.modes.split(",") if m]
            for i, mode in enumerate(modes):
                await self.phase(mode, self.args.seconds / len(modes), self.args.seed + 1000 * i)
        finally:
            self.receiver.stop()
            self.procs.stop_all()
            await asyncio.to_thread(self.engine.stop)
        verdict = judge(self.records, self.tasks, self.faults, self.checks)
        table = render(verdict, self.records, self.tasks)
        print(table)
        for note in self.notes:
            print(f"- {note}")
        if verdict.violations:
            print("VIOLATIONS:\n  " + "\n  ".join(verdict.violations))
            self.print_examples()
        else:
            print("soak: no violation")
        if self.args.markdown:
            replace_section(Path(self.args.markdown), HEADING, self.section(table))
        return 0 if verdict.ok else 1

    def print_examples(self) -> None:
        shown = 0
        for record in self.records:
            result = outcome(record)
            if result.startswith("!") and shown < 15:
                shown += 1
                print(f"  e.g. {record.mode} {record.kind} at {record.started_s:.1f}s: {result} "
                      f"{record.status_code} {str(record.body)[:300]} {record.error[:200]}")

    def section(self, table: str) -> str:
        load = os.getloadavg()
        return "\n".join([
            HEADING, "",
            f"`make soak SOAK_S={self.args.seconds:.0f}` ({self.args.clients} clients, seed {self.args.seed}); "
            f"{platform.node()}, {os.cpu_count()} cores, load average "
            f"{load[0]:.2f} at the end; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
            table, "", *[f"- {note}" for note in self.notes], ""])


def _final(body: Any) -> bool:
    return isinstance(body, dict) and body.get("status") in RESULT_STATUSES




def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak")
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_S", "600")))
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--seed", type=int, default=int(os.environ.get("SOAK_SEED", "16")))
    parser.add_argument("--fault-gap-s", default="6,14", help="min,max seconds between faults")
    parser.add_argument("--modes", default="embedded,scaleout")
    parser.add_argument("--redis-port", type=int, default=int(os.environ.get("SOAK_REDIS_PORT", "6420")))
    parser.add_argument("--markdown", default=None, help="replace the soak's section of this file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("the soak starts a dockerd of its own and loop-mounts scratch: run it as root")
    sys.exit(asyncio.run(Run(parse_args(sys.argv[1:])).main()))
