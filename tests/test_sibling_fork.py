"""runner_image/sandbox/sibling.py on the host (it only forks, so it is safe outside a container): the child
of `fork_sibling` is the caller's parent's child, and it is a working interpreter, as after os.fork."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runner_image.sandbox import sibling

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not sibling.available(), reason="clone(CLONE_PARENT) not wired for this arch")

# Run in a process of its own: it forks a middle process that calls fork_sibling, and the sibling child
# must then be this script's child, reaped here with its exit status.
SCRIPT = textwrap.dedent(r"""
    import os, random, sys, threading
    from runner_image.sandbox import sibling
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.close(r)
        pid = sibling.fork_sibling()
        if pid == 0:
            thread = threading.Thread(target=lambda: None)
            thread.start()
            thread.join()
            import json  # the import lock works in the child
            os.write(w, json.dumps({"ppid": os.getppid(), "random": random.random()}).encode() + b"\n")
            os._exit(7)
        os.write(w, f"{random.random()}\n".encode())  # what the child would draw had it not reseeded
        os._exit(0 if pid > 0 else 1)
    os.close(w)
    _, middle_status = os.waitpid(middle, 0)
    pid, status = os.waitpid(-1, 0)  # the sibling: ours, not the middle's
    import json
    lines = os.read(r, 1000).decode().splitlines()
    child = json.loads(next(line for line in lines if line.startswith("{")))
    middle_draw = float(next(line for line in lines if not line.startswith("{")))
    print(json.dumps({"middle_exit": os.waitstatus_to_exitcode(middle_status),
                      "sibling_exit": os.waitstatus_to_exitcode(status), "top": os.getpid(),
                      "sibling_ppid": child["ppid"], "reseeded": child["random"] != middle_draw}))
""")


def test_the_sibling_is_born_a_child_of_the_callers_parent():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=30,
                          check=True)
    report = json.loads(done.stdout)
    assert (report["middle_exit"], report["sibling_exit"]) == (0, 7)
    assert report["sibling_ppid"] == report["top"]
    # os.register_at_fork's after-child hooks ran: random reseeds itself in the child.
    assert report["reseeded"] is True
