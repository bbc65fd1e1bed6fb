"""Nearest-fit mapping of requests onto tiers, tier files, and the capacity ledger (pure logic)."""

import json

import pytest

from pool.model.capacity import CapacityLedger, HostInventory
from pool.model.errors import CapacityError, InvalidRequest, NoTierFits
from pool.model.resources import ResourceRequest, Resources
from pool.model.tiers import DEFAULT_MAX_USES, Tier, default_tiers, fit_tier, load_tiers_file, tier_from_dict

MIB, GIB = 1024**2, 1024**3

TIERS = (
    Tier("nano", Resources(0.5, 0, 128 * MIB, 128 * MIB)),
    Tier("small", Resources(2, 0, 512 * MIB, GIB)),
    Tier("large", Resources(2, 0, 2 * GIB, 2 * GIB)),
    Tier("gpu1", Resources(4, 1, 8 * GIB, 8 * GIB)),
)


@pytest.mark.parametrize(("request_", "tier"), [
    (ResourceRequest(), "nano"),
    (ResourceRequest(cpu=0.5), "nano"),
    (ResourceRequest(cpu=0.6), "small"),
    (ResourceRequest(ram_bytes=128 * MIB), "nano"),
    (ResourceRequest(ram_bytes=128 * MIB + 1), "small"),
    (ResourceRequest(cpu=2, ram_bytes=512 * MIB, storage_bytes=GIB), "small"),
    (ResourceRequest(storage_bytes=GIB + 1), "large"),
    (ResourceRequest(ram_bytes=GIB), "large"),
    (ResourceRequest(cpu=3), "gpu1"),
    (ResourceRequest(gpu=1), "gpu1"),
])
def test_smallest_covering_tier_wins(request_, tier):
    assert fit_tier(TIERS, request_).name == tier


def test_order_of_the_tier_list_does_not_matter():
    assert fit_tier(tuple(reversed(TIERS)), ResourceRequest(cpu=1)).name == "small"


@pytest.mark.parametrize(("request_", "field", "words"), [
    (ResourceRequest(gpu=2), "resources.gpu", "largest tier offers 1"),
    (ResourceRequest(ram_bytes=64 * GIB), "resources.ram", "8GiB"),
    (ResourceRequest(cpu=64), "resources.cpu", "offers 4"),
    (ResourceRequest(storage_bytes=100 * GIB), "resources.storage", "8GiB"),
])
def test_no_tier_names_the_dimension_and_the_largest_offer(request_, field, words):
    with pytest.raises(NoTierFits) as info:
        fit_tier(TIERS, request_)
    assert info.value.field == field
    assert words in info.value.message


def test_gpu_request_without_gpu_tiers_says_so():
    with pytest.raises(NoTierFits) as info:
        fit_tier(default_tiers(), ResourceRequest(gpu=1))
    assert "no GPU tier" in info.value.message


def test_default_tiers_serve_the_seed_example():
    tier = fit_tier(default_tiers(), ResourceRequest(cpu=2, gpu=0, ram_bytes=512 * MIB, storage_bytes=GIB))
    assert tier.name == "small"


def test_tiers_file_round_trip(tmp_path):
    path = tmp_path / "tiers.json"
    path.write_text(json.dumps({"tiers": [{"name": "tiny", "cpu": "0.25", "ram": "64MiB", "storage": "32M",
                                           "min_idle": 1, "max_size": 2, "runtime": "runsc"}]}))
    (tier,) = load_tiers_file(path)
    assert tier.name == "tiny" and tier.resources.ram_bytes == 64 * MIB and tier.runtime == "runsc"


@pytest.mark.parametrize("entry", [{"name": "x", "ram": "lots"}, {"name": "x", "color": "red"}, {"cpu": 1},
                                   {"name": "x", "min_idle": 5, "max_size": 2}])
def test_bad_tiers_file_entries_are_named(tmp_path, entry):
    path = tmp_path / "tiers.json"
    path.write_text(json.dumps({"tiers": [entry]}))
    with pytest.raises(InvalidRequest) as info:
        load_tiers_file(path)
    assert info.value.field.startswith("tiers[0]")


def test_ledger_never_overcommits_memory():
    ledger = CapacityLedger(HostInventory(cpus=2, ram_bytes=GIB, cpu_overcommit=8))
    small = Resources(1, 0, 512 * MIB, MIB)
    ledger.reserve(small)
    ledger.reserve(small)
    with pytest.raises(CapacityError, match="memory"):
        ledger.reserve(small)
    ledger.release(small)
    ledger.reserve(small)


def test_ledger_bounds_cpu_by_overcommit():
    ledger = CapacityLedger(HostInventory(cpus=2, ram_bytes=100 * GIB, cpu_overcommit=1.5))
    ledger.reserve(Resources(2, 0, MIB, MIB))
    with pytest.raises(CapacityError, match="cpu"):
        ledger.reserve(Resources(1.5, 0, MIB, MIB))


def test_ledger_hands_out_each_gpu_once():
    ledger = CapacityLedger(HostInventory(cpus=8, ram_bytes=100 * GIB, gpu_ids=("GPU-a", "GPU-b")))
    one = Resources(1, 1, MIB, MIB)
    first, second = ledger.reserve(one), ledger.reserve(one)
    assert {*first, *second} == {"GPU-a", "GPU-b"}
    with pytest.raises(CapacityError, match="gpu"):
        ledger.reserve(one)
    ledger.release(one, first)
    assert ledger.reserve(one) == first


def test_default_tiers_fit_a_two_core_24_gib_host():
    ledger = CapacityLedger(HostInventory(cpus=2, ram_bytes=22 * GIB, cpu_overcommit=16))
    ledger.check_plan([(t.resources, t.max_size) for t in default_tiers()])


def test_tiers_serve_a_known_image_and_requests_fit_within_their_image(tmp_path):
    from pool.settings import from_env

    path = tmp_path / "tiers.json"
    path.write_text(json.dumps({"tiers": [{"name": "a", "ram": "64MiB"}, {"name": "r", "image": "r-lang"}]}))
    with pytest.raises(InvalidRequest) as caught:
        from_env({"WARMPOOL_TIERS_FILE": str(path)})
    assert caught.value.field == "tiers[1].image" and "'r-lang'" in caught.value.message
    tiers = (Tier("py", Resources(1, 0, GIB, GIB)), Tier("ds-small", Resources(1, 0, GIB, GIB), image="datascience"),
             Tier("ds-big", Resources(2, 0, 4 * GIB, GIB), image="datascience"))
    assert fit_tier(tiers, ResourceRequest()).name == "py"
    assert fit_tier(tiers, ResourceRequest(), "datascience").name == "ds-small"
    assert fit_tier(tiers, ResourceRequest(ram_bytes=2 * GIB), "datascience").name == "ds-big"
    with pytest.raises(NoTierFits) as too_big:
        fit_tier(tiers, ResourceRequest(ram_bytes=2 * GIB))  # the python tiers' largest is 1 GiB
    assert too_big.value.field == "resources.ram" and "1GiB" in too_big.value.message
    with pytest.raises(NoTierFits) as unserved:
        fit_tier(tiers, ResourceRequest(), "ml")
    assert unserved.value.field == "image"


def test_a_container_serves_ten_thousand_tasks_unless_the_tier_says_otherwise():
    # Replacing a container is a docker run that stalls running tasks on a small host (tiers.py says what
    # was measured); every built-in tier and every tiers-file entry without max_uses keeps the default.
    assert DEFAULT_MAX_USES == 10_000
    assert {tier.max_uses for tier in default_tiers()} == {DEFAULT_MAX_USES}
    plain = tier_from_dict({"name": "t", "cpu": 1, "ram": "64MiB", "storage": "32MiB"}, 0)
    assert plain.max_uses == DEFAULT_MAX_USES
    assert tier_from_dict({"name": "t", "cpu": 1, "ram": "64MiB", "storage": "32MiB", "max_uses": 1}, 0).max_uses == 1
