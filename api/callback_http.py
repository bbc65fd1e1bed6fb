"""Sending one callback over HTTP, connected only to an address the allowlist permits.

Each attempt resolves the URL's host once, checks every address it resolved to (`CallbackPolicy.refusal`),
and connects to the first one by address, with the URL's host in the Host header and as the TLS server
name. Nothing else gets a say in where the connection goes: no redirects are followed, and proxies from
the environment (HTTP_PROXY and friends) are ignored, since a proxy would connect on our behalf to
whatever the name resolves to there.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable

import httpx

from pool.model.callback_rules import SIGNATURE_HEADER, CallbackPolicy, IPAddress, Target, signature

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]
RESOLVE_TIMEOUT_S = 5.0


async def resolve_addresses(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (the system resolver, in a thread); an address resolves to itself."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])  # drop an IPv6 zone id
        if address not in found:
            found.append(address)
    return found


async def checked_addresses(policy: CallbackPolicy, target: Target, resolve: Resolver) -> list[IPAddress]:
    """The target's addresses when every one of them is allowed; ValueError says why not."""
    try:
        addresses = await asyncio.wait_for(resolve(target.host, target.port), RESOLVE_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise ValueError(f"cannot resolve {target.host}: {exc or 'timed out'}") from None
    if not addresses:
        raise ValueError(f"{target.host} resolves to no address")
    for address in addresses:
        refusal = policy.refusal(target, address)
        if refusal is not None:
            raise ValueError(refusal)
    return addresses


async def submission_refusal(policy: CallbackPolicy, url: str, resolve: Resolver = resolve_addresses) -> str | None:
    """Why `url` may not be a callback URL, checked when the task is submitted; None when it may.

    A host listed by name is accepted here and checked at each attempt (its addresses may change); any
    other host must resolve now to addresses the allowlist covers, and is checked again at each attempt."""
    try:
        target = policy.target(url)
        if policy.needs_resolution(target) or target.ip_literal:
            await checked_addresses(policy, target, resolve)
    except ValueError as exc:
        return str(exc)
    return None


class CallbackSender:
    """Signs and POSTs callback bodies; one `httpx.AsyncClient`, closed by `aclose()`."""

    def __init__(self, policy: CallbackPolicy, secret: str, attempt_timeout_s: float,
                 resolve: Resolver = resolve_addresses) -> None:
        self.policy = policy
        self.secret = secret
        self.attempt_timeout_s = attempt_timeout_s
        self.resolve = resolve
        self.client = httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                        timeout=httpx.Timeout(attempt_timeout_s))

    async def aclose(self) -> None:
        await self.client.aclose()

    async def send(self, url: str, body: bytes, task_id: str, attempt: int) -> bool:
        """One attempt; True when the receiver answered 2xx. Every failure is logged and is False."""
        try:
            async with asyncio.timeout(self.attempt_timeout_s):
                return await self._send(url, body, task_id, attempt)
        except TimeoutError:
            log.info("callback of task %s (attempt %d): no answer within %g s", task_id, attempt,
                     self.attempt_timeout_s)
            return False

    async def _send(self, url: str, body: bytes, task_id: str, attempt: int) -> bool:
        try:
            target = self.policy.target(url)
            address = (await checked_addresses(self.policy, target, self.resolve))[0]
        except ValueError as exc:
            log.warning("callback of task %s (attempt %d) not sent: %s", task_id, attempt, exc)
            return False
        headers = {"Host": target.host_header, "Content-Type": "application/json",
                   "User-Agent": "warmpool-callback/1", SIGNATURE_HEADER: signature(self.secret, body),
                   "X-Warmpool-Task-Id": task_id, "X-Warmpool-Attempt": str(attempt)}
        extensions = {"sni_hostname": target.host} if target.scheme == "https" and not target.ip_literal else {}
        request = self.client.build_request("POST", target.url_for(address), content=body, headers=headers,
                                            extensions=extensions)
        try:
            response = await self.client.send(request, stream=True)  # the receiver's body is never read
            await response.aclose()
        except httpx.HTTPError as exc:
            log.info("callback of task %s (attempt %d) to %s failed: %s", task_id, attempt, target.host_header,
                     exc or type(exc).__name__)
            return False
        if 200 <= response.status_code < 300:
            return True
        log.info("callback of task %s (attempt %d) to %s answered %d%s", task_id, attempt, target.host_header,
                 response.status_code, " (redirects are not followed)" if response.is_redirect else "")
        return False
