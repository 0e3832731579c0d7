//! The property tests' shared settings (test builds only): how many cases
//! each property runs.
//!
//! Every decoder of outside input (task messages, pidbox requests, the
//! dispatcher's JSON, known_hosts lines, ISO-8601 values, env values,
//! container log bytes, the record of ended tasks) has properties next to
//! it that use [`config`]. 10,000 cases per property by default; the
//! `PROPTEST_CASES` environment variable sets another count (CI runs fewer).
//! Failures are not persisted to regression files: a case that found a bug
//! is kept as a plain unit test next to its fix.

use proptest::test_runner::Config;

/// Cases per property when `PROPTEST_CASES` is not set.
pub(crate) const DEFAULT_CASES: u32 = 10_000;

/// The cases count from `PROPTEST_CASES` (default [`DEFAULT_CASES`]).
pub(crate) fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

/// The proptest config every property uses.
pub(crate) fn config() -> Config {
    Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    }
}
