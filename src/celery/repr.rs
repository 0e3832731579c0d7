//! Python's `repr()` of JSON values.
//!
//! Celery events carry task arguments and results as Python `repr` strings
//! (`task-received`'s `args`/`kwargs`, `task-succeeded`'s `result`), and the
//! dispatcher reads them back with `ast.literal_eval`. These functions render
//! a [`serde_json::Value`] exactly as CPython renders the equivalent object:
//! `None`/`True`/`False`, ints, floats with the shortest round-trip digits,
//! strings with Python's quote choice and escapes, `[a, b]` and `{'k': v}`.
//!
//! Written here rather than taken from a crate: no maintained crate renders
//! Python literals, and the rules are short. Which characters count as
//! printable comes from a table generated from Python's `unicodedata`
//! (see `printable.rs`).
//!
//! Owns that rendering only: it never parses a `repr` back.

use std::fmt::Write as _;

use serde_json::{Number, Value};

use super::printable::NON_PRINTABLE;

/// Unicode version of the Python whose `str.isprintable()` the string
/// escaping follows.
pub use super::printable::UNICODE_VERSION as PYTHON_UNICODE_VERSION;

/// Python's `repr()` of the object `json.loads` would make of `value`.
pub fn to_repr(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    out
}

/// Python's `repr()` of a `str`: `'it''s'` → `"it's"`, `'a\nb'`, `'\x00'`.
pub fn repr_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    write_str(&mut out, s);
    out
}

/// Python's `repr()` of a finite or non-finite `float` (`1.0`, `1e+16`,
/// `1e-05`, `-0.0`, `inf`, `nan`).
pub fn repr_float(f: f64) -> String {
    if f.is_nan() {
        return "nan".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    // Rust's `{:e}` gives the shortest digits that round-trip, as Python's
    // repr does; only the layout and the tie rule differ.
    let (digits, exponent) = sci_digits(&format!("{:e}", f.abs()));
    let digits = tie_to_even(digits, exponent, f.abs());
    let sign = if f.is_sign_negative() { "-" } else { "" };
    format!("{sign}{}", layout_float(&digits, exponent))
}

/// Splits Rust's `d.ddde±x` into its digits and its exponent.
fn sci_digits(sci: &str) -> (String, i32) {
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((sci, "0"));
    let digits = mantissa.chars().filter(char::is_ascii_digit).collect();
    (digits, exponent.parse().unwrap_or(0))
}

/// When `f` lies exactly halfway between two shortest candidates, Rust picks
/// the upper one and CPython's dtoa the even one (1084014901836646.25 is
/// `1084014901836646.2` in Python, `…646.3` from `{:e}`). A tie is only
/// possible when the last digit Rust chose is odd, so only then is the
/// exact expansion (at most 767 significant digits for an f64) looked at.
fn tie_to_even(digits: String, exponent: i32, f: f64) -> String {
    let Some(last) = digits.bytes().last().filter(|d| (d - b'0') % 2 == 1) else {
        return digits;
    };
    let (exact, exact_exponent) = sci_digits(&format!("{:.800e}", f));
    let n = digits.len();
    let mut lower = digits[..n - 1].to_owned();
    lower.push(char::from(last - 1));
    let is_tie = exact_exponent == exponent
        && exact.len() > n
        && exact[..n] == lower
        && exact.as_bytes()[n] == b'5'
        && exact[n + 1..].bytes().all(|d| d == b'0');
    let reads_back = format!("{}.{}e{exponent}", &lower[..1], &lower[1..])
        .parse::<f64>()
        .is_ok_and(|back| back == f);
    if is_tie && reads_back { lower } else { digits }
}

/// Lays out `digits` (d.ddd × 10^exponent) as CPython's `float_repr` does.
fn layout_float(digits: &str, exponent: i32) -> String {
    // CPython reasons with the decimal point position: value = 0.DIGITS × 10^decpt.
    let decpt = exponent.saturating_add(1);
    let ndigits = i32::try_from(digits.len()).unwrap_or(i32::MAX);
    if decpt <= -4 || decpt > 16 {
        let (first, rest) = digits.split_at(digits.len().min(1));
        let sign = if exponent < 0 { '-' } else { '+' };
        let dot = if rest.is_empty() { "" } else { "." };
        return format!("{first}{dot}{rest}e{sign}{:02}", exponent.unsigned_abs());
    }
    if decpt <= 0 {
        let zeros = "0".repeat(decpt.unsigned_abs() as usize);
        format!("0.{zeros}{digits}")
    } else if decpt >= ndigits {
        let zeros = "0".repeat((decpt - ndigits) as usize);
        format!("{digits}{zeros}.0")
    } else {
        let (int_part, frac_part) = digits.split_at(decpt as usize);
        format!("{int_part}.{frac_part}")
    }
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_str(out, key);
                out.push_str(": ");
                write_value(out, item);
            }
            out.push('}');
        }
    }
}

fn write_number(out: &mut String, n: &Number) {
    if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(f) = n.as_f64() {
        out.push_str(&repr_float(f));
    } else {
        // Only reachable with serde_json's arbitrary precision numbers,
        // whose text is already a Python literal.
        out.push_str(&n.to_string());
    }
}

fn write_str(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if is_printable(c) => out.push(c),
            c => {
                let cp = u32::from(c);
                let _ = if cp <= 0xff {
                    write!(out, "\\x{cp:02x}")
                } else if cp <= 0xffff {
                    write!(out, "\\u{cp:04x}")
                } else {
                    write!(out, "\\U{cp:08x}")
                };
            }
        }
    }
    out.push(quote);
}

/// Python's `str.isprintable()` for one character.
pub fn is_printable(c: char) -> bool {
    let cp = u32::from(c);
    if (0x20..0x7f).contains(&cp) {
        return true;
    }
    NON_PRINTABLE
        .binary_search_by(|&(lo, hi)| {
            if hi < cp {
                std::cmp::Ordering::Less
            } else if lo > cp {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_err()
}

#[cfg(test)]
mod proptests {
    use super::*;
    use crate::proptest_config::{config, json, text};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn any_json_has_a_repr(value in json(&["args", "kwargs", "name", "size"])) {
            let repr = to_repr(&value);
            prop_assert!(!repr.is_empty());
        }

        #[test]
        fn strings_are_quoted_and_printable(s in text(), any_s in any::<String>()) {
            for s in [s, any_s] {
                let repr = repr_str(&s);
                let quote = repr.chars().next();
                prop_assert!(quote == Some('\'') || quote == Some('"'), "{}", repr);
                prop_assert_eq!(repr.chars().last(), quote);
                prop_assert!(repr.chars().all(|c| c == ' ' || is_printable(c) && !c.is_control()));
            }
        }

        #[test]
        fn finite_floats_read_back(f in any::<f64>()) {
            let repr = repr_float(f);
            if f.is_finite() {
                prop_assert_eq!(repr.parse::<f64>().ok(), Some(f), "{}", repr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scalars() {
        assert_eq!(to_repr(&json!(null)), "None");
        assert_eq!(to_repr(&json!(true)), "True");
        assert_eq!(to_repr(&json!(false)), "False");
        assert_eq!(to_repr(&json!(0)), "0");
        assert_eq!(to_repr(&json!(-17)), "-17");
        assert_eq!(to_repr(&json!(u64::MAX)), "18446744073709551615");
        assert_eq!(to_repr(&json!(i64::MIN)), "-9223372036854775808");
    }

    #[test]
    fn floats_match_python() {
        let cases = [
            (1.0, "1.0"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (123456789012345.0, "123456789012345.0"),
            (1234567890123456.0, "1234567890123456.0"),
            (12345678901234567.0, "1.2345678901234568e+16"),
            (1.5e300, "1.5e+300"),
            (-2.5e-300, "-2.5e-300"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (3.25159, "3.25159"),
            (100.0, "100.0"),
            (0.3, "0.3"),
            (2.0 / 3.0, "0.6666666666666666"),
            // Exactly halfway between …646.2 and …646.3: Python rounds to even.
            (1_084_014_901_836_646.0 + 0.25, "1084014901836646.2"),
            (1_084_014_901_836_646.0 + 0.75, "1084014901836646.8"),
            (0.5, "0.5"),
            (f64::NAN, "nan"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
        ];
        for (f, expected) in cases {
            assert_eq!(repr_float(f), expected, "repr of {f:?}");
        }
    }

    #[test]
    fn strings_match_python() {
        let cases = [
            ("", "''"),
            ("abc", "'abc'"),
            ("it's", "\"it's\""),
            ("say \"hi\"", "'say \"hi\"'"),
            ("both ' and \"", "'both \\' and \"'"),
            ("back\\slash", "'back\\\\slash'"),
            ("tab\there\nnew\rret", "'tab\\there\\nnew\\rret'"),
            ("\u{0}\u{1f}\u{7f}", "'\\x00\\x1f\\x7f'"),
            ("\u{a0}\u{ad}é", "'\\xa0\\xadé'"),
            ("\u{2028}\u{200b}", "'\\u2028\\u200b'"),
            ("\u{e0001}", "'\\U000e0001'"),
            ("日本語 🎉", "'日本語 🎉'"),
        ];
        for (s, expected) in cases {
            assert_eq!(repr_str(s), expected, "repr of {s:?}");
        }
    }

    #[test]
    fn containers() {
        assert_eq!(to_repr(&json!([])), "[]");
        assert_eq!(to_repr(&json!({})), "{}");
        assert_eq!(
            to_repr(&json!([{"name": "x.zim", "size": 123}])),
            "[{'name': 'x.zim', 'size': 123}]"
        );
        assert_eq!(
            to_repr(&json!([1, [2.5, null], {"a": {"b": [true]}}])),
            "[1, [2.5, None], {'a': {'b': [True]}}]"
        );
    }

    #[test]
    fn printable_table_is_sorted_and_disjoint() {
        for pair in NON_PRINTABLE.windows(2) {
            assert!(pair[0].0 <= pair[0].1 && pair[0].1 < pair[1].0, "{pair:?}");
        }
    }
}
