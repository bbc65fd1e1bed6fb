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
import gc
import json
import linecache
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
KILL_WAIT_S = 2.0      # how long the reset keeps killing before it calls the container dirty
CLEANER_WAIT_S = 5.0   # how long the scratch cleaner may take
READ_CHUNK = 1 << 16
FRAME_OUT = -1  # the frame channel's write end, set by main()
PYTHON_VERSION = "%d.%d.%d" % sys.version_info[:3]
CPUS = len(os.sched_getaffinity(0))
OOM_FILES = ("/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events")  # v1, v2
SYSV_IPC_FILES = ("/proc/sysvipc/shm", "/proc/sysvipc/msg", "/proc/sysvipc/sem")

# One byte of memory shared with every task child (no fd to leak): how the child says what happened.
_FLAG = mmap.mmap(-1, 1)
FLAG_NONE, FLAG_MEMORY_ERROR, FLAG_SETUP_FAILED = 0, 1, 2
_KEEP = []  # the child's original std streams: if they were freed they would close fds 0-2

Task = collections.namedtuple("Task", "id code stdin timeout_s output_limit fsize_limit nofile_limit")


class ProtocolError(Exception):
    """A frame the runner cannot act on; answered with an `error` frame."""


# ---- frames -------------------------------------------------------------------------------------

def read_frame(reader):
    """Next request as a dict, or None at EOF. Raises ProtocolError for a bad body."""
    header = reader.read(4)
    if len(header) < 4:
        return None
    (size,) = struct.unpack(">I", header)
    if size > MAX_FRAME_BYTES:
        # The stream can no longer be trusted to be in sync: tell the host and stop.
        send({"op": "error", "id": None, "detail": f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}"})
        sys.exit(1)
    body = reader.read(size)
    if len(body) < size:
        return None
    try:
        msg = json.loads(body)
    except ValueError as exc:
        raise ProtocolError(f"bad JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("a frame must hold a JSON object")
    return msg


def send(frame):
    data = json.dumps(frame).encode()  # ASCII-only, hence always valid UTF-8
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        view = view[os.write(FRAME_OUT, view):]


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


def dispatch(msg, msg_id):
    op = msg.get("op")
    if msg_id is None:
        raise ProtocolError("missing or non-string id")
    if op == "ping":
        reap_zombies()
        clean, detail = verify_clean()
        send({"op": "pong", "id": msg_id, "clean": clean, "detail": detail, "python": PYTHON_VERSION})
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
    if not 0 < timeout_s < math.inf:
        raise ProtocolError("run: timeout_s must be positive and finite")
    ints = [field(name, int) for name in ("output_limit_bytes", "fsize_limit_bytes", "nofile_limit")]
    if min(ints) < 0:
        raise ProtocolError("run: limits must not be negative")
    return Task(msg_id, field("code", str), field("stdin", str, ""), timeout_s, *ints)


def handle_run(task):
    """Reply `result` then `reset`; a runner failure in between becomes `error` and a dirty reset."""
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


# ---- running a task (parent side) ---------------------------------------------------------------

def run_task(task):
    reap_zombies()
    stdin_fd = os.memfd_create("stdin", os.MFD_CLOEXEC)
    write_all(stdin_fd, task.stdin.encode("utf-8", "replace"))  # "replace": lone surrogates
    os.lseek(stdin_fd, 0, os.SEEK_SET)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    _FLAG[0] = FLAG_NONE
    oom_before = oom_kills()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        task_child(task, stdin_fd, out_w, err_w)  # never returns
    for fd in (stdin_fd, out_w, err_w):
        os.close(fd)
    try:
        verdict, out, err = supervise(pid, out_r, err_r, started + task.timeout_s, task.output_limit)
    finally:
        os.close(out_r)
        os.close(err_r)
    _, status, usage = os.wait4(pid, 0)
    run_ms = (time.monotonic() - started) * 1000
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    if _FLAG[0] == FLAG_SETUP_FAILED:
        raise RuntimeError("sandbox setup failed: " + bytes(err).decode("utf-8", "replace")[-500:])
    truncated = [len(buf) > task.output_limit for buf in (out, err)]
    if verdict is None:
        oom_killed = sig == signal.SIGKILL and oom_kills() > oom_before
        if _FLAG[0] == FLAG_MEMORY_ERROR or oom_killed:
            verdict = "memory_exceeded"
        elif any(truncated):
            verdict = "output_limit_exceeded"
        else:
            verdict = "succeeded" if exit_code == 0 else "failed"
    return {"op": "result", "id": task.id, "status": verdict, "exit_code": exit_code, "signal": sig,
            "stdout": decode(out, task.output_limit), "stderr": decode(err, task.output_limit),
            "stdout_truncated": truncated[0], "stderr_truncated": truncated[1], "run_ms": round(run_ms, 3),
            "usage": {"cpu_s": round(usage.ru_utime + usage.ru_stime, 6),
                      "max_rss_bytes": usage.ru_maxrss * 1024}}


def supervise(pid, out_r, err_r, deadline, limit):
    """Collect output until the child exits; kill it at the deadline or past the output cap.

    Returns (verdict or None, stdout buffer, stderr buffer); a buffer longer than `limit` means the
    stream passed the cap (the caller trims it). The child's exit, not pipe EOF, ends the wait: a
    daemon it left behind may hold the pipes open for ever.
    """
    bufs = {out_r: bytearray(), err_r: bytearray()}
    watch = ExitWatch(pid)
    poller = select.poll()
    for fd in (*bufs, watch.fd):
        if fd is not None:
            os.set_blocking(fd, False)
            poller.register(fd, select.POLLIN)
    verdict = None
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                verdict = "timed_out"
                break
            events = poller.poll(math.ceil(min(remaining, watch.tick_s) * 1000))
            for fd, _ in events:
                if fd in bufs and not pump(fd, bufs[fd], limit, once=True):
                    poller.unregister(fd)
            if any(len(buf) > limit for buf in bufs.values()):
                verdict = "output_limit_exceeded"
                break
            if watch.exited(events):
                for fd, buf in bufs.items():  # whatever the child wrote just before it exited
                    pump(fd, buf, limit, once=False)
                return None, bufs[out_r], bufs[err_r]
    finally:
        watch.close()
    kill_task(pid)
    return verdict, bufs[out_r], bufs[err_r]


def pump(fd, buf, limit, once):
    """Read what is available (one chunk, or until empty) without going far past `limit`.
    Returns False at EOF."""
    while len(buf) <= limit:
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not chunk:
            return False
        buf += chunk
        if once:
            break
    return True


class ExitWatch:
    """Tells when a child has exited: a pidfd where the kernel has them, else a short poll tick
    (gVisor has no pidfd_open). Neither reaps, so wait4 still gets the status and rusage."""

    def __init__(self, pid):
        self.pid, self.fd, self.tick_s = pid, None, math.inf
        try:
            self.fd = os.pidfd_open(pid)
        except OSError:
            self.tick_s = 0.002

    def exited(self, events):
        if self.fd is not None:
            return any(fd == self.fd for fd, _ in events)
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def close(self):
        if self.fd is not None:
            os.close(self.fd)


def kill_task(pid):
    for kill, target in ((os.killpg, pid), (os.kill, pid)):  # its process group, then the child itself
        try:
            kill(target, signal.SIGKILL)
        except OSError:
            pass


def decode(buf, limit):
    return bytes(buf[:limit]).decode("utf-8", "replace")


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def oom_kills():
    """The container's OOM-kill counter (cgroup v1 or v2), or 0 where the kernel does not say."""
    for path in OOM_FILES:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            for line in os.read(fd, 4096).splitlines():
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
        finally:
            os.close(fd)
    return 0


# ---- running a task (child side) ----------------------------------------------------------------

def task_child(task, stdin_fd, out_w, err_w):
    """Body of the forked child: enter the sandbox, run the code, _exit. Never returns."""
    status = 125
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for src, dst in ((stdin_fd, 0), (out_w, 1), (err_w, 2)):
            os.dup2(src, dst)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the frame channel above all
        enter_sandbox(task)
    except BaseException as exc:  # never run the code half-sandboxed
        _FLAG[0] = FLAG_SETUP_FAILED
        try:
            os.write(2, f"warmpool: sandbox setup failed: {exc!r}\n".encode())
        finally:
            os._exit(status)
    try:
        status = run_code(task.code)
    except BaseException:  # a runner bug, not the task's: say so where the host will look
        os.write(2, f"warmpool: runner error in the task child:\n{traceback.format_exc()}".encode())
    finally:
        os._exit(status)


def enter_sandbox(task):
    os.setsid()
    fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)  # the OOM killer should take the task, not PID 1
    os.write(fd, b"1000")
    os.close(fd)
    os.setgroups([])
    os.setresgid(SANDBOX_GID, SANDBOX_GID, SANDBOX_GID)
    os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
    if os.getresuid() != (SANDBOX_UID,) * 3 or os.getgroups():
        raise PermissionError("could not drop to the sandbox uid")
    # RLIMIT_CPU is only a backstop for the wall clock: allow every usable core busy until the deadline.
    cpu_s = math.ceil(task.timeout_s * CPUS) + 1
    for res, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, task.fsize_limit),
                       (resource.RLIMIT_NOFILE, task.nofile_limit), (resource.RLIMIT_CPU, cpu_s)):
        hard = resource.getrlimit(res)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(res, (value, value))
    os.umask(0o022)
    for path in (WORK_DIR, HOME_DIR):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    os.chdir(WORK_DIR)


def run_code(code):
    """Run the task as `python3 script.py` would, on the sandbox's fds 0-2; return the exit status."""
    _KEEP.append((sys.stdin, sys.stdout, sys.stderr))
    sys.stdin = sys.__stdin__ = open(0, "r", encoding="utf-8", errors="surrogateescape")
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", errors="surrogateescape")
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, encoding="utf-8",
                                       errors="backslashreplace")  # line-buffered, as python3 does
    sys.argv = ["<task>"]
    main = types.ModuleType("__main__")  # so `import __main__` and pickle see the task, not the runner
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    linecache.cache["<task>"] = (len(code), None, code.splitlines(True), "<task>")  # source in tracebacks
    try:
        exec(compile(code, "<task>", "exec"), main.__dict__)
        status = 0
    except SystemExit as exc:
        status = exit_status(exc.code)
    except BaseException as exc:
        if isinstance(exc, MemoryError):
            _FLAG[0] = FLAG_MEMORY_ERROR
        status = 1
        report(exc)
    return shut_down(status)


def exit_status(code):
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    report_text(str(code))
    return 1


def report(exc):
    """Print an uncaught exception like the interpreter does, without the runner's own frame."""
    try:
        exc.__traceback__ = exc.__traceback__.tb_next
        if sys.excepthook is sys.__excepthook__:
            traceback.print_exception(exc)  # unlike the C hook, it finds the task's source in linecache
        else:
            sys.excepthook(type(exc), exc, exc.__traceback__)
    except BaseException:
        report_text("".join(traceback.format_exception_only(type(exc), exc)).rstrip())


def report_text(text):
    try:
        print(text, file=sys.stderr)
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
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):  # the task may swap them
        try:
            stream.flush()
        except BaseException:
            status = status or 120  # as the interpreter does when stdout cannot be flushed
    return status


# ---- reset and verification ---------------------------------------------------------------------

def reset():
    """Kill everything but PID 1, empty the scratch dirs, then say whether both verifiably worked."""
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
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stray_pids():
    return [name for name in os.listdir("/proc") if name.isdigit() and name != "1"]


def empty_scratch():
    """Remove what the task left. Entries directly in the scratch dirs go from PID 1: unlink and
    rmdir never follow a symlink, and nothing of the sandbox is alive to race. Anything deeper is
    removed by a child running as the sandbox uid, so a path can never make root act elsewhere."""
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
    watch, deadline = ExitWatch(pid), time.monotonic() + CLEANER_WAIT_S
    try:
        poller = select.poll()
        if watch.fd is not None:
            poller.register(watch.fd, select.POLLIN)
        while time.monotonic() < deadline and not watch.exited(poller.poll(min(watch.tick_s, 0.1) * 1000)):
            pass
    finally:
        watch.close()
    kill_task(pid)  # a no-op when it finished; if it hung, verification reports what is left
    os.waitpid(pid, 0)


def remove_contents(top):
    """As the sandbox uid: delete everything inside `top`, never following symlinks."""
    for entry in os.scandir(top):
        try:
            if entry.is_dir(follow_symlinks=False):
                open_up(entry.path)
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except Exception:
            pass  # verification reports whatever could not go


def open_up(top):
    # The task may have left dirs without rwx for their owner; rmtree cannot enter or empty those.
    os.chmod(top, 0o700)
    for path, dirs, _ in os.walk(top):
        for name in dirs:
            sub = os.path.join(path, name)
            if not os.path.islink(sub):
                try:
                    os.chmod(sub, 0o700)
                except OSError:
                    pass


def verify_clean():
    problems = []
    strays = stray_pids()
    if strays:
        problems.append(f"{len(strays)} process(es) still alive")
    for top in SCRATCH_DIRS:
        try:
            left = len(os.listdir(top))
        except OSError as exc:
            problems.append(f"cannot list {top}: {exc.strerror}")
            continue
        if left:
            problems.append(f"{top} still holds {left} entries")
    for path in SYSV_IPC_FILES:  # SysV IPC objects outlive their processes; the cleaner cannot remove them
        try:
            with open(path, "rb") as f:
                if len(f.read().splitlines()) > 1:
                    problems.append(f"SysV IPC objects left ({path})")
        except OSError:
            pass
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
    gc.freeze()  # keep the collector off the shared pages, so forks stay cheap
    serve(reader)


if __name__ == "__main__":
    main()
