//! Waiting for something to happen, for the fixtures and the tests: one
//! poll loop with a deadline and a message that shows the state then.
//! Self-contained (`sshd.rs`, which the upload bench includes by path,
//! uses it too).

use std::time::{Duration, Instant};

/// Waits until `done` holds, checking every `every`; past `timeout` the
/// test fails with `what()` (called then, so it can show the state).
pub fn eventually(
    timeout: Duration,
    every: Duration,
    mut done: impl FnMut() -> bool,
    what: impl Fn() -> String,
) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "{} (within {timeout:?})", what());
        std::thread::sleep(every);
    }
}
