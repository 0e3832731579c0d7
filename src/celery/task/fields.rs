//! The checks of one decoded field: a non-empty string, a task id, an
//! optional string, `retries`, `timelimit`, an ISO-8601 date-time, `args` and
//! `kwargs`; each error names the field and quotes untrusted text short.
//!
//! Owns those rules (listed in the `task` module doc). It must not know
//! where a field sits in a message.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::super::{iso8601, task_id};
use super::{DecodeErrorKind, TimeLimit};

/// Longest untrusted value quoted back in an error message, in characters.
const MAX_QUOTED_CHARS: usize = 64;

pub(super) fn non_empty_string(
    value: Option<&Value>,
    field: &str,
) -> Result<String, DecodeErrorKind> {
    match value {
        None | Some(Value::Null) => Err(DecodeErrorKind::Missing(field.to_owned())),
        Some(Value::String(s)) if s.is_empty() => Err(DecodeErrorKind::InvalidValue {
            field: field.to_owned(),
            reason: "must not be empty".to_owned(),
        }),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(wrong_shape(field, "a string", other)),
    }
}

/// A task id that follows the rule of task ids (see
/// [`crate::celery::task_id`]); the error names its length and first bad
/// character, never the id.
pub(super) fn task_id(id: String, field: &str) -> Result<String, DecodeErrorKind> {
    match task_id::check(&id) {
        Ok(()) => Ok(id),
        Err(error) => Err(DecodeErrorKind::InvalidValue {
            field: field.to_owned(),
            reason: format!("{error}: {}", task_id::shown(&id)),
        }),
    }
}

/// The id a refused message's `task-failed` event names: one read as a
/// string that is valid, or short and printable
/// ([`task_id::reportable`]); else none, and no event.
pub(super) fn reportable_id(id: &Result<String, DecodeErrorKind>) -> Option<String> {
    id.as_ref()
        .ok()
        .filter(|id| task_id::reportable(id))
        .cloned()
}

pub(super) fn opt_string(
    value: Option<&Value>,
    field: &str,
) -> Result<Option<String>, DecodeErrorKind> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(wrong_shape(field, "a string or null", other)),
    }
}

pub(super) fn retries(value: Option<&Value>, field: &str) -> Result<i64, DecodeErrorKind> {
    match value {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => n.as_i64().ok_or_else(|| {
            if n.is_u64() {
                DecodeErrorKind::InvalidValue {
                    field: field.to_owned(),
                    reason: format!("{n} is out of range"),
                }
            } else {
                DecodeErrorKind::WrongShape {
                    field: field.to_owned(),
                    expected: "an integer",
                    found: "a float",
                }
            }
        }),
        Some(other) => Err(wrong_shape(field, "an integer", other)),
    }
}

pub(super) fn time_limit(value: Option<&Value>, field: &str) -> Result<TimeLimit, DecodeErrorKind> {
    let limits = match value {
        None | Some(Value::Null) => return Ok(TimeLimit::default()),
        Some(Value::Array(limits)) if limits.len() <= 2 => limits,
        Some(other) => return Err(wrong_shape(field, "a list [hard, soft]", other)),
    };
    let seconds = |i: usize| -> Result<Option<f64>, DecodeErrorKind> {
        let field = format!("{field}[{i}]");
        match limits.get(i) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => {
                let seconds = n.as_f64().unwrap_or(f64::NAN);
                if seconds.is_nan() || seconds < 0.0 {
                    Err(DecodeErrorKind::InvalidValue {
                        field,
                        reason: format!("{n} is not a non-negative number of seconds"),
                    })
                } else if seconds == 0.0 {
                    Ok(None)
                } else {
                    Ok(Some(seconds))
                }
            }
            Some(other) => Err(wrong_shape(&field, "a number of seconds or null", other)),
        }
    };
    Ok(TimeLimit {
        hard: seconds(0)?,
        soft: seconds(1)?,
    })
}

pub(super) fn datetime(
    value: Option<&Value>,
    field: &str,
) -> Result<Option<DateTime<Utc>>, DecodeErrorKind> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => {
            iso8601::parse(s)
                .map(Some)
                .ok_or_else(|| DecodeErrorKind::BadDateTime {
                    field: field.to_owned(),
                    value: format!("{:?}", preview(s)),
                })
        }
        Some(other) => Err(wrong_shape(field, "an ISO-8601 string or null", other)),
    }
}

pub(super) fn list_or_null(
    value: Option<Value>,
    field: &str,
) -> Result<Vec<Value>, DecodeErrorKind> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => Ok(items),
        Some(other) => Err(wrong_shape(field, "a list or null", &other)),
    }
}

pub(super) fn object_or_null(
    value: Option<Value>,
    field: &str,
) -> Result<Map<String, Value>, DecodeErrorKind> {
    match value {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(items)) => Ok(items),
        Some(other) => Err(wrong_shape(field, "an object or null", &other)),
    }
}

pub(super) fn wrong_shape(field: &str, expected: &'static str, found: &Value) -> DecodeErrorKind {
    DecodeErrorKind::WrongShape {
        field: field.to_owned(),
        expected,
        found: json_type(found),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a float",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The start of an untrusted string, short enough to quote in a log line.
pub(super) fn preview(s: &str) -> String {
    let mut chars = s.chars();
    let mut head: String = chars.by_ref().take(MAX_QUOTED_CHARS).collect();
    if chars.next().is_some() {
        head.push('…');
    }
    head
}
