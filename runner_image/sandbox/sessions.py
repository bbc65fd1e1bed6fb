"""Sessions, PID 1's side: `session_open`, `session_run`, `session_close`.

A session's interpreter is a task child like any other (forked by the template, sandboxed, reading its go
pipe), told by its go message to serve calls instead of running one task (session_child). When the session
ends (`session_close`, or a call that ends it), PID 1 kills it and resets the container exactly as after a
task, and the host reuses the container only if that reset verifies clean."""

import math
import os
import resource
import select
import signal
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from runner_image.sandbox import go_pipe, taskfiles, zygote
from runner_image.sandbox.config import CALL_DONE, CALL_MEMORY_ERROR, STATUS_READY
from runner_image.sandbox.fdio import read_status, write_all
from runner_image.sandbox.frames import ProtocolError, send
from runner_image.sandbox.pipes import Bounded, Outputs
from runner_image.sandbox.procs import has_exited, kill_task, oom_kills, open_pidfd
from runner_image.sandbox.requests import field, parse_file_fields, parse_limits, parse_timeout
from runner_image.sandbox.reset import reset_and_report
from runner_image.sandbox.tasks import NO_PIDFD_TICK_S

SESSION_READY_WAIT_S = 10.0  # for a session's interpreter to say it is sandboxed and ready
# After SIGINT at a call's deadline (or past its output cap): how long the call may take to stop. Code
# that swallows the KeyboardInterrupt, or is stuck where signals do not reach, ends the session instead.
SESSION_INTERRUPT_GRACE_S = 1.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SESSION_ENDINGS = {"timed_out": "timed out", "output_limit_exceeded": "output limit exceeded"}


class Session(NamedTuple):
    pid: int
    go_w: int
    out_r: int
    err_r: int
    status_r: int
    files_r: int  # each call's outputs and figures, as records (taskfiles), before its done record


class CallFiles(NamedTuple):
    """A call's files in and out: [(path, content)] to write first, globs to collect, their byte budget."""

    files: list[tuple[bytes, bytes]]
    outputs: list[str]
    limit_bytes: int


_session: Session | None = None  # the open session's interpreter, or None
_session_calls = [0]


def is_open() -> bool:
    return _session is not None


def handle_session_open(msg: dict[str, Any], msg_id: str) -> None:
    """Fork the session's interpreter from the template (the waiting child) and wait until it is ready:
    `session_opened` ok; or, when it could not start, `session_opened` not ok and a `reset`."""
    global _session
    if _session is not None:
        raise ProtocolError("session_open: a session is already open in this container")
    fsize_limit, nofile_limit, nproc_limit = parse_limits(msg, ("fsize_limit_bytes", "nofile_limit"))
    child: zygote.Zygote | None = None
    pid, said, failure = 0, b"", ""
    try:
        pid, child = zygote.ready()
        write_all(child.go_w, go_pipe.encode((None, fsize_limit, nofile_limit, nproc_limit)))
        said = wait_readable(child.status_r, SESSION_READY_WAIT_S)
        if not said.startswith(STATUS_READY):
            failure = f"the session's interpreter did not start: {read_status(child.err_r).decode(errors='replace')}"
    except Exception as exc:
        failure = f"runner failed to open the session: {exc!r}"
    if not failure and child is not None:
        os.set_blocking(child.go_w, False)  # its code may stop reading: PID 1 must never block on it
        _session = Session(pid, child.go_w, child.out_r, child.err_r, child.status_r, child.files_r)
        send({"op": "session_opened", "id": msg_id, "ok": True, "detail": ""})
        return
    if child is not None:
        zygote.close(child)
    send({"op": "session_opened", "id": msg_id, "ok": False, "detail": failure})
    reset_and_report(msg_id, failure)


def wait_readable(fd: int, wait_s: float) -> bytes:
    """What `fd` holds once something (or EOF) arrives within `wait_s`; b"" if nothing does."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return read_status(fd) if poller.poll(math.ceil(wait_s * 1000)) else b""


def handle_session_run(msg: dict[str, Any], msg_id: str) -> None:
    """One call: `result` (with `session_ended`: null, or why the session ended); after an ending, the
    session's interpreter is gone and a `reset` follows, as after a task."""
    if _session is None:
        raise ProtocolError("session_run: no session is open")
    timeout_s = parse_timeout(msg)
    limit: int = field(msg, "output_limit_bytes", int)
    if limit < 0:
        raise ProtocolError("session_run: output_limit_bytes must not be negative")
    code, stdin, stream = field(msg, "code", str), field(msg, "stdin", str, ""), field(msg, "stream", bool, False)
    files = CallFiles(*parse_file_fields(msg))
    try:
        result = run_call(_session, msg_id, code, stdin, timeout_s, limit, stream, files)
    except Exception as exc:
        failure = f"runner failed to run the call: {exc!r}"
        send({"op": "error", "id": msg_id, "detail": failure})
        end_session()
        reset_and_report(msg_id, failure)
        return
    send(result)
    if result["session_ended"]:
        end_session()
        reset_and_report(msg_id)


def handle_session_close(msg: dict[str, Any], msg_id: str) -> None:
    """End the session: its interpreter and everything it started are killed, the scratch dirs emptied,
    and the container verified as after a task (`reset`)."""
    if _session is None:
        raise ProtocolError("session_close: no session is open")
    end_session()
    reset_and_report(msg_id)


def end_session() -> None:
    global _session
    session, _session = _session, None
    if session is None:
        return
    kill_task(session.pid)
    for fd in (session.go_w, session.out_r, session.err_r, session.status_r, session.files_r):
        os.close(fd)


def run_call(session: Session, call_id: str, code: str, stdin: str, timeout_s: float, limit: int,
             stream: bool, files: CallFiles) -> dict[str, Any]:
    """Send one call to the session's interpreter, watch it, and build its `result` frame."""
    _session_calls[0] += 1
    filename = f"<cell {_session_calls[0]}>"  # tracebacks through an earlier cell's function show its source
    nonce = os.urandom(8)
    go = go_pipe.encode((nonce, code, go_pipe.precompile(code, filename), stdin.encode("utf-8", "replace"), filename,
                         files.outputs, files.limit_bytes, [(path, len(data)) for path, data in files.files]))
    go += b"".join(data for _, data in files.files)  # each file's bytes follow, as for a task
    cpu_before, oom_before = process_cpu_s(session.pid), oom_kills()
    started = time.monotonic()
    outputs = Outputs(session.out_r, session.err_r, limit, call_id if stream else None, keep_reading=True)
    discard_stale(session.files_r)
    records = Bounded(taskfiles.records_bound(files.limit_bytes))
    verdict, done = watch_call(session, nonce, go, started + timeout_s, outputs, records)
    del go
    run_ms = (time.monotonic() - started) * 1000
    exit_code: int | None = None
    sig: int | None = None
    ended = ""
    cpu_s, max_rss = process_cpu_s(session.pid) - cpu_before, peak_rss_bytes(session.pid)
    if done is None:  # the interpreter died, or did not stop once interrupted: the session is over
        if has_exited(session.pid):
            exit_code, sig, usage = reap_session(session.pid)
            cpu_s = usage.ru_utime + usage.ru_stime - cpu_before
            max_rss = usage.ru_maxrss * 1024
        else:
            kill_task(session.pid)
            sig = int(signal.SIGKILL)
        if oom_kills() > oom_before:
            verdict, ended = "memory_exceeded", "memory exceeded"
        elif verdict is not None:
            ended = SESSION_ENDINGS[verdict]
        else:
            verdict, ended = "failed", "interpreter exited"
    else:
        exit_code, flags = done
        # Memory ran out during the call (in it, or in a process it started): the session's state is suspect.
        if oom_kills() > oom_before or (flags & CALL_MEMORY_ERROR and exit_code in (1, 120)):
            verdict, ended = "memory_exceeded", "memory exceeded"
        elif verdict is None:
            verdict = ("output_limit_exceeded" if outputs.over_limit()
                       else "succeeded" if exit_code == 0 else "failed")
    out, err = (bytes(buf[:limit]).decode("utf-8", "replace") for buf in outputs.bufs.values())
    truncated = [len(buf) > limit for buf in outputs.bufs.values()]
    # Only a call that said done sent its records whole; otherwise what came is partial, and says so.
    returned, files_truncated = taskfiles.parse_records(records.data, files.limit_bytes,
                                                        records.overflowed or (done is None and bool(records.data)))
    return {"op": "result", "id": call_id, "status": verdict, "exit_code": exit_code, "signal": sig,
            "stdout": out, "stderr": err, "stdout_truncated": truncated[0], "stderr_truncated": truncated[1],
            "run_ms": round(run_ms, 3), "usage": {"cpu_s": round(max(0.0, cpu_s), 6), "max_rss_bytes": max_rss},
            "files": returned, "files_truncated": files_truncated, "session_ended": ended or None}


def discard_stale(files_r: int) -> None:
    """Drop what sits in the files pipe before a call: only something the session itself started can have
    written it between calls (never another session's data), and it is not this call's outputs."""
    os.set_blocking(files_r, False)
    stale = Bounded(0)
    try:
        stale.pump(files_r, drain=True)
    except OSError:
        pass


def watch_call(session: Session, nonce: bytes, go: bytes, deadline: float, outputs: Outputs,
               records: Bounded) -> tuple[str | None, tuple[int, int] | None]:
    """Send the call (without ever blocking on the interpreter) and collect its output and its files records
    (into `records`) until it reports the call done. At the deadline, or past the output cap, it is
    interrupted (SIGINT: a KeyboardInterrupt in the call) and given SESSION_INTERRUPT_GRACE_S to stop.

    Returns (verdict or None, (exit status, flags) or None); None means the interpreter did not finish the
    call: it died, or it did not stop after the interrupt."""
    pending = memoryview(go)
    said = bytearray()
    pidfd = open_pidfd(session.pid)
    tick_s = math.inf if pidfd is not None else NO_PIDFD_TICK_S
    poller = select.poll()
    for fd in (session.out_r, session.err_r, session.status_r, session.files_r, pidfd):
        if fd is not None:
            os.set_blocking(fd, False)
            poller.register(fd, select.POLLIN)
    poller.register(session.go_w, select.POLLOUT)
    verdict: str | None = None
    give_up_at = math.inf
    try:
        while True:
            now = time.monotonic()
            if verdict is None and (now >= deadline or outputs.over_limit()):
                verdict = "timed_out" if now >= deadline else "output_limit_exceeded"
                try:
                    os.kill(session.pid, signal.SIGINT)  # the interpreter only, not what it started
                except OSError:
                    pass
                give_up_at = now + SESSION_INTERRUPT_GRACE_S
            if now >= give_up_at or has_exited(session.pid):
                outputs.drain()
                outputs.flush(final=True)
                records.pump(session.files_r, drain=True)
                return verdict, None
            wait_s = min((deadline if verdict is None else give_up_at) - now, tick_s, outputs.flush_in())
            for fd, _ in poller.poll(math.ceil(max(0.0, wait_s) * 1000)):
                if fd == session.go_w:
                    try:
                        pending = pending[os.write(fd, pending):]
                    except BlockingIOError:
                        pass
                    except OSError:  # the interpreter is gone: its exit says the rest
                        pending = pending[:0]
                    if not pending:
                        poller.unregister(fd)
                elif fd == session.status_r:
                    try:
                        chunk = os.read(fd, 256)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        poller.unregister(fd)
                    said += chunk
                    if (done := call_done(said, nonce)) is not None:
                        outputs.drain()  # the interpreter flushed before it said done: all of it is there
                        outputs.flush(final=True)
                        records.pump(session.files_r, drain=True)  # and sent its records before that
                        return verdict, done
                elif fd == session.files_r:
                    if not records.pump(fd, drain=False):
                        poller.unregister(fd)
                elif fd in outputs.bufs and not outputs.read(fd):
                    poller.unregister(fd)
            outputs.flush()
    finally:
        if pidfd is not None:
            os.close(pidfd)


def call_done(said: bytearray, nonce: bytes) -> tuple[int, int] | None:
    """(exit status, flags) once the status pipe holds this call's done record, else None. The call's code
    can write to that pipe too; without the nonce (fresh per call) it can only confuse its own session."""
    at = said.find(CALL_DONE + nonce)
    end = at + len(CALL_DONE) + len(nonce)
    if at < 0 or len(said) < end + 2:
        return None
    return said[end], said[end + 1]


def reap_session(pid: int) -> tuple[int | None, int | None, resource.struct_rusage]:
    """(exit code, signal, rusage) of the session's interpreter, which has exited."""
    try:
        _, status, usage = os.wait4(pid, 0)
    except ChildProcessError:  # reaped already with the task's other processes
        return None, None, resource.struct_rusage((0.0,) * 16)
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status), usage
    return os.WEXITSTATUS(status), None, usage


def process_cpu_s(pid: int) -> float:
    """CPU seconds a live process has used so far (utime + stime), 0.0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb", buffering=0) as f:
            fields = f.read().rpartition(b")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def peak_rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb", buffering=0) as f:
            for line in f.read().splitlines():
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


SESSION_OPS: dict[str, Callable[[dict[str, Any], str], None]] = {
    "session_open": handle_session_open, "session_run": handle_session_run, "session_close": handle_session_close}
