"""`warmpool run` as a subprocess against a real server: output, exit codes, local files, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from warmpool import run_cmd

pytestmark = pytest.mark.docker



def run(service_url: str, *args: str, stdin: str | None = None, merged: bool = False, key: str | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WARMPOOL_URL": service_url}
    env.pop("WARMPOOL_API_KEY", None)
    if key is not None:
        env["WARMPOOL_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "warmpool", "run", *args], input=stdin, capture_output=not merged,
                          stdout=subprocess.PIPE if merged else None, stderr=subprocess.STDOUT if merged else None,
                          text=True, env=env, cwd=cwd or REPO, timeout=120)


def test_run_prints_the_output_and_exits_with_the_tasks_code(serve, tmp_path):
    svc = serve(env={"WARMPOOL_API_KEYS": "k1"})
    script = tmp_path / "job.py"
    script.write_text("import sys\nprint('hello', sys.stdin.read())\nprint('oops', file=sys.stderr)\nsys.exit(3)\n")
    (tmp_path / "input.txt").write_text("from a file")
    done = run(svc.base_url, str(script), "--stdin", str(tmp_path / "input.txt"), "--ram", "64MiB", key="k1")
    assert (done.returncode, done.stdout, done.stderr) == (3, "hello from a file\n", "oops\n")

    from_stdin = run(svc.base_url, "--cpu", "0.5", stdin="print(6 * 7)", key="k1")
    assert (from_stdin.returncode, from_stdin.stdout, from_stdin.stderr) == (0, "42\n", "")
    timed_out = run(svc.base_url, "-", "--timeout", "1", stdin="while True: pass", key="k1")
    assert timed_out.returncode == run_cmd.EXIT_TIMED_OUT == 124 and "timed_out" in timed_out.stderr
    oom = run(svc.base_url, "--ram", "64MiB", stdin="x = bytearray(200 * 1024 * 1024)", key="k1")
    assert oom.returncode == run_cmd.EXIT_MEMORY == 137 and "memory_exceeded" in oom.stderr


def test_run_exits_69_with_a_message_for_http_errors(serve, tmp_path):
    svc = serve(env={"WARMPOOL_API_KEYS": "k1"})
    invalid = run(svc.base_url, "--ram", "lots", stdin="print(1)", key="k1")
    assert invalid.returncode == run_cmd.EXIT_HTTP_ERROR == 69
    assert "HTTP 422" in invalid.stderr and "resources.ram" in invalid.stderr and invalid.stdout == ""
    denied = run(svc.base_url, stdin="print(1)", key="wrong")
    assert denied.returncode == 69 and "HTTP 403" in denied.stderr
    unreachable = run("http://127.0.0.1:9", stdin="print(1)")
    assert unreachable.returncode == 69 and "127.0.0.1:9" in unreachable.stderr
    missing = run(svc.base_url, str(tmp_path / "no-such-file.py"), key="k1")
    assert missing.returncode == run_cmd.EXIT_USAGE == 2 and "cannot read" in missing.stderr
    bad_flag = run(svc.base_url, "--timeout", "soon", stdin="print(1)", key="k1")
    assert bad_flag.returncode == 2


def test_run_uploads_files_and_writes_returned_ones(serve, tmp_path):
    svc = serve()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.csv").write_text("a,b\n1,2\n")
    (tmp_path / "bytes.bin").write_bytes(b"\x00\x01\xff")
    code = ("import pathlib\n"
            "pathlib.Path('out').mkdir()\n"
            "pathlib.Path('out/rows.txt').write_text(str(len(pathlib.Path('data/in.csv').read_text().splitlines())))\n"
            "print(pathlib.Path('renamed.bin').read_bytes().hex())\n")
    done = run(svc.base_url, "--file", "data/in.csv", "--file", "bytes.bin=renamed.bin", "--output", "out/*.txt",
               "--out-dir", str(tmp_path / "results"), stdin=code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "0001ff\n"
    assert (tmp_path / "results" / "out" / "rows.txt").read_text() == "2"


def test_run_streams_output_in_the_order_it_was_written(serve):
    svc = serve()
    code = ("import sys, time\n"
            "print('first', flush=True)\ntime.sleep(0.5)\n"
            "print('second', file=sys.stderr, flush=True)\ntime.sleep(0.5)\n"
            "print('third', flush=True)\n")
    merged = run(svc.base_url, stdin=code, merged=True)
    assert merged.returncode == 0 and merged.stdout == "first\nsecond\nthird\n"

    # The first line is on our side while the task is still running (it sleeps 5 s after it).
    env = {**os.environ, "WARMPOOL_URL": svc.base_url}
    with subprocess.Popen([sys.executable, "-m", "warmpool", "run"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, env=env, cwd=REPO) as process:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write("import time\nprint('early', flush=True)\ntime.sleep(5)\nprint('late')\n")
        process.stdin.close()
        assert process.stdout.readline() == "early\n"
        assert process.poll() is None, "the first line came only after the task ended"
        assert process.stdout.read() == "late\n" and process.wait(60) == 0
