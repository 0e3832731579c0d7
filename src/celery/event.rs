//! Celery events (SPEC §5): worker and task events as Celery 5 sends them.
//!
//! An event is a JSON object published to the `celeryev` topic exchange with
//! the routing key = its type with `-` → `.`. Every event carries `type`,
//! `hostname`, `timestamp`, `utcoffset`, `pid` and `clock`; worker events add
//! `freq`, `active`, `processed`, `loadavg` and the `sw_*` identity; task
//! events add `uuid` and their own fields. The field names are the ones
//! Flower and `celery.events.state` read; a task's container events
//! ([`ContainerEvent`]) get theirs here, in [`EventKind::container`].
//!
//! Owns the events' fields and their encoding. It must not stamp or publish
//! them (the [`crate::events`] sink and the broker's outbox do) nor decide
//! when one is due.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde_json::{Map, Value, json};

use crate::report::ContainerEvent;

/// How far ahead of ours a remote Lamport clock may be and still be
/// merged (2^32: more than a century of events at one a second).
pub const MAX_CLOCK_JUMP: u64 = 1 << 32;

/// Celery's Lamport clock: every event carries the next value.
#[derive(Debug, Default)]
pub struct LamportClock(AtomicU64);

impl LamportClock {
    pub fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// Advances the clock and returns the new value.
    pub fn forward(&self) -> u64 {
        self.update(|value| value.saturating_add(1))
    }

    /// Merges a clock seen from elsewhere: max(ours, theirs) + 1, as
    /// Celery's `LamportClock.adjust`, except that a remote value more than
    /// [`MAX_CLOCK_JUMP`] ahead of ours only forwards ours. Remote clocks
    /// come from any broker user (a pidbox request's `clock` header): one
    /// header of 2^64−1 would otherwise pin the clock at its maximum for
    /// good, every later event carrying the same value. Honest nodes are
    /// within the bound of each other (it is many years of events), so
    /// between them the ordering stays Celery's.
    pub fn adjust(&self, other: u64) -> u64 {
        self.update(|value| {
            let theirs = if other - value.min(other) > MAX_CLOCK_JUMP {
                value
            } else {
                other
            };
            value.max(theirs).saturating_add(1)
        })
    }

    /// The current value, without advancing.
    pub fn value(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    fn update(&self, f: impl Fn(u64) -> u64) -> u64 {
        let previous = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| Some(f(v)))
            .unwrap_or_else(|v| v);
        f(previous)
    }
}

/// Who sends the events: the Celery node name and the software.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `USERNAME@NODE_NAME`.
    pub hostname: String,
    pub pid: u32,
    /// e.g. `zimfarm-worker` (Celery sends `py-celery`).
    pub sw_ident: String,
    pub sw_ver: String,
    /// The OS name, as Python's `platform.system()` (`Linux`).
    pub sw_sys: String,
}

/// The worker's state carried by worker events.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerStats {
    /// Heartbeat interval in seconds.
    pub freq: f64,
    /// Tasks running now.
    pub active: usize,
    /// Tasks received since start.
    pub processed: u64,
    /// 1, 5 and 15 minute load averages.
    pub loadavg: [f64; 3],
    /// The ids of the tasks this node runs or keeps (at most
    /// [`MAX_LISTED_TASKS`]): sent as `task_ids` in `worker-online` and
    /// `worker-heartbeat`, an extra field that Celery and Flower ignore,
    /// from which the farm knows who runs what (see [`crate::farm`]).
    pub task_ids: Vec<String>,
}

/// Most task ids a worker event lists.
pub const MAX_LISTED_TASKS: usize = 64;

/// One event to send.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    WorkerOnline(WorkerStats),
    WorkerHeartbeat(WorkerStats),
    /// The goodbye; `kept`: the ids of the running tasks this node left
    /// running for its next start (an extra field, which Celery ignores;
    /// see [`crate::farm`]).
    WorkerOffline {
        stats: WorkerStats,
        kept: Vec<String>,
    },
    TaskReceived {
        uuid: String,
        name: String,
        /// Python repr of the args.
        args: String,
        /// Python repr of the kwargs.
        kwargs: String,
        root_id: Option<String>,
        parent_id: Option<String>,
        retries: i64,
        /// ISO-8601, see [`super::iso8601::format`].
        eta: Option<String>,
        expires: Option<String>,
    },
    TaskStarted {
        uuid: String,
    },
    TaskSucceeded {
        uuid: String,
        /// Python repr of the return value.
        result: String,
        /// Seconds.
        runtime: f64,
    },
    TaskFailed {
        uuid: String,
        /// Python repr of the exception, see `ExceptionInfo::repr`.
        exception: String,
        traceback: String,
    },
    TaskRevoked {
        uuid: String,
        terminated: bool,
        signum: Option<i32>,
        expired: bool,
    },
    /// Any other task event, e.g. `task-container_started`: `event_type` is
    /// the full type (with the `task-` prefix); `fields` are added to the
    /// body but can't override the standard fields.
    Custom {
        event_type: String,
        uuid: String,
        fields: Map<String, Value>,
    },
}

impl EventKind {
    /// Task `uuid`'s container event, as Celery sees it: a
    /// `task-container_*` event with its fields. The one place those
    /// events get their wire names.
    pub fn container(uuid: &str, event: &ContainerEvent) -> Self {
        let (event_type, fields) = match event {
            ContainerEvent::Started { image, command } => (
                "task-container_started",
                json!({"image": image, "command": command}),
            ),
            ContainerEvent::Finished {
                exit_code,
                stdout,
                stderr,
                log,
            } => (
                "task-container_finished",
                json!({"exit_code": exit_code, "stdout": stdout, "stderr": stderr, "log": log}),
            ),
            ContainerEvent::Killed { timeout_s } => {
                ("task-container_killed", json!({"timeout": timeout_s}))
            }
        };
        Self::Custom {
            event_type: event_type.to_owned(),
            uuid: uuid.to_owned(),
            fields: match fields {
                Value::Object(fields) => fields,
                _ => Map::new(),
            },
        }
    }

    /// Task `uuid`'s `task-progress` event (SPEC §10): the snapshot's
    /// fields, nulls included, so a reader finds every field in every
    /// event. Celery derives the task's state `PROGRESS` from its type.
    pub fn progress(uuid: &str, snapshot: &crate::progress::Snapshot) -> Self {
        Self::Custom {
            event_type: "task-progress".to_owned(),
            uuid: uuid.to_owned(),
            fields: match serde_json::to_value(snapshot) {
                Ok(Value::Object(fields)) => fields,
                _ => Map::new(),
            },
        }
    }

    /// The Celery event type, e.g. `task-succeeded`.
    pub fn event_type(&self) -> &str {
        match self {
            Self::WorkerOnline(_) => "worker-online",
            Self::WorkerHeartbeat(_) => "worker-heartbeat",
            Self::WorkerOffline { .. } => "worker-offline",
            Self::TaskReceived { .. } => "task-received",
            Self::TaskStarted { .. } => "task-started",
            Self::TaskSucceeded { .. } => "task-succeeded",
            Self::TaskFailed { .. } => "task-failed",
            Self::TaskRevoked { .. } => "task-revoked",
            Self::Custom { event_type, .. } => event_type,
        }
    }

    /// Whether this event ends the task's life (must never be dropped).
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Self::TaskSucceeded { .. } | Self::TaskFailed { .. } | Self::TaskRevoked { .. }
        )
    }

    /// The task this event is about, for task events.
    pub fn task_id(&self) -> Option<&str> {
        match self {
            Self::WorkerOnline(_) | Self::WorkerHeartbeat(_) | Self::WorkerOffline { .. } => None,
            Self::TaskReceived { uuid, .. }
            | Self::TaskStarted { uuid }
            | Self::TaskSucceeded { uuid, .. }
            | Self::TaskFailed { uuid, .. }
            | Self::TaskRevoked { uuid, .. }
            | Self::Custom { uuid, .. } => Some(uuid),
        }
    }
}

/// An event ready to publish on `celeryev`.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedEvent {
    pub event_type: String,
    /// The type with `-` → `.`, e.g. `task.succeeded`.
    pub routing_key: String,
    /// The JSON body.
    pub body: Vec<u8>,
    pub is_final: bool,
    pub task_id: Option<String>,
}

/// Builds the event body; `clock` comes from [`LamportClock::forward`],
/// `timestamp` from [`now_timestamp`], `utcoffset` from [`utcoffset_now`].
pub fn encode_event(
    kind: &EventKind,
    identity: &Identity,
    clock: u64,
    timestamp: f64,
    utcoffset: i64,
) -> EncodedEvent {
    let mut body = Map::new();
    match kind {
        EventKind::WorkerOnline(stats)
        | EventKind::WorkerHeartbeat(stats)
        | EventKind::WorkerOffline { stats, .. } => {
            body.insert("freq".into(), json!(stats.freq));
            body.insert("active".into(), json!(stats.active));
            body.insert("processed".into(), json!(stats.processed));
            body.insert("loadavg".into(), json!(stats.loadavg));
            body.insert("sw_ident".into(), json!(identity.sw_ident));
            body.insert("sw_ver".into(), json!(identity.sw_ver));
            body.insert("sw_sys".into(), json!(identity.sw_sys));
            if let EventKind::WorkerOffline { kept, .. } = kind {
                body.insert("kept".into(), json!(kept));
            } else {
                body.insert("task_ids".into(), json!(stats.task_ids));
            }
        }
        EventKind::TaskReceived {
            uuid,
            name,
            args,
            kwargs,
            root_id,
            parent_id,
            retries,
            eta,
            expires,
        } => {
            body.insert("uuid".into(), json!(uuid));
            body.insert("name".into(), json!(name));
            body.insert("args".into(), json!(args));
            body.insert("kwargs".into(), json!(kwargs));
            body.insert("root_id".into(), json!(root_id));
            body.insert("parent_id".into(), json!(parent_id));
            body.insert("retries".into(), json!(retries));
            body.insert("eta".into(), json!(eta));
            body.insert("expires".into(), json!(expires));
        }
        EventKind::TaskStarted { uuid } => {
            body.insert("uuid".into(), json!(uuid));
        }
        EventKind::TaskSucceeded {
            uuid,
            result,
            runtime,
        } => {
            body.insert("uuid".into(), json!(uuid));
            body.insert("result".into(), json!(result));
            body.insert("runtime".into(), finite_or_null(*runtime));
        }
        EventKind::TaskFailed {
            uuid,
            exception,
            traceback,
        } => {
            body.insert("uuid".into(), json!(uuid));
            body.insert("exception".into(), json!(exception));
            body.insert("traceback".into(), json!(traceback));
        }
        EventKind::TaskRevoked {
            uuid,
            terminated,
            signum,
            expired,
        } => {
            body.insert("uuid".into(), json!(uuid));
            body.insert("terminated".into(), json!(terminated));
            body.insert("signum".into(), json!(signum));
            body.insert("expired".into(), json!(expired));
        }
        EventKind::Custom { uuid, fields, .. } => {
            body.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
            body.insert("uuid".into(), json!(uuid));
        }
    }
    let event_type = kind.event_type().to_owned();
    body.insert("type".into(), json!(event_type));
    body.insert("hostname".into(), json!(identity.hostname));
    body.insert("timestamp".into(), finite_or_null(timestamp));
    body.insert("utcoffset".into(), json!(utcoffset));
    body.insert("pid".into(), json!(identity.pid));
    body.insert("clock".into(), json!(clock));

    EncodedEvent {
        routing_key: event_type.replace('-', "."),
        event_type,
        // Serializing a `Value` map can't fail: keys are strings.
        body: serde_json::to_vec(&Value::Object(body)).unwrap_or_default(),
        is_final: kind.is_final(),
        task_id: kind.task_id().map(str::to_owned),
    }
}

/// `json!(f64)` gives null for NaN/inf too; this makes it explicit.
fn finite_or_null(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// Celery's `utcoffset()`: hours **west** of UTC, floored like Python's
/// `time.timezone // 3600` (UTC+05:30 gives -6), for the local zone now
/// (DST included, as Celery uses `time.altzone` during DST).
pub fn utcoffset_now() -> i64 {
    let east = chrono::Local::now().offset().local_minus_utc();
    utcoffset_from_east_seconds(east)
}

/// [`utcoffset_now`] for a given offset in seconds east of UTC.
pub fn utcoffset_from_east_seconds(east: i32) -> i64 {
    (-i64::from(east)).div_euclid(3600)
}

/// Now, as epoch seconds (Python's `time.time()`).
pub fn now_timestamp() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Properties of an event message: JSON, transient, `hostname` header.
pub fn event_properties(hostname: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("hostname"),
        AMQPValue::LongString(LongString::from(hostname)),
    );
    BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_content_encoding(ShortString::from("utf-8"))
        .with_delivery_mode(1)
        .with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            hostname: "alice@node1".into(),
            pid: 4242,
            sw_ident: "zimfarm-worker".into(),
            sw_ver: "0.1.0".into(),
            sw_sys: "Linux".into(),
        }
    }

    fn stats() -> WorkerStats {
        WorkerStats {
            freq: 2.0,
            active: 1,
            processed: 7,
            loadavg: [0.5, 0.25, 0.1],
            task_ids: vec!["t1".into()],
        }
    }

    fn body(kind: &EventKind) -> (EncodedEvent, Value) {
        let encoded = encode_event(kind, &identity(), 12, 1_700_000_000.25, -1);
        let value = serde_json::from_slice(&encoded.body).expect("event body is JSON");
        (encoded, value)
    }

    fn common(event_type: &str) -> Value {
        json!({
            "type": event_type,
            "hostname": "alice@node1",
            "timestamp": 1_700_000_000.25,
            "utcoffset": -1,
            "pid": 4242,
            "clock": 12,
        })
    }

    fn with(mut base: Value, extra: Value) -> Value {
        if let (Value::Object(base), Value::Object(extra)) = (&mut base, extra) {
            base.extend(extra);
        }
        base
    }

    #[test]
    fn worker_events() {
        let cases = [
            (
                EventKind::WorkerOnline(stats()),
                "worker-online",
                "worker.online",
            ),
            (
                EventKind::WorkerHeartbeat(stats()),
                "worker-heartbeat",
                "worker.heartbeat",
            ),
        ];
        for (kind, event_type, routing_key) in cases {
            let (encoded, value) = body(&kind);
            let expected = with(
                common(event_type),
                json!({
                    "freq": 2.0, "active": 1, "processed": 7, "loadavg": [0.5, 0.25, 0.1],
                    "sw_ident": "zimfarm-worker", "sw_ver": "0.1.0", "sw_sys": "Linux",
                    "task_ids": ["t1"],
                }),
            );
            assert_eq!(value, expected);
            assert_eq!(encoded.event_type, event_type);
            assert_eq!(encoded.routing_key, routing_key);
            assert!(!encoded.is_final);
            assert_eq!(encoded.task_id, None);
        }
    }

    #[test]
    fn worker_offline_lists_the_tasks_it_keeps() {
        for kept in [vec![], vec!["t1".to_owned(), "t2".to_owned()]] {
            let kind = EventKind::WorkerOffline {
                stats: stats(),
                kept: kept.clone(),
            };
            let (encoded, value) = body(&kind);
            let expected = with(
                common("worker-offline"),
                json!({
                    "freq": 2.0, "active": 1, "processed": 7, "loadavg": [0.5, 0.25, 0.1],
                    "sw_ident": "zimfarm-worker", "sw_ver": "0.1.0", "sw_sys": "Linux",
                    "kept": kept,
                }),
            );
            assert_eq!(value, expected);
            assert_eq!(encoded.event_type, "worker-offline");
            assert_eq!(encoded.routing_key, "worker.offline");
            assert!(!encoded.is_final);
            assert_eq!(encoded.task_id, None);
        }
    }

    #[test]
    fn task_received() {
        let kind = EventKind::TaskReceived {
            uuid: "abc".into(),
            name: "offliner.mwoffliner".into(),
            args: "[]".into(),
            kwargs: "{'flags': {}}".into(),
            root_id: Some("abc".into()),
            parent_id: None,
            retries: 0,
            eta: None,
            expires: Some("2024-05-01T12:00:00+00:00".into()),
        };
        let (encoded, value) = body(&kind);
        let expected = with(
            common("task-received"),
            json!({
                "uuid": "abc", "name": "offliner.mwoffliner", "args": "[]",
                "kwargs": "{'flags': {}}", "root_id": "abc", "parent_id": null,
                "retries": 0, "eta": null, "expires": "2024-05-01T12:00:00+00:00",
            }),
        );
        assert_eq!(value, expected);
        assert_eq!(encoded.routing_key, "task.received");
        assert!(!encoded.is_final);
        assert_eq!(encoded.task_id.as_deref(), Some("abc"));
    }

    #[test]
    fn task_started() {
        let (encoded, value) = body(&EventKind::TaskStarted { uuid: "abc".into() });
        assert_eq!(value, with(common("task-started"), json!({"uuid": "abc"})));
        assert_eq!(encoded.routing_key, "task.started");
        assert!(!encoded.is_final);
    }

    #[test]
    fn task_succeeded() {
        let kind = EventKind::TaskSucceeded {
            uuid: "abc".into(),
            result: "[{'name': 'x.zim', 'size': 123}]".into(),
            runtime: 12.5,
        };
        let (encoded, value) = body(&kind);
        let expected = with(
            common("task-succeeded"),
            json!({"uuid": "abc", "result": "[{'name': 'x.zim', 'size': 123}]", "runtime": 12.5}),
        );
        assert_eq!(value, expected);
        assert_eq!(encoded.routing_key, "task.succeeded");
        assert!(encoded.is_final);
        assert_eq!(encoded.task_id.as_deref(), Some("abc"));
    }

    #[test]
    fn task_failed() {
        let kind = EventKind::TaskFailed {
            uuid: "abc".into(),
            exception: "RuntimeError('boom')".into(),
            traceback: "Traceback ...".into(),
        };
        let (encoded, value) = body(&kind);
        let expected = with(
            common("task-failed"),
            json!({"uuid": "abc", "exception": "RuntimeError('boom')", "traceback": "Traceback ..."}),
        );
        assert_eq!(value, expected);
        assert_eq!(encoded.routing_key, "task.failed");
        assert!(encoded.is_final);
    }

    #[test]
    fn task_revoked() {
        let kind = EventKind::TaskRevoked {
            uuid: "abc".into(),
            terminated: true,
            signum: Some(15),
            expired: false,
        };
        let (encoded, value) = body(&kind);
        let expected = with(
            common("task-revoked"),
            json!({"uuid": "abc", "terminated": true, "signum": 15, "expired": false}),
        );
        assert_eq!(value, expected);
        assert_eq!(encoded.routing_key, "task.revoked");
        assert!(encoded.is_final);

        let expired = EventKind::TaskRevoked {
            uuid: "abc".into(),
            terminated: false,
            signum: None,
            expired: true,
        };
        let (_, value) = body(&expired);
        assert_eq!(value["signum"], Value::Null);
        assert_eq!(value["expired"], json!(true));
    }

    #[test]
    fn container_events_keep_their_wire_names() {
        let started = ContainerEvent::Started {
            image: "openzim/mwoffliner:latest".into(),
            command: "mwoffliner --mwUrl=x".into(),
        };
        let (encoded, value) = body(&EventKind::container("abc", &started));
        assert_eq!(encoded.event_type, "task-container_started");
        assert_eq!(value["image"], json!("openzim/mwoffliner:latest"));
        assert_eq!(value["command"], json!("mwoffliner --mwUrl=x"));
        let finished = ContainerEvent::Finished {
            exit_code: 3,
            stdout: "out".into(),
            stderr: "err".into(),
            log: "x.log.gz".into(),
        };
        let (encoded, value) = body(&EventKind::container("abc", &finished));
        assert_eq!(encoded.routing_key, "task.container_finished");
        assert_eq!(
            (
                &value["exit_code"],
                &value["stdout"],
                &value["stderr"],
                &value["log"]
            ),
            (&json!(3), &json!("out"), &json!("err"), &json!("x.log.gz"))
        );
        let killed = ContainerEvent::Killed { timeout_s: 60 };
        let (encoded, value) = body(&EventKind::container("abc", &killed));
        assert_eq!(encoded.event_type, "task-container_killed");
        assert_eq!(
            (&value["timeout"], &value["uuid"]),
            (&json!(60), &json!("abc"))
        );
    }

    #[test]
    fn custom_task_event() {
        let mut fields = Map::new();
        fields.insert("image".into(), json!("openzim/mwoffliner:latest"));
        fields.insert("command".into(), json!("mwoffliner --mwUrl=x"));
        // Custom fields can't impersonate another task or type.
        fields.insert("uuid".into(), json!("other"));
        fields.insert("type".into(), json!("task-succeeded"));
        let kind = EventKind::Custom {
            event_type: "task-container_started".into(),
            uuid: "abc".into(),
            fields,
        };
        let (encoded, value) = body(&kind);
        let expected = with(
            common("task-container_started"),
            json!({
                "uuid": "abc", "image": "openzim/mwoffliner:latest",
                "command": "mwoffliner --mwUrl=x",
            }),
        );
        assert_eq!(value, expected);
        assert_eq!(encoded.routing_key, "task.container_started");
        assert!(!encoded.is_final);
        assert_eq!(encoded.task_id.as_deref(), Some("abc"));
    }

    #[test]
    fn non_finite_numbers_become_null() {
        let kind = EventKind::TaskSucceeded {
            uuid: "abc".into(),
            result: "None".into(),
            runtime: f64::NAN,
        };
        let encoded = encode_event(&kind, &identity(), 1, f64::INFINITY, 0);
        let value: Value = serde_json::from_slice(&encoded.body).expect("event body is JSON");
        assert_eq!(value["runtime"], Value::Null);
        assert_eq!(value["timestamp"], Value::Null);
    }

    #[test]
    fn lamport_clock() {
        let clock = LamportClock::new();
        assert_eq!(clock.value(), 0);
        assert_eq!(clock.forward(), 1);
        assert_eq!(clock.forward(), 2);
        assert_eq!(clock.adjust(10), 11);
        assert_eq!(clock.adjust(3), 12);
        assert_eq!(clock.value(), 12);
        let full = LamportClock(AtomicU64::new(u64::MAX));
        assert_eq!(full.forward(), u64::MAX);
        assert_eq!(full.adjust(5), u64::MAX);
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_config::config())]

        #[test]
        fn adjust_moves_forward_by_a_bounded_step(ours: u64, theirs: u64) {
            let clock = LamportClock(AtomicU64::new(ours));
            let now = clock.adjust(theirs);
            proptest::prop_assert!(now > ours || ours == u64::MAX);
            proptest::prop_assert!(now - ours <= MAX_CLOCK_JUMP + 1);
            if theirs <= ours.saturating_add(MAX_CLOCK_JUMP) {
                // Celery's rule, within the bound.
                proptest::prop_assert_eq!(now, ours.max(theirs).saturating_add(1));
            }
        }
    }

    #[test]
    fn a_remote_clock_far_ahead_only_forwards_ours() {
        let clock = LamportClock::new();
        clock.adjust(100);
        assert_eq!(clock.adjust(u64::MAX), 102, "a forged 2^64-1 is ignored");
        assert_eq!(clock.adjust(102 + MAX_CLOCK_JUMP + 1), 103);
        assert_eq!(clock.adjust(103 + MAX_CLOCK_JUMP), 104 + MAX_CLOCK_JUMP);
        assert_eq!(
            clock.forward(),
            105 + MAX_CLOCK_JUMP,
            "the clock still moves"
        );
    }

    #[test]
    fn utcoffset_is_hours_west_floored() {
        assert_eq!(utcoffset_from_east_seconds(0), 0);
        assert_eq!(utcoffset_from_east_seconds(3600), -1);
        assert_eq!(utcoffset_from_east_seconds(-5 * 3600), 5);
        // India, UTC+05:30: Python's -19800 // 3600 == -6.
        assert_eq!(utcoffset_from_east_seconds(19800), -6);
        // Newfoundland, UTC-03:30: 12600 // 3600 == 3.
        assert_eq!(utcoffset_from_east_seconds(-12600), 3);
        let now = utcoffset_now();
        assert!((-15..=13).contains(&now), "{now}");
    }

    #[test]
    fn properties() {
        let props = event_properties("alice@node1");
        super::super::result::tests::assert_json_properties(&props);
        let headers = props.headers().as_ref().expect("headers are set");
        assert_eq!(
            headers.inner().get("hostname"),
            Some(&AMQPValue::LongString("alice@node1".into()))
        );
        assert!(now_timestamp() > 1_600_000_000.0);
    }
}
