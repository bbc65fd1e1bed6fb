"""The pure parts of files in and out (no Docker): path checks, glob matching, and PID 1's reading of the
records a task's child sends, however forged."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass

import pytest

from pool.model.errors import InvalidRequest
from pool.model.files import check_outputs, decode_files, normal_path
from runner_image.sandbox import taskfiles
from runner_image.sandbox.taskfiles import FLAG_CONTENT, FLAG_CUT, RECORD, matches, parse_records, split_pattern


@dataclass
class Entry:
    path: str
    content: str = ""
    encoding: str = "utf-8"


@pytest.mark.parametrize(("pattern", "path", "expected"), [
    ("*.png", "a.png", True),
    ("*.png", "d/a.png", False),
    ("*.png", ".a.png", False),
    (".*.png", ".a.png", True),
    ("out/**/*.csv", "out/a.csv", True),
    ("out/**/*.csv", "out/x/y/a.csv", True),
    ("out/**/*.csv", "out/.x/a.csv", False),
    ("out/**/*.csv", "other/a.csv", False),
    ("**/*.csv", "a.csv", True),
    ("**/*.csv", "a/b/c.csv", True),
    ("out/**", "out/a/b", True),
    ("out/**", "out", False),  # a final ** means the files below, never the directory's own name
    ("./out//a.txt", "out/a.txt", True),
    ("a/*/c", "a/b/c", True),
    ("a/*/c", "a/b/x/c", False),
    ("**/**/x", "x", True),
    ("[ab].txt", "b.txt", True),
    ("name\nwith newline", "name\nwith newline", True),
])
def test_globs_match_as_glob_does(pattern, path, expected):
    assert matches(split_pattern(pattern), tuple(path.split("/"))) is expected


@pytest.mark.parametrize(("pattern", "directory", "expected"), [
    ("out/**/*.csv", "out", True),
    ("out/**/*.csv", "out/x/y", True),
    ("out/**/*.csv", "other", False),
    ("*.png", "d", False),
    ("a/*/c", "a/b", True),
    ("a/*/c", "a/b/c", False),
])
def test_the_walk_enters_only_directories_a_pattern_can_reach_into(pattern, directory, expected):
    assert matches(split_pattern(pattern), tuple(directory.split("/")), prefix_only=True) is expected


def test_many_double_stars_stay_linear():
    pattern = split_pattern("/".join(["**", "a"] * 30) + "/z")
    assert matches(pattern, tuple(["a"] * 60)) is False  # an exponential matcher would not return


def record(path: bytes, content: bytes | None = None, size: int | None = None) -> bytes:
    if content is None:
        return RECORD.pack(len(path), size or 0, 0) + path
    return RECORD.pack(len(path), len(content), FLAG_CONTENT) + path + content


def test_records_become_entries_within_the_budget():
    buf = record(b"a.txt", b"hello") + record(b"big.bin", size=10) + record(b"b\xffad\nname", b"xy")
    files, truncated = parse_records(buf, budget_bytes=7, overflowed=False)
    assert files == [
        {"path": "a.txt", "size_bytes": 5, "encoding": "base64", "content": base64.b64encode(b"hello")},
        {"path": "big.bin", "size_bytes": 10, "encoding": "base64", "content": None},
        {"path": "b\\xffad\nname", "size_bytes": 2, "encoding": "base64", "content": base64.b64encode(b"xy")},
    ]
    assert truncated is True  # big.bin has no content
    assert parse_records(record(b"a", b"1"), 1, False) == (
        [{"path": "a", "size_bytes": 1, "encoding": "base64", "content": base64.b64encode(b"1")}], False)


def test_pid_1_enforces_the_budget_whatever_the_child_claims():
    """A task can write records of its own on the pipe: content past the budget is dropped all the same."""
    files, truncated = parse_records(record(b"a", b"x" * 10) + record(b"b", b"y" * 10), 15, False)
    assert [f["content"] is not None for f in files] == [True, False] and truncated


@pytest.mark.parametrize("buf", [
    os.urandom(4096),
    RECORD.pack(0, 5, FLAG_CONTENT) + b"hello",  # no path
    RECORD.pack(5000, 0, 0) + b"x" * 5000,  # a path past the bound
    record(b"a", b"12345")[:-2],  # content cut short
    RECORD.pack(1, 1 << 60, FLAG_CONTENT) + b"a",  # a size that is not there
    b"\x00" * (RECORD.size - 1),
])
def test_garbage_on_the_files_pipe_only_truncates_the_list(buf):
    files, truncated = parse_records(record(b"ok", b"1") + buf, 1 << 20, False)
    assert files[0]["path"] == "ok" and truncated is True
    assert all(isinstance(f["path"], str) and f["path"].encode("utf-8") for f in files)


def test_the_child_can_say_it_left_files_out():
    files, truncated = parse_records(record(b"a", b"1") + RECORD.pack(0, 0, FLAG_CUT), 10, False)
    assert len(files) == 1 and truncated
    assert parse_records(b"", 10, overflowed=True) == ([], True)


def test_entries_past_the_bound_are_not_listed():
    buf = b"".join(record(f"f{i}".encode(), b"") for i in range(taskfiles.MAX_OUTPUT_ENTRIES + 5))
    files, truncated = parse_records(buf, 1 << 20, False)
    assert len(files) == taskfiles.MAX_OUTPUT_ENTRIES and truncated


@pytest.mark.parametrize("path", ["/abs", "../x", "a/../b", "", "a\0b", "dir/", "a/.", "x" * 5000])
def test_the_runner_refuses_unsafe_paths_itself(path):
    with pytest.raises(ValueError):
        taskfiles.checked_path(path)


def test_files_are_decoded_and_their_paths_normalized():
    files = decode_files([Entry("./data//in.csv", "é"), Entry("b.bin", base64.b64encode(b"\0\1").decode(), "base64")])
    assert [(f.path, f.content) for f in files] == [("data/in.csv", "é".encode()), ("b.bin", b"\0\1")]
    assert normal_path("a/./b/") == "a/b"
    with pytest.raises(InvalidRequest) as caught:
        decode_files([Entry("x", "\ud800")])
    assert caught.value.field == "files.0.content" and "base64" in caught.value.message
    with pytest.raises(InvalidRequest, match=r"files\[1\]\.path: 'a' is a file"):
        decode_files([Entry("a"), Entry("a/b")])
    assert check_outputs(["*.png", "out/**/*.csv"]) == ("*.png", "out/**/*.csv")
    with pytest.raises(InvalidRequest) as caught:
        check_outputs(["ok", "/abs/*"])
    assert caught.value.field == "outputs.1"


def test_held_async_tasks_count_their_files():
    """The async results bound counts input files while pending, the output files cap only when the task
    asks for outputs, and the files a finished task returned."""
    from pool.model.result_bounds import pending_bytes, result_bytes
    from pool.model.results import InputFile, OutputFile, Status, TaskResult, TaskSpec

    plain = TaskSpec(task_id="t", code="print(1)")
    with_files = TaskSpec(task_id="t", code="print(1)", files=(InputFile("in.bin", b"x" * 3000),))
    with_outputs = TaskSpec(task_id="t", code="print(1)", outputs=("*.png",), max_output_files_bytes=3 * 1000)
    assert pending_bytes(with_files) - pending_bytes(plain) == 3000 + len("in.bin")
    assert pending_bytes(with_outputs) - pending_bytes(plain) == 4000  # the cap, as base64
    done = TaskResult(task_id="t", status=Status.SUCCEEDED)
    returned = TaskResult(task_id="t", status=Status.SUCCEEDED, files=(OutputFile("a.png", 3, "x" * 4000),))
    assert result_bytes(returned) - result_bytes(done) > 4000
