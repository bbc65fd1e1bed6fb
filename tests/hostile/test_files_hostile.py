"""Hostile files in and out: bombs, floods of files and figures, planted symlinks and FIFOs, names that are
not text, paths that try to leave the working directory. Each ends with a clear status, the container clean
(reused) or replaced, and the pool serving after (run_case); on runc and runsc."""

from __future__ import annotations

import base64
import io
import zipfile

import pytest

from tests.hostile.conftest import DEADLINE_GRACE_S, container_of_box, execute, run_case

pytestmark = pytest.mark.docker

MIB = 1024 ** 2


def zip_bomb(unpacked_bytes: int = 256 * MIB) -> bytes:
    """A zip of one file of zeros: ~0.1% of its unpacked size (256 MiB unpack from ~250 KiB)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("zeros.bin", "w", force_zip64=True) as member:
            chunk = b"\0" * MIB
            for _ in range(unpacked_bytes // MIB):
                member.write(chunk)
    return buffer.getvalue()


UNZIP = """
import zipfile
with zipfile.ZipFile('bomb.zip') as archive:
    archive.extractall('unpacked')
print('unpacked')
"""


def test_a_zip_bomb_unpacked_into_the_work_dir_fills_storage_and_fails(box):
    """The tier's 32 MiB of storage stop it (RLIMIT_FSIZE and the quota): the task fails, the reset
    removes what it unpacked, and the container is reused."""
    bomb = zip_bomb()
    assert len(bomb) < MIB

    def check(body):
        assert body["status"] == "failed", body
        assert "File too large" in body["stderr"] or "No space left on device" in body["stderr"], body["stderr"][-800:]
        # What it unpacked before the limit is an output past the 16 MiB cap: listed, without content.
        (entry,) = body["files"]
        assert (entry["path"], entry["content"], body["files_truncated"]) == ("unpacked/zeros.bin", None, True)
        assert 16 * MIB < entry["size_bytes"] <= 32 * MIB
    run_case(box, UNZIP, check, timeout_s=20, outputs=["unpacked/**"],
             files=[{"path": "bomb.zip", "content": base64.b64encode(bomb).decode(), "encoding": "base64"}])


# Until 5000 files, 2 s, or the scratch filesystem has no inode left (its ext4 has one per 8 KiB: ~4000 in
# the box's 32 MiB), whichever comes first.
MANY_FILES = """
import os, time
deadline = time.monotonic() + 2
count = 0
try:
    while count < 5000 and time.monotonic() < deadline:
        open(f'f{count:05d}', 'w').close()
        count += 1
except OSError as exc:
    print('stopped:', exc.strerror, file=__import__('sys').stderr)
print(count)
"""


def test_many_tiny_files_are_listed_up_to_the_bound_and_removed(box):
    def check(body):
        assert body["status"] == "succeeded", body
        made = int(body["stdout"])
        assert made >= 1000, made  # enough to pass the bound (gVisor is the slower one)
        assert len(body["files"]) == 1000 and body["files_truncated"] is True
        assert [entry["path"] for entry in body["files"][:2]] == ["f00000", "f00001"]
        assert all(entry["size_bytes"] == 0 and entry["content"] == "" for entry in body["files"])
    run_case(box, MANY_FILES, check, timeout_s=20, outputs=["*"])
    listing = execute(box, "import os; print(len(os.listdir('.')))")
    assert listing["stdout"] == "0\n"  # the next task starts in an empty working directory


PLANT = """
import os
open('ok.txt', 'w').write('ok')
os.symlink('/etc/passwd', 'passwd.txt')
os.symlink('/proc/1/environ', 'environ.txt')
os.symlink('/dev/zero', 'zero.txt')
os.symlink('/', 'root')
os.symlink('/etc', 'etc')
os.mkfifo('fifo.txt')
os.mkdir('sub')
os.symlink('../ok.txt', 'sub/up.txt')
print('planted')
"""


def test_symlinks_and_fifos_planted_where_outputs_are_collected_are_never_followed(box):
    def check(body):
        assert (body["status"], body["stdout"]) == ("succeeded", "planted\n"), body
        assert [(e["path"], base64.b64decode(e["content"])) for e in body["files"]] == [("ok.txt", b"ok")]
        assert body["files_truncated"] is False
        assert body["elapsed_s"] < 10  # the FIFO was never opened for a blocking read
    run_case(box, PLANT, check, timeout_s=10, outputs=["*", "*/*", "root/etc/*", "etc/**", "sub/*"])


# A daemon of the task swaps `race.txt` between a regular file and a symlink to /etc/hostname for as long as
# it lives (the reset kills it): whatever the collector got, it never followed the link.
RACE = """
import os
open('/tmp/work/race.txt', 'w').write('regular')
if os.fork() == 0:
    os.setsid()
    while True:
        try:
            os.replace('/tmp/work/race.txt', '/tmp/work/race.tmp')
            os.symlink('/etc/hostname', '/tmp/work/race.txt')
            os.unlink('/tmp/work/race.txt')
            os.replace('/tmp/work/race.tmp', '/tmp/work/race.txt')
        except OSError:
            pass
print('racing')
"""


def test_a_file_swapped_for_a_symlink_during_collection_is_never_followed(box):
    def check(body):
        assert body["status"] == "succeeded", body
        contents = [base64.b64decode(e["content"]) for e in body["files"] if e["content"] is not None]
        assert all(content == b"regular" for content in contents), contents
    for _ in range(3):
        run_case(box, RACE, check, timeout_s=10, outputs=["*.txt"])


def test_a_work_dir_replaced_by_a_symlink_gives_no_outputs(box):
    code = ("import os\nos.chdir('/tmp')\nos.rmdir('/tmp/work')\nos.symlink('/etc', '/tmp/work')\nprint('moved')")

    def check(body):
        assert (body["status"], body["stdout"], body["files"]) == ("succeeded", "moved\n", []), body
        assert "outputs not collected" in body["stderr"]
    run_case(box, code, check, outputs=["*"])


NAMES = """
import os
open(b'bad\\xffname.txt', 'w').write('bytes')
open('new\\nline.txt', 'w').write('newline')
print(sorted(os.listdir('.')))
"""


def test_file_names_with_a_newline_or_invalid_utf8_come_back_as_valid_json(box):
    def check(body):
        assert body["status"] == "succeeded", body
        got = {e["path"]: base64.b64decode(e["content"]) for e in body["files"]}
        assert got == {"bad\\xffname.txt": b"bytes", "new\nline.txt": b"newline", "in\nput.txt": b"sent"}, got
    run_case(box, NAMES, check, outputs=["*"], files=[{"path": "in\nput.txt", "content": "sent"}])


@pytest.mark.parametrize("path", ["/etc/passwd", "../escape", "a/../../escape", "..", "./../x", "a/b/../../../x",
                                  "", "a\u0000b", "work/../../etc/x"])
def test_file_paths_that_try_to_leave_the_work_dir_are_refused_before_any_container(box, path):
    host = container_of_box(box)
    response = box.execute("print('never')", files=[{"path": path, "content": "x"}])
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "files", 0, "path"]
    assert container_of_box(box) == host


def test_a_name_that_only_looks_like_an_escape_stays_inside(box):
    code = "import os; print(sorted(os.listdir('.')), os.path.exists('/tmp/x'))"
    body = execute(box, code, files=[{"path": "..%2fx", "content": "1"}, {"path": "...", "content": "2"}])
    assert (body["status"], body["stdout"]) == ("succeeded", "['..%2fx', '...'] False\n"), body


def test_forged_records_on_the_files_pipe_only_change_the_tasks_own_result(box):
    """The task can write on its child's files pipe (fd 5): junk there truncates its own list of files,
    and the next task's result is its own."""
    code = ("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, os.urandom(512) + b'\\x00\\x04fake')\n"
            "    except OSError:\n        pass\nopen('real.txt', 'w').write('real')\nprint('forged')")

    def check(body):
        assert (body["status"], body["stdout"]) == ("succeeded", "forged\n"), body
        assert body["files_truncated"] is True
    run_case(box, code, check, outputs=["*.txt"])
    clean = execute(box, "open('a.txt', 'w').write('a')", outputs=["*.txt"])
    assert [(e["path"], e["content"]) for e in clean["files"]] == [("a.txt", "YQ==")]
    assert clean["files_truncated"] is False


FLOOD = """
import matplotlib.pyplot as plt
for i in range(COUNT):
    plt.figure()
print('flooded')
"""


def test_a_figure_flood_ends_with_capped_output(ds_box):
    """Thousands of open figures: at most 32 are rendered, the rest are counted and said; the runner is
    neither hung nor out of memory, and the container serves the next task."""
    count = 2000 if ds_box.runtime == "runc" else 600  # gVisor makes figures several times slower

    def check(body):
        assert body["elapsed_s"] < 60 + DEADLINE_GRACE_S, body["elapsed_s"]
        assert body["status"] == "succeeded", (body["status"], body["message"], body["stderr"][-800:])
        assert len(body["files"]) == 32 and body["files_truncated"] is True
        assert [e["path"] for e in body["files"][:2]] == ["figures/figure-1.png", "figures/figure-2.png"]
        assert f"{count - 32} more figure(s) not saved" in body["stderr"]
    run_case(ds_box, FLOOD.replace("COUNT", str(count)), check, timeout_s=60)
