"""A client generated from the OpenAPI document (openapi-python-client, offline) works against the app in
process: it sends the key (the bearer scheme), and reads the answers and the error bodies as typed models."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from api.app import create_app
from pool.settings import from_env
from tests.conftest import TEST_TIERS
from tests.inprocess import embedded_over_fake

KEYS = {"WARMPOOL_API_KEYS": "alice", "WARMPOOL_ADMIN_KEY": "root-key"}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The package `warmpool_client`, generated from the app's document into a temporary folder."""
    where = tmp_path_factory.mktemp("generated")
    (where / "openapi.json").write_text(json.dumps(create_app(from_env(KEYS)).openapi()))
    (where / "config.json").write_text(json.dumps({"post_hooks": [], "project_name_override": "warmpool-client",
                                                   "package_name_override": "warmpool_client"}))
    done = subprocess.run([str(Path(sys.executable).with_name("openapi-python-client")), "generate", "--path",
                           "openapi.json", "--config", "config.json", "--meta", "none", "--fail-on-warning"],
                          cwd=where, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    sys.path.insert(0, str(where))
    try:
        yield importlib.import_module("warmpool_client")
    finally:
        sys.path.remove(str(where))
        for name in [n for n in sys.modules if n == "warmpool_client" or n.startswith("warmpool_client.")]:
            del sys.modules[name]


@pytest.mark.anyio
async def test_a_generated_client_sends_the_key_and_reads_typed_answers(generated, tmp_path: Path):
    client_mod = importlib.import_module("warmpool_client.client")
    execute = importlib.import_module("warmpool_client.api.tasks.execute")
    list_tiers = importlib.import_module("warmpool_client.api.catalogue.list_tiers")
    get_pools = importlib.import_module("warmpool_client.api.admin.get_pools")
    models = importlib.import_module("warmpool_client.models")
    async with embedded_over_fake(tmp_path, TEST_TIERS, KEYS) as (_, _backend, app):
        def client(token: str | None) -> object:
            args = {"base_url": "http://warmpool.test", "httpx_args": {"transport": httpx.ASGITransport(app=app)}}
            return client_mod.AuthenticatedClient(token=token, **args) if token else client_mod.Client(**args)

        request = models.ExecuteRequest(code="print('Hello, World!')", resources=models.ResourcesIn(
            cpu="1", gpu=0, ram="200MB", storage=104857600))
        answer = await execute.asyncio_detailed(client=client("alice"), body=request)
        assert answer.status_code == 200 and isinstance(answer.parsed, models.ExecuteResponse)
        assert answer.parsed.stdout == "Hello, World!\n" and answer.parsed.tier == "two"
        assert answer.parsed.resources.ram_bytes == 256 * 1024**2
        missing = await execute.asyncio_detailed(client=client(None), body=request)
        assert missing.status_code == 401 and isinstance(missing.parsed, models.ErrorOut)
        invalid = await execute.asyncio_detailed(client=client("alice"), body=models.ExecuteRequest(
            code="x", resources=models.ResourcesIn(ram="lots")))
        assert invalid.status_code == 422 and isinstance(invalid.parsed, models.ValidationErrorOut)
        assert invalid.parsed.detail[0].loc == ["body", "resources", "ram"]
        tiers = await list_tiers.asyncio(client=client("alice"))
        assert [tier.name for tier in tiers] == ["one", "two"]
        pools = await get_pools.asyncio(client=client("root-key"))
        assert isinstance(pools, models.PoolsOut) and [t.name for t in pools.tiers] == ["one", "two"]
