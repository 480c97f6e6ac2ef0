#!/usr/bin/env bash
# rq's own test suite against our worker classes (issue 18).
#
#   tests/rq_suite/run.sh [--quick] [CLASS...]     CLASS: worker (default: all three), prefork, simple
#
# Fetches the installed rq release's source archive from PyPI (its tests/ are not vendored here), and runs
# its tests once per class, the classes in parallel, each in a private network namespace with its own
# redis-server on 127.0.0.1:6379 (what rq's tests expect), so nothing clashes with any other Redis.
# sitecustomize.py puts our class where rq's tests name rq's; rq_suite_plugin.py marks the intended
# differences listed in expected_failures.txt as expected failures (strict: one that passes fails).
# --quick: only rq's worker, job, registry and command tests (what .ci/run runs).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"  # absolute: the suite runs from its own directory

files=(tests)
limit=1200  # seconds a class may take; a test that leaves a process behind can hang pytest's exit
if [ "${1:-}" = "--quick" ]; then
  files=(tests/test_worker.py tests/test_job.py tests/test_registry.py tests/test_commands.py)
  limit=600
  shift
fi
# RQ_SUITE_TESTS: rq's test files or ids to run instead (e.g. tests/test_worker_pool.py), to look at one
# shellcheck disable=SC2206 # split on purpose
[ -z "${RQ_SUITE_TESTS:-}" ] || files=(${RQ_SUITE_TESTS})
classes=("$@")
[ ${#classes[@]} -gt 0 ] || classes=(worker prefork simple)

version=$("$python" -c 'import rq; print(rq.__version__)')
work=$(mktemp -d -p /var/tmp)  # not under /tmp, which each run gets a private one of
logs=${RQ_SUITE_LOGS:-$work}  # set it to keep each class's log
mkdir -p "$logs"
trap 'rm -rf "$work"' EXIT
"$python" -m pip download -q --no-binary :all: --no-deps "rq==$version" -d "$work" >/dev/null
tar -xzf "$work/rq-$version.tar.gz" -C "$work" "rq-$version/tests" "rq-$version/pyproject.toml"
suite="$work/rq-$version"  # without rq's package: the tests run against the installed rq

# a network namespace of its own (127.0.0.1:6379 is free there), a /tmp of its own (rq's tests write fixed
# names there), and a PID namespace that takes every process of the run with it however the run ends
isolate=(unshare --net --pid --fork --kill-child --mount-proc)
[ "$(id -u)" = 0 ] || isolate=(unshare --user --map-root-user "${isolate[@]:1}")
isolate=(timeout -s KILL "$limit" "${isolate[@]}")  # unshare killed takes its namespace with it

run_class() {
  local class=$1
  # shellcheck disable=SC2016 # expanded by the inner shell
  mkdir -p "$work/outer-tmp"
  "${isolate[@]}" env RQ_SUITE_CLASS="$class" PYTHONPATH="$here:$root" PATH="$(dirname "$python"):$PATH" \
    ROOT="$root" OUTER_TMP="$work/outer-tmp" bash -c '
    set -eu
    ip link set lo up
    mount --bind /tmp "$OUTER_TMP"
    mount -t tmpfs tmpfs /tmp
    case "$ROOT" in  # a checkout under /tmp (a CI clone) stays where its venv expects it
      /tmp/*) mkdir -p "$ROOT" && mount --bind "$OUTER_TMP/${ROOT#/tmp/}" "$ROOT" ;;
    esac
    redis-server --port 6379 --bind 127.0.0.1 --save "" --appendonly no --logfile /tmp/redis.log &
    until redis-cli -p 6379 ping >/dev/null 2>&1; do sleep 0.05; done
    cd "$0"
    "$@"  # not exec: pytest as PID 1 would neither reap the orphans of rq'"'"'s tests nor die of signals
  ' "$suite" "$python" -m pytest -q -p no:cacheprovider -p no:hypothesispytest -p rq_suite_plugin -rfEX \
    -W ignore::DeprecationWarning "${files[@]}" >"$logs/$class.log" 2>&1
}

declare -A pids
for class in "${classes[@]}"; do
  run_class "$class" &
  pids[$class]=$!
done
failed=0
for class in "${classes[@]}"; do
  if wait "${pids[$class]}"; then result=passed; else result=FAILED; failed=1; fi
  summary=$(grep -E '^=* ?[0-9]+ (passed|failed)|^[0-9]+ (passed|failed)' "$logs/$class.log" | tail -n 1 || true)
  echo "rq $version suite, $class: $result: ${summary:-see $logs/$class.log}"
  if [ "$result" = FAILED ]; then grep -E '^(FAILED|ERROR|XPASS)' "$logs/$class.log" || tail -n 40 "$logs/$class.log"; fi
done
exit $failed
