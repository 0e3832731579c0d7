#!/usr/bin/env bash
# The main job: a real local farm on this machine. Starts the services
# (RabbitMQ, Docker, the locally built stand-in offliner images, via
# test-env.sh), builds and starts the worker, sends a demo task with real
# Python Celery exactly as the dispatcher does, and prints the worker's
# Celery events as they arrive. The task runs through prepare (a redis
# helper on a unix socket) and generate (the stand-in mwoffliner container,
# which writes a real ZIM file); the upload stage is not built yet, so the
# ZIM stays in the working dir, whose path is printed.
#
# Usage: scripts/farm.sh [--once]
#   --once   exit after the demo task ended (default: keep the farm running
#            until Ctrl-C, then stop the worker and the event monitor)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

once=false
case "${1:-}" in
  --once) once=true ;;
  "") ;;
  *) echo "usage: scripts/farm.sh [--once]" >&2; exit 2 ;;
esac

bash scripts/test-env.sh
api="http://zimfarm-test:zimfarm-test@127.0.0.1:15672/api"
vhost="zimfarm-demo"
broker="amqp://zimfarm-test:zimfarm-test@127.0.0.1:5672/$vhost"
curl -fsS -X PUT -H 'content-type: application/json' -d '{}' "$api/vhosts/$vhost" >/dev/null
curl -fsS -X PUT -H 'content-type: application/json' \
  -d '{"configure":".*","write":".*","read":".*"}' "$api/permissions/$vhost/zimfarm-test" >/dev/null

echo "==> building the worker (release)"
cargo build --release --locked --quiet
work="$(mktemp -d /tmp/zimfarm-farm.XXXXXX)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
  echo "==> farm stopped (RabbitMQ and Docker keep running)"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "==> starting the event monitor (Celery EventReceiver)"
.venv/bin/python tests/py/celery_client.py events --broker "$broker" --seconds 86400 \
  > "$work/events.jsonl" &
pids+=($!)
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
    extra = {k: e[k] for k in ("uuid", "name", "image", "command", "exit_code", "result", "exception", "runtime", "expired") if k in e}
    host = e.get("hostname", "")
    print(f"    event {t:<16} {host} {json.dumps(extra)}", flush=True)
' &
pids+=($!)

echo "==> starting the worker as demo@farm"
touch "$work/worker.log"
USERNAME=demo PASSWORD=demo NODE_NAME=farm QUEUES=small CONCURRENCY=2 \
  WORKING_DIR="$work" ZIM_DIR="$work" BROKER_URL="$broker" TASK_RUNNER=docker \
  PULL_POLICY=never REDIS_IMAGE=zimfarm/redis:test MIN_FREE_DISK_MB=100 \
  target/release/zimfarm-worker 2> "$work/worker.log" &
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
echo "==> the ZIM and the container log, in $work/$task_id (removed when the farm stops):"
ls -l "$work/$task_id"

if $once; then
  exit 0
fi
echo "==> the farm is running; send more tasks with tests/py/celery_client.py send --broker $broker ...; Ctrl-C stops it"
wait "${pids[2]}"
