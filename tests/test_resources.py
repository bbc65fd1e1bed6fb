"""Parsing of request resources: units as Docker reads them, and errors that name the field."""

import math

import pytest

from pool.model.errors import InvalidRequest
from pool.model.resources import parse_bytes, parse_request

KIB, MIB, GIB, TIB = 1024, 1024**2, 1024**3, 1024**4


@pytest.mark.parametrize(("text", "expected"), [
    ("512MB", 512 * MIB), ("512M", 512 * MIB), ("512m", 512 * MIB), ("512MiB", 512 * MIB),
    ("1GB", GIB), ("1g", GIB), ("1GiB", GIB), ("2T", 2 * TIB), ("64k", 64 * KIB), ("64KB", 64 * KIB),
    ("1024", 1024), ("1024b", 1024), ("1.5G", int(1.5 * GIB)), (" 10 MB ", 10 * MIB), (4096, 4096),
])
def test_sizes_read_like_docker_flags(text, expected):
    assert parse_bytes("resources.ram", text) == expected


@pytest.mark.parametrize("bad", ["lots", "1XB", "", "MB", "-1G", "1 G B", "0", 0, -5, "1e3M", True, [], "iB",
                                 "NaN", "inf", 1.5])
def test_bad_sizes_are_refused_with_the_field_named(bad):
    with pytest.raises(InvalidRequest) as info:
        parse_bytes("resources.storage", bad)
    assert info.value.field == "resources.storage"


def test_seed_request_parses():
    request = parse_request({"cpu": "2", "gpu": "0", "ram": "512MB", "storage": "1GB"})
    assert request.cpu == 2.0 and request.gpu == 0
    assert request.ram_bytes == 512 * MIB and request.storage_bytes == GIB


def test_every_field_is_optional():
    request = parse_request({})
    assert request.cpu is None and request.gpu == 0 and request.ram_bytes is None
    assert parse_request(None) == request


@pytest.mark.parametrize(("raw", "field"), [
    ({"cpu": "-1"}, "resources.cpu"), ({"cpu": "NaN"}, "resources.cpu"), ({"cpu": 0}, "resources.cpu"),
    ({"cpu": math.inf}, "resources.cpu"), ({"cpu": "two"}, "resources.cpu"), ({"gpu": "0.5"}, "resources.gpu"),
    ({"gpu": -1}, "resources.gpu"), ({"ram": "lots"}, "resources.ram"), ({"storage": "1XB"}, "resources.storage"),
])
def test_bad_fields_are_named(raw, field):
    with pytest.raises(InvalidRequest) as info:
        parse_request(raw)
    assert info.value.field == field


def test_numbers_and_numeric_strings_both_work():
    assert parse_request({"cpu": 0.5}).cpu == 0.5
    assert parse_request({"cpu": "0.5"}).cpu == 0.5
    assert parse_request({"gpu": 2}).gpu == 2
