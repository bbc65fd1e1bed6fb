"""The sandbox images warmpool knows (data and parsing: no Docker; only `from_env` reads a file).

Every image is the same runner image (runner_image/Dockerfile: sandbox user, runner as PID 1) over the
same Debian base, plus the Python packages its entry names, unpacked from PyPI wheels for the image's
Python on the build machine (sandboxes never have network). `preload` lists the modules the runner imports
before it forks a task, so that `import pandas` in a task finds it in `sys.modules`.

The catalogue is what the operator configured; what an image really holds is read back from it at build
time and kept in its labels (`LABEL_*` below), so the service can list images without running anything.
Operators add images in the tiers file (`WARMPOOL_TIERS_FILE`), beside `tiers`::

    {"images": [{"name": "ml", "extends": "datascience", "packages": ["scikit-learn==1.9.1", ...],
                 "preload": ["sklearn"]}],
     "tiers": [...]}
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pool.model.errors import InvalidRequest

# The Python of the base image (Debian bookworm's python3); wheels are chosen for it.
PYTHON_VERSION = "3.11"

# Labels every built image carries (values are strings; lists and maps are JSON).
LABEL_HASH = "warmpool.runner_hash"  # what the image was built from (Dockerfile, runner, this entry)
LABEL_NAME = "warmpool.image.name"
LABEL_PYTHON = "warmpool.image.python_version"  # as the image's python3 reports it, e.g. "3.11.2"
LABEL_PACKAGES = "warmpool.image.packages"  # {"numpy": "2.4.6", ...}: every distribution python3 sees
LABEL_PRELOAD = "warmpool.image.preload"  # ["numpy", ...]

_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
# A PyPI name with optional extras and version clauses; no URLs, paths or pip options ("--index-url").
_REQUIREMENT = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?(?:\[[A-Za-z0-9._,-]+\])?"
    r"(?:\s*(?:===|==|!=|~=|>=|<=|<|>)\s*[A-Za-z0-9.*+!_-]+(?:\s*,\s*(?:===|==|!=|~=|>=|<=|<|>)\s*[A-Za-z0-9.*+!_-]+)*)?"
)
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


@dataclass(frozen=True)
class ImageSpec:
    """One sandbox image: what to install into it and which modules its runner imports ahead of tasks."""

    name: str
    docker_image: str
    python_version: str = PYTHON_VERSION
    packages: tuple[str, ...] = ()  # pip requirement specifiers, pinned with == for reproducible builds
    preload: tuple[str, ...] = ()  # imported in this order, before the runner forks a task
    description: str = ""

    def identity(self) -> str:
        """Canonical text of what decides the image's contents (the tag does not), for its build hash."""
        return json.dumps({"name": self.name, "python_version": self.python_version,
                           "packages": list(self.packages), "preload": list(self.preload)}, sort_keys=True)

    def pins(self) -> dict[str, str]:
        """The exact versions the entry asks for (`name==version`), by normalized package name."""
        out = {}
        for requirement in self.packages:
            match = re.fullmatch(r"([A-Za-z0-9._-]+)(?:\[[^\]]*\])?\s*==\s*([A-Za-z0-9.+!_-]+)", requirement)
            if match:
                out[normalize(match.group(1))] = match.group(2)
        return out


# Dependencies are pinned too, so that a build next year installs what this one did; the image's label
# lists what was really installed (the build checks it against these pins).
DATASCIENCE_PACKAGES = (
    "numpy==2.4.6",
    "pandas==3.1.1",
    "scipy==1.17.1",
    "matplotlib==3.11.2",
    "pillow==13.0.0",
    # what the five above depend on
    "contourpy==1.3.3",
    "cycler==0.12.1",
    "fonttools==4.68.0",
    "kiwisolver==1.5.1",
    "packaging==26.4",
    "pyparsing==3.3.3",
    "python-dateutil==4.0.0",
    "tzdata==2026.6",
)

# The modules a data-science task imports first. Each costs memory in every idle container (these five:
# ~100 MB RSS; adding scipy.stats, optimize, linalg, sparse, interpolate and signal: ~160 MB), so scipy's
# subpackages, which load lazily, are left to the task; an operator image can preload them (README).
DATASCIENCE_PRELOAD = ("numpy", "pandas", "scipy", "matplotlib", "matplotlib.pyplot", "PIL", "PIL.Image")

BUILTIN: tuple[ImageSpec, ...] = (
    ImageSpec("python", "warmpool-runner:latest", description="Python's standard library only"),
    ImageSpec("datascience", "warmpool-datascience:latest", packages=DATASCIENCE_PACKAGES,
              preload=DATASCIENCE_PRELOAD,
              description="numpy, pandas, scipy, matplotlib (Agg) and pillow, already imported"),
)


def normalize(package: str) -> str:
    """A distribution name as PEP 503 compares them: `Python_Dateutil` -> `python-dateutil`."""
    return re.sub(r"[-_.]+", "-", package).lower()


def env_tag_variable(name: str) -> str:
    """The environment variable that overrides an image's docker tag (`python` keeps WARMPOOL_IMAGE)."""
    return "WARMPOOL_IMAGE" if name == "python" else "WARMPOOL_IMAGE_" + name.upper().replace("-", "_")


def with_env_tags(specs: tuple[ImageSpec, ...], env: Mapping[str, str]) -> tuple[ImageSpec, ...]:
    """The specs with docker tags taken from the environment where it names one (see env_tag_variable)."""
    return tuple(replace(spec, docker_image=env[var]) if env.get(var := env_tag_variable(spec.name)) else spec
                 for spec in specs)


def image_from_dict(raw: Any, where: str, known: Mapping[str, ImageSpec]) -> ImageSpec:
    """One operator image from a tiers file `images` entry; `known` are the images it may extend."""
    if not isinstance(raw, dict):
        raise InvalidRequest(where, "an object with at least 'name' and 'packages' is required")
    allowed = {"name", "docker_image", "extends", "packages", "preload", "description"}
    if unknown := set(raw) - allowed:
        raise InvalidRequest(where, f"unknown keys {sorted(unknown)}; known: {sorted(allowed)}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequest(f"{where}.name", "1 to 32 of a-z, 0-9, '-', '_', starting with a letter")
    parent = ImageSpec(name, f"warmpool-{name}:latest")
    if "extends" in raw:
        if raw["extends"] not in known:
            raise InvalidRequest(f"{where}.extends", f"unknown image {raw['extends']!r}; known: {sorted(known)}")
        parent = known[raw["extends"]]
    docker_image = raw.get("docker_image", f"warmpool-{name}:latest")
    if not isinstance(docker_image, str) or not re.fullmatch(r"[a-z0-9][a-z0-9._/-]*(:[A-Za-z0-9_.-]+)?",
                                                             docker_image):
        raise InvalidRequest(f"{where}.docker_image", "a docker image name like 'warmpool-ml:latest'")
    packages = _strings(raw.get("packages", []), f"{where}.packages", _REQUIREMENT,
                        "a PyPI requirement such as 'scikit-learn==1.9.1'")
    preload = _strings(raw.get("preload", []), f"{where}.preload", _MODULE, "a module name such as 'sklearn'")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise InvalidRequest(f"{where}.description", "a string is required")
    return ImageSpec(name=name, docker_image=docker_image, python_version=parent.python_version,
                     packages=parent.packages + packages, preload=_unique(parent.preload + preload),
                     description=description)


def images_from_config(raw: Any, builtin: tuple[ImageSpec, ...] = BUILTIN) -> tuple[ImageSpec, ...]:
    """The built-in images plus those a tiers file's `images` list adds (absent: the built-ins)."""
    entries = raw.get("images", []) if isinstance(raw, dict) else []
    if not isinstance(entries, list):
        raise InvalidRequest("images", "a list of image entries is required")
    known = {spec.name: spec for spec in builtin}
    added = []
    for index, entry in enumerate(entries):
        spec = image_from_dict(entry, f"images[{index}]", known)
        if spec.name in known:
            raise InvalidRequest(f"images[{index}].name", f"{spec.name!r} is already an image; pick another name")
        known[spec.name] = spec
        added.append(spec)
    tags = [spec.docker_image for spec in (*builtin, *added)]
    if len(set(tags)) != len(tags):
        raise InvalidRequest("images", f"two images share a docker_image: {tags}")
    return (*builtin, *added)


def from_env(env: Mapping[str, str]) -> tuple[ImageSpec, ...]:
    """The images this deployment serves: built-ins plus WARMPOOL_TIERS_FILE's `images`, tags from `env`.

    The one function here that reads a file (the tiers file, which settings read too).
    """
    path = env.get("WARMPOOL_TIERS_FILE")
    return with_env_tags(images_from_config(read_tiers_file(path) if path else None), env)


def read_tiers_file(path: str) -> Any:
    """The tiers file's JSON (tiers and images); InvalidRequest on WARMPOOL_TIERS_FILE when unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequest("WARMPOOL_TIERS_FILE", f"{path}: cannot be read: {exc}") from exc


def describe(spec: ImageSpec, labels: Mapping[str, str] | None) -> dict[str, Any]:
    """What GET /v1/images says of an image: from its built labels, or its entry when not built yet."""
    labels = labels or {}
    try:
        packages = json.loads(labels[LABEL_PACKAGES])
    except (KeyError, ValueError):
        packages = None
    return {"name": spec.name, "docker_image": spec.docker_image,
            "python_version": labels.get(LABEL_PYTHON) or spec.python_version,
            "packages": packages if isinstance(packages, dict) else spec.pins(),
            "preloaded": list(spec.preload), "description": spec.description}


def _strings(value: Any, where: str, pattern: re.Pattern[str], what: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise InvalidRequest(where, "a list of strings is required")
    for index, item in enumerate(value):
        if not isinstance(item, str) or not pattern.fullmatch(item.strip()):
            raise InvalidRequest(f"{where}[{index}]", f"expected {what}, got {item!r}")
    return tuple(item.strip() for item in value)


def _unique(items: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))
