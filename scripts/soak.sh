#!/usr/bin/env bash
# A seeded chaos soak of a small farm on this machine (issue 12): two
# Docker-runner workers on one queue (the stand-in mwoffliner, each task
# uploading a ZIM and a 4-24 MiB file to a real OpenSSH warehouse) and one
# simulate-runner worker on another, fed a steady stream of tasks while a
# fault injector, at random times drawn from SOAK_SEED: closes a worker's
# broker connections, stops and restarts sshd mid-upload, kill -9s and
# restarts a worker, `docker kill`s a running offliner from outside, fills
# the workers' disk (a tmpfs) briefly, delays the dispatcher while a worker
# restarts behind it, restarts a Docker worker mid-scrape with SIGTERM (as
# `docker restart` does), kill -9s one mid-scrape with a restart within
# 10 s, freezes a Docker worker (SIGSTOP for 15-60 s, shorter in a short
# run, then SIGCONT) and raises a RabbitMQ memory alarm for 15 s (every
# publisher blocked; the watermark is restored after it, and at the soak's
# start and end). Faults are dealt from a deck holding each kind asked for
# once; a run too short for a whole deck goes on (up to 120 s more) until
# every kind was injected. The workers get RESTART_GRACE=120, longer than
# the longest stall plus a restart (printed with the table). Then it drains
# and prints a table: tasks sent, succeeded, failed (reasons tallied),
# lost, doubled, scrapes redone (a task whose offliner container Docker's
# events show created more than once), ZIMs byte-identical to what the
# scraper wrote, RSS and open descriptors of each worker life, the
# SIGTERM-to-exit times, and a last `N passed, M failed` line (exit 1 when
# a check failed). 0 lost, 0 doubled and 0 scrapes redone are checks, on
# the farm as on one node (SOAK_NODES=1: one Docker worker and the
# simulate one). soak-d1 is never killed on the farm (the simulate worker on one
# node), so that one worker life spans the soak: its RSS and open
# descriptors, taken once the warm-up tasks ended and each worker's broker
# connection was cut once, and again after the drain (both idle moments),
# are the ones judged; the descriptors that grew are named by kind.
#
# Usage: scripts/soak.sh
#   SOAK_SECONDS   how long tasks are sent and faults injected (default 600)
#   SOAK_SEED      the fault and task schedule (default: random; printed)
#   SOAK_PROFILE   release (default) or dev (reuses the test build; CI)
#   SOAK_NODES     Docker workers: 2 (default, a farm) or 1
#   SOAK_FAULTS    all (default), none, or a comma-separated list of
#                  close_connections,sshd_restart,kill_worker,docker_kill,
#                  fill_disk,slow_dispatcher,sigterm_restart,kill9_restart,
#                  stall,broker_alarm
#   SOAK_KEEP      set: keep the logs, events, trace.csv and warehouse
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

seconds="${SOAK_SECONDS:-600}"
seed="${SOAK_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"
case "$seconds" in '' | *[!0-9]*) echo "SOAK_SECONDS is '$seconds'; give a whole number of seconds" >&2; exit 2 ;; esac
case "$seed" in '' | *[!0-9]*) echo "SOAK_SEED is '$seed'; give a whole number" >&2; exit 2 ;; esac
nodes="${SOAK_NODES:-2}"
case "$nodes" in 1 | 2) ;; *) echo "SOAK_NODES is '$nodes'; use 1 or 2" >&2; exit 2 ;; esac
profile="${SOAK_PROFILE:-release}"
case "$profile" in
  release) bin="${CARGO_TARGET_DIR:-target}/release" ;;
  dev) bin="${CARGO_TARGET_DIR:-target}/debug" ;;
  *) echo "SOAK_PROFILE is '$profile'; use release or dev" >&2; exit 2 ;;
esac
echo "==> soak: SOAK_SECONDS=$seconds SOAK_SEED=$seed SOAK_NODES=$nodes ($profile build)"

bash scripts/test-env.sh >/dev/null
# shellcheck source=scripts/lib/farm-services.sh
source scripts/lib/farm-services.sh
cargo build --profile "$profile" --locked --quiet --bin zimfarm-worker --example dispatcher_standin

api="http://zimfarm-test:zimfarm-test@127.0.0.1:15672/api"
vhost="zimfarm-soak-$$"
farm_vhost "$api" "$vhost" zimfarm-test
work="$(mktemp -d /tmp/zimfarm-soak.XXXXXX)"
warehouse="$(mktemp -d /srv/zimfarm-test-sftp/soak.XXXXXX)"
chmod 755 "$warehouse"
disk="$work/disk"
mkdir -p "$disk"
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
  for pid in "${FARM_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  pkill -f "$work/sshd_config" 2>/dev/null || true
  wait 2>/dev/null || true
  # A worker killed here may have left scrapes running for its next start.
  for node in soak-d1 soak-d2; do
    docker ps -aq --filter "label=org.openzim.zimfarm.node=$node" | xargs -r docker rm -f >/dev/null 2>&1 || true
  done
  mountpoint -q "$disk" && umount -l "$disk"
  # A memory alarm the soak raised and could not lower (it was killed).
  case "${SOAK_FAULTS:-all}" in
    all | *broker_alarm*) rabbitmqctl -q set_vm_memory_high_watermark 0.4 >/dev/null 2>&1 || true ;;
  esac
  curl -fsS -X DELETE "$api/vhosts/$vhost" >/dev/null 2>&1 || true
  if [ -n "${SOAK_KEEP:-}" ]; then
    echo "==> kept $work and $warehouse (SOAK_KEEP)"
  else
    rm -rf "$work" "$warehouse"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The Docker workers' disk: small, so that filling it is quick and real.
disk_mb="${SOAK_DISK_MB:-400}"
if ! mount -t tmpfs -o "size=${disk_mb}m" soak-disk "$disk" 2>"$work/mount.err"; then
  echo "==> cannot mount a ${disk_mb} MiB tmpfs for the workers' disk ($(cat "$work/mount.err")); the disk-fill fault is skipped" >&2
fi

ssh-keygen -q -t ed25519 -N '' -C soak@farm -f "$work/id_ed25519"
farm_start_warehouse "$work" "$warehouse" zimfarm-sftp "$work/id_ed25519.pub"
echo "[127.0.0.1]:$FARM_SFTP_PORT $(cut -d' ' -f1,2 "$work/host_key.pub")" > "$work/known_hosts"
farm_start_standin "$bin/examples/dispatcher_standin" "$work" zimfarm-sftp soak "$work/id_ed25519.pub"
# The soak stops and starts sshd itself: no "Killed" line from this shell.
disown -a

set +e
.venv/bin/python -u scripts/soak.py \
  --seconds "$seconds" --seed "$seed" --worker "$bin/zimfarm-worker" \
  --broker "amqp://zimfarm-test:zimfarm-test@127.0.0.1:5672/$vhost" --api "$api" --vhost "$vhost" \
  --work "$work" --disk "$disk" --warehouse "$warehouse" --sftp-port "$FARM_SFTP_PORT" \
  --dispatcher "$FARM_DISPATCHER_URL" --user zimfarm-sftp --password soak \
  --nodes "$nodes" --faults "${SOAK_FAULTS:-all}"
status=$?
set -e
exit "$status"
