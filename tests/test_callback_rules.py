"""Callback rules (pure) and the sender's connection checks, with a resolver of the test's own and a real
loopback receiver: the connection goes to the checked address, whatever the name resolves to later."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress

import pytest

from api.callback_http import CallbackSender, submission_refusal
from pool.model.callback_rules import RETRY_DELAYS_S, CallbackPolicy, next_delay_s, signature
from pool.model.errors import InvalidRequest
from pool.model.fair_queue import FairQueue
from tests.callback_receiver import receiver  # noqa: F401 - a fixture

ip = ipaddress.ip_address


def test_the_allowlist_reads_hosts_and_networks_and_refuses_garbage():
    policy = CallbackPolicy.parse(("Hooks.Example.com", "10.0.0.0/8", "127.0.0.2", "[::1]", "fd00::/8"))
    assert policy.hosts == {"hooks.example.com"} and len(policy.networks) == 4
    for bad in ("not a host!", "10.0.0.0/33", "-bad.example", "a..b"):
        with pytest.raises(InvalidRequest):
            CallbackPolicy.parse((bad,))
    assert not CallbackPolicy.parse(()).enabled


def test_targets_and_what_each_address_may_reach():
    policy = CallbackPolicy.parse(("hooks.example.com", "127.0.0.2/32"))
    target = policy.target("https://Hooks.Example.com/cb?a=1")
    assert (target.scheme, target.host, target.port, target.path) == ("https", "hooks.example.com", 443, "/cb?a=1")
    assert target.host_header == "hooks.example.com" and not policy.needs_resolution(target)
    assert target.url_for(ip("93.184.216.34")) == "https://93.184.216.34:443/cb?a=1"
    assert policy.refusal(target, ip("93.184.216.34")) is None, "a listed name at a public address"
    assert "non-public" in (policy.refusal(target, ip("192.168.1.5")) or ""), "a listed name re-pointed inside"
    assert "non-public" in (policy.refusal(target, ip("::ffff:127.0.0.1")) or "")
    assert policy.refusal(target, ip("127.0.0.2")) is None, "an address a CIDR entry covers"

    literal = policy.target("http://127.0.0.2:8080")
    assert literal.ip_literal and literal.host_header == "127.0.0.2:8080" and literal.path == "/"
    assert policy.refusal(literal, ip("127.0.0.2")) is None
    other = policy.target("http://elsewhere.example/")
    assert policy.needs_resolution(other) and policy.refusal(other, ip("93.184.216.34")) is not None
    assert policy.refusal(other, ip("::ffff:127.0.0.2")) is None, "mapped IPv6 is checked as its IPv4"
    v6 = CallbackPolicy.parse(("::1",)).target("http://[::1]:9/x")
    assert v6.host == "::1" and v6.host_header == "[::1]:9" and v6.url_for(ip("::1")) == "http://[::1]:9/x"
    for bad, why in (("ftp://hooks.example.com/", "http"), ("http://u:p@hooks.example.com/", "user name"),
                     ("http://hooks.example.com:99999/", "valid URL"), ("http://a b/", "spaces"),
                     ("http:///x", "no host"), ("http://" + "a" * 3000, "at most")):
        with pytest.raises(ValueError, match=why):
            policy.target(bad)
    with pytest.raises(ValueError, match="disabled"):
        CallbackPolicy().target("http://127.0.0.2/")


def test_signature_and_retry_schedule():
    assert signature("key", b'{"a":1}') == "sha256=" + hmac.new(b"key", b'{"a":1}', "sha256").hexdigest()
    assert [next_delay_s(n, 0.0, 1000.0) for n in range(1, 8)] == [*RETRY_DELAYS_S, None]
    assert 55 <= sum(RETRY_DELAYS_S) <= 65, "about a minute"
    assert next_delay_s(1, 59.5, 60.0) is None, "past the window"
    assert next_delay_s(0, 0.0, 60.0) is None


def test_the_fair_queue_takes_turns_by_owner():
    queue: FairQueue[str] = FairQueue()
    for i in range(4):
        queue.push("alice", f"a{i}")
    queue.push("bob", "b0")
    assert queue.pop() == "a0"
    queue.push("carol", "c0")
    assert [queue.pop() for _ in range(len(queue))] == ["b0", "a1", "c0", "a2", "a3"]
    assert queue.pop() is None and len(queue) == 0 and queue.waiting("alice") == 0


def fake_resolver(answers: dict[str, list[str]]):
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list:
        calls.append(host)
        return [ip(a) for a in answers[host]]
    return resolve, calls


def send(sender: CallbackSender, url: str) -> bool:
    async def go() -> bool:
        try:
            return await sender.send(url, b'{"ok":true}', "t1", 1)
        finally:
            await sender.aclose()
    return asyncio.run(go())


def test_the_sender_connects_to_the_checked_address_with_the_name_as_host(receiver, monkeypatch):  # noqa: F811
    hook = receiver()
    # A proxy from the environment would connect on our behalf, to wherever the name resolves there.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    policy = CallbackPolicy.parse(("127.0.0.2",))
    resolve, calls = fake_resolver({"hooks.test": ["127.0.0.2"]})
    assert send(CallbackSender(policy, "k", 5.0, resolve), f"http://hooks.test:{hook.port}/in") is True
    [got] = hook.received
    # No real resolver knows hooks.test: the request came through the address we checked.
    assert got.headers["host"] == f"hooks.test:{hook.port}" and got.path == "/in" and calls == ["hooks.test"]
    assert got.headers["x-warmpool-signature"] == signature("k", b'{"ok":true}')


def test_a_name_that_resolves_elsewhere_at_send_time_is_not_called(receiver):  # noqa: F811
    hook = receiver()
    policy = CallbackPolicy.parse(("127.0.0.2",))
    url = f"http://hooks.test:{hook.port}/in"
    accepted, _ = fake_resolver({"hooks.test": ["127.0.0.2"]})
    assert asyncio.run(submission_refusal(policy, url, accepted)) is None, "allowed when it was submitted"
    moved, _ = fake_resolver({"hooks.test": ["127.0.0.1"]})  # the DNS answer changed since
    assert send(CallbackSender(policy, "k", 5.0, moved), url) is False
    mixed, _ = fake_resolver({"hooks.test": ["127.0.0.2", "127.0.0.1"]})  # one bad address is enough
    assert send(CallbackSender(policy, "k", 5.0, mixed), url) is False
    assert "127.0.0.1" in (asyncio.run(submission_refusal(policy, url, mixed)) or "")
    # A listed name is not a licence for internal addresses.
    by_name = CallbackPolicy.parse(("hooks.test",))
    assert send(CallbackSender(by_name, "k", 5.0, accepted), url) is False
    assert hook.received == []
