"""A task's files, in and out (stdlib only; part of the runner, see PROTOCOL.md "Files").

Everything here that touches the task's working directory runs in the task's own child, as the sandbox
uid: writing the request's files before the code runs, and, after it ends, collecting the files its
`outputs` globs match and the matplotlib figures it left open or passed to `plt.show()`. The child sends
what it collected to PID 1 as records on its files pipe; PID 1 only parses them (`parse_records`), with
the byte budget enforced on its side too, so a task that writes records of its own on that pipe can only
change its own result.

The walk never follows a symlink (directories are opened with O_NOFOLLOW relative to their parent's fd,
so a swap during the walk cannot redirect it) and never reads a FIFO or a device (everything is opened with
O_NONBLOCK and kept only when fstat says it is a directory or a regular file).
"""

import base64
import fnmatch
import io
import os
import stat
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

# A record: path length, size, flags; then the path; then `size` bytes of content when FLAG_CONTENT is set.
RECORD = struct.Struct(">HQB")
FLAG_CONTENT = 1  # the content follows
FLAG_CUT = 2  # the child left files out here (entry or walk bound, figure cap): the list is incomplete
MAX_PATH_BYTES = 4096
MAX_OUTPUT_ENTRIES = 1000  # files listed in one result, content or not
MAX_WALK_ENTRIES = 100_000  # directory entries the outputs walk looks at
MAX_WALK_DEPTH = 64
MAX_FIGURES = 32  # figures rendered per task; a flood of thousands is cut here, not rendered for minutes
FIGURE_PATH = "figures/figure-{}.png"
READ_CHUNK = 1 << 16
# O_NONBLOCK: opening a FIFO for reading must not wait for a writer (it is then refused by fstat). No
# O_DIRECTORY for directories: gVisor follows a final symlink when O_DIRECTORY and O_NOFOLLOW come together
# (Linux refuses), so directories are opened like files and told apart by fstat.
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class FileError(Exception):
    """A request file could not be written; the task fails with this message on its stderr."""


# ---- files in (the task's child, before the code runs) --------------------------------------------

def checked_path(path: str | bytes) -> bytes:
    """`path` (str or bytes) as bytes if it is a safe relative file path, else ValueError saying why.
    The API checks the same; this is the runner's own guard."""
    raw = os.fsencode(path)
    parts = raw.split(b"/")
    if not raw or b"\0" in raw or raw.startswith(b"/") or b".." in parts or len(raw) > MAX_PATH_BYTES:
        raise ValueError(f"unsafe path {path!r}")
    if not parts[-1] or parts[-1] == b".":
        raise ValueError(f"{path!r} names a directory, not a file")
    return raw


def write_files(work_dir: str, files: Iterable[tuple[bytes, int]], read_exactly: Callable[[int], bytes],
                replace: bool = False) -> None:
    """Write each (path, size) of `files` under `work_dir`, reading its bytes with `read_exactly(n)` (the
    go pipe from PID 1, so that one file at a time is held). Files are created new (O_EXCL, O_NOFOLLOW)
    by the sandbox uid; directories on the way are made as needed. With `replace` (a session's call, whose
    working directory holds the earlier calls' files), a file or symlink already at a path is removed first:
    the symlink itself, never what it points to.

    Every file's bytes are read even after one fails (a session's go pipe carries its next call after them);
    then FileError names the first that failed."""
    failure: FileError | None = None
    for index, (path, size) in enumerate(files):
        data = read_exactly(size)
        if failure is not None:
            continue
        try:
            _write_file(work_dir, checked_path(path), data, replace)
        except (OSError, ValueError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            failure = FileError(f"warmpool: could not write files[{index}] {os.fsdecode(path)!r}: {detail}\n")
    if failure is not None:
        raise failure


def _write_file(work_dir: str, raw: bytes, data: bytes, replace: bool) -> None:
    parent, _, _ = raw.rpartition(b"/")
    if parent:
        os.makedirs(os.path.join(os.fsencode(work_dir), parent), mode=0o755, exist_ok=True)
    target = os.path.join(os.fsencode(work_dir), raw)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(target, flags, 0o644)
    except FileExistsError:
        if not replace:
            raise
        os.unlink(target)  # a directory there: EISDIR, reported as the entry's failure
        fd = os.open(target, flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


# ---- outputs (the task's child, after the code ends) ----------------------------------------------

class Sink:
    """Sends output files to PID 1 as records, while the byte budget lasts (later files: size only)."""

    def __init__(self, fd: int, budget_bytes: int) -> None:
        self.fd = fd
        self.budget_bytes = budget_bytes
        self.entries = 0
        self.paths: set[bytes] = set()
        self.cut = False

    def full(self) -> bool:
        return self.entries >= MAX_OUTPUT_ENTRIES

    def add(self, path: str, size: int, read: Callable[[int], bytes] | None = None) -> None:
        """One file; `read(n)` gives its content, called only if `size` fits the budget."""
        if self.full():
            self.mark_cut()
            return
        raw = os.fsencode(path)[:MAX_PATH_BYTES]
        self.paths.add(raw)
        self.entries += 1
        if read is not None and size <= self.budget_bytes:
            data = read(size)
            self.budget_bytes -= len(data)
            self._write(RECORD.pack(len(raw), len(data), FLAG_CONTENT) + raw)
            self._write(data)
        else:
            self._write(RECORD.pack(len(raw), size, 0) + raw)

    def mark_cut(self) -> None:
        if not self.cut:
            self.cut = True
            self._write(RECORD.pack(0, 0, FLAG_CUT))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]


def split_pattern(pattern: str) -> tuple[str, ...]:
    """A glob as its segments, without empty and '.' segments; consecutive '**' count once, and a final
    '**' means every file below (`out/**` is `out/**/*`: outputs are files, never the directory)."""
    parts: list[str] = []
    for part in pattern.split("/"):
        if part in ("", ".") or (part == "**" and parts and parts[-1] == "**"):
            continue
        parts.append(part)
    if parts and parts[-1] == "**":
        parts.append("*")
    return tuple(parts)


def _segment_matches(pattern: str, name: str) -> bool:
    if name.startswith(".") and not pattern.startswith("."):
        return False  # as glob: wildcards do not match a leading dot
    return fnmatch.fnmatchcase(name, pattern)


def matches(pattern: Sequence[str], parts: Sequence[str], prefix_only: bool = False) -> bool:
    """Whether the path `parts` matches the glob segments `pattern` (`**`: zero or more directories);
    with `prefix_only`, whether some path below the directory `parts` could."""
    # Positions in the pattern reachable after each name, as in a regular-expression NFA: linear in size.
    states = _closure({0}, pattern)
    for name in parts:
        after: set[int] = set()
        for i in states:
            if i < len(pattern):
                if pattern[i] == "**":
                    if not name.startswith("."):
                        after.add(i)
                elif _segment_matches(pattern[i], name):
                    after.add(i + 1)
        states = _closure(after, pattern)
        if not states:
            return False
    if prefix_only:
        return any(i < len(pattern) for i in states)
    return len(pattern) in states


def _closure(states: set[int], pattern: Sequence[str]) -> set[int]:
    """The states plus those reached by letting each '**' match zero directories."""
    out = set(states)
    for i in sorted(states):
        while i < len(pattern) and pattern[i] == "**":
            i += 1
            out.add(i)
    return out


def send_outputs(fd: int, work_dir: str, outputs: list[str], files_limit: int, figures: "Figures") -> None:
    """After the code: the files `outputs` match, then the figures, as records on the files pipe `fd`."""
    sink = Sink(fd, files_limit)
    try:
        collect_outputs(work_dir, outputs, sink)
        figures.send(sink)
    except OSError as exc:  # the task closed or filled the pipe: only its own result is short
        note(f"outputs not sent: {exc.strerror or exc!r}")


def note(text: str) -> None:
    """A line for the task's stderr (fd 2 itself: the task may have replaced sys.stderr)."""
    try:
        os.write(2, f"warmpool: {text}\n".encode("utf-8", "backslashreplace"))
    except OSError:
        pass


def collect_outputs(work_dir: str, patterns: Iterable[str], sink: Sink) -> None:
    """Walk `work_dir` and send every regular file that a pattern matches, in name order."""
    compiled = [p for p in (split_pattern(p) for p in patterns) if p]
    if not compiled:
        return
    try:
        root = open_dir(work_dir)
    except OSError as exc:
        note(f"outputs not collected: cannot open the working directory: {exc.strerror}")
        return
    seen = [0]
    try:
        _walk(root, (), compiled, sink, seen)
    finally:
        os.close(root)
    if seen[0] > MAX_WALK_ENTRIES:
        note(f"outputs: stopped after looking at {MAX_WALK_ENTRIES} entries of the working directory")


def _walk(dir_fd: int, parts: tuple[str, ...], patterns: list[tuple[str, ...]], sink: Sink, seen: list[int]) -> None:
    try:
        with os.scandir(dir_fd) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        seen[0] += 1
        if seen[0] > MAX_WALK_ENTRIES or sink.full():
            sink.mark_cut()
            return
        path = parts + (entry.name,)
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            continue
        if is_dir:
            if len(path) < MAX_WALK_DEPTH and any(matches(p, path, prefix_only=True) for p in patterns):
                try:
                    sub = open_dir(entry.name, dir_fd)  # a symlink swapped in: ELOOP
                except OSError:
                    continue
                try:
                    _walk(sub, path, patterns, sink, seen)
                finally:
                    os.close(sub)
        elif any(matches(p, path) for p in patterns):
            _send_file(dir_fd, entry.name, "/".join(path), sink)


def open_dir(path: str, dir_fd: int | None = None) -> int:
    """A directory's fd, never through a symlink (ELOOP) and never anything but a directory (ENOTDIR)."""
    fd = os.open(path, OPEN_FLAGS, dir_fd=dir_fd)
    if not stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotADirectoryError(20, "Not a directory", path)
    return fd


def _send_file(dir_fd: int, name: str, path: str, sink: Sink) -> None:
    try:
        fd = os.open(name, OPEN_FLAGS, dir_fd=dir_fd)
    except OSError:
        return  # a symlink (ELOOP), gone, or unreadable: not an output
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return  # a FIFO or a device: never read
        sink.add(path, info.st_size, lambda size: _read_up_to(fd, size))
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_up_to(fd: int, size: int) -> bytes:
    """At most `size` bytes (a file the task's leftovers still write may grow or shrink meanwhile)."""
    chunks = io.BytesIO()
    while chunks.tell() < size:
        chunk = os.read(fd, min(READ_CHUNK, size - chunks.tell()))
        if not chunk:
            break
        chunks.write(chunk)
    return chunks.getvalue()


# ---- figures (matplotlib, when the task's interpreter has pyplot) ----------------------------------

class Figures:
    """PNGs of the figures a task passed to plt.show() or left open, at most MAX_FIGURES of them."""

    def __init__(self) -> None:
        self.pngs: list[bytes] = []
        self.skipped = 0

    def install(self) -> None:
        """Make plt.show() render every open figure and close it (as a notebook does), and Figure.show()
        render its own figure. Only where pyplot is already imported (a preloaded image)."""
        plt: Any = sys.modules.get("matplotlib.pyplot")  # a module, typed as Any: matplotlib is not ours
        if plt is None:
            return
        figures = self

        def show(*args: object, **kwargs: object) -> None:
            figures.capture(plt, close=True)

        def figure_show(fig: Any, *args: object, **kwargs: object) -> None:
            figures.render(fig)

        show.__doc__ = plt.show.__doc__
        plt.show = show
        plt.Figure.show = figure_show

    def capture(self, plt: Any, close: bool) -> None:
        for num in plt.get_fignums():
            if len(self.pngs) < MAX_FIGURES:
                self.render(plt.figure(num))
            else:
                self.skipped += 1  # counted, not even looked up: there may be thousands
        if close:
            plt.close("all")

    def render(self, fig: Any) -> None:
        if len(self.pngs) >= MAX_FIGURES:
            self.skipped += 1
            return
        buffer = io.BytesIO()
        try:
            fig.savefig(buffer, format="png")
        except Exception as exc:
            note(f"a figure could not be saved as PNG: {exc!r}")
            return
        self.pngs.append(buffer.getvalue())

    def capture_open(self, close: bool = False) -> None:
        """Render the figures still open when the code ends (and, with `close`, close them: a session's
        next call starts without them)."""
        plt: Any = sys.modules.get("matplotlib.pyplot")
        if plt is not None:
            try:
                self.capture(plt, close=close)
            except BaseException as exc:  # MemoryError included: the task's result must still go out
                note(f"open figures not saved: {exc!r}")

    def send(self, sink: Sink) -> None:
        """Send every PNG as figures/figure-<n>.png (n from 1, skipping names the outputs took)."""
        number = 0
        for png in self.pngs:
            number += 1
            while os.fsencode(FIGURE_PATH.format(number)) in sink.paths:
                number += 1
            sink.add(FIGURE_PATH.format(number), len(png), _prefixes_of(png))
        if self.skipped:
            note(f"{self.skipped} more figure(s) not saved: at most {MAX_FIGURES} per task")
            sink.mark_cut()
        self.pngs = []


def _prefixes_of(data: bytes) -> Callable[[int], bytes]:
    """A reader for Sink.add that gives the first `size` bytes of `data`."""
    def read(size: int) -> bytes:
        return data[:size]
    return read


# ---- PID 1: the records, parsed within the budget ---------------------------------------------------

def records_bound(budget_bytes: int) -> int:
    """The most bytes PID 1 keeps from a files pipe: the budget plus every entry's header and path."""
    return budget_bytes + (MAX_OUTPUT_ENTRIES + 1) * (RECORD.size + MAX_PATH_BYTES)


def parse_records(buf: bytes | bytearray, budget_bytes: int, overflowed: bool) -> tuple[list[dict[str, Any]], bool]:
    """(files, truncated) from what the child sent: entries as the result frame lists them, with the content
    as base64 bytes (frames.send splices them into the frame). Content past
    the budget, entries past the bound, or bytes that are not records (a task may write its own) end up
    as `content: null` or not listed, and `truncated` says so."""
    files: list[dict[str, Any]] = []
    truncated, offset = overflowed, 0
    view = memoryview(buf)
    while offset + RECORD.size <= len(buf):
        path_len, size, flags = RECORD.unpack_from(buf, offset)
        offset += RECORD.size
        if flags & FLAG_CUT:
            truncated = True
            continue
        if not 0 < path_len <= MAX_PATH_BYTES or len(files) >= MAX_OUTPUT_ENTRIES or offset + path_len > len(buf):
            truncated = True
            break
        path = bytes(view[offset:offset + path_len]).decode("utf-8", "backslashreplace")
        offset += path_len
        content = None
        if flags & FLAG_CONTENT:
            if offset + size > len(buf):
                truncated = True
                break
            if size <= budget_bytes:
                content = base64.b64encode(view[offset:offset + size])
                budget_bytes -= size
            offset += size
        if content is None:
            truncated = True
        files.append({"path": path, "size_bytes": size, "encoding": "base64", "content": content})
    if offset != len(buf):
        truncated = True
    return files, truncated
