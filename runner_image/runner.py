"""warmpool sandbox runner: PID 1 of every sandbox container (stdlib only; see PROTOCOL.md).

The host sends length-prefixed JSON frames on stdin; the runner answers with frames on stdout. Two
processes of this file live in every container:

- PID 1 reads frames, supervises tasks and resets the container. It holds every task's data (request,
  code, stdin, output, status), so it never forks a task: the reuse rule (PROTOCOL.md) is that no process
  that ever held a task's data is forked into, or becomes, a later task.
- The template, forked from PID 1 at start before any frame is read, is the pristine warm interpreter.
  It never receives task data: over a control socket it gets only fresh pipe ends and one-word commands,
  and it forks each task's child (which reads its code and stdin straight from PID 1 over its own pipe),
  the killer that ends the sandbox uid's processes, and the scratch cleaner.

A `run` goes to the child forked ahead of time; PID 1 replies `result`, then kills every other sandbox
process, empties the scratch dirs, verifies that and the network tables and replies `reset`. One task at
a time: the loop is single-threaded and blocking on purpose, so there is no state to race on.

Never run this on a host: the reset is kill(-1, SIGKILL), so it refuses to start unless it is PID 1.
"""

import atexit
import binascii
import builtins
import codecs
import collections
import ctypes
import fcntl
import gc
import json
import linecache
import marshal
import math
import os
import resource
import select
import shutil
import signal
import socket
import struct
import sys
import time
import traceback
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # python3 -I leaves the script's dir out
import taskfiles  # noqa: E402 - the task's files in and out (stdlib only, beside this file)

del sys.path[0]

SANDBOX_UID = SANDBOX_GID = 10001
# POSIX message queues live in /dev/mqueue where the engine mounts it (runc does, gVisor does not).
SCRATCH_DIRS = ("/tmp", "/dev/shm") + (("/dev/mqueue",) if os.path.isdir("/dev/mqueue") else ())
WORK_DIR, HOME_DIR = "/tmp/work", "/tmp/home"
TASK_ENV = {"HOME": HOME_DIR, "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
            "TMPDIR": "/tmp", "USER": "sandbox"}
# What the image's environment says to its libraries, kept for the tasks: matplotlib draws with Agg and
# keeps its config and cache in MPLCONFIGDIR (on /tmp, since the root is read-only).
IMAGE_ENV = ("MPLBACKEND", "MPLCONFIGDIR")
# matplotlib's font list, made at build time (the scan takes ~150 ms): linked into each task's MPLCONFIGDIR.
MPL_BUILT_CACHE = "/opt/warmpool/matplotlib"
TASK_DIRS = [WORK_DIR, HOME_DIR]  # made by each task's child; main() adds MPLCONFIGDIR when the image sets it
CACHE_LINKS: list = []  # (target, link): the built caches, linked into a task's MPLCONFIGDIR by its child
MAX_FRAME_BYTES = 64 << 20
KILL_WAIT_S = 6.0  # how long the reset keeps killing before it calls the container dirty (host waits 15 s):
# generous, as killing a fork bomb's 64 processes under gVisor on two loaded cores can take seconds
CLEANER_WAIT_S = 5.0  # how long the scratch cleaner may take
TEMPLATE_WAIT_S = 10.0  # how long PID 1 waits for the template's answer before it calls the container dirty
NO_PIDFD_TICK_S = 0.002  # how often to look for the child's exit where there is no pidfd (gVisor)
READ_CHUNK = 1 << 16
# Streaming (`"stream": true`): a chunk of output goes out as an `output` frame at once, unless that stream
# sent one less than STREAM_INTERVAL_S ago; then it waits, and what arrives meanwhile joins it (coalesced),
# so a task that prints in a tight loop costs at most ~100 frames a second per stream, not one per write.
STREAM_INTERVAL_S = 0.01
STREAM_FRAME_BYTES = 1 << 15  # ... or sooner, once this much is waiting
# Compiling in the forked child costs ~2 ms of page faults (the compiler writes all over pages shared
# with PID 1), several times the rest of a small task; so PID 1 compiles code up to this size itself.
# Compiling runs nothing; larger code still compiles in the child, under the task's deadline and limits.
PARENT_COMPILE_MAX_CHARS = 64 << 10
PYTHON_VERSION = ".".join(map(str, sys.version_info[:3]))
CPUS = len(os.sched_getaffinity(0))
OOM_FILES = ("/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events")  # v1, v2
# SysV IPC objects outlive their processes, and only their owner may remove them. /proc/sysvipc lists them
# under runc, but gVisor has no /proc/sysvipc (a segment left there reached the next task), so ask the
# kernel for the counts: the *_INFO command of each call, and where its struct says how many exist.
LIBC = ctypes.CDLL(None, use_errno=True)
SYSV_IPC_COUNTS = (("shared memory segment(s)", lambda buf: LIBC.shmctl(0, 14, buf), 0),  # SHM_INFO: used_ids
                   ("message queue(s)", lambda buf: LIBC.msgctl(0, 12, buf), 0),  # MSG_INFO: msgpool
                   ("semaphore set(s)", lambda buf: LIBC.semctl(0, 0, 19, buf), 7))  # SEM_INFO: semusz

# Each task child gets a status pipe of its own (made fresh per task, so nothing carries over): it writes
# READY once it is sandboxed and limited, just before the task's code runs (so the task cannot unwrite
# it), and MEMORY_ERROR if the code dies of an uncaught MemoryError. The task can write to the pipe too:
# only READY as the first byte counts, and MEMORY_ERROR only with the exit status a MemoryError gives.
STATUS_READY, STATUS_MEMORY_ERROR, STATUS_DONE = b"R", b"M", b"D"
STATUS_FD = 4  # in the task child
# When the code has ended and its outputs are sent, the child writes a DONE record (its exit status and its
# usage) just before it exits. PID 1 answers on it rather than on the child's exit, which for a datascience
# interpreter comes 3 to 8 ms later (the kernel tearing down ~100 MB of address space); the child is killed
# and reaped after the answer has gone out. A task can write a DONE record too: then its answer comes early,
# with what it wrote, and its process is killed: it changes nothing but its own result. (A session's calls
# say CALL_DONE, with a nonce: see sessions below.)
DONE = struct.Struct(">ciqq")  # b"D", exit status, cpu microseconds (its own and its waited children's), max rss KiB
STATUS_BOUND = 4096  # what PID 1 keeps of a status pipe
# Output files and figures go to PID 1 as records (taskfiles.py) on a pipe of their own, made fresh per
# task; PID 1 keeps at most taskfiles.records_bound(the byte budget) of it and reads past that to discard.
FILES_FD = 5  # in the task child
DEFAULT_OUTPUT_FILES_BYTES = 16 << 20
FRAME_OUT = -1  # the frame channel's write end, set by main()
# Network state the kernel keeps after every socket's process is gone (TIME_WAIT above all) would reach
# the next task in this network namespace (a port still taken, old connections in /proc/net/tcp); a task
# cannot have a network namespace of its own (that needs CAP_SYS_ADMIN), so a container that has any
# such state is not clean, and is replaced. See network_leftovers().
_KEEP: list = []  # in the task child: the runner's own std streams, kept alive

Task = collections.namedtuple(
    "Task", "id code stdin timeout_s output_limit fsize_limit nofile_limit nproc_limit stream files outputs "
            "files_limit", defaults=(False, (), (), DEFAULT_OUTPUT_FILES_BYTES))


class ProtocolError(Exception):
    """A frame the runner cannot act on; answered with an `error` frame."""


# ---- frames -------------------------------------------------------------------------------------

def serve(reader):
    while True:
        msg_id = None
        try:
            msg = read_frame(reader)
            if msg is None:
                return
            msg_id = msg.get("id") if isinstance(msg.get("id"), str) else None
            dispatch(msg, msg_id)
        except ProtocolError as exc:
            send({"op": "error", "id": msg_id, "detail": str(exc)})
        except Exception as exc:  # the loop must survive anything
            send({"op": "error", "id": msg_id, "detail": f"runner error: {exc!r}"})


def read_frame(reader):
    """The next request as a dict, or None at EOF."""
    header = reader.read(4)
    if len(header) < 4:
        return None
    (size,) = struct.unpack(">I", header)
    if size > MAX_FRAME_BYTES:  # no frame boundary left to trust: say so and stop
        send({"op": "error", "id": None, "detail": f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}"})
        sys.exit(1)
    body = reader.read(size)
    if len(body) < size:
        return None
    try:
        msg = json.loads(body)
    except ValueError as exc:  # invalid UTF-8 too
        raise ProtocolError(f"bad JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("a frame must hold a JSON object")
    return msg


def send(frame):
    """Write one frame. A result's files (their content base64 bytes, up to the output files cap) are
    spliced in piece by piece rather than copied into one string, so that PID 1, whose memory counts
    against the container's, holds their encoded bytes once."""
    files = frame.pop("files", None)
    pieces = [json.dumps(frame).encode()]  # ASCII-only, hence always valid UTF-8
    if files is not None:
        pieces = [pieces[0][:-1], b', "files": [']
        for index, entry in enumerate(files):
            content = entry.pop("content")
            pieces.append((b", " if index else b"") + json.dumps(entry).encode()[:-1] + b', "content": ')
            pieces += [b'"', content, b'"}'] if content is not None else [b"null}"]  # base64 needs no escapes
        pieces.append(b"]}")
    write_all(FRAME_OUT, struct.pack(">I", sum(map(len, pieces))))
    for piece in pieces:
        write_all(FRAME_OUT, piece)


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def dispatch(msg, msg_id):
    op = msg.get("op")
    if msg_id is None:
        raise ProtocolError("missing or non-string id")
    if op == "ping":
        clean, detail = verify_clean()
        send({"op": "pong", "id": msg_id, "clean": clean, "detail": detail, "python": PYTHON_VERSION})
        if clean:
            ensure_zygote()
    elif op == "run":
        if SESSION is not None:
            raise ProtocolError("run: a session is open in this container; close it first")
        handle_run(parse_task(msg, msg_id))
    elif op in SESSION_OPS:
        SESSION_OPS[op](msg, msg_id)
    else:
        raise ProtocolError(f"unknown op {ascii(op)[:100]}")


def field(msg, name, kind, default=None):
    """A request field of the given type (never a bool where a number is wanted), else ProtocolError."""
    value = msg.get(name, default)
    if kind is bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"{msg.get('op')}: {name} is not a boolean")
    elif not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(f"{msg.get('op')}: {name} is missing or not a {getattr(kind, '__name__', 'number')}")
    return value


def parse_timeout(msg):
    timeout_s = float(field(msg, "timeout_s", (int, float)))
    if not 0 < timeout_s < math.inf:
        raise ProtocolError(f"{msg.get('op')}: timeout_s must be positive and finite")
    return timeout_s


def parse_limits(msg, names):
    limits = [field(msg, name, int) for name in names]
    limits.append(field(msg, "nproc_limit", int, 0))  # optional: 0 leaves RLIMIT_NPROC alone
    if min(limits) < 0:
        raise ProtocolError(f"{msg.get('op')}: limits must not be negative")
    return limits


def parse_task(msg, msg_id):
    timeout_s = parse_timeout(msg)
    limits = parse_limits(msg, ("output_limit_bytes", "fsize_limit_bytes", "nofile_limit"))
    files_limit = field(msg, "max_output_files_bytes", int, DEFAULT_OUTPUT_FILES_BYTES)
    if files_limit < 0:
        raise ProtocolError("run: max_output_files_bytes must not be negative")
    outputs = field(msg, "outputs", list, [])
    if not all(isinstance(pattern, str) for pattern in outputs):
        raise ProtocolError("run: outputs must be a list of strings")
    return Task(msg_id, field(msg, "code", str), field(msg, "stdin", str, ""), timeout_s, *limits,
                stream=field(msg, "stream", bool, False), files=parse_files(field(msg, "files", list, [])),
                outputs=outputs, files_limit=files_limit)


def parse_files(entries):
    """The request's files as [(path bytes, content bytes)]: each `content` (base64) is decoded and dropped
    from the frame as it goes, so that PID 1 holds one copy of the files and the frame's text, not two."""
    files = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) \
                or not isinstance(entry.get("content"), str):
            raise ProtocolError(f"run: files[{index}] must hold a string path and base64 content")
        try:
            path = taskfiles.checked_path(entry["path"])
            files.append((path, binascii.a2b_base64(entry.pop("content"), strict_mode=True)))
        except (ValueError, binascii.Error) as exc:
            raise ProtocolError(f"run: files[{index}]: {exc}") from None
    return files


def handle_run(task):
    """Reply `result`, then `reset`. If the runner itself fails, `error` replaces `result` and the
    reset is reported dirty, so that the host replaces the container."""
    failure = ""
    try:
        send(run_task(task))
    except Exception as exc:
        failure = f"runner failed to run the task: {exc!r}"
        send({"op": "error", "id": task.id, "detail": failure})
    reset_and_report(task.id, failure)


def reset_and_report(msg_id, failure=""):
    """Reset the container and send `reset`; a runner failure before it makes it dirty whatever it found."""
    try:
        clean, detail = reset()
    except Exception as exc:
        clean, detail = False, f"reset failed: {exc!r}"
    if failure:
        clean, detail = False, "; ".join(filter(None, [failure, detail]))
    send({"op": "reset", "id": msg_id, "clean": clean, "detail": detail})
    if clean:
        ensure_zygote()  # after the reply: the host may lease the container while the child sets up


# ---- running a task: the parent -----------------------------------------------------------------

def run_task(task):
    global _exiting
    zygote = ready_zygote()
    compiled = precompile(task.code)
    go = marshal.dumps((task.code, compiled, task.stdin.encode("utf-8", "replace"),  # "replace": lone surrogates
                        task.timeout_s, task.fsize_limit, task.nofile_limit, task.nproc_limit, task.outputs,
                        task.files_limit, [(path, len(data)) for path, data in task.files]))
    del compiled
    oom_before = oom_kills()
    started = time.monotonic()
    pid, out_r, err_r, files_r = zygote.pid, zygote.out_r, zygote.err_r, zygote.files_r
    try:
        write_all(zygote.go_w, struct.pack(">Q", len(go)) + go)  # the child reads while we write
        for _, data in task.files:  # then each file's bytes, which the child writes out as they come
            write_all(zygote.go_w, data)
    except OSError:
        pass  # the child is gone: supervise sees it exit, and its status pipe or exit status says why
    finally:
        os.close(zygote.go_w)
    try:
        seen = supervise(pid, (out_r, err_r, files_r, zygote.status_r), started + task.timeout_s, task.output_limit,
                         taskfiles.records_bound(task.files_limit), task.id if task.stream else None)
        run_ms = (time.monotonic() - started) * 1000
        if seen.done is None:
            _, status, usage = os.wait4(pid, 0)
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
            cpu_s, max_rss_kib = usage.ru_utime + usage.ru_stime, usage.ru_maxrss
        else:
            _exiting = pid  # killed and reaped by the reset, after the answer
            _, exit_code, cpu_us, max_rss_kib = seen.done
            sig, cpu_s = None, cpu_us / 1e6
    finally:
        for fd in (out_r, err_r, files_r, zygote.status_r):
            os.close(fd)
    verdict, out, err = seen.verdict, seen.out, seen.err
    # The DONE record's bytes are numbers, not words (one may be "M"), whether or not it ended the wait.
    said = seen.said[:-DONE.size] if parse_done(seen.said) else seen.said
    oom_killed = sig == signal.SIGKILL and oom_kills() > oom_before  # our SIGKILLs have a verdict already
    if not said.startswith(STATUS_READY) and verdict is None and not oom_killed:
        raise RuntimeError(f"sandbox setup failed: {bytes(err[-500:]).decode('utf-8', 'replace')}")
    truncated = [len(buf) > task.output_limit for buf in (out, err)]
    if verdict is None:
        # A real uncaught MemoryError exits 1 (120 if stdout cannot flush; see run_code): a task that
        # writes the byte and exits otherwise has not run out of memory, whatever it says.
        if oom_killed or (STATUS_MEMORY_ERROR in said[1:] and exit_code in (1, 120)):
            verdict = "memory_exceeded"
        elif any(truncated):
            verdict = "output_limit_exceeded"
        else:
            verdict = "succeeded" if exit_code == 0 else "failed"
    out, err = (bytes(buf[:task.output_limit]).decode("utf-8", "replace") for buf in (out, err))
    files, files_truncated = taskfiles.parse_records(seen.records, task.files_limit, seen.overflowed)
    del seen
    return {"op": "result", "id": task.id, "status": verdict, "exit_code": exit_code, "signal": sig,
            "stdout": out, "stderr": err, "stdout_truncated": truncated[0], "stderr_truncated": truncated[1],
            "run_ms": round(run_ms, 3), "usage": {"cpu_s": round(cpu_s, 6), "max_rss_bytes": max_rss_kib * 1024},
            "files": files, "files_truncated": files_truncated}


def parse_done(said):
    """The DONE record ending what the child wrote on its status pipe, as (b"D", exit status, cpu µs,
    max rss KiB), or None. Only after READY: a record is never the first thing a child says."""
    if len(said) <= DONE.size or said[-DONE.size] != STATUS_DONE[0]:
        return None
    done = DONE.unpack_from(said, len(said) - DONE.size)
    return done if 0 <= done[1] <= 255 else None


def finish_exiting_child():
    """After the answer: kill the child that said it was done (it is exiting, or it forged the record)
    and wait, briefly, for it to go; the reset reaps it, and kills whatever else is left."""
    global _exiting
    pid, _exiting = _exiting, None
    if pid is None:
        return
    kill_task(pid)
    deadline, pause = time.monotonic() + KILL_WAIT_S, 0.0002
    while not has_exited(pid) and time.monotonic() < deadline:
        time.sleep(pause)
        pause = min(pause * 2, 0.005)


def read_status(fd):
    """What the child wrote on its status pipe (a few bytes; a daemon of the task may still hold the
    write end, so never wait for EOF)."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 64)
    except BlockingIOError:
        return b""


def precompile(code, filename="<task>"):
    """The task's code object, or None to let the child compile it (large code, or code that does not
    compile: the child then raises the error and reports it exactly as the interpreter would)."""
    if len(code) > PARENT_COMPILE_MAX_CHARS:
        return None
    try:
        return compile(code, filename, "exec")
    except BaseException:
        return None


Seen = collections.namedtuple("Seen", "verdict out err records overflowed said done")


def supervise(pid, fds, deadline, limit, files_bound, stream_id=None):
    """Collect output until the child exits or says it is done; kill it at the deadline or past the
    output cap.

    `fds` are the stdout, stderr, files and status pipes. Returns a Seen: the verdict (None when the
    child ended by itself), stdout and stderr (a buffer longer than `limit` passed the cap), the files
    records and whether they passed `files_bound` (the child sends no more than that: more is the task's
    own writing, read and dropped), what the child said on its status pipe, and its DONE record (None
    when it exited first: then its exit status counts). The child's exit or its DONE, not EOF on its
    pipes, ends the wait: a daemon it left may hold them open for ever. With `stream_id`, output also
    goes to the host as it comes (see Outputs).
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

    def seen(verdict, done=None):
        records, said = bounded[files_r], bytes(bounded[status_r].data)
        return Seen(verdict, outputs.bufs[out_r], outputs.bufs[err_r], records.data, records.overflowed, said, done)

    def drain():  # what it wrote just before it ended
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


class Bounded:
    """A pipe's bytes up to a bound; what comes past it is read (so the writer never blocks) and dropped."""

    def __init__(self, bound):
        self.data = bytearray()
        self.bound = bound
        self.overflowed = False

    def pump(self, fd, drain):
        """Read one chunk (or, with `drain`, what is there, at most one bound's worth more). False at EOF."""
        budget = [self.bound + READ_CHUNK]

        def take(chunk):
            room = self.bound - len(self.data)
            self.overflowed = self.overflowed or len(chunk) > room
            self.data += chunk[:max(room, 0)]
            budget[0] -= len(chunk)
            return budget[0] > 0
        return read_pipe(fd, take, drain)


def read_pipe(fd, take, drain):
    """Read a chunk, or with `drain` chunks until the pipe is empty or `take(chunk)` says False. False at EOF."""
    while True:
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        if not take(chunk) or not drain:
            return True


class Outputs:
    """A task's stdout and stderr as they arrive: kept up to the cap (a buffer longer than `limit` passed
    it), and with `stream_id` also sent to the host as `output` frames (only bytes within the cap, decoded
    incrementally so that no frame splits a UTF-8 character), coalesced per STREAM_INTERVAL_S.

    PID 1 never blocks on the host for this: the frames go out on the same channel as every reply, and the
    host reads that channel whatever its clients do."""

    def __init__(self, out_r, err_r, limit, stream_id=None, keep_reading=False):
        self.bufs = {out_r: bytearray(), err_r: bytearray()}
        self.limit = limit
        # Plain tasks stop reading a stream past the cap (the task is killed at once). A session call keeps
        # reading and drops the excess, so that its interpreter never blocks on a full pipe while it is
        # being interrupted, and nothing of this call is left in the pipe for the next one.
        self.keep_reading = keep_reading
        self.stream_id = stream_id
        self.forward = {fd: Forward(name) for fd, name in ((out_r, "stdout"), (err_r, "stderr"))} if stream_id else {}

    def read(self, fd, drain=False):
        """Read one chunk (or, with `drain`, all there is). False at EOF."""
        buf = self.bufs[fd]

        def take(chunk):
            nonlocal buf
            if self.forward and len(buf) < self.limit:
                self.forward[fd].pending += chunk[:self.limit - len(buf)]
            buf += chunk[:self.limit + 1 - len(buf)] if self.keep_reading else chunk
            return self.keep_reading or len(buf) <= self.limit
        return not (self.keep_reading or len(buf) <= self.limit) or read_pipe(fd, take, drain)

    def drain(self):
        for fd in self.bufs:
            self.read(fd, drain=True)

    def over_limit(self):
        return any(len(buf) > self.limit for buf in self.bufs.values())

    def flush_in(self):
        """Seconds until a waiting chunk is due to go out (inf when none waits)."""
        now = time.monotonic()
        return min((max(0.0, f.sent_at + STREAM_INTERVAL_S - now) for f in self.forward.values() if f.pending),
                   default=math.inf)

    def flush(self, final=False):
        now = time.monotonic()
        for forward in self.forward.values():
            due = final or len(forward.pending) >= STREAM_FRAME_BYTES or now >= forward.sent_at + STREAM_INTERVAL_S
            if forward.pending and due:
                text = forward.decoder.decode(bytes(forward.pending), final)
                forward.pending.clear()
                forward.sent_at = now
                if text:
                    send({"op": "output", "id": self.stream_id, "stream": forward.name, "text": text})


class Forward:
    """One stream's bytes read but not yet sent, and its UTF-8 decoder (which holds a split character)."""

    def __init__(self, name):
        self.name = name
        self.pending = bytearray()
        self.sent_at = 0.0
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")


def open_pidfd(pid):
    try:
        return os.pidfd_open(pid)
    except OSError:  # gVisor has no pidfd_open: the caller polls with a short tick instead
        return None


def has_exited(pid):
    # WNOWAIT leaves the child a zombie, so that wait4 can still collect its status and rusage.
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True


def kill_task(pid):
    for kill in (os.killpg, os.kill):  # its process group (setsid made it leader), then the child itself
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass


def oom_kills():
    """The container's OOM-kill counter (cgroup v1 or v2), or 0 where the kernel does not say."""
    for path in OOM_FILES:
        try:
            with open(path, "rb", buffering=0) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        return next((int(line.split()[1]) for line in lines if line.startswith(b"oom_kill ")), 0)
    return 0


# ---- running a task: the child ------------------------------------------------------------------

Zygote = collections.namedtuple("Zygote", "pid go_w out_r err_r status_r files_r")
# The next task's child: asked of the template right after a clean reset, and collected (its pid is the
# template's answer) when a task needs it, so that PID 1 reads the next frame while the template forks.
_zygote = None  # a Zygote, or a Zygote whose pid is still None while the template's answer is pending
_exiting = None  # the pid of the last task's child when it said DONE before it exited (finish_exiting_child)


def request_zygote():
    """Ask the template to fork the next task's child ahead of time; it enters the sandbox and blocks
    reading its code. The pipes are made here and their child ends handed over: PID 1 talks to the
    child directly, the template never sees a byte of a task."""
    (go_r, go_w), (out_r, out_w), (err_r, err_w), (status_r, status_w), (files_r, files_w) = \
        (os.pipe() for _ in range(5))
    try:
        TEMPLATE.request(b"spawn", (go_r, out_w, err_w, status_w, files_w))
    except BaseException:
        for fd in (go_w, out_r, err_r, status_r, files_r):
            os.close(fd)
        raise
    finally:
        for fd in (go_r, out_w, err_w, status_w, files_w):
            os.close(fd)
    return Zygote(None, go_w, out_r, err_r, status_r, files_r)


def ensure_zygote():
    """Called after a reply has gone out: a failure here must not send a frame of its own. The next task
    then asks again and reports the failure in its place (and the reset after it is not clean)."""
    global _zygote
    if _zygote is None:
        try:
            _zygote = request_zygote()
        except RuntimeError:
            pass


def take_zygote():
    """The waiting child (collecting the template's answer if need be), or None; it is ours now."""
    global _zygote
    zygote, _zygote = _zygote, None
    if zygote is not None and zygote.pid is None:
        try:
            zygote = zygote._replace(pid=TEMPLATE.answer(b"spawn"))
        except BaseException:
            for fd in zygote[1:]:
                os.close(fd)
            raise
    return zygote


def spawn_zygote():
    global _zygote
    _zygote = request_zygote()
    return take_zygote()


def ready_zygote():
    """The waiting child, alive, for the next task or session (forked now if there is none)."""
    reap_zombies()
    zygote = take_zygote()
    if zygote is not None and has_exited(zygote.pid):  # died while waiting (say, memory pressure)
        close_zygote(zygote)
        reap_zombies()
        zygote = None
    return zygote or spawn_zygote()


def discard_zygote():
    """Before a reset: kill the waiting child (it ran nothing) and close our ends of its pipes."""
    zygote = take_zygote()
    if zygote is not None:
        close_zygote(zygote)


def close_zygote(zygote):
    kill_task(zygote.pid)
    for fd in zygote[1:]:
        os.close(fd)


def zygote_pid():
    global _zygote
    if _zygote is not None and _zygote.pid is None:
        _zygote = take_zygote()
    return _zygote.pid if _zygote is not None else None


def task_child(go_r, out_w, err_w, status_w, files_w):
    """Body of a task's child (forked by the template): enter the sandbox, wait for the code, write the
    request's files, run the code, send back the outputs and figures, say DONE, _exit. Never returns."""
    status = 125
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        # Lift every source above the targets first: a source may sit on a target's number.
        sources = [fcntl.fcntl(fd, fcntl.F_DUPFD, 64) for fd in (null, out_w, err_w, go_r, status_w, files_w)]
        for dst, src in enumerate(sources):
            os.dup2(src, dst)
        for fd in (STATUS_FD, FILES_FD):
            os.set_inheritable(fd, False)  # not into the task's own subprocesses
        os.closerange(FILES_FD + 1, os.sysconf("SC_OPEN_MAX"))  # the template's control socket above all
        enter_sandbox()
        reseed()
        message = receive_task(3)
        if message[0] is None:  # not a task: a session's interpreter, which serves calls until PID 1 ends it
            os.close(FILES_FD)
            session_child(*message[1:])  # never returns
        (code, compiled, stdin, timeout_s, fsize_limit, nofile_limit, nproc_limit, outputs, files_limit,
         files) = message
        figures = taskfiles.Figures()
        figures.install()
        stdin_fd = os.memfd_create("stdin")  # before the limits: stdin may be larger than RLIMIT_FSIZE
        write_all(stdin_fd, stdin)
        os.lseek(stdin_fd, 0, os.SEEK_SET)
        os.dup2(stdin_fd, 0)
        os.close(stdin_fd)
        del stdin
        apply_task_limits(timeout_s, fsize_limit, nofile_limit, nproc_limit)
        os.write(STATUS_FD, STATUS_READY)  # from here on, what goes wrong is the task's (its files, its code)
    except BaseException as exc:  # never run the code half-sandboxed
        try:
            os.write(2, f"sandbox setup failed: {exc!r}".encode())
        finally:
            os._exit(status)
    try:
        taskfiles.write_files(WORK_DIR, files, lambda size: read_exactly(3, size))
        os.close(3)
        me = os.getpid()  # a fork the task made may return here too: only this process sends outputs
        status = run_code(code, compiled, lambda: os.getpid() == me and figures.capture_open())
        if os.getpid() == me:
            send_outputs(outputs, files_limit, figures)
            say_done(status)
    except taskfiles.FileError as exc:
        os.write(2, str(exc).encode("utf-8", "backslashreplace"))
        status = 1
    except BaseException:  # a runner bug, not the task's: say so where the host will look
        os.write(2, f"warmpool: runner error in the task child:\n{traceback.format_exc()}".encode())
    finally:
        os._exit(status)


def reseed():
    """What a fresh interpreter has that a fork of the template would not: its own random seeds. `random`
    reseeds itself after a fork; numpy's global generator does not, and every task would draw the same
    numbers."""
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()


def send_outputs(outputs, files_limit, figures):
    """After the code: the files `outputs` match, then the figures, as records on FILES_FD."""
    sink = taskfiles.Sink(FILES_FD, files_limit)
    try:
        taskfiles.collect_outputs(WORK_DIR, outputs, sink)
        figures.send(sink)
    except OSError as exc:  # the task closed or filled the pipe: only its own result is short
        taskfiles.note(f"outputs not sent: {exc.strerror or exc!r}")


def say_done(status):
    """The DONE record: the code has ended and everything it gives back has been written."""
    own, waited = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_us = round((own.ru_utime + own.ru_stime + waited.ru_utime + waited.ru_stime) * 1e6)
    try:
        os.write(STATUS_FD, DONE.pack(STATUS_DONE, status, cpu_us, max(own.ru_maxrss, waited.ru_maxrss)))
    except OSError:
        pass  # the task closed it: PID 1 waits for the exit instead


def read_exactly(fd, size):
    """`size` bytes from the go pipe. EOF first means PID 1 gave up on us: leave quietly."""
    chunks = bytearray()
    while len(chunks) < size:
        chunk = os.read(fd, min(size - len(chunks), 1 << 20))
        if not chunk:
            os._exit(0)
        chunks += chunk
    return bytes(chunks)


def receive_task(fd):
    """The go message from PID 1: a length, then marshal'd (code, code object or None, stdin bytes,
    timeout_s, fsize_limit, nofile_limit, nproc_limit, outputs, files_limit, [(file path, size)]); each
    file's bytes follow it on the pipe, read by taskfiles.write_files. A session's messages differ (see
    sessions below)."""
    (size,) = struct.unpack(">Q", read_exactly(fd, 8))
    return marshal.loads(read_exactly(fd, size))


def enter_sandbox():
    """What every task gets, done before its code is known: a new session, the sandbox uid, no core."""
    os.setsid()
    fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)  # the OOM killer should take the task, not PID 1
    os.write(fd, b"1000")
    os.close(fd)
    os.setgroups([])
    os.setresgid(SANDBOX_GID, SANDBOX_GID, SANDBOX_GID)
    os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
    if os.getresuid() != (SANDBOX_UID,) * 3 or os.getresgid() != (SANDBOX_GID,) * 3 or os.getgroups():
        raise PermissionError("could not drop to the sandbox uid")
    set_limit(resource.RLIMIT_CORE, 0)
    os.umask(0o022)


def apply_task_limits(timeout_s, fsize_limit, nofile_limit, nproc_limit):
    """The task's own limits, and its work and home dirs (made now: a waiting child leaves /tmp empty).
    A session passes no timeout_s: its interpreter outlives many calls, so no CPU budget fits it (PID 1's
    deadline and SIGKILL are what bound each call)."""
    # RLIMIT_CPU is only a backstop for the wall clock: allow every usable core busy until the deadline.
    limits = [(resource.RLIMIT_FSIZE, fsize_limit), (resource.RLIMIT_NOFILE, nofile_limit)]
    if timeout_s is not None:
        limits.append((resource.RLIMIT_CPU, math.ceil(timeout_s * CPUS) + 1))
    for res, value in limits:
        set_limit(res, value)
    if nproc_limit:
        # Only where the host asks (gVisor): there the count is the sandbox's own, while on a shared
        # kernel RLIMIT_NPROC counts the sandbox uid's processes in every container on the host.
        set_limit(resource.RLIMIT_NPROC, nproc_limit)
    make_task_dirs()
    os.chdir(WORK_DIR)


def set_limit(res, value):
    hard = resource.getrlimit(res)[1]  # soft = hard, so that the task cannot raise them
    resource.setrlimit(res, (value, value) if hard == resource.RLIM_INFINITY else (min(value, hard),) * 2)


def run_code(code, compiled=None, at_end=None):
    """Run the task as `python3 script.py` would, on the sandbox's fds 0-2; return the exit status.
    `at_end` runs when the code has ended, before the atexit handlers (matplotlib's closes every figure)."""
    main = task_main()
    linecache.cache["<task>"] = (len(code), None, code.splitlines(True), "<task>")  # source in tracebacks
    try:
        exec(compiled if compiled is not None else compile(code, "<task>", "exec"), main.__dict__)
        status = 0
    except SystemExit as exc:
        status = exit_status(exc.code)
    except BaseException as exc:
        if isinstance(exc, MemoryError):
            try:
                os.write(STATUS_FD, STATUS_MEMORY_ERROR)
            except OSError:
                pass
        status = 1
        report(exc)
    if at_end is not None:
        at_end()
    return shut_down(status)


def task_main():
    """Point the std streams at the sandbox's fds 0-2 and give the code a fresh `__main__` module."""
    _KEEP.append((sys.stdin, sys.stdout, sys.stderr))  # freed, the runner's streams would close fds 0-2
    for name, stream in (("stdin", open(0, encoding="utf-8", errors="surrogateescape")),
                         ("stdout", open(1, "w", encoding="utf-8", errors="surrogateescape")),
                         ("stderr", open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace"))):
        setattr(sys, name, stream)  # stderr line-buffered, as in python3
        setattr(sys, f"__{name}__", stream)
    sys.argv = ["<task>"]
    main = types.ModuleType("__main__")  # so that `import __main__` and pickle see the task, not us
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    return main


def exit_status(code):
    """The exit status `raise SystemExit(code)` gives, printing `code` when it is not a number."""
    if code is None or isinstance(code, int):
        return (code or 0) & 0xFF
    try:
        print(code, file=sys.stderr)
    except BaseException:
        pass
    return 1


def report(exc):
    """Print an uncaught exception as the interpreter would, without the runner's own frame."""
    exc.__traceback__ = exc.__traceback__.tb_next
    try:
        if sys.excepthook is sys.__excepthook__:
            traceback.print_exception(exc)  # unlike the C hook, it reads the task's source from linecache
        else:
            sys.excepthook(type(exc), exc, exc.__traceback__)
    except BaseException:
        pass


def shut_down(status):
    """What the interpreter does at exit: wait for non-daemon threads, run atexit, flush."""
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        atexit._run_exitfuncs()
    except BaseException:
        pass
    return flush_streams(status)


def flush_streams(status):
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):  # the task may have swapped them
        try:
            if stream is not None and not stream.closed:
                stream.flush()
        except BaseException:
            status = status or 120  # as the interpreter does when it cannot flush stdout
    return status


# ---- sessions: one interpreter serving the calls of one session ---------------------------------
#
# A session's interpreter is a task child like any other (forked by the template, sandboxed, reading its
# go pipe), told by its go message to serve calls instead of running one task. It runs every call of its
# session in one `__main__`, so globals, imports and files persist; it never serves anyone else. When the
# session ends (`session_close`, or a call that ends it), PID 1 kills it and resets the container exactly
# as after a task, and the host reuses the container only if that reset verifies clean.

Session = collections.namedtuple("Session", "pid go_w out_r err_r status_r")
SESSION = None  # in PID 1: the open session's interpreter, or None
_session_calls = [0]
SESSION_READY_WAIT_S = 10.0  # for a session's interpreter to say it is sandboxed and ready
# After SIGINT at a call's deadline (or past its output cap): how long the call may take to stop. Code
# that swallows the KeyboardInterrupt, or is stuck where signals do not reach, ends the session instead.
SESSION_INTERRUPT_GRACE_S = 1.0
CALL_DONE = b"D"  # on the status pipe: D, the call's nonce (8 bytes), its exit status, its flags
CALL_MEMORY_ERROR = 1  # flag: the call died of an uncaught MemoryError
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SESSION_ENDINGS = {"timed_out": "timed out", "output_limit_exceeded": "output limit exceeded"}


def handle_session_open(msg, msg_id):
    """Fork the session's interpreter from the template (the waiting child) and wait until it is ready:
    `session_opened` ok; or, when it could not start, `session_opened` not ok and a `reset`."""
    global SESSION
    if SESSION is not None:
        raise ProtocolError("session_open: a session is already open in this container")
    fsize_limit, nofile_limit, nproc_limit = parse_limits(msg, ("fsize_limit_bytes", "nofile_limit"))
    zygote, said, failure = None, b"", ""
    try:
        zygote = ready_zygote()
        go = marshal.dumps((None, fsize_limit, nofile_limit, nproc_limit))
        write_all(zygote.go_w, struct.pack(">Q", len(go)) + go)
        said = wait_readable(zygote.status_r, SESSION_READY_WAIT_S)
        if not said.startswith(STATUS_READY):
            failure = f"the session's interpreter did not start: {read_status(zygote.err_r).decode(errors='replace')}"
    except Exception as exc:
        failure = f"runner failed to open the session: {exc!r}"
    if not failure:
        os.set_blocking(zygote.go_w, False)  # its code may stop reading: PID 1 must never block on it
        os.close(zygote.files_r)  # a session's calls give no files back (yet): only tasks use that pipe
        SESSION = Session(zygote.pid, zygote.go_w, zygote.out_r, zygote.err_r, zygote.status_r)
        send({"op": "session_opened", "id": msg_id, "ok": True, "detail": ""})
        return
    if zygote is not None:
        close_zygote(zygote)
    send({"op": "session_opened", "id": msg_id, "ok": False, "detail": failure})
    reset_and_report(msg_id, failure)


def wait_readable(fd, wait_s):
    """What `fd` holds once something (or EOF) arrives within `wait_s`; b"" if nothing does."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return read_status(fd) if poller.poll(math.ceil(wait_s * 1000)) else b""


def handle_session_run(msg, msg_id):
    """One call: `result` (with `session_ended`: null, or why the session ended); after an ending, the
    session's interpreter is gone and a `reset` follows, as after a task."""
    if SESSION is None:
        raise ProtocolError("session_run: no session is open")
    timeout_s = parse_timeout(msg)
    limit = field(msg, "output_limit_bytes", int)
    if limit < 0:
        raise ProtocolError("session_run: output_limit_bytes must not be negative")
    code, stdin, stream = field(msg, "code", str), field(msg, "stdin", str, ""), field(msg, "stream", bool, False)
    try:
        result = run_call(msg_id, code, stdin, timeout_s, limit, stream)
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


def handle_session_close(msg, msg_id):
    """End the session: its interpreter and everything it started are killed, the scratch dirs emptied,
    and the container verified as after a task (`reset`)."""
    if SESSION is None:
        raise ProtocolError("session_close: no session is open")
    end_session()
    reset_and_report(msg_id)


def end_session():
    global SESSION
    session, SESSION = SESSION, None
    kill_task(session.pid)
    for fd in (session.go_w, session.out_r, session.err_r, session.status_r):
        os.close(fd)


def run_call(call_id, code, stdin, timeout_s, limit, stream):
    """Send one call to the session's interpreter, watch it, and build its `result` frame."""
    session = SESSION
    _session_calls[0] += 1
    filename = f"<cell {_session_calls[0]}>"  # tracebacks through an earlier cell's function show its source
    nonce = os.urandom(8)
    go = marshal.dumps((nonce, code, precompile(code, filename), stdin.encode("utf-8", "replace"), filename))
    cpu_before, oom_before = process_cpu_s(session.pid), oom_kills()
    started = time.monotonic()
    outputs = Outputs(session.out_r, session.err_r, limit, call_id if stream else None, keep_reading=True)
    verdict, done = watch_call(session, nonce, go, started + timeout_s, outputs)
    run_ms = (time.monotonic() - started) * 1000
    exit_code = sig = None
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
    return {"op": "result", "id": call_id, "status": verdict, "exit_code": exit_code, "signal": sig,
            "stdout": out, "stderr": err, "stdout_truncated": truncated[0], "stderr_truncated": truncated[1],
            "run_ms": round(run_ms, 3), "usage": {"cpu_s": round(max(0.0, cpu_s), 6), "max_rss_bytes": max_rss},
            "session_ended": ended or None}


def watch_call(session, nonce, go, deadline, outputs):
    """Send the call (without ever blocking on the interpreter) and collect its output until it reports
    the call done. At the deadline, or past the output cap, it is interrupted (SIGINT: a KeyboardInterrupt
    in the call) and given SESSION_INTERRUPT_GRACE_S to stop.

    Returns (verdict or None, (exit status, flags) or None); None means the interpreter did not finish the
    call: it died, or it did not stop after the interrupt."""
    pending = memoryview(struct.pack(">Q", len(go)) + go)
    said = bytearray()
    pidfd = open_pidfd(session.pid)
    tick_s = math.inf if pidfd is not None else NO_PIDFD_TICK_S
    poller = select.poll()
    for fd in (session.out_r, session.err_r, session.status_r, pidfd):
        if fd is not None:
            os.set_blocking(fd, False)
            poller.register(fd, select.POLLIN)
    poller.register(session.go_w, select.POLLOUT)
    verdict, give_up_at = None, math.inf
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
                        return verdict, done
                elif fd in outputs.bufs and not outputs.read(fd):
                    poller.unregister(fd)
            outputs.flush()
    finally:
        if pidfd is not None:
            os.close(pidfd)


def call_done(said, nonce):
    """(exit status, flags) once the status pipe holds this call's done record, else None. The call's code
    can write to that pipe too; without the nonce (fresh per call) it can only confuse its own session."""
    at = said.find(CALL_DONE + nonce)
    end = at + len(CALL_DONE) + len(nonce)
    if at < 0 or len(said) < end + 2:
        return None
    return said[end], said[end + 1]


def reap_session(pid):
    """(exit code, signal, rusage) of the session's interpreter, which has exited."""
    try:
        _, status, usage = os.wait4(pid, 0)
    except ChildProcessError:  # reaped already with the task's other processes
        return None, None, resource.struct_rusage((0.0,) * 16)
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status), usage
    return os.WEXITSTATUS(status), None, usage


def process_cpu_s(pid):
    """CPU seconds a live process has used so far (utime + stime), 0.0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb", buffering=0) as f:
            fields = f.read().rpartition(b")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def peak_rss_bytes(pid):
    try:
        with open(f"/proc/{pid}/status", "rb", buffering=0) as f:
            for line in f.read().splitlines():
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


SESSION_OPS = {"session_open": handle_session_open, "session_run": handle_session_run,
               "session_close": handle_session_close}


# ---- sessions: the interpreter's side -----------------------------------------------------------

_in_call = [False]


def session_child(fsize_limit, nofile_limit, nproc_limit):
    """Body of a session's interpreter (a task child whose go message said so): set the session's limits,
    say ready, then run each call PID 1 sends in one `__main__`, reporting each call's end on the status
    pipe, until PID 1 closes the go pipe or the reset kills it. Never returns."""
    status = 125
    try:
        try:
            apply_task_limits(None, fsize_limit, nofile_limit, nproc_limit)
            os.set_inheritable(3, False)  # the go pipe stays open for the next calls, but not in subprocesses
            main = task_main()
            _KEEP.append(sys.stdin)  # each call gets a stdin of its own on fd 0; this one must not close it
            signal.signal(signal.SIGINT, interrupt_call)
            os.write(STATUS_FD, STATUS_READY)
        except BaseException as exc:
            os.write(2, f"sandbox setup failed: {exc!r}".encode())
            return
        status = 0
        while True:
            nonce, code, compiled, stdin, filename = receive_task(3)  # EOF: the session ended
            call_stdin(stdin)
            del stdin
            exit_code, flags = session_call(main, code, compiled, filename)
            os.write(STATUS_FD, CALL_DONE + nonce + bytes((exit_code & 0xFF, flags)))
    except BaseException:
        status = status or 1
    finally:
        os._exit(status)


def interrupt_call(signum, frame):
    """SIGINT from PID 1 at a call's deadline: stop the call with a KeyboardInterrupt, and keep the
    interpreter. Between calls it is dropped, so that a late one cannot end the session."""
    if _in_call[0]:
        raise KeyboardInterrupt


def call_stdin(data):
    """This call's stdin on fd 0 (a fresh memfd), and `sys.stdin` reading it."""
    fd = os.memfd_create("stdin")
    try:
        write_all(fd, data)
    except OSError as exc:  # larger than the session's file size limit
        os.ftruncate(fd, 0)
        os.write(2, f"warmpool: this call's stdin was dropped: {exc.strerror}\n".encode())
    os.lseek(fd, 0, os.SEEK_SET)
    os.dup2(fd, 0)
    os.close(fd)
    stream = open(0, encoding="utf-8", errors="surrogateescape", closefd=False)
    for name in ("stdin", "__stdin__"):
        setattr(sys, name, stream)


def session_call(main, code, compiled, filename):
    """Run one call in the session's `__main__`; (exit status, flags), as a task's would be."""
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    status, flags = 0, 0
    try:
        _in_call[0] = True
        try:
            exec(compiled if compiled is not None else compile(code, filename, "exec"), main.__dict__)
        finally:
            _in_call[0] = False
    except SystemExit as exc:  # as in a notebook: the call ends with that status, the session goes on
        status = exit_status(exc.code)
    except BaseException as exc:
        status, flags = 1, CALL_MEMORY_ERROR if isinstance(exc, MemoryError) else 0
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:  # not our SIGINT handler's frame in the traceback
            if tb.tb_next.tb_frame.f_code is interrupt_call.__code__:
                tb.tb_next = None
            tb = tb.tb_next
        report(exc)
    return flush_streams(status), flags


# ---- reset and verification ---------------------------------------------------------------------

def reset():
    """Kill every sandbox process, empty the scratch dirs, then say whether that verifiably worked."""
    finish_exiting_child()
    discard_zygote()
    kill_sandbox()
    empty_scratch()
    return verify_clean()


def kill_sandbox():
    """End every process but PID 1 and the template; repeat until /proc agrees or the time is up.

    Only live processes can fork, so when /proc shows none after reaping, none can appear. Otherwise
    the template's killer, running as the sandbox uid, sends kill(-1): the kernel signals every
    process that uid may signal in one sweep (a forking loop cannot outrun it), and never root's."""
    deadline, pause = time.monotonic() + KILL_WAIT_S, 0.0005
    while True:
        reap_zombies()
        if not stray_pids() or time.monotonic() > deadline:
            return
        TEMPLATE.call(b"kill")
        reap_zombies()
        if not stray_pids():
            return
        time.sleep(pause)  # killed processes take a moment to exit (longer under gVisor): let them
        pause = min(pause * 2, 0.02)


def reap_zombies():
    # The task's child and the daemons it left are reparented to PID 1; their exit status is ours.
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def stray_pids():
    """Every process but PID 1, the template and the waiting child (which has run nothing yet)."""
    allowed = {"1", str(TEMPLATE.pid), str(zygote_pid())}
    return [name for name in os.listdir("/proc") if name.isdigit() and name not in allowed]


def empty_scratch():
    """Remove what the task left. Entries right in the scratch dirs go from PID 1: unlink and rmdir
    never follow a symlink, and nothing of the sandbox is alive to race. Anything deeper is removed by
    the template's cleaner, running as the sandbox uid, so that no path can make root act elsewhere."""
    leftovers = False
    for top in SCRATCH_DIRS:
        for entry in os.scandir(top):
            try:
                (os.rmdir if entry.is_dir(follow_symlinks=False) else os.unlink)(entry.path)
            except OSError:
                leftovers = True
    if leftovers:
        TEMPLATE.call(b"clean")


def remove_contents(top):
    """As the sandbox uid: delete everything inside `top`, never following symlinks."""
    for entry in os.scandir(top):
        try:
            if not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)
                continue
            # The task may have left dirs without rwx for their owner: rmtree could not empty those.
            os.chmod(entry.path, 0o700)
            for path, dirs, _ in os.walk(entry.path):
                for sub in (os.path.join(path, name) for name in dirs):
                    if not os.path.islink(sub):
                        os.chmod(sub, 0o700)
            shutil.rmtree(entry.path)
        except Exception:
            pass  # verification reports whatever could not go


def verify_clean():
    """(clean, detail): no process but PID 1 and a live template, every scratch dir empty, no SysV IPC
    object and no socket or connection state left in the network namespace."""
    reap_zombies()
    problems = []
    if not TEMPLATE.alive():
        problems.append("the template process is gone")
    if strays := stray_pids():
        problems.append(f"{len(strays)} process(es) still alive")
    for top in SCRATCH_DIRS:
        try:
            if left := len(os.listdir(top)):
                problems.append(f"{top} still holds {left} entries")
        except OSError as exc:
            problems.append(f"cannot list {top}: {exc.strerror}")
    ints = (ctypes.c_int * 64)()
    for what, info, index in SYSV_IPC_COUNTS:
        if info(ints) < 0:
            problems.append(f"cannot count SysV IPC {what}: {os.strerror(ctypes.get_errno())}")
        elif ints[index]:
            problems.append(f"{ints[index]} SysV IPC {what} left")
    if sockets := network_leftovers():
        problems.append(f"network state left: {sockets}")
    elif not problems and not HAVE_SOCKSTAT:
        _tcp_accepted_when_clean[0] = tcp_accepted()
    return not problems, "; ".join(problems)


def network_leftovers():
    """Socket and connection state in the container's network namespace that is not the runner's own
    control socket, as 'tcp tw 1, unix 1' (empty when none)."""
    found = [f"unix {n}"] if (n := foreign_unix_sockets()) else []
    if HAVE_SOCKSTAT:
        found += sockstat_leftovers()
    elif (accepted := tcp_accepted()) != _tcp_accepted_when_clean[0]:
        # gVisor keeps no sockstat and lists no TIME_WAIT in /proc/net/tcp, yet a port stays taken. With
        # only loopback, every connection that got established was accepted in this namespace: any
        # since the last clean check may have left such state (a refused connect leaves none).
        found.append(f"tcp connections accepted: {accepted - _tcp_accepted_when_clean[0]}")
    return ", ".join(found)


# The counters of /proc/net/sockstat that belong to the network namespace (orphan, alloc and mem count
# the whole host): sockets in use, TIME_WAIT states and IP fragment queues.
SOCKSTAT_FILES = ("/proc/net/sockstat", "/proc/net/sockstat6")
SOCKSTAT_KEYS = (b"inuse", b"tw")
HAVE_SOCKSTAT = os.path.exists(SOCKSTAT_FILES[0])
_tcp_accepted_when_clean = [0]


def sockstat_leftovers():
    found = []
    for path in SOCKSTAT_FILES:
        try:
            with open(path, "rb", buffering=0) as f:
                rows = f.read().splitlines()
        except OSError:
            continue
        for row in rows:
            proto, _, rest = row.partition(b":")
            fields = rest.split()
            for key, value in zip(fields[::2], fields[1::2], strict=False):
                if key in SOCKSTAT_KEYS and proto != b"sockets" and value != b"0":
                    found.append(f"{proto.decode().lower()} {key.decode()} {value.decode()}")
    return found


def foreign_unix_sockets():
    """Unix sockets alive in the namespace other than the runner's own pair (all task processes are
    gone by now, so any such socket outlived them)."""
    try:
        with open("/proc/net/unix", "rb", buffering=0) as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return 0
    return sum(1 for row in rows if len(fields := row.split()) > 6 and int(fields[6]) not in TEMPLATE.inodes)


def tcp_accepted():
    """TCP connections accepted (passive opens) in this network namespace, from /proc/net/snmp."""
    try:
        with open("/proc/net/snmp", "rb", buffering=0) as f:
            rows = f.read().splitlines()
    except OSError:
        return 0
    for names, values in zip(rows[::2], rows[1::2], strict=False):
        if names.startswith(b"Tcp:"):
            counters = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(counters.get(b"PassiveOpens", 0))
    return 0


# ---- the template -------------------------------------------------------------------------------

class Template:
    """PID 1's handle on the pristine template process: a control socket and its pid.

    Commands are one word with, for `spawn`, the child's pipe ends passed as file descriptors; the
    answer is `ok <pid>` or `error <detail>`. Nothing else ever crosses the socket: the template never
    holds a task's data, so what it forks starts as clean as the container did."""

    def __init__(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Our own control socket shows in /proc/net/unix: the network check must not count it.
        self.inodes = {os.fstat(ours.fileno()).st_ino, os.fstat(theirs.fileno()).st_ino}
        self.pid = os.fork()
        if self.pid == 0:
            ours.close()
            template_main(theirs)  # never returns
        theirs.close()
        self.sock = ours
        self.sock.settimeout(TEMPLATE_WAIT_S)

    def call(self, command, fds=()):
        """Send a command and wait for the number in its `ok` answer; RuntimeError otherwise."""
        self.request(command, fds)
        return self.answer(command)

    def request(self, command, fds=()):
        try:
            socket.send_fds(self.sock, [command], list(fds))
        except OSError as exc:
            raise RuntimeError(f"the template did not take {command.decode()!r}: {exc!r}") from None

    def answer(self, command):
        try:
            answer = self.sock.recv(256)
        except OSError as exc:
            raise RuntimeError(f"the template did not answer {command.decode()!r}: {exc!r}") from None
        word, _, rest = answer.decode("ascii", "replace").partition(" ")
        if word != "ok":
            raise RuntimeError(f"the template failed {command.decode()!r}: {rest or 'it is gone'}")
        return int(rest)

    def alive(self):
        return not has_exited(self.pid)


TEMPLATE = None  # set by main(), in PID 1


def template_main(sock):
    """Body of the template: serve commands until PID 1 closes the socket. Never returns."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setsid()  # out of PID 1's process group and session: a signal aimed at those is not for us
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)  # the frame channel is PID 1's alone
        keep = sock.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
        sock.settimeout(None)
        commands = {b"spawn": template_spawn, b"kill": template_kill, b"clean": template_clean}
        while True:
            command, fds, _, _ = socket.recv_fds(sock, 64, 8)
            if not command:
                os._exit(0)  # PID 1 is gone
            try:
                handler = commands.get(command)
                answer = f"ok {handler(*fds)}" if handler else f"error unknown command {command!r}"
            except Exception as exc:
                answer = f"error {exc!r}"
            finally:
                for fd in fds:
                    os.close(fd)
            sock.send(answer.encode("ascii", "replace")[:256])
    finally:
        os._exit(1)


def template_spawn(go_r, out_w, err_w, status_w, files_w):
    """Fork a task's child through an intermediate that exits at once: the child is reparented to PID 1,
    so that PID 1 can wait for it (status, rusage) as for its own. Returns the child's pid."""
    pid_r, pid_w = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(pid_r)
            child = os.fork()
            if child == 0:
                os.close(pid_w)
                task_child(go_r, out_w, err_w, status_w, files_w)  # never returns
            os.write(pid_w, struct.pack(">i", child))
        finally:
            os._exit(0)
    os.close(pid_w)
    try:
        data = os.read(pid_r, 4)
    finally:
        os.close(pid_r)
        os.waitpid(middle, 0)  # once it is reaped, the child's parent is PID 1
    if len(data) != 4:
        raise RuntimeError("the intermediate process died before it forked")
    return struct.unpack(">i", data)[0]


def template_kill():
    """One sweep of kill(-1, SIGKILL) as the sandbox uid; PID 1 reaps and checks, and asks again."""
    return run_as_sandbox(lambda: [kill_all_visible() for _ in range(3)], KILL_WAIT_S)


def kill_all_visible():
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass


def template_clean():
    return run_as_sandbox(lambda: [remove_contents(top) for top in SCRATCH_DIRS], CLEANER_WAIT_S)


def run_as_sandbox(work, wait_s):
    """Run `work` in a child of the template as the sandbox uid, for at most `wait_s`; returns its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(SANDBOX_GID, SANDBOX_GID, SANDBOX_GID)
            os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
            work()
        finally:
            os._exit(0)
    deadline = time.monotonic() + wait_s
    pause = 0.0001
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.monotonic() > deadline:
            kill_task(pid)  # if it hung, verification reports what it left
            os.waitpid(pid, 0)
            break
        time.sleep(pause)
        pause = min(pause * 2, 0.01)
    return pid


# ---- start-up -----------------------------------------------------------------------------------

def preload(modules):
    """Import the image's heavy modules once, before the template forks, so that a task's import of them
    is a dictionary lookup. Every task still starts from this same state: each is a fresh fork.

    The task dirs exist while they import (matplotlib makes and remembers its MPLCONFIGDIR, and reads the
    built font list from there rather than scanning the fonts again); then whatever the imports left in
    the scratch dirs goes, before the template forks and the first clean check. No task has run yet, so
    nothing there is untrusted, and PID 1 removes it itself."""
    make_task_dirs()
    try:
        for name in filter(None, (part.strip() for part in modules.split(","))):
            try:
                __import__(name)
            except Exception as exc:  # a broken optional module must not take the container down
                print(f"warmpool runner: could not preload {name}: {exc!r}", file=sys.stderr)
    finally:
        for top in SCRATCH_DIRS:
            for entry in os.scandir(top):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)


def make_task_dirs():
    """The task's work and home dirs (and matplotlib's), with the image's built caches linked in."""
    for path in TASK_DIRS:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    for target, link in CACHE_LINKS:
        try:
            os.symlink(target, link)
        except OSError:
            pass  # a cache missed costs time, not correctness


def image_environment(env):
    """The image's settings for its libraries that tasks keep (IMAGE_ENV), where the image has matplotlib
    (its font list was built): a matplotlib config dir on /tmp is then made for each task, with the font
    list linked into it. An image without matplotlib keeps the minimal environment."""
    built = sorted(os.listdir(MPL_BUILT_CACHE)) if os.path.isdir(MPL_BUILT_CACHE) else []
    if not built:
        return {}
    kept = {name: env[name] for name in IMAGE_ENV if env.get(name)}
    config_dir = kept.get("MPLCONFIGDIR", "")
    if os.path.dirname(config_dir) == "/tmp":  # one level below /tmp: the reset removes it with the rest
        TASK_DIRS.append(config_dir)
        CACHE_LINKS.extend((os.path.join(MPL_BUILT_CACHE, name), os.path.join(config_dir, name)) for name in built)
    return kept


def main():
    global FRAME_OUT, TEMPLATE
    if os.getpid() != 1:
        sys.exit("warmpool runner: refusing to start: not PID 1 (its reset kills every process it can)")
    # Move the frame channel off fds 0/1 so that nothing printed by accident can corrupt it.
    frame_in, FRAME_OUT = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(2, 1)
    os.close(null)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # PID 1 ignores SIGTERM unless it asks for it
    modules = os.environ.get("WARMPOOL_PRELOAD", "")  # set by the image, not by the host
    kept = image_environment(os.environ)
    os.environ.clear()  # the tasks' environment, set once here so that forks inherit it for free
    os.environ.update(TASK_ENV, **kept)
    preload(modules)
    gc.collect()
    gc.freeze()  # keep the collector off the pages shared with the children, so forks stay cheap
    TEMPLATE = Template()  # before the first frame is read: it must never have seen one
    reader = open(frame_in, "rb", buffering=READ_CHUNK)
    serve(reader)


if __name__ == "__main__":
    main()
