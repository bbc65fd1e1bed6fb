"""A `run` (PID 1): hand the task to the waiting child over its go pipe, supervise it (deadline, output
cap, its pipes), build the `result` frame, then reset the container and send `reset`."""

import math
import os
import select
import signal
import time
from typing import NamedTuple

from runner_image.sandbox import go_pipe, taskfiles, zygote
from runner_image.sandbox.config import DONE, STATUS_DONE, STATUS_MEMORY_ERROR, STATUS_READY
from runner_image.sandbox.fdio import write_all
from runner_image.sandbox.frames import send
from runner_image.sandbox.pipes import Bounded, Outputs
from runner_image.sandbox.procs import has_exited, kill_task, oom_kills, open_pidfd
from runner_image.sandbox.requests import Task
from runner_image.sandbox.reset import reset_and_report

NO_PIDFD_TICK_S = 0.002  # how often to look for the child's exit where there is no pidfd (gVisor)
STATUS_BOUND = 4096  # what PID 1 keeps of a status pipe
DoneRecord = tuple[bytes, int, int, int]  # b"D", exit status, cpu microseconds, max rss KiB


class Seen(NamedTuple):
    """What supervising a child saw (see `supervise`)."""

    verdict: str | None
    out: bytearray
    err: bytearray
    records: bytearray
    overflowed: bool
    said: bytes
    done: DoneRecord | None


def handle_run(task: Task) -> None:
    """Reply `result`, then `reset`. If the runner itself fails, `error` replaces `result` and the
    reset is reported dirty, so that the host replaces the container."""
    failure = ""
    try:
        send(run_task(task))
    except Exception as exc:
        failure = f"runner failed to run the task: {exc!r}"
        send({"op": "error", "id": task.id, "detail": failure})
    reset_and_report(task.id, failure)


def run_task(task: Task) -> dict[str, object]:
    pid, child = zygote.ready()
    compiled = go_pipe.precompile(task.code)
    go = go_pipe.encode((task.code, compiled, task.stdin.encode("utf-8", "replace"),  # "replace": lone surrogates
                         task.timeout_s, task.fsize_limit, task.nofile_limit, task.nproc_limit, task.outputs,
                         task.files_limit, [(path, len(data)) for path, data in task.files]))
    del compiled
    oom_before = oom_kills()
    started = time.monotonic()
    out_r, err_r, files_r = child.out_r, child.err_r, child.files_r
    try:
        write_all(child.go_w, go)  # the child reads while we write
        for _, data in task.files:  # then each file's bytes, which the child writes out as they come
            write_all(child.go_w, data)
    except OSError:
        pass  # the child is gone: supervise sees it exit, and its status pipe or exit status says why
    finally:
        os.close(child.go_w)
    try:
        seen = supervise(pid, (out_r, err_r, files_r, child.status_r), started + task.timeout_s, task.output_limit,
                         taskfiles.records_bound(task.files_limit), task.id if task.stream else None)
        run_ms = (time.monotonic() - started) * 1000
        sig: int | None
        if seen.done is None:
            _, status, usage = os.wait4(pid, 0)
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
            cpu_s, max_rss_kib = usage.ru_utime + usage.ru_stime, usage.ru_maxrss
        else:
            zygote.mark_exiting(pid)  # killed and reaped by the reset, after the answer
            _, exit_code, cpu_us, max_rss_kib = seen.done
            sig, cpu_s = None, cpu_us / 1e6
    finally:
        for fd in (out_r, err_r, files_r, child.status_r):
            os.close(fd)
    verdict, out, err = seen.verdict, seen.out, seen.err
    # The DONE record's bytes are numbers, not words (one may be "M"), whether or not it ended the wait.
    said = seen.said[:-DONE.size] if parse_done(seen.said) else seen.said
    oom_killed = sig == signal.SIGKILL and oom_kills() > oom_before  # our SIGKILLs have a verdict already
    if not said.startswith(STATUS_READY) and verdict is None and not oom_killed:
        raise RuntimeError(f"sandbox setup failed: {bytes(err[-500:]).decode('utf-8', 'replace')}")
    truncated = [len(buf) > task.output_limit for buf in (out, err)]
    if verdict is None:
        # A real uncaught MemoryError exits 1 (120 if stdout cannot flush; see execute.run_code): a task that
        # writes the byte and exits otherwise has not run out of memory, whatever it says.
        if oom_killed or (STATUS_MEMORY_ERROR in said[1:] and exit_code in (1, 120)):
            verdict = "memory_exceeded"
        elif any(truncated):
            verdict = "output_limit_exceeded"
        else:
            verdict = "succeeded" if exit_code == 0 else "failed"
    stdout, stderr = (bytes(buf[:task.output_limit]).decode("utf-8", "replace") for buf in (out, err))
    files, files_truncated = taskfiles.parse_records(seen.records, task.files_limit, seen.overflowed)
    del seen
    return {"op": "result", "id": task.id, "status": verdict, "exit_code": exit_code, "signal": sig,
            "stdout": stdout, "stderr": stderr, "stdout_truncated": truncated[0], "stderr_truncated": truncated[1],
            "run_ms": round(run_ms, 3), "usage": {"cpu_s": round(cpu_s, 6), "max_rss_bytes": max_rss_kib * 1024},
            "files": files, "files_truncated": files_truncated}


def parse_done(said: bytes | bytearray) -> DoneRecord | None:
    """The DONE record ending what the child wrote on its status pipe, as (b"D", exit status, cpu µs,
    max rss KiB), or None. Only after READY: a record is never the first thing a child says."""
    if len(said) <= DONE.size or said[-DONE.size] != STATUS_DONE[0]:
        return None
    done: DoneRecord = DONE.unpack_from(said, len(said) - DONE.size)
    return done if 0 <= done[1] <= 255 else None


def supervise(pid: int, fds: tuple[int, int, int, int], deadline: float, limit: int, files_bound: int,
              stream_id: str | None = None) -> Seen:
    """Collect output until the child exits or says it is done; kill it at the deadline or past the
    output cap.

    `fds` are the stdout, stderr, files and status pipes. Returns a Seen: the verdict (None when the
    child ended by itself), stdout and stderr (a buffer longer than `limit` passed the cap), the files
    records and whether they passed `files_bound` (the child sends no more than that: more is the task's
    own writing, read and dropped), what the child said on its status pipe, and its DONE record (None
    when it exited first: then its exit status counts). The child's exit or its DONE, not EOF on its
    pipes, ends the wait: a daemon it left may hold them open for ever. With `stream_id`, output also
    goes to the host as it comes (see pipes.Outputs).
    """
    out_r, err_r, files_r, status_r = fds
    outputs = Outputs(out_r, err_r, limit, stream_id)
    bounded = {files_r: Bounded(files_bound), status_r: Bounded(STATUS_BOUND)}
    pidfd = open_pidfd(pid)
    tick_s = math.inf if pidfd is not None else NO_PIDFD_TICK_S
    poller = select.poll()
    for fd in (*fds, pidfd):
        if fd is not None:
            os.set_blocking(fd, False)
            poller.register(fd, select.POLLIN)

    def seen(verdict: str | None, done: DoneRecord | None = None) -> Seen:
        records, said = bounded[files_r], bytes(bounded[status_r].data)
        return Seen(verdict, outputs.bufs[out_r], outputs.bufs[err_r], records.data, records.overflowed, said, done)

    def drain() -> None:  # what it wrote just before it ended
        outputs.drain()
        outputs.flush(final=True)
        for fd, kept in bounded.items():
            kept.pump(fd, drain=True)

    verdict = "timed_out"
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(math.ceil(min(remaining, tick_s, outputs.flush_in()) * 1000)):
                if fd in outputs.bufs and not outputs.read(fd):
                    poller.unregister(fd)
                elif fd in bounded and not bounded[fd].pump(fd, drain=False):
                    poller.unregister(fd)
            outputs.flush()
            if outputs.over_limit():
                verdict = "output_limit_exceeded"
                break
            if has_exited(pid):
                drain()
                return seen(None)
            if (done := parse_done(bounded[status_r].data)) is not None:
                drain()
                return seen(None, done)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    kill_task(pid)
    outputs.flush(final=True)
    return seen(verdict)
