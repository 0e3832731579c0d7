#!/usr/bin/env bash
# Runs the benchmarks against real services (prepared by test-env.sh) and
# prints their figures. Usage: scripts/bench.sh
# BENCH_ONLY=upload runs only the upload benchmark (benches/upload.rs, as
# root: it starts its own sshd); other BENCH_* knobs are read by the benches.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
bash scripts/test-env.sh
# BENCH_UPLOAD_BEFORE=1: build the worker as it was before issue 13
# (72bb1cc) in a worktree under target/, so the upload bench measures its
# CPU beside today's instead of taking a figure from another machine.
if [ "${BENCH_UPLOAD_BEFORE:-}" = 1 ] && [ -z "${BENCH_UPLOAD_BASELINE_BIN:-}" ]; then
    before="$repo/target/before-issue-13"
    [ -d "$before" ] || git worktree add --detach "$before" 72bb1cc >/dev/null
    (cd "$before" && cargo build --release --locked --bench upload >&2)
    # The newest bench executable (cargo leaves older ones, and .d files).
    BENCH_UPLOAD_BASELINE_BIN=""
    for f in "$before"/target/release/deps/upload-*; do
        case "$f" in *.d) continue ;; esac
        if [ -z "$BENCH_UPLOAD_BASELINE_BIN" ] || [ "$f" -nt "$BENCH_UPLOAD_BASELINE_BIN" ]; then
            BENCH_UPLOAD_BASELINE_BIN="$f"
        fi
    done
    export BENCH_UPLOAD_BASELINE_BIN
fi
if [ "${BENCH_ONLY:-}" = upload ]; then
    exec cargo bench --bench upload
fi
export ZIMFARM_TEST_PYTHON="$repo/.venv/bin/python"
export ZIMFARM_TEST_AMQP="amqp://zimfarm-test:zimfarm-test@127.0.0.1:5672"
export ZIMFARM_TEST_RABBIT_API="http://zimfarm-test:zimfarm-test@127.0.0.1:15672/api"
cargo bench --bench throughput
cargo bench --bench pipeline
cargo bench --bench revoke
cargo bench --bench progress
exec cargo bench --bench upload
