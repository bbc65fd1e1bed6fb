"""warmpool sandbox runner: PID 1 of every sandbox container (stdlib only; see PROTOCOL.md).

The host sends length-prefixed JSON frames on stdin; the runner answers with frames on stdout. For a
`run` it forks this already-warm interpreter, drops the child to the sandbox uid and runs the code there
under a wall-clock deadline and output caps, replies `result`, then kills every other process in the
container, empties the scratch dirs, verifies both and replies `reset`. One task at a time: the loop is
single-threaded and blocking on purpose, so there is no state to race on.

Never run this on a host: the reset is kill(-1, SIGKILL), so it refuses to start unless it is PID 1.
"""

import atexit
import builtins
import collections
import ctypes
import gc
import json
import linecache
import marshal
import math
import mmap
import os
import resource
import select
import shutil
import signal
import struct
import sys
import time
import traceback
import types

SANDBOX_UID = SANDBOX_GID = 10001
# POSIX message queues live in /dev/mqueue where the engine mounts it (runc does, gVisor does not).
SCRATCH_DIRS = ("/tmp", "/dev/shm") + (("/dev/mqueue",) if os.path.isdir("/dev/mqueue") else ())
WORK_DIR, HOME_DIR = "/tmp/work", "/tmp/home"
TASK_ENV = {"HOME": HOME_DIR, "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
            "TMPDIR": "/tmp", "USER": "sandbox"}
MAX_FRAME_BYTES = 64 << 20
KILL_WAIT_S = 2.0  # how long the reset keeps killing before it calls the container dirty
CLEANER_WAIT_S = 5.0  # how long the scratch cleaner may take
NO_PIDFD_TICK_S = 0.002  # how often to look for the child's exit where there is no pidfd (gVisor)
READ_CHUNK = 1 << 16
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

# One byte of memory shared with each task child (an fd would have to survive the closing of all
# others): how the child tells what happened to it.
FLAG = mmap.mmap(-1, 1)
FLAG_NONE, FLAG_MEMORY_ERROR, FLAG_SETUP_FAILED = 0, 1, 2
FRAME_OUT = -1  # the frame channel's write end, set by main()
_KEEP: list = []  # in the task child: the runner's own std streams, kept alive

Task = collections.namedtuple("Task", "id code stdin timeout_s output_limit fsize_limit nofile_limit nproc_limit")


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
    data = json.dumps(frame).encode()  # ASCII-only, hence always valid UTF-8
    write_all(FRAME_OUT, struct.pack(">I", len(data)) + data)


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
        handle_run(parse_task(msg, msg_id))
    else:
        raise ProtocolError(f"unknown op {ascii(op)[:100]}")


def parse_task(msg, msg_id):
    def field(name, kind, default=None):
        value = msg.get(name, default)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ProtocolError(f"run: {name} is missing or not a {getattr(kind, '__name__', 'number')}")
        return value
    timeout_s = float(field("timeout_s", (int, float)))
    limits = [field(name, int) for name in ("output_limit_bytes", "fsize_limit_bytes", "nofile_limit")]
    limits.append(field("nproc_limit", int, 0))  # optional: 0 leaves RLIMIT_NPROC alone
    if not 0 < timeout_s < math.inf or min(limits) < 0:
        raise ProtocolError("run: timeout_s must be positive and finite, limits not negative")
    return Task(msg_id, field("code", str), field("stdin", str, ""), timeout_s, *limits)


def handle_run(task):
    """Reply `result`, then `reset`. If the runner itself fails, `error` replaces `result` and the
    reset is reported dirty, so that the host replaces the container."""
    failure = ""
    try:
        send(run_task(task))
    except Exception as exc:
        failure = f"runner failed to run the task: {exc!r}"
        send({"op": "error", "id": task.id, "detail": failure})
    try:
        clean, detail = reset()
    except Exception as exc:
        clean, detail = False, f"reset failed: {exc!r}"
    if failure:
        clean, detail = False, "; ".join(filter(None, [failure, detail]))
    send({"op": "reset", "id": task.id, "clean": clean, "detail": detail})
    if clean:
        ensure_zygote()  # after the reply: the host may lease the container while the child sets up


# ---- running a task: the parent -----------------------------------------------------------------

def run_task(task):
    reap_zombies()
    zygote = take_zygote()
    if zygote is not None and has_exited(zygote.pid):  # died while waiting (say, memory pressure)
        close_zygote(zygote)
        reap_zombies()
        zygote = None
    zygote = zygote or spawn_zygote()
    compiled = precompile(task.code)
    go = marshal.dumps((task.code, compiled, task.stdin.encode("utf-8", "replace"),  # "replace": lone surrogates
                        task.timeout_s, task.fsize_limit, task.nofile_limit, task.nproc_limit))
    del compiled
    oom_before = oom_kills()
    started = time.monotonic()
    pid, out_r, err_r = zygote.pid, zygote.out_r, zygote.err_r
    try:
        write_all(zygote.go_w, struct.pack(">Q", len(go)) + go)  # the child reads while we write
    except OSError:
        pass  # the child is gone: supervise sees it exit, and its FLAG or status says why
    finally:
        os.close(zygote.go_w)
    try:
        verdict, out, err = supervise(pid, out_r, err_r, started + task.timeout_s, task.output_limit)
    finally:
        os.close(out_r)
        os.close(err_r)
    _, status, usage = os.wait4(pid, 0)
    run_ms = (time.monotonic() - started) * 1000
    if FLAG[0] == FLAG_SETUP_FAILED:
        raise RuntimeError(bytes(err[-500:]).decode("utf-8", "replace"))
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    truncated = [len(buf) > task.output_limit for buf in (out, err)]
    if verdict is None:
        if FLAG[0] == FLAG_MEMORY_ERROR or (sig == signal.SIGKILL and oom_kills() > oom_before):
            verdict = "memory_exceeded"  # our SIGKILLs have a verdict already: this one was the kernel's
        elif any(truncated):
            verdict = "output_limit_exceeded"
        else:
            verdict = "succeeded" if exit_code == 0 else "failed"
    out, err = (bytes(buf[:task.output_limit]).decode("utf-8", "replace") for buf in (out, err))
    return {"op": "result", "id": task.id, "status": verdict, "exit_code": exit_code, "signal": sig,
            "stdout": out, "stderr": err, "stdout_truncated": truncated[0], "stderr_truncated": truncated[1],
            "run_ms": round(run_ms, 3), "usage": {"cpu_s": round(usage.ru_utime + usage.ru_stime, 6),
                                                  "max_rss_bytes": usage.ru_maxrss * 1024}}


def precompile(code):
    """The task's code object, or None to let the child compile it (large code, or code that does not
    compile: the child then raises the error and reports it exactly as the interpreter would)."""
    if len(code) > PARENT_COMPILE_MAX_CHARS:
        return None
    try:
        return compile(code, "<task>", "exec")
    except BaseException:
        return None


def supervise(pid, out_r, err_r, deadline, limit):
    """Collect output until the child exits; kill it at the deadline or past the output cap.

    Returns (verdict or None, stdout, stderr); a buffer longer than `limit` passed the cap. The
    child's exit, not EOF on its pipes, ends the wait: a daemon it left may hold them open for ever.
    """
    bufs = {out_r: bytearray(), err_r: bytearray()}
    pidfd = open_pidfd(pid)
    tick_s = math.inf if pidfd is not None else NO_PIDFD_TICK_S
    poller = select.poll()
    for fd in (out_r, err_r, pidfd):
        if fd is not None:
            os.set_blocking(fd, False)
            poller.register(fd, select.POLLIN)
    verdict = "timed_out"
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(math.ceil(min(remaining, tick_s) * 1000)):
                if fd in bufs and not pump(fd, bufs[fd], limit, drain=False):
                    poller.unregister(fd)
            if any(len(buf) > limit for buf in bufs.values()):
                verdict = "output_limit_exceeded"
                break
            if has_exited(pid):
                for fd, buf in bufs.items():  # what it wrote just before it exited
                    pump(fd, buf, limit, drain=True)
                return None, bufs[out_r], bufs[err_r]
    finally:
        if pidfd is not None:
            os.close(pidfd)
    kill_task(pid)
    return verdict, bufs[out_r], bufs[err_r]


def pump(fd, buf, limit, drain):
    """Read one chunk (or, with `drain`, all there is) but stop once past `limit`. False at EOF."""
    while len(buf) <= limit:
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        buf += chunk
        if not drain:
            break
    return True


def open_pidfd(pid):
    try:
        return os.pidfd_open(pid)
    except OSError:  # gVisor has no pidfd_open: the caller polls with a short tick instead
        return None


def has_exited(pid):
    # WNOWAIT leaves the child a zombie, so that wait4 can still collect its status and rusage.
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


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

Zygote = collections.namedtuple("Zygote", "pid go_w out_r err_r")
_zygote = None  # the next task's child, already in the sandbox and waiting for its code


def spawn_zygote():
    """Fork the next task's child ahead of time. It enters the sandbox and blocks reading its code, so
    the fork and the set-up (~1.5 ms, mostly page faults) are off the task's path. It runs nothing
    until the code arrives, and it is forked only after a verified reset."""
    (go_r, go_w), (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe(), os.pipe()
    FLAG[0] = FLAG_NONE
    pid = os.fork()
    if pid == 0:
        task_child(go_r, out_w, err_w)  # never returns
    for fd in (go_r, out_w, err_w):
        os.close(fd)
    return Zygote(pid, go_w, out_r, err_r)


def ensure_zygote():
    global _zygote
    if _zygote is None:
        _zygote = spawn_zygote()


def take_zygote():
    global _zygote
    zygote, _zygote = _zygote, None
    return zygote


def discard_zygote():
    """Before a reset: the reset's kill(-1) takes the waiting child too; close our ends of its pipes."""
    zygote = take_zygote()
    if zygote is not None:
        close_zygote(zygote)


def close_zygote(zygote):
    kill_task(zygote.pid)
    for fd in (zygote.go_w, zygote.out_r, zygote.err_r):
        os.close(fd)


def zygote_pid():
    return _zygote.pid if _zygote is not None else None


def task_child(go_r, out_w, err_w):
    """Body of the forked child: enter the sandbox, wait for the code, run it, _exit. Never returns."""
    status = 125
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        for src, dst in ((null, 0), (out_w, 1), (err_w, 2), (go_r, 3)):
            os.dup2(src, dst)
        os.closerange(4, os.sysconf("SC_OPEN_MAX"))  # the frame channel above all
        enter_sandbox()
        code, compiled, stdin, timeout_s, fsize_limit, nofile_limit, nproc_limit = receive_task(3)
        os.close(3)
        stdin_fd = os.memfd_create("stdin")  # before the limits: stdin may be larger than RLIMIT_FSIZE
        write_all(stdin_fd, stdin)
        os.lseek(stdin_fd, 0, os.SEEK_SET)
        os.dup2(stdin_fd, 0)
        os.close(stdin_fd)
        del stdin
        apply_task_limits(timeout_s, fsize_limit, nofile_limit, nproc_limit)
    except BaseException as exc:  # never run the code half-sandboxed
        FLAG[0] = FLAG_SETUP_FAILED
        try:
            os.write(2, f"sandbox setup failed: {exc!r}".encode())
        finally:
            os._exit(status)
    try:
        status = run_code(code, compiled)
    except BaseException:  # a runner bug, not the task's: say so where the host will look
        os.write(2, f"warmpool: runner error in the task child:\n{traceback.format_exc()}".encode())
    finally:
        os._exit(status)


def receive_task(fd):
    """The go message from PID 1: a length, then marshal'd (code, code object or None, stdin bytes,
    timeout_s, fsize_limit, nofile_limit, nproc_limit). EOF first means PID 1 gave up on us: leave quietly."""
    def read_exactly(size):
        chunks = bytearray()
        while len(chunks) < size:
            chunk = os.read(fd, size - len(chunks))
            if not chunk:
                os._exit(0)
            chunks += chunk
        return bytes(chunks)
    (size,) = struct.unpack(">Q", read_exactly(8))
    return marshal.loads(read_exactly(size))


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
    """The task's own limits, and its work and home dirs (made now: a waiting child leaves /tmp empty)."""
    # RLIMIT_CPU is only a backstop for the wall clock: allow every usable core busy until the deadline.
    cpu_s = math.ceil(timeout_s * CPUS) + 1
    for res, value in ((resource.RLIMIT_FSIZE, fsize_limit), (resource.RLIMIT_NOFILE, nofile_limit),
                       (resource.RLIMIT_CPU, cpu_s)):
        set_limit(res, value)
    if nproc_limit:
        # Only where the host asks (gVisor): there the count is the sandbox's own, while on a shared
        # kernel RLIMIT_NPROC counts the sandbox uid's processes in every container on the host.
        set_limit(resource.RLIMIT_NPROC, nproc_limit)
    for path in (WORK_DIR, HOME_DIR):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    os.chdir(WORK_DIR)


def set_limit(res, value):
    hard = resource.getrlimit(res)[1]  # soft = hard, so that the task cannot raise them
    resource.setrlimit(res, (value, value) if hard == resource.RLIM_INFINITY else (min(value, hard),) * 2)


def run_code(code, compiled=None):
    """Run the task as `python3 script.py` would, on the sandbox's fds 0-2; return the exit status."""
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
    linecache.cache["<task>"] = (len(code), None, code.splitlines(True), "<task>")  # source in tracebacks
    try:
        exec(compiled if compiled is not None else compile(code, "<task>", "exec"), main.__dict__)
        status = 0
    except SystemExit as exc:
        status = exit_status(exc.code)
    except BaseException as exc:
        if isinstance(exc, MemoryError):
            FLAG[0] = FLAG_MEMORY_ERROR
        status = 1
        report(exc)
    return shut_down(status)


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
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):  # the task may have swapped them
        try:
            if stream is not None and not stream.closed:
                stream.flush()
        except BaseException:
            status = status or 120  # as the interpreter does when it cannot flush stdout
    return status


# ---- reset and verification ---------------------------------------------------------------------

def reset():
    """Kill everything but PID 1, empty the scratch dirs, then say whether both verifiably worked."""
    discard_zygote()
    kill_everything()
    empty_scratch()
    return verify_clean()


def kill_everything():
    # From PID 1, kill(-1) reaches every other process in the container; repeat until /proc agrees.
    deadline, pause = time.monotonic() + KILL_WAIT_S, 0.0002
    while True:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        reap_zombies()
        if not stray_pids() or time.monotonic() > deadline:
            return
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


def reap_zombies():
    # Daemons the task left behind are reparented to PID 1; their exit status is ours to collect.
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def stray_pids():
    """Every process but PID 1 and the waiting child (which has run nothing yet)."""
    allowed = {"1", str(zygote_pid())}
    return [name for name in os.listdir("/proc") if name.isdigit() and name not in allowed]


def empty_scratch():
    """Remove what the task left. Entries right in the scratch dirs go from PID 1: unlink and rmdir
    never follow a symlink, and nothing of the sandbox is alive to race. Anything deeper is removed by
    a child running as the sandbox uid, so that no path can make root act elsewhere."""
    leftovers = False
    for top in SCRATCH_DIRS:
        for entry in os.scandir(top):
            try:
                (os.rmdir if entry.is_dir(follow_symlinks=False) else os.unlink)(entry.path)
            except OSError:
                leftovers = True
    if leftovers:
        run_cleaner()


def run_cleaner():
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(SANDBOX_GID, SANDBOX_GID, SANDBOX_GID)
            os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
            for top in SCRATCH_DIRS:
                remove_contents(top)
        finally:
            os._exit(0)
    deadline = time.monotonic() + CLEANER_WAIT_S
    while not has_exited(pid) and time.monotonic() < deadline:
        time.sleep(NO_PIDFD_TICK_S)  # a rare path: a plain tick will do
    kill_task(pid)  # a no-op when it finished; if it hung, verification reports what it left
    os.waitpid(pid, 0)


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
    """(clean, detail): no process but PID 1, every scratch dir empty, no SysV IPC object left."""
    reap_zombies()
    problems = []
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
    return not problems, "; ".join(problems)


# ---- start-up -----------------------------------------------------------------------------------

def main():
    global FRAME_OUT
    if os.getpid() != 1:
        sys.exit("warmpool runner: refusing to start: not PID 1 (its reset kills every process it can)")
    # Move the frame channel off fds 0/1 so that nothing printed by accident can corrupt it.
    frame_in, FRAME_OUT = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(2, 1)
    os.close(null)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # PID 1 ignores SIGTERM unless it asks for it
    os.environ.clear()  # the tasks' environment, set once here so that forks inherit it for free
    os.environ.update(TASK_ENV)
    reader = open(frame_in, "rb", buffering=READ_CHUNK)
    gc.collect()
    gc.freeze()  # keep the collector off the pages shared with the children, so forks stay cheap
    serve(reader)


if __name__ == "__main__":
    main()
