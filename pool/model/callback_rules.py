"""Callback rules (pure, no I/O): which URLs and addresses a callback may reach, its signature, its retries.

Server-side request forgery is the risk: a client names a URL and the server POSTs to it from inside the
operator's network. So a callback may only reach what `WARMPOOL_CALLBACK_ALLOW` lists, and the check is
made on the address actually connected to, not on the name in the URL:

- a CIDR (or a single address) entry allows connecting to any address inside it, whatever name led there;
- a host-name entry allows URLs naming that host, but only while the name resolves to public addresses:
  a listed name that resolves (or is re-pointed) to loopback, private, link-local or other special
  addresses is refused unless a CIDR entry covers that address too.

The sender resolves the name once per attempt, checks every address it got, connects to a checked address
and sends the URL's host in the Host header (and as the TLS server name), so a DNS answer that changes
between the check and the connection cannot move it elsewhere. Redirects are never followed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from pool.model.errors import InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_CHARS = 2048
SIGNATURE_HEADER = "X-Warmpool-Signature"
# Waits before each retry; the sum (~61 s) is "about a minute", and the window setting cuts it shorter.
RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)


@dataclass(frozen=True)
class Target:
    """Where one callback goes: what to connect to and what to say in the request line and Host header."""

    scheme: str
    host: str  # lower-case name or address, without brackets
    port: int
    path: str  # path and query, at least "/"
    ip_literal: bool

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def url_for(self, address: IPAddress) -> str:
        """The URL with the checked address in place of the name (the Host header keeps the name)."""
        shown = f"[{address}]" if address.version == 6 else str(address)
        return f"{self.scheme}://{shown}:{self.port}{self.path}"


def normalized(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (::ffff:10.0.0.1) is checked as the IPv4 address it reaches."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class CallbackPolicy:
    """The allowlist, parsed: host names and networks."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: tuple[str, ...]) -> CallbackPolicy:
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in entries:
            text = entry.strip().lower()
            try:
                networks.append(ipaddress.ip_network(text.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if not _is_host_name(text):
                raise InvalidRequest("WARMPOOL_CALLBACK_ALLOW",
                                     f"{entry!r} is neither a host name nor an address or CIDR")
            hosts.add(text.rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    @property
    def enabled(self) -> bool:
        return bool(self.hosts or self.networks)

    def target(self, url: str) -> Target:
        """The URL's target, if its form is acceptable; ValueError says what is wrong (no resolution here)."""
        if not self.enabled:
            raise ValueError("callbacks are disabled on this server (WARMPOOL_CALLBACK_ALLOW is empty)")
        if len(url) > MAX_URL_CHARS:
            raise ValueError(f"at most {MAX_URL_CHARS} characters")
        if any(ord(c) < 33 or ord(c) == 127 for c in url):
            raise ValueError("must not contain spaces or control characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"not a valid URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry a user name or password")
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise ValueError("names no host")
        literal = _address(host)
        if literal is None and not _is_host_name(host):
            raise ValueError(f"{host!r} is not a valid host name")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return Target(scheme=scheme, host=host, port=port or (443 if scheme == "https" else 80), path=path,
                      ip_literal=literal is not None)

    def refusal(self, target: Target, address: IPAddress) -> str | None:
        """Why connecting to `address` for `target` is not allowed, or None when it is."""
        address = normalized(address)
        if any(address in network for network in self.networks):
            return None
        if not target.ip_literal and target.host in self.hosts:
            if address.is_global and not address.is_multicast:
                return None
            return (f"{target.host} resolves to {address}, a non-public address that no CIDR in "
                    "WARMPOOL_CALLBACK_ALLOW covers")
        if target.ip_literal or not self.networks:
            return f"{target.host} is not in WARMPOOL_CALLBACK_ALLOW"
        return f"{target.host} resolves to {address}, which WARMPOOL_CALLBACK_ALLOW does not cover"

    def needs_resolution(self, target: Target) -> bool:
        """A listed host name is checked when sent (its addresses may change); anything else is checked now too."""
        return not target.ip_literal and target.host not in self.hosts


def _address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _is_host_name(text: str) -> bool:
    labels = text.rstrip(".").split(".")
    return bool(text) and len(text) <= 253 and all(
        0 < len(label) <= 63 and label[0] != "-" and label[-1] != "-"
        and all(c.isascii() and (c.isalnum() or c in "-_") for c in label) for label in labels)


def signature(secret: str, body: bytes) -> str:
    """The X-Warmpool-Signature value: `sha256=` and the hex HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def next_delay_s(attempts_made: int, age_s: float, window_s: float) -> float | None:
    """Seconds before the next attempt, or None to give up (the retry window is spent, or the schedule)."""
    if attempts_made < 1 or attempts_made > len(RETRY_DELAYS_S):
        return None
    delay_s = RETRY_DELAYS_S[attempts_made - 1]
    return delay_s if age_s + delay_s <= window_s else None
