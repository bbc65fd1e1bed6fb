"""The MCP tools, through the `mcp` SDK's own client, against a real server: `warmpool mcp` on stdio, and
/mcp on the API over streamable HTTP with the API's keys."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import REPO, TEST_TIERS

pytestmark = pytest.mark.docker

TOOLS = {"run_python", "open_session", "session_run", "close_session", "list_images", "list_tiers"}
FAILING = "import sys; print('to stdout'); print('to stderr', file=sys.stderr); raise SystemExit(2)"


@asynccontextmanager
async def over_stdio(base_url: str, api_key: str | None = None) -> AsyncIterator[Client]:
    env = {**os.environ, "WARMPOOL_URL": base_url, **({"WARMPOOL_API_KEY": api_key} if api_key else {})}
    params = StdioServerParameters(command=sys.executable, args=["-m", "warmpool", "mcp"], env=env, cwd=REPO)
    async with Client(params, read_timeout_seconds=120) as client:
        yield client


@asynccontextmanager
async def over_http(base_url: str, api_key: str) -> AsyncIterator[Client]:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}, timeout=120) as http, \
            Client(streamable_http_client(f"{base_url}/mcp", http_client=http), read_timeout_seconds=120) as client:
        yield client


def talk(connect: AbstractAsyncContextManager[Client], check: Callable[[Client], Awaitable[None]]) -> None:
    async def main() -> None:
        async with connect as client:
            await check(client)
    anyio.run(main)


def text_of(result: Any) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


async def runs_python_and_lists_tiers(client: Client) -> None:
    tools = (await client.list_tools()).tools
    assert {t.name for t in tools} == TOOLS
    run_tool = next(t for t in tools if t.name == "run_python")
    assert {"status", "stdout", "stderr", "files"} <= set(run_tool.output_schema["properties"])
    assert {"code", "cpu", "ram", "image", "files", "outputs"} <= set(run_tool.input_schema["properties"])

    result = await client.call_tool("run_python", {"code": FAILING, "ram": "64MiB"})
    assert not result.is_error, text_of(result)
    structured = result.structured_content
    assert (structured["status"], structured["exit_code"], structured["stdout"], structured["stderr"]) == (
        "failed", 2, "to stdout\n", "to stderr\n")
    assert structured["tier"] == "one" and structured["files"] == []
    assert "status: failed (exit code 2)" in text_of(result) and "to stdout" in text_of(result)

    refused = await client.call_tool("run_python", {"code": "print(1)", "ram": "lots"})
    assert refused.is_error and "resources.ram" in text_of(refused) and "422" in text_of(refused)

    tiers = await client.call_tool("list_tiers", {})
    assert not tiers.is_error
    assert [t["name"] for t in tiers.structured_content["result"]] == ["one", "two"]


def test_stdio_mcp_runs_python_and_lists_tiers(serve):
    svc = serve()
    talk(over_stdio(svc.base_url), runs_python_and_lists_tiers)
    # Without keys the API's own /mcp refuses a Host that is not loopback (DNS rebinding from a web page).
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    rebound = httpx.post(f"{svc.base_url}/mcp", json=initialize,
                         headers={"Host": "evil.example", "Accept": "application/json, text/event-stream"})
    assert rebound.status_code == 421


def test_http_mcp_on_the_api_with_the_same_keys(serve):
    svc = serve(env={"WARMPOOL_API_KEYS": "agent-key,other-key"})
    talk(over_http(svc.base_url, "agent-key"), runs_python_and_lists_tiers)
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    headers = {"Accept": "application/json, text/event-stream"}
    assert httpx.post(f"{svc.base_url}/mcp", json=initialize, headers=headers).status_code == 401
    wrong = httpx.post(f"{svc.base_url}/mcp", json=initialize, headers={**headers, "Authorization": "Bearer nope"})
    assert wrong.status_code == 403


def test_stdio_mcp_reports_an_unreachable_server(serve):
    async def check(client: Client) -> None:
        result = await client.call_tool("run_python", {"code": "print(1)"})
        assert result.is_error and "unreachable" in text_of(result)
    talk(over_stdio("http://127.0.0.1:9"), check)


def test_mcp_files_outputs_images_and_figures(serve):
    ds_tier = {"name": "ds", "image": "datascience", "cpu": 1, "ram": "768MiB", "storage": "64MiB", "min_idle": 1,
               "max_size": 1}
    svc = serve(tiers={"tiers": [*TEST_TIERS["tiers"], ds_tier]}, env={"WARMPOOL_API_KEYS": "agent-key"},
                ready_timeout_s=120)

    async def check(client: Client) -> None:
        code = ("import pathlib\n"
                "pathlib.Path('out.txt').write_text(pathlib.Path('in.txt').read_text().upper())\n"
                "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\n")
        result = await client.call_tool("run_python", {
            "code": code, "image": "datascience", "files": [{"path": "in.txt", "content": "shout"}],
            "outputs": ["*.txt"]})
        assert not result.is_error, text_of(result)
        files = {f["path"]: f for f in result.structured_content["files"]}
        assert files["out.txt"]["content"] == "SHOUT" and files["in.txt"]["content"] == "shout"
        assert "figures/figure-1.png" in files
        images = [block for block in result.content if block.type == "image"]
        assert len(images) == 1 and images[0].mime_type == "image/png"
        listed = await client.call_tool("list_images", {})
        assert {"python", "datascience"} <= {i["name"] for i in listed.structured_content["result"]}
    talk(over_http(svc.base_url, "agent-key"), check)


def test_mcp_sessions_keep_state_until_closed(serve):
    svc = serve()

    async def check(client: Client) -> None:
        opened = await client.call_tool("open_session", {"ram": "64MiB"})
        assert not opened.is_error, text_of(opened)
        session_id = opened.structured_content["session_id"]
        first = await client.call_tool("session_run", {"session_id": session_id, "code": "x = 41 + 1"})
        assert first.structured_content["status"] == "succeeded"
        second = await client.call_tool("session_run", {"session_id": session_id, "code": "print(x)"})
        assert second.structured_content["stdout"] == "42\n"
        sent = await client.call_tool("session_run", {"session_id": session_id, "code": "print(open('in.txt').read())",
                                                      "files": [{"path": "in.txt", "content": "kept"}]})
        assert sent.structured_content["stdout"] == "kept\n", text_of(sent)
        back = await client.call_tool("session_run", {"session_id": session_id, "code": "x", "outputs": ["*.txt"]})
        assert [(f["path"], f["content"]) for f in back.structured_content["files"]] == [("in.txt", "kept")]
        closed = await client.call_tool("close_session", {"session_id": session_id})
        assert closed.structured_content["closed"] is True
        gone = await client.call_tool("session_run", {"session_id": session_id, "code": "print(x)"})
        assert gone.is_error and "404" in text_of(gone)
    talk(over_stdio(svc.base_url), check)
