//! Tests of task message decoding: real Celery 5 messages (v2 and v1),
//! every AMQP header type, bad content, bad shapes, property tests that
//! `decode` never panics and that valid v2 and v1 messages built from random
//! fields decode to those fields.

use super::*;
use crate::celery::iso8601;
use chrono::TimeZone as _;
use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use proptest::prelude::*;
use serde_json::json;

const ID: &str = "6f1c9a0b2d3e4f5a6b7c8d9e";

fn s(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}

fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert(ShortString::from(key), value);
    }
    table
}

fn array(items: Vec<AMQPValue>) -> AMQPValue {
    AMQPValue::FieldArray(FieldArray::from(items))
}

fn utc(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .expect("valid fixture")
        .with_timezone(&Utc)
}

const KWARGS_REPR: &str = "{'flags': {'mwUrl': 'https://en.wikipedia.org', 'adminEmail': 'x@y.z', \
     'verbose': True}, 'image': {'name': 'openzim/mwoffliner', 'tag': '1.11'}, \
     'warehouse_path': '/wikipedia'}";

/// Headers of `app.send_task('offliner.mwoffliner', kwargs=..., expires=3600,
/// time_limit=7200)` from Celery 5.7 with `backend='rpc://'`, typed as
/// py-amqp writes them (str → S, None → V, int → I, bool → t, list → A,
/// dict → F).
fn celery5_headers() -> Vec<(&'static str, AMQPValue)> {
    vec![
        ("lang", s("py")),
        ("task", s("offliner.mwoffliner")),
        ("id", s(ID)),
        ("shadow", AMQPValue::Void),
        ("eta", AMQPValue::Void),
        ("expires", s("2026-11-28T06:04:58.545784+00:00")),
        ("group", AMQPValue::Void),
        ("group_index", AMQPValue::Void),
        ("retries", AMQPValue::LongInt(0)),
        (
            "timelimit",
            array(vec![AMQPValue::LongInt(7200), AMQPValue::Void]),
        ),
        ("root_id", s(ID)),
        ("parent_id", AMQPValue::Void),
        ("argsrepr", s("()")),
        ("kwargsrepr", s(KWARGS_REPR)),
        ("origin", s("gen12809@vm")),
        ("ignore_result", AMQPValue::Boolean(false)),
        ("replaced_task_nesting", AMQPValue::LongInt(0)),
        ("stamped_headers", AMQPValue::Void),
        ("stamps", AMQPValue::FieldTable(FieldTable::default())),
    ]
}

const CELERY5_BODY: &str = r#"[[], {"flags": {"mwUrl": "https://en.wikipedia.org", "adminEmail": "x@y.z", "verbose": true}, "image": {"name": "openzim/mwoffliner", "tag": "1.11"}, "warehouse_path": "/wikipedia"}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#;

fn json_props() -> BasicProperties {
    BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_content_encoding(ShortString::from("utf-8"))
        .with_delivery_mode(2)
        .with_priority(0)
}

fn v2_props(headers: Vec<(&str, AMQPValue)>) -> BasicProperties {
    json_props()
        .with_correlation_id(ShortString::from(ID))
        .with_reply_to(ShortString::from("c6a1e5d0-0b9f-3b1e-9c4e-aa11bb22cc33"))
        .with_headers(table(headers))
}

/// The Celery 5 headers with `name` replaced (or removed with `None`).
fn v2_with(name: &str, value: Option<AMQPValue>) -> BasicProperties {
    let mut headers: Vec<_> = celery5_headers()
        .into_iter()
        .filter(|(key, _)| *key != name)
        .collect();
    if let Some(value) = value {
        headers.push((name, value));
    }
    v2_props(headers)
}

fn decode_v2_header(name: &str, value: Option<AMQPValue>) -> Result<TaskRequest, DecodeError> {
    decode(&v2_with(name, value), CELERY5_BODY.as_bytes())
}

fn kind_of(result: Result<TaskRequest, DecodeError>) -> DecodeErrorKind {
    match result {
        Ok(request) => panic!("expected an error, decoded {request:?}"),
        Err(error) => error.kind,
    }
}

#[test]
fn decodes_celery5_send_task_v2() {
    let request = decode(&v2_props(celery5_headers()), CELERY5_BODY.as_bytes())
        .expect("a real Celery 5 message decodes");
    let kwargs = json!({
        "flags": {"mwUrl": "https://en.wikipedia.org", "adminEmail": "x@y.z", "verbose": true},
        "image": {"name": "openzim/mwoffliner", "tag": "1.11"},
        "warehouse_path": "/wikipedia",
    });
    assert_eq!(
        request,
        TaskRequest {
            id: ID.into(),
            name: "offliner.mwoffliner".into(),
            args: vec![],
            kwargs: kwargs.as_object().cloned().unwrap_or_default(),
            retries: 0,
            eta: None,
            expires: Some(utc("2026-11-28T06:04:58.545784Z")),
            time_limit: TimeLimit {
                hard: Some(7200.0),
                soft: None,
            },
            root_id: Some(ID.into()),
            parent_id: None,
            argsrepr: "()".into(),
            kwargsrepr: KWARGS_REPR.into(),
            origin: Some("gen12809@vm".into()),
            reply_to: Some("c6a1e5d0-0b9f-3b1e-9c4e-aa11bb22cc33".into()),
            correlation_id: Some(ID.into()),
            protocol: Protocol::V2,
        }
    );
}

/// Body of `as_task_v1('abc123', 'offliner.youtube', args=[{'a': 1}],
/// kwargs={'x': 'y'}, countdown=10)` with `task_protocol = 1`: no headers,
/// `reply_to` empty.
#[test]
fn decodes_celery5_protocol_v1() {
    let body = r#"{"task": "offliner.youtube", "id": "abc123", "args": [{"a": 1}], "kwargs": {"x": "y"}, "group": null, "group_index": null, "retries": 0, "eta": "2026-11-28T05:05:08.551310+00:00", "expires": null, "utc": true, "callbacks": null, "errbacks": null, "timelimit": [null, null], "taskset": null, "chord": null}"#;
    let props = json_props()
        .with_correlation_id(ShortString::from("abc123"))
        .with_reply_to(ShortString::from(""))
        .with_headers(FieldTable::default());
    let request = decode(&props, body.as_bytes()).expect("a real v1 message decodes");
    assert_eq!(
        request,
        TaskRequest {
            id: "abc123".into(),
            name: "offliner.youtube".into(),
            args: vec![json!({"a": 1})],
            kwargs: json!({"x": "y"}).as_object().cloned().unwrap_or_default(),
            retries: 0,
            eta: Some(utc("2026-11-28T05:05:08.551310Z")),
            expires: None,
            time_limit: TimeLimit::default(),
            root_id: None,
            parent_id: None,
            argsrepr: "[{'a': 1}]".into(),
            kwargsrepr: "{'x': 'y'}".into(),
            origin: None,
            reply_to: None,
            correlation_id: Some("abc123".into()),
            protocol: Protocol::V1,
        }
    );
}

#[test]
fn v1_minimal_and_without_headers() {
    let body = br#"{"task": "t", "id": "i", "retries": 3, "timelimit": [10, 5.5], "expires": "2024-05-01T12:00:00"}"#;
    let request = decode(&BasicProperties::default(), body).expect("minimal v1 decodes");
    assert_eq!(request.args, Vec::<Value>::new());
    assert!(request.kwargs.is_empty());
    assert_eq!(request.argsrepr, "[]");
    assert_eq!(request.kwargsrepr, "{}");
    assert_eq!(request.retries, 3);
    assert_eq!(
        request.time_limit,
        TimeLimit {
            hard: Some(10.0),
            soft: Some(5.5)
        }
    );
    assert_eq!(request.expires, Some(utc("2024-05-01T12:00:00Z")));
    assert_eq!(request.reply_to, None);
    assert_eq!(request.protocol, Protocol::V1);
}

#[test]
fn v2_body_without_embed_and_null_args() {
    let request = decode(&v2_props(celery5_headers()), br#"[null, null]"#).expect("decodes");
    assert!(request.args.is_empty());
    assert!(request.kwargs.is_empty());
    let request =
        decode(&v2_props(celery5_headers()), br#"[[1, "a"], {}, null]"#).expect("decodes");
    assert_eq!(request.args, vec![json!(1), json!("a")]);
}

#[test]
fn v2_reprs_are_computed_when_headers_are_missing_or_void() {
    let mut headers: Vec<_> = celery5_headers()
        .into_iter()
        .filter(|(key, _)| *key != "argsrepr" && *key != "kwargsrepr")
        .collect();
    headers.push(("kwargsrepr", AMQPValue::Void));
    let request = decode(&v2_props(headers), br#"[["it's"], {"n": 1.0}]"#).expect("decodes");
    assert_eq!(request.argsrepr, "[\"it's\"]");
    assert_eq!(request.kwargsrepr, "{'n': 1.0}");
}

#[test]
fn retries_of_every_integer_width() {
    let cases = [
        (AMQPValue::ShortShortInt(-3), -3),
        (AMQPValue::ShortShortUInt(200), 200),
        (AMQPValue::ShortInt(-300), -300),
        (AMQPValue::ShortUInt(60000), 60000),
        (AMQPValue::LongInt(5), 5),
        (AMQPValue::LongUInt(4_000_000_000), 4_000_000_000),
        (AMQPValue::LongLongInt(i64::MAX), i64::MAX),
        (AMQPValue::Timestamp(7), 7),
        (AMQPValue::Void, 0),
    ];
    for (value, expected) in cases {
        let request = decode_v2_header("retries", Some(value.clone())).expect("decodes");
        assert_eq!(request.retries, expected, "{value:?}");
    }
    let request = decode_v2_header("retries", None).expect("decodes without retries");
    assert_eq!(request.retries, 0);
}

#[test]
fn retries_of_wrong_type() {
    let cases = [
        (AMQPValue::Double(1.5), "a float"),
        (AMQPValue::Float(2.0), "a float"),
        (
            AMQPValue::DecimalValue(DecimalValue {
                scale: 1,
                value: 15,
            }),
            "a float",
        ),
        (AMQPValue::Boolean(true), "a boolean"),
        (s("3"), "a string"),
        (array(vec![]), "a list"),
        (AMQPValue::FieldTable(FieldTable::default()), "an object"),
    ];
    for (value, found) in cases {
        assert_eq!(
            kind_of(decode_v2_header("retries", Some(value.clone()))),
            DecodeErrorKind::WrongShape {
                field: "headers.retries".into(),
                expected: "an integer",
                found,
            },
            "{value:?}"
        );
    }
    assert!(matches!(
        kind_of(decode_v2_header("retries", Some(AMQPValue::Timestamp(u64::MAX)))),
        DecodeErrorKind::InvalidValue { field, .. } if field == "headers.retries"
    ));
}

#[test]
fn timelimit_variants() {
    let limit = |hard: Option<f64>, soft: Option<f64>| TimeLimit { hard, soft };
    let cases = [
        (None, limit(None, None)),
        (Some(AMQPValue::Void), limit(None, None)),
        (Some(array(vec![])), limit(None, None)),
        (
            Some(array(vec![AMQPValue::Void, AMQPValue::Void])),
            limit(None, None),
        ),
        (
            Some(array(vec![
                AMQPValue::LongLongInt(60),
                AMQPValue::Double(30.5),
            ])),
            limit(Some(60.0), Some(30.5)),
        ),
        (
            Some(array(vec![AMQPValue::Float(1.5)])),
            limit(Some(1.5), None),
        ),
        (
            Some(array(vec![
                AMQPValue::Void,
                AMQPValue::DecimalValue(DecimalValue {
                    scale: 1,
                    value: 15,
                }),
            ])),
            limit(None, Some(1.5)),
        ),
        (
            Some(array(vec![AMQPValue::ShortUInt(0), AMQPValue::Double(0.0)])),
            limit(None, None),
        ),
    ];
    for (value, expected) in cases {
        let request = decode_v2_header("timelimit", value.clone()).expect("decodes");
        assert_eq!(request.time_limit, expected, "{value:?}");
    }
}

#[test]
fn timelimit_errors() {
    let wrong =
        |field: &str, expected: &'static str, found: &'static str| DecodeErrorKind::WrongShape {
            field: field.into(),
            expected,
            found,
        };
    let cases = [
        (
            s("60"),
            wrong("headers.timelimit", "a list [hard, soft]", "a string"),
        ),
        (
            AMQPValue::LongInt(60),
            wrong("headers.timelimit", "a list [hard, soft]", "an integer"),
        ),
        (
            AMQPValue::FieldTable(FieldTable::default()),
            wrong("headers.timelimit", "a list [hard, soft]", "an object"),
        ),
        (
            array(vec![AMQPValue::Void, AMQPValue::Void, AMQPValue::Void]),
            wrong("headers.timelimit", "a list [hard, soft]", "a list"),
        ),
        (
            array(vec![s("60")]),
            wrong(
                "headers.timelimit[0]",
                "a number of seconds or null",
                "a string",
            ),
        ),
        (
            array(vec![AMQPValue::Void, AMQPValue::Boolean(true)]),
            wrong(
                "headers.timelimit[1]",
                "a number of seconds or null",
                "a boolean",
            ),
        ),
    ];
    for (value, expected) in cases {
        assert_eq!(
            kind_of(decode_v2_header("timelimit", Some(value.clone()))),
            expected,
            "{value:?}"
        );
    }
    for value in [
        array(vec![AMQPValue::LongInt(-1)]),
        array(vec![AMQPValue::Double(f64::NAN)]),
        array(vec![AMQPValue::Void, AMQPValue::Float(f32::INFINITY)]),
    ] {
        assert!(
            matches!(
                kind_of(decode_v2_header("timelimit", Some(value.clone()))),
                DecodeErrorKind::InvalidValue { field, .. } if field.starts_with("headers.timelimit[")
            ),
            "{value:?}"
        );
    }
}

#[test]
fn eta_and_expires_variants() {
    let at = utc("2024-05-01T12:00:00Z");
    let cases = [
        (s("2024-05-01T12:00:00+00:00"), Some(at)),
        (s("2024-05-01T14:00:00+02:00"), Some(at)),
        (s("2024-05-01T12:00:00"), Some(at)),
        (
            AMQPValue::ShortString(ShortString::from("2024-05-01T12:00:00Z")),
            Some(at),
        ),
        (
            AMQPValue::ByteArray(ByteArray::from(b"2024-05-01T12:00:00Z".as_slice())),
            Some(at),
        ),
        (AMQPValue::Timestamp(1_714_564_800), Some(at)),
        (s(""), None),
        (AMQPValue::Void, None),
    ];
    for name in ["eta", "expires"] {
        for (value, expected) in &cases {
            let request = decode_v2_header(name, Some(value.clone())).expect("decodes");
            let got = if name == "eta" {
                request.eta
            } else {
                request.expires
            };
            assert_eq!(got, *expected, "{name} = {value:?}");
        }
    }
}

#[test]
fn eta_errors() {
    assert_eq!(
        kind_of(decode_v2_header("eta", Some(s("tomorrow")))),
        DecodeErrorKind::BadDateTime {
            field: "headers.eta".into(),
            value: "\"tomorrow\"".into(),
        }
    );
    assert_eq!(
        kind_of(decode_v2_header("expires", Some(AMQPValue::Double(1.7e9)))),
        DecodeErrorKind::WrongShape {
            field: "headers.expires".into(),
            expected: "an ISO-8601 string or null",
            found: "a float",
        }
    );
    assert!(matches!(
        kind_of(decode_v2_header("eta", Some(AMQPValue::Timestamp(u64::MAX)))),
        DecodeErrorKind::InvalidValue { field, .. } if field == "headers.eta"
    ));
    let body = br#"{"task": "t", "id": "i", "eta": 1700000000}"#;
    assert_eq!(
        kind_of(decode(&BasicProperties::default(), body)),
        DecodeErrorKind::WrongShape {
            field: "body.eta".into(),
            expected: "an ISO-8601 string or null",
            found: "an integer",
        }
    );
    // A long bad value is cut short in the message.
    let long = format!("x{}", "y".repeat(1000));
    match kind_of(decode_v2_header("eta", Some(s(&long)))) {
        DecodeErrorKind::BadDateTime { value, .. } => assert!(value.len() < 100, "{value}"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn non_utf8_headers_are_named() {
    let bad = AMQPValue::LongString(LongString::from(b"caf\xe9".to_vec()));
    for name in ["id", "task", "eta", "argsrepr", "origin"] {
        let error = decode_v2_header(name, Some(bad.clone())).expect_err("non-UTF-8 header");
        assert_eq!(
            error.kind,
            DecodeErrorKind::HeaderNotUtf8 {
                header: format!("headers.{name}"),
            }
        );
        assert_eq!(error.task_id.is_some(), name != "id", "{name}");
    }
    let nested = array(vec![AMQPValue::Void, bad.clone()]);
    assert_eq!(
        kind_of(decode_v2_header("timelimit", Some(nested))),
        DecodeErrorKind::HeaderNotUtf8 {
            header: "headers.timelimit[1]".into(),
        }
    );
    // Headers that aren't read don't matter.
    let request = decode_v2_header("stamps", Some(table_value(vec![("x", bad)])))
        .expect("unread headers are ignored");
    assert_eq!(request.id, ID);
}

fn table_value(entries: Vec<(&str, AMQPValue)>) -> AMQPValue {
    AMQPValue::FieldTable(table(entries))
}

#[test]
fn string_headers_of_wrong_type() {
    assert_eq!(
        kind_of(decode_v2_header("origin", Some(AMQPValue::LongInt(1)))),
        DecodeErrorKind::WrongShape {
            field: "headers.origin".into(),
            expected: "a string or null",
            found: "an integer",
        }
    );
    assert_eq!(
        kind_of(decode_v2_header("argsrepr", Some(array(vec![])))),
        DecodeErrorKind::WrongShape {
            field: "headers.argsrepr".into(),
            expected: "a string or null",
            found: "a list",
        }
    );
    let deep = (0..100).fold(AMQPValue::Void, |inner, _| array(vec![inner]));
    assert!(matches!(
        kind_of(decode_v2_header("root_id", Some(deep))),
        DecodeErrorKind::TooDeep { .. }
    ));
}

#[test]
fn id_and_task_rules() {
    let error = decode_v2_header("id", None).expect_err("missing id");
    assert_eq!(error.task_id, None);
    assert_eq!(error.kind, DecodeErrorKind::Missing("headers.id".into()));

    let error = decode_v2_header("id", Some(AMQPValue::Void)).expect_err("void id");
    assert_eq!(error.kind, DecodeErrorKind::Missing("headers.id".into()));

    let error = decode_v2_header("id", Some(s(""))).expect_err("empty id");
    assert!(
        matches!(error.kind, DecodeErrorKind::InvalidValue { field, .. } if field == "headers.id")
    );

    let error = decode_v2_header("id", Some(AMQPValue::LongInt(42))).expect_err("int id");
    assert_eq!(error.task_id, None);
    assert!(matches!(error.kind, DecodeErrorKind::WrongShape { .. }));

    // A `task` key makes it v2, even when void.
    let error = decode_v2_header("task", Some(AMQPValue::Void)).expect_err("void task");
    assert_eq!(error.task_id.as_deref(), Some(ID));
    assert_eq!(error.kind, DecodeErrorKind::Missing("headers.task".into()));

    let error = decode(&BasicProperties::default(), br#"{"task": "t"}"#).expect_err("no id");
    assert_eq!(error.kind, DecodeErrorKind::Missing("body.id".into()));

    let error = decode(&BasicProperties::default(), br#"{"id": "i"}"#).expect_err("no task");
    assert_eq!(error.task_id.as_deref(), Some("i"));
    assert_eq!(error.kind, DecodeErrorKind::Missing("body.task".into()));
}

#[test]
fn ids_that_break_the_rule_are_refused_at_decode() {
    let invalid = |error: &DecodeError, field: &str| matches!(&error.kind, DecodeErrorKind::InvalidValue { field: f, .. } if f == field);
    // Short and printable: refused, still named for its task-failed event.
    let error = decode_v2_header("id", Some(s("../../etc"))).expect_err("a path");
    assert!(invalid(&error, "headers.id"), "{error}");
    assert_eq!(error.task_id.as_deref(), Some("../../etc"));
    let error = decode(
        &BasicProperties::default(),
        br#"{"id": "a/b", "task": "offliner.phet"}"#,
    )
    .expect_err("v1 path");
    assert!(invalid(&error, "body.id"), "{error}");
    assert_eq!(error.task_id.as_deref(), Some("a/b"));

    // A newline, or 100 KB: refused and named nowhere but escaped and cut.
    let error = decode_v2_header("id", Some(s("a\nfake line"))).expect_err("a newline");
    assert_eq!(error.task_id, None);
    let text = error.to_string();
    assert!(!text.contains('\n') && text.contains("\\n"), "{text}");

    let huge = "x".repeat(100_000);
    let error = decode_v2_header("id", Some(s(&huge))).expect_err("100 KB");
    assert!(invalid(&error, "headers.id"), "{error}");
    assert_eq!(error.task_id, None);
    let text = error.to_string();
    assert!(text.len() < 400, "{} bytes: {text}", text.len());
    assert!(text.contains("100000 bytes"), "{text}");
    let body = format!(r#"{{"id": "{huge}", "task": "offliner.phet"}}"#);
    let error = decode(&BasicProperties::default(), body.as_bytes()).expect_err("v1 100 KB");
    assert_eq!(error.task_id, None);
    assert!(error.to_string().len() < 400);
}

#[test]
fn content_type_and_encoding() {
    let body = CELERY5_BODY.as_bytes();
    let with = |content_type: Option<&str>, encoding: Option<&str>| {
        let mut props = BasicProperties::default().with_headers(table(celery5_headers()));
        if let Some(ct) = content_type {
            props = props.with_content_type(ShortString::from(ct));
        }
        if let Some(enc) = encoding {
            props = props.with_content_encoding(ShortString::from(enc));
        }
        decode(&props, body)
    };
    for (ct, enc) in [
        (None, None),
        (Some("application/json"), Some("utf-8")),
        (Some("APPLICATION/JSON"), Some("UTF-8")),
        (Some("application/json; charset=utf-8"), Some("utf8")),
        (Some("application/x-json"), Some("binary")),
        (Some(""), Some("")),
    ] {
        assert!(with(ct, enc).is_ok(), "{ct:?} {enc:?}");
    }
    for ct in [
        "application/x-python-serialize",
        "application/x-yaml",
        "application/x-msgpack",
        "text/plain",
    ] {
        let error = with(Some(ct), None).expect_err("unsupported type");
        assert_eq!(
            error.kind,
            DecodeErrorKind::UnsupportedContentType(ct.into())
        );
        assert_eq!(error.task_id.as_deref(), Some(ID), "v2 errors carry the id");
    }
    for enc in ["gzip", "latin-1", "utf-16"] {
        assert_eq!(
            kind_of(with(Some("application/json"), Some(enc))),
            DecodeErrorKind::UnsupportedContentEncoding(enc.into())
        );
    }
    let mut headers = celery5_headers();
    headers.push(("compression", s("application/x-gzip")));
    assert_eq!(
        kind_of(decode(&v2_props(headers), body)),
        DecodeErrorKind::Compressed("\"application/x-gzip\"".into())
    );
    let v1 = BasicProperties::default()
        .with_content_type(ShortString::from("application/x-python-serialize"));
    let error = decode(&v1, b"\x80\x04").expect_err("pickle");
    assert_eq!(error.task_id, None);
}

#[test]
fn non_utf8_and_invalid_json_bodies() {
    let error =
        decode(&v2_props(celery5_headers()), b"[[], {\"a\": \"\xff\"}]").expect_err("bad body");
    assert_eq!(error.kind, DecodeErrorKind::BodyNotUtf8 { valid_up_to: 12 });
    assert_eq!(error.task_id.as_deref(), Some(ID));

    let error = decode(&BasicProperties::default(), b"\xfe\xff").expect_err("bad body");
    assert_eq!(error.kind, DecodeErrorKind::BodyNotUtf8 { valid_up_to: 0 });
    assert_eq!(error.task_id, None);

    for body in [&b""[..], b"[[], {}", b"{'task': 'x'}", b"nope"] {
        assert!(
            matches!(
                kind_of(decode(&v2_props(celery5_headers()), body)),
                DecodeErrorKind::InvalidJson(_)
            ),
            "{body:?}"
        );
    }
    // binary content encoding still wants UTF-8 JSON.
    let props = v2_props(celery5_headers()).with_content_encoding(ShortString::from("binary"));
    assert!(matches!(
        kind_of(decode(&props, b"\x00\xff")),
        DecodeErrorKind::BodyNotUtf8 { .. }
    ));
}

#[test]
fn wrong_body_shapes() {
    let v2 = |body: &str| kind_of(decode(&v2_props(celery5_headers()), body.as_bytes()));
    let wrong =
        |field: &str, expected: &'static str, found: &'static str| DecodeErrorKind::WrongShape {
            field: field.into(),
            expected,
            found,
        };
    assert_eq!(
        v2(r#"{"args": []}"#),
        wrong("body", "a list [args, kwargs, embed]", "an object")
    );
    assert_eq!(
        v2(r#"[[]]"#),
        wrong("body", "a list [args, kwargs, embed]", "a list")
    );
    assert_eq!(
        v2(r#"[[], {}, {}, {}]"#),
        wrong("body", "a list [args, kwargs, embed]", "a list")
    );
    assert_eq!(
        v2(r#"[{}, {}, {}]"#),
        wrong("body[0] (args)", "a list or null", "an object")
    );
    assert_eq!(
        v2(r#"[[], [], {}]"#),
        wrong("body[1] (kwargs)", "an object or null", "a list")
    );
    assert_eq!(
        v2(r#"[[], {}, "x"]"#),
        wrong("body[2] (embed)", "an object or null", "a string")
    );

    let v1 = |body: &str| kind_of(decode(&BasicProperties::default(), body.as_bytes()));
    assert_eq!(
        v1(r#"[[], {}, {}]"#),
        wrong(
            "body",
            "a `task` header (protocol v2) or a JSON object (protocol v1)",
            "a list"
        )
    );
    assert_eq!(
        v1(r#"{"task": "t", "id": "i", "args": "x"}"#),
        wrong("body.args", "a list or null", "a string")
    );
    assert_eq!(
        v1(r#"{"task": "t", "id": "i", "kwargs": [1]}"#),
        wrong("body.kwargs", "an object or null", "a list")
    );
    assert_eq!(
        v1(r#"{"task": 5, "id": "i"}"#),
        wrong("body.task", "a string", "an integer")
    );
    assert_eq!(
        v1(r#"{"task": "t", "id": "i", "retries": "1"}"#),
        wrong("body.retries", "an integer", "a string")
    );
    assert_eq!(
        v1(r#"{"task": "t", "id": "i", "timelimit": {"hard": 1}}"#),
        wrong("body.timelimit", "a list [hard, soft]", "an object")
    );
    assert_eq!(
        v1(r#"{"task": "t", "id": "i", "root_id": 1}"#),
        wrong("body.root_id", "a string or null", "an integer")
    );
}

#[test]
fn error_messages_say_what_failed() {
    let error = decode_v2_header("eta", Some(s("soon"))).expect_err("bad eta");
    assert_eq!(
        error.to_string(),
        format!(
            "cannot decode task message (task id \"{ID}\"): `headers.eta` is not an ISO-8601 \
             date-time: \"soon\""
        )
    );
    let error = decode(&BasicProperties::default(), b"{}").expect_err("no id");
    assert_eq!(
        error.to_string(),
        "cannot decode task message: `body.id` is missing"
    );
}

// ---- decode never panics ---------------------------------------------------
//
// The messages are built from proptest's random bytes by a small hand-written
// reader rather than from nested `prop_oneof!` strategies: proptest clones its
// runner for every union arm, which made 2000 nested cases take ~20 s.

const HEADER_NAMES: &[&str] = &[
    "task",
    "id",
    "retries",
    "eta",
    "expires",
    "timelimit",
    "argsrepr",
    "kwargsrepr",
    "origin",
    "root_id",
    "parent_id",
    "compression",
    "stamps",
];

const V1_KEYS: &[&str] = &[
    "task",
    "id",
    "args",
    "kwargs",
    "retries",
    "eta",
    "expires",
    "timelimit",
    "utc",
    "root_id",
    "parent_id",
];

/// Turns random bytes into choices; yields zeros once the bytes run out.
struct Entropy<'a>(&'a [u8]);

impl Entropy<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((first, rest)) => {
                self.0 = rest;
                *first
            }
            None => 0,
        }
    }

    fn below(&mut self, n: u8) -> u8 {
        self.byte() % n
    }

    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |acc, _| (acc << 8) | u64::from(self.byte()))
    }

    fn pick<'s>(&mut self, items: &[&'s str]) -> &'s str {
        items[usize::from(self.byte()) % items.len()]
    }

    fn bytes(&mut self, max: u8) -> Vec<u8> {
        let len = self.below(max);
        (0..len).map(|_| self.byte()).collect()
    }

    fn ascii(&mut self, max: u8) -> String {
        let len = self.below(max);
        (0..len)
            .map(|_| char::from(0x20 + self.below(0x5f)))
            .collect()
    }

    fn key(&mut self) -> String {
        let len = 1 + self.below(12);
        (0..len)
            .map(|_| char::from(b'a' + self.below(26)))
            .collect()
    }

    /// Text with quotes, escapes, controls and characters from every plane.
    fn text(&mut self) -> String {
        let len = self.below(16);
        (0..len)
            .map(|_| match self.below(4) {
                0 => char::from(self.byte() & 0x7f),
                1 => self
                    .pick(&["'", "\"", "\\", "\n", "é", "\u{2028}", "🎉"])
                    .chars()
                    .next()
                    .unwrap_or('?'),
                _ => {
                    let cp = u32::from_be_bytes([0, self.byte(), self.byte(), self.byte()]);
                    char::from_u32(cp % 0x11_0000).unwrap_or('\u{fffd}')
                }
            })
            .collect()
    }

    /// Date-times near and far from what `iso8601::parse` accepts.
    fn date_text(&mut self) -> String {
        let year = self.u64() % 10_000;
        let (month, day) = (self.below(14), self.below(33));
        let (hour, minute) = (self.below(26), self.below(61));
        let sep = self.pick(&["T", "t", " ", "_", ""]);
        let fraction = self.pick(&["", ".5", ",123456", ".1234567891234", "."]);
        let zone = self.pick(&["", "Z", "z", "+00:00", "-0430", "+01", "+24:00", "+"]);
        format!(
            "{year:04}-{month:02}-{day:02}{sep}{hour:02}:{minute:02}:{minute:02}{fraction}{zone}"
        )
    }

    fn amqp_value(&mut self, depth: u8) -> AMQPValue {
        let kinds = if depth < 4 { 20 } else { 18 };
        match self.below(kinds) {
            0 => AMQPValue::Boolean(self.byte() & 1 == 1),
            1 => AMQPValue::ShortShortInt(self.byte() as i8),
            2 => AMQPValue::ShortShortUInt(self.byte()),
            3 => AMQPValue::ShortInt(self.u64() as i16),
            4 => AMQPValue::ShortUInt(self.u64() as u16),
            5 => AMQPValue::LongInt(self.u64() as i32),
            6 => AMQPValue::LongUInt(self.u64() as u32),
            7 => AMQPValue::LongLongInt(self.u64() as i64),
            8 => AMQPValue::Timestamp(self.u64()),
            9 => AMQPValue::Float(f32::from_bits(self.u64() as u32)),
            10 => AMQPValue::Double(f64::from_bits(self.u64())),
            11 => AMQPValue::DecimalValue(DecimalValue {
                scale: self.byte(),
                value: self.u64() as u32,
            }),
            12 => AMQPValue::ShortString(ShortString::from(self.ascii(40))),
            13 => AMQPValue::LongString(LongString::from(self.text())),
            14 => AMQPValue::LongString(LongString::from(self.date_text())),
            15 => AMQPValue::LongString(LongString::from(self.bytes(40))),
            16 => AMQPValue::ByteArray(ByteArray::from(self.bytes(40))),
            17 => AMQPValue::Void,
            18 => {
                let len = self.below(4);
                let items = (0..len)
                    .map(|_| self.amqp_value(depth + 1))
                    .collect::<Vec<_>>();
                AMQPValue::FieldArray(FieldArray::from(items))
            }
            _ => AMQPValue::FieldTable(self.table(depth + 1, 4)),
        }
    }

    fn table(&mut self, depth: u8, max: u8) -> FieldTable {
        let mut table = FieldTable::default();
        for _ in 0..self.below(max) {
            let key = if self.byte() & 1 == 0 {
                self.pick(HEADER_NAMES).to_owned()
            } else {
                self.key()
            };
            let value = self.amqp_value(depth);
            table.insert(ShortString::from(key), value);
        }
        table
    }

    fn json(&mut self, depth: u8) -> Value {
        let kinds = if depth < 4 { 10 } else { 8 };
        match self.below(kinds) {
            0 => Value::Null,
            1 => Value::Bool(self.byte() & 1 == 1),
            2 => Value::from(self.u64() as i64),
            3 => Value::from(self.u64()),
            4 => Value::from(f64::from_bits(self.u64())),
            5 => Value::String(self.text()),
            6 => Value::String(self.date_text()),
            7 => Value::String(self.ascii(20)),
            8 => Value::Array((0..self.below(4)).map(|_| self.json(depth + 1)).collect()),
            _ => Value::Object(
                (0..self.below(4))
                    .map(|_| (self.key(), self.json(depth + 1)))
                    .collect(),
            ),
        }
    }

    /// Random bytes, random JSON, and v1/v2-shaped JSON with random parts.
    fn body(&mut self) -> Vec<u8> {
        match self.below(4) {
            0 => self.bytes(64),
            1 => self.json(0).to_string().into_bytes(),
            2 => {
                let parts = (0..self.below(5)).map(|_| self.json(1)).collect();
                Value::Array(parts).to_string().into_bytes()
            }
            _ => {
                let fields: Map<String, Value> = (0..self.below(11))
                    .map(|_| (self.pick(V1_KEYS).to_owned(), self.json(1)))
                    .collect();
                Value::Object(fields).to_string().into_bytes()
            }
        }
    }

    fn properties(&mut self, force_v2: bool) -> BasicProperties {
        let mut props = BasicProperties::default();
        if force_v2 || self.byte() & 1 == 0 {
            let mut headers = self.table(0, 12);
            if force_v2 {
                // A valid task and (mostly) a valid id, so that the other
                // headers and the body get read too.
                headers.insert(ShortString::from("task"), s("offliner.phet"));
                if !headers.contains_key("id") || self.below(4) == 0 {
                    headers.insert(ShortString::from("id"), s(ID));
                }
            }
            props = props.with_headers(headers);
        }
        let content_type = self.pick(&[
            "-",
            "application/json",
            "application/x-python-serialize",
            "",
            "Application/Json; x=y",
        ]);
        if content_type != "-" {
            props = props.with_content_type(ShortString::from(content_type));
        }
        let encoding = self.pick(&["-", "utf-8", "binary", "gzip", ""]);
        if encoding != "-" {
            props = props.with_content_encoding(ShortString::from(encoding));
        }
        if self.byte() & 1 == 0 {
            props = props.with_reply_to(ShortString::from(self.ascii(30)));
        }
        props
    }
}

fn check_decoded(result: Result<TaskRequest, DecodeError>) -> Result<(), TestCaseError> {
    match result {
        Ok(request) => {
            prop_assert!(!request.id.is_empty());
            prop_assert!(!request.name.is_empty());
        }
        Err(error) => {
            // The message must render, and an id is only given when valid.
            prop_assert!(!error.to_string().is_empty());
            if let Some(id) = error.task_id {
                prop_assert!(!id.is_empty());
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(crate::proptest_config::config())]

    #[test]
    fn decode_never_panics(seed in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let mut entropy = Entropy(&seed);
        let props = entropy.properties(false);
        let body = entropy.body();
        check_decoded(decode(&props, &body))?;
    }

    #[test]
    fn v2_headers_never_panic(seed in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let mut entropy = Entropy(&seed);
        let props = entropy.properties(true);
        let body = entropy.body();
        check_decoded(decode(&props, &body))?;
        check_decoded(decode(&props, CELERY5_BODY.as_bytes()))?;
    }
}

// ---- valid messages decode to their fields ---------------------------------

/// The fields of a valid message, as a sender would choose them.
#[derive(Debug, Clone)]
struct Fields {
    id: String,
    name: String,
    retries: i64,
    eta: Option<DateTime<Utc>>,
    expires: Option<DateTime<Utc>>,
    hard: Option<u32>,
    soft: Option<u32>,
    root_id: Option<String>,
    origin: Option<String>,
    args: Vec<Value>,
    kwargs: Map<String, Value>,
    reply_to: Option<String>,
}

fn non_empty_text() -> impl Strategy<Value = String> {
    "[^\u{0}]{1,24}"
}

fn instant() -> impl Strategy<Value = DateTime<Utc>> {
    // Years 1..=9999, to the microsecond (what isoformat() writes).
    (-62_135_596_800_i64..253_402_300_799, 0..1_000_000_u32).prop_map(|(secs, micros)| {
        Utc.timestamp_opt(secs, micros * 1000)
            .single()
            .expect("in chrono's range")
    })
}

fn leaf_json() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        prop::collection::vec(any::<i32>(), 0..4).prop_map(|v| json!(v)),
    ]
}

fn fields() -> impl Strategy<Value = Fields> {
    (
        (
            "[A-Za-z0-9_-]{1,64}",
            non_empty_text(),
            any::<i64>(),
            prop::option::of(instant()),
            prop::option::of(instant()),
            prop::option::of(1..u32::MAX),
            prop::option::of(1..u32::MAX),
        ),
        (
            prop::option::of(any::<String>()),
            prop::option::of(any::<String>()),
            prop::collection::vec(leaf_json(), 0..4),
            prop::collection::btree_map("[a-z_]{1,10}", leaf_json(), 0..4),
            prop::option::of("[ -~]{1,40}"),
        ),
    )
        .prop_map(
            |((id, name, retries, eta, expires, hard, soft), rest)| Fields {
                id,
                name,
                retries,
                eta,
                expires,
                hard,
                soft,
                root_id: rest.0,
                origin: rest.1,
                args: rest.2,
                kwargs: rest.3.into_iter().collect(),
                reply_to: rest.4,
            },
        )
}

fn opt_header(value: Option<&String>) -> AMQPValue {
    value.map_or(AMQPValue::Void, |v| s(v))
}

fn opt_seconds(value: Option<u32>) -> AMQPValue {
    value.map_or(AMQPValue::Void, AMQPValue::LongUInt)
}

fn with_reply_to(props: BasicProperties, f: &Fields) -> BasicProperties {
    match &f.reply_to {
        Some(queue) => props.with_reply_to(ShortString::from(queue.as_str())),
        None => props,
    }
}

fn check_fields(request: &TaskRequest, f: &Fields) -> Result<(), TestCaseError> {
    prop_assert_eq!(&request.id, &f.id);
    prop_assert_eq!(&request.name, &f.name);
    prop_assert_eq!(request.retries, f.retries);
    prop_assert_eq!(request.eta, f.eta);
    prop_assert_eq!(request.expires, f.expires);
    prop_assert_eq!(request.time_limit.hard, f.hard.map(f64::from));
    prop_assert_eq!(request.time_limit.soft, f.soft.map(f64::from));
    prop_assert_eq!(&request.root_id, &f.root_id);
    prop_assert_eq!(&request.args, &f.args);
    prop_assert_eq!(&request.kwargs, &f.kwargs);
    prop_assert_eq!(&request.reply_to, &f.reply_to);
    Ok(())
}

proptest! {
    #![proptest_config(crate::proptest_config::config())]

    #[test]
    fn valid_v2_decodes_to_its_fields(f in fields(), stamp_eta in any::<bool>()) {
        let eta = match f.eta {
            // An AMQP timestamp is whole epoch seconds.
            Some(eta) if stamp_eta && eta.timestamp() >= 0 => {
                AMQPValue::Timestamp(eta.timestamp().unsigned_abs())
            }
            Some(eta) => s(&iso8601::format(&eta)),
            None => AMQPValue::Void,
        };
        let headers = vec![
            ("task", s(&f.name)),
            ("id", s(&f.id)),
            ("retries", AMQPValue::LongLongInt(f.retries)),
            ("eta", eta.clone()),
            ("expires", f.expires.map_or(AMQPValue::Void, |e| s(&iso8601::format(&e)))),
            ("timelimit", array(vec![opt_seconds(f.hard), opt_seconds(f.soft)])),
            ("root_id", opt_header(f.root_id.as_ref())),
            ("origin", opt_header(f.origin.as_ref())),
            ("argsrepr", s("()")),
        ];
        let props = with_reply_to(json_props().with_headers(table(headers)), &f);
        let body = json!([f.args, f.kwargs, {"callbacks": null}]).to_string();
        let request = decode(&props, body.as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut expected = f.clone();
        if let AMQPValue::Timestamp(secs) = eta {
            expected.eta = Utc.timestamp_opt(i64::try_from(secs).unwrap_or_default(), 0).single();
        }
        check_fields(&request, &expected)?;
        prop_assert_eq!(&request.origin, &f.origin);
        prop_assert_eq!(request.argsrepr.as_str(), "()");
        prop_assert_eq!(request.protocol, Protocol::V2);
    }

    #[test]
    fn valid_v1_decodes_to_its_fields(f in fields(), utc_flag in any::<bool>()) {
        let body = json!({
            "task": f.name,
            "id": f.id,
            "args": f.args,
            "kwargs": f.kwargs,
            "retries": f.retries,
            "eta": f.eta.map(|e| iso8601::format(&e)),
            "expires": f.expires.map(|e| iso8601::format(&e)),
            "timelimit": [f.hard, f.soft],
            "root_id": f.root_id,
            "utc": utc_flag,
        })
        .to_string();
        let props = with_reply_to(json_props(), &f);
        let request = decode(&props, body.as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        check_fields(&request, &f)?;
        prop_assert_eq!(request.protocol, Protocol::V1);
    }
}

#[test]
fn run_task_json_is_read() {
    let r = request_from_json(
        r#"{"task": "offliner.youtube", "id": "abc", "kwargs": {"warehouse_path": "/x"}}"#,
    )
    .unwrap();
    assert_eq!(r.name, "offliner.youtube");
    assert!(request_from_json(r#"{"task": "x"}"#).is_err());
    assert!(request_from_json(r#"{"task": "x", "id": "y", "extra": 1}"#).is_err());
}

#[test]
fn the_eta_of_a_v2_message_is_read_from_its_headers_alone() {
    let at = "2026-11-28T06:04:58.545784+00:00";
    let eta = super::super::iso8601::parse(at).expect("a date");
    let expires = super::super::iso8601::parse("2026-11-28T06:04:58.545784+00:00");
    assert_eq!(
        peek(&v2_with("eta", Some(s(at)))),
        Some(Peek {
            id: ID.to_owned(),
            eta,
            expires
        })
    );
    assert_eq!(peek(&v2_with("eta", None)), None);
    assert_eq!(peek(&v2_with("eta", Some(s("soon")))), None);
    let mut headers = celery5_headers();
    headers.retain(|(k, _)| *k != "eta" && *k != "id");
    headers.push(("eta", s(at)));
    headers.push(("id", s("../x")));
    assert_eq!(peek(&v2_props(headers)), None, "an invalid id");
    // Without a `task` header it is v1: the eta is in the body.
    let v1 = BasicProperties::default().with_headers(table(vec![("eta", s(at))]));
    assert_eq!(peek(&v1), None);
    assert_eq!(peek(&BasicProperties::default()), None);
}

#[test]
fn the_task_of_a_v2_message_is_read_from_its_headers_alone() {
    let request = headers_only(&v2_props(celery5_headers())).expect("a v2 message");
    assert_eq!(
        request,
        TaskRequest {
            id: ID.into(),
            name: "offliner.mwoffliner".into(),
            reply_to: Some("c6a1e5d0-0b9f-3b1e-9c4e-aa11bb22cc33".into()),
            correlation_id: Some(ID.into()),
            protocol: Protocol::V2,
            ..TaskRequest::default()
        },
        "the id, name and reply only: nothing of the body"
    );
    // Other headers broken: still the task it is.
    let request = headers_only(&v2_with("timelimit", Some(s("never")))).expect("a v2 message");
    assert_eq!(request.id, ID);
    let request = headers_only(&v2_with("task", Some(AMQPValue::LongInt(3)))).expect("an id");
    assert_eq!(request.name, "");
    assert_eq!(headers_only(&v2_with("id", None)), None, "no id");
    assert_eq!(
        headers_only(&v2_with("id", Some(s("../x")))),
        None,
        "an invalid id"
    );
    // v1: the id is in the body.
    let v1 = BasicProperties::default().with_headers(table(vec![("id", s(ID))]));
    assert_eq!(headers_only(&v1), None);
    assert_eq!(headers_only(&BasicProperties::default()), None);
}
