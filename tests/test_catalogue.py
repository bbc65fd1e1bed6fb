"""The image catalogue, operator images from the tiers file, and what decides a rebuild (no Docker)."""

import io
import json
import tarfile

import pytest

from pool.model import images as catalogue
from pool.model.errors import InvalidRequest
from pool.model.images import BUILTIN, ImageSpec, images_from_config
from runner_image import build, packages

BY_NAME = {spec.name: spec for spec in BUILTIN}


def test_builtin_images_are_python_and_datascience_with_distinct_tags():
    assert list(BY_NAME) == ["python", "datascience"]
    assert len({spec.docker_image for spec in BUILTIN}) == len(BUILTIN)
    assert all(spec.python_version == "3.11" for spec in BUILTIN)
    assert BY_NAME["python"].packages == () and BY_NAME["python"].preload == ()


def test_datascience_pins_every_package_it_promises_and_preloads_them():
    pins = BY_NAME["datascience"].pins()
    assert {"numpy", "pandas", "scipy", "matplotlib", "pillow"} <= set(pins)
    # Every requirement is pinned exactly, so two builds install the same thing.
    assert len(pins) == len(BY_NAME["datascience"].packages)
    assert {"numpy", "pandas", "scipy", "matplotlib", "matplotlib.pyplot", "PIL"} <= set(
        BY_NAME["datascience"].preload)


def test_an_operator_image_extends_a_builtin_one():
    specs = images_from_config({"images": [{"name": "ml", "extends": "datascience",
                                            "packages": ["scikit-learn==1.7.2"], "preload": ["sklearn", "numpy"]}],
                                "tiers": []})
    ml = specs[-1]
    assert [spec.name for spec in specs] == ["python", "datascience", "ml"]
    assert ml.docker_image == "warmpool-ml:latest"
    assert ml.packages == (*BY_NAME["datascience"].packages, "scikit-learn==1.7.2")
    assert ml.preload == (*BY_NAME["datascience"].preload, "sklearn")  # numpy once, in its first place
    assert ml.pins()["scikit-learn"] == "1.7.2"


def test_an_operator_image_of_its_own():
    (spec,) = images_from_config({"images": [{"name": "tiny", "docker_image": "registry.local/tiny:1",
                                              "packages": ["attrs>=23, <25", "six"]}]})[2:]
    assert spec == ImageSpec("tiny", "registry.local/tiny:1", packages=("attrs>=23, <25", "six"))
    assert spec.pins() == {}


def test_no_images_key_means_the_builtins():
    assert images_from_config(None) == BUILTIN
    assert images_from_config({"tiers": []}) == BUILTIN


@pytest.mark.parametrize(("entry", "field"), [
    ({"name": "Bad Name"}, "images[0].name"),
    ({"name": "python"}, "images[0].name"),
    ({"name": "x", "extends": "nope"}, "images[0].extends"),
    ({"name": "x", "packages": "numpy"}, "images[0].packages"),
    ({"name": "x", "packages": ["--index-url=http://evil/simple"]}, "images[0].packages[0]"),
    ({"name": "x", "packages": ["numpy", "https://example.com/x.whl"]}, "images[0].packages[1]"),
    ({"name": "x", "packages": ["./local-dir"]}, "images[0].packages[0]"),
    ({"name": "x", "preload": ["os; import evil"]}, "images[0].preload[0]"),
    ({"name": "x", "docker_image": "UPPER:case"}, "images[0].docker_image"),
    ({"name": "x", "pakages": []}, "images[0]"),
    ("x", "images[0]"),
])
def test_bad_operator_images_name_the_field(entry, field):
    with pytest.raises(InvalidRequest) as caught:
        images_from_config({"images": [entry]})
    assert caught.value.field == field


def test_two_images_may_not_share_a_docker_tag():
    with pytest.raises(InvalidRequest, match="share a docker_image"):
        images_from_config({"images": [{"name": "x", "docker_image": "warmpool-runner:latest"}]})


def test_environment_names_the_docker_tags():
    specs = catalogue.with_env_tags(BUILTIN, {"WARMPOOL_IMAGE": "warmpool-runner:dev",
                                              "WARMPOOL_IMAGE_DATASCIENCE": "ds:dev"})
    assert [spec.docker_image for spec in specs] == ["warmpool-runner:dev", "ds:dev"]
    assert catalogue.with_env_tags(BUILTIN, {}) == BUILTIN
    assert catalogue.env_tag_variable("my-image") == "WARMPOOL_IMAGE_MY_IMAGE"


def test_from_env_reads_the_tiers_file_images(tmp_path):
    path = tmp_path / "tiers.json"
    path.write_text(json.dumps({"tiers": [], "images": [{"name": "tiny", "packages": ["six==1.17.0"]}]}))
    specs = catalogue.from_env({"WARMPOOL_TIERS_FILE": str(path), "WARMPOOL_IMAGE_TINY": "tiny:test"})
    assert [(spec.name, spec.docker_image) for spec in specs][-1] == ("tiny", "tiny:test")
    with pytest.raises(InvalidRequest) as caught:
        catalogue.from_env({"WARMPOOL_TIERS_FILE": str(tmp_path / "missing.json")})
    assert caught.value.field == "WARMPOOL_TIERS_FILE"


def test_describe_prefers_what_the_built_image_says():
    spec = BY_NAME["datascience"]
    labels = {catalogue.LABEL_PYTHON: "3.11.2", catalogue.LABEL_PACKAGES: json.dumps({"numpy": "2.4.6"})}
    assert catalogue.describe(spec, labels) == {
        "name": "datascience", "docker_image": spec.docker_image, "python_version": "3.11.2",
        "packages": {"numpy": "2.4.6"}, "preloaded": list(spec.preload), "description": spec.description}
    # Not built yet: what the entry pins.
    assert catalogue.describe(spec, None)["packages"] == spec.pins()
    assert catalogue.describe(spec, None)["python_version"] == "3.11"


def test_the_build_hash_changes_with_the_entry_but_not_the_tag():
    spec = BY_NAME["datascience"]
    from dataclasses import replace

    assert build.build_hash(spec) == build.build_hash(replace(spec, docker_image="other:tag"))
    assert build.build_hash(spec) != build.build_hash(replace(spec, preload=spec.preload[:-1]))
    assert build.build_hash(spec) != build.build_hash(replace(spec, packages=spec.packages[:-1]))
    assert build.build_hash(spec) != build.build_hash(BY_NAME["python"])


def test_unpacked_packages_are_shared_by_images_with_the_same_requirements():
    from dataclasses import replace

    spec = BY_NAME["datascience"]
    assert packages.packages_key(spec) == packages.packages_key(replace(spec, name="other", preload=()))
    assert packages.packages_key(spec) != packages.packages_key(replace(spec, packages=spec.packages[1:]))
    assert packages.packages_key(spec) != packages.packages_key(replace(spec, python_version="3.12"))


def test_platforms_accept_every_manylinux_up_to_the_images_glibc():
    tags = packages.platforms()
    assert tags[0] == "manylinux_2_36_x86_64"
    assert {"manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"} <= set(tags)
    assert "manylinux_2_37_x86_64" not in tags
    assert packages.platforms("aarch64")[0] == "manylinux_2_36_aarch64"


def test_the_build_context_holds_the_one_dockerfile_runner_and_packages(tmp_path):
    site = tmp_path / "site"
    (site / "pkg").mkdir(parents=True)
    (site / "pkg" / "__init__.py").write_text("X = 1\n")
    runner = {"Dockerfile", "runner.py", "runner_image/__init__.py"} | {
        f"runner_image/sandbox/{path.name}" for path in (build.RUNNER_DIR / "sandbox").glob("*.py")}
    assert {"runner_image/sandbox/pid1.py", "runner_image/sandbox/taskfiles.py"} <= runner
    for source, expected in ((None, runner | {"site-packages"}),
                             (site, runner | {"site-packages", "site-packages/pkg", "site-packages/pkg/__init__.py"})):
        out = io.BytesIO()
        build.write_context(out, source)
        with tarfile.open(fileobj=out) as tar:
            members = tar.getmembers()
            assert {m.name for m in members} == expected
            assert all(m.uid == 0 and m.gid == 0 for m in members)
            assert tar.extractfile("Dockerfile").read() == (build.RUNNER_DIR / "Dockerfile").read_bytes()
