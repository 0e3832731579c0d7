#!/bin/sh
# Scans SSH host keys and keeps only the pinned ones: what the image build
# installs as the warehouse's known_hosts (see the Dockerfile's host-keys
# stage and scripts/warehouse-host-keys.pin).
#
#   pin-host-keys.sh PIN_FILE OUT_FILE HOST[:PORT]...
#
# PIN_FILE has lines "HOST:PORT SHA256:..." ('#' comments); the extra pins
# in $WAREHOUSE_KEYSCAN_PINS (same form, entries separated by ',' or new
# lines) count too. For each target, the keys ssh-keyscan returns whose
# fingerprint is pinned for that HOST:PORT are appended to OUT_FILE; every
# scanned fingerprint is printed with "pinned" or "NOT PINNED". Exit 1 when
# a target returns no key, or none of its keys is pinned (a host key that
# changed, a man in the middle, or a pin never written): nothing is trusted
# on first use. POSIX sh: it runs in the build's Debian image (dash).
set -eu

if [ "$#" -lt 3 ]; then
    echo "usage: $0 PIN_FILE OUT_FILE HOST[:PORT]..." >&2
    exit 2
fi
pin_file=$1
out=$2
shift 2
[ -r "$pin_file" ] || { echo "ERROR: cannot read the pin file $pin_file" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The pins, one "HOST:PORT SHA256:..." per line, comments and blanks dropped.
{
    sed -e 's/#.*//' "$pin_file"
    printf '%s\n' "${WAREHOUSE_KEYSCAN_PINS:-}" | tr ',' '\n'
} | awk 'NF == 2 { print $1, $2 }' >"$work/pins"

: >>"$out"
status=0
for target in "$@"; do
    host=${target%:*}
    port=${target##*:}
    if [ "$host" = "$target" ]; then port=22; fi
    ssh-keyscan -T 20 -p "$port" "$host" >"$work/keys" 2>"$work/keyscan.err" || true
    if ! grep -qv '^#' "$work/keys"; then
        echo "ERROR: ssh-keyscan -p $port $host returned no host key." >&2
        echo "The warehouse must be reachable from the build's containers (docker build --network may help)," >&2
        echo "or build with --build-arg WAREHOUSE_KEYSCAN= and give the key at run time (WAREHOUSE_HOST_KEY=SHA256:...)." >&2
        sort -u "$work/keyscan.err" | sed 's/^/ssh-keyscan: /' >&2
        status=1
        continue
    fi
    pinned=0
    grep -v '^#' "$work/keys" >"$work/lines"
    while IFS= read -r line; do
        printf '%s\n' "$line" >"$work/one"
        fingerprint=$(ssh-keygen -l -f "$work/one" | awk '{ print $2 }')
        type=$(printf '%s\n' "$line" | awk '{ print $2 }')
        if grep -qxF "$host:$port $fingerprint" "$work/pins"; then
            echo "$host:$port $type $fingerprint pinned"
            printf '%s\n' "$line" >>"$out"
            pinned=$((pinned + 1))
        else
            echo "$host:$port $type $fingerprint NOT PINNED (ignored)"
        fi
    done <"$work/lines"
    if [ "$pinned" -eq 0 ]; then
        echo "ERROR: none of the host keys $host:$port returned is pinned for it in $pin_file or WAREHOUSE_KEYSCAN_PINS." >&2
        echo "Check the fingerprints above with the warehouse's admins (a changed key or a man in the middle look alike)," >&2
        echo "then add \"$host:$port SHA256:...\" to $pin_file, or pass --build-arg WAREHOUSE_KEYSCAN_PINS=." >&2
        status=1
    fi
done
exit "$status"
