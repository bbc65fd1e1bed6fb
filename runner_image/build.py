"""Build the runner image without a container registry.

`ensure_image` is the entry point: it returns the id of an image tagged `image` whose label
`warmpool.runner_hash` matches the current Dockerfile and runner.py, building it only when needed. Its
base is `base_image` when that exists locally or can be pulled; otherwise a Debian bookworm root made with
debootstrap (minbase plus python3) is imported under that name. A base that exists is never rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import docker
import docker.errors
from docker.models.images import Image
from docker.utils import parse_repository_tag

log = logging.getLogger(__name__)

RUNNER_DIR = Path(__file__).resolve().parent
DEFAULT_IMAGE = "warmpool-runner:latest"
DEFAULT_BASE_IMAGE = "warmpool-base:bookworm"
HASH_LABEL = "warmpool.runner_hash"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# What the imported base sets; a `docker import` image has no config of its own.
BASE_CHANGES = ["ENV LANG=C.UTF-8"]


class ImageBuildError(RuntimeError):
    """The runner image (or its base) could not be built; the message says why and what to do."""


def runner_hash() -> str:
    """Return the sha256 over the Dockerfile and runner.py, which names the image they build."""
    digest = hashlib.sha256()
    for name in ("Dockerfile", "runner.py"):
        path = RUNNER_DIR / name
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise ImageBuildError(f"{path} is missing") from exc
        # Name and length delimit each file, so moving bytes between them changes the hash.
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def ensure_image(
    client: docker.DockerClient,
    image: str = DEFAULT_IMAGE,
    base_image: str = DEFAULT_BASE_IMAGE,
    force: bool = False,
) -> str:
    """Return the id of an up-to-date runner image tagged `image`, building it (and its base) if needed."""
    wanted = runner_hash()
    if not force:
        current = _get_image(client, image)
        if current is not None and (current.labels or {}).get(HASH_LABEL) == wanted:
            log.info("image %s is up to date (%s)", image, current.short_id)
            return str(current.id)
        if current is not None:
            log.info("image %s is stale (runner hash changed); rebuilding", image)
    ensure_base(client, base_image)
    log.info("building %s from %s", image, base_image)
    try:
        built, logs = client.images.build(
            path=str(RUNNER_DIR),
            buildargs={"BASE": base_image, "RUNNER_HASH": wanted},
            tag=image,
            rm=True,
            forcerm=True,
            pull=False,
        )
    except docker.errors.BuildError as exc:
        tail = "".join(str(chunk.get("stream") or chunk.get("error") or "") for chunk in exc.build_log)
        raise ImageBuildError(f"docker build of {image} failed: {exc.msg}\n{tail[-2000:]}") from exc
    except docker.errors.DockerException as exc:
        raise ImageBuildError(f"docker build of {image} failed: {exc}") from exc
    for chunk in logs:
        line = str(chunk.get("stream", "")).rstrip()
        if line:
            log.debug("build: %s", line)
    log.info("built %s (%s)", image, built.short_id)
    return str(built.id)


def ensure_base(client: docker.DockerClient, base_image: str) -> None:
    """Make sure `base_image` exists locally: keep it, else pull it, else debootstrap and import it."""
    if _get_image(client, base_image) is not None:
        log.info("base image %s is present", base_image)
        return
    repository, tag = parse_repository_tag(base_image)
    try:
        log.info("base image %s is absent; trying to pull it", base_image)
        client.images.pull(repository, tag=tag or "latest")
        return
    except docker.errors.DockerException as exc:
        # No registry is the normal case here; the daemon says so at once.
        log.info("pull of %s failed (%s); building it with debootstrap", base_image, _first_line(exc))
    _debootstrap_base(client, base_image)


def _debootstrap_base(client: docker.DockerClient, base_image: str) -> None:
    debootstrap = _find_debootstrap()
    repository, tag = parse_repository_tag(base_image)
    workdir = Path(tempfile.mkdtemp(prefix="warmpool-base-"))
    rootfs = workdir / "rootfs"
    tarball = workdir / "rootfs.tar"
    try:
        log.info("debootstrap %s into %s (about a minute)", DEBIAN_SUITE, rootfs)
        _run(
            [
                debootstrap,
                "--variant=minbase",
                "--include=python3",
                DEBIAN_SUITE,
                str(rootfs),
                DEBIAN_MIRROR,
            ],
            "debootstrap",
        )
        _slim_rootfs(rootfs)
        _run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(tarball), "."], "tar")
        log.info("importing %s", base_image)
        # Through the API client, not the docker CLI, so the image lands in the engine `client` talks to.
        client.api.import_image_from_file(
            str(tarball), repository=repository, tag=tag or "latest", changes=BASE_CHANGES
        )
    except docker.errors.DockerException as exc:
        raise ImageBuildError(f"docker import of {base_image} failed: {exc}") from exc
    finally:
        _remove_tree(workdir)
    if _get_image(client, base_image) is None:
        raise ImageBuildError(f"docker import reported success but {base_image} is not there")
    log.info("base image %s is ready", base_image)


def _find_debootstrap() -> str:
    found = shutil.which("debootstrap") or _first_executable("/usr/sbin/debootstrap", "/sbin/debootstrap")
    if found:
        if os.geteuid() != 0:
            raise ImageBuildError("building the base image with debootstrap needs root; rerun as root")
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log.info("installing debootstrap")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "update", "-qq"], "apt-get update", env=env)
        _run(["apt-get", "install", "-y", "-qq", "debootstrap"], "apt-get install debootstrap", env=env)
        found = shutil.which("debootstrap") or _first_executable("/usr/sbin/debootstrap")
        if found:
            return found
    raise ImageBuildError(
        "no base image and no way to build one: install debootstrap and run as root, "
        "or point WARMPOOL_BASE_IMAGE at a local Debian/Ubuntu image that has python3"
    )


def _slim_rootfs(rootfs: Path) -> None:
    """Drop apt's downloaded packages and lists: about 90 MB that a sandbox never uses."""
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (rootfs / sub).glob("*"):
            if entry.is_file() and not entry.is_symlink() and entry.name != "lock":
                entry.unlink()
    for entry in (rootfs / "var/cache/apt").glob("*.bin"):
        entry.unlink()


def _remove_tree(path: Path) -> None:
    # debootstrap mounts /proc and /sys inside the target and may leave them mounted when it fails;
    # unmount first so that removing the tree can never reach into the host's /proc.
    prefix = str(path) + "/"
    try:
        with open("/proc/mounts") as mounts:
            points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    except OSError:
        points = []
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", env=env)
    except OSError as exc:
        raise ImageBuildError(f"{what} could not run: {exc}") from exc
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()[-2000:]
        raise ImageBuildError(f"{what} failed (exit {proc.returncode}):\n{output}")


def _get_image(client: docker.DockerClient, name: str) -> Image | None:
    try:
        return client.images.get(name)
    except docker.errors.ImageNotFound:
        return None
    except docker.errors.DockerException as exc:
        raise ImageBuildError(f"cannot inspect image {name}: {exc}") from exc


def _first_executable(*paths: str) -> str | None:
    return next((p for p in paths if os.access(p, os.X_OK)), None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
