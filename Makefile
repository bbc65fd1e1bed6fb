# `make run` serves the API on 127.0.0.1:8000; `make test` runs the whole suite against a real Docker
# engine and a real Redis. Both set up what they need (venv, engine, sandbox images, redis) on the way.

VENV ?= .venv
PY := $(VENV)/bin/python
# The machine's own python3 (>= 3.11) makes the venv.
PYTHON ?= python3
STAMP := $(VENV)/.warmpool-installed
API_HOST ?= 127.0.0.1
API_PORT ?= 8000
REDIS_PORT ?= $(or $(WARMPOOL_TEST_REDIS_PORT),6399)
PYTEST_ARGS ?=
SERVICE_IMAGE ?= $(or $(WARMPOOL_SERVICE_IMAGE),warmpool-service:latest)

.PHONY: venv docker image redis browser run test check lint bench bench-scaleout bench-stream bench-clients service-image test-swarm soak

venv: $(STAMP)

# Debian's python3 has no venv/ensurepip until python3-venv is installed; a failed attempt leaves a
# half-made venv behind, so remove it before retrying.
$(PY):
	@if ! $(PYTHON) -m venv $(VENV) >/dev/null 2>&1; then \
	  rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make: '$(PYTHON) -m venv' failed; installing python3-venv"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv </dev/null >/dev/null && \
	    $(PYTHON) -m venv $(VENV); \
	  else \
	    echo "make: '$(PYTHON) -m venv' failed: install python3-venv (Debian) or set PYTHON=/path/to/python3.11+" >&2; \
	    exit 1; \
	  fi; \
	fi

# Reinstall only when the dependencies may have changed.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

docker:
	bash scripts/ensure-docker.sh

# Both sandbox images (python, datascience) and any the tiers file adds; a no-op (~0.3 s) when they are
# up to date. The first time: ~1 min for the base (debootstrap), ~1 min for the images (pip, docker build).
image: venv docker
	$(VENV)/bin/warmpool image

redis:
	bash scripts/ensure-redis.sh $(REDIS_PORT)

# Debian's chromium and chromedriver, for the dashboard's browser tests (a no-op when installed).
browser:
	bash scripts/ensure-chromium.sh

run: venv docker image
	$(VENV)/bin/warmpool serve --host $(API_HOST) --port $(API_PORT)

# The cluster tests run a worker on a second Docker engine of this machine (scripts/ensure-docker2.sh):
# started here with the runner image loaded into it, and stopped when the suite ends (its data root,
# and so the loaded image, is kept for the next run). The swarm deployment test (tests/test_swarm.py)
# deploys the service image on a swarm engine of its own; alone: `make test-swarm`.
DOCKER2_SOCK ?= /run/warmpool-docker2.sock

test: venv docker image redis browser service-image
	WARMPOOL_DOCKER2_SOCK=$(DOCKER2_SOCK) bash scripts/ensure-docker2.sh start
	status=0; WARMPOOL_TEST_REDIS_URL=redis://127.0.0.1:$(REDIS_PORT)/0 WARMPOOL_SERVICE_IMAGE=$(SERVICE_IMAGE) \
	  WARMPOOL_TEST_DOCKER2_HOST=unix://$(DOCKER2_SOCK) $(VENV)/bin/pytest -q $(PYTEST_ARGS) || status=$$?; \
	WARMPOOL_DOCKER2_SOCK=$(DOCKER2_SOCK) bash scripts/ensure-docker2.sh stop; exit $$status

# The image the deployments run (API, worker, Redis), from wheels and Debian packages fetched here
# (about a minute).
service-image: venv docker image
	$(VENV)/bin/warmpool service-image --tag $(SERVICE_IMAGE)

# 81 to 108 s here with the image build: deploy/swarm/stack.yml on a one-node swarm of a Docker engine
# started for the test (never the engine the other tests use); tasks, a resize and a drain through the
# deployed API, and its dashboard.
test-swarm: service-image browser
	WARMPOOL_SERVICE_IMAGE=$(SERVICE_IMAGE) $(VENV)/bin/pytest -q -m swarm $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy pool api warmpool runner_image
	$(VENV)/bin/mypy --explicit-package-bases benchmarks/soak

# Under a minute, with no Docker engine and no Redis: lint, then every test marked neither `docker` nor
# `redis` (the pool logic over a fake backend, the API in process, the pure model). DOCKER_HOST points
# nowhere and WARMPOOL_TEST_REDIS_URL is empty, so a test that reached for either would fail here.
check: lint
	DOCKER_HOST=unix:///nonexistent/docker.sock WARMPOOL_TEST_REDIS_URL= \
	  $(VENV)/bin/pytest -q -m "not docker and not redis and not root" $(PYTEST_ARGS)

# Bounded (about 20 minutes at the default 60 s per load session; BENCH_ARGS="--run-time 20" for ~10):
# every figure of issue 15 against servers it starts on loopback, each section with the load average and
# busy processes seen before it. Rewrites benchmarks/RESULTS.md only when the machine was quiet before
# every section; otherwise writes benchmarks/RESULTS.busy.md and fails, unless BENCH_ARGS has --allow-busy
# (the busy sections are then marked). BENCH_ARGS="--only python runsc" runs some sections.
bench: venv docker image
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

# Bounded (about 3 minutes): Redis hop latency (vs embedded) and throughput with one and two workers;
# starts its own redis-server; appends its section "Scale-out (Redis)" to benchmarks/RESULTS.md.
bench-scaleout: venv docker image redis
	$(PY) benchmarks/scaleout.py --markdown benchmarks/RESULTS.md

# Bounded (about 2 minutes): first streamed chunk latency (flush to client) and a session call against a
# plain one, embedded and scale-out; replaces its section "Streaming and sessions" of benchmarks/RESULTS.md.
bench-stream: venv docker image redis
	$(PY) benchmarks/stream_sessions.py --markdown benchmarks/RESULTS.md

# Bounded (about 2 minutes): a 100-task batch's throughput and the Python client's overhead over raw HTTP;
# writes its section "Batches and the Python client" of benchmarks/RESULTS.md.
bench-clients: venv docker image
	$(PY) benchmarks/clients.py

# Bounded (SOAK_S seconds of load, default 600, plus about 3 minutes of set-up and checks): a mixed load
# under injected faults, embedded then scale-out (two workers, a redis-server on SOAK_REDIS_PORT), on a
# dockerd of the soak's own (so that it may restart it); prints the ledger and exits 1 on any violation.
SOAK_S ?= 600
SOAK_ARGS ?=
soak: venv docker image
	SOAK_S=$(SOAK_S) $(PY) -m benchmarks.soak $(SOAK_ARGS)
