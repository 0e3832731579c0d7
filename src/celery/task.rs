//! Decoding Celery task messages (protocol v2 and v1) into [`TaskRequest`].
//!
//! Protocol v2 puts the task's metadata in AMQP headers (`task`, `id`,
//! `retries`, `eta`, `expires`, `timelimit`, `argsrepr`, ...) and the body is
//! the JSON list `[args, kwargs, embed]`. Protocol v1 has no such headers and
//! a JSON object body with `task`, `id`, `args`, `kwargs`, `retries`, `eta`,
//! `expires`, `timelimit` and `utc`. A message is v2 when its headers have a
//! `task` key, else v1.
//!
//! Everything here is untrusted input: every field is checked for its type
//! and an error names the field. Where the rules were open, decode:
//!
//! - accepts content types `application/json` and `application/x-json`
//!   (parameters after `;` ignored) or none; content encodings `utf-8`,
//!   `utf8`, `binary` (the body must still be UTF-8 JSON) or none; refuses a
//!   `compression` header;
//! - reads header values of every AMQP type as the JSON value Python would
//!   have sent (all integer widths, floats, decimals, long strings that must
//!   be UTF-8, arrays, tables, void as null);
//! - takes `args`/`kwargs` that are `null` as empty, and accepts a v2 body
//!   without `embed`; `embed` itself is not used;
//! - takes `retries` that is missing or null as 0, and wants an integer;
//! - takes `timelimit` as `[hard, soft]`, each a number of seconds or null;
//!   a shorter list leaves the rest unset; 0 means "no limit", as in Celery;
//!   a negative limit is an error;
//! - takes `eta`/`expires` as ISO-8601 strings (see [`super::iso8601`]): a
//!   value without an offset is UTC, whatever v1's `utc` flag says; an empty
//!   string or null is "not set"; an AMQP timestamp header is epoch seconds;
//!   a JSON number is an error (Celery itself only ever sends strings and
//!   fails on numbers);
//! - wants the task id and name to be non-empty strings;
//! - takes an empty `reply_to` property (what Celery sends without a result
//!   backend) as none.

use chrono::{DateTime, TimeZone as _, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Map, Value};

use super::iso8601;
use super::repr::to_repr;

/// Deepest nesting of AMQP arrays/tables read from a header.
const MAX_HEADER_DEPTH: usize = 64;

/// Longest untrusted value quoted back in an error message, in characters.
const MAX_QUOTED_CHARS: usize = 64;

/// Which Celery message protocol a task arrived in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V1,
    V2,
}

/// The task's time limits in seconds, from `timelimit` = `[hard, soft]`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TimeLimit {
    /// Kill the task after this many seconds.
    pub hard: Option<f64>,
    /// Ask the task to stop after this many seconds.
    pub soft: Option<f64>,
}

/// One decoded task message.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRequest {
    /// The task id, untrusted: validate it before using it in a path.
    pub id: String,
    /// The registered task name, e.g. `offliner.mwoffliner`.
    pub name: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub retries: i64,
    /// Don't run before this instant.
    pub eta: Option<DateTime<Utc>>,
    /// Don't run after this instant.
    pub expires: Option<DateTime<Utc>>,
    pub time_limit: TimeLimit,
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    /// Python repr of `args`: the v2 header when present, else computed.
    pub argsrepr: String,
    /// Python repr of `kwargs`: the v2 header when present, else computed.
    pub kwargsrepr: String,
    /// The sender's node name (v2 `origin` header).
    pub origin: Option<String>,
    /// Queue for the `rpc://` result, when the sender wants one.
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    pub protocol: Protocol,
}

/// A task message that can't be decoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode task message{}: {kind}", id_suffix(.task_id.as_deref()))]
pub struct DecodeError {
    /// The task id when it could be read (e.g. from the v2 `id` header), so
    /// the worker can still report `task-failed` for it.
    pub task_id: Option<String>,
    pub kind: DecodeErrorKind,
}

/// What was wrong with a task message. `field` names where the problem is,
/// e.g. `headers.timelimit[0]` or `body.kwargs`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeErrorKind {
    #[error("unsupported content type {0:?}: only JSON task messages are accepted")]
    UnsupportedContentType(String),
    #[error("unsupported content encoding {0:?}: expected utf-8")]
    UnsupportedContentEncoding(String),
    #[error("compressed messages are not supported (compression {0})")]
    Compressed(String),
    #[error("body is not valid UTF-8 (first bad byte at offset {valid_up_to})")]
    BodyNotUtf8 { valid_up_to: usize },
    #[error("header `{header}` is not valid UTF-8")]
    HeaderNotUtf8 { header: String },
    #[error("body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("`{field}` has the wrong shape: expected {expected}, found {found}")]
    WrongShape {
        field: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("`{0}` is missing")]
    Missing(String),
    #[error("`{field}` is invalid: {reason}")]
    InvalidValue { field: String, reason: String },
    #[error("`{field}` is not an ISO-8601 date-time: {value}")]
    BadDateTime { field: String, value: String },
    #[error("`{field}` is nested deeper than {MAX_HEADER_DEPTH} levels")]
    TooDeep { field: String },
}

/// Decodes one task message from its AMQP properties and body.
pub fn decode(properties: &BasicProperties, body: &[u8]) -> Result<TaskRequest, DecodeError> {
    match properties.headers() {
        Some(headers) if headers.contains_key("task") => decode_v2(properties, headers, body),
        _ => decode_v1(properties, body),
    }
}

fn decode_v2(
    properties: &BasicProperties,
    headers: &FieldTable,
    body: &[u8],
) -> Result<TaskRequest, DecodeError> {
    let id = header(headers, "id").and_then(|v| non_empty_string(v.as_ref(), "headers.id"));
    let known_id = id.as_ref().ok().cloned();
    let decoded = check_content(properties).and_then(|()| {
        let id = id?;
        decode_v2_fields(properties, headers, body, id)
    });
    decoded.map_err(|kind| DecodeError {
        task_id: known_id,
        kind,
    })
}

fn decode_v2_fields(
    properties: &BasicProperties,
    headers: &FieldTable,
    body: &[u8],
    id: String,
) -> Result<TaskRequest, DecodeErrorKind> {
    let name = non_empty_string(header(headers, "task")?.as_ref(), "headers.task")?;
    let retries = retries(header(headers, "retries")?.as_ref(), "headers.retries")?;
    let eta = header_datetime(headers, "eta")?;
    let expires = header_datetime(headers, "expires")?;
    let time_limit = time_limit(header(headers, "timelimit")?.as_ref(), "headers.timelimit")?;
    let root_id = opt_string(header(headers, "root_id")?.as_ref(), "headers.root_id")?;
    let parent_id = opt_string(header(headers, "parent_id")?.as_ref(), "headers.parent_id")?;
    let origin = opt_string(header(headers, "origin")?.as_ref(), "headers.origin")?;
    let argsrepr = opt_string(header(headers, "argsrepr")?.as_ref(), "headers.argsrepr")?;
    let kwargsrepr = opt_string(
        header(headers, "kwargsrepr")?.as_ref(),
        "headers.kwargsrepr",
    )?;

    let body = parse_body(body)?;
    let parts = match body {
        Value::Array(parts) if (2..=3).contains(&parts.len()) => parts,
        other => {
            return Err(wrong_shape("body", "a list [args, kwargs, embed]", &other));
        }
    };
    let mut parts = parts.into_iter();
    let args = list_or_null(parts.next(), "body[0] (args)")?;
    let kwargs = object_or_null(parts.next(), "body[1] (kwargs)")?;
    match parts.next() {
        None | Some(Value::Null | Value::Object(_)) => {}
        Some(other) => return Err(wrong_shape("body[2] (embed)", "an object or null", &other)),
    }

    Ok(TaskRequest {
        argsrepr: argsrepr.unwrap_or_else(|| to_repr_list(&args)),
        kwargsrepr: kwargsrepr.unwrap_or_else(|| to_repr_map(&kwargs)),
        id,
        name,
        args,
        kwargs,
        retries,
        eta,
        expires,
        time_limit,
        root_id,
        parent_id,
        origin,
        reply_to: reply_to(properties),
        correlation_id: correlation_id(properties),
        protocol: Protocol::V2,
    })
}

fn decode_v1(properties: &BasicProperties, body: &[u8]) -> Result<TaskRequest, DecodeError> {
    let no_id = |kind| DecodeError {
        task_id: None,
        kind,
    };
    check_content(properties).map_err(no_id)?;
    let fields = match parse_body(body).map_err(no_id)? {
        Value::Object(fields) => fields,
        other => {
            return Err(no_id(wrong_shape(
                "body",
                "a `task` header (protocol v2) or a JSON object (protocol v1)",
                &other,
            )));
        }
    };
    let id = non_empty_string(fields.get("id"), "body.id");
    let known_id = id.as_ref().ok().cloned();
    decode_v1_fields(properties, fields, id).map_err(|kind| DecodeError {
        task_id: known_id,
        kind,
    })
}

fn decode_v1_fields(
    properties: &BasicProperties,
    mut fields: Map<String, Value>,
    id: Result<String, DecodeErrorKind>,
) -> Result<TaskRequest, DecodeErrorKind> {
    let id = id?;
    let name = non_empty_string(fields.get("task"), "body.task")?;
    let args = list_or_null(fields.remove("args"), "body.args")?;
    let kwargs = object_or_null(fields.remove("kwargs"), "body.kwargs")?;
    Ok(TaskRequest {
        retries: retries(fields.get("retries"), "body.retries")?,
        eta: datetime(fields.get("eta"), "body.eta")?,
        expires: datetime(fields.get("expires"), "body.expires")?,
        time_limit: time_limit(fields.get("timelimit"), "body.timelimit")?,
        root_id: opt_string(fields.get("root_id"), "body.root_id")?,
        parent_id: opt_string(fields.get("parent_id"), "body.parent_id")?,
        argsrepr: to_repr_list(&args),
        kwargsrepr: to_repr_map(&kwargs),
        id,
        name,
        args,
        kwargs,
        origin: None,
        reply_to: reply_to(properties),
        correlation_id: correlation_id(properties),
        protocol: Protocol::V1,
    })
}

/// Refuses anything but (possibly unlabelled) uncompressed UTF-8 JSON.
fn check_content(properties: &BasicProperties) -> Result<(), DecodeErrorKind> {
    if let Some(content_type) = properties.content_type() {
        let media = content_type
            .as_str()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim();
        let json = ["application/json", "application/x-json"];
        if !media.is_empty() && !json.iter().any(|j| media.eq_ignore_ascii_case(j)) {
            return Err(DecodeErrorKind::UnsupportedContentType(
                content_type.to_string(),
            ));
        }
    }
    if let Some(encoding) = properties.content_encoding() {
        let encoding = encoding.as_str().trim();
        let accepted = ["utf-8", "utf8", "binary"];
        if !encoding.is_empty() && !accepted.iter().any(|a| encoding.eq_ignore_ascii_case(a)) {
            return Err(DecodeErrorKind::UnsupportedContentEncoding(
                encoding.to_owned(),
            ));
        }
    }
    let compression = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("compression"));
    match compression {
        None | Some(AMQPValue::Void) => Ok(()),
        Some(AMQPValue::LongString(s)) => Err(DecodeErrorKind::Compressed(format!(
            "{:?}",
            preview(&String::from_utf8_lossy(s.as_bytes()))
        ))),
        Some(AMQPValue::ShortString(s)) => Err(DecodeErrorKind::Compressed(format!(
            "{:?}",
            preview(s.as_str())
        ))),
        Some(other) => Err(DecodeErrorKind::Compressed(format!(
            "{:?}",
            other.get_type()
        ))),
    }
}

fn parse_body(body: &[u8]) -> Result<Value, DecodeErrorKind> {
    let text = std::str::from_utf8(body).map_err(|e| DecodeErrorKind::BodyNotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    serde_json::from_str(text).map_err(|e| DecodeErrorKind::InvalidJson(e.to_string()))
}

fn reply_to(properties: &BasicProperties) -> Option<String> {
    properties
        .reply_to()
        .as_ref()
        .map(|s| s.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn correlation_id(properties: &BasicProperties) -> Option<String> {
    properties
        .correlation_id()
        .as_ref()
        .map(|s| s.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// A header as the JSON value Python would have put there; `None` when absent.
fn header(headers: &FieldTable, name: &str) -> Result<Option<Value>, DecodeErrorKind> {
    headers
        .inner()
        .get(name)
        .map(|v| amqp_to_json(v, &format!("headers.{name}"), 0))
        .transpose()
}

/// `eta`/`expires` from a header: an AMQP timestamp or an ISO-8601 string.
fn header_datetime(
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

fn non_empty_string(value: Option<&Value>, field: &str) -> Result<String, DecodeErrorKind> {
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

fn opt_string(value: Option<&Value>, field: &str) -> Result<Option<String>, DecodeErrorKind> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(wrong_shape(field, "a string or null", other)),
    }
}

fn retries(value: Option<&Value>, field: &str) -> Result<i64, DecodeErrorKind> {
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

fn time_limit(value: Option<&Value>, field: &str) -> Result<TimeLimit, DecodeErrorKind> {
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

fn datetime(value: Option<&Value>, field: &str) -> Result<Option<DateTime<Utc>>, DecodeErrorKind> {
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

fn list_or_null(value: Option<Value>, field: &str) -> Result<Vec<Value>, DecodeErrorKind> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => Ok(items),
        Some(other) => Err(wrong_shape(field, "a list or null", &other)),
    }
}

fn object_or_null(
    value: Option<Value>,
    field: &str,
) -> Result<Map<String, Value>, DecodeErrorKind> {
    match value {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(items)) => Ok(items),
        Some(other) => Err(wrong_shape(field, "an object or null", &other)),
    }
}

fn wrong_shape(field: &str, expected: &'static str, found: &Value) -> DecodeErrorKind {
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

fn to_repr_list(args: &[Value]) -> String {
    to_repr(&Value::Array(args.to_vec()))
}

fn to_repr_map(kwargs: &Map<String, Value>) -> String {
    to_repr(&Value::Object(kwargs.clone()))
}

/// The start of an untrusted string, short enough to quote in a log line.
fn preview(s: &str) -> String {
    let mut chars = s.chars();
    let mut head: String = chars.by_ref().take(MAX_QUOTED_CHARS).collect();
    if chars.next().is_some() {
        head.push('…');
    }
    head
}

fn id_suffix(task_id: Option<&str>) -> String {
    task_id.map_or_else(String::new, |id| format!(" (task id {:?})", preview(id)))
}

/// A task's JSON for `run-task`: `{"task": "offliner.mwoffliner", "id":
/// "...", "kwargs": {...}, "args": [...]}`.
pub fn request_from_json(text: &str) -> Result<TaskRequest, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        task: String,
        id: String,
        #[serde(default)]
        args: Vec<Value>,
        #[serde(default)]
        kwargs: serde_json::Map<String, Value>,
    }
    let f: File = serde_json::from_str(text).map_err(|e| e.to_string())?;
    Ok(TaskRequest {
        argsrepr: to_repr(&Value::Array(f.args.clone())),
        kwargsrepr: to_repr(&Value::Object(f.kwargs.clone())),
        id: f.id,
        name: f.task,
        args: f.args,
        kwargs: f.kwargs,
        retries: 0,
        eta: None,
        expires: None,
        time_limit: TimeLimit {
            hard: None,
            soft: None,
        },
        root_id: None,
        parent_id: None,
        origin: None,
        reply_to: None,
        correlation_id: None,
        protocol: Protocol::V2,
    })
}

#[cfg(test)]
mod tests;
