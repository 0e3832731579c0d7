//! The two Celery task message layouts: protocol v2 (metadata in AMQP
//! headers, body `[args, kwargs, embed]`) and v1 (everything in a JSON
//! object body), and what both share: the content checks (type, encoding,
//! compression), the body's JSON and the `reply_to`/`correlation_id`
//! properties.
//!
//! Owns where each field of a [`TaskRequest`] comes from in each layout. It
//! must not judge a field's value (see `fields`, `headers`) nor decide
//! what to do with a request.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::{Map, Value};

use super::fields::{
    datetime, list_or_null, non_empty_string, object_or_null, opt_string, preview, reportable_id,
    retries, task_id, time_limit, wrong_shape,
};
use super::headers::{header, header_datetime};
use super::{DecodeError, DecodeErrorKind, Protocol, TaskRequest, to_repr_list, to_repr_map};

pub(super) fn decode_v2(
    properties: &BasicProperties,
    headers: &FieldTable,
    body: &[u8],
) -> Result<TaskRequest, DecodeError> {
    let id = header(headers, "id").and_then(|v| non_empty_string(v.as_ref(), "headers.id"));
    let known_id = reportable_id(&id);
    let id = id.and_then(|id| task_id(id, "headers.id"));
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

pub(super) fn decode_v1(
    properties: &BasicProperties,
    body: &[u8],
) -> Result<TaskRequest, DecodeError> {
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
    let known_id = reportable_id(&id);
    let id = id.and_then(|id| task_id(id, "body.id"));
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
        reply_to: reply_to(properties),
        correlation_id: correlation_id(properties),
        protocol: Protocol::V1,
        ..TaskRequest::new(id, name, args, kwargs)
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

/// A message property, unless missing or empty (Celery sends an empty
/// `reply_to` when it has no result backend).
fn non_empty_property(value: Option<&ShortString>) -> Option<String> {
    value
        .map(|s| s.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

pub(super) fn reply_to(properties: &BasicProperties) -> Option<String> {
    non_empty_property(properties.reply_to().as_ref())
}

pub(super) fn correlation_id(properties: &BasicProperties) -> Option<String> {
    non_empty_property(properties.correlation_id().as_ref())
}
