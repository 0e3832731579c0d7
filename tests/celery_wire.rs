//! The Celery wire format against real Python: `repr` strings must be what
//! CPython's `repr()` prints and what `ast.literal_eval` reads back, and the
//! date-times and exception reprs must match Python's.
//!
//! Needs `python3` on PATH (any 3.x; the printable-character table is
//! compared in full when its Unicode version matches, else below U+0800).

use std::io::Write as _;
use std::process::{Command, Stdio};

use chrono::{DateTime, TimeZone as _, Utc};
use proptest::prelude::*;
use proptest::strategy::ValueTree as _;
use proptest::test_runner::TestRunner;
use serde_json::{Value, json};
use zimfarm_worker::celery::repr::PYTHON_UNICODE_VERSION;
use zimfarm_worker::celery::{ExceptionInfo, iso8601, repr_str, to_repr};

/// Runs a Python script with `input` on stdin; returns its stdout, and fails
/// the test with its stderr when it exits non-zero.
fn python(script: &str, input: &[u8]) -> String {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .env("PYTHONIOENCODING", "utf-8")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 must be on PATH for these tests");
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().expect("python3 runs");
    writer
        .join()
        .expect("stdin writer thread")
        .expect("write to python3");
    let stdout = String::from_utf8(output.stdout).expect("python3 prints UTF-8");
    assert!(
        output.status.success(),
        "python3 failed ({}):\n{}\n{}",
        output.status,
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// For each line `{"json": <text>, "repr": <ours>}`: Python's `repr()` of
/// `json.loads(text)` must equal ours exactly, and `ast.literal_eval(ours)`
/// must give the same value back (same types: `True` is not `1`).
const CHECK_REPRS: &str = r#"
import ast, json, sys

def same(a, b):
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return a == b and str(a) == str(b)
    return a == b

failures = 0
for n, line in enumerate(sys.stdin.buffer):
    case = json.loads(line)
    want = json.loads(case["json"])
    ours = case["repr"]
    problem = None
    if repr(want) != ours:
        problem = "repr differs: python %s" % ascii(repr(want))
    else:
        try:
            back = ast.literal_eval(ours)
        except Exception as e:
            problem = "literal_eval failed: %r" % e
        else:
            if not same(back, want):
                problem = "literal_eval gives %s" % ascii(back)
    if problem:
        failures += 1
        if failures <= 10:
            print("case %d: ours %s: %s" % (n, ascii(ours), problem))
print("failures: %d" % failures)
"#;

fn check_against_python(values: &[Value]) {
    let mut input = Vec::new();
    for value in values {
        let line = json!({"json": value.to_string(), "repr": to_repr(value)});
        input.extend_from_slice(line.to_string().as_bytes());
        input.push(b'\n');
    }
    let out = python(CHECK_REPRS, &input);
    assert!(out.ends_with("failures: 0\n"), "{out}");
}

#[test]
fn simple_values_match_python_repr_exactly() {
    let values = [
        json!(null),
        json!(true),
        json!(false),
        json!(0),
        json!(-1),
        json!(i64::MIN),
        json!(i64::MAX),
        json!(u64::MAX),
        json!(1.0),
        json!(1e16),
        json!(1e-5),
        json!(0.1),
        json!(123456789012345.0),
        json!(-0.0),
        json!(1e22),
        json!(5e-324),
        json!(f64::MAX),
        json!(""),
        json!("it's"),
        json!("say \"hi\""),
        json!("both ' and \""),
        json!("back\\slash\t\n\r\u{0}\u{1b}\u{7f}"),
        json!("\u{a0}\u{ad}\u{85}é\u{2028}\u{200b}\u{feff}\u{e000}\u{10ffff}🎉日本"),
        json!([]),
        json!({}),
        json!([{"name": "x.zim", "size": 123}]),
        json!({"flags": {"mwUrl": "https://en.wikipedia.org", "verbose": true, "n": [1, 2.5, null]}}),
        json!(1_084_014_901_836_646.0 + 0.25),
        json!(1_084_014_901_836_646.0 + 0.75),
    ];
    check_against_python(&values);
    // And the exact strings Python prints, for a reader of this test.
    assert_eq!(to_repr(&values[8]), "1.0");
    assert_eq!(to_repr(&values[9]), "1e+16");
    assert_eq!(to_repr(&values[10]), "1e-05");
    assert_eq!(to_repr(&values[13]), "-0.0");
    assert_eq!(to_repr(&values[18]), "\"it's\"");
    assert_eq!(to_repr(&values[25]), "[{'name': 'x.zim', 'size': 123}]");
    assert_eq!(to_repr(&values[27]), "1084014901836646.2");
}

fn text() -> impl Strategy<Value = String> {
    let special = proptest::sample::select(vec![
        '\'',
        '"',
        '\\',
        '\n',
        '\r',
        '\t',
        '\0',
        '\u{7f}',
        '\u{85}',
        '\u{a0}',
        '\u{ad}',
        'é',
        '\u{2028}',
        '\u{200b}',
        '\u{feff}',
        '\u{e000}',
        '\u{10ffff}',
        '🎉',
        ' ',
    ]);
    let ch = prop_oneof![any::<char>(), special, proptest::char::range(' ', '~')];
    proptest::collection::vec(ch, 0..12).prop_map(String::from_iter)
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>().prop_map(|f| if f.is_finite() { f } else { 0.5 }),
        (any::<i32>(), -25i32..25).prop_map(|(m, e)| f64::from(m) * 10f64.powi(e)),
        (-400i32..400).prop_map(|e| 10f64.powi(e)),
        // Floats whose exact value may lie halfway between two shortest
        // candidates (CPython breaks such ties to even): a quarter or a half
        // past an integer where the ulp is that small.
        (1u64 << 49..1u64 << 50, prop_oneof![Just(0.25), Just(0.75)])
            .prop_map(|(i, frac)| i as f64 + frac),
        (1u64 << 52..1u64 << 53).prop_map(|i| i as f64 + 0.5),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        prop_oneof![Just(Value::Null), any::<bool>().prop_map(Value::Bool)],
        prop_oneof![
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            float().prop_map(Value::from),
        ],
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((text(), inner), 0..4)
                .prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
}

/// Generates `n` values of `strategy` with a fresh random runner.
fn generate<S: Strategy>(strategy: S, n: usize) -> Vec<S::Value> {
    let mut runner = TestRunner::default();
    (0..n)
        .map(|_| {
            strategy
                .new_tree(&mut runner)
                .expect("strategy generates")
                .current()
        })
        .collect()
}

#[test]
fn generated_values_round_trip_through_literal_eval() {
    check_against_python(&generate(json_value(), 2000));
}

#[test]
fn printable_characters_match_python() {
    let version = python(
        "import unicodedata; print(unicodedata.unidata_version)",
        b"",
    );
    let limit = if version.trim() == PYTHON_UNICODE_VERSION {
        0x11_0000
    } else {
        // Another Unicode version: characters assigned since differ; the
        // first blocks have been stable for decades.
        0x800
    };
    let all: String = (0..limit).filter_map(char::from_u32).collect();
    let ours = repr_str(&all);
    let script = "import sys; s = sys.stdin.buffer.read().decode('utf-8'); \
                  sys.stdout.buffer.write(repr(s).encode('utf-8'))";
    let theirs = python(script, all.as_bytes());
    if ours != theirs {
        let at = ours
            .chars()
            .zip(theirs.chars())
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        let context = |s: &str| {
            s.chars()
                .skip(at.saturating_sub(8))
                .take(24)
                .collect::<String>()
        };
        panic!(
            "repr of all characters differs at char {at}: ours {:?}, python {:?}",
            context(&ours),
            context(&theirs)
        );
    }
}

#[test]
fn exception_repr_matches_python() {
    let messages = generate(text(), 300);
    let mut input = Vec::new();
    let mut expected = String::new();
    for message in &messages {
        input.extend_from_slice(json!(message).to_string().as_bytes());
        input.push(b'\n');
        expected.push_str(&ExceptionInfo::runtime_error(message.clone(), "").repr());
        expected.push('\n');
    }
    let script = "import json, sys\n\
                  for line in sys.stdin.buffer:\n    \
                      print(repr(RuntimeError(json.loads(line))))";
    assert_eq!(python(script, &input), expected);
}

#[test]
fn datetimes_match_python_isoformat() {
    let instants: Vec<DateTime<Utc>> = [
        (0, 0),
        (1_714_564_800, 0),
        (1_714_564_800, 500_000_000),
        (1_714_564_800, 123_456_000),
        (4_102_444_799, 999_999_000),
        (951_782_400, 1_000),
    ]
    .iter()
    .filter_map(|&(secs, nanos)| Utc.timestamp_opt(secs, nanos).single())
    .collect();
    let mut input = String::new();
    let mut expected = String::new();
    for instant in &instants {
        input.push_str(&format!(
            "{} {}\n",
            instant.timestamp(),
            instant.timestamp_subsec_micros()
        ));
        expected.push_str(&iso8601::format(instant));
        expected.push('\n');
    }
    let script = "import sys\n\
                  from datetime import datetime, timezone\n\
                  for line in sys.stdin:\n    \
                      s, us = map(int, line.split())\n    \
                      d = datetime.fromtimestamp(s, timezone.utc).replace(microsecond=us)\n    \
                      print(d.isoformat())";
    let theirs = python(script, input.as_bytes());
    assert_eq!(theirs, expected);
    // And what Python writes (aware or naive) parses back to the instant.
    let script = "import sys\n\
                  from datetime import datetime, timezone, timedelta\n\
                  for line in sys.stdin:\n    \
                      s, us = map(int, line.split())\n    \
                      d = datetime.fromtimestamp(s, timezone.utc).replace(microsecond=us)\n    \
                      print(d.isoformat())\n    \
                      print(d.replace(tzinfo=None).isoformat())\n    \
                      print(d.astimezone(timezone(timedelta(hours=-4, minutes=-30))).isoformat())";
    let written = python(script, input.as_bytes());
    let parsed: Vec<_> = written.lines().map(iso8601::parse).collect();
    for (i, instant) in instants.iter().enumerate() {
        for j in 0..3 {
            assert_eq!(parsed[i * 3 + j], Some(*instant), "{}", written);
        }
    }
}
