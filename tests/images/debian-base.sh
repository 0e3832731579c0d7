#!/usr/bin/env bash
# Make zimfarm/debian-bookworm:local, a stand-in for the registry's
# debian:bookworm-slim on a machine that cannot pull images: a
# `debootstrap --variant=minbase bookworm` rootfs loaded with `docker import`,
# with the apt sources (bookworm, -updates, -security), apt settings (no
# caches left in layers) and dpkg path excludes (no docs, man pages,
# locales) of the official slim image.
# scripts/image-test.sh builds the Dockerfile's runtime stages on it.
#
# Idempotent: the image carries a label with a hash of this script (which
# holds every input: suite, variant, mirror, files written); an image whose
# label matches is left alone (well under a second). A fresh build takes
# about 1.5 minutes (downloads ~50 MB from the mirror).
#
# Usage: tests/images/debian-base.sh [--force]   (--force: rebuild it)
# Needs: root, docker, debootstrap (Debian's package of that name).
set -euo pipefail
shopt -s inherit_errexit

SELF=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)/$(basename -- "${BASH_SOURCE[0]}")
IMAGE=${DEBIAN_BASE_IMAGE:-zimfarm/debian-bookworm:local}
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
SECURITY_MIRROR=http://deb.debian.org/debian-security
LABEL=org.openzim.zimfarm-worker.base-inputs
LOCK="${TMPDIR:-/tmp}/zimfarm-worker-debian-base.lock"

FORCE=0
case "${1:-}" in
    '') ;;
    --force) FORCE=1 ;;
    *)
        printf 'usage: %s [--force]\n' "$0" >&2
        exit 2
        ;;
esac

log() { printf 'debian-base: %s\n' "$*" >&2; }
die() {
    printf 'debian-base: ERROR: %s\n' "$*" >&2
    exit 1
}

WORK=
cleanup() { [ -z "$WORK" ] || rm -rf -- "$WORK"; }
trap cleanup EXIT

inputs_hash() {
    { echo "$IMAGE $SUITE $MIRROR $SECURITY_MIRROR"; cat -- "$SELF"; } | sha256sum | cut -d' ' -f1
}

current_hash() {
    docker image inspect -f "{{ index .Config.Labels \"$LABEL\" }}" "$IMAGE" 2>/dev/null || true
}

# What the official slim image adds to a plain debootstrap.
slim_like() {
    local root=$1
    # Every path below is under $root: never let it be the host's /.
    case $root in
    '' | / | //*) die "refusing to trim the rootfs '$root'" ;;
    esac
    rm -f -- "$root/etc/apt/sources.list"
    cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    mkdir -p "$root/etc/dpkg/dpkg.cfg.d"
    cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
# As in debian:bookworm-slim: no documentation, man pages or translations.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/info/*
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
EOF
    # The apt settings of the official images (debuerreotype): no package
    # caches or .debs left in layers, compressed lists, no translations.
    cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    printf 'Acquire::GzipIndexes "true";\n' >"$root/etc/apt/apt.conf.d/docker-gzip-indexes"
    printf 'Acquire::Languages "none";\n' >"$root/etc/apt/apt.conf.d/docker-no-languages"
    printf 'Apt::AutoRemove::SuggestsImportant "false";\n' >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf -- "$root"/usr/share/{info,man,groff,linda,lintian,locale}/*
    rm -rf -- "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
        "$root"/var/cache/apt/archives/*.deb "$root"/var/log/*.log \
        "$root"/var/log/apt/* "$root/etc/hostname" "$root/etc/resolv.conf"
    : >"$root/etc/machine-id"
}

main() {
    local hash start=$SECONDS
    command -v docker >/dev/null 2>&1 || die "no docker command"
    docker info >/dev/null 2>&1 || die "the Docker engine does not answer"

    # One build at a time: a second caller waits, then finds it up to date.
    exec 9>"$LOCK"
    flock 9

    hash=$(inputs_hash)
    if [ "$FORCE" -eq 0 ] && [ "$(current_hash)" = "$hash" ]; then
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "must run as root to debootstrap $IMAGE"
    command -v debootstrap >/dev/null 2>&1 \
        || die "no debootstrap (apt-get install debootstrap)"

    WORK=$(mktemp -d "${TMPDIR:-/tmp}/zimfarm-debian-base.XXXXXX")
    log "debootstrap --variant=minbase $SUITE from $MIRROR (log: $WORK/debootstrap.log)"
    if ! debootstrap --variant=minbase "$SUITE" "$WORK/root" "$MIRROR" \
        >"$WORK/debootstrap.log" 2>&1; then
        tail -n 20 "$WORK/debootstrap.log" >&2
        die "debootstrap failed"
    fi
    slim_like "$WORK/root"

    local old new
    old=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
    new=$(tar --numeric-owner -C "$WORK/root" -c . \
        | docker import --message "debootstrap --variant=minbase $SUITE (tests/images/debian-base.sh)" \
            --change "LABEL $LABEL=$hash" \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["bash"]' - "$IMAGE") || die "docker import of $IMAGE failed"
    if [ -n "$old" ] && [ "$old" != "$new" ]; then
        docker image rm "$old" >/dev/null 2>&1 || true
    fi
    docker run --rm --network none "$IMAGE" sh -c 'test -x /usr/bin/apt-get && grep -q bookworm /etc/os-release' \
        || { docker image rm "$IMAGE" >/dev/null 2>&1 || true; die "smoke test of $IMAGE failed"; }
    log "built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | numfmt --to=iec) in $((SECONDS - start))s)"
}

main "$@"
