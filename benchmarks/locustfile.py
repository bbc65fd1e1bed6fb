"""Load mixes for warmpool, for locust's FastHttpUser.

Choose a mix with WARMPOOL_MIX (default "hello"):
- hello:   print('hello') only
- compute: a ~50 ms pure-Python compute task
- output:  a task that prints 100 KB
- mixed:   70% hello, 15% compute, 10% output, 5% tasks that hit their 1 s time limit
- timeout: only tasks that hit their 1 s time limit
Tasks go to the tier named by WARMPOOL_BENCH_RAM (a request's ram, default unset: the smallest tier), on the
image WARMPOOL_BENCH_IMAGE (default unset: `python`). WARMPOOL_BENCH_CONNECTION=close sends
`Connection: close`, so that every request opens a new connection (default: keep-alive).
With WARMPOOL_API_KEY set (the variable `warmpool run` and `warmpool mcp` read too), every request carries
`Authorization: Bearer <key>`, as a server with WARMPOOL_API_KEYS requires.
A task counts as a failure when the HTTP status is not 200 or its status is not the one expected.
"""

from __future__ import annotations

import os
import random

from locust import FastHttpUser, constant, task

RAM = os.environ.get("WARMPOOL_BENCH_RAM")
MIX = os.environ.get("WARMPOOL_MIX", "hello")
IMAGE = os.environ.get("WARMPOOL_BENCH_IMAGE")
API_KEY = os.environ.get("WARMPOOL_API_KEY")
HEADERS = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
if os.environ.get("WARMPOOL_BENCH_CONNECTION") == "close":
    HEADERS["Connection"] = "close"

HELLO = ("print('hello')", "succeeded")
COMPUTE = ("import time\nend = time.perf_counter() + 0.05\nn = 0\nwhile time.perf_counter() < end:\n    n += 1\n"
           "print(n > 0)", "succeeded")
OUTPUT = ("import sys\nsys.stdout.write('x' * 102400)", "succeeded")
TIMEOUT = ("while True:\n    pass", "timed_out")

MIXES: dict[str, list[tuple[tuple[str, str], int, str]]] = {
    "hello": [(HELLO, 1, "hello")],
    "compute": [(COMPUTE, 1, "compute_50ms")],
    "output": [(OUTPUT, 1, "output_100kb")],
    "timeout": [(TIMEOUT, 1, "timeout_1s")],
    "mixed": [(HELLO, 70, "hello"), (COMPUTE, 15, "compute_50ms"), (OUTPUT, 10, "output_100kb"),
              (TIMEOUT, 5, "timeout_1s")],
}
if MIX not in MIXES:
    raise SystemExit(f"WARMPOOL_MIX must be one of {sorted(MIXES)}, got {MIX!r}")
_CHOICES = [(entry, name) for entry, weight, name in MIXES[MIX] for _ in range(weight)]


class WarmpoolUser(FastHttpUser):
    """Sends tasks back to back (no think time), as a grader or agent framework under load would."""

    wait_time = constant(0)
    connection_timeout = 30.0
    network_timeout = 30.0

    @task
    def execute(self) -> None:
        (code, expected), name = random.choice(_CHOICES)
        body: dict = {"code": code, "timeout_s": 1 if expected == "timed_out" else 10}
        if RAM:
            body["resources"] = {"ram": RAM}
        if IMAGE:
            body["image"] = IMAGE
        with self.client.post("/v1/execute", json=body, name=name, headers=HEADERS, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
                return
            status = response.json().get("status")
            if status != expected:
                response.failure(f"status {status}, expected {expected}")
