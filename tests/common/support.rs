//! Small helpers for the fixtures and the tests: one poll loop with a
//! deadline ([`eventually`]) and one way to run a command that must
//! succeed ([`run_ok`]). Self-contained: `sshd.rs`, which the upload bench
//! includes by path, uses it too.

use std::path::Path;
use std::process::{Command, Output};
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

/// Waits until the log file at `path` contains `needle`; the failure
/// shows the log, naming it `who`.
pub fn wait_log_file(path: &Path, who: &str, needle: &str, timeout: Duration) {
    let text = || std::fs::read_to_string(path).unwrap_or_default();
    eventually(
        timeout,
        Duration::from_millis(20),
        || text().contains(needle),
        || format!("{who} log never showed {needle:?}; log:\n{}", text()),
    );
}

/// Runs `cmd` to its end; the test fails, naming `what` and showing the
/// command's output, unless it exits 0.
pub fn run_ok(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what} does not run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
