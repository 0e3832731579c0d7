#!/usr/bin/env bash
# Runs the benchmarks against real services (prepared by test-env.sh) and
# prints their figures. Usage: scripts/bench.sh
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
bash scripts/test-env.sh
export ZIMFARM_TEST_PYTHON="$repo/.venv/bin/python"
export ZIMFARM_TEST_AMQP="amqp://zimfarm-test:zimfarm-test@127.0.0.1:5672"
export ZIMFARM_TEST_RABBIT_API="http://zimfarm-test:zimfarm-test@127.0.0.1:15672/api"
cargo bench --bench throughput
exec cargo bench --bench pipeline
