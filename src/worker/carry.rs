//! The worker's carry: what it needs to carry a task on after a restart
//! (the decoded request, with everything its final event and `rpc://`
//! result need, and where its message came from), as the JSON the runner
//! stores with the task's state ([`crate::runner::TaskContext::carry`])
//! and hands back in [`crate::runner::KeptTask::carry`].
//!
//! Owns that format: versioned (`"version"`), read by every later version,
//! unknown fields ignored (a newer worker may add some; an older one reads
//! what it knows). A version newer than this worker's is refused: its
//! fields may mean something else. It must not touch the runner's own
//! state around it (`src/taskfs/record.rs` owns that).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::celery::control::DeliveryInfo;
use crate::celery::task::{Protocol, TimeLimit};
use crate::celery::{TaskRequest, task_id};

/// The format written now.
pub const CARRY_VERSION: u32 = 1;

/// Why a carry cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum CarryError {
    #[error("the worker's carry is not a version {CARRY_VERSION} carry: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error(
        "the worker's carry is version {found}, written by a newer worker than this one (which \
         reads up to version {CARRY_VERSION}); run the newer version again to carry the task on"
    )]
    TooNew { found: u32 },
    #[error("the worker's carry has a bad time {field}: {value:?}")]
    BadTime { field: &'static str, value: String },
    #[error("the worker's carry has a bad task id: {0}")]
    BadId(String),
}

/// A task, as the worker carries it across a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct Carried {
    pub request: TaskRequest,
    pub delivery: DeliveryInfo,
}

#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    version: u32,
    request: WireRequest,
    delivery: WireDelivery,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireRequest {
    id: String,
    name: String,
    #[serde(default)]
    args: Vec<Value>,
    #[serde(default)]
    kwargs: Map<String, Value>,
    #[serde(default)]
    retries: i64,
    /// RFC 3339.
    #[serde(default)]
    eta: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    expires: Option<String>,
    #[serde(default)]
    time_limit_hard: Option<f64>,
    #[serde(default)]
    time_limit_soft: Option<f64>,
    #[serde(default)]
    root_id: Option<String>,
    #[serde(default)]
    parent_id: Option<String>,
    #[serde(default)]
    argsrepr: String,
    #[serde(default)]
    kwargsrepr: String,
    #[serde(default)]
    origin: Option<String>,
    #[serde(default)]
    reply_to: Option<String>,
    #[serde(default)]
    correlation_id: Option<String>,
    /// 1 or 2.
    #[serde(default = "two")]
    protocol: u8,
}

fn two() -> u8 {
    2
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct WireDelivery {
    #[serde(default)]
    exchange: String,
    #[serde(default)]
    routing_key: String,
    #[serde(default)]
    priority: Option<u8>,
    #[serde(default)]
    redelivered: bool,
}

fn time(dt: &DateTime<Utc>) -> String {
    dt.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn parse_time(
    field: &'static str,
    value: Option<String>,
) -> Result<Option<DateTime<Utc>>, CarryError> {
    value
        .map(|v| {
            DateTime::parse_from_rfc3339(&v)
                .map(|dt| dt.with_timezone(&Utc))
                .map_err(|_| CarryError::BadTime { field, value: v })
        })
        .transpose()
}

/// The carry of a task the worker starts: its request and where its
/// message came from.
pub fn carry(request: &TaskRequest, delivery: &DeliveryInfo) -> Value {
    let wire = Wire {
        version: CARRY_VERSION,
        request: WireRequest {
            id: request.id.clone(),
            name: request.name.clone(),
            args: request.args.clone(),
            kwargs: request.kwargs.clone(),
            retries: request.retries,
            eta: request.eta.as_ref().map(time),
            expires: request.expires.as_ref().map(time),
            time_limit_hard: request.time_limit.hard,
            time_limit_soft: request.time_limit.soft,
            root_id: request.root_id.clone(),
            parent_id: request.parent_id.clone(),
            argsrepr: request.argsrepr.clone(),
            kwargsrepr: request.kwargsrepr.clone(),
            origin: request.origin.clone(),
            reply_to: request.reply_to.clone(),
            correlation_id: request.correlation_id.clone(),
            protocol: match request.protocol {
                Protocol::V1 => 1,
                Protocol::V2 => 2,
            },
        },
        delivery: WireDelivery {
            exchange: delivery.exchange.clone(),
            routing_key: delivery.routing_key.clone(),
            priority: delivery.priority,
            redelivered: delivery.redelivered,
        },
    };
    serde_json::to_value(wire).unwrap_or(Value::Null)
}

/// Reads a carry back, as [`carry`] wrote it (or an earlier version).
pub fn read(value: &Value) -> Result<Carried, CarryError> {
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let Version { version } = Version::deserialize(value)?;
    if version > CARRY_VERSION {
        return Err(CarryError::TooNew { found: version });
    }
    let wire = Wire::deserialize(value)?;
    let r = wire.request;
    task_id::check(&r.id).map_err(|e| CarryError::BadId(e.to_string()))?;
    let request = TaskRequest {
        id: r.id,
        name: r.name,
        args: r.args,
        kwargs: r.kwargs,
        retries: r.retries,
        eta: parse_time("eta", r.eta)?,
        expires: parse_time("expires", r.expires)?,
        time_limit: TimeLimit {
            hard: r.time_limit_hard,
            soft: r.time_limit_soft,
        },
        root_id: r.root_id,
        parent_id: r.parent_id,
        argsrepr: r.argsrepr,
        kwargsrepr: r.kwargsrepr,
        origin: r.origin,
        reply_to: r.reply_to,
        correlation_id: r.correlation_id,
        protocol: if r.protocol == 1 {
            Protocol::V1
        } else {
            Protocol::V2
        },
    };
    let d = wire.delivery;
    Ok(Carried {
        request,
        delivery: DeliveryInfo {
            exchange: d.exchange,
            routing_key: d.routing_key,
            priority: d.priority,
            redelivered: d.redelivered,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ID: &str = "6f1c9a0b-2d3e-4f5a-8b7c-8d9e0f1a2b3c";

    fn full() -> Carried {
        let mut kwargs = Map::new();
        kwargs.insert("flags".to_owned(), json!({"mwUrl": "https://x", "n": 1.5}));
        Carried {
            request: TaskRequest {
                id: ID.to_owned(),
                name: "offliner.mwoffliner".to_owned(),
                args: vec![json!(1), json!("two")],
                kwargs,
                retries: 3,
                eta: Some(
                    DateTime::parse_from_rfc3339("2026-12-06T07:14:03.123456789Z")
                        .expect("a time")
                        .with_timezone(&Utc),
                ),
                expires: Some(
                    DateTime::parse_from_rfc3339("2026-12-07T00:00:00+02:00")
                        .expect("a time")
                        .with_timezone(&Utc),
                ),
                time_limit: TimeLimit {
                    hard: Some(86_400.5),
                    soft: Some(3600.0),
                },
                root_id: Some("root".to_owned()),
                parent_id: Some("parent".to_owned()),
                argsrepr: "(1, 'two')".to_owned(),
                kwargsrepr: "{'flags': ...}".to_owned(),
                origin: Some("gen@dispatcher".to_owned()),
                reply_to: Some("a2b3c4d5-reply".to_owned()),
                correlation_id: Some(ID.to_owned()),
                protocol: Protocol::V1,
            },
            delivery: DeliveryInfo {
                exchange: "".to_owned(),
                routing_key: "offliner_default".to_owned(),
                priority: Some(5),
                redelivered: true,
            },
        }
    }

    #[test]
    fn a_carry_reads_back_as_it_was_written() {
        let carried = full();
        let value = carry(&carried.request, &carried.delivery);
        assert_eq!(value["version"], json!(CARRY_VERSION));
        assert_eq!(read(&value).expect("readable"), carried);
        // Through its text too, as the runner stores it.
        let text = serde_json::to_string(&value).expect("text");
        let back: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(read(&back).expect("readable"), carried);
        let plain = Carried {
            request: TaskRequest::new(ID.to_owned(), "t".to_owned(), vec![], Map::new()),
            delivery: DeliveryInfo {
                exchange: "x".to_owned(),
                routing_key: "k".to_owned(),
                priority: None,
                redelivered: false,
            },
        };
        assert_eq!(
            read(&carry(&plain.request, &plain.delivery)).expect("readable"),
            plain
        );
    }

    #[test]
    fn unknown_fields_are_ignored_and_a_newer_version_is_refused() {
        let carried = full();
        let mut value = carry(&carried.request, &carried.delivery);
        value["later"] = json!({"what": "a newer worker adds"});
        value["request"]["later"] = json!(1);
        assert_eq!(read(&value).expect("readable"), carried);
        value["version"] = json!(CARRY_VERSION + 1);
        let error = read(&value).expect_err("too new");
        assert!(matches!(error, CarryError::TooNew { found } if found == CARRY_VERSION + 1));
    }

    #[test]
    fn a_stored_version_1_carry_is_read() {
        // As version 1 writes it, kept verbatim: later versions must read it.
        let stored = json!({
            "version": 1,
            "request": {
                "id": ID, "name": "offliner.youtube", "args": [], "kwargs": {"k": "v"},
                "retries": 0, "eta": null, "expires": "2026-12-07T00:00:00Z",
                "time_limit_hard": 600.0, "time_limit_soft": null, "root_id": ID,
                "parent_id": null, "argsrepr": "()", "kwargsrepr": "{'k': 'v'}",
                "origin": null, "reply_to": "r", "correlation_id": ID, "protocol": 2
            },
            "delivery": {"exchange": "", "routing_key": "q", "priority": null, "redelivered": false}
        });
        let carried = read(&stored).expect("readable");
        assert_eq!(carried.request.name, "offliner.youtube");
        assert_eq!(carried.request.time_limit.hard, Some(600.0));
        assert_eq!(carried.request.reply_to.as_deref(), Some("r"));
        assert_eq!(carried.request.root_id.as_deref(), Some(ID));
        assert_eq!(carried.delivery.routing_key, "q");
        assert!(carried.request.expires.is_some());
    }

    #[test]
    fn a_broken_carry_says_what_is_wrong() {
        assert!(matches!(read(&json!(null)), Err(CarryError::Malformed(_))));
        assert!(matches!(
            read(&json!({"version": 1, "request": {"id": ID}})),
            Err(CarryError::Malformed(_))
        ));
        let mut value = carry(&full().request, &full().delivery);
        value["request"]["eta"] = json!("yesterday");
        assert!(matches!(
            read(&value),
            Err(CarryError::BadTime { field: "eta", .. })
        ));
        value["request"]["eta"] = json!(null);
        value["request"]["id"] = json!("../../etc");
        assert!(matches!(read(&value), Err(CarryError::BadId(_))));
    }
}
