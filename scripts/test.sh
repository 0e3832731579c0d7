#!/usr/bin/env bash
# Run the whole test suite: prepare the machine (scripts/test-env.sh), then
# `cargo test --locked --features services` with the services' addresses in
# the environment. The `services` feature builds the integration tests that
# need them (Cargo.toml's [features]); a bare `cargo test` leaves them out
# and says so once. Extra arguments go to cargo test, e.g.
# `scripts/test.sh -- --list`.
set -euo pipefail

REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)

bash "$REPO/scripts/test-env.sh"

# Read by the integration tests (tests/common/); set them to point the
# tests elsewhere.
export ZIMFARM_TEST_PYTHON="${ZIMFARM_TEST_PYTHON:-$REPO/.venv/bin/python}"
export ZIMFARM_TEST_AMQP="${ZIMFARM_TEST_AMQP:-amqp://zimfarm-test:zimfarm-test@127.0.0.1:5672}"
export ZIMFARM_TEST_RABBIT_API="${ZIMFARM_TEST_RABBIT_API:-http://zimfarm-test:zimfarm-test@127.0.0.1:15672/api}"

cd "$REPO"
# The mixed-version farm test (tests/ack_timeout.rs) runs a second build
# that knows one more task name (the test-only feature test-extra-task):
# built first and copied aside; `cargo test` below relinks the normal
# binary (the dependencies are shared).
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
cargo build --locked --quiet --features test-extra-task --bin zimfarm-worker
cp "$TARGET_DIR/debug/zimfarm-worker" "$TARGET_DIR/debug/zimfarm-worker-extra-task"
exec cargo test --locked --features services "$@"
