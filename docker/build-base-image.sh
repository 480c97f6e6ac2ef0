#!/usr/bin/env bash
# Build a Debian bookworm base image with python3 + venv from the apt mirror this machine uses,
# for machines that cannot pull from an image registry. The machine's CA bundle goes in (and
# pip is told to use it) so pip inside `docker build` trusts an intercepting HTTPS proxy.
# Idempotent: does nothing when the tag already exists (FORCE=1 rebuilds).
set -euo pipefail

TAG="${1:-${RESQUE_STARTER_BASE_IMAGE:-resque-starter-base:bookworm}}"
SUITE="${DEBIAN_SUITE:-bookworm}"

if [[ "${FORCE:-0}" != 1 ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "base image $TAG exists; skipping (FORCE=1 rebuilds)"
    exit 0
fi

# "URI SUITE" of every Debian repository apt uses here for $SUITE (and -updates, -security).
apt_repos() {
    # shellcheck disable=SC2016  # apt's own $(FIELD) placeholders, not shell expansions
    apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null | awk -v s="$SUITE" '$2 ~ "^" s' | sort -u
}

# The mirror apt uses here (it may be a local proxy), else Debian's own.
mirror="${DEBIAN_MIRROR:-$(apt_repos | awk -v s="$SUITE" '$2 == s {print $1; exit}')}"
mirror="${mirror:-http://deb.debian.org/debian/}"

root="$(mktemp -d /var/tmp/resque-starter-base.XXXXXX)"
cleanup() {
    # debootstrap may leave /proc, /sys or a bound /dev mounted in the target when it fails:
    # unmount them first and never let rm cross into another file system.
    grep -o " $root/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf --one-file-system "$root" "$root.log"
}
trap cleanup EXIT

echo "debootstrap $SUITE from $mirror into $root"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$root" "$mirror" >"$root.log" 2>&1 || { tail -50 "$root.log"; exit 1; }

# Trust what this machine trusts, durably (update-ca-certificates keeps local certs).
bundle=/etc/ssl/certs/ca-certificates.crt
if [[ -f "$bundle" ]]; then
    cp "$bundle" "$root/usr/local/share/ca-certificates/host-ca-bundle.crt"
    chroot "$root" update-ca-certificates >/dev/null 2>&1
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
fi

# Same apt sources as the host (updates, security), so `apt-get install` in the image matches it.
sources="$(apt_repos | awk '{print "deb " $1 " " $2 " main"}')"
printf '%s\n' "${sources:-deb ${mirror} ${SUITE} main}" >"$root/etc/apt/sources.list"
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/tmp/*

tar -C "$root" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null
echo "built base image $TAG"
