"""The one decision of what becomes of a container (pool/model/lifecycle.py), and the one backoff."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from pool.model.backoff import Backoff
from pool.model.lifecycle import (
    RESET,
    REUSE,
    WEAR_SPREAD,
    ContainerState,
    Fate,
    RetireReason,
    ReusePolicy,
    Verdict,
    after_task,
    draw_wear_share,
    while_idle,
)
from pool.model.results import Status

POLICY = ReusePolicy(max_uses=10, max_age_s=60)
FRESH = ContainerState(alive=True, uses=1, age_s=1.0)
R = RetireReason


@pytest.mark.parametrize(("status", "reset_clean", "state", "policy", "verdict"), [
    (Status.SUCCEEDED, None, FRESH, POLICY, RESET),
    (Status.FAILED, None, FRESH, POLICY, RESET),
    (Status.TIMED_OUT, None, FRESH, POLICY, RESET),
    (Status.OUTPUT_LIMIT_EXCEEDED, None, FRESH, POLICY, RESET),
    (Status.SUCCEEDED, True, FRESH, POLICY, REUSE),
    (Status.SUCCEEDED, False, FRESH, POLICY, Verdict.retire(R.UNCLEAN_RESET)),
    (Status.MEMORY_EXCEEDED, None, FRESH, POLICY, Verdict.retire(R.MEMORY_EXCEEDED)),
    (Status.SANDBOX_ERROR, None, FRESH, POLICY, Verdict.retire(R.SANDBOX_ERROR)),
    (Status.SUCCEEDED, True, FRESH, dataclasses.replace(POLICY, single_use=True), Verdict.retire(R.COLD_MODE)),
    (Status.SUCCEEDED, True, dataclasses.replace(FRESH, uses=10), POLICY, Verdict.retire(R.USE_LIMIT)),
    (Status.SUCCEEDED, True, dataclasses.replace(FRESH, age_s=60), POLICY, Verdict.retire(R.AGE_LIMIT)),
    (Status.SUCCEEDED, True, dataclasses.replace(FRESH, drained=True), POLICY, Verdict.retire(R.DRAINED)),
    (Status.SUCCEEDED, True, dataclasses.replace(FRESH, over_max_size=True), POLICY, Verdict.retire(R.SCALED_DOWN)),
    (Status.SUCCEEDED, True, dataclasses.replace(FRESH, alive=False), POLICY, Verdict.retire(R.RUNNER_LOST)),
    (Status.SUCCEEDED, True, dataclasses.replace(FRESH, closing=True), POLICY, Verdict.retire(R.SHUTDOWN)),
    # the first reason found wins: the outcome, the reset, the mode, wear, the tier's state, death, shutdown
    (Status.MEMORY_EXCEEDED, None, dataclasses.replace(FRESH, uses=10, drained=True), POLICY,
     Verdict.retire(R.MEMORY_EXCEEDED)),
    (Status.SUCCEEDED, True, dataclasses.replace(FRESH, uses=10, drained=True, alive=False), POLICY,
     Verdict.retire(R.USE_LIMIT)),
    # no code was sent (a withdrawn task): nothing to reset, the same rules otherwise
    (None, None, FRESH, POLICY, REUSE),
    (None, None, dataclasses.replace(FRESH, alive=False), POLICY, Verdict.retire(R.RUNNER_LOST)),
    (None, None, FRESH, dataclasses.replace(POLICY, single_use=True), Verdict.retire(R.COLD_MODE)),
    (None, None, dataclasses.replace(FRESH, drained=True), POLICY, Verdict.retire(R.DRAINED)),
])
def test_after_a_task(status, reset_clean, state, policy, verdict):
    assert after_task(policy, state, status=status, reset_clean=reset_clean) == verdict


def test_a_retire_verdict_always_names_its_reason():
    statuses = [None, *Status]
    for status in statuses:
        for clean in (None, True, False):
            for alive in (True, False):
                verdict = after_task(POLICY, dataclasses.replace(FRESH, alive=alive), status=status, reset_clean=clean)
                assert (verdict.fate == Fate.RETIRE) == (verdict.reason is not None)


def test_an_idle_container_goes_when_worn_out_or_dead():
    assert while_idle(POLICY, FRESH) is None
    assert while_idle(POLICY, dataclasses.replace(FRESH, uses=10)) == R.USE_LIMIT
    assert while_idle(POLICY, dataclasses.replace(FRESH, age_s=61)) == R.AGE_LIMIT
    assert while_idle(POLICY, dataclasses.replace(FRESH, alive=False)) == R.RUNNER_LOST
    assert while_idle(POLICY, dataclasses.replace(FRESH, drained=True)) is None, "a drain is the tier's to apply"


def test_reasons_keep_the_names_operators_see():
    assert {r.value for r in RetireReason} == {
        "memory_exceeded", "sandbox_error", "unclean_reset", "runner_lost", "cancelled", "cold_mode", "use_limit",
        "age_limit", "drained", "scaled_down", "shutdown"}


def test_backoff_doubles_up_to_its_cap_and_resets():
    backoff = Backoff(first_s=0.1, max_s=2.0)
    assert not backoff.failing
    assert [round(backoff.next_s(), 3) for _ in range(7)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert backoff.failing and backoff.failures == 7
    backoff.reset()
    assert backoff.next_s() == 0.1


def test_a_long_outage_does_not_overflow_the_backoff():
    backoff = Backoff(first_s=0.5, max_s=60.0, failures=5000)
    assert backoff.next_s() == 60.0


def test_each_container_serves_its_own_share_of_the_limits_and_never_more():
    policy = ReusePolicy(max_uses=10, max_age_s=60)
    share = ContainerState(alive=True, uses=7, age_s=1.0, wear_share=0.8)
    assert after_task(policy, share, status=None) == REUSE
    assert after_task(policy, dataclasses.replace(share, uses=8), status=None) == Verdict.retire(RetireReason.USE_LIMIT)
    assert while_idle(policy, dataclasses.replace(share, age_s=47.9)) is None
    assert while_idle(policy, dataclasses.replace(share, age_s=48.0)) == RetireReason.AGE_LIMIT
    # A fresh container per task stays one task, whatever its share.
    once = ReusePolicy(max_uses=1, max_age_s=60)
    assert after_task(once, ContainerState(alive=True, uses=1, age_s=0.1, wear_share=0.75), status=None) == \
        Verdict.retire(RetireReason.USE_LIMIT)


def test_wear_shares_spread_over_the_last_quarter_so_containers_started_together_retire_apart():
    rng = random.Random(7)
    shares = [draw_wear_share(rng) for _ in range(1000)]
    assert 1 - WEAR_SPREAD <= min(shares) < 0.76 and 0.99 < max(shares) <= 1.0
    assert len({math.ceil(1000 * s) for s in shares[:16]}) == 16  # sixteen containers, sixteen use limits
