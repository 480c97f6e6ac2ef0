# resque-starter: a PID-1 supervisor that preloads an app and forks rq workers over it.
# `docker run IMAGE` alone starts the demo (embedded redis-server, example jobs, logs on stderr);
# production runs `resque-starter run` with REDIS_URL and RESQUE_STARTER_APP set.
#
# BASE_IMAGE may be any Debian-based image with python3 (>= 3.11) and its venv module, e.g. the
# official python:*-slim-bookworm (python3 in /usr/local/bin) or a debootstrapped Debian with
# python3-venv (python3 in /usr/bin): both stages use the same base, so the venv's interpreter
# symlink stays valid.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY . .
# [metrics]: prometheus-client, so RESQUE_STARTER_METRICS_PORT works in the stock image.
RUN /opt/venv/bin/pip install --no-cache-dir '.[metrics]' \
    && /opt/venv/bin/resque-starter --version

FROM ${BASE_IMAGE}
# redis-server: the demo's embedded Redis. procps: `kill -TTIN 1` and `ps` via docker/kubectl exec.
# tini: NOT our init (it drops TTIN/TTOU); it is here for job code that runs subprocess trees
# (`tini -s -- cmd`). Versions follow the base's Debian release, so they are not pinned here.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends procps redis-server tini \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 resque \
    && useradd --system --uid 10001 --gid resque --home-dir /home/resque --create-home \
        --shell /usr/sbin/nologin resque \
    && install -d -o resque -g resque -m 0700 /run/resque-starter
# The venv belongs to the image's user, so an image built FROM this one installs its app's
# dependencies with a plain `RUN pip install ...` as that user (examples/app/Dockerfile); at run time
# the root filesystem can still be read-only (--read-only, readOnlyRootFilesystem).
COPY --from=builder --chown=10001:10001 /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RESQUE_STARTER_RUN_DIR=/run/resque-starter
USER 10001:10001
WORKDIR /home/resque
# resque-starter is PID 1 itself: it reaps orphans and handles every signal (no tini/dumb-init).
# SIGTERM (docker stop, kubelet) is a graceful drain bounded by RESQUE_STARTER_DRAIN_TIMEOUT.
STOPSIGNAL SIGTERM
# The check is the supervisor's liveness; a container of this image that runs something else as its
# PID 1 by design (compose's producer, a one-off script) has no supervisor to check and stays healthy.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["sh", "-c", "grep -qs resque-starter /proc/1/cmdline || exit 0; exec resque-starter ctl health --live"]
ENTRYPOINT ["resque-starter"]
CMD ["demo"]
