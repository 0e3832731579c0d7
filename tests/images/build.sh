#!/usr/bin/env bash
# Build the local Docker images the integration tests run (no registry can
# be reached: each image is a rootfs made here and loaded with `docker import`).
#
#   openzim/mwoffliner:test  busybox + stand-in `mwoffliner` + redis-cli
#   openzim/youtube:test     busybox + stand-in `youtube2zim`
#   openzim/gutenberg:test   busybox + stand-in `gutenberg2zim`
#   openzim/phet:test        busybox + stand-in `phet2zim` (writes /phet/dist)
#   zimfarm/redis:test       Debian's real redis-server and redis-cli + busybox
#
# The stand-ins (standin/offliner.sh) copy a real ZIM file, made here by
# make_zim.py with the venv's libzim, from /opt/zims/demo.zim.
#
# Idempotent: every image carries a label with a hash of its inputs (this
# script, the stand-in, make_zim.py and libzim's version, and the binaries
# and libraries copied in); an image whose label matches is left alone.
# Each image built is smoke-tested, and untagged again if that fails.
#
# Usage: tests/images/build.sh [--force]   (--force: rebuild every image)
# Needs: docker, Debian's busybox-static and redis-server/redis-tools, and
# <repo>/.venv with libzim (scripts/test-env.sh makes all of these ready).
set -euo pipefail
shopt -s inherit_errexit

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd -- "$HERE/../.." && pwd)
SELF="$HERE/build.sh"
STANDIN="$HERE/standin/offliner.sh"
MAKE_ZIM="$HERE/make_zim.py"
VENV="$REPO/.venv"
BUSYBOX=/bin/busybox
REDIS_SERVER=/usr/bin/redis-server
REDIS_CLI=/usr/bin/redis-cli
LABEL=org.openzim.zimfarm-worker.test-inputs
LOCK="${TMPDIR:-/tmp}/zimfarm-worker-test-images.lock"

STANDIN_IMAGES=(openzim/mwoffliner:test openzim/youtube:test
    openzim/gutenberg:test openzim/phet:test)
REDIS_IMAGE=zimfarm/redis:test

FORCE=0
case "${1:-}" in
    '') ;;
    --force) FORCE=1 ;;
    *)
        printf 'usage: %s [--force]\n' "$0" >&2
        exit 2
        ;;
esac

log() { printf 'test-images: %s\n' "$*" >&2; }
die() {
    printf 'test-images: ERROR: %s\n' "$*" >&2
    exit 1
}

WORK=
cleanup() { [ -z "$WORK" ] || rm -rf -- "$WORK"; }
trap cleanup EXIT

# ------------------------------------------------------------------ inputs

# The program each stand-in image runs.
program_of() {
    case "$1" in
        openzim/mwoffliner:*) echo mwoffliner ;;
        openzim/youtube:*) echo youtube2zim ;;
        openzim/gutenberg:*) echo gutenberg2zim ;;
        openzim/phet:*) echo phet2zim ;;
        *) die "no stand-in program for $1" ;;
    esac
}

# The shared libraries (and the dynamic loader) an ELF binary needs.
libs_of() {
    local out
    out=$(ldd "$1") || die "ldd $1 failed"
    if grep -q 'not found' <<<"$out"; then
        die "$1 misses libraries: $(grep 'not found' <<<"$out" | tr -s ' \t\n' ' ')"
    fi
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$out" | sort -u
}

# The installed libzim's version, from the venv's dist-info (no interpreter
# start on the warm path).
libzim_version() {
    local info
    for info in "$VENV"/lib/python3*/site-packages/libzim-*.dist-info; do
        [ -d "$info" ] || continue
        info=${info##*/libzim-}
        echo "${info%.dist-info}"
        return 0
    done
    echo missing
}

# The hash of everything an image is made of.
inputs_hash() {
    local image=$1 files=("$SELF" "$BUSYBOX") libs
    {
        echo "image $image"
        case "$image" in
            "$REDIS_IMAGE")
                files+=("$REDIS_SERVER" "$REDIS_CLI")
                libs=$(libs_of "$REDIS_SERVER"; libs_of "$REDIS_CLI")
                mapfile -t -O "${#files[@]}" files <<<"$libs"
                ;;
            *)
                echo "libzim $(libzim_version)"
                files+=("$STANDIN" "$MAKE_ZIM")
                if [ "$(program_of "$image")" = mwoffliner ]; then
                    files+=("$REDIS_CLI")
                    libs=$(libs_of "$REDIS_CLI")
                    mapfile -t -O "${#files[@]}" files <<<"$libs"
                fi
                ;;
        esac
        # Contents, and the names relative to the repository: a clone in
        # another folder finds its images up to date.
        printf 'file %s\n' "${files[@]#"$REPO/"}"
        sha256sum -- "${files[@]}" | cut -d' ' -f1
    } | sha256sum | cut -d' ' -f1
}

current_hash() {
    docker image inspect -f "{{ index .Config.Labels \"$LABEL\" }}" "$1" 2>/dev/null || true
}

# ------------------------------------------------------------------ rootfs

workdir() {
    [ -n "$WORK" ] || WORK=$(mktemp -d "${TMPDIR:-/tmp}/zimfarm-test-images.XXXXXX")
}

# The demo ZIM, made once per run and only when an image needs it.
DEMO_ZIM=
demo_zim() {
    [ -z "$DEMO_ZIM" ] || return 0
    workdir
    [ -x "$VENV/bin/python" ] || die "no $VENV: run scripts/test-env.sh first"
    "$VENV/bin/python" -c 'import libzim' 2>/dev/null \
        || die "$VENV has no libzim (tests/py/requirements.txt): run scripts/test-env.sh"
    # libzim prints its progress on stdout; keep ours for nothing.
    "$VENV/bin/python" "$MAKE_ZIM" "$WORK/demo.zim" >&2 || die "make_zim.py failed"
    DEMO_ZIM="$WORK/demo.zim"
}

# A fresh rootfs with busybox and a symlink for each of its applets.
new_rootfs() {
    local root=$1 applet
    mkdir -p "$root"/{bin,etc,root,tmp,usr/bin,usr/local/bin}
    chmod 1777 "$root/tmp"
    cp -- "$BUSYBOX" "$root/bin/busybox"
    while read -r applet; do
        [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
    done < <("$BUSYBOX" --list)
    ln -s /bin/busybox "$root/usr/bin/env"
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
    printf 'root:x:0:\n' >"$root/etc/group"
}

# Copies an ELF binary (symlinks resolved) to DEST in the rootfs, with its
# libraries and loader at the paths ldd names.
add_elf() {
    local root=$1 binary=$2 dest=$3 lib libs
    libs=$(libs_of "$binary")
    install -D -m 0755 -- "$binary" "$root$dest"
    while read -r lib; do
        [ -e "$root$lib" ] || install -D -m 0755 -- "$lib" "$root$lib"
    done <<<"$libs"
}

# Imports a rootfs as IMAGE, with the inputs label and Dockerfile-style
# changes; removes the image the tag named before when nothing else uses it.
import_rootfs() {
    local root=$1 image=$2 hash=$3 old new
    shift 3
    local changes=(--change "LABEL $LABEL=$hash" --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin')
    local change
    for change in "$@"; do changes+=(--change "$change"); done
    old=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)
    new=$(tar --numeric-owner --owner=0 --group=0 -C "$root" -c . \
        | docker import --message "zimfarm-worker test image (tests/images/build.sh)" \
            "${changes[@]}" - "$image") || die "docker import of $image failed"
    if [ -n "$old" ] && [ "$old" != "$new" ]; then
        docker image rm "$old" >/dev/null 2>&1 || true
    fi
}

# Runs a smoke test; on failure untags the image, so that the next run
# rebuilds it, and stops.
smoke() {
    local image=$1 out
    shift
    if ! out=$(docker run --rm --network none "$@" 2>&1); then
        docker image rm "$image" >/dev/null 2>&1 || true
        die "smoke test of $image failed: $out"
    fi
    printf '%s\n' "$out"
}

build_standin() {
    local image=$1 hash=$2 prog root
    prog=$(program_of "$image")
    demo_zim
    root="$WORK/rootfs-$prog"
    rm -rf -- "$root"
    new_rootfs "$root"
    install -m 0755 -- "$STANDIN" "$root/usr/local/bin/$prog"
    install -D -m 0644 -- "$DEMO_ZIM" "$root/opt/zims/demo.zim"
    mkdir -p "$root/output"
    local changes=("CMD [\"$prog\"]")
    case "$prog" in
        mwoffliner) add_elf "$root" "$REDIS_CLI" /usr/bin/redis-cli ;;
        phet2zim)
            mkdir -p "$root/phet/dist"
            changes+=('WORKDIR /phet')
            ;;
    esac
    import_rootfs "$root" "$image" "$hash" "${changes[@]}"
    local out
    out=$(smoke "$image" "$image" "$prog" --zims=0)
    [ "$(tail -n 1 <<<"$out")" = "done" ] || {
        docker image rm "$image" >/dev/null 2>&1 || true
        die "smoke test of $image: unexpected output: $out"
    }
    if [ "$prog" = mwoffliner ]; then
        smoke "$image" "$image" redis-cli --version >/dev/null
    fi
}

build_redis() {
    local image=$1 hash=$2 root
    workdir
    root="$WORK/rootfs-redis"
    rm -rf -- "$root"
    new_rootfs "$root"
    add_elf "$root" "$REDIS_SERVER" /usr/bin/redis-server
    add_elf "$root" "$REDIS_CLI" /usr/bin/redis-cli
    mkdir -p "$root/run/redis" "$root/data"
    import_rootfs "$root" "$image" "$hash" 'WORKDIR /data' \
        'ENTRYPOINT ["/usr/bin/redis-server"]'
    smoke "$image" "$image" --version >/dev/null
    smoke "$image" --entrypoint redis-cli "$image" --version >/dev/null
}

# -------------------------------------------------------------------- main

main() {
    local image hash built=0 start=$SECONDS
    command -v docker >/dev/null 2>&1 || die "no docker command"
    docker info >/dev/null 2>&1 || die "the Docker engine does not answer"
    local need
    for need in "$BUSYBOX" "$REDIS_SERVER" "$REDIS_CLI"; do
        [ -x "$need" ] || die "missing $need (Debian's busybox-static, redis-server, redis-tools)"
    done

    # One build at a time: a second caller waits, then finds all up to date.
    exec 9>"$LOCK"
    flock 9

    for image in "${STANDIN_IMAGES[@]}" "$REDIS_IMAGE"; do
        hash=$(inputs_hash "$image")
        if [ "$FORCE" -eq 0 ] && [ "$(current_hash "$image")" = "$hash" ]; then
            continue
        fi
        log "building $image"
        if [ "$image" = "$REDIS_IMAGE" ]; then
            build_redis "$image" "$hash"
        else
            build_standin "$image" "$hash"
        fi
        built=$((built + 1))
    done
    if [ "$built" -gt 0 ]; then
        log "built $built image(s) in $((SECONDS - start))s"
    fi
}

main "$@"
