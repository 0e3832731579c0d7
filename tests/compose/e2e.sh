#!/usr/bin/env bash
# The `e2e` service of docker-compose.test.yml, started once the worker's
# container is healthy: builds the stand-in scraper images into the dind
# engine (tests/images/build.sh, DOCKER_HOST=tcp://dind:2375), sends the demo
# mwoffliner task with Python Celery as scripts/farm.sh does, waits for its
# success, and checks that the ZIM landed in the warehouse and that libzim
# opens it. Its exit code is the compose run's (--exit-code-from e2e).
set -euo pipefail
cd /repo

: "${BROKER_URL:?}"
WAREHOUSE=${WAREHOUSE_DIR:-/warehouse}
TASK_TIMEOUT=${TASK_TIMEOUT:-300}

echo "==> e2e: Docker engine $(docker version -f '{{.Server.Version}}') at $DOCKER_HOST"
bash tests/images/build.sh

task_id=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "==> e2e: sending task $task_id (offliner.mwoffliner, exchange offliner, routing key small)"
result=$(.venv/bin/python tests/py/celery_client.py send --broker "$BROKER_URL" --name offliner.mwoffliner \
    --task-id "$task_id" --exchange offliner --routing-key small --rpc --wait "$TASK_TIMEOUT" \
    --kwargs '{"flags": {"mwUrl": "https://en.wikipedia.org", "adminEmail": "demo@example.org", "articleList": "Kiwix", "name": "wikipedia_en_kiwix", "sleep": 2}, "image": {"name": "openzim/mwoffliner", "tag": "test"}, "warehouse_path": "/wikipedia"}')
echo "    AsyncResult.get() -> $result"
[[ $result == *'"status": "SUCCESS"'* ]] || { echo "e2e: FAIL: the task did not succeed" >&2; exit 1; }

zim="$WAREHOUSE/zim/wikipedia/wikipedia_en_kiwix.zim"
[ -s "$zim" ] || { echo "e2e: FAIL: no $zim in the warehouse" >&2; exit 1; }
.venv/bin/python -c '
import sys
from libzim.reader import Archive
a = Archive(sys.argv[1])
assert a.check(), "libzim says the ZIM is corrupt"
print(f"    {sys.argv[1]}: libzim opens it, {a.entry_count} entries, checksum OK")
' "$zim"
find "$WAREHOUSE/logs" -type f | grep -q . || { echo "e2e: FAIL: no container log in the warehouse" >&2; exit 1; }
echo "==> e2e: passed"
