//! Task flags (a JSON object) → command-line arguments.
//!
//! The result is an argv, never a shell string: each element reaches the
//! offliner as one argument, byte for byte, so values may hold spaces,
//! quotes, `;`, `$(...)`, newlines or any unicode. Only the flag *names*
//! are restricted, so that no name can read as something other than one
//! `--name` option.
//!
//! Order: the flags come out in the iteration order of the
//! [`serde_json::Map`]. This crate builds serde_json without its
//! `preserve_order` feature, so that order is sorted by key (byte order);
//! were the feature turned on, it would be the order of the message.
//!
//! Owns the flag-name rules and the argv; it must not know which flags a
//! task forbids (the task table does).

use serde_json::{Map, Number, Value};

use super::error::{PlanError, json_kind, shown, shown_json};

/// Longest flag name, in characters.
const MAX_KEY_LEN: usize = 64;

/// Turns task flags into arguments:
///
/// - `true` → `--key`; `false` and `null` → nothing;
/// - a string → `--key=value`, as is (an empty string gives `--key=`);
/// - an integer → `--key=42`; a float in its shortest round-trip form, as
///   JavaScript's `JSON.stringify` prints it (`1.5`, `2`, `0.25`, `1e+21`);
/// - a list → `--key=item` for each item; items must be strings, numbers or
///   booleans (`true`/`false`); an empty list gives nothing;
/// - an object, or a list holding a list, an object or null, is refused.
///
/// Errors: a key that is not 1 to 64 characters of `[A-Za-z0-9_-]` starting
/// with a letter or digit; a value the rules above refuse; a string holding
/// a NUL character (it can't be an argv element).
pub fn flags_to_argv(flags: &Map<String, Value>) -> Result<Vec<String>, PlanError> {
    let mut argv = Vec::with_capacity(flags.len());
    for (key, value) in flags {
        validate_key(key)?;
        match value {
            Value::Bool(true) => argv.push(format!("--{key}")),
            Value::Bool(false) | Value::Null => {}
            Value::Array(items) => {
                for item in items {
                    let rendered = render_item(key, item, value)?;
                    argv.push(format!("--{key}={rendered}"));
                }
            }
            Value::Object(_) => {
                return Err(PlanError::UnsupportedFlagValue {
                    key: shown(key),
                    found: json_kind(value),
                    value: shown_json(value),
                });
            }
            Value::String(_) | Value::Number(_) => {
                let rendered = render_item(key, value, value)?;
                argv.push(format!("--{key}={rendered}"));
            }
        }
    }
    Ok(argv)
}

/// Whether `key` is a plain flag name: 1 to 64 characters of
/// `[A-Za-z0-9_-]`, the first a letter or digit.
pub(crate) fn validate_key(key: &str) -> Result<(), PlanError> {
    let mut chars = key.chars();
    let plain = key.len() <= MAX_KEY_LEN
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        Ok(())
    } else {
        Err(PlanError::InvalidFlagName { key: shown(key) })
    }
}

/// The text after `--key=` for a string, number or boolean `item`; an
/// error for a string holding NUL or for anything else (`flag` is the whole
/// value of the flag, quoted in the error).
fn render_item(key: &str, item: &Value, flag: &Value) -> Result<String, PlanError> {
    match item {
        Value::String(s) if s.contains('\0') => Err(PlanError::FlagValueHasNul {
            key: shown(key),
            value: shown(s),
        }),
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(render_number(n)),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Null | Value::Array(_) | Value::Object(_) => Err(PlanError::UnsupportedFlagValue {
            key: shown(key),
            found: match item {
                Value::Null => "a list holding null",
                Value::Array(_) => "a list holding a list",
                _ => "a list holding an object",
            },
            value: shown_json(flag),
        }),
    }
}

/// An integer in decimal; a float as JavaScript prints it.
fn render_number(n: &Number) -> String {
    if let Some(i) = n.as_i64() {
        i.to_string()
    } else if let Some(u) = n.as_u64() {
        u.to_string()
    } else {
        // serde_json numbers are always finite.
        render_float(n.as_f64().unwrap_or_default())
    }
}

/// JavaScript's `Number.prototype.toString`: the shortest digits that read
/// back as the same float, without a fraction when there is none, and in
/// exponent form below 1e-6 and from 1e21 on.
fn render_float(x: f64) -> String {
    if x == 0.0 {
        // Also -0, which JavaScript prints as "0".
        return "0".to_owned();
    }
    let magnitude = x.abs();
    if (1e-6..1e21).contains(&magnitude) {
        // Rust's `Display` for floats is shortest round-trip, never exponent.
        format!("{x}")
    } else {
        let text = format!("{x:e}");
        match text.split_once('e') {
            Some((mantissa, exponent)) if !exponent.starts_with('-') => {
                format!("{mantissa}e+{exponent}")
            }
            _ => text,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn argv(flags: Value) -> Result<Vec<String>, PlanError> {
        match flags {
            Value::Object(map) => flags_to_argv(&map),
            other => panic!("test flags must be an object, not {other}"),
        }
    }

    fn ok(flags: Value) -> Vec<String> {
        argv(flags).unwrap()
    }

    #[test]
    fn booleans_and_null() {
        assert_eq!(ok(json!({"verbose": true})), ["--verbose"]);
        assert_eq!(ok(json!({"verbose": false})), Vec::<String>::new());
        assert_eq!(ok(json!({"verbose": null})), Vec::<String>::new());
        assert_eq!(ok(json!({})), Vec::<String>::new());
    }

    #[test]
    fn strings_are_passed_verbatim() {
        for value in [
            "https://en.wikipedia.org",
            "",
            "two words",
            "it's \"quoted\"",
            "a; rm -rf /",
            "$(reboot) `id` ${HOME}",
            "line one\nline two\r\n",
            "tab\there",
            "--other-flag",
            "=x=y=",
            "Wikipédia 維基百科 🚀",
            "back\\slash",
        ] {
            assert_eq!(
                ok(json!({"customZimTitle": value})),
                [format!("--customZimTitle={value}")],
                "{value:?}"
            );
        }
    }

    #[test]
    fn integers_are_decimal() {
        assert_eq!(ok(json!({"speed": 3})), ["--speed=3"]);
        assert_eq!(ok(json!({"n": -7})), ["--n=-7"]);
        assert_eq!(ok(json!({"n": 0})), ["--n=0"]);
        assert_eq!(ok(json!({"n": u64::MAX})), [format!("--n={}", u64::MAX)]);
        assert_eq!(ok(json!({"n": i64::MIN})), [format!("--n={}", i64::MIN)]);
    }

    #[test]
    fn floats_are_shortest_as_json_prints_them() {
        let cases: [(&str, &str); 11] = [
            ("1.5", "1.5"),
            ("2.0", "2"),
            ("0.25", "0.25"),
            ("-0.5", "-0.5"),
            ("-0.0", "0"),
            ("0.1", "0.1"),
            ("1e3", "1000"),
            ("123456789.125", "123456789.125"),
            ("1e21", "1e+21"),
            ("1.5e-7", "1.5e-7"),
            ("0.000001", "0.000001"),
        ];
        for (json_text, expected) in cases {
            let flags: Value = serde_json::from_str(&format!("{{\"f\": {json_text}}}")).unwrap();
            assert_eq!(ok(flags), [format!("--f={expected}")], "{json_text}");
        }
        assert_eq!(render_float(1e300), "1e+300");
        assert_eq!(render_float(-2.5e-10), "-2.5e-10");
        assert_eq!(render_float(1e20), "100000000000000000000");
    }

    #[test]
    fn lists_give_one_argument_per_item() {
        assert_eq!(
            ok(json!({"format": ["nopic", "novid:maxi", "with space"]})),
            [
                "--format=nopic",
                "--format=novid:maxi",
                "--format=with space"
            ]
        );
        assert_eq!(
            ok(json!({"x": [1, 2.5, true, false, "$(id)"]})),
            ["--x=1", "--x=2.5", "--x=true", "--x=false", "--x=$(id)"]
        );
        assert_eq!(ok(json!({"x": []})), Vec::<String>::new());
    }

    #[test]
    fn order_is_the_map_order() {
        assert_eq!(
            ok(
                json!({"adminEmail": "a@b.c", "format": ["nopic"], "mwUrl": "https://x", "verbose": true})
            ),
            [
                "--adminEmail=a@b.c",
                "--format=nopic",
                "--mwUrl=https://x",
                "--verbose"
            ]
        );
    }

    #[test]
    fn objects_and_nested_values_are_refused() {
        for (flags, found) in [
            (json!({"x": {"a": 1}}), "an object"),
            (json!({"x": [{"a": 1}]}), "a list holding an object"),
            (json!({"x": ["a", ["b"]]}), "a list holding a list"),
            (json!({"x": ["a", null]}), "a list holding null"),
        ] {
            let err = argv(flags.clone()).unwrap_err();
            assert_eq!(
                err,
                PlanError::UnsupportedFlagValue {
                    key: "x".into(),
                    found,
                    value: flags["x"].to_string(),
                }
            );
            assert!(err.to_string().contains("flag \"x\""), "{err}");
        }
    }

    #[test]
    fn nul_in_a_value_is_refused() {
        let err = argv(json!({"title": "a\u{0}b"})).unwrap_err();
        assert_eq!(
            err,
            PlanError::FlagValueHasNul {
                key: "title".into(),
                value: "a\0b".into()
            }
        );
        assert!(err.to_string().contains(r#""a\0b""#), "{err}");
        assert!(matches!(
            argv(json!({"title": ["ok", "\u{0}"]})),
            Err(PlanError::FlagValueHasNul { .. })
        ));
    }

    #[test]
    fn plain_keys_are_accepted() {
        for key in [
            "mwUrl",
            "api-key",
            "low_quality",
            "9lives",
            "X",
            &"k".repeat(64),
        ] {
            assert_eq!(ok(json!({ key: true })), [format!("--{key}")]);
        }
    }

    #[test]
    fn other_keys_are_refused() {
        for key in [
            "",
            "-x",
            "--x",
            "_x",
            "a=b",
            "a b",
            "a;b",
            "a.b",
            "a/b",
            "a\nb",
            "a\u{0}b",
            "é",
            "$(id)",
            &"k".repeat(65),
        ] {
            let err = argv(json!({ key: true })).unwrap_err();
            assert_eq!(
                err,
                PlanError::InvalidFlagName { key: shown(key) },
                "{key:?}"
            );
        }
        let err = argv(json!({"a=b": "x"})).unwrap_err().to_string();
        assert!(err.contains("\"a=b\""), "{err}");
    }

    #[test]
    fn key_is_checked_even_when_the_value_adds_nothing() {
        assert!(argv(json!({"bad key": false})).is_err());
        assert!(argv(json!({"bad key": null})).is_err());
        assert!(argv(json!({"bad key": []})).is_err());
    }
}
