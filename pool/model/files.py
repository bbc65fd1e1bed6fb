"""A request's `files` and `outputs`, checked and decoded (pure: no I/O).

Paths are relative to the task's working directory and may not leave it: an absolute path, a `..` segment,
an empty path or a NUL is refused, naming the entry (`files[2].path`). The runner checks again before it
writes (runner_image/sandbox/taskfiles.py), as the sandbox user, never following a symlink.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Literal, Protocol

from pool.model.errors import InvalidRequest
from pool.model.results import InputFile

MAX_FILES = 1000  # entries in `files`
MAX_OUTPUT_PATTERNS = 64  # entries in `outputs`
MAX_PATH_BYTES = 1024  # a path or pattern, as UTF-8
MAX_NAME_BYTES = 255  # one segment (the kernel's NAME_MAX)

Encoding = Literal["utf-8", "base64"]


class FileEntry(Protocol):
    """What the HTTP layer hands over for each `files` entry."""

    path: str
    content: str
    encoding: Encoding


def path_problem(path: str, kind: str = "path") -> str | None:
    """Why `path` cannot name a place under the working directory, or None when it can."""
    if not path:
        return f"an empty {kind}"
    if "\0" in path:
        return f"a NUL character in the {kind}"
    if path.startswith("/"):
        return f"an absolute {kind}; give one relative to the working directory"
    segments = path.split("/")
    if ".." in segments:
        return f"a '..' segment: the {kind} must stay under the working directory"
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        return f"the {kind} is not valid Unicode (a lone surrogate)"
    if size > MAX_PATH_BYTES:
        return f"{size} bytes long; at most {MAX_PATH_BYTES}"
    if any(len(segment.encode("utf-8")) > MAX_NAME_BYTES for segment in segments):
        return f"a segment longer than {MAX_NAME_BYTES} bytes"
    if not normal_path(path):
        return f"the {kind} names the working directory itself"
    return None


def normal_path(path: str) -> str:
    """The path without empty and '.' segments (`./data//in.csv` is `data/in.csv`)."""
    return "/".join(segment for segment in path.split("/") if segment not in ("", "."))


def decode_files(entries: Sequence[FileEntry]) -> tuple[InputFile, ...]:
    """The request's files, paths normalized and content decoded; InvalidRequest naming the entry."""
    if len(entries) > MAX_FILES:
        raise InvalidRequest("files", f"{len(entries)} entries; at most {MAX_FILES}")
    files: list[InputFile] = []
    seen: dict[str, int] = {}  # path -> index, for files and for the directories they need
    for index, entry in enumerate(entries):
        where = f"files.{index}"
        if (problem := path_problem(entry.path)) is not None:
            raise InvalidRequest(f"{where}.path", f"files[{index}].path: {problem}")
        if entry.path.endswith("/"):
            raise InvalidRequest(f"{where}.path", f"files[{index}].path: ends with '/', so it names a directory")
        path = normal_path(entry.path)
        _check_clash(path, seen, index)
        files.append(InputFile(path=path, content=_decode(entry, index)))
    return tuple(files)


def _check_clash(path: str, seen: dict[str, int], index: int) -> None:
    """Two entries may not name the same file, nor one a file that another needs as a directory.
    `seen` maps every file path so far, and every directory those need (with a trailing '/'), to its entry."""
    where = f"files.{index}.path"
    if path in seen:
        raise InvalidRequest(where, f"files[{index}].path: {path!r} is also files[{seen[path]}]")
    if path + "/" in seen:
        raise InvalidRequest(where, f"files[{index}].path: {path!r} is a directory that files[{seen[path + '/']}] "
                             "needs, so it cannot be a file")
    parts = path.split("/")
    for depth in range(1, len(parts)):
        parent = "/".join(parts[:depth])
        if parent in seen:
            raise InvalidRequest(where, f"files[{index}].path: {parent!r} is a file (files[{seen[parent]}]), so "
                                 f"it cannot hold {path!r}")
        seen.setdefault(parent + "/", index)
    seen[path] = index


def _decode(entry: FileEntry, index: int) -> bytes:
    if entry.encoding == "base64":
        try:
            return base64.b64decode(entry.content, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequest(f"files.{index}.content", f"files[{index}].content is not valid base64: {exc}") \
                from None
    try:
        return entry.content.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"files.{index}.content", f"files[{index}].content holds a lone surrogate, which "
                             "UTF-8 cannot encode; send such bytes with \"encoding\": \"base64\"") from None


def check_outputs(patterns: Sequence[str]) -> tuple[str, ...]:
    """The `outputs` globs, each checked like a path; InvalidRequest naming the entry."""
    if len(patterns) > MAX_OUTPUT_PATTERNS:
        raise InvalidRequest("outputs", f"{len(patterns)} patterns; at most {MAX_OUTPUT_PATTERNS}")
    for index, pattern in enumerate(patterns):
        if (problem := path_problem(pattern, "pattern")) is not None:
            raise InvalidRequest(f"outputs.{index}", f"outputs[{index}]: {problem}")
    return tuple(patterns)
