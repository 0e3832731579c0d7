#!/usr/bin/env bash
# The main job: a real local farm on this machine. Starts the services
# (RabbitMQ, Docker, the locally built stand-in offliner images, via
# test-env.sh), builds and starts the worker, sends a demo task with real
# Python Celery exactly as the dispatcher does, and prints the worker's
# Celery events as they arrive. An OpenSSH SFTP warehouse on 127.0.0.1
# (chrooted, key login only) and a dispatcher stand-in (OAuth2, SSH keys
# API; the worker logs in and checks its key is registered) are started
# too. The task runs through prepare
# (a redis helper on a unix socket), generate (the stand-in mwoffliner
# container, which writes a real ZIM file) and upload (SFTP, the ZIM's MD5
# checksum verified on the way); the script then shows where the ZIM and
# the container log landed in the warehouse and opens the ZIM with libzim.
#
# Usage: scripts/farm.sh [--once]   (FARM_PROFILE=dev: a debug build)
#   --once   exit after the demo task ended (default: keep the farm running
#            until Ctrl-C)
# On exit (Ctrl-C, or the end of --once) it stops what it started: the
# worker, the warehouse, the dispatcher stand-in, the event monitor, and
# RabbitMQ and dockerd if they were not running before.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

once=false
case "${1:-}" in
  --once) once=true ;;
  "") ;;
  *) echo "usage: scripts/farm.sh [--once]" >&2; exit 2 ;;
esac

# What runs already is left running on exit.
rabbit_was_up=false
(exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && rabbit_was_up=true
docker_was_up=false
docker info >/dev/null 2>&1 && docker_was_up=true
stop_services() {
  if ! $rabbit_was_up; then
    echo "==> stopping RabbitMQ (this script started it)"
    rabbitmqctl -q shutdown >/dev/null 2>&1 || true
  fi
  if ! $docker_was_up && [ -s /var/run/docker.pid ]; then
    echo "==> stopping dockerd (this script started it)"
    kill "$(cat /var/run/docker.pid)" 2>/dev/null || true
  fi
}
trap stop_services EXIT
trap 'exit 130' INT TERM
bash scripts/test-env.sh
# shellcheck source=scripts/lib/farm-services.sh
source scripts/lib/farm-services.sh
vhost="zimfarm-demo"
broker="amqp://zimfarm-test:zimfarm-test@127.0.0.1:5672/$vhost"
farm_vhost "http://zimfarm-test:zimfarm-test@127.0.0.1:15672/api" "$vhost" zimfarm-test

# FARM_PROFILE=dev reuses the test build (CI runs the demo after the tests).
profile="${FARM_PROFILE:-release}"
case "$profile" in
  release) bin="${CARGO_TARGET_DIR:-target}/release" ;;
  dev) bin="${CARGO_TARGET_DIR:-target}/debug" ;;
  *) echo "FARM_PROFILE is '$profile'; use release or dev" >&2; exit 2 ;;
esac
echo "==> building the worker and the dispatcher stand-in ($profile)"
cargo build --profile "$profile" --locked --quiet --bin zimfarm-worker --example dispatcher_standin
work="$(mktemp -d /tmp/zimfarm-farm.XXXXXX)"
# The warehouse's chroot: sshd wants every component of it root-owned and
# not writable by others, which /tmp is not (test-env.sh made this base).
warehouse="$(mktemp -d /srv/zimfarm-test-sftp/farm.XXXXXX)"
chmod 755 "$warehouse"
pids=()
cleanup() {
  for pid in "${pids[@]}" "${FARM_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work" "$warehouse"
  stop_services
  echo "==> farm stopped"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "==> starting the SFTP warehouse (OpenSSH sshd on 127.0.0.1, chrooted, key login only)"
ssh-keygen -q -t ed25519 -N '' -C demo@farm -f "$work/id_ed25519"
farm_start_warehouse "$work" "$warehouse" zimfarm-sftp "$work/id_ed25519.pub"
sftp_port=$FARM_SFTP_PORT
echo "[127.0.0.1]:$sftp_port $(cut -d' ' -f1,2 "$work/host_key.pub")" > "$work/known_hosts"
echo "    warehouse at 127.0.0.1:$sftp_port, its files in $warehouse"

echo "==> starting the dispatcher stand-in (OAuth2 and the SSH keys API, SPEC §7) with the worker's key registered"
farm_start_standin "$bin/examples/dispatcher_standin" "$work" zimfarm-sftp demo "$work/id_ed25519.pub"
dispatcher_url=$FARM_DISPATCHER_URL
echo "    dispatcher at $dispatcher_url"

echo "==> starting the event monitor (Celery EventReceiver)"
.venv/bin/python tests/py/celery_client.py events --broker "$broker" --seconds 86400 \
  > "$work/events.jsonl" &
events_pid=$!
pids+=("$events_pid")
for _ in $(seq 100); do grep -q '"ready"' "$work/events.jsonl" 2>/dev/null && break; sleep 0.1; done
tail -n +1 -f "$work/events.jsonl" 2>/dev/null | .venv/bin/python -u -c '
import json, sys
for line in sys.stdin:
    try:
        e = json.loads(line)
    except ValueError:
        continue
    t = e.get("type")
    if t is None or t == "worker-heartbeat":
        continue
    extra = {k: e[k] for k in ("uuid", "name", "image", "command", "exit_code", "result", "exception", "runtime", "expired",
                               "stage", "done", "total", "upload_sent", "upload_total") if e.get(k) is not None}
    host = e.get("hostname", "")
    print(f"    event {t:<16} {host} {json.dumps(extra)}", flush=True)
' &
pids+=($!)

metrics_port="$(farm_free_port)"
echo "==> starting the worker as zimfarm-sftp@farm (metrics at http://127.0.0.1:$metrics_port/metrics)"
touch "$work/worker.log"
mkdir -p "$work/zim_files"
USERNAME=zimfarm-sftp PASSWORD=demo NODE_NAME=farm QUEUES=small CONCURRENCY=2 \
  WORKING_DIR="$work/zim_files" ZIM_DIR="$work/zim_files" BROKER_URL="$broker" \
  TASK_RUNNER=docker PULL_POLICY=never REDIS_IMAGE=zimfarm/redis:test MIN_FREE_DISK_MB=100 \
  WAREHOUSE_HOST=127.0.0.1 WAREHOUSE_PORT="$sftp_port" SSH_KEY="$work/id_ed25519" \
  WAREHOUSE_KNOWN_HOSTS="$work/known_hosts" DISPATCHER_URL="$dispatcher_url" \
  METRICS_ADDR="127.0.0.1:$metrics_port" \
  "$bin/zimfarm-worker" 2> "$work/worker.log" &
pids+=($!)
for _ in $(seq 200); do grep -q "consuming" "$work/worker.log" && break; sleep 0.05; done
grep "consuming" "$work/worker.log" || { cat "$work/worker.log"; exit 1; }

task_id="$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
echo "==> sending task $task_id with Celery (send_task offliner.mwoffliner, exchange offliner, routing key small)"
.venv/bin/python tests/py/celery_client.py send --broker "$broker" --name offliner.mwoffliner \
  --task-id "$task_id" --exchange offliner --routing-key small --rpc --wait 60 \
  --kwargs '{"flags": {"mwUrl": "https://en.wikipedia.org", "adminEmail": "demo@example.org", "articleList": "Kiwix", "name": "wikipedia_en_kiwix", "sleep": 2}, "image": {"name": "openzim/mwoffliner", "tag": "test"}, "warehouse_path": "/wikipedia"}' \
  | sed 's/^/    AsyncResult.get() -> /'
sleep 0.5
echo "==> the worker's log lines about the upload:"
grep -E "dispatcher|upload|warehouse|task dir" "$work/worker.log" | sed 's/^/    /'
echo "==> in the warehouse ($warehouse, removed when the farm stops):"
(cd "$warehouse" && find zim logs -type f -exec ls -l {} + | sed 's/^/    /')
.venv/bin/python -c '
import sys
from libzim.reader import Archive
a = Archive(sys.argv[1])
assert a.check(), "libzim says the ZIM is corrupt"
print(f"    libzim opens it: {a.entry_count} entries, checksum OK")
' "$warehouse/zim/wikipedia/wikipedia_en_kiwix.zim"
if [ -e "$work/zim_files/$task_id" ]; then
  echo "    the task dir $work/zim_files/$task_id is still there"
else
  echo "    the task dir was removed once the upload was confirmed"
fi

echo "==> the worker's health and metrics (http://127.0.0.1:$metrics_port):"
echo "    /healthz: $(curl -fsS "http://127.0.0.1:$metrics_port/healthz")"
curl -fsS "http://127.0.0.1:$metrics_port/metrics" \
  | grep -E '^zimfarm_worker_(tasks_total|stage_duration_seconds_(sum|count)|uploaded_bytes_total|active_tasks|broker_connected)[{ ]' \
  | sed 's/^/    /'

if $once; then
  exit 0
fi
echo "==> the farm is running; send more tasks with tests/py/celery_client.py send --broker $broker ...; Ctrl-C stops it"
wait "$events_pid"
