#!/usr/bin/env bash
# A second Docker engine on this machine, so that scale-out tests run one worker per engine ("another
# host" is another engine, not another process on the same one).
#
# Usage: ensure-docker2.sh start|stop|status
#   start   start it if it does not answer (idempotent), then load the sandbox images into it from the
#           first engine (docker save | docker load: no registry), skipping those already loaded
#   stop    stop it (its containers stop with it) and remove its socket and pid file; its data root stays,
#           so the loaded images are cached for the next start
#   status  exit 0 when it answers
#
# The first engine's configuration is never read or touched: this engine has its own socket, data root,
# exec root, pid file and config file, no bridge network and no iptables changes (sandboxes have no
# network anyway). gVisor's runsc is registered only when WARMPOOL_DOCKER2_RUNSC=1.
#
# Knobs: WARMPOOL_DOCKER2_SOCK (default /run/warmpool-docker2.sock), WARMPOOL_DOCKER2_ROOT (data root,
# default /var/lib/warmpool-docker2), WARMPOOL_DOCKER2_IMAGES (images to load; default $WARMPOOL_IMAGE or
# warmpool-runner:latest), WARMPOOL_DOCKER2_WAIT_S (default 60).
set -euo pipefail

SOCK=${WARMPOOL_DOCKER2_SOCK:-/run/warmpool-docker2.sock}
ROOT=${WARMPOOL_DOCKER2_ROOT:-/var/lib/warmpool-docker2}
EXEC_ROOT=${WARMPOOL_DOCKER2_EXEC_ROOT:-/run/warmpool-docker2}
PIDFILE=${WARMPOOL_DOCKER2_PIDFILE:-/run/warmpool-docker2.pid}
CONFIG=$ROOT.json
LOG=${WARMPOOL_DOCKER2_LOG:-/var/log/warmpool-docker2.log}
IMAGES=${WARMPOOL_DOCKER2_IMAGES:-${WARMPOOL_IMAGE:-warmpool-runner:latest}}
WAIT_S=${WARMPOOL_DOCKER2_WAIT_S:-60}
HOST="unix://$SOCK"

say() { echo "ensure-docker2: $*" >&2; }
die() {
    say "ERROR: $*"
    exit 1
}

answers() { timeout 20 docker -H "$HOST" info >/dev/null 2>&1; }

# The pid in our pid file, if it is a live dockerd.
our_pid() {
    local pid
    pid=$(cat "$PIDFILE" 2>/dev/null || true)
    if [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = dockerd ]; then
        echo "$pid"
    fi
}

find_dockerd() {
    local dir
    command -v dockerd 2>/dev/null && return 0
    for dir in /usr/sbin /usr/bin /sbin /usr/local/bin; do
        [ -x "$dir/dockerd" ] && { echo "$dir/dockerd"; return 0; }
    done
    return 1
}

write_config() {
    mkdir -p "$(dirname "$CONFIG")"
    if [ "${WARMPOOL_DOCKER2_RUNSC:-0}" = 1 ]; then
        [ -x /usr/bin/runsc ] || die "WARMPOOL_DOCKER2_RUNSC=1 but /usr/bin/runsc is missing (apt-get install runsc)"
        echo '{"runtimes": {"runsc": {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none"]}}}' >"$CONFIG"
    else
        echo '{}' >"$CONFIG"
    fi
}

start() {
    if answers; then
        say "the second engine answers on $HOST"
    else
        local dockerd pid
        dockerd=$(find_dockerd) || die "no dockerd binary (run scripts/ensure-docker.sh first)"
        pid=$(our_pid)
        if [ -n "$pid" ]; then
            say "dockerd (pid $pid) is running but not answering; stopping it first"
            stop
        fi
        rm -f "$PIDFILE" "$SOCK"
        write_config
        mkdir -p "$ROOT" "$EXEC_ROOT" "$(dirname "$LOG")"
        say "starting a second dockerd on $HOST (data root $ROOT, log $LOG)"
        (
            # Fully detached, every inherited fd closed: make and CI must not wait on its pipes.
            for fd in /proc/self/fd/*; do
                fd=${fd##*/}
                if [ "$fd" -gt 2 ] 2>/dev/null; then eval "exec $fd>&-" 2>/dev/null || true; fi
            done
            exec setsid nohup "$dockerd" --config-file "$CONFIG" -H "$HOST" --data-root "$ROOT" \
                --exec-root "$EXEC_ROOT" --pidfile "$PIDFILE" --bridge=none --iptables=false --ip-masq=false \
                --ip6tables=false </dev/null >>"$LOG" 2>&1
        ) &
        local deadline=$((SECONDS + WAIT_S))
        until answers; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                tail -n 20 "$LOG" >&2 || true
                die "the second dockerd did not answer within ${WAIT_S}s"
            fi
            sleep 0.5
        done
        say "the second engine is up"
    fi
    load_images
}

# Load each image from the first engine unless the second already has the same image id.
load_images() {
    local image want have
    for image in $IMAGES; do
        want=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null) ||
            die "the first engine has no image $image (build it: warmpool image)"
        have=$(docker -H "$HOST" image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)
        if [ "$want" = "$have" ]; then
            continue
        fi
        say "loading $image into the second engine (docker save | docker load)"
        docker save "$image" | docker -H "$HOST" load -q >&2
        if [ -n "$have" ]; then
            # The tag moved to the new image: drop the old one, unless a container still uses it.
            docker -H "$HOST" image rm "$have" >/dev/null 2>&1 || true
        fi
    done
}

stop() {
    local pid
    pid=$(our_pid)
    if [ -n "$pid" ]; then
        say "stopping the second dockerd (pid $pid)"
        kill -TERM "$pid"
        local deadline=$((SECONDS + 30))
        while kill -0 "$pid" 2>/dev/null; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                say "dockerd (pid $pid) did not stop in 30s; killing it"
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.2
        done
    fi
    rm -f "$PIDFILE" "$SOCK"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) answers ;;
    *) die "usage: $0 start|stop|status" ;;
esac
