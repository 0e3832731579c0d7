#!/usr/bin/env bash
# Tests scripts/pin-host-keys.sh (what the image build runs to install the
# warehouse's host keys) against a throwaway sshd on 127.0.0.1 with two
# host keys: a pinned key is installed and the other is not; no pin, a pin
# of another host or an unreachable host fail the build; the build arg's
# extra pins count.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
script="$repo/scripts/pin-host-keys.sh"
# shellcheck source=scripts/lib/farm-services.sh
source "$repo/scripts/lib/farm-services.sh"

work=$(mktemp -d)
sshd_pid=
cleanup() {
    if [ -n "$sshd_pid" ]; then kill "$sshd_pid" 2>/dev/null || true; fi
    rm -rf -- "$work"
}
trap cleanup EXIT
fail() { echo "pin-host-keys-test: FAIL: $*" >&2; exit 1; }

ssh-keygen -q -t ed25519 -N '' -f "$work/ed25519"
ssh-keygen -q -t ecdsa -N '' -f "$work/ecdsa"
port=$(farm_free_port)
printf '%s\n' "HostKey $work/ed25519" "HostKey $work/ecdsa" "ListenAddress 127.0.0.1" \
    "Port $port" "PidFile $work/sshd.pid" "UsePAM no" >"$work/sshd_config"
/usr/sbin/sshd -D -e -f "$work/sshd_config" 2>"$work/sshd.log" &
sshd_pid=$!
farm_wait_port "$port" || fail "sshd did not start: $(cat "$work/sshd.log")"

ed=$(ssh-keygen -l -f "$work/ed25519.pub" | awk '{ print $2 }')
ec=$(ssh-keygen -l -f "$work/ecdsa.pub" | awk '{ print $2 }')
target="127.0.0.1:$port"
fingerprints() { ssh-keygen -l -f "$1" | awk '{ print $2 }' | sort | tr '\n' ' '; }

# The pinned key alone is installed.
printf '%s\n' "# a comment" "$target $ed  # the ed25519 key" "other.example:22 $ec" >"$work/pins"
"$script" "$work/pins" "$work/known_hosts" "$target" >"$work/out" || fail "a pinned key was refused: $(cat "$work/out")"
[ "$(fingerprints "$work/known_hosts")" = "$ed " ] || fail "known_hosts is not the pinned key: $(cat "$work/known_hosts")"
grep -q "$ec NOT PINNED" "$work/out" || fail "the unpinned key is not named: $(cat "$work/out")"

# A pin for another host, or none: the build fails and installs nothing.
printf '%s\n' "other.example:22 $ed" "127.0.0.1:1 $ec" >"$work/wrong"
if "$script" "$work/wrong" "$work/none" "$target" >"$work/out" 2>&1; then
    fail "keys pinned for another host were trusted"
fi
[ ! -s "$work/none" ] || fail "a refused scan installed keys"
grep -q "none of the host keys $target returned is pinned" "$work/out" || fail "no reason given: $(cat "$work/out")"

# The build arg's pins count, several at once.
WAREHOUSE_KEYSCAN_PINS="$target $ec,$target $ed" "$script" "$work/wrong" "$work/both" "$target" >/dev/null \
    || fail "WAREHOUSE_KEYSCAN_PINS was not read"
[ "$(fingerprints "$work/both")" = "$(printf '%s\n' "$ed" "$ec" | sort | tr '\n' ' ')" ] \
    || fail "not both pinned keys: $(cat "$work/both")"

# A host that returns no key fails too.
kill "$sshd_pid"; wait "$sshd_pid" 2>/dev/null || true; sshd_pid=
if "$script" "$work/pins" "$work/gone" "$target" >"$work/out" 2>&1; then
    fail "an unreachable host passed"
fi
grep -q "returned no host key" "$work/out" || fail "no reason given: $(cat "$work/out")"

echo "pin-host-keys-test: ok (pinned key installed, unpinned ones refused, build-arg pins read, unreachable host refused)"
