#!/usr/bin/env bash
# Set up everything the tests need on a Debian machine, then run them. `.ci/run` calls this.
set -euo pipefail
cd "$(dirname "$0")"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

packages="redis-server redis-sentinel openssl tini util-linux"
python3 -c 'import ensurepip' 2>/dev/null || packages="$packages python3-venv"  # Debian splits venv out
if ! command -v redis-server >/dev/null || ! command -v redis-sentinel >/dev/null || ! command -v openssl >/dev/null \
   || ! command -v tini >/dev/null || ! command -v unshare >/dev/null || [[ $packages == *python3-venv* ]]; then
  as_root apt-get update -qq
  # shellcheck disable=SC2086
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages >/dev/null
fi
# the distribution's redis-server service is not what the tests use: they start their own on a free port
as_root systemctl disable --now redis-server redis-sentinel >/dev/null 2>&1 || true

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'

if [ "${RESQUE_STARTER_SKIP_DOCKER:-}" != 1 ] && [ -x docker/ci-setup.sh ] && [ "$(id -u)" = 0 ]; then
  docker/ci-setup.sh
  trap 'docker/ci-teardown.sh || true' EXIT
fi

.venv/bin/ruff check .
.venv/bin/python -m mypy
# the tests mostly wait on real processes, so three at a time fit 2 cores (pytest-xdist; the container
# tests run in one worker, see tests/conftest.py); PYTEST_WORKERS=0 runs them one by one
.venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-3}" --dist loadgroup "$@"
# rq's own tests against our three worker classes, in parallel (tests/rq_suite/run.sh): here its worker,
# job, registry and command tests (1 to 1.5 minutes on 2 cores), unless pytest was given arguments;
# RESQUE_STARTER_RQ_SUITE=full runs all of them (the GitHub workflow does), =skip none.
rq_suite=quick
[ $# -eq 0 ] || rq_suite=skip
case "${RESQUE_STARTER_RQ_SUITE:-$rq_suite}" in
  quick) PYTHON=.venv/bin/python tests/rq_suite/run.sh --quick ;;
  full) PYTHON=.venv/bin/python tests/rq_suite/run.sh ;;
  skip) ;;
  *) echo "RESQUE_STARTER_RQ_SUITE=${RESQUE_STARTER_RQ_SUITE} is not allowed: quick, full or skip" >&2; exit 2 ;;
esac
