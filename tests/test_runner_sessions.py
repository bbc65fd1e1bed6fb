"""The runner's streamed output (`run` with `stream`) and its sessions (`session_open`, `session_run`,
`session_close`), over the frame protocol in real hardened containers (see tests/test_runner.py)."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from typing import Any

import pytest

from tests import test_runner
from tests.runner_harness import RUN_DEFAULTS, RunnerContainer
from tests.test_runner import run_ok

pytestmark = pytest.mark.docker
# The same containers as tests/test_runner.py's (a fresh one per test, all removed afterwards).
engine, scratch, runner_image = test_runner.engine, test_runner.scratch, test_runner.runner_image
runner, box = test_runner.runner, test_runner.box

LIMITS = {"fsize_limit_bytes": RUN_DEFAULTS["fsize_limit_bytes"], "nofile_limit": RUN_DEFAULTS["nofile_limit"]}
CALL_DEFAULTS = {"stdin": "", "timeout_s": 10.0, "output_limit_bytes": RUN_DEFAULTS["output_limit_bytes"]}


def frames_until(box: RunnerContainer, frame_id: str, last_ops: set[str], wait_s: float = 60) -> list[dict[str, Any]]:
    """Every frame answering `frame_id` up to and including the first whose op is in `last_ops`."""
    frames = []
    while True:
        frame = box.recv(wait_s)
        assert frame["id"] == frame_id, frame
        frames.append(frame)
        if frame["op"] in last_ops:
            return frames


def streamed_run(box: RunnerContainer, code: str, **fields: Any) -> tuple[list[tuple[float, dict]], dict, dict]:
    """A `run` with `stream`: ([(arrival time, output frame)], result, reset)."""
    frame_id = secrets.token_hex(4)
    box.send({"op": "run", "id": frame_id, "code": code, "stream": True, **{**RUN_DEFAULTS, **fields}})
    outputs = []
    while True:
        frame = box.recv()
        assert frame["id"] == frame_id, frame
        if frame["op"] != "output":
            break
        outputs.append((time.time(), frame))
    assert frame["op"] == "result", frame
    reset = box.recv()
    assert (reset["op"], reset["id"]) == ("reset", frame_id), reset
    return outputs, frame, reset


def joined(outputs: list[tuple[float, dict]], stream: str) -> str:
    return "".join(frame["text"] for _, frame in outputs if frame["stream"] == stream)


class Session:
    """A session opened on a runner container, driven frame by frame."""

    def __init__(self, box: RunnerContainer) -> None:
        self.box = box
        frame_id = secrets.token_hex(4)
        box.send({"op": "session_open", "id": frame_id, **LIMITS})
        opened = box.recv()
        assert opened == {"op": "session_opened", "id": frame_id, "ok": True, "detail": ""}, opened

    def call(self, code: str, *, stream: bool = False, **fields: Any) -> tuple[list[dict], dict, dict | None]:
        """(output frames, result, reset or None); a reset follows only when the call ended the session."""
        frame_id = secrets.token_hex(4)
        self.box.send({"op": "session_run", "id": frame_id, "code": code, "stream": stream,
                       **{**CALL_DEFAULTS, **fields}})
        frames = frames_until(self.box, frame_id, {"result", "error"})
        result = frames[-1]
        assert result["op"] == "result", result
        reset = None
        if result["session_ended"]:
            reset = self.box.recv()
            assert (reset["op"], reset["id"]) == ("reset", frame_id), reset
        return frames[:-1], result, reset

    def ok(self, code: str, **fields: Any) -> str:
        """Run a call that must succeed and keep the session; its stdout."""
        _, result, _ = self.call(code, **fields)
        assert (result["status"], result["session_ended"]) == ("succeeded", None), result
        return result["stdout"]

    def close(self) -> dict:
        frame_id = secrets.token_hex(4)
        self.box.send({"op": "session_close", "id": frame_id})
        reset = self.box.recv()
        assert (reset["op"], reset["id"]) == ("reset", frame_id), reset
        return reset


# ---- streaming ------------------------------------------------------------------------------------

def test_streamed_output_arrives_while_the_task_still_runs(box):
    code = ("import sys, time\nprint('first', flush=True)\nprint('stamp', time.time(), flush=True)\n"
            "print('oops', file=sys.stderr)\ntime.sleep(3)\nprint('last')")
    outputs, result, reset = streamed_run(box, code)
    assert result["status"] == "succeeded" and reset["clean"] is True
    assert joined(outputs, "stdout") == result["stdout"] and result["stdout"].startswith("first\n")
    assert joined(outputs, "stderr") == result["stderr"] == "oops\n"
    # The frame holding the timestamp came before the task's sleep ended (containers share the host's clock).
    arrived, printed_at = next((arrived, float(line.split()[1])) for arrived, frame in outputs
                               for line in frame["text"].splitlines() if line.startswith("stamp "))
    assert arrived < printed_at + 3, "the chunk reached us only after the task's sleep"
    assert all(set(frame) == {"op", "id", "stream", "text"} for _, frame in outputs)


def test_fast_output_is_coalesced_into_few_frames(box):
    code = "import sys\nfor i in range(20000):\n    print(i, flush=True)"
    outputs, result, reset = streamed_run(box, code)
    assert result["status"] == "succeeded" and reset["clean"] is True
    assert joined(outputs, "stdout") == result["stdout"] == "".join(f"{i}\n" for i in range(20000))
    assert len(outputs) < 2000, f"{len(outputs)} frames for 20000 flushed writes"


def test_streamed_output_stays_within_the_cap(box):
    outputs, result, reset = streamed_run(box, "while True:\n    print('x' * 999, flush=True)",
                                          output_limit_bytes=50_000)
    assert result["status"] == "output_limit_exceeded" and result["stdout_truncated"] is True
    assert joined(outputs, "stdout") == result["stdout"] == ("x" * 999 + "\n") * 50
    assert reset["clean"] is True


def test_a_character_split_across_writes_is_never_split_across_frames(box):
    code = ("import os, time\ndata = 'héllo wörld €'.encode()\n"
            "for i in range(len(data)):\n    os.write(1, data[i:i + 1])\n    time.sleep(0.02)")
    outputs, result, _ = streamed_run(box, code)
    assert joined(outputs, "stdout") == result["stdout"] == "héllo wörld €"
    assert len(outputs) > 1 and "\ufffd" not in joined(outputs, "stdout")


def test_a_run_without_stream_sends_no_output_frames(box):
    result = run_ok(box, "print('quiet')")
    assert result["stdout"] == "quiet\n"


# ---- sessions -------------------------------------------------------------------------------------

def test_a_session_keeps_globals_imports_and_files_between_calls(box):
    session = Session(box)
    assert session.ok("x = 41 + 1\nimport json\nopen('notes.txt', 'w').write('kept')") == ""
    assert session.ok("print(x, json.dumps([x]), open('notes.txt').read())") == "42 [42] kept\n"
    assert session.ok("def double(v):\n    return 2 * v") == ""
    assert session.ok("print(double(x))") == "84\n"
    assert session.ok("import sys\nprint(sys.stdin.read())", stdin="per call") == "per call\n"
    assert session.ok("import sys\nprint(repr(sys.stdin.read()))") == "''\n", "each call has its own stdin"
    _, failed, _ = session.call("print(double(None))")
    assert (failed["status"], failed["exit_code"], failed["session_ended"]) == ("failed", 1, None)
    assert 'File "<cell 3>", line 2, in double' in failed["stderr"], failed["stderr"]
    assert "return 2 * v" in failed["stderr"] and "/opt/warmpool" not in failed["stderr"]
    _, exited, _ = session.call("raise SystemExit(3)")
    assert (exited["status"], exited["exit_code"], exited["session_ended"]) == ("failed", 3, None)
    assert session.ok("print(x)") == "42\n", "SystemExit ends the call, not the session"
    assert session.close()["clean"] is True


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def returned(result: dict) -> dict[str, bytes | None]:
    """A result's files as {path: content} (None where the budget left it out)."""
    return {e["path"]: None if e["content"] is None else base64.b64decode(e["content"]) for e in result["files"]}


def test_a_sessions_calls_take_files_and_give_outputs_back(box):
    session = Session(box)
    _, first, _ = session.call("print(open('data/in.csv').read().split())\nopen('made.txt', 'w').write('call 1')",
                               files=[{"path": "data/in.csv", "content": b64(b"a,b\n1,2\n")}], outputs=["*.txt"])
    assert (first["status"], first["stdout"], first["session_ended"]) == ("succeeded", "['a,b', '1,2']\n", None)
    assert first["files"] == [{"path": "made.txt", "size_bytes": 6, "encoding": "base64", "content": b64(b"call 1")}]
    assert first["files_truncated"] is False
    # Files persist: the CSV sent in call 1 and the file call 1 wrote are there in call 2; a file sent again
    # replaces the old one; outputs are this call's only (a call without `outputs` gives none back).
    assert session.ok("print(open('data/in.csv').read().count(',') + len(open('made.txt').read()))") == "8\n"
    _, second, _ = session.call("open('data/more.csv', 'w').write('c')", outputs=["made.txt", "data/**"],
                                files=[{"path": "data/in.csv", "content": b64(b"new")}])
    assert returned(second) == {"made.txt": b"call 1", "data/in.csv": b"new", "data/more.csv": b"c"}, second
    _, third, _ = session.call("print('no outputs asked')")
    assert (third["files"], third["files_truncated"]) == ([], False)
    # Larger than a pipe's buffer both ways, and past the budget: listed without content.
    big = secrets.token_bytes(3 << 20)
    _, large, _ = session.call("import hashlib\nd = open('in.bin', 'rb').read()\nprint(hashlib.sha256(d).hexdigest())\n"
                               "open('out.bin', 'wb').write(d[::-1])\nopen('huge.bin', 'wb').truncate(9 << 20)",
                               files=[{"path": "in.bin", "content": b64(big)}], outputs=["out.bin", "huge.bin"],
                               max_output_files_bytes=8 << 20)
    assert large["status"] == "succeeded" and large["stdout"] == hashlib.sha256(big).hexdigest() + "\n"
    assert returned(large) == {"huge.bin": None, "out.bin": big[::-1]} and large["files_truncated"] is True
    assert session.close()["clean"] is True


def test_a_file_that_cannot_be_written_fails_the_call_and_the_session_goes_on(box):
    session = Session(box)
    session.ok("import os\nos.mkdir('taken')\nx = 7")
    # The code does not run; the files after the bad one are still read off the go pipe, so the next call
    # is not mistaken for their bytes.
    _, bad, _ = session.call("print('ran')", files=[{"path": "taken", "content": b64(b"x")},
                                                    {"path": "after.txt", "content": b64(b"y" * (1 << 20))}])
    assert (bad["status"], bad["stdout"], bad["session_ended"]) == ("failed", "", None), bad
    assert "could not write files[0] 'taken'" in bad["stderr"], bad["stderr"]
    assert session.ok("print(x, sorted(os.listdir('.')))") == "7 ['taken']\n"
    # A symlink the session planted at a file's path is replaced, never written through.
    session.ok("os.symlink('/tmp/home/target', 'link.txt')")
    look = "print(os.path.islink('link.txt'), open('link.txt').read(), os.path.exists('/tmp/home/target'))"
    _, linked, _ = session.call(look, files=[{"path": "link.txt", "content": b64(b"z")}])
    assert linked["stdout"] == "False z False\n", linked
    assert session.close()["clean"] is True


def test_a_closed_session_leaves_nothing_for_the_next_task(box):
    session = Session(box)
    session.ok("import subprocess, os\nsubprocess.Popen(['sleep', '300'])\nopen('/tmp/left', 'w').write('x')\n"
               "os.makedirs('/dev/shm/deep/er', exist_ok=True)\nsecret = 'WPSESSION-1'")
    assert session.ok("print(secret, os.path.exists('/tmp/left'))") == "WPSESSION-1 True\n"
    reset = session.close()
    assert (reset["clean"], reset["detail"]) == (True, "")
    result = run_ok(box, "import os\nprint(sorted(os.listdir('/tmp')), os.listdir('/dev/shm'),"
                         " [p for p in os.listdir('/proc') if p.isdigit()].__len__())")
    assert result["stdout"] == "['home', 'work'] [] 3\n", result["stdout"]


def test_a_timed_out_call_is_interrupted_and_the_session_keeps_its_state(box):
    session = Session(box)
    session.ok("x = 'kept'")
    started = time.monotonic()
    _, result, reset = session.call("print('working', flush=True)\nwhile True: pass", timeout_s=0.5)
    assert (result["status"], result["session_ended"], reset) == ("timed_out", None, None), result
    assert result["stdout"] == "working\n" and result["stderr"].endswith("KeyboardInterrupt\n")
    assert "/opt/warmpool" not in result["stderr"] and "<cell 2>" in result["stderr"]
    assert time.monotonic() - started < 5
    _, slept, _ = session.call("import time\ntime.sleep(30)", timeout_s=0.5)
    assert (slept["status"], slept["session_ended"]) == ("timed_out", None)
    assert session.ok("print(x)") == "kept\n"
    assert session.close()["clean"] is True


def test_a_call_that_ignores_the_interrupt_ends_the_session(box):
    session = Session(box)
    code = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass"
    _, result, reset = session.call(code, timeout_s=0.5)
    assert (result["status"], result["session_ended"], result["signal"]) == ("timed_out", "timed out", 9)
    assert reset is not None and reset["clean"] is True
    assert run_ok(box, "print('next')")["stdout"] == "next\n"


@pytest.mark.parametrize("code", ["b = bytearray(512 * 1024 * 1024)", "b = bytearray(1 << 44)"])
def test_memory_exceeded_ends_the_session(box, code):
    session = Session(box)
    session.ok("x = 1")
    _, result, reset = session.call(code, timeout_s=20)
    assert (result["status"], result["session_ended"]) == ("memory_exceeded", "memory exceeded"), result
    assert reset is not None and reset["clean"] is True
    box.send({"op": "session_run", "id": "late", "code": "print(x)", **CALL_DEFAULTS})
    assert box.recv() == {"op": "error", "id": "late", "detail": "session_run: no session is open"}


def test_an_interpreter_that_exits_ends_the_session(box):
    session = Session(box)
    _, result, reset = session.call("import os\nos._exit(7)")
    assert (result["status"], result["exit_code"], result["session_ended"]) == ("failed", 7, "interpreter exited")
    assert reset is not None and reset["clean"] is True


def test_an_output_flood_in_a_session_is_cut_and_the_session_goes_on(box):
    session = Session(box)
    _, result, reset = session.call("while True:\n    print('y' * 99)", output_limit_bytes=10_000)
    assert (result["status"], result["session_ended"], reset) == ("output_limit_exceeded", None, None), result
    assert result["stdout"] == ("y" * 99 + "\n") * 100 and result["stdout_truncated"] is True
    assert session.ok("print('after')") == "after\n", "nothing of the flood is left for the next call"


def test_a_session_call_streams_its_output(box):
    session = Session(box)
    frames, result, _ = session.call("import time\nprint('a', flush=True)\ntime.sleep(0.3)\nprint('b')", stream=True)
    assert [f["op"] for f in frames] == ["output"] * len(frames) and len(frames) >= 2
    assert "".join(f["text"] for f in frames) == result["stdout"] == "a\nb\n"


def test_session_ops_out_of_turn_are_errors_and_change_nothing(box):
    box.send({"op": "session_close", "id": "c1"})
    assert box.recv() == {"op": "error", "id": "c1", "detail": "session_close: no session is open"}
    session = Session(box)
    box.send({"op": "run", "id": "r1", "code": "print(1)", **RUN_DEFAULTS})
    assert box.recv()["op"] == "error"
    box.send({"op": "session_open", "id": "o2", **LIMITS})
    assert box.recv() == {"op": "error", "id": "o2", "detail": "session_open: a session is already open in this "
                                                                  "container"}
    box.send({"op": "session_run", "id": "bad", "code": "print(1)", "timeout_s": -1, "output_limit_bytes": 10})
    assert box.recv()["op"] == "error"
    assert session.ok("print('alive')") == "alive\n"
    assert session.close()["clean"] is True
    assert box.ping()["clean"] is True


def test_sessions_work_under_gvisor(runner, engine):
    test_runner.require_gvisor(engine)
    box = runner(runtime="runsc")
    assert box.ping()["clean"] is True
    session = Session(box)
    session.ok("x = 5\nimport subprocess\nsubprocess.Popen(['sleep', '300'])")
    _, result, _ = session.call("import time\ntime.sleep(30)", timeout_s=0.5)
    assert (result["status"], result["session_ended"]) == ("timed_out", None)
    assert session.ok("print(x)") == "5\n"
    assert session.close()["clean"] is True
    assert run_ok(box, "print('clean')")["stdout"] == "clean\n"
