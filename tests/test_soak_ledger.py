"""The soak's ledger (benchmarks/soak/ledger.py) and balloon arithmetic: pure, no engine."""

from __future__ import annotations

from benchmarks.soak.after import RSS_SLACK_BYTES, memory_check
from benchmarks.soak.balloon import GIB, MIB, available_bytes, next_chunk_bytes
from benchmarks.soak.ledger import (
    AsyncTask,
    Fault,
    Record,
    async_violations,
    judge,
    outcome,
    recovery_times_s,
    render,
)


def record(kind: str = "hello", code: int | None = 200, body: object = None, **fields) -> Record:
    defaults = {"mode": "embedded", "key": "k1", "tier": "nano", "started_s": 1.0, "ended_s": 2.0}
    return Record(kind=kind, status_code=code, body=body, **{**defaults, **fields})


def result(status: str = "succeeded", stdout: str = "") -> dict:
    return {"id": "t1", "status": status, "stdout": stdout, "stderr": ""}


def test_a_result_is_bucketed_by_its_status():
    assert outcome(record(body=result(stdout="abc\n"), nonce="abc")) == "result:succeeded"
    assert outcome(record("timeout", body=result("timed_out"))) == "result:timed_out"
    assert outcome(record("hello", body=result("sandbox_error"))) == "result:sandbox_error"


def test_a_result_with_another_requests_output_is_a_violation():
    assert outcome(record(body=result(stdout="zzz\n"), nonce="abc")) == "!wrong_output"


def test_a_status_the_kind_cannot_end_with_is_a_violation():
    assert outcome(record("hello", body=result("failed"))) == "!unexpected_status:failed"
    assert outcome(record("memory_bomb", body=result("succeeded"))) == "!unexpected_status:succeeded"


def test_no_answer_and_5xx_are_violations_but_a_documented_503_is_not():
    assert outcome(record(code=None, error="ReadTimeout")) == "!unanswered"
    assert outcome(record(code=500, body={"detail": "boom"})) == "!server_error:500"
    assert outcome(record(code=503, body={"detail": "no capacity"}, retry_after="1")) == "refused:503"
    assert outcome(record(code=503, body={"detail": "no capacity"})) == "!no_retry_after:503"
    assert outcome(record(code=429, body="Too many")) == "!undocumented_body:429"


def test_a_malformed_request_must_be_refused():
    assert outcome(record("malformed", code=422, body={"detail": []}, expect_refusal=True)) == "refused:422"
    assert outcome(record("malformed", code=200, body=result(), expect_refusal=True)) == "!accepted_malformed:200"
    assert outcome(record(code=200, body={"status": "nonsense", "stdout": ""})) == "!malformed_result"


def test_a_pending_long_poll_is_not_a_violation():
    assert outcome(record("async_poll", body={"id": "t", "status": "queued"})) == "pending:queued"


def task(**fields) -> AsyncTask:
    defaults = {"task_id": "t1", "mode": "scaleout", "key": "k1", "tier": "nano", "nonce": "abc",
                "submitted_s": 1.0, "final": result(stdout="abc\n"), "other_key_status": 404}
    return AsyncTask(**{**defaults, **fields})


def test_async_tasks_must_end_once_with_one_callback_and_stay_private():
    assert async_violations(task()) == []
    assert async_violations(task(final={"status": "running"})) == ["async_no_final_state:running"]
    assert async_violations(task(callback_wanted=True)) == ["callback_lost"]
    assert async_violations(task(callback_wanted=True, callbacks=[1, 2])) == ["callback_duplicated"]
    assert async_violations(task(callback_wanted=True, callbacks=[3])) == []
    assert async_violations(task(other_key_status=200)) == ["read_by_other_key:200"]
    assert async_violations(task(final=result(stdout="zzz"))) == ["async_wrong_output"]


def test_recovery_runs_from_the_fault_to_the_next_success_of_its_tier_and_mode():
    ok = result(stdout="x")
    records = [
        record(body=ok, started_s=9.0, ended_s=10.5),  # before the fault
        record(body=result("sandbox_error"), started_s=10.1, ended_s=11.0),
        record(body=ok, tier="small", started_s=10.2, ended_s=11.0),  # another tier
        record(body=ok, mode="scaleout", started_s=10.2, ended_s=11.0),  # another mode
        record(body=ok, started_s=11.0, ended_s=13.0),
        record(body=ok, started_s=11.5, ended_s=12.5),
    ]
    records.append(record(body=result("sandbox_error"), tier="small", started_s=15.0, ended_s=16.0))
    faults = [Fault("kill_container", "embedded", 10.0, ("nano",)),
              Fault("dockerd_restart", "embedded", 14.0, ("small",)),  # a task followed, none succeeded
              Fault("pause_container", "embedded", 20.0, ("nano",)),  # no task followed: not measured
              Fault("malformed_burst", "embedded", 5.0, ())]  # hit no tier: not measured
    times, unrecovered = recovery_times_s(faults, records)
    assert [(f.kind, t) for f, t in times] == [("kill_container", 2.5)]
    assert [f.kind for f in unrecovered] == ["dockerd_restart"]


def test_judge_collects_every_violation_and_after_check():
    verdict = judge([record(body=result(stdout="abc"), nonce="abc"), record(code=None)], [task()],
                    [Fault("kill_container", "embedded", 0.0, ("nano",))],
                    {"containers": "", "scratch": "2 mount(s)"})
    assert verdict.violations == ["1 x embedded hello !unanswered", "after: scratch: 2 mount(s)"]
    assert [t for _, t in verdict.recovery_s] == [2.0]
    assert "| embedded kill_container | 1 | 2.00 | 2.00 |" in render(verdict, [], [])
    assert not verdict.ok


def test_the_balloon_never_goes_past_its_target_or_below_the_floor():
    assert next_chunk_bytes(20 * GIB, 4 * GIB, 0, 3 * GIB) == 64 * MIB
    assert next_chunk_bytes(20 * GIB, 4 * GIB, 3 * GIB - MIB, 3 * GIB) == MIB
    assert next_chunk_bytes(20 * GIB, 4 * GIB, 3 * GIB, 3 * GIB) == 0
    assert next_chunk_bytes(4 * GIB + 64 * MIB, 4 * GIB, 0, 3 * GIB) == 0
    assert available_bytes("MemTotal: 100 kB\nMemAvailable:    2048 kB\n") == 2 * MIB


def test_memory_is_near_its_start_within_the_slack():
    assert memory_check(100 * MIB, 100 * MIB + RSS_SLACK_BYTES) == ""
    assert "grew" in memory_check(100 * MIB, 101 * MIB + RSS_SLACK_BYTES)
