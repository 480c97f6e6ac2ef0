#!/usr/bin/env bash
# Make a Docker engine available for the container tests, idempotently:
#   1. install docker.io, a compose (plugin or docker-compose) and debootstrap when missing;
#   2. start dockerd (no bridge, no iptables: everything runs with host networking) unless an
#      engine already answers, and remember that we started it (ci-teardown.sh stops only that one);
#   3. build the local base image (cached by tag) since no image registry can be reached here.
# Prints `export RESQUE_STARTER_BASE_IMAGE=...` as its last line for callers that eval it.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
state="${RESQUE_STARTER_CI_STATE:-/tmp/resque-starter-ci}"
base_image="${RESQUE_STARTER_BASE_IMAGE:-resque-starter-base:bookworm}"
mkdir -p "$state"

log() { echo "ci-setup: $*" >&2; }

have_compose() { docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1; }

install_missing() {
    local packages=()
    command -v dockerd >/dev/null 2>&1 || packages+=(docker.io)
    # debian-archive-keyring: debootstrap verifies Debian suites with it on non-Debian hosts too.
    command -v debootstrap >/dev/null 2>&1 || packages+=(debootstrap debian-archive-keyring)
    if ! have_compose; then packages+=(docker-compose); fi
    ((${#packages[@]})) || return 0
    log "apt-get install ${packages[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
}

engine_up() { docker info >/dev/null 2>&1; }

wait_engine() {  # wait_engine PID: until the engine answers, PID dies, or 60 s pass
    local deadline=$((SECONDS + 60))
    until engine_up; do
        kill -0 "$1" 2>/dev/null && ((SECONDS <= deadline)) || return 1
        sleep 0.5
    done
}

start_engine() {
    local other
    other="$(cat /var/run/docker.pid 2>/dev/null || true)"
    if engine_up || { [[ -n "$other" ]] && wait_engine "$other"; }; then
        log "a Docker engine already answers; using it"
        return 0
    fi
    log "starting dockerd --bridge=none --iptables=false (log: $state/dockerd.log)"
    setsid dockerd --bridge=none --iptables=false >"$state/dockerd.log" 2>&1 </dev/null &
    echo $! >"$state/dockerd.pid"
    if ! wait_engine "$(cat "$state/dockerd.pid")"; then
        log "dockerd did not come up:"; tail -20 "$state/dockerd.log" >&2
        return 1
    fi
    log "dockerd is up (pid $(cat "$state/dockerd.pid"))"
}

install_missing
start_engine
RESQUE_STARTER_BASE_IMAGE="$base_image" "$here/build-base-image.sh" "$base_image" >&2
echo "export RESQUE_STARTER_BASE_IMAGE=$base_image"
