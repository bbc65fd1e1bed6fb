"""warmpool's tools for agents, as an MCP server (the `mcp` SDK's `MCPServer`), over the Python client.

The same tools serve `warmpool mcp` (stdio, one client to WARMPOOL_URL) and `/mcp` on the API
(streamable HTTP, a client into the app itself with the caller's own key): a `ClientSource` gives each
tool call the client to use. Results are structured content (status, exit code, stdout, stderr, files),
with a text summary for clients that only read text, and every PNG/JPEG/GIF the task returned (such as
a datascience task's matplotlib figures) as image content.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, ContentBlock, ImageContent, TextContent
from pydantic import BaseModel, Field

from warmpool.client import AsyncClient, ExecuteResult, WarmpoolError

ClientSource = Callable[[Context], AbstractAsyncContextManager[AsyncClient]]
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif"}
INSTRUCTIONS = ("Runs Python in warm, isolated sandboxes (no network). run_python runs a snippet once; "
                "open_session keeps one interpreter whose variables, imports and files persist between "
                "session_run calls (close it when done). Ask for resources (cpu, ram such as '512MB'), an image "
                "(list_images: e.g. 'datascience' has numpy, pandas, matplotlib; figures come back as images), "
                "files to write before the code runs, and output globs to bring files back.")


class FileIn(BaseModel):
    path: str = Field(description="Relative path in the task's working directory, e.g. data/in.csv")
    content: str
    encoding: Literal["utf-8", "base64"] = "utf-8"


class FileOut(BaseModel):
    path: str
    size_bytes: int
    encoding: Literal["utf-8", "base64"] | None = Field(
        default=None, description="None when the content is not here: an image (see the image content), or "
                                  "past the server's cap")
    content: str | None = None


class RunOutput(BaseModel):
    status: str = Field(description="succeeded, failed, timed_out, memory_exceeded, output_limit_exceeded or "
                                    "sandbox_error")
    exit_code: int | None
    stdout: str
    stderr: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    message: str = ""
    tier: str = ""
    image: str = ""
    files: list[FileOut] = Field(default_factory=list)
    files_truncated: bool = False


class SessionOut(BaseModel):
    session_id: str
    tier: str
    image: str
    idle_timeout_s: float
    resources: dict[str, Any] = Field(default_factory=dict)


def build_server(source: ClientSource, **server_options: Any) -> MCPServer:
    """The MCP server with warmpool's tools; each call gets its client from `source`."""
    server = MCPServer("warmpool", instructions=INSTRUCTIONS, **server_options)

    @server.tool(description="Run a Python snippet in a fresh sandbox and return its result. Resources: cpu "
                             "(e.g. 0.5), gpu, ram and storage (e.g. '512MB'). files are written before the code "
                             "runs; outputs are globs of files to bring back.")
    async def run_python(ctx: Context, code: str, cpu: float | None = None, gpu: int | None = None,
                         ram: str | None = None, storage: str | None = None, image: str | None = None,
                         timeout_s: float | None = None, stdin: str | None = None,
                         files: list[FileIn] | None = None,
                         outputs: list[str] | None = None) -> Annotated[CallToolResult, RunOutput]:
        async with source(ctx) as client, api_errors():
            result = await client.execute(code, cpu=cpu, gpu=gpu, ram=ram, storage=storage, image=image,
                                          timeout_s=timeout_s, stdin=stdin, files=file_entries(files),
                                          outputs=outputs)
        return tool_result(result)

    @server.tool(description="Open a session: a sandbox kept for you, whose variables, imports and files "
                             "persist from one session_run to the next. Close it with close_session.")
    async def open_session(ctx: Context, cpu: float | None = None, gpu: int | None = None, ram: str | None = None,
                           storage: str | None = None, image: str | None = None,
                           idle_timeout_s: float | None = None) -> SessionOut:
        resources = {k: v for k, v in (("cpu", cpu), ("gpu", gpu), ("ram", ram), ("storage", storage)) if v is not None}
        async with source(ctx) as client, api_errors():
            session = await client.open_session(resources or None, image=image, idle_timeout_s=idle_timeout_s)
        info = session.info
        return SessionOut(session_id=info.id, tier=info.tier, image=info.image, idle_timeout_s=info.idle_timeout_s,
                          resources=info.resources)

    @server.tool(description="Run code in an open session; it sees what earlier calls of the session left.")
    async def session_run(ctx: Context, session_id: str, code: str, timeout_s: float | None = None,
                          stdin: str | None = None, files: list[FileIn] | None = None,
                          outputs: list[str] | None = None) -> Annotated[CallToolResult, RunOutput]:
        async with source(ctx) as client, api_errors():
            result = await client.attach_session(session_id).execute(
                code, timeout_s=timeout_s, stdin=stdin, files=file_entries(files), outputs=outputs)
        return tool_result(result)

    @server.tool(description="Close a session; its sandbox is cleaned for whoever comes next.")
    async def close_session(ctx: Context, session_id: str) -> dict[str, Any]:
        async with source(ctx) as client, api_errors():
            await client.attach_session(session_id).close()
        return {"session_id": session_id, "closed": True}

    @server.tool(description="The sandbox images: name, Python version, packages and what is preloaded.")
    async def list_images(ctx: Context) -> list[dict[str, Any]]:
        async with source(ctx) as client, api_errors():
            return await client.images()

    @server.tool(description="The resource tiers (cpu, gpu, ram, storage of each) with their live container "
                             "counts: a request runs on the smallest tier that covers it.")
    async def list_tiers(ctx: Context) -> list[dict[str, Any]]:
        async with source(ctx) as client, api_errors():
            return await client.tiers()

    return server


def file_entries(files: list[FileIn] | None) -> list[dict[str, Any]] | None:
    return None if files is None else [f.model_dump() for f in files]


@asynccontextmanager
async def api_errors() -> AsyncIterator[None]:
    """An HTTP error from warmpool becomes the tool's error, saying what the server said."""
    try:
        yield
    except WarmpoolError as exc:
        raise ToolError(f"warmpool refused: {exc}" if exc.status else f"warmpool unreachable: {exc}") from exc


def tool_result(result: ExecuteResult) -> CallToolResult:
    """Structured content, a text summary, and the images among the returned files."""
    files: list[FileOut] = []
    images: list[ContentBlock] = []
    for returned in result.files:
        mime = IMAGE_TYPES.get(_suffix(returned.path))
        if returned.content is not None and mime:
            images.append(ImageContent(data=base64.b64encode(returned.content).decode(), mime_type=mime))
            files.append(FileOut(path=returned.path, size_bytes=returned.size_bytes))
        elif returned.content is not None:
            files.append(_file_out(returned.path, returned.size_bytes, returned.content))
        else:
            files.append(FileOut(path=returned.path, size_bytes=returned.size_bytes))
    output = RunOutput(status=result.status, exit_code=result.exit_code, stdout=result.stdout, stderr=result.stderr,
                       stdout_truncated=result.stdout_truncated, stderr_truncated=result.stderr_truncated,
                       message=result.message, tier=result.tier, image=result.image, files=files,
                       files_truncated=result.files_truncated)
    summary = f"status: {result.status} (exit code {result.exit_code})"
    if result.message:
        summary += f"\nmessage: {result.message}"
    summary += f"\nstdout:\n{result.stdout}" if result.stdout else "\nstdout: (empty)"
    if result.stderr:
        summary += f"\nstderr:\n{result.stderr}"
    if files:
        summary += "\nfiles: " + ", ".join(f"{f.path} ({f.size_bytes} bytes)" for f in files)
    return CallToolResult(content=[TextContent(text=summary), *images],
                          structured_content=output.model_dump(mode="json"))


def _file_out(path: str, size_bytes: int, content: bytes) -> FileOut:
    try:
        return FileOut(path=path, size_bytes=size_bytes, encoding="utf-8", content=content.decode())
    except UnicodeDecodeError:
        return FileOut(path=path, size_bytes=size_bytes, encoding="base64", content=base64.b64encode(content).decode())


def _suffix(path: str) -> str:
    dot = path.rfind(".")
    return path[dot:].lower() if dot > path.rfind("/") else ""

