"""The sandbox images `warmpool image` builds (`make test` builds them first), checked in real containers.

Every container here runs with no network, as a sandbox does, and is removed by `docker run --rm`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import secrets
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pool.model import images as catalogue
from runner_image.build import HASH_LABEL, build_hash

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parent.parent
SPECS = {spec.name: spec for spec in catalogue.from_env({k: v for k, v in os.environ.items()
                                                         if k != "WARMPOOL_TIERS_FILE"})}
SANDBOX = ["--network", "none", "--read-only", "--tmpfs", "/tmp:rw,nosuid,nodev,size=64m,mode=1777",
           "--user", "10001:10001", "--env", "HOME=/tmp/home", "--cap-drop", "ALL", "--memory", "512m"]


def run_python(image: str, code: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", "run", "--rm", *SANDBOX, *extra, "--entrypoint", "python3", image, "-c", code],
                          capture_output=True, text=True, timeout=120)


def labels_of(image: str) -> dict[str, str]:
    out = subprocess.run(["docker", "image", "inspect", "--format", "{{json .Config.Labels}}", image],
                         capture_output=True, text=True)
    assert out.returncode == 0, f"image {image} is missing (make image builds it): {out.stderr}"
    return json.loads(out.stdout) or {}


@pytest.fixture(scope="module")
def datascience() -> str:
    spec = SPECS["datascience"]
    labels = labels_of(spec.docker_image)
    assert labels.get(HASH_LABEL) == build_hash(spec), f"{spec.docker_image} is stale: run `make image`"
    return spec.docker_image


PROBE = """
import importlib.metadata as md, json, os, socket, warnings
warnings.simplefilter("error")
import numpy, pandas, scipy, matplotlib, matplotlib.pyplot as plt, PIL, PIL.Image
versions = {name: md.version(name) for name in ("numpy", "pandas", "scipy", "matplotlib", "pillow")}
modules = {"numpy": numpy.__version__, "pandas": pandas.__version__, "scipy": scipy.__version__,
           "matplotlib": matplotlib.__version__, "pillow": PIL.__version__}
fig, ax = plt.subplots()
ax.plot(numpy.arange(10), pandas.Series(range(10)) ** 2)
buffer = __import__("io").BytesIO()
fig.savefig(buffer, format="png")
try:
    socket.create_connection(("192.0.2.1", 80), timeout=2)
    network = "reachable"
except OSError as exc:
    network = type(exc).__name__
print(json.dumps({"versions": versions, "modules": modules, "backend": matplotlib.get_backend(),
                  "png": buffer.getvalue()[:8].hex(), "interfaces": sorted(os.listdir("/sys/class/net")),
                  "network": network, "uid": os.getuid()}))
"""


def test_datascience_imports_each_package_at_its_pinned_version_and_draws_with_agg(datascience):
    proc = run_python(datascience, PROBE)
    assert proc.returncode == 0, proc.stderr
    # No warning either (e.g. matplotlib complaining that its config dir is not writable).
    assert proc.stderr == ""
    facts = json.loads(proc.stdout)
    pins = SPECS["datascience"].pins()
    for name in ("numpy", "pandas", "scipy", "matplotlib", "pillow"):
        assert facts["versions"][name] == pins[name], name
        assert facts["modules"][name] == pins[name], name
    assert facts["backend"].lower() == "agg"
    assert facts["png"] == b"\x89PNG\r\n\x1a\n".hex()
    assert facts["interfaces"] == ["lo"]
    assert facts["network"] != "reachable"
    assert facts["uid"] == 10001


def test_datascience_labels_list_what_its_python_holds(datascience):
    labels = labels_of(datascience)
    spec = SPECS["datascience"]
    packages = json.loads(labels[catalogue.LABEL_PACKAGES])
    assert {name: packages.get(name) for name in spec.pins()} == spec.pins()
    assert labels[catalogue.LABEL_PYTHON].startswith("3.11.")
    assert json.loads(labels[catalogue.LABEL_PRELOAD]) == list(spec.preload)
    assert labels[catalogue.LABEL_NAME] == "datascience"
    # The label is the truth read back from the image: the image's python3 agrees.
    proc = run_python(datascience, "import importlib.metadata as m, json; "
                      "print(json.dumps(sorted(d.metadata['Name'].lower() for d in m.distributions())))")
    assert [catalogue.normalize(name) for name in json.loads(proc.stdout)] == sorted(packages)


def test_both_images_share_the_runner_pattern_and_only_datascience_has_packages(datascience):
    python_image = SPECS["python"].docker_image
    for image, spec in ((python_image, SPECS["python"]), (datascience, SPECS["datascience"])):
        config = json.loads(subprocess.run(["docker", "image", "inspect", "--format", "{{json .Config}}", image],
                                           capture_output=True, text=True, check=True).stdout)
        assert config["Entrypoint"] == ["python3", "-I", "/opt/warmpool/runner.py"], image
        assert "MPLBACKEND=Agg" in config["Env"], image
        assert f"WARMPOOL_PRELOAD={','.join(spec.preload)}" in config["Env"], image
        assert config["Labels"][HASH_LABEL] == build_hash(spec), f"{image} is stale: run `make image`"
        proc = run_python(image, "import pwd; print(pwd.getpwuid(10001).pw_name)")
        assert proc.stdout.strip() == "sandbox", (image, proc.stderr)
    proc = run_python(python_image, "import numpy")
    assert "ModuleNotFoundError" in proc.stderr


def test_warmpool_image_reuses_images_that_are_up_to_date(datascience):
    before = {name: subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", spec.docker_image],
                                   capture_output=True, text=True, check=True).stdout.strip()
              for name, spec in SPECS.items()}
    env = {k: v for k, v in os.environ.items() if k != "WARMPOOL_TIERS_FILE"}
    proc = subprocess.run([sys.executable, "-m", "warmpool", "image"], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = {line.split()[0]: line.split()[2] for line in proc.stdout.splitlines()}
    assert printed == before
    assert "up to date" in proc.stderr and "building" not in proc.stderr


def test_a_stale_image_is_rebuilt(docker_client, removed_after):
    """An image whose build hash no longer matches this tree's Dockerfile, runner and catalogue entry (one
    built from an older runner.py, say) is rebuilt by `warmpool image`, which then finds it up to date."""
    spec = SPECS["python"]
    tag = f"warmpool-runner-stale-test:{secrets.token_hex(4)}"
    removed_after.append(tag)
    stale, _ = docker_client.images.build(
        fileobj=io.BytesIO(f"FROM {spec.docker_image}\nLABEL {HASH_LABEL}=from-an-older-runner\n".encode()),
        tag=tag, rm=True)
    # The same image under a second name (as when two checkouts build identical trees): the rebuild of the
    # first name must leave the second one's image alone.
    twin = f"warmpool-runner-stale-twin:{secrets.token_hex(4)}"
    removed_after.append(twin)
    stale.tag(twin)
    env = {**{k: v for k, v in os.environ.items() if k != "WARMPOOL_TIERS_FILE"}, "WARMPOOL_IMAGE": tag}

    def image_command() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "warmpool", "image", "--only", "python"], capture_output=True,
                              text=True, cwd=REPO, env=env, timeout=600)

    rebuilt = image_command()
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert "is stale (its build hash changed); rebuilding" in rebuilt.stderr, rebuilt.stderr[-3000:]
    built = docker_client.images.get(tag)
    assert built.id != stale.id and built.labels[HASH_LABEL] == build_hash(spec)
    assert rebuilt.stdout.split() == ["python", tag, built.id]
    assert docker_client.images.get(twin).id == stale.id, "the rebuild removed an image another tag still names"
    again = image_command()
    assert again.returncode == 0 and "up to date" in again.stderr and "building" not in again.stderr, again.stderr


def _probe_wheel(folder: Path) -> Path:
    """A pure-Python wheel made here, so that building an image from it needs no index and no network."""
    files = {
        "warmpool_probe/__init__.py": b"import os\nLOADED_AS = os.getuid()\n",
        "warmpool_probe-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: warmpool-probe\nVersion: 1.0\n",
        "warmpool_probe-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                              b"Tag: py3-none-any\n",
    }
    record = "".join(f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for name, data in files.items()) + "warmpool_probe-1.0.dist-info/RECORD,,\n"
    files["warmpool_probe-1.0.dist-info/RECORD"] = record.encode()
    path = folder / "warmpool_probe-1.0-py3-none-any.whl"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    path.write_bytes(buffer.getvalue())
    return path


def build_operator_image(tmp_path: Path, entry: dict) -> tuple[str, subprocess.CompletedProcess[str]]:
    """`warmpool image --only NAME` for one tiers-file image made of the probe wheel (no index, no network
    for pip); returns its tag (the caller removes it) and the command's outcome."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _probe_wheel(wheels)
    tiers = tmp_path / "tiers.json"
    tiers.write_text(json.dumps({"tiers": [], "images": [entry]}))
    tag = f"warmpool-{entry['name']}-test:{tmp_path.name.lower()[-20:]}"
    env = {**os.environ, "WARMPOOL_TIERS_FILE": str(tiers), catalogue.env_tag_variable(entry["name"]): tag,
           "WARMPOOL_CACHE_DIR": str(tmp_path / "cache"),
           # pip reads these itself: the local wheel and nothing else.
           "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}
    proc = subprocess.run([sys.executable, "-m", "warmpool", "image", "--only", entry["name"]], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=600)
    return tag, proc


@pytest.fixture
def removed_after() -> Iterator[list[str]]:
    tags: list[str] = []
    yield tags
    for tag in tags:
        subprocess.run(["docker", "image", "rm", "--force", tag], capture_output=True)


@pytest.mark.slow
def test_an_operator_image_from_the_tiers_file(tmp_path, docker_client, removed_after):
    tag, proc = build_operator_image(tmp_path, {"name": "probe", "packages": ["warmpool-probe==1.0"],
                                                "preload": ["warmpool_probe"]})
    removed_after.append(tag)
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = labels_of(tag)
    assert json.loads(labels[catalogue.LABEL_PACKAGES]) == {"warmpool-probe": "1.0"}
    assert json.loads(labels[catalogue.LABEL_PRELOAD]) == ["warmpool_probe"]
    out = run_python(tag, "import warmpool_probe; print(warmpool_probe.LOADED_AS)")
    assert out.stdout.strip() == "10001", out.stderr


@pytest.mark.slow
def test_an_image_whose_preload_list_does_not_import_is_not_built(tmp_path, docker_client, removed_after):
    tag, proc = build_operator_image(tmp_path, {"name": "broken", "packages": ["warmpool-probe==1.0"],
                                                "preload": ["warmpool_probe", "warmpool_absent"]})
    removed_after.append(tag)
    assert proc.returncode != 0
    assert "No module named 'warmpool_absent'" in proc.stderr
    assert subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode != 0
