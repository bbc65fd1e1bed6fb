"""Real workloads on the real engine: the datascience image, files in, outputs and figures out, and every
way a request's images, files and outputs can be wrong (a 4xx naming the field, never a task)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from pool.model import images as catalogue
from tests.conftest import REPO, Service, start_service, stop_service

pytestmark = pytest.mark.docker

MIB = 1024 ** 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OUTPUT_CAP_BYTES = MIB
SPECS = {spec.name: spec for spec in catalogue.with_env_tags(catalogue.BUILTIN, os.environ)}
TIERS = {"tiers": [
    {"name": "py", "cpu": 0.5, "ram": "256MiB", "storage": "64MiB", "min_idle": 1, "max_size": 1},
    {"name": "tiny", "cpu": 1, "ram": "256MiB", "storage": "4MiB", "min_idle": 1, "max_size": 1},
    {"name": "ds", "cpu": 1, "ram": "768MiB", "storage": "128MiB", "min_idle": 1, "max_size": 1,
     "image": "datascience"},
]}
HOSTNAME = "import socket; print(socket.gethostname())"


@pytest.fixture(scope="module")
def service(docker_client, tmp_path_factory) -> Iterator[Service]:
    """Two python tiers and a datascience one, of one container each; the default input files cap, and a
    1 MiB cap on output files."""
    work = tmp_path_factory.mktemp("workloads")
    tiers_path = work / "tiers.json"
    tiers_path.write_text(json.dumps(TIERS))
    svc = start_service(work, tiers_path, env={"WARMPOOL_MAX_OUTPUT_FILES_BYTES": str(OUTPUT_CAP_BYTES)},
                        ready_timeout_s=120)
    yield svc
    stop_service(svc, docker_client)


def run(service: Service, code: str, **fields: Any) -> dict[str, Any]:
    response = service.execute(code, **fields)
    assert response.status_code == 200, response.text[:2000]
    return response.json()


def succeeded(service: Service, code: str, **fields: Any) -> dict[str, Any]:
    body = run(service, code, **fields)
    assert body["status"] == "succeeded", (body["stderr"][-2000:], body["message"])
    return body


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---- images ----------------------------------------------------------------------------------------

def test_pandas_on_the_datascience_image(service):
    body = succeeded(service, "import pandas as pd; print(pd.__version__)", image="datascience")
    assert body["stdout"] == SPECS["datascience"].pins()["pandas"] + "\n"
    assert (body["image"], body["tier"], body["files"], body["files_truncated"]) == ("datascience", "ds", [], False)
    plain = succeeded(service, "print('hi')")
    assert (plain["image"], plain["tier"], plain["files"], plain["files_truncated"]) == ("python", "py", [], False)
    missing = run(service, "import numpy")  # the python image has the standard library only
    assert missing["status"] == "failed" and "ModuleNotFoundError" in missing["stderr"]


def test_images_route_lists_what_each_image_holds(service, docker_client):
    images = {image["name"]: image for image in service.client.get("/v1/images").json()}
    assert set(images) == {"python", "datascience"}
    ds = images["datascience"]
    labels = docker_client.images.get(SPECS["datascience"].docker_image).labels
    assert ds["docker_image"] == SPECS["datascience"].docker_image
    assert ds["python_version"] == labels[catalogue.LABEL_PYTHON] and ds["python_version"].startswith("3.11.")
    assert ds["packages"] == json.loads(labels[catalogue.LABEL_PACKAGES])
    assert {name: ds["packages"][name] for name in ("numpy", "pandas", "scipy", "matplotlib", "pillow")} == \
        {name: SPECS["datascience"].pins()[name] for name in ("numpy", "pandas", "scipy", "matplotlib", "pillow")}
    assert ds["preloaded"] == list(SPECS["datascience"].preload)
    assert images["python"]["packages"] == {} and images["python"]["preloaded"] == []
    tiers = {tier["name"]: tier["image"] for tier in service.client.get("/v1/tiers").json()}
    assert tiers == {"py": "python", "tiny": "python", "ds": "datascience"}


def test_a_preloaded_module_is_already_imported_in_the_task(service):
    code = "import sys; print(all(m in sys.modules for m in ('numpy', 'pandas', 'matplotlib.pyplot')))"
    assert succeeded(service, code, image="datascience")["stdout"] == "True\n"
    assert succeeded(service, "import sys; print('numpy' in sys.modules)")["stdout"] == "False\n"


# ---- files in --------------------------------------------------------------------------------------

def test_a_csv_sent_in_files_is_read_by_pandas(service):
    code = ("import os, pandas as pd\nframe = pd.read_csv('data/in.csv')\nprint(frame['b'].sum(), len(frame))\n"
            "print(os.stat('data/in.csv').st_uid, oct(os.stat('data/in.csv').st_mode & 0o777))")
    body = succeeded(service, code, image="datascience",
                     files=[{"path": "data/in.csv", "content": "a,b\n1,2\n3,4\n5,6\n"}])
    assert body["stdout"] == "12 3\n10001 0o644\n"  # owned by the sandbox user


def test_binary_files_up_to_the_cap_arrive_intact(service):
    """16 MiB decoded (the default cap) fits the request body as base64; one byte more is a 413."""
    data = os.urandom(16 * MIB)
    code = ("import hashlib, os\nprint(hashlib.sha256(open('blob.bin', 'rb').read()).hexdigest(), "
            "os.path.getsize('blob.bin'), open('./sub/dir/note.txt').read())")
    files = [{"path": "blob.bin", "content": b64(data[:-4]), "encoding": "base64"},
             {"path": "./sub//dir/note.txt", "content": "é\n"}]  # 3 bytes: 16 MiB in all, with the 4 left out
    body = succeeded(service, code, files=files, timeout_s=30)
    assert body["stdout"] == f"{hashlib.sha256(data[:-4]).hexdigest()} {16 * MIB - 4} é\n\n"
    files[0]["content"] = b64(data[:-2])
    response = service.execute("print(1)", files=files)
    assert response.status_code == 413 and response.json()["detail"].startswith("files:"), response.text


def test_files_that_do_not_fit_the_storage_fail_the_task_and_the_container_stays(service):
    """Tier "tiny" has 4 MiB of storage: a 5 MiB file is refused by the kernel (as the task's own write
    would be), the task fails saying which file and why, before its code runs, and the container is reused."""
    host = succeeded(service, HOSTNAME, resources={"cpu": 1})["stdout"]
    big = {"path": "data/big.bin", "content": b64(b"\0" * (5 * MIB)), "encoding": "base64"}
    body = run(service, "print('ran')", resources={"cpu": 1}, files=[{"path": "small.txt", "content": "x"}, big])
    assert (body["status"], body["exit_code"], body["stdout"], body["tier"]) == ("failed", 1, "", "tiny"), body
    assert "could not write files[1] 'data/big.bin'" in body["stderr"], body["stderr"]
    assert "File too large" in body["stderr"] or "No space left" in body["stderr"], body["stderr"]
    assert succeeded(service, HOSTNAME, resources={"cpu": 1})["stdout"] == host


# ---- outputs and figures -----------------------------------------------------------------------------

WRITE_TREE = """
import os
os.makedirs('out/sub/deeper', exist_ok=True)
for path, text in {'out/a.csv': 'a', 'out/sub/b.csv': 'bb', 'out/sub/deeper/c.csv': 'ccc', 'out/d.txt': 'd',
                   'top.png': 'png', '.hidden.png': 'h', 'out/.e.csv': 'e'}.items():
    open(path, 'w').write(text)
print('written')
"""


def files_of(body: dict[str, Any]) -> dict[str, bytes | None]:
    assert all(entry["encoding"] == "base64" for entry in body["files"])
    return {e["path"]: None if e["content"] is None else base64.b64decode(e["content"]) for e in body["files"]}


def test_outputs_globs_match_regular_files_relative_to_the_working_dir(service):
    body = succeeded(service, WRITE_TREE, outputs=["*.png", "out/**/*.csv"])
    assert [e["path"] for e in body["files"]] == ["out/a.csv", "out/sub/b.csv", "out/sub/deeper/c.csv", "top.png"]
    assert files_of(body) == {"out/a.csv": b"a", "out/sub/b.csv": b"bb", "out/sub/deeper/c.csv": b"ccc",
                              "top.png": b"png"}
    assert [e["size_bytes"] for e in body["files"]] == [1, 2, 3, 3] and body["files_truncated"] is False
    assert list(files_of(succeeded(service, WRITE_TREE, outputs=["out/*"]))) == ["out/a.csv", "out/d.txt"]
    assert list(files_of(succeeded(service, WRITE_TREE, outputs=["out/**"]))) == \
        ["out/a.csv", "out/d.txt", "out/sub/b.csv", "out/sub/deeper/c.csv"]
    assert list(files_of(succeeded(service, WRITE_TREE, outputs=[".*", "out/.e.csv"]))) == \
        [".hidden.png", "out/.e.csv"]  # a leading dot is matched only by a pattern that says it
    assert succeeded(service, WRITE_TREE, outputs=["nothing/*.csv"])["files"] == []


def test_outputs_past_the_cap_come_back_without_content(service):
    code = "for name in 'abc':\n    open(name + '.bin', 'wb').write(name.encode() * 400_000)"
    body = succeeded(service, code, outputs=["*.bin"])
    got = files_of(body)
    assert got["a.bin"] == b"a" * 400_000 and got["b.bin"] == b"b" * 400_000
    assert got["c.bin"] is None and body["files"][2]["size_bytes"] == 400_000  # past the 1 MiB cap
    assert body["files_truncated"] is True


PLOT = """
import matplotlib.pyplot as plt
plt.plot([1, 2, 3], [1, 4, 9])
plt.title('shown')
plt.show()
plt.figure(figsize=(3, 2))
plt.bar(['a', 'b'], [3, 5])
print('drawn')
"""

OPEN_WITH_PIL = """
from PIL import Image
for name in ('figure-1.png', 'figure-2.png'):
    with Image.open(name) as image:
        image.load()
        print(image.format, image.size)
"""


def test_a_plot_comes_back_as_a_png_without_asking(service):
    body = succeeded(service, PLOT, image="datascience")
    assert body["stdout"] == "drawn\n"
    pngs = files_of(body)
    assert list(pngs) == ["figures/figure-1.png", "figures/figure-2.png"]  # the shown one, then the open one
    assert all(png is not None and png.startswith(PNG_SIGNATURE) for png in pngs.values())
    # PIL opens them (in a sandbox: the host has no PIL), as the files of the next task.
    files = [{"path": path.split("/")[1], "content": b64(png), "encoding": "base64"}
             for path, png in pngs.items() if png is not None]
    opened = succeeded(service, OPEN_WITH_PIL, image="datascience", files=files)
    assert opened["stdout"] == "PNG (640, 480)\nPNG (300, 200)\n"
    assert succeeded(service, "print('no figure')", image="datascience")["files"] == []


def test_a_session_on_the_datascience_image_gives_each_calls_figures(service):
    """As a task's: shown and still-open figures come back as figures/figure-<n>.png; a session's call then
    closes them (as a notebook does), so the next call neither sees nor returns them again."""
    opened = service.client.post("/v1/sessions", json={"image": "datascience", "idle_timeout_s": 60})
    assert opened.status_code == 201, opened.text
    sid = opened.json()["id"]
    try:
        first = service.client.post(f"/v1/sessions/{sid}/execute", json={"code": PLOT}).json()
        assert (first["status"], first["stdout"], first["image"]) == ("succeeded", "drawn\n", "datascience"), first
        pngs = files_of(first)
        assert list(pngs) == ["figures/figure-1.png", "figures/figure-2.png"]
        assert all(png is not None and png.startswith(PNG_SIGNATURE) for png in pngs.values())
        second = service.client.post(f"/v1/sessions/{sid}/execute",
                                     json={"code": "print(len(plt.get_fignums()))"}).json()
        assert (second["status"], second["stdout"], second["files"]) == ("succeeded", "0\n", []), second
        third = service.client.post(f"/v1/sessions/{sid}/execute",
                                    json={"code": "plt.plot([3, 1])", "outputs": ["*.csv"]}).json()
        assert list(files_of(third)) == ["figures/figure-1.png"], third  # numbered per call, as per task
    finally:
        service.client.delete(f"/v1/sessions/{sid}")


def test_outputs_and_figures_together_share_the_names(service):
    code = ("import os, matplotlib.pyplot as plt\nos.makedirs('figures')\n"
            "open('figures/figure-1.png', 'wb').write(b'mine')\nplt.plot([1, 2])")
    body = succeeded(service, code, image="datascience", outputs=["figures/*"])
    pngs = files_of(body)
    assert list(pngs) == ["figures/figure-1.png", "figures/figure-2.png"]
    assert pngs["figures/figure-1.png"] == b"mine" and pngs["figures/figure-2.png"].startswith(PNG_SIGNATURE)


# ---- validation ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("fields", "status", "loc"), [
    ({"files": [{"path": "/etc/passwd", "content": "x"}]}, 422, ["body", "files", 0, "path"]),
    ({"files": [{"path": "a", "content": "x"}, {"path": "../up", "content": "x"}]}, 422, ["body", "files", 1, "path"]),
    ({"files": [{"path": "a/../../up", "content": "x"}]}, 422, ["body", "files", 0, "path"]),
    ({"files": [{"path": "", "content": "x"}]}, 422, ["body", "files", 0, "path"]),
    ({"files": [{"path": "a\u0000b", "content": "x"}]}, 422, ["body", "files", 0, "path"]),
    ({"files": [{"path": "dir/", "content": "x"}]}, 422, ["body", "files", 0, "path"]),
    ({"files": [{"path": ".", "content": "x"}]}, 422, ["body", "files", 0, "path"]),
    ({"files": [{"path": "a", "content": "x"}, {"path": "./a", "content": "y"}]}, 422, ["body", "files", 1, "path"]),
    ({"files": [{"path": "a", "content": "x"}, {"path": "a/b", "content": "y"}]}, 422, ["body", "files", 1, "path"]),
    ({"files": [{"path": "a/b", "content": "x"}, {"path": "a", "content": "y"}]}, 422, ["body", "files", 1, "path"]),
    ({"files": [{"path": "x" * 300, "content": "x"}]}, 422, ["body", "files", 0, "path"]),
    ({"files": [{"path": "b.bin", "content": "not base64!", "encoding": "base64"}]}, 422,
     ["body", "files", 0, "content"]),
    ({"files": [{"path": "b.bin", "content": "x", "encoding": "rot13"}]}, 422, ["body", "files", 0, "encoding"]),
    ({"files": [{"path": "b.bin", "content": "x", "mode": 777}]}, 422, ["body", "files", 0, "mode"]),
    ({"files": [{"path": f"f{i}", "content": ""} for i in range(1001)]}, 422, ["body", "files"]),
    ({"files": "data.csv"}, 422, ["body", "files"]),
    ({"outputs": ["/etc/*"]}, 422, ["body", "outputs", 0]),
    ({"outputs": ["*.png", "../*"]}, 422, ["body", "outputs", 1]),
    ({"outputs": [""]}, 422, ["body", "outputs", 0]),
    ({"outputs": [3]}, 422, ["body", "outputs", 0]),
    ({"image": "nope"}, 422, ["body", "image"]),
    ({"image": 3}, 422, ["body", "image"]),
    ({"image": "datascience", "resources": {"ram": "2GiB"}}, 422, ["body", "resources", "ram"]),
    ({"files": [{"path": "big", "content": "x" * (16 * MIB + 1)}]}, 413, None),
])
def test_bad_images_files_and_outputs_are_a_4xx_naming_the_field(service, fields, status, loc):
    response = service.client.post("/v1/execute", json={"code": "print(1)", **fields})
    assert response.status_code == status, response.text[:500]
    if loc is not None:
        assert [error["loc"] for error in response.json()["detail"]][:1] == [loc], response.text[:500]
    assert succeeded(service, "print('still here')")["stdout"] == "still here\n"


def test_an_unknown_image_is_refused_with_the_known_names(service):
    detail = service.client.post("/v1/execute", json={"code": "1", "image": "nope"}).json()["detail"][0]
    assert "'nope'" in detail["msg"] and "'python'" in detail["msg"] and "'datascience'" in detail["msg"]
    ram = service.client.post("/v1/execute", json={"code": "1", "image": "datascience",
                                                   "resources": {"ram": "2GiB"}}).json()["detail"][0]
    assert "768" in ram["msg"]  # the largest tier of that image, not of the service
    path = service.client.post("/v1/execute", json={"code": "1", "files": [{"path": "/x"}]}).json()["detail"][0]
    assert path["msg"].startswith("files[0].path: an absolute path")


def test_a_missing_image_keeps_the_service_from_starting(tmp_path):
    """Every image a tier serves must be present: the service says which is missing and does not start."""
    tiers_path = tmp_path / "tiers.json"
    tiers_path.write_text(json.dumps(TIERS))
    env = {**os.environ, "WARMPOOL_TIERS_FILE": str(tiers_path), "WARMPOOL_INSTANCE_ID": "test-missing-image",
           "WARMPOOL_IMAGE_DATASCIENCE": "warmpool-datascience:not-built-anywhere"}
    done = subprocess.run([sys.executable, "-m", "warmpool", "serve", "--host", "127.0.0.1", "--port", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "sandbox image(s) missing: datascience (warmpool-datascience:not-built-anywhere)" in done.stderr, \
        done.stderr[-2000:]
