//! Remote-control (pidbox) requests and replies (SPEC §6).
//!
//! `celery inspect`/`celery control` and Flower broadcast a JSON request
//! `{method, arguments, destination, pattern, matcher, ticket, reply_to}` on
//! the `celery.pidbox` fanout exchange. A node answers when `destination` is
//! null or names it (or, without a destination, when `pattern` matches its
//! name with the `glob` matcher), by publishing `{"<node>": reply}` with
//! header `ticket` to `reply_to.exchange` with `reply_to.routing_key`.
//!
//! The reply types below are the shapes Celery 5's `celery/worker/control.py`
//! gives and Flower 2 reads (field names and order as Celery sends them).
//!
//! Owns those shapes and the matching of a request to this node (whether
//! it is for this node, and whether it names it). It must
//! not open channels or publish (`control::pidbox` does) nor run a command
//! (`control` does).

use std::collections::BTreeMap;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::repr_str;

/// Where a control reply goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    /// Usually `reply.celery.pidbox` (direct).
    pub exchange: String,
    pub routing_key: String,
}

/// One remote-control request.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlRequest {
    /// e.g. `ping`, `revoke`, `stats`.
    pub method: String,
    pub arguments: Map<String, Value>,
    /// Node names the request is for; `None` means every node.
    pub destination: Option<Vec<String>>,
    /// Node-name pattern, used when there is no destination.
    pub pattern: Option<String>,
    /// How `pattern` matches: `glob` (supported) or `pcre` (not).
    pub matcher: Option<String>,
    pub ticket: Option<String>,
    /// Absent for casts that want no reply.
    pub reply_to: Option<ReplyTo>,
}

impl ControlRequest {
    /// Whether this node must run the request, as kombu's `Node` decides.
    /// A `pcre` pattern is never matched (no regex engine here).
    pub fn is_for(&self, hostname: &str) -> bool {
        match (&self.destination, &self.pattern, &self.matcher) {
            (Some(destination), _, _) if !destination.is_empty() => {
                destination.iter().any(|d| d == hostname)
            }
            (_, Some(pattern), Some(matcher)) if !pattern.is_empty() && !matcher.is_empty() => {
                matcher == "glob" && glob_match(pattern, hostname)
            }
            _ => true,
        }
    }
}

impl ControlRequest {
    /// Whether the request names `hostname` in its `destination`: addressed
    /// to this node by name, as Flower's buttons and `celery control -d`
    /// send it. A broadcast (no destination) or a `pattern` is not.
    pub fn names(&self, hostname: &str) -> bool {
        self.destination
            .as_ref()
            .is_some_and(|destination| destination.iter().any(|d| d == hostname))
    }
}

/// A control message that can't be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ControlDecodeError {
    #[error("control message is not valid UTF-8 (first bad byte at offset {valid_up_to})")]
    NotUtf8 { valid_up_to: usize },
    #[error("control message is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("control message field `{field}` has the wrong shape: expected {expected}")]
    WrongShape {
        field: &'static str,
        expected: &'static str,
    },
    #[error("control message has no `method`")]
    MissingMethod,
}

/// Decodes a pidbox request body (JSON).
pub fn decode_control(body: &[u8]) -> Result<ControlRequest, ControlDecodeError> {
    let text = std::str::from_utf8(body).map_err(|e| ControlDecodeError::NotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    let value: Value =
        serde_json::from_str(text).map_err(|e| ControlDecodeError::InvalidJson(e.to_string()))?;
    let Value::Object(mut fields) = value else {
        return Err(shape("body", "an object"));
    };
    let method = match fields.remove("method") {
        None | Some(Value::Null) => return Err(ControlDecodeError::MissingMethod),
        Some(Value::String(m)) if m.is_empty() => return Err(ControlDecodeError::MissingMethod),
        Some(Value::String(m)) => m,
        Some(_) => return Err(shape("method", "a string")),
    };
    let arguments = match fields.remove("arguments") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(arguments)) => arguments,
        Some(_) => return Err(shape("arguments", "an object or null")),
    };
    let destination = match fields.remove("destination") {
        None | Some(Value::Null) => None,
        Some(Value::String(one)) => Some(vec![one]),
        Some(Value::Array(items)) => Some(
            items
                .into_iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s),
                    _ => Err(shape("destination", "a list of node names")),
                })
                .collect::<Result<_, _>>()?,
        ),
        Some(_) => return Err(shape("destination", "a list of node names or null")),
    };
    let reply_to = match fields.remove("reply_to") {
        None | Some(Value::Null) => None,
        Some(Value::Object(mut reply_to)) => {
            match (reply_to.remove("exchange"), reply_to.remove("routing_key")) {
                (Some(Value::String(exchange)), Some(Value::String(routing_key))) => {
                    Some(ReplyTo {
                        exchange,
                        routing_key,
                    })
                }
                _ => {
                    return Err(shape(
                        "reply_to",
                        "{\"exchange\": str, \"routing_key\": str}",
                    ));
                }
            }
        }
        Some(_) => return Err(shape("reply_to", "an object or null")),
    };
    Ok(ControlRequest {
        method,
        arguments,
        destination,
        pattern: opt_string(fields.remove("pattern"), "pattern")?,
        matcher: opt_string(fields.remove("matcher"), "matcher")?,
        ticket: opt_string(fields.remove("ticket"), "ticket")?,
        reply_to,
    })
}

/// The body and properties of a reply: `{"<hostname>": reply}`, headers
/// `ticket` and `clock` (the node's Lamport clock, as kombu sends it), JSON,
/// transient.
pub fn encode_control_reply(
    hostname: &str,
    reply: &Value,
    ticket: &str,
    clock: u64,
) -> (Vec<u8>, BasicProperties) {
    let mut body = Map::new();
    body.insert(hostname.to_owned(), reply.clone());
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("ticket"),
        AMQPValue::LongString(LongString::from(ticket)),
    );
    headers.insert(
        ShortString::from("clock"),
        AMQPValue::LongLongInt(i64::try_from(clock).unwrap_or(i64::MAX)),
    );
    let properties = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_content_encoding(ShortString::from("utf-8"))
        .with_delivery_mode(1)
        .with_headers(headers);
    // Serializing a `Value` map can't fail: keys are strings.
    let body = serde_json::to_vec(&Value::Object(body)).unwrap_or_default();
    (body, properties)
}

/// Celery's `ok(value)`: `{"ok": value}`.
pub fn ok(value: impl Into<String>) -> Value {
    json!({"ok": cut_reply_text(value.into())})
}

/// Celery's `nok(value)`: `{"error": value}`.
pub fn nok(value: impl Into<String>) -> Value {
    json!({"error": cut_reply_text(value.into())})
}

/// Most characters of an `ok` or `error` reply's text: they may echo what a
/// request carried (a method, a queue name, an argument a type error
/// quotes), and a request is an attacker's maybe.
pub const MAX_REPLY_TEXT: usize = 2048;

/// `text` cut at [`MAX_REPLY_TEXT`] characters, then `...`.
fn cut_reply_text(mut text: String) -> String {
    if let Some((end, _)) = text.char_indices().nth(MAX_REPLY_TEXT) {
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// What kombu replies when a command raised: `{"error": "KeyError('x')"}`
/// (the Python `repr` of the exception).
pub fn exception(kind: &str, message: &str) -> Value {
    nok(format!("{kind}({})", repr_str(message)))
}

/// A request's `delivery_info`, as `Request.info()` gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeliveryInfo {
    pub exchange: String,
    pub routing_key: String,
    pub priority: Option<u8>,
    pub redelivered: bool,
}

/// One task request, as Celery's `Request.info()`: the items of `inspect
/// active` and `inspect reserved`, and the `request` of `inspect scheduled`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestInfo {
    pub id: String,
    pub name: String,
    /// The args as a list, or their repr string with `safe=True` (Flower).
    pub args: Value,
    /// The kwargs as an object, or their repr string with `safe=True`.
    pub kwargs: Value,
    /// The task name again (Celery's `Request._type`).
    #[serde(rename = "type")]
    pub task_type: String,
    pub hostname: String,
    /// Epoch seconds when the task started; null until then.
    pub time_start: Option<f64>,
    /// Always false here: messages are acked when their task ends.
    pub acknowledged: bool,
    pub delivery_info: DeliveryInfo,
    /// The process running the task; null until it starts.
    pub worker_pid: Option<u32>,
    /// Where a running task is and how it goes (SPEC §10); absent until
    /// it runs (an extra key, which Celery's clients pass through).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<crate::progress::Snapshot>,
}

/// One item of `inspect scheduled`: a task held for its `eta`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScheduledInfo {
    /// ISO-8601.
    pub eta: Option<String>,
    /// The timer priority Celery's strategy gives eta tasks (6).
    pub priority: u8,
    pub request: RequestInfo,
}

/// An exchange, as kombu's `Exchange.as_dict()`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExchangeInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub exchange_type: String,
    pub arguments: Option<Map<String, Value>>,
    pub durable: bool,
    pub passive: bool,
    pub auto_delete: bool,
    pub delivery_mode: Option<u8>,
    pub no_declare: bool,
}

/// A queue, as kombu's `Queue.as_dict(recurse=True)`: the items of
/// `inspect active_queues` and of the `task_queues` setting.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueInfo {
    pub name: String,
    pub exchange: ExchangeInfo,
    pub routing_key: String,
    pub queue_arguments: Option<Map<String, Value>>,
    pub binding_arguments: Option<Map<String, Value>>,
    pub consumer_arguments: Option<Map<String, Value>>,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub no_ack: bool,
    pub alias: Option<String>,
    pub bindings: Vec<Value>,
    pub no_declare: Option<bool>,
    pub expires: Option<f64>,
    pub message_ttl: Option<f64>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub max_priority: Option<u8>,
}

impl QueueInfo {
    /// A durable task queue bound to a durable exchange, consumed with acks.
    pub fn durable(name: &str, exchange: &str, exchange_type: &str, routing_key: &str) -> Self {
        Self {
            name: name.to_owned(),
            exchange: ExchangeInfo {
                name: exchange.to_owned(),
                exchange_type: exchange_type.to_owned(),
                arguments: None,
                durable: true,
                passive: false,
                auto_delete: false,
                delivery_mode: None,
                no_declare: false,
            },
            routing_key: routing_key.to_owned(),
            queue_arguments: None,
            binding_arguments: None,
            consumer_arguments: None,
            durable: true,
            exclusive: false,
            auto_delete: false,
            no_ack: false,
            alias: None,
            bindings: Vec::new(),
            no_declare: None,
            expires: None,
            message_ttl: None,
            max_length: None,
            max_length_bytes: None,
            max_priority: None,
        }
    }
}

/// `inspect stats`, as Celery 5's `WorkController.stats()`. Flower's worker
/// page reads `pool`, `pid`, `prefetch_count`, `broker`, `total` and
/// `rusage`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    /// Tasks started since the worker started, by task name.
    pub total: BTreeMap<String, u64>,
    pub pid: u32,
    /// The Lamport clock, as a string (Celery's `str(app.clock)`).
    pub clock: String,
    /// Whole seconds since the worker started.
    pub uptime: u64,
    pub pool: PoolInfo,
    pub broker: BrokerInfo,
    pub prefetch_count: u16,
    pub rusage: Rusage,
}

/// The `pool` part of [`Stats`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolInfo {
    pub implementation: String,
    #[serde(rename = "max-concurrency")]
    pub max_concurrency: usize,
    /// Tasks run in this one process.
    pub processes: Vec<u32>,
    #[serde(rename = "max-tasks-per-child")]
    pub max_tasks_per_child: String,
    #[serde(rename = "put-guarded-by-semaphore")]
    pub put_guarded_by_semaphore: bool,
    /// Soft and hard pool-wide time limits (0: none; limits come with each
    /// task message).
    pub timeouts: [u32; 2],
}

/// The `broker` part of [`Stats`], as kombu's `Connection.info()`; never the
/// password.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BrokerInfo {
    pub hostname: String,
    pub userid: String,
    pub virtual_host: String,
    pub port: u16,
    pub insist: bool,
    pub ssl: bool,
    pub transport: String,
    pub connect_timeout: u64,
    pub transport_options: Map<String, Value>,
    pub login_method: String,
    pub uri_prefix: Option<String>,
    /// The heartbeat negotiated with the broker, seconds.
    pub heartbeat: Option<f64>,
    pub failover_strategy: String,
    pub alternates: Vec<String>,
    pub credential_provider: Option<String>,
}

/// The `rusage` part of [`Stats`], as Python's `resource.getrusage()`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Rusage {
    pub utime: f64,
    pub stime: f64,
    /// KiB.
    pub maxrss: u64,
    pub ixrss: u64,
    pub idrss: u64,
    pub isrss: u64,
    pub minflt: u64,
    pub majflt: u64,
    pub nswap: u64,
    pub inblock: u64,
    pub oublock: u64,
    pub msgsnd: u64,
    pub msgrcv: u64,
    pub nsignals: u64,
    pub nvcsw: u64,
    pub nivcsw: u64,
}

/// The reply to mingle's `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HelloReply {
    /// Revoked task ids, oldest first.
    pub revoked: Vec<String>,
    pub clock: u64,
}

fn opt_string(
    value: Option<Value>,
    field: &'static str,
) -> Result<Option<String>, ControlDecodeError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(shape(field, "a string or null")),
    }
}

fn shape(field: &'static str, expected: &'static str) -> ControlDecodeError {
    ControlDecodeError::WrongShape { field, expected }
}

/// Shell-style `*` and `?` matching (what `fnmatch` does for node names),
/// iterative so it can't blow the stack.
fn glob_match(pattern: &str, name: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    let (mut p, mut n) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some('*') => {
                backtrack = Some((p, n));
                p += 1;
            }
            Some(&c) if c == '?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match backtrack {
                Some((star, matched)) => {
                    p = star + 1;
                    n = matched + 1;
                    backtrack = Some((star, matched + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod proptests {
    use super::*;
    use crate::proptest_config::{config, json, text};
    use proptest::prelude::*;

    const KEYS: &[&str] = &[
        "method",
        "arguments",
        "destination",
        "pattern",
        "matcher",
        "ticket",
        "reply_to",
        "exchange",
        "routing_key",
        "task_id",
    ];

    /// Request-shaped objects: every field present or not, of any type.
    fn request_json() -> impl Strategy<Value = Value> {
        proptest::collection::vec((proptest::sample::select(KEYS), json(KEYS)), 0..8).prop_map(
            |fields| Value::Object(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()),
        )
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            json(KEYS).prop_map(|v| v.to_string().into_bytes()),
            request_json().prop_map(|v| v.to_string().into_bytes()),
        ]
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn decode_control_gives_a_request_or_a_typed_error(body in body(), host in text()) {
            match decode_control(&body) {
                Ok(request) => {
                    prop_assert!(!request.method.is_empty());
                    let _ = request.is_for(&host);
                }
                Err(error) => prop_assert!(!error.to_string().is_empty()),
            }
        }

        #[test]
        fn valid_request_decodes_to_its_fields(
            method in "[a-z_]{1,16}",
            task_id in text(),
            destination in proptest::option::of(proptest::collection::vec(text(), 0..3)),
            pattern in proptest::option::of(text()),
            ticket in proptest::option::of(text()),
            routing_key in text(),
        ) {
            let body = json!({
                "method": method,
                "arguments": {"task_id": task_id},
                "destination": destination,
                "pattern": pattern,
                "matcher": "glob",
                "ticket": ticket,
                "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": routing_key},
            });
            let request = decode_control(body.to_string().as_bytes())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&request.method, &method);
            prop_assert_eq!(request.arguments.get("task_id"), Some(&Value::String(task_id)));
            prop_assert_eq!(&request.destination, &destination);
            prop_assert_eq!(&request.pattern, &pattern);
            prop_assert_eq!(&request.ticket, &ticket);
            prop_assert_eq!(
                request.reply_to,
                Some(ReplyTo { exchange: "reply.celery.pidbox".to_owned(), routing_key })
            );
        }

        #[test]
        fn glob_matches_itself_and_star(pattern in text(), name in text()) {
            let _ = glob_match(&pattern, &name);
            let literal = pattern.replace(['*', '?'], "");
            prop_assert!(glob_match(&literal, &literal));
            prop_assert!(glob_match("*", &name));
            let (wild, padded) = (format!("*{literal}*"), format!("{name}{literal}{name}"));
            prop_assert!(glob_match(&wild, &padded));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_celery_inspect_request() {
        let body = json!({
            "method": "ping", "arguments": {}, "destination": null,
            "pattern": null, "matcher": null, "ticket": "t-1",
            "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "oid-1"},
        });
        let request = decode_control(body.to_string().as_bytes()).expect("valid request");
        assert_eq!(
            request,
            ControlRequest {
                method: "ping".into(),
                arguments: Map::new(),
                destination: None,
                pattern: None,
                matcher: None,
                ticket: Some("t-1".into()),
                reply_to: Some(ReplyTo {
                    exchange: "reply.celery.pidbox".into(),
                    routing_key: "oid-1".into(),
                }),
            }
        );
        assert!(request.is_for("alice@node1"));
    }

    #[test]
    fn decodes_revoke_cast() {
        let body = json!({
            "method": "revoke",
            "arguments": {"task_id": "abc", "terminate": true, "signal": "SIGTERM"},
            "destination": ["alice@node1"],
        });
        let request = decode_control(body.to_string().as_bytes()).expect("valid request");
        assert_eq!(request.method, "revoke");
        assert_eq!(request.arguments["task_id"], json!("abc"));
        assert_eq!(request.reply_to, None);
        assert!(request.is_for("alice@node1"));
        assert!(!request.is_for("bob@node2"));
        assert!(request.names("alice@node1"));
        assert!(!request.names("bob@node2"));
    }

    #[test]
    fn only_a_destination_names_a_node() {
        let mut request = decode_control(br#"{"method": "shutdown"}"#).expect("valid request");
        assert!(request.is_for("alice@node1"));
        assert!(!request.names("alice@node1"), "a broadcast names no node");
        request.pattern = Some("alice@*".into());
        request.matcher = Some("glob".into());
        assert!(request.is_for("alice@node1"));
        assert!(!request.names("alice@node1"), "a pattern names no node");
        request.destination = Some(vec!["bob@node2".into(), "alice@node1".into()]);
        assert!(request.names("alice@node1"));
        request.destination = Some(Vec::new());
        assert!(request.is_for("alice@node1"));
        assert!(
            !request.names("alice@node1"),
            "an empty destination is a broadcast"
        );
    }

    #[test]
    fn rejects_bad_requests() {
        let cases: [(&[u8], ControlDecodeError); 8] = [
            (b"\xff", ControlDecodeError::NotUtf8 { valid_up_to: 0 }),
            (b"[1]", shape("body", "an object")),
            (b"{}", ControlDecodeError::MissingMethod),
            (b"{\"method\": \"\"}", ControlDecodeError::MissingMethod),
            (b"{\"method\": 1}", shape("method", "a string")),
            (
                b"{\"method\": \"ping\", \"arguments\": []}",
                shape("arguments", "an object or null"),
            ),
            (
                b"{\"method\": \"ping\", \"destination\": [1]}",
                shape("destination", "a list of node names"),
            ),
            (
                b"{\"method\": \"ping\", \"reply_to\": {\"exchange\": \"x\"}}",
                shape("reply_to", "{\"exchange\": str, \"routing_key\": str}"),
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(decode_control(body), Err(expected), "{body:?}");
        }
        assert!(matches!(
            decode_control(b"{"),
            Err(ControlDecodeError::InvalidJson(_))
        ));
    }

    #[test]
    fn pattern_matching() {
        let request = |pattern: &str, matcher: &str| ControlRequest {
            method: "ping".into(),
            arguments: Map::new(),
            destination: None,
            pattern: Some(pattern.into()),
            matcher: Some(matcher.into()),
            ticket: None,
            reply_to: None,
        };
        assert!(request("alice@*", "glob").is_for("alice@node1"));
        assert!(request("*@node?", "glob").is_for("alice@node1"));
        assert!(!request("bob@*", "glob").is_for("alice@node1"));
        assert!(!request("alice@.*", "pcre").is_for("alice@node1"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("*", ""));
    }

    #[test]
    fn encodes_reply() {
        let (body, props) = encode_control_reply("alice@node1", &json!({"ok": "pong"}), "t-1", 7);
        let value: Value = serde_json::from_slice(&body).expect("reply is JSON");
        assert_eq!(value, json!({"alice@node1": {"ok": "pong"}}));
        let headers = props.headers().as_ref().expect("headers are set");
        assert_eq!(
            headers.inner().get("ticket"),
            Some(&AMQPValue::LongString("t-1".into()))
        );
        assert_eq!(
            headers.inner().get("clock"),
            Some(&AMQPValue::LongLongInt(7))
        );
        assert_eq!(
            props.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(*props.delivery_mode(), Some(1));
    }

    #[test]
    fn queue_info_is_kombu_as_dict() {
        // What Celery 5.7 answers to `inspect active_queues` for QUEUES=small.
        let celery = json!({
            "name": "small",
            "exchange": {"name": "offliner", "type": "topic", "arguments": null, "durable": true,
                         "passive": false, "auto_delete": false, "delivery_mode": null,
                         "no_declare": false},
            "routing_key": "small", "queue_arguments": null, "binding_arguments": null,
            "consumer_arguments": null, "durable": true, "exclusive": false,
            "auto_delete": false, "no_ack": false, "alias": null, "bindings": [],
            "no_declare": null, "expires": null, "message_ttl": null, "max_length": null,
            "max_length_bytes": null, "max_priority": null,
        });
        let ours = QueueInfo::durable("small", "offliner", "topic", "small");
        assert_eq!(serde_json::to_value(&ours).expect("serializes"), celery);
    }

    #[test]
    fn error_replies_are_python_exception_reprs() {
        assert_eq!(
            exception("KeyError", "foo"),
            json!({"error": "KeyError('foo')"})
        );
        assert_eq!(
            exception("ValueError", "it's"),
            json!({"error": "ValueError(\"it's\")"})
        );
        assert_eq!(ok("pong"), json!({"ok": "pong"}));
        assert_eq!(nok("no"), json!({"error": "no"}));
    }
}
