"""`warmpool service-image`: the image the deployments run (API, worker and Redis), built with no registry.

Everything the image holds is fetched on the build machine and copied in through the build context; the
`docker build` itself runs with no network (as the sandbox images' do):

- wheels/: this checkout built as a wheel (`pip wheel --no-deps`), and every dependency downloaded as a
  binary wheel for the image's Python and platform (`pip download --only-binary=:all: --python-version
  3.11 --platform manylinux_2_36_x86_64 ...`, the same targets as the sandbox images' packages), plus pip's
  own wheel, which installs them offline inside the build (`python3 pip.whl/pip install --no-index`);
- debs/: Redis, as Debian bookworm's own packages (`apt-get download`), for the Redis service (with AOF).

It is built FROM the debootstrapped base `warmpool-base:bookworm` that `warmpool image` makes (and makes
here too when absent). To run it on other engines, `docker save` it and `docker load` it there.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import docker
import docker.errors

from runner_image.build import ImageBuildError, _build, _machine, ensure_base
from runner_image.packages import platforms

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "deploy" / "image" / "Dockerfile"
DEFAULT_TAG = "warmpool-service:latest"
PYTHON_VERSION = "3.11"  # the base's python3 (Debian bookworm)
DEBIAN_RELEASE = "bookworm"
# Redis and what it needs beyond the base (minbase + python3); dpkg -i in the build fails on anything missing.
REDIS_DEBS = ("redis-server", "redis-tools", "libjemalloc2", "liblzf1", "libatomic1")
FETCH_TIMEOUT_S = 900.0
MAX_RESOLVE_ROUNDS = 8


def build_service_image(client: docker.DockerClient, tag: str = DEFAULT_TAG,
                        base_image: str = "warmpool-base:bookworm") -> str:
    """Fetch the wheels and debs, build the image with no network, tag it; return its id."""
    if not DOCKERFILE.exists() or not (REPO / "pyproject.toml").exists():
        raise ImageBuildError(f"the service image is built from a source checkout of warmpool; {DOCKERFILE} "
                              f"is missing (run this from a clone of the repository, installed with pip -e)")
    ensure_base(client, base_image)
    machine = _machine(client)
    context = Path(tempfile.mkdtemp(prefix="warmpool-service-context-"))
    try:
        fetch_wheels(context / "wheels", machine)
        complete_wheels(client, base_image, context / "wheels", machine)
        fetch_debs(context / "debs")
        shutil.copyfile(DOCKERFILE, context / "Dockerfile")
        with tempfile.TemporaryFile() as tar_file:
            with tarfile.open(fileobj=tar_file, mode="w") as tar:
                tar.add(context, arcname=".", filter=_as_root)
            log.info("building %s (no network) from %s", tag, context)
            image_id = _build(client, tag, tar_file, tag=tag, buildargs={"BASE": base_image},
                              labels={"warmpool.service.base": base_image})
    finally:
        shutil.rmtree(context, ignore_errors=True)
    log.info("service image %s is %s", tag, image_id[:19])
    return image_id


def fetch_wheels(wheels: Path, machine: str) -> None:
    """This checkout as a wheel, and binary wheels of everything it needs (and of pip) for the image."""
    wheels.mkdir(parents=True)
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-input",
          "--no-deps", "--wheel-dir", str(wheels), str(REPO)], "pip wheel (this checkout)")
    own = sorted(wheels.glob("warmpool-*.whl"))
    if len(own) != 1:
        raise ImageBuildError(f"pip wheel made {[p.name for p in own]}, expected one warmpool wheel")
    _download(wheels, machine, [str(own[0]), "pip"], "pip download (the service's dependencies)")
    log.info("wheels: %d files in %s", len(list(wheels.iterdir())), wheels)


def _download(wheels: Path, machine: str, requirements: list[str], what: str) -> None:
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-input",
          "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
          "--abi", "cp" + PYTHON_VERSION.replace(".", ""),
          *[arg for platform in platforms(machine) for arg in ("--platform", platform)],
          "--dest", str(wheels), "--", *requirements], what)


def complete_wheels(client: docker.DockerClient, base_image: str, wheels: Path, machine: str) -> None:
    """Add the wheels that the image's own python3 needs and this machine's pip did not fetch.

    pip download picks wheels for the target's tags, but evaluates environment markers with the Python
    running it: a dependency marked `python_full_version < "3.11.3"` is skipped from a 3.11.7 build
    machine although the image's python3 is 3.11.2. So the image's python3 resolves the install offline
    (pip --dry-run, no network) and names what is missing, which is fetched, until nothing is."""
    for _ in range(MAX_RESOLVE_ROUNDS):
        missing = _missing_requirement(client, base_image, wheels)
        if missing is None:
            return
        log.info("wheels: the image's python3 also needs %s", missing)
        _download(wheels, machine, [missing], f"pip download {missing}")
    raise ImageBuildError(f"the image's python3 still lacks wheels after {MAX_RESOLVE_ROUNDS} rounds")


def _missing_requirement(client: docker.DockerClient, base_image: str, wheels: Path) -> str | None:
    pip_wheel = next(wheels.glob("pip-*.whl")).name
    script = (f"python3 /wheels/{pip_wheel}/pip install --dry-run --no-index --find-links /wheels "
              "--disable-pip-version-check --break-system-packages --root-user-action=ignore warmpool 2>&1; "
              "echo exit=$?")
    try:
        output = client.containers.run(base_image, ["sh", "-c", script], network_mode="none", remove=True,
                                       volumes={str(wheels): {"bind": "/wheels", "mode": "ro"}},
                                       labels={"warmpool.build": "service-image"}).decode(errors="replace")
    except docker.errors.DockerException as exc:
        raise ImageBuildError(f"cannot check the wheels with the image's python3: {exc}") from exc
    if output.rstrip().endswith("exit=0"):
        return None
    found = re.search(r"No matching distribution found for (\S+)", output)
    if found is None:
        raise ImageBuildError(f"the image's pip cannot install the wheels:\n{output[-2000:]}")
    return found.group(1)


def fetch_debs(debs: Path) -> None:
    """Debian's Redis packages, for the base's release (so this build machine must run that release)."""
    release = _os_release().get("VERSION_CODENAME")
    if release != DEBIAN_RELEASE:
        raise ImageBuildError(f"Redis goes into the image as Debian {DEBIAN_RELEASE} packages fetched with "
                              f"apt-get download, and this machine runs {release or 'no Debian'}: build the "
                              f"service image on Debian {DEBIAN_RELEASE}")
    if shutil.which("apt-get") is None:
        raise ImageBuildError("apt-get is needed to fetch Redis's Debian packages")
    debs.mkdir(parents=True)
    download = ["apt-get", "download", "-q", *REDIS_DEBS]
    try:
        _run(download, "apt-get download (Redis)", cwd=debs)
    except ImageBuildError:
        if os.geteuid() != 0:
            raise ImageBuildError("apt-get download could not fetch Redis's packages; run apt-get update "
                                  "(as root) and retry") from None
        # A machine whose package lists were never fetched (or are stale) knows no such package yet.
        _run(["apt-get", "update", "-qq"], "apt-get update")
        _run(download, "apt-get download (Redis)", cwd=debs)


def _os_release() -> dict[str, str]:
    try:
        lines = Path("/etc/os-release").read_text().splitlines()
    except OSError:
        return {}
    pairs = (line.split("=", 1) for line in lines if "=" in line)
    return {key: value.strip().strip('"') for key, value in pairs}


def _as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = int(info.mtime)  # `docker build -` does not take a tar that starts with a PAX header
    return info


def _run(command: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                              cwd=cwd, timeout=FETCH_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageBuildError(f"{what} could not run: {exc}") from exc
    if proc.returncode != 0:
        raise ImageBuildError(f"{what} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr).strip()[-3000:]}")

