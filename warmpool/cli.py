"""The `warmpool` command: `serve` (the HTTP API), `worker` (a Redis worker), `image` (the sandbox images),
`service-image` (the image the deployments run), `run` (run a file on a server) and `mcp` (an MCP server
over stdio, for agents, talking to a server)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import docker

DEFAULT_IMAGE = "warmpool-runner:latest"
DEFAULT_BASE_IMAGE = "warmpool-base:bookworm"


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run one subcommand; exits non-zero with a message on failure."""
    parser = argparse.ArgumentParser(prog="warmpool", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP API (uvicorn)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)

    worker = sub.add_parser("worker", help="run a worker that takes tasks from Redis (WARMPOOL_REDIS_URL)")
    worker.add_argument("--metrics-port", type=int, metavar="N",
                        help="serve the worker's /metrics and /healthz on this port (default: none)")
    worker.add_argument("--metrics-host", default="127.0.0.1",
                        help="address for --metrics-port (default 127.0.0.1; 0.0.0.0 for a scraper elsewhere)")

    image = sub.add_parser("image", help="build the sandbox images that are missing or stale; print their ids")
    image.add_argument("--force", action="store_true", help="rebuild even if an image is up to date")
    image.add_argument("--only", action="append", metavar="NAME",
                       help="build only this image (python, datascience, or one of the tiers file); repeatable")
    image.add_argument("--image", help="docker tag of the `python` image (default: WARMPOOL_IMAGE or "
                       f"{DEFAULT_IMAGE})")
    image.add_argument("--base", default=os.environ.get("WARMPOOL_BASE_IMAGE") or DEFAULT_BASE_IMAGE)

    service = sub.add_parser("service-image", help="build the image the deployments run (API, worker, Redis) "
                             "from wheels and Debian packages fetched here; no registry")
    service.add_argument("--tag", default="warmpool-service:latest")
    service.add_argument("--base", default=os.environ.get("WARMPOOL_BASE_IMAGE") or DEFAULT_BASE_IMAGE)

    from warmpool import run_cmd

    run_cmd.add_parser(sub)
    sub.add_parser("mcp", help="serve warmpool's tools over MCP on stdio, against WARMPOOL_URL (WARMPOOL_API_KEY)")

    args = parser.parse_args(argv)
    # The client commands keep stderr for the task's own output and real trouble (and stdout, for mcp, for
    # the protocol): no INFO lines there, e.g. httpx's line per request.
    client_side = args.command in ("run", "mcp")
    logging.basicConfig(level=logging.WARNING if client_side else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "run":
        sys.exit(run_cmd.main(args))
    elif args.command == "mcp":
        from warmpool.mcp.stdio import main as mcp_main

        mcp_main()
    elif args.command == "serve":
        _serve(args.host, args.port)
    elif args.command == "worker":
        _worker(args.metrics_host, args.metrics_port)
    elif args.command == "service-image":
        _service_image(args.tag, args.base)
    else:
        _image(args.only, args.image, args.base, args.force)


def _serve(host: str, port: int) -> None:
    import uvicorn

    from api.app import create_app
    from api.edge import EdgeLimits, effective_max_connections, protocol_class, raise_nofile_limit
    from pool.model.errors import InvalidRequest
    from pool.settings import from_env

    try:
        settings = from_env()
    except (InvalidRequest, OSError, ValueError) as exc:
        sys.exit(f"warmpool serve: bad settings: {exc}")
    if not settings.api_keys and not is_loopback(host):
        sys.exit(f"warmpool serve: refusing to listen on {host}: WARMPOOL_API_KEYS is not set, so anyone who "
                 f"can reach this address could run code here. Set WARMPOOL_API_KEYS (comma-separated bearer "
                 f"tokens), or serve on loopback (--host 127.0.0.1).")
    if not settings.api_keys:
        logging.getLogger("warmpool").warning("no WARMPOOL_API_KEYS: serving on loopback only (%s:%d), "
                                              "without authentication", host, port)
    # The HTTP edge (api/edge.py): uvicorn's own keep-alive timeout, plus the header cap, read timeout
    # and connection cap it lacks, on its httptools protocol. The cap stays below the open-file limit,
    # raised to its hard value first, with room for every container's attached socket.
    nofile = raise_nofile_limit()
    max_connections = effective_max_connections(settings.max_connections, nofile,
                                                 container_sockets=sum(t.max_size for t in settings.tiers))
    if max_connections < settings.max_connections:
        logging.getLogger("warmpool").warning(
            "WARMPOOL_MAX_CONNECTIONS=%d does not fit the open-file limit (%d): using %d",
            settings.max_connections, nofile, max_connections)
    limits = EdgeLimits(max_header_bytes=settings.max_header_bytes,
                        request_read_timeout_s=settings.request_read_timeout_s, max_connections=max_connections)
    # No access log: a log line per task costs more than the rest of the request path on a busy server.
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", access_log=False,
                http=protocol_class(limits), timeout_keep_alive=settings.keep_alive_timeout_s)  # type: ignore[arg-type]


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (a name other than localhost could resolve anywhere)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _worker(metrics_host: str, metrics_port: int | None) -> None:
    from pool.scaleout.worker import main as worker_main

    if metrics_port is None:
        worker_main()
        return
    if not 0 < metrics_port < 65536:
        sys.exit(f"warmpool worker: --metrics-port must be between 1 and 65535, got {metrics_port}")
    from warmpool.worker_http import metrics_sidecar

    worker_main(metrics_sidecar(metrics_host, metrics_port))


def _image(only: list[str] | None, python_tag: str | None, base_image: str, force: bool) -> None:
    from pool.model import images as catalogue
    from pool.model.errors import InvalidRequest
    from runner_image.build import ImageBuildError, ensure_image

    try:
        specs = catalogue.from_env({**os.environ, **({"WARMPOOL_IMAGE": python_tag} if python_tag else {})})
    except InvalidRequest as exc:
        sys.exit(f"warmpool image: bad image configuration: {exc}")
    names = [spec.name for spec in specs]
    if unknown := set(only or ()) - set(names):
        sys.exit(f"warmpool image: unknown image(s) {sorted(unknown)}; known: {names}")
    client = _docker_client("image")
    try:
        for spec in specs:
            if not only or spec.name in only:
                print(spec.name, spec.docker_image, ensure_image(client, spec, base_image=base_image, force=force),
                      flush=True)
    except ImageBuildError as exc:
        sys.exit(f"warmpool image: {exc}")
    finally:
        client.close()


def _service_image(tag: str, base_image: str) -> None:
    from runner_image.build import ImageBuildError
    from warmpool.service_image import build_service_image

    client = _docker_client("service-image")
    try:
        print(tag, build_service_image(client, tag, base_image), flush=True)
    except ImageBuildError as exc:
        sys.exit(f"warmpool service-image: {exc}")
    finally:
        client.close()


def _docker_client(command: str) -> docker.DockerClient:
    import docker
    import docker.errors

    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        sys.exit(f"warmpool {command}: no Docker engine answers ({exc}); start one (make docker) and retry")
    return client
