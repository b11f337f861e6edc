# Developer and CI entry points. `make test` is what .ci/run runs.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c

# Size of the simulated clusters (clusters/sim): how many, and fake nodes each.
SIM_CLUSTERS ?= 3
SIM_NODES ?= 4
export SIM_CLUSTERS SIM_NODES

CARGO ?= cargo

.PHONY: demo lint sim-build sim-up sim-down test

## Build, start $(SIM_CLUSTERS) simulated clusters, install the CRD and the
## examples in each, and run kube-prefetch on all of them in the foreground,
## showing progress until every Prefetch is READY (Ctrl-C stops it).
demo:
	deploy/demo.sh

## shellcheck, hadolint, and the Dockerfile's builder-stage commands.
lint:
	deploy/lint.sh

## Build (or reuse the cached) kube-apiserver, kubectl, etcd and kwok.
sim-build:
	clusters/sim/build

## Start $(SIM_CLUSTERS) simulated clusters with $(SIM_NODES) nodes each (no-op if running).
sim-up: sim-build
	clusters/sim/up --clusters $(SIM_CLUSTERS) --nodes $(SIM_NODES)

## Stop the simulated clusters and remove their state.
sim-down:
	clusters/sim/down

## Format and lint checks, then every test against fresh simulated clusters.
## The clusters are stopped at the end whatever happens; the exit code is the
## first failure's.
test:
	trap 'clusters/sim/down >/dev/null 2>&1 || echo "make test: clusters/sim/down failed" >&2' EXIT; \
	$(CARGO) fmt --all -- --check; \
	$(CARGO) clippy --all-targets -- -D warnings; \
	deploy/lint.sh; \
	clusters/sim/build; \
	clusters/sim/up --clusters $(SIM_CLUSTERS) --nodes $(SIM_NODES); \
	$(CARGO) test; \
	$(CARGO) test --test sim_down -- --ignored; \
	clusters/sim/check-ports
