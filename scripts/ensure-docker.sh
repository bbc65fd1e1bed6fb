#!/usr/bin/env bash
# Make sure a Docker engine answers, with gVisor's runsc registered as a runtime.
#
# If `docker info` already answers we only check for runsc (and warn if it is missing: we never restart an
# engine someone else runs). Otherwise, as root on Debian, install what is missing (docker.io, runsc),
# register runsc in daemon.json, and start dockerd fully detached so that `make` returns.
#
# Knobs (mostly for testing the install path without touching a live engine):
#   WARMPOOL_DOCKER_DAEMON_JSON  daemon.json to write     (default /etc/docker/daemon.json)
#   WARMPOOL_DOCKERD_LOG         where dockerd logs         (default /var/log/warmpool-dockerd.log)
#   WARMPOOL_DOCKER_WAIT_S       how long to wait for it    (default 30)
set -euo pipefail

DAEMON_JSON=${WARMPOOL_DOCKER_DAEMON_JSON:-/etc/docker/daemon.json}
DOCKERD_LOG=${WARMPOOL_DOCKERD_LOG:-/var/log/warmpool-dockerd.log}
WAIT_S=${WARMPOOL_DOCKER_WAIT_S:-30}
RUNSC_PATH=/usr/bin/runsc
DOCKERD_PIDFILE=/var/run/docker.pid

say() { echo "ensure-docker: $*" >&2; }
die() {
    say "ERROR: $*"
    exit 1
}

have() { command -v "$1" >/dev/null 2>&1; }

docker_answers() { have docker && timeout 20 docker info >/dev/null 2>&1; }

runsc_registered() {
    timeout 20 docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"'
}

# dockerd and runsc live in sbin/bin dirs that a non-login PATH may lack.
find_bin() {
    local name=$1 dir
    if have "$name"; then
        command -v "$name"
        return 0
    fi
    for dir in /usr/sbin /usr/bin /sbin /bin /usr/local/sbin /usr/local/bin; do
        if [ -x "$dir/$name" ]; then
            echo "$dir/$name"
            return 0
        fi
    done
    return 1
}

# The pid of a live dockerd, if any (from its pidfile, else by name).
running_dockerd_pid() {
    local pid
    if [ -r "$DOCKERD_PIDFILE" ]; then
        pid=$(cat "$DOCKERD_PIDFILE" 2>/dev/null || true)
        if [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = dockerd ]; then
            echo "$pid"
            return 0
        fi
    fi
    if have pgrep; then
        pgrep -x dockerd | head -n1 || true
    fi
    return 0
}

APT_UPDATED=0
apt_install() {
    if [ "$APT_UPDATED" = 0 ]; then
        say "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
        APT_UPDATED=1
    fi
    say "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" </dev/null >/dev/null
}

# Add runsc to daemon.json, keeping every other key already there.
register_runsc() {
    mkdir -p "$(dirname "$DAEMON_JSON")"
    python3 - "$DAEMON_JSON" "$RUNSC_PATH" <<'EOF'
import json, os, sys

path, runsc = sys.argv[1], sys.argv[2]
try:
    with open(path) as f:
        text = f.read()
    config = json.loads(text) if text.strip() else {}
except FileNotFoundError:
    config = {}
if not isinstance(config, dict):
    sys.exit(f"{path} does not hold a JSON object; fix it by hand")
wanted = {"path": runsc, "runtimeArgs": ["--network=none"]}
runtimes = config.setdefault("runtimes", {})
if runtimes.get("runsc") == wanted:
    sys.exit(0)
runtimes["runsc"] = wanted
tmp = path + ".warmpool.tmp"
with open(tmp, "w") as f:
    json.dump(config, f, indent=2)
    f.write("\n")
os.replace(tmp, path)
print(f"ensure-docker: registered runsc in {path}", file=sys.stderr)
EOF
}

# Start dockerd in its own session, with every inherited fd closed, so that neither make nor a CI
# harness waiting on our stdout/stderr pipes waits for it.
start_dockerd() {
    local dockerd=$1
    local stale
    stale=$(cat "$DOCKERD_PIDFILE" 2>/dev/null || true)
    if [ -n "$stale" ] && [ -z "$(running_dockerd_pid)" ]; then
        # /run is not always a tmpfs: a dockerd killed hard leaves its pidfile behind.
        say "removing stale $DOCKERD_PIDFILE (pid $stale is not a running dockerd)"
        rm -f "$DOCKERD_PIDFILE"
    fi
    local args=()
    # dockerd reads /etc/docker/daemon.json by itself; name the file only when it is another one.
    if [ -e "$DAEMON_JSON" ] && [ "$DAEMON_JSON" != /etc/docker/daemon.json ]; then
        args=(--config-file "$DAEMON_JSON")
    fi
    mkdir -p "$(dirname "$DOCKERD_LOG")"
    say "starting dockerd (log: $DOCKERD_LOG)"
    (
        for fd in /proc/self/fd/*; do
            fd=${fd##*/}
            if [ "$fd" -gt 2 ] 2>/dev/null; then eval "exec $fd>&-" 2>/dev/null || true; fi
        done
        exec setsid nohup "$dockerd" "${args[@]}" </dev/null >>"$DOCKERD_LOG" 2>&1
    ) &
    DOCKERD_PID=$!
}

wait_for_docker() {
    local deadline=$((SECONDS + WAIT_S))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if docker_answers; then return 0; fi
        if [ -n "${DOCKERD_PID:-}" ] && ! kill -0 "$DOCKERD_PID" 2>/dev/null; then
            say "dockerd exited; last lines of $DOCKERD_LOG:"
            tail -n 20 "$DOCKERD_LOG" >&2 || true
            return 1
        fi
        sleep 0.5
    done
    say "dockerd did not answer within ${WAIT_S}s; last lines of $DOCKERD_LOG:"
    tail -n 20 "$DOCKERD_LOG" >&2 || true
    return 1
}

warn_if_no_runsc() {
    if ! runsc_registered; then
        say "WARNING: the running Docker engine has no 'runsc' runtime; tiers that ask for gVisor will fail."
        say "  To add it: install runsc (apt-get install runsc), add"
        say "  {\"runtimes\": {\"runsc\": {\"path\": \"$RUNSC_PATH\", \"runtimeArgs\": [\"--network=none\"]}}}"
        say "  to /etc/docker/daemon.json and reload dockerd (kill -HUP <dockerd pid>) or restart it."
    fi
}

# --- 1. An engine that already answers is left alone. -----------------------------------------------
if docker_answers; then
    warn_if_no_runsc
    exit 0
fi

# --- 2. Otherwise we can only help as root on Debian. ------------------------------------------------
if [ "$(id -u)" != 0 ] || [ ! -r /etc/debian_version ] || ! have apt-get; then
    die "no Docker engine answers 'docker info'. Start one (e.g. 'sudo systemctl start docker' or
  'sudo dockerd &'), make sure this user may use /var/run/docker.sock (the 'docker' group), and retry.
  On Debian as root, this script installs (docker.io, runsc) and starts the engine itself."
fi

if pid=$(running_dockerd_pid) && [ -n "$pid" ]; then
    # Someone else's dockerd is (still) starting: wait for it rather than start a second one.
    say "dockerd (pid $pid) is running but not answering yet; waiting up to ${WAIT_S}s"
    DOCKERD_PID=$pid
    if wait_for_docker; then
        warn_if_no_runsc
        exit 0
    fi
    die "dockerd (pid $pid) runs but 'docker info' fails; see its log, or stop it and rerun this script."
fi

if ! DOCKERD=$(find_bin dockerd); then
    apt_install docker.io
    DOCKERD=$(find_bin dockerd) || die "docker.io installed but no dockerd binary found"
fi
have docker || die "dockerd is installed but no docker client is on PATH (reinstall docker.io)"

if ! find_bin runsc >/dev/null; then
    # gVisor is optional for most tiers: a failure here is a warning, not a reason to stop.
    apt_install runsc || say "WARNING: could not install runsc; gVisor tiers will not work"
fi
if [ -x "$RUNSC_PATH" ]; then
    register_runsc
fi

# Containers need cgroups; on a machine without an init that mounts them, cgroupfs-mount does it.
if ! grep -q cgroup /proc/mounts && have cgroupfs-mount; then
    say "mounting cgroups (cgroupfs-mount)"
    cgroupfs-mount || true
fi

start_dockerd "$DOCKERD"
wait_for_docker || die "could not start a Docker engine"
say "Docker engine is up"
warn_if_no_runsc
