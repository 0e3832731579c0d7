#!/usr/bin/env bash
# Test the Docker image the way users run it: the original worker README's
# `docker run` example, unchanged (the Docker socket, the SSH key at
# /usr/src/.ssh/id_rsa and the working dir at /zim_files; USERNAME,
# PASSWORD, WORKING_DIR, NODE_NAME, QUEUES, CONCURRENCY), against a local
# farm on 127.0.0.1 as scripts/farm.sh starts it: RabbitMQ (a vhost of its
# own), an OpenSSH SFTP warehouse, the dispatcher stand-in, and the local
# stand-in scraper images. No registry is needed:
#
#   1. zimfarm/debian-bookworm:local, a debootstrap stand-in for
#      debian:bookworm-slim (tests/images/debian-base.sh; built once per
#      machine, about 1.5 minutes);
#   2. zimfarm/worker-base:local, the Dockerfile's `runtime-base` stage on it
#      (everything of the real image but the binary; cached by Docker);
#   3. zimfarm/worker:image-test, that plus a binary built outside Docker.
#
# Then it runs the container with --network host (so that 127.0.0.1 is the
# farm's), sends the demo mwoffliner task with real Python Celery, checks
# the task succeeded and its ZIM landed in the warehouse and opens with
# libzim, waits for the image's HEALTHCHECK to say healthy (the interval
# shortened with --health-interval), stops the container with `docker stop`
# (SIGTERM) and checks it exited 0. It prints the image's size. Everything
# it started is removed on exit, the base images excepted.
#
# Usage: scripts/image-test.sh [WORKER_BINARY]
#   WORKER_BINARY   default $ZIMFARM_WORKER_BIN, else target/debug/zimfarm-worker
#                   (CI builds debug for the tests; a release binary works too).
#   The dispatcher stand-in is taken from <binary's dir>/examples/, else
#   built with `cargo build --example dispatcher_standin`.
#   IMAGE_TEST_BASE=IMAGE  use that base image (pulled if missing) instead of
#                   building the debootstrap one.
#   IMAGE_TEST_USER=UID:GID  run the container as that user, the non-root way
#                   the Dockerfile documents (--user, --group-add of the
#                   socket's group, working dir and key owned by UID).
# Needs root (the warehouse's chroot), and what scripts/test-env.sh sets up
# (it runs it first; quick when all is there).
set -euo pipefail
shopt -s inherit_errexit

REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

BIN=${1:-${ZIMFARM_WORKER_BIN:-target/debug/zimfarm-worker}}
RUN_USER=${IMAGE_TEST_USER:-}
# IMAGE_TEST_BASE=debian:bookworm-slim (a host that can pull) skips the
# debootstrap stand-in.
BASE_IMAGE=${IMAGE_TEST_BASE:-zimfarm/debian-bookworm:local}
RUNTIME_BASE=zimfarm/worker-base:local
TEST_IMAGE=zimfarm/worker:image-test
RABBIT_API=http://zimfarm-test:zimfarm-test@127.0.0.1:15672/api
VHOST=zimfarm-image-test
BROKER_URL="amqp://zimfarm-test:zimfarm-test@127.0.0.1:5672/$VHOST"
SFTP_USER=zimfarm-sftp
PASSWORD=image-test-secret
NODE_NAME="image-test-$$"
CONTAINER="zimfarm-image-test-$$"
# Seconds to wait for: the worker to consume, the task, the healthcheck, stop.
START_TIMEOUT=60
TASK_TIMEOUT=120
HEALTH_TIMEOUT=60
STOP_TIMEOUT=30

log() { printf '==> %s\n' "$*"; }
die() {
    printf 'image-test: ERROR: %s\n' "$*" >&2
    exit 1
}

WORK=
WAREHOUSE=
FARM_PIDS=() # filled by scripts/lib/farm-services.sh
cleanup() {
    local rc=$?
    set +e
    if docker container inspect "$CONTAINER" >/dev/null 2>&1; then
        if [ "$rc" -ne 0 ]; then
            echo "--- last lines of the worker container's log:" >&2
            docker logs --tail 40 "$CONTAINER" 2>&1 | sed 's/^/    /' >&2
        fi
        docker rm -f "$CONTAINER" >/dev/null 2>&1
    fi
    # Task containers a failed run may have left (the worker removes them).
    docker ps -aq --filter "label=org.openzim.zimfarm.node=$NODE_NAME" | xargs -r docker rm -f >/dev/null 2>&1
    local pid
    for pid in "${FARM_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${FARM_PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    curl -fsS -X DELETE "$RABBIT_API/vhosts/$VHOST" >/dev/null 2>&1
    docker image rm "$TEST_IMAGE" >/dev/null 2>&1
    [ -z "$WORK" ] || rm -rf -- "$WORK"
    [ -z "$WAREHOUSE" ] || rm -rf -- "$WAREHOUSE"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source=scripts/lib/farm-services.sh
source "$REPO/scripts/lib/farm-services.sh"

container_state() {
    docker inspect -f '{{.State.Status}}' "$CONTAINER" 2>/dev/null || echo gone
}

# ------------------------------------------------------------------ checks

[ -x "$BIN" ] || die "no worker binary $BIN (cargo build first, or give its path)"
BIN=$(cd -- "$(dirname -- "$BIN")" && pwd)/$(basename -- "$BIN")
STANDIN="$(dirname -- "$BIN")/examples/dispatcher_standin"

bash scripts/test-env.sh

if [ ! -x "$STANDIN" ]; then
    log "building the dispatcher stand-in"
    cargo build --locked --quiet --example dispatcher_standin
    STANDIN="${CARGO_TARGET_DIR:-$REPO/target}/debug/examples/dispatcher_standin"
fi

# ------------------------------------------------------------------ images

start=$SECONDS
if [ -z "${IMAGE_TEST_BASE:-}" ]; then
    bash tests/images/debian-base.sh
else
    docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || docker pull -q "$BASE_IMAGE" >/dev/null
fi
log "base image $BASE_IMAGE ready ($((SECONDS - start))s)"

WORK=$(mktemp -d /tmp/zimfarm-image-test.XXXXXX)

# docker build, its output (and the legacy builder's deprecation notice)
# shown only when it fails.
quiet_build() {
    if ! docker build --quiet "$@" >"$WORK/build.log" 2>&1; then
        cat "$WORK/build.log" >&2
        die "docker build $* failed"
    fi
}

# --network host: the RUN steps' apt-get reaches the mirror whatever the
# bridge network allows (here both work; some CI hosts only have the host's).
start=$SECONDS
quiet_build --network host --target runtime-base \
    --build-arg RUNTIME_IMAGE="$BASE_IMAGE" --build-arg WAREHOUSE_KEYSCAN= \
    -t "$RUNTIME_BASE" .
log "Dockerfile target runtime-base built as $RUNTIME_BASE ($((SECONDS - start))s)"

mkdir "$WORK/context"
cp -- "$BIN" "$WORK/context/zimfarm-worker"
printf '%s\n' "FROM $RUNTIME_BASE" 'COPY zimfarm-worker /usr/local/bin/zimfarm-worker' \
    >"$WORK/context/Dockerfile"
start=$SECONDS
quiet_build -t "$TEST_IMAGE" "$WORK/context"
rm -rf -- "$WORK/context"
log "test image $TEST_IMAGE built with $BIN ($((SECONDS - start))s): $(docker run --rm "$TEST_IMAGE" --version)"

# ------------------------------------------------------------------ the farm

farm_vhost "$RABBIT_API" "$VHOST" zimfarm-test

# The warehouse and the dispatcher stand-in, as scripts/farm.sh starts them.
# The chroot: sshd wants every component of it root-owned and not writable
# by others (test-env.sh made the base).
WAREHOUSE=$(mktemp -d /srv/zimfarm-test-sftp/image-test.XXXXXX)
chmod 755 "$WAREHOUSE"
# The seed's key: RSA, PEM.
ssh-keygen -q -t rsa -b 3072 -m PEM -N '' -C image-test@zimfarm -f "$WORK/id_rsa"
farm_start_warehouse "$WORK" "$WAREHOUSE" "$SFTP_USER" "$WORK/id_rsa.pub" \
    || die "sshd did not listen on 127.0.0.1:$FARM_SFTP_PORT"
sftp_port=$FARM_SFTP_PORT
host_key_fp=$(ssh-keygen -l -f "$WORK/host_key.pub" | cut -d' ' -f2)
log "warehouse (OpenSSH sftp) at 127.0.0.1:$sftp_port, host key $host_key_fp"

farm_start_standin "$STANDIN" "$WORK" "$SFTP_USER" "$PASSWORD" "$WORK/id_rsa.pub" \
    || die "the dispatcher stand-in did not start"
dispatcher_url=$FARM_DISPATCHER_URL
log "dispatcher stand-in at $dispatcher_url, the RSA key registered for $SFTP_USER"

# ------------------------------------------------------------------ the worker

# The seed README's command (volumes and the six variables, WORKING_DIR the
# host path of the /zim_files mount), plus what only a test needs: the
# local broker, dispatcher and warehouse, the local images, a small disk
# reserve, the metrics listener on a free loopback port, a short healthcheck
# interval (the image's HEALTHCHECK command is kept).
working_dir="$WORK/zim_files"
mkdir "$working_dir"
metrics_port=$(farm_free_port)
# The non-root run the Dockerfile documents: the working dir writable and
# the key readable by that user, the socket's group added.
run_as=()
if [ -n "$RUN_USER" ]; then
    chown "$RUN_USER" "$working_dir" "$WORK/id_rsa"
    chmod 600 "$WORK/id_rsa"
    run_as=(--user "$RUN_USER" --group-add "$(stat -c %g /var/run/docker.sock)")
fi
# The mistake the image guards against: the working dir not mounted. The
# worker must stop at once with exit 2 and a line naming ZIM_DIR, not scrape
# into the container's own filesystem.
set +e
no_mount=$(docker run --rm "${run_as[@]}" \
    -v "$WORK/id_rsa:/usr/src/.ssh/id_rsa:ro" \
    --env USERNAME="$SFTP_USER" --env PASSWORD="$PASSWORD" \
    --env WORKING_DIR="$working_dir" --env NODE_NAME="$NODE_NAME" \
    --env QUEUES='small' --network host \
    "$TEST_IMAGE" 2>&1)
no_mount_rc=$?
set -e
if [ "$no_mount_rc" -ne 2 ] || ! grep -q 'ZIM_DIR' <<<"$no_mount"; then
    die "without the /zim_files mount the worker should exit 2 naming ZIM_DIR; it exited $no_mount_rc: $no_mount"
fi
log "without the /zim_files mount: exit 2, $(tail -n1 <<<"$no_mount")"

log "docker run $TEST_IMAGE as $SFTP_USER@$NODE_NAME, ${RUN_USER:+user $RUN_USER, }metrics on 127.0.0.1:$metrics_port"
docker run --detach "${run_as[@]}" \
    -v /var/run/docker.sock:/var/run/docker.sock \
    -v "$WORK/id_rsa:/usr/src/.ssh/id_rsa:ro" \
    -v "$working_dir:/zim_files" \
    --env USERNAME="$SFTP_USER" \
    --env PASSWORD="$PASSWORD" \
    --env WORKING_DIR="$working_dir" \
    --env NODE_NAME="$NODE_NAME" \
    --env QUEUES='small' \
    --env CONCURRENCY=2 \
    --name="$CONTAINER" \
    --network host \
    --health-interval 2s \
    --env BROKER_URL="$BROKER_URL" \
    --env DISPATCHER_URL="$dispatcher_url" \
    --env WAREHOUSE_HOST=127.0.0.1 \
    --env WAREHOUSE_PORT="$sftp_port" \
    --env WAREHOUSE_HOST_KEY="$host_key_fp" \
    --env PULL_POLICY=never \
    --env REDIS_IMAGE=zimfarm/redis:test \
    --env MIN_FREE_DISK_MB=100 \
    --env METRICS_ADDR="127.0.0.1:$metrics_port" \
    "$TEST_IMAGE" >/dev/null

deadline=$((SECONDS + START_TIMEOUT))
until docker logs "$CONTAINER" 2>&1 | grep -q consuming; do
    [ "$(container_state)" = running ] || die "the worker's container stopped: $(container_state)"
    [ "$SECONDS" -lt "$deadline" ] || die "the worker did not start consuming within ${START_TIMEOUT}s"
    sleep 0.2
done
docker logs "$CONTAINER" 2>&1 | grep -E 'dispatcher|consuming' | sed 's/^/    /'

# ------------------------------------------------------------------ the task

task_id=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
log "sending task $task_id (offliner.mwoffliner, exchange offliner, routing key small) with Celery"
start=$SECONDS
result=$(.venv/bin/python tests/py/celery_client.py send --broker "$BROKER_URL" --name offliner.mwoffliner \
    --task-id "$task_id" --exchange offliner --routing-key small --rpc --wait "$TASK_TIMEOUT" \
    --kwargs '{"flags": {"mwUrl": "https://en.wikipedia.org", "adminEmail": "demo@example.org", "articleList": "Kiwix", "name": "wikipedia_en_kiwix", "sleep": 2}, "image": {"name": "openzim/mwoffliner", "tag": "test"}, "warehouse_path": "/wikipedia"}')
echo "    AsyncResult.get() -> $result ($((SECONDS - start))s)"
[[ $result == *'"status": "SUCCESS"'* ]] || die "the task did not succeed"

zim="$WAREHOUSE/zim/wikipedia/wikipedia_en_kiwix.zim"
[ -s "$zim" ] || die "no $zim in the warehouse"
.venv/bin/python -c '
import sys
from libzim.reader import Archive
a = Archive(sys.argv[1])
assert a.check(), "libzim says the ZIM is corrupt"
print(f"    the ZIM is in the warehouse; libzim opens it: {a.entry_count} entries, checksum OK")
' "$zim"
find "$WAREHOUSE/logs" -type f | grep -q . || die "no container log in the warehouse's logs/"
# The worker removes the task dir once the upload is confirmed.
for _ in $(seq 50); do [ -e "$working_dir/$task_id" ] || break; sleep 0.1; done
[ ! -e "$working_dir/$task_id" ] || die "the task dir $working_dir/$task_id is still there"

# ------------------------------------------------------------------ health

health_ok=true
health=
if ! docker exec "$CONTAINER" zimfarm-worker help healthcheck >/dev/null 2>&1; then
    echo "image-test: FAIL: the binary $BIN has no \`healthcheck\` subcommand, which the image's HEALTHCHECK runs" >&2
    health_ok=false
fi
deadline=$((SECONDS + HEALTH_TIMEOUT))
while $health_ok; do
    health=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$CONTAINER")
    [ "$health" = healthy ] && break
    [ "$health" != none ] || die "the image has no HEALTHCHECK"
    if [ "$SECONDS" -ge "$deadline" ]; then
        health_ok=false
        break
    fi
    sleep 1
done
if $health_ok; then
    log "the HEALTHCHECK (zimfarm-worker healthcheck) says healthy"
elif [ -n "$health" ]; then
    echo "image-test: FAIL: the container is $health, not healthy, after ${HEALTH_TIMEOUT}s; its last healthchecks:" >&2
    docker inspect -f '{{range .State.Health.Log}}exit {{.ExitCode}}: {{.Output}}{{println}}{{end}}' "$CONTAINER" \
        | tail -n 10 | sed 's/^/    /' >&2
fi

# ------------------------------------------------------------------ stop

log "docker stop (SIGTERM, ${STOP_TIMEOUT}s before SIGKILL)"
start=$SECONDS
docker stop -t "$STOP_TIMEOUT" "$CONTAINER" >/dev/null
exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER")
echo "    stopped in $((SECONDS - start))s, exit code $exit_code"
[ "$exit_code" = 0 ] || die "the worker exited $exit_code on SIGTERM, not 0"
# No container of this node left behind (offliner, redis helper).
leftovers=$(docker ps -aq --filter "label=org.openzim.zimfarm.task=$task_id")
[ -z "$leftovers" ] || die "containers of task $task_id left: $leftovers"

# ------------------------------------------------------------------ size

size() { docker image inspect -f '{{.Size}}' "$1" | numfmt --to=si --format=%.1f; }
log "image sizes: $BASE_IMAGE $(size "$BASE_IMAGE"), $RUNTIME_BASE $(size "$RUNTIME_BASE"), $TEST_IMAGE $(size "$TEST_IMAGE") (binary $(stat -c %s "$BIN" | numfmt --to=si --format=%.1f))"

$health_ok || die "the healthcheck part failed (see above); everything else passed"
log "image test passed"
