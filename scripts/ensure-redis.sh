#!/usr/bin/env bash
# Make sure a redis-server answers on 127.0.0.1:PORT (for the tests and local scale-out runs).
#
# Usage: ensure-redis.sh [PORT]   (default: $WARMPOOL_TEST_REDIS_PORT, else 6399)
# Persistence: AOF (appendonly yes, appendfsync everysec) in the run dir, so queued tasks, results and
# the cluster's pool sizes survive a restart; a crash of the machine or of redis-server loses at most
# the last second of writes. RDB snapshots are off (--save ''): the AOF is the one copy.
# Installs Debian's redis-server when it is missing and we are root. Idempotent: a server that already
# answers PONG is left alone.
set -euo pipefail

PORT=${1:-${WARMPOOL_TEST_REDIS_PORT:-6399}}
RUN_DIR=${WARMPOOL_REDIS_DIR:-/tmp/warmpool-redis-$PORT}

say() { echo "ensure-redis: $*" >&2; }
die() {
    say "ERROR: $*"
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

pong() { have redis-cli && [ "$(timeout 5 redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null)" = PONG ]; }

if pong; then
    exit 0
fi

if ! have redis-server || ! have redis-cli; then
    if [ "$(id -u)" = 0 ] && [ -r /etc/debian_version ] && have apt-get; then
        say "installing redis-server"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server </dev/null >/dev/null
    else
        die "redis-server is not installed. Install it (Debian: 'sudo apt-get install redis-server') and retry."
    fi
fi

mkdir -p "$RUN_DIR"
say "starting redis-server on 127.0.0.1:$PORT (dir: $RUN_DIR)"
# --daemonize makes redis fork into its own session; our stdio goes to a file so that nothing it
# inherits holds make's (or CI's) output pipes open.
redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly yes --appendfsync everysec --daemonize yes \
    --dir "$RUN_DIR" --pidfile "$RUN_DIR/redis.pid" --logfile "$RUN_DIR/redis.log" \
    </dev/null >>"$RUN_DIR/start.log" 2>&1 || die "redis-server failed to start; see $RUN_DIR/start.log"

for _ in $(seq 1 50); do
    if pong; then
        say "redis is up on 127.0.0.1:$PORT"
        exit 0
    fi
    sleep 0.1
done
tail -n 20 "$RUN_DIR/redis.log" >&2 || true
die "redis-server did not answer on 127.0.0.1:$PORT within 5s"
