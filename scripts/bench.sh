#!/usr/bin/env bash
# Runs the benchmarks against real services (prepared by test-env.sh) and
# prints their figures. Usage: scripts/bench.sh
# BENCH_ONLY=upload runs only the upload benchmark (benches/upload.rs, as
# root: it starts its own sshd); other BENCH_* knobs are read by the benches.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
bash scripts/test-env.sh
if [ "${BENCH_ONLY:-}" = upload ]; then
    exec cargo bench --bench upload
fi
export ZIMFARM_TEST_PYTHON="$repo/.venv/bin/python"
export ZIMFARM_TEST_AMQP="amqp://zimfarm-test:zimfarm-test@127.0.0.1:5672"
export ZIMFARM_TEST_RABBIT_API="http://zimfarm-test:zimfarm-test@127.0.0.1:15672/api"
cargo bench --bench throughput
cargo bench --bench pipeline
exec cargo bench --bench upload
