"""Settings from WARMPOOL_* variables: typed, checked across variables at start, unknown names warned about.

No Docker, no Redis: `warmpool serve` and `warmpool worker` refuse bad settings before they reach either."""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pool.env_settings import Count, CountOrZero, EnvSettings, SettingsError, known_variables, variable
from pool.settings import Settings, from_env

REPO = Path(__file__).resolve().parent.parent
COUNTS = ("START_CONCURRENCY", "RATE_LIMIT_BURST", "MAX_WAITING", "MAX_CONNECTIONS", "MAX_TASKS_PER_KEY",
          "MAX_RESULTS", "MAX_QUEUED", "MAX_BATCH", "CALLBACK_CONCURRENCY", "MAX_SESSIONS_PER_KEY")


def test_the_timeout_pair_is_refused_at_start_naming_both_variables():
    with pytest.raises(SettingsError) as info:
        from_env({"WARMPOOL_DEFAULT_TIMEOUT_S": "30", "WARMPOOL_MAX_TIMEOUT_S": "5"})
    assert info.value.field == "WARMPOOL_DEFAULT_TIMEOUT_S"
    assert "WARMPOOL_MAX_TIMEOUT_S" in info.value.message and "30" in info.value.message
    # Against the default cap (60 s) too, and equal is fine.
    with pytest.raises(SettingsError, match=r"WARMPOOL_DEFAULT_TIMEOUT_S: 90 s is above WARMPOOL_MAX_TIMEOUT_S \(60"):
        from_env({"WARMPOOL_DEFAULT_TIMEOUT_S": "90"})
    assert from_env({"WARMPOOL_DEFAULT_TIMEOUT_S": "5", "WARMPOOL_MAX_TIMEOUT_S": "5"}).default_timeout_s == 5


def test_the_session_idle_pair_is_checked_too():
    with pytest.raises(SettingsError,
                       match="WARMPOOL_SESSION_IDLE_TIMEOUT_S: 600 s is above WARMPOOL_MAX_SESSION_IDLE_S"):
        from_env({"WARMPOOL_SESSION_IDLE_TIMEOUT_S": "600", "WARMPOOL_MAX_SESSION_IDLE_S": "300"})


# Every count variable, from the settings' types.
WHOLE = [variable(name) for name, field in EnvSettings.model_fields.items()
         if field.annotation in (Count | None, CountOrZero | None)]


@pytest.mark.parametrize("name", WHOLE)
def test_a_whole_number_setting_refuses_a_fraction_rather_than_truncating_it(name):
    with pytest.raises(SettingsError) as info:
        from_env({name: "1.5"})
    assert info.value.field == name and "whole" in info.value.message


def test_the_counts_are_typed_as_whole_numbers():
    assert {f"WARMPOOL_{name}" for name in COUNTS} == set(WHOLE)
    assert from_env({"WARMPOOL_MAX_BATCH": "3", "WARMPOOL_MAX_CONNECTIONS": "2e3"}).max_connections == 2000


def test_typed_values_are_read():
    settings = from_env({"WARMPOOL_API_KEYS": " a, b ,,c", "WARMPOOL_HOST_RAM": "4GiB",
                         "WARMPOOL_MAX_BODY_BYTES": "2MB", "WARMPOOL_MODE": "cold", "WARMPOOL_WARMING": "off",
                         "WARMPOOL_WARM_QUIET_S": "3",
                         "WARMPOOL_RATE_LIMIT_PER_S": "0", "WARMPOOL_WORKER_GRACE_S": "0"})
    assert settings.api_keys == ("a", "b", "c")
    assert settings.host_ram_bytes == 4 * 1024**3 and settings.max_body_bytes == 2 * 1024**2
    assert settings.mode == "cold" and not settings.warming.enabled and settings.warming.quiet_s == 3
    assert settings.rate_limit_per_s == 0 and settings.worker_grace_s == 0


def test_empty_means_unset_and_defaults_stay_the_dataclass_ones():
    assert from_env({"WARMPOOL_MAX_BATCH": "", "WARMPOOL_MODE": ""}).max_batch == Settings().max_batch
    settings, defaults = from_env({}), Settings()
    for name in ("lease_timeout_s", "max_timeout_s", "max_body_bytes", "max_waiting", "scratch", "warming"):
        assert getattr(settings, name) == getattr(defaults, name)


def test_every_bad_variable_is_named_at_once():
    with pytest.raises(SettingsError) as info:
        from_env({"WARMPOOL_MAX_BATCH": "1.5", "WARMPOOL_MODE": "hot", "WARMPOOL_HOST_RAM": "lots",
                   "WARMPOOL_LEASE_TIMEOUT_S": "nan"})
    named = dict(info.value.problems)
    assert set(named) == {"WARMPOOL_MAX_BATCH", "WARMPOOL_MODE", "WARMPOOL_HOST_RAM", "WARMPOOL_LEASE_TIMEOUT_S"}
    assert "'warm' or 'cold'" in named["WARMPOOL_MODE"] and "'hot'" in named["WARMPOOL_MODE"]
    assert all(name in str(info.value) for name in named)


def test_a_given_mapping_is_read_and_not_the_process_environment(monkeypatch):
    monkeypatch.setenv("WARMPOOL_MODE", "hot")
    assert from_env({}).mode == "warm"
    with pytest.raises(SettingsError, match="WARMPOOL_MODE"):
        from_env()


def test_unknown_names_are_warned_about_with_the_nearest_real_one(caplog):
    with caplog.at_level(logging.WARNING, logger="pool.settings"):
        from_env({"WARMPOOL_MAX_TIMEOUT": "5", "WARMPOOL_WORKERS": "2", "WARMPOOL_IMAGE_DATASCIENSE": "x:y",
                  "WARMPOOL_IMAGE_DATASCIENCE": "ds:test", "WARMPOOL_URL": "http://x", "WARMPOOL_TEST_REDIS_URL": ""})
    lines = [record.getMessage() for record in caplog.records]
    assert any(line.startswith("WARMPOOL_MAX_TIMEOUT is not a setting") and "WARMPOOL_MAX_TIMEOUT_S?" in line
               for line in lines)
    assert any(line.startswith("WARMPOOL_WORKERS is not a setting") for line in lines)
    assert any(line.startswith("WARMPOOL_IMAGE_DATASCIENSE") and "WARMPOOL_IMAGE_DATASCIENCE?" in line
               for line in lines)
    assert len(lines) == 3  # the real ones (an image tag, the client's URL, the test suite's) pass quietly


def test_the_clients_key_variable_on_a_server_without_keys_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="pool.settings"):
        from_env({"WARMPOOL_API_KEY": "secret"})
    assert [r.getMessage() for r in caplog.records] == [
        "WARMPOOL_API_KEY is the key clients send (warmpool run, warmpool mcp); the server's keys are "
        "WARMPOOL_API_KEYS, which is not set"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pool.settings"):
        from_env({"WARMPOOL_API_KEY": "secret", "WARMPOOL_API_KEYS": "secret"})
    assert caplog.records == []


def test_every_warmpool_name_in_the_repository_is_known():
    """A variable read somewhere (code, scripts, deployments, docs) but missing from the settings or the list of
    other readers would be warned about as unknown at every start."""
    found = set()
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, tracked):
        path = REPO / name.decode()
        if path.is_file() and path.suffix not in (".png", ".ico", ".gz") and path.name != Path(__file__).name:
            found |= set(re.findall(r"\bWARMPOOL_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")))
    assert "WARMPOOL_API_KEYS" in found and "WARMPOOL_URL" in found  # the scan saw the repository
    families = ("WARMPOOL_IMAGE_", "WARMPOOL_TEST_", "WARMPOOL_DOCKER2_", "WARMPOOL_DASHBOARD_")
    typos = {"WARMPOOL_MAX_TIMEOUT"}  # the README's example of a warning
    assert sorted(found - known_variables() - typos - {n for n in found if n.startswith(families)}) == []
    readme = (REPO / "README.md").read_text()
    assert [variable(name) for name in EnvSettings.model_fields if variable(name) not in readme] == []


@pytest.mark.parametrize(("command", "bad"), [
    ("serve", {"WARMPOOL_DEFAULT_TIMEOUT_S": "30", "WARMPOOL_MAX_TIMEOUT_S": "5"}),
    ("worker", {"WARMPOOL_MAX_BATCH": "1.5", "WARMPOOL_MODE": "hot"}),
], ids=["serve", "worker"])
def test_the_commands_refuse_bad_settings_with_a_message_not_a_traceback(command, bad):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARMPOOL_")}
    env.update(bad, WARMPOOL_REDIS_URL="redis://127.0.0.1:1/0", DOCKER_HOST="unix:///nonexistent/docker.sock")
    done = subprocess.run([sys.executable, "-m", "warmpool", command], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith(f"warmpool {command}: bad settings: ")
    assert all(name in done.stderr for name in bad)
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1
