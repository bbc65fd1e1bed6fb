"""Unpack an image's Python packages on the build machine, from PyPI wheels for the image's Python.

pip runs here, never inside a container: `pip install --target` with the image's Python version, ABI and
platform (Debian bookworm: glibc 2.36, x86_64) and binary wheels only, so nothing is compiled and nothing
from the build machine's own Python leaks in. The result is cached by what decides it (the requirements,
the Python version, the platform), so a rebuild of the image (say, a new runner.py) reuses it without
asking PyPI anything; pip's own download cache makes a changed pin fetch only what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pool.model.images import ImageSpec

log = logging.getLogger(__name__)

# Debian bookworm's glibc; a wheel built for any manylinux up to it runs in the image. pip 23 does not
# widen a `--platform` to older manylinux versions itself, so every accepted tag is named.
GLIBC = (2, 36)
DEFAULT_MACHINE = "x86_64"  # the engine's architecture as `uname -m` names it (also "aarch64")
COMPLETE = ".warmpool-complete"  # written last: a folder without it is a failed or running install
PIP_TIMEOUT_S = 900.0


class PackagesError(RuntimeError):
    """The packages could not be fetched or unpacked; the message has pip's own words."""


def platforms(machine: str = DEFAULT_MACHINE) -> list[str]:
    newest, oldest = GLIBC[1], 17  # manylinux_2_17 is manylinux2014, the oldest any current wheel uses
    return [f"manylinux_2_{minor}_{machine}" for minor in range(newest, oldest - 1, -1)] + [
        f"manylinux2014_{machine}"]


def packages_key(spec: ImageSpec, machine: str = DEFAULT_MACHINE) -> str:
    """Names the unpacked tree: it depends on the requirements and the target, not on the image's name."""
    text = json.dumps({"packages": list(spec.packages), "python": spec.python_version,
                       "platforms": platforms(machine)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """WARMPOOL_CACHE_DIR, else $XDG_CACHE_HOME/warmpool, else ~/.cache/warmpool."""
    if configured := os.environ.get("WARMPOOL_CACHE_DIR"):
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "warmpool"


def ensure_site_packages(spec: ImageSpec, cache_dir: Path, machine: str = DEFAULT_MACHINE) -> Path | None:
    """The folder whose contents go into the image's dist-packages, or None when it has no packages."""
    if not spec.packages:
        return None
    target = cache_dir / "site-packages" / packages_key(spec, machine)
    if (target / COMPLETE).exists():
        log.info("packages of %s: reusing %s", spec.name, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Unpack beside the target and rename when done, so that a concurrent or interrupted build never
    # sees half a tree (rename of a directory is atomic on one filesystem).
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _pip_install(spec, work, machine)
        _drop_scripts(work)
        (work / COMPLETE).write_text("\n".join(spec.packages) + "\n")
        try:
            work.rename(target)
        except OSError:
            if not (target / COMPLETE).exists():  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("packages of %s: unpacked into %s", spec.name, target)
    return target


def _pip_install(spec: ImageSpec, target: Path, machine: str) -> None:
    major_minor = spec.python_version.replace(".", "")
    command = [
        sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input",
        "--target", str(target), "--only-binary=:all:", "--no-compile", "--no-warn-script-location",
        "--python-version", spec.python_version, "--implementation", "cp", "--abi", f"cp{major_minor}",
        *[arg for platform in platforms(machine) for arg in ("--platform", platform)],
        "--", *spec.packages,
    ]
    log.info("packages of %s: pip install --target %s %s", spec.name, target, " ".join(spec.packages))
    try:
        proc = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                              timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PackagesError(f"pip could not run for image {spec.name}: {exc}") from exc
    if proc.returncode != 0:
        # pip prints a warning line per unreachable extra index; the error is at the end.
        output = (proc.stdout + proc.stderr).strip()[-3000:]
        raise PackagesError(f"pip install for image {spec.name} failed (exit {proc.returncode}):\n{output}")


def _drop_scripts(target: Path) -> None:
    """Console scripts (`f2py`, `fonttools`, ...) start with this machine's Python path: useless in the
    image, where tasks run Python code and no commands."""
    shutil.rmtree(target / "bin", ignore_errors=True)
