"""`warmpool run [FILE|-]`: run a Python file on a warmpool server the way `docker run` runs a command.

The task's stdout and stderr are printed as they arrive (when the server streams; otherwise from the
result), returned files are written under --out-dir, and the exit code is the task's own:

    0-255  the task's exit code, when it ran to its end (1 when it died without one, e.g. on a signal)
    124    it ran past its timeout (as timeout(1) exits)
    137    it ran out of memory (128 + SIGKILL, as a shell reports an OOM kill)
    125    it wrote more output than the server allows
    70     the sandbox itself broke (sandbox_error)
    69     an HTTP error or no answer: the server refused the request or could not be reached (the
           message on stderr says which, with the server's detail)
    2      bad arguments, or a file to read that cannot be read

The server is WARMPOOL_URL (default http://127.0.0.1:8000), the key WARMPOOL_API_KEY.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path, PurePosixPath
from typing import Any

EXIT_USAGE = 2
EXIT_HTTP_ERROR = 69
EXIT_SANDBOX_ERROR = 70
EXIT_TIMED_OUT = 124
EXIT_OUTPUT_LIMIT = 125
EXIT_MEMORY = 137
EXIT_BY_STATUS = {"timed_out": EXIT_TIMED_OUT, "memory_exceeded": EXIT_MEMORY,
                  "output_limit_exceeded": EXIT_OUTPUT_LIMIT, "sandbox_error": EXIT_SANDBOX_ERROR}


def add_parser(sub: Any) -> None:
    run = sub.add_parser("run", help="run a Python file on a warmpool server (WARMPOOL_URL) and exit with its code",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("file", nargs="?", default="-", metavar="FILE|-", help="the code to run; - (default) reads stdin")
    run.add_argument("--cpu", help="CPUs, e.g. 0.5 or 2")
    run.add_argument("--gpu", help="whole GPUs")
    run.add_argument("--ram", help="memory, e.g. 512MB or 1GiB")
    run.add_argument("--storage", help="disk scratch space, e.g. 1GB")
    run.add_argument("--image", help="sandbox image, e.g. python or datascience")
    run.add_argument("--timeout", type=float, metavar="SECONDS", help="wall-clock limit of the task")
    run.add_argument("--stdin", metavar="FILE", help="give the task this file on standard input")
    run.add_argument("--file", action="append", default=[], metavar="PATH[=DEST]", dest="files",
                     help="upload a file to the task's working directory (at PATH when it is relative, else at "
                          "its name; or at DEST); repeatable")
    run.add_argument("--output", action="append", default=[], metavar="GLOB", dest="outputs",
                     help="bring back files matching GLOB (relative to the task's working directory); repeatable")
    run.add_argument("--out-dir", default=".", metavar="DIR", help="where returned files are written (default .)")


class UsageError(Exception):
    """A bad argument or an unreadable local file: exit 2 with its message."""


def main(args: argparse.Namespace) -> int:
    """Run the task; the exit code to leave with."""
    from warmpool.client import Client, WarmpoolError
    from warmpool.client.sync import DEFAULT_URL

    try:
        code, fields = request_of(args)
    except UsageError as exc:
        print(f"warmpool run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    url = os.environ.get("WARMPOOL_URL") or DEFAULT_URL
    result = None
    try:
        with Client(url, api_key=os.environ.get("WARMPOOL_API_KEY") or None) as client:
            for event in client.stream(code, **fields):
                if event.kind == "stdout":
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                elif event.kind == "stderr":
                    sys.stderr.write(event.text)
                    sys.stderr.flush()
                elif event.result is not None:
                    result = event.result
    except WarmpoolError as exc:
        print(f"warmpool run: {url}: {exc}", file=sys.stderr)
        return EXIT_HTTP_ERROR
    except KeyboardInterrupt:
        return 130
    if result is None:
        print(f"warmpool run: {url}: the stream ended without a result", file=sys.stderr)
        return EXIT_HTTP_ERROR
    write_files(result, Path(args.out_dir))
    if result.status in EXIT_BY_STATUS:
        print(f"warmpool run: task {result.status}{': ' + result.message if result.message else ''}",
              file=sys.stderr)
        return EXIT_BY_STATUS[result.status]
    return result.exit_code if result.exit_code is not None and 0 <= result.exit_code <= 255 else 1


def request_of(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The code and the task's fields, from the command line and the local files it names."""
    code = sys.stdin.read() if args.file == "-" else read_text(args.file)
    fields: dict[str, Any] = {k: getattr(args, k) for k in ("cpu", "gpu", "ram", "storage", "image")
                              if getattr(args, k) is not None}
    if args.timeout is not None:
        fields["timeout_s"] = args.timeout
    if args.stdin is not None:
        fields["stdin"] = read_text(args.stdin)
    if args.files:
        fields["files"] = dict(upload(spec) for spec in args.files)
    if args.outputs:
        fields["outputs"] = args.outputs
    return code, fields


def read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


def upload(spec: str) -> tuple[str, bytes]:
    """`PATH` or `PATH=DEST`: where the file goes in the task's working directory, and its bytes."""
    local, _, dest = spec.partition("=")
    relative = PurePosixPath(dest or local)
    if relative.is_absolute() or ".." in relative.parts:
        if dest:
            raise UsageError(f"--file {spec}: DEST must be a relative path without '..'")
        relative = PurePosixPath(Path(local).name)
    try:
        return str(relative), Path(local).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {local}: {exc}") from None


def write_files(result: Any, out_dir: Path) -> None:
    for returned in result.files:
        try:
            written = returned.save(out_dir)
        except (ValueError, OSError) as exc:
            print(f"warmpool run: {exc}", file=sys.stderr)
            continue
        print(f"warmpool run: wrote {written} ({returned.size_bytes} bytes)", file=sys.stderr)
    if result.files_truncated:
        print("warmpool run: some returned files were left out (past the server's size cap)", file=sys.stderr)
