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
//! - wants the task name to be a non-empty string, and the task id to
//!   follow the rule of task ids ([`super::task_id`]): a message whose id
//!   breaks it is undecodable, its id reported only if short and printable;
//! - takes an empty `reply_to` property (what Celery sends without a result
//!   backend) as none.
//!
//! The layouts are in `protocol`, header values in `headers`, the field
//! rules in `fields`; this file holds the request type, its errors, the
//! two ways in: [`decode`] and [`request_from_json`], and what a v2
//! message's headers alone say: [`peek`], of when it runs, and
//! [`headers_only`], of which task it is.

mod fields;
mod headers;
mod protocol;

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use serde_json::{Map, Value};

use super::repr::to_repr;
use fields::preview;
use protocol::{decode_v1, decode_v2};

/// Deepest nesting of AMQP arrays/tables read from a header.
const MAX_HEADER_DEPTH: usize = 64;

/// Which Celery message protocol a task arrived in; v2 unless it says
/// otherwise, as Celery sends since 4.0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Protocol {
    V1,
    #[default]
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
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskRequest {
    /// The task id: a decoded message's follows [`super::task_id::check`];
    /// one built otherwise (`run-task`) is checked by the planner.
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

impl TaskRequest {
    /// A request with only these fields, as protocol v2 would carry it: no
    /// retries, `eta`, expiry, time limit, parent, origin nor reply; the
    /// reprs computed from `args` and `kwargs`.
    pub fn new(id: String, name: String, args: Vec<Value>, kwargs: Map<String, Value>) -> Self {
        Self {
            argsrepr: to_repr_list(&args),
            kwargsrepr: to_repr_map(&kwargs),
            id,
            name,
            args,
            kwargs,
            ..Self::default()
        }
    }
}

/// A task message that can't be decoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode task message{}: {kind}", id_suffix(.task_id.as_deref()))]
pub struct DecodeError {
    /// The task id when it could be read (e.g. from the v2 `id` header) and
    /// is valid, or short and printable ([`super::task_id::reportable`]), so
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

/// What the headers of a protocol v2 message say of when it runs, read
/// without its body.
#[derive(Debug, Clone, PartialEq)]
pub struct Peek {
    /// A valid task id ([`super::task_id::check`]).
    pub id: String,
    pub eta: DateTime<Utc>,
    pub expires: Option<DateTime<Utc>>,
}

/// The task id of a protocol v2 message (one with a `task` header), from
/// its `id` header, when that is a valid task id.
fn v2_task_id(headers: &lapin::types::FieldTable) -> Option<String> {
    if !headers.contains_key("task") {
        return None;
    }
    match headers::header(headers, "id") {
        Ok(Some(Value::String(id))) if super::task_id::check(&id).is_ok() => Some(id),
        _ => None,
    }
}

/// The id, `eta` and `expires` of a protocol v2 message with a valid id and
/// an `eta`, read from its headers alone; `None` for v1, or when one of
/// them is absent or invalid. Only a hint: [`decode`] checks the whole
/// message.
pub fn peek(properties: &BasicProperties) -> Option<Peek> {
    let headers = properties.headers().as_ref()?;
    let id = v2_task_id(headers)?;
    Some(Peek {
        id,
        eta: headers::header_datetime(headers, "eta").ok().flatten()?,
        expires: headers::header_datetime(headers, "expires").ok()?,
    })
}

/// The request a protocol v2 message's headers alone describe, its body
/// never read: its id, task name (empty when the header is not a string),
/// `reply_to` and `correlation_id`, nothing else (no arguments, times or
/// limits). For a message too large to decode, so that its task can still
/// be told apart and reported. `None` for v1 (the id is in the body) or
/// when the `id` header is absent or not a valid task id.
pub fn headers_only(properties: &BasicProperties) -> Option<TaskRequest> {
    let headers = properties.headers().as_ref()?;
    let id = v2_task_id(headers)?;
    let name = match headers::header(headers, "task") {
        Ok(Some(Value::String(name))) => name,
        _ => String::new(),
    };
    Some(TaskRequest {
        id,
        name,
        reply_to: protocol::reply_to(properties),
        correlation_id: protocol::correlation_id(properties),
        protocol: Protocol::V2,
        ..TaskRequest::default()
    })
}

fn to_repr_list(args: &[Value]) -> String {
    to_repr(&Value::Array(args.to_vec()))
}

fn to_repr_map(kwargs: &Map<String, Value>) -> String {
    to_repr(&Value::Object(kwargs.clone()))
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
    Ok(TaskRequest::new(f.id, f.task, f.args, f.kwargs))
}

#[cfg(test)]
mod tests;
