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

/// Text with what trips decoders: quotes, backslashes, controls, NUL,
/// separators, non-ASCII and astral characters, next to plain ASCII.
pub(crate) fn text() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    let special = proptest::sample::select(vec![
        '\'', '"', '\\', '\n', '\r', '\t', '\0', ' ', ',', ':', '|', '@', '#', '*', '?', '!', '[',
        ']', '{', '}', '/', '.', '=', '-', '+', 'é', '\u{7f}', '\u{85}', '\u{2028}', '\u{feff}',
        '🎉',
    ]);
    let ch = prop_oneof![special, proptest::char::range(' ', '~'), any::<char>()];
    proptest::collection::vec(ch, 0..24).prop_map(String::from_iter)
}

/// JSON values of every kind: huge and odd numbers, tricky text, nested
/// arrays and objects (up to 4 levels), with keys from `keys` half the time.
pub(crate) fn json(
    keys: &'static [&'static str],
) -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
    use proptest::prelude::*;
    use serde_json::Value;
    let number = prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        proptest::sample::select(vec![
            Value::from(0),
            Value::from(-0.0),
            Value::from(u64::MAX),
            Value::from(i64::MIN),
            Value::from(f64::MAX),
            Value::from(f64::MIN_POSITIVE),
            Value::from(1e9),
            Value::from(0.5),
            Value::from(-1),
        ]),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number,
        text().prop_map(Value::String),
    ];
    let key = prop_oneof![
        proptest::sample::select(keys).prop_map(str::to_owned),
        text()
    ];
    leaf.prop_recursive(4, 24, 4, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((key.clone(), inner), 0..4)
                .prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
}
