"""The soak's ledger: every request sent, every fault fired, and the verdict on them (pure: no I/O).

A request is judged by its answer alone, against the HTTP contract (/work/shared/DESIGN.md, section 1):

- a 200 must carry a result (`id`, a known `status`, `stdout`); a task that printed its nonce must show
  that nonce (a result carrying another request's output was delivered to the wrong caller);
- a refusal must be a 4xx, or a 503, with FastAPI's `{"detail": ...}` body; 429 and 503 also need
  `Retry-After`;
- no answer at all (a broken connection, a client timeout) and any 5xx but 503 are violations;
- an async task must reach a final state, its callback (if it asked for one) must arrive exactly once,
  and another key must never read it (a 404).

Recovery: for each fault, the time from when it fired to the end of the next task of one of the tiers
it hit that started after it and succeeded.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

RESULT_STATUSES = frozenset({"succeeded", "failed", "timed_out", "memory_exceeded", "output_limit_exceeded",
                             "sandbox_error"})
PENDING_STATUSES = frozenset({"queued", "running"})
REFUSALS_NEEDING_RETRY_AFTER = frozenset({429, 503})

# What each kind of task may end as: a fault may always turn a task into a sandbox_error. Anything else
# (a hello that "failed", a memory bomb that "succeeded") is a wrong answer.
ALLOWED_STATUSES: dict[str, frozenset[str]] = {
    "hello": frozenset({"succeeded", "sandbox_error"}),
    "compute": frozenset({"succeeded", "sandbox_error"}),
    "large_output": frozenset({"succeeded", "sandbox_error"}),
    "output_flood": frozenset({"output_limit_exceeded", "sandbox_error"}),
    "timeout": frozenset({"timed_out", "sandbox_error"}),
    "memory_bomb": frozenset({"memory_exceeded", "sandbox_error"}),
    "session": frozenset({"succeeded", "sandbox_error"}),
    "stream": frozenset({"succeeded", "sandbox_error"}),
    "async": frozenset({"succeeded", "sandbox_error"}),
    "busy_probe": frozenset({"succeeded", "sandbox_error"}),
}


@dataclass
class Record:
    """One HTTP request of the soak and its answer (`status_code` None: no answer came)."""

    kind: str
    mode: str
    key: str
    tier: str
    started_s: float
    ended_s: float = 0.0
    status_code: int | None = None
    body: Any = None
    retry_after: str | None = None
    nonce: str = ""  # printed by the task: a succeeded result must show it
    expect_refusal: bool = False  # a malformed or oversized request: only a 4xx is right
    error: str = ""  # what the client saw when no answer came
    task_id: str = ""  # async: the id the 202 gave


@dataclass
class AsyncTask:
    """An async task's life as the soak saw it."""

    task_id: str
    mode: str
    key: str
    tier: str
    nonce: str
    submitted_s: float
    final: Any = None  # the last body GET /v1/tasks/{id} answered
    callback_wanted: bool = False
    callbacks: list[int] = field(default_factory=list)  # attempt numbers received
    callback_bad_signature: int = 0
    other_key_status: int | None = None  # what another key's GET answered


@dataclass(frozen=True)
class Fault:
    kind: str
    mode: str
    fired_s: float
    tiers: tuple[str, ...]
    detail: str = ""


def outcome(record: Record) -> str:
    """The record's bucket in the ledger: `result:<status>`, `refused:<code>` or a violation (`!...`)."""
    if record.status_code is None:
        return "!unanswered"
    code = record.status_code
    body = record.body
    if code == 200 or code == 201 or code == 202 or code == 204:
        if record.expect_refusal:
            return f"!accepted_malformed:{code}"
        if code != 200:
            return f"ok:{code}"
        if isinstance(body, dict) and body.get("status") in PENDING_STATUSES and record.kind == "async_poll":
            return f"pending:{body['status']}"
        if not isinstance(body, dict) or body.get("status") not in RESULT_STATUSES or "stdout" not in body:
            return "!malformed_result"
        status = body["status"]
        if status == "succeeded" and record.nonce and record.nonce not in str(body.get("stdout", "")):
            return "!wrong_output"
        allowed = ALLOWED_STATUSES.get(record.kind)
        if allowed is not None and status not in allowed:
            return f"!unexpected_status:{status}"
        return f"result:{status}"
    if code >= 500 and code != 503:
        return f"!server_error:{code}"
    if code >= 500 or 400 <= code < 500:
        if not isinstance(body, dict) or "detail" not in body:
            return f"!undocumented_body:{code}"
        if code in REFUSALS_NEEDING_RETRY_AFTER and not record.retry_after:
            return f"!no_retry_after:{code}"
        if code == 503 and record.expect_refusal:
            return "refused:503"
        return f"refused:{code}"
    return f"!unexpected_code:{code}"


def async_violations(task: AsyncTask) -> list[str]:
    """What went wrong with one async task, once the soak has waited for it to end."""
    found = []
    final = task.final
    if not isinstance(final, dict) or final.get("status") not in RESULT_STATUSES:
        state = final.get("status") if isinstance(final, dict) else final
        # A 404 after a Redis restart without persistence would be a documented loss; the soak runs Redis
        # with AOF, so every accepted task must end.
        found.append(f"async_no_final_state:{state}")
    elif final["status"] == "succeeded" and task.nonce not in str(final.get("stdout", "")):
        found.append("async_wrong_output")
    if task.callback_wanted and isinstance(final, dict) and final.get("status") in RESULT_STATUSES:
        if not task.callbacks:
            found.append("callback_lost")
        elif len(task.callbacks) > 1:
            found.append("callback_duplicated")
    if task.callback_bad_signature:
        found.append("callback_bad_signature")
    if task.other_key_status is not None and task.other_key_status != 404:
        found.append(f"read_by_other_key:{task.other_key_status}")
    return found


def recovery_times_s(faults: Iterable[Fault], records: Iterable[Record]
                     ) -> tuple[list[tuple[Fault, float]], list[Fault]]:
    """Per fault that hit tiers, seconds from it to the end of the next succeeded task of one of them
    (started after it, same mode); and the faults after which tasks of those tiers ran but none succeeded.
    A fault no task followed (fired as the load stopped) is not measured."""
    records = list(records)
    successes = sorted((r for r in records if r.status_code == 200 and isinstance(r.body, dict)
                        and r.body.get("status") == "succeeded"), key=lambda r: r.ended_s)
    times: list[tuple[Fault, float]] = []
    unrecovered: list[Fault] = []
    for fault in faults:
        after = [r.ended_s for r in successes if r.mode == fault.mode and r.tier in fault.tiers
                 and r.started_s >= fault.fired_s]
        if after:
            times.append((fault, min(after) - fault.fired_s))
        elif any(r.mode == fault.mode and r.tier in fault.tiers and r.started_s >= fault.fired_s for r in records):
            unrecovered.append(fault)
    return times, unrecovered


@dataclass
class Verdict:
    outcomes: Counter[str]
    async_problems: Counter[str]
    faults: Counter[str]
    recovery_s: list[tuple[Fault, float]]
    unrecovered: list[Fault]
    after: dict[str, str]  # after-soak checks: name -> "" when clean, else what was left
    violations: list[str]

    @property
    def ok(self) -> bool:
        return not self.violations


def judge(records: list[Record], tasks: list[AsyncTask], faults: list[Fault],
          after: dict[str, str]) -> Verdict:
    outcomes: Counter[str] = Counter(f"{r.mode} {r.kind} {outcome(r)}" for r in records)
    problems: Counter[str] = Counter(p for t in tasks for p in async_violations(t))
    times, unrecovered = recovery_times_s(faults, records)
    violations = [f"{n} x {name}" for name, n in sorted(outcomes.items()) if name.split(" ")[2].startswith("!")]
    violations += [f"{n} x {name}" for name, n in sorted(problems.items())]
    violations += [f"unrecovered: {f.mode} {f.kind} at {f.fired_s:.1f}s" for f in unrecovered]
    violations += [f"after: {name}: {left}" for name, left in sorted(after.items()) if left]
    return Verdict(outcomes, problems, Counter(f"{f.mode} {f.kind}" for f in faults), times, unrecovered,
                   after, violations)


def render(verdict: Verdict, records: list[Record], tasks: list[AsyncTask]) -> str:
    """The ledger as Markdown tables: requests by outcome, faults by kind, recovery times, after-checks."""
    lines = ["| mode | kind | outcome | requests |", "| --- | --- | --- | ---: |"]
    for name, n in sorted(verdict.outcomes.items()):
        mode, kind, result = name.split(" ", 2)
        lines.append(f"| {mode} | {kind} | {result} | {n} |")
    lines.append(f"| all | all | total | {len(records)} |")
    lines += ["", "| async tasks | count |", "| --- | ---: |", f"| submitted | {len(tasks)} |",
              f"| ended in a final state | {sum(1 for t in tasks if _final(t))} |",
              f"| callbacks asked / received once | {sum(t.callback_wanted for t in tasks)} / "
              f"{sum(1 for t in tasks if t.callback_wanted and len(t.callbacks) == 1)} |",
              f"| read by another key (must be 0) | "
              f"{sum(1 for t in tasks if t.other_key_status not in (None, 404))} |"]
    for name, n in sorted(verdict.async_problems.items()):
        lines.append(f"| **{name}** | {n} |")
    lines += ["", "| fault | fired |", "| --- | ---: |"]
    lines += [f"| {name} | {n} |" for name, n in sorted(verdict.faults.items())]
    lines += ["", "| recovery: fault to the next succeeded task of its tier | measured | p50 s | max s |",
              "| --- | ---: | ---: | ---: |"]
    by_kind: dict[str, list[float]] = {}
    for fault, seconds in verdict.recovery_s:
        by_kind.setdefault(f"{fault.mode} {fault.kind}", []).append(seconds)
    by_kind["all faults"] = [seconds for _, seconds in verdict.recovery_s]
    for name, times in by_kind.items() if verdict.recovery_s else ():
        lines.append(f"| {name} | {len(times)} | {statistics.median(times):.2f} | {max(times):.2f} |")
    lines.append(f"| unrecovered (tasks of its tiers ran after it, none succeeded) | {len(verdict.unrecovered)} | | |")
    lines += ["", "| after the soak | left |", "| --- | --- |"]
    lines += [f"| {name} | {left or 'nothing'} |" for name, left in sorted(verdict.after.items())]
    return "\n".join(lines)


def _final(task: AsyncTask) -> bool:
    return isinstance(task.final, dict) and task.final.get("status") in RESULT_STATUSES
