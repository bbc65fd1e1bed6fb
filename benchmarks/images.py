"""What the datascience image costs and gives, beside the python image, from one run.

Run: .venv/bin/python benchmarks/images.py [--requests N] [--fresh N] [--markdown benchmarks/RESULTS.md]
It starts `warmpool serve` on a loopback port with one tier per image (two containers each, so that a
request never waits for the previous one's reset), then, through HTTP with one keep-alive client:
`print('hello')` on both images; `import numpy, pandas` (printing their versions) on the warm datascience
pool; the same in a fresh interpreter (`python3 -c`, started by a task in the same kind of container);
the page faults and resident memory of a task's process; each idle container's memory (its cgroup);
and how many containers were replaced. With --markdown it replaces its section of that file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import docker
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import free_port, summary, wait_ready  # noqa: E402
from results_section import replace_section  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HEADING = "## Images: datascience beside python (benchmarks/images.py)"
TIERS = {"tiers": [
    {"name": "py", "image": "python", "cpu": 1, "ram": "256MiB", "storage": "256MiB", "min_idle": 2, "max_size": 2},
    {"name": "ds", "image": "datascience", "cpu": 1, "ram": "1GiB", "storage": "256MiB", "min_idle": 2,
     "max_size": 2},
]}
HELLO = "print('hello')"
IMPORT = "import numpy, pandas\nprint(numpy.__version__, pandas.__version__)"
# A task's own process: its page faults and peak memory since it was forked from the template.
FAULTS = "import resource\nu = resource.getrusage(resource.RUSAGE_SELF)\nprint(u.ru_minflt, u.ru_majflt, u.ru_maxrss)"
FRESH = """
import subprocess, sys, time
started = time.perf_counter()
done = subprocess.run([sys.executable, '-c', 'import numpy, pandas; print(numpy.__version__, pandas.__version__)'],
                      capture_output=True, text=True)
print((time.perf_counter() - started) * 1000, done.returncode)
"""


def run_series(client: httpx.Client, image: str, code: str, count: int) -> dict[str, list[float]]:
    totals, runs, queues = [], [], []
    for _ in range(count):
        started = time.perf_counter()
        body = client.post("/v1/execute", json={"code": code, "image": image}).json()
        totals.append((time.perf_counter() - started) * 1000)
        assert body["status"] == "succeeded", body
        runs.append(body["timings"]["run_ms"])
        queues.append(body["timings"]["queue_ms"])
    return {"total": totals, "run": runs, "queue": queues}


def stdout_of(client: httpx.Client, image: str, code: str) -> str:
    body = client.post("/v1/execute", json={"code": code, "image": image, "timeout_s": 30}).json()
    assert body["status"] == "succeeded", body
    return str(body["stdout"])


def idle_memory(instance_id: str) -> dict[str, list[dict[str, int]]]:
    """Each container's memory cgroup, by tier: usage less page cache (what `docker stats` shows) and its
    processes' anonymous memory (cgroup v2 `anon`, v1 `total_rss`)."""
    client = docker.from_env()
    try:
        found: dict[str, list[dict[str, int]]] = {}
        for container in client.containers.list(filters={"label": f"warmpool.instance={instance_id}"}):
            stats = container.stats(stream=False)["memory_stats"]
            detail = stats.get("stats", {})
            cache = detail.get("inactive_file", detail.get("total_inactive_file", 0))
            found.setdefault(container.labels["warmpool.tier"], []).append(
                {"usage": int(stats.get("usage", 0)) - int(cache),
                 "anon": int(detail.get("anon", detail.get("total_rss", 0)))})
        return found
    finally:
        client.close()


def replacements(client: httpx.Client) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        match = re.match(r'warmpool_container_replacements_total\{.*tier="([^"]+)".*\} (\S+)', line)
        if match:
            out[match.group(1)] = out.get(match.group(1), 0.0) + float(match.group(2))
    return out


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    tiers_path = workdir / "tiers.json"
    tiers_path.write_text(json.dumps(TIERS))
    port, instance_id = free_port(), f"bench-images-{secrets.token_hex(3)}"
    env = {**os.environ, "WARMPOOL_TIERS_FILE": str(tiers_path), "WARMPOOL_INSTANCE_ID": instance_id,
           "WARMPOOL_WARMING": "off"}
    log = open(workdir / "serve.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen([sys.executable, "-m", "warmpool", "serve", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    results: dict[str, Any] = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            if not wait_ready(client, 180):
                raise SystemExit(f"the server did not become ready:\n{(workdir / 'serve.log').read_text()[-3000:]}")
            time.sleep(3)  # let the containers settle before reading their memory
            results["idle"] = idle_memory(instance_id)
            for image, code in (("python", HELLO), ("datascience", HELLO), ("datascience", IMPORT)):
                run_series(client, image, code, 20)  # warm-up: caches, the first forks
            results["hello"] = {image: run_series(client, image, HELLO, args.requests)
                                for image in ("python", "datascience")}
            results["import"] = run_series(client, "datascience", IMPORT, args.requests)
            results["faults"] = {image: [int(x) for x in stdout_of(client, image, FAULTS).split()]
                                 for image in ("python", "datascience")}
            fresh = [stdout_of(client, "datascience", FRESH).split() for _ in range(args.fresh)]
            assert all(code == "0" for _, code in fresh), fresh
            results["fresh"] = [float(ms) for ms, _ in fresh]
            results["tasks"] = 2 * args.requests + args.requests + 60 + 2 + args.fresh
            results["replaced"] = replacements(client)
            results["load"] = os.getloadavg()
    finally:
        server.terminate()
        server.wait(60)
        log.close()
    return results


def render(results: dict[str, Any], command: str) -> str:
    def row(name: str, samples: list[float]) -> str:
        s = summary(samples)
        return f"| {name} | {s['n']:.0f} | {s['p50']:.2f} | {s['p95']:.2f} | {s['p99']:.2f} |"

    mib = 1024 ** 2
    lines = [HEADING, "", f"Command: `{command}`", "",
             f"Machine: {os.cpu_count()} cpus, {platform.python_implementation()} {platform.python_version()}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
             f"{' / '.join(f'{x:.2f}' for x in results['load'])} at the end (nothing else was running). One "
             "keep-alive client, sequential requests; each tier has two warm containers.", "",
             "| task | n | p50 ms | p95 ms | p99 ms |", "| --- | --- | --- | --- | --- |"]
    for image in ("python", "datascience"):
        lines.append(row(f"`print('hello')` on `{image}`, HTTP round trip", results["hello"][image]["total"]))
        lines.append(row("... of which run_ms", results["hello"][image]["run"]))
        lines.append(row("... of which queue_ms (waiting for a container's reset)", results["hello"][image]["queue"]))
    lines.append(row("`import numpy, pandas` + print versions on `datascience`, HTTP round trip",
                     results["import"]["total"]))
    lines.append(row("... of which run_ms", results["import"]["run"]))
    lines.append(row("... of which queue_ms", results["import"]["queue"]))
    lines.append(row("the same in a fresh `python3 -c` (timed inside a datascience task)", results["fresh"]))
    lines += ["", "| | python | datascience |", "| --- | --- | --- |"]
    idle = results["idle"]
    for key, label in (("usage", "idle container, memory (MiB, as `docker stats` shows it)"),
                       ("anon", "idle container, anonymous memory of its processes (MiB)")):
        cells = [", ".join(f"{c[key] / mib:.1f}" for c in idle.get(tier, [])) for tier in ("py", "ds")]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    faults = results["faults"]
    lines.append(f"| a task's minor page faults since its fork (`print` of getrusage) | {faults['python'][0]} | "
                 f"{faults['datascience'][0]} |")
    lines.append(f"| a task's peak RSS (MiB; shared pages of the template included) | "
                 f"{faults['python'][2] / 1024:.1f} | {faults['datascience'][2] / 1024:.1f} |")
    replaced = results["replaced"]
    lines.append(f"| containers replaced during the run | {replaced.get('py', 0):.0f} | {replaced.get('ds', 0):.0f} |")
    lines += ["", f"Tasks run: {results['tasks']} in all. run_ms is the runner's own measure (from the code sent "
                  "to the task's child until the child said it was done, or exited); queue_ms is the wait for a "
                  "container of the tier (both were busy with a task or its reset); the rest of the round trip "
                  "is HTTP, the frames and the server."]
    return "\n".join(lines) + "\n"




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="sequential requests per series")
    parser.add_argument("--fresh", type=int, default=20, help="fresh-interpreter imports")
    parser.add_argument("--markdown", type=Path, help="replace this script's section of that file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="warmpool-bench-images-") as tmp:
        results = measure(args, Path(tmp))
    section = render(results, ("python benchmarks/images.py " + " ".join(sys.argv[1:])).strip())
    print(section)
    if args.markdown:
        replace_section(args.markdown, HEADING, section)


if __name__ == "__main__":
    main()
