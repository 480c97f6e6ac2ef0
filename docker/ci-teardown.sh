#!/usr/bin/env bash
# Stop the dockerd that ci-setup.sh started (and only that one); a no-op otherwise.
# Images stay in /var/lib/docker, so the base image is cached for the next run.
set -euo pipefail

state="${RESQUE_STARTER_CI_STATE:-/tmp/resque-starter-ci}"
pidfile="$state/dockerd.pid"
[[ -f "$pidfile" ]] || exit 0
pid="$(cat "$pidfile")"
rm -f "$pidfile"

# A stale pid file must not make us signal an unrelated process that reused the pid.
if ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qE '^(\S*/)?dockerd '; then
    exit 0
fi
echo "ci-teardown: stopping dockerd (pid $pid)" >&2
kill -TERM "$pid"
for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || exit 0
    sleep 0.5
done
echo "ci-teardown: dockerd did not stop in 30 s; killing it" >&2
kill -KILL "$pid" 2>/dev/null || true
