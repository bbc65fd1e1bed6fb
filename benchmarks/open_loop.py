"""Open-loop load: requests sent at a constant arrival rate, whatever the answers do.

Run: .venv/bin/python benchmarks/open_loop.py URL --rate 300 --seconds 30 [--connections 64] [--body JSON]

A closed loop of N users only measures its own queue at saturation (Little's law: the wait is N over the
rate); here the i-th request is due at start + i / rate and its latency is counted from that moment, so a
server that falls behind shows it in the tail (no coordinated omission). Requests go over a pool of
keep-alive HTTP/1.1 connections, opened at the start; a request due while every connection is busy
waits for one, and that wait counts. The client is a bare asyncio HTTP/1.1 writer and reader (uvloop when
installed) so that it costs little cpu beside the server; its own cpu is printed with the figures. Prints
one JSON object: the rate asked for and achieved, the count, failures, p50/p90/p99/max in ms, the share of
requests sent more than 1 ms late, the client's cpu ms per request, and how many requests took over
SLOW_MS in each second of the run (whether the tail is one stall or spread).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import time
from typing import Any
from urllib.parse import urlsplit

from latency import percentile

SLOW_MS = 50.0  # a request slower than this counts in `slow_by_second` (seconds from the start: a burst or a trickle)


class ConnectionClosedIdle(ConnectionError):
    """The server had closed the connection before this request (no status line came back)."""


class Connection:
    """One keep-alive connection: write a POST, read the answer (Content-Length bodies only, as uvicorn
    sends for a JSON response)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def post(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionClosedIdle("the server closed the connection")
        status = int(status_line.split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)


def build_request(host: str, path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def run(url: str, rate: float, seconds: float, connections: int, body: dict[str, Any],
              expect_stdout: str | None) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = build_request(f"{host}:{port}", "/v1/execute", json.dumps(body).encode())
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(Connection(*await asyncio.open_connection(host, port)))
    count = int(rate * seconds)
    latencies: list[float] = []
    slow_by_second: collections.Counter[int] = collections.Counter()  # when the tail happened
    late = failures = 0

    async def one(due: float) -> None:
        nonlocal failures
        connection = await idle.get()
        try:
            try:
                status, answer = await connection.post(request)
            except ConnectionClosedIdle:  # the server's keep-alive timeout closed it while it waited here
                connection = Connection(*await asyncio.open_connection(host, port))
                status, answer = await connection.post(request)
            ok = status == 200 and (expect_stdout is None or json.loads(answer).get("stdout") == expect_stdout)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            ok = False
            connection = Connection(*await asyncio.open_connection(host, port))
        idle.put_nowait(connection)
        latencies.append((time.perf_counter() - due) * 1000)
        if latencies[-1] > SLOW_MS:
            slow_by_second[int(due - start)] += 1
        failures += not ok

    cpu_before = os.times()
    start = time.perf_counter() + 0.1  # not loop.time(): uvloop's clock ticks in whole milliseconds
    pending = set()
    for index in range(count):
        due = start + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.001:
            late += 1
        task = asyncio.create_task(one(due))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    elapsed_s = time.perf_counter() - start
    cpu_after = os.times()
    while not idle.empty():
        idle.get_nowait().writer.close()
    cpu_ms = (cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system) * 1000
    return {"rate_asked": rate, "rate_done": count / elapsed_s, "count": count, "failures": failures,
            "p50": percentile(latencies, 0.5), "p90": percentile(latencies, 0.9), "p99": percentile(latencies, 0.99),
            "max": max(latencies), "late_share": late / count, "connections": connections,
            "client_cpu_ms": cpu_ms / count, "slow_ms": SLOW_MS,
            "slow_by_second": dict(sorted(slow_by_second.items()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--body", type=json.loads, default={"code": "print('hello')"})
    parser.add_argument("--expect-stdout", default="hello\n")
    args = parser.parse_args()
    try:
        import uvloop  # the server's own loop; a cheaper client leaves more of the machine to the server
        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(run(args.url, args.rate, args.seconds, args.connections, args.body,
                                     args.expect_stdout or None))))


if __name__ == "__main__":
    main()
