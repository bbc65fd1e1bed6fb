"""Build the sandbox images without a container registry.

`ensure_image` is the entry point: it returns the id of an image tagged `spec.docker_image` whose label
`warmpool.runner_hash` matches the current Dockerfile, runner.py and catalogue entry, building it only
when needed. Its base is `base_image` when that exists locally or can be pulled; otherwise a Debian
bookworm root made with debootstrap (minbase plus python3) is imported under that name. A base that exists
is never rebuilt. The image's packages are unpacked on this machine (packages.py); after the build, the
image's own python3 says which Python and packages it holds, and that goes into the image's labels.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import IO, Any

import docker
import docker.errors
from docker.models.images import Image
from docker.utils import parse_repository_tag

from pool.model.images import (
    LABEL_HASH,
    LABEL_NAME,
    LABEL_PACKAGES,
    LABEL_PRELOAD,
    LABEL_PYTHON,
    ImageSpec,
    normalize,
)
from runner_image.packages import DEFAULT_MACHINE, PackagesError, default_cache_dir, ensure_site_packages

log = logging.getLogger(__name__)

RUNNER_DIR = Path(__file__).resolve().parent
DEFAULT_BASE_IMAGE = "warmpool-base:bookworm"
HASH_LABEL = LABEL_HASH
RUNNER_PACKAGE_DIR = RUNNER_DIR / "sandbox"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# What the imported base sets; a `docker import` image has no config of its own.
BASE_CHANGES = ["ENV LANG=C.UTF-8"]
# Run in the freshly built image (no network) to learn what it really holds.
READ_BACK = (
    "import importlib.metadata as m, json, platform; "
    "print(json.dumps({'python_version': platform.python_version(), "
    "'packages': {d.metadata['Name']: d.version for d in m.distributions()}}))"
)


class ImageBuildError(RuntimeError):
    """A sandbox image (or its base) could not be built; the message says why and what to do."""


def context_files() -> list[tuple[str, Path]]:
    """The files of runner_image/ that go into every image (with site-packages/), as (name in the build
    context, source): the Dockerfile, the entry point runner.py and the runner package with its parent's
    (empty) __init__.py, so that it imports as `runner_image.sandbox` in the image as it does here. The
    build hash covers them all."""
    package = [(f"runner_image/sandbox/{path.name}", path) for path in sorted(RUNNER_PACKAGE_DIR.glob("*.py"))]
    return [("Dockerfile", RUNNER_DIR / "Dockerfile"), ("runner.py", RUNNER_DIR / "runner.py"),
            ("runner_image/__init__.py", RUNNER_DIR / "__init__.py"), *package]


def build_hash(spec: ImageSpec) -> str:
    """Return the sha256 over the Dockerfile, the runner's files and the image's entry: it names what they build."""
    digest = hashlib.sha256()
    for name, path in context_files():
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise ImageBuildError(f"{path} is missing") from exc
        # Name and length delimit each file, so moving bytes between them changes the hash.
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    identity = spec.identity().encode()
    digest.update(f"image\0{len(identity)}\0".encode() + identity)
    return digest.hexdigest()


def ensure_image(
    client: docker.DockerClient,
    spec: ImageSpec,
    base_image: str = DEFAULT_BASE_IMAGE,
    force: bool = False,
    cache_dir: Path | None = None,
) -> str:
    """Return the id of an up-to-date image for `spec`, building it (and its base, its packages) if needed."""
    image = spec.docker_image
    previous = _get_image(client, image)
    if not force:
        if previous is not None and (previous.labels or {}).get(HASH_LABEL) == build_hash(spec):
            log.info("image %s (%s) is up to date (%s)", spec.name, image, previous.short_id)
            return str(previous.id)
        if previous is not None:
            log.info("image %s (%s) is stale (its build hash changed); rebuilding", spec.name, image)
    ensure_base(client, base_image)
    try:
        site_packages = ensure_site_packages(spec, cache_dir or default_cache_dir(), _machine(client))
    except PackagesError as exc:
        raise ImageBuildError(str(exc)) from exc
    log.info("building %s (%s) from %s", spec.name, image, base_image)
    buildargs = {"BASE": base_image, "RUNNER_HASH": build_hash(spec), "PRELOAD": ",".join(spec.preload),
                 "SITE_PACKAGES": f"/usr/local/lib/python{spec.python_version}/dist-packages"}
    with tempfile.TemporaryFile() as context:
        write_context(context, site_packages)
        stage = _build(client, image, fileobj=context, buildargs=buildargs)
    try:
        facts = _read_back(client, stage, spec)
    except ImageBuildError:
        _remove_replaced(client, stage)  # untagged, and not what was asked for
        raise
    labels = {HASH_LABEL: build_hash(spec), LABEL_NAME: spec.name, LABEL_PYTHON: facts["python_version"],
              LABEL_PACKAGES: json.dumps(facts["packages"], sort_keys=True),
              LABEL_PRELOAD: json.dumps(list(spec.preload))}
    # Labels can only be added by another build: one LABEL step on top of the image just built.
    with tempfile.TemporaryFile() as context:
        with tarfile.open(fileobj=context, mode="w") as tar:
            _add_bytes(tar, "Dockerfile", f"FROM {stage}\n".encode())
        built = _build(client, image, fileobj=context, labels=labels, tag=image)
    log.info("built %s (%s): python %s, %d packages", image, built[:19], facts["python_version"],
             len(facts["packages"]))
    if previous is not None and previous.id != built:
        _remove_replaced(client, str(previous.id))
    return built


def _remove_replaced(client: docker.DockerClient, image_id: str) -> None:
    """Remove an image this build made obsolete (the one it untagged, or a failed stage), so that rebuilds
    do not pile up: a datascience image is ~400 MB of its own. Docker refuses while a container uses it or
    a tag names it: then it stays."""
    try:
        client.images.remove(image_id, force=False, noprune=False)
        log.info("removed image %s, which this build replaced", image_id[:19])
    except docker.errors.DockerException as exc:
        log.info("kept image %s: %s", image_id[:19], _first_line(exc))


def write_context(out: IO[bytes], site_packages: Path | None) -> None:
    """The build context as a tar: context_files() and site-packages/ (empty when there are none)."""
    def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        # A fractional mtime needs a PAX header, and `docker build -` does not take a tar that starts with one.
        info.mtime = int(info.mtime)
        return info

    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, path in context_files():
            tar.add(path, arcname=name, filter=as_root)
        if site_packages is None:
            folder = tarfile.TarInfo("site-packages")
            folder.type, folder.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(folder)
        else:
            tar.add(site_packages, arcname="site-packages", filter=as_root)
    out.seek(0)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, fileobj=io.BytesIO(data))


def _build(client: docker.DockerClient, image: str, fileobj: IO[bytes], tag: str | None = None,
           **kwargs: Any) -> str:
    """One `docker build` of a tar context, with no network for its RUN steps; returns the image id."""
    fileobj.seek(0)
    try:
        built, logs = client.images.build(fileobj=fileobj, custom_context=True, tag=tag, rm=True, forcerm=True,
                                          pull=False, network_mode="none", **kwargs)
    except docker.errors.BuildError as exc:
        tail = "".join(str(chunk.get("stream") or chunk.get("error") or "") for chunk in exc.build_log
                       if isinstance(chunk, dict))
        raise ImageBuildError(f"docker build of {image} failed: {exc.msg}\n{tail[-2000:]}") from exc
    except docker.errors.DockerException as exc:
        raise ImageBuildError(f"docker build of {image} failed: {exc}") from exc
    for chunk in logs:
        line = str(chunk.get("stream", "")).rstrip() if isinstance(chunk, dict) else ""
        if line:
            log.debug("build: %s", line)
    return str(built.id)


def _read_back(client: docker.DockerClient, image_id: str, spec: ImageSpec) -> dict[str, Any]:
    """Ask the built image's python3 (no network) what it holds; check it against the entry's pins."""
    try:
        output = client.containers.run(image_id, entrypoint=["python3", "-I", "-c", READ_BACK],
                                       network_mode="none", remove=True, stdout=True, stderr=False,
                                       labels={"warmpool.build": spec.name})
        facts = json.loads(output)
    except (docker.errors.DockerException, ValueError) as exc:
        raise ImageBuildError(f"cannot read the packages of the new {spec.docker_image}: {exc}") from exc
    packages = {normalize(name): version for name, version in facts["packages"].items()}
    facts["packages"] = dict(sorted(packages.items()))
    if not facts["python_version"].startswith(spec.python_version + "."):
        raise ImageBuildError(f"image {spec.name}: its base has Python {facts['python_version']}, but its "
                              f"packages were chosen for {spec.python_version}")
    wrong = {name: (version, packages.get(name)) for name, version in spec.pins().items()
             if packages.get(name) != version}
    if wrong:
        raise ImageBuildError(f"image {spec.name}: installed versions differ from the pins "
                              f"(package: (pinned, installed)): {wrong}")
    return dict(facts)


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


def _machine(client: docker.DockerClient) -> str:
    """The engine's CPU architecture (`x86_64`, `aarch64`): the images' wheels are chosen for it."""
    try:
        return str(client.info().get("Architecture") or DEFAULT_MACHINE)
    except docker.errors.DockerException as exc:
        raise ImageBuildError(f"cannot ask the Docker engine for its architecture: {exc}") from exc


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
