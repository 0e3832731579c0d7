//! AMQP header values read as the JSON value Python would have sent: every
//! integer width, floats and decimals (finite only), strings that must be
//! UTF-8, arrays and tables (nested at most [`MAX_HEADER_DEPTH`] deep), void
//! as null; and `eta`/`expires` headers that are AMQP timestamps.
//!
//! Owns that conversion. It must not know which header means what: the
//! protocol layouts ask for a header by name.

use chrono::{DateTime, TimeZone as _, Utc};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;

use super::fields::datetime;
use super::{DecodeErrorKind, MAX_HEADER_DEPTH};

/// A header as the JSON value Python would have put there; `None` when absent.
pub(super) fn header(headers: &FieldTable, name: &str) -> Result<Option<Value>, DecodeErrorKind> {
    headers
        .inner()
        .get(name)
        .map(|v| amqp_to_json(v, &format!("headers.{name}"), 0))
        .transpose()
}

/// `eta`/`expires` from a header: an AMQP timestamp or an ISO-8601 string.
pub(super) fn header_datetime(
    headers: &FieldTable,
    name: &str,
) -> Result<Option<DateTime<Utc>>, DecodeErrorKind> {
    let field = format!("headers.{name}");
    match headers.inner().get(name) {
        Some(AMQPValue::Timestamp(seconds)) => i64::try_from(*seconds)
            .ok()
            .and_then(|s| Utc.timestamp_opt(s, 0).single())
            .map(Some)
            .ok_or_else(|| DecodeErrorKind::InvalidValue {
                field,
                reason: format!("timestamp {seconds} is out of range"),
            }),
        Some(other) => datetime(Some(&amqp_to_json(other, &field, 0)?), &field),
        None => Ok(None),
    }
}

/// Converts an AMQP header value to JSON, refusing non-UTF-8 strings,
/// non-finite numbers and absurd nesting.
fn amqp_to_json(value: &AMQPValue, path: &str, depth: usize) -> Result<Value, DecodeErrorKind> {
    if depth > MAX_HEADER_DEPTH {
        return Err(DecodeErrorKind::TooDeep {
            field: path.to_owned(),
        });
    }
    let json = match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(i) => Value::from(*i),
        AMQPValue::ShortShortUInt(i) => Value::from(*i),
        AMQPValue::ShortInt(i) => Value::from(*i),
        AMQPValue::ShortUInt(i) => Value::from(*i),
        AMQPValue::LongInt(i) => Value::from(*i),
        AMQPValue::LongUInt(i) => Value::from(*i),
        AMQPValue::LongLongInt(i) => Value::from(*i),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::Float(f) => finite(f64::from(*f), path)?,
        AMQPValue::Double(f) => finite(*f, path)?,
        AMQPValue::DecimalValue(d) => {
            finite(f64::from(d.value) / 10f64.powi(i32::from(d.scale)), path)?
        }
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => utf8(s.as_bytes(), path)?,
        AMQPValue::ByteArray(b) => utf8(b.as_slice(), path)?,
        AMQPValue::FieldArray(items) => Value::Array(
            items
                .as_slice()
                .iter()
                .enumerate()
                .map(|(i, item)| amqp_to_json(item, &format!("{path}[{i}]"), depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        AMQPValue::FieldTable(table) => Value::Object(
            table
                .into_iter()
                .map(|(key, item)| {
                    let item = amqp_to_json(item, &format!("{path}.{key}"), depth + 1)?;
                    Ok((key.as_str().to_owned(), item))
                })
                .collect::<Result<_, _>>()?,
        ),
        AMQPValue::Void => Value::Null,
    };
    Ok(json)
}

fn finite(f: f64, path: &str) -> Result<Value, DecodeErrorKind> {
    serde_json::Number::from_f64(f)
        .map(Value::Number)
        .ok_or_else(|| DecodeErrorKind::InvalidValue {
            field: path.to_owned(),
            reason: format!("{f} is not a finite number"),
        })
}

fn utf8(bytes: &[u8], path: &str) -> Result<Value, DecodeErrorKind> {
    std::str::from_utf8(bytes)
        .map(|s| Value::String(s.to_owned()))
        .map_err(|_| DecodeErrorKind::HeaderNotUtf8 {
            header: path.to_owned(),
        })
}
