# agentplane — the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_FILES := $(shell find protos -name '*.proto' | sort)

.PHONY: imports lock run test test-fast typecheck protos protos-check protos-lint lint bench bench-churn bench-peers bench-redis screenshots profile certs clean

LOCK := requirements.lock
# The tool that writes the lock, itself at a fixed version (only `make lock` uses it).
UV_VERSION := 0.13.9

# Exact versions with their hashes from the lock, then the project itself without
# resolving anything again: a newer release on the registry changes nothing here.
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

## Rewrite the lock: every dependency at the newest release the registry serves (then
## `make protos` if grpcio-tools moved, and `make test`). `make lock UPGRADE=grpcio` moves
## one package; `make lock UPGRADE=` keeps every pin and only follows pyproject.toml.
UPGRADE ?= all
lock:
	@test -x .run/uv/bin/uv || (python3 -m venv .run/uv && .run/uv/bin/pip install -q uv==$(UV_VERSION))
	.run/uv/bin/uv pip compile pyproject.toml --extra dev --generate-hashes --universal \
	  --python-version 3.11 --quiet -o $(LOCK) \
	  $(if $(filter all,$(UPGRADE)),--upgrade,$(if $(UPGRADE),--upgrade-package $(UPGRADE)))

## Start Redis, the three services and the gateway in the foreground; Ctrl-C stops all.
run: $(STAMP)
	$(PY) -m scripts.run_cluster

## Run the whole suite against real Redis servers and real gRPC servers.
test: $(STAMP)
	$(PY) -m pytest -q

## The quick loop: unit and single-service tests (no real processes, no Redis Cluster).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not e2e"

## Regenerate the Python code and type stubs from protos/ into agentplane/.
protos: $(STAMP)
	$(PY) -m scripts.gen_protos

## Fail when the committed generated code differs from what the protos produce.
protos-check: $(STAMP)
	$(PY) -m scripts.gen_protos --check

## buf lint (STANDARD + COMMENTS) over protos/ (googleapis' protos are vendored there).
protos-lint: $(STAMP)
	$(VENV)/bin/buf lint

## buf lint, the import layers, ruff (style, imports, complexity ≤ 12), ruff format, mypy.
lint: $(STAMP) protos-lint imports typecheck
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

## The house's layers (pyproject.toml [tool.importlinter]): generated code, chassis,
## services side by side, gateway; the SDK imports no service code; no import cycles.
imports: $(STAMP)
	$(VENV)/bin/lint-imports

## mypy over everything but the generated code (CI runs it too).
typecheck: $(STAMP)
	$(VENV)/bin/mypy services gateway scripts bench agentplane/client agentplane/worker agentplane/cli

## A development CA and service certificate for mutual TLS, in .run/certs/.
certs: $(STAMP)
	$(PY) -m scripts.make_certs .run/certs

bench: $(STAMP)
	$(PY) -m bench

## Screenshots of the console's pages (docs/console/), from its browser tests.
screenshots: $(STAMP)
	SCREENSHOTS_DIR=docs/console $(PY) -m pytest -q tests/console

## Where RecordUsage spends the usage service's CPU (py-spy), see docs/performance.md.
profile: $(STAMP)
	$(PY) -m pip install -q "py-spy>=0.3.14"
	$(PY) -m bench.profile

## One EVALSHA of the usage script through each Redis client (docs/performance.md).
## The model gateway beside the LiteLLM proxy (in a venv of its own, .run/litellm) in
## front of the same fake provider, measured in the same rounds (SPEC §19).
LITELLM_VERSION := 1.108.7
bench-peers: $(STAMP)
	@test -x .run/litellm/bin/litellm || (python3 -m venv .run/litellm && \
	  .run/litellm/bin/pip install -q "litellm[proxy]==$(LITELLM_VERSION)")
	$(PY) -m bench.models --peers

bench-redis: $(STAMP)
	$(PY) -m pip install -q "coredis>=4" "valkey-glide>=1"
	$(PY) -m bench.redis_clients

## Bounded memory under churn: 1,000,000 messages through 100,000 threads (SPEC §10).
bench-churn: $(STAMP)
	$(PY) -m bench.churn

clean:
	rm -rf $(VENV) .pytest_cache
