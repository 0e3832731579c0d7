//! A pidbox request parsed into a [`Command`] before anything runs: the
//! method's aliases resolved in one table, the keyword arguments checked
//! as Celery's handlers would take them, the reply to send when they don't
//! fit (`TypeError`, `ValueError`, `AttributeError`, `KeyError` for an
//! unknown method, as Celery 5 replies).
//!
//! Owns parsing only: it never touches the worker.

use std::collections::HashSet;

use nix::sys::signal::Signal;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::broker::TaskQueue;
use crate::celery::control::{exception, nok};
use crate::celery::log_text;
use crate::config::QueueName;

/// One remote-control command, its arguments checked.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Command {
    Ping,
    /// `revoke` and `terminate`: the ids to remember as revoked, and the
    /// signal number to report when the running ones are to be stopped.
    Revoke {
        ids: Vec<String>,
        terminate: Option<i32>,
    },
    Shutdown,
    Stats,
    Active {
        safe: bool,
    },
    Reserved,
    Scheduled,
    Registered,
    ActiveQueues,
    Revoked,
    QueryTask {
        ids: Vec<String>,
    },
    TaskEvents {
        enable: bool,
    },
    Heartbeat,
    Clock,
    /// Mingle's `hello` from another node, with its revoked ids.
    Hello {
        from_node: String,
        revoked: Vec<String>,
    },
    AddConsumer(TaskQueue),
    CancelConsumer {
        queue: String,
    },
    Conf,
    Report,
    Election,
    /// `pool_grow` / `pool_shrink`: the pool is `CONCURRENCY`.
    PoolResize {
        method: String,
    },
    PoolRestart,
    Autoscale,
    /// `rate_limit` / `time_limit`: limits come with each task message.
    Limits {
        method: String,
    },
}

/// Celery's other names for the same commands.
const ALIASES: [(&str, &str); 6] = [
    ("dump_active", "active"),
    ("dump_reserved", "reserved"),
    ("dump_schedule", "scheduled"),
    ("dump_tasks", "registered"),
    ("dump_revoked", "revoked"),
    ("dump_conf", "conf"),
];

impl Command {
    /// The command `method` names with `arguments`, or the reply that says
    /// why not (unknown keyword arguments are ignored: Celery's handlers
    /// take `**kwargs`).
    pub(super) fn parse(method: &str, arguments: &Map<String, Value>) -> Result<Self, Value> {
        let name = ALIASES
            .iter()
            .find(|(alias, _)| *alias == method)
            .map_or(method, |(_, name)| name);
        Ok(match name {
            "ping" => Self::Ping,
            "revoke" => {
                let a: RevokeArgs = args(method, arguments)?;
                Self::revoke(a.task_id, a.terminate, a.signal.as_ref())?
            }
            "terminate" => {
                let a: TerminateArgs = args(method, arguments)?;
                Self::revoke(a.task_id, true, a.signal.as_ref())?
            }
            "shutdown" => Self::Shutdown,
            "stats" => Self::Stats,
            "active" => Self::Active {
                safe: args::<InspectArgs>(method, arguments)?.safe,
            },
            "reserved" => Self::Reserved,
            "scheduled" => Self::Scheduled,
            "registered" => Self::Registered,
            "active_queues" => Self::ActiveQueues,
            "revoked" => Self::Revoked,
            "query_task" => Self::QueryTask {
                ids: args::<QueryTaskArgs>(method, arguments)?
                    .ids
                    .map(Ids::into_vec)
                    .unwrap_or_default(),
            },
            "enable_events" => Self::TaskEvents { enable: true },
            "disable_events" => Self::TaskEvents { enable: false },
            "heartbeat" => Self::Heartbeat,
            "clock" => Self::Clock,
            "hello" => {
                let a: HelloArgs = args(method, arguments)?;
                Self::Hello {
                    from_node: a.from_node,
                    revoked: match a.revoked {
                        None => Vec::new(),
                        Some(RevokedIds::List(ids)) => ids,
                        Some(RevokedIds::Map(ids)) => ids.into_iter().map(|(id, _)| id).collect(),
                    },
                }
            }
            "add_consumer" => Self::AddConsumer(queue_for(&args(method, arguments)?).map_err(nok)?),
            "cancel_consumer" => Self::CancelConsumer {
                queue: args::<CancelConsumerArgs>(method, arguments)?.queue,
            },
            "conf" => Self::Conf,
            "report" => Self::Report,
            "election" => Self::Election,
            "pool_grow" | "pool_shrink" => Self::PoolResize {
                method: method.to_owned(),
            },
            "pool_restart" => Self::PoolRestart,
            "autoscale" => Self::Autoscale,
            "rate_limit" | "time_limit" => Self::Limits {
                method: method.to_owned(),
            },
            _ => {
                tracing::warn!(method = %log_text(method), "unknown remote-control command");
                return Err(exception("KeyError", method));
            }
        })
    }

    fn revoke(ids: Option<Ids>, terminate: bool, signal: Option<&Value>) -> Result<Self, Value> {
        Ok(Self::Revoke {
            ids: ids.map(Ids::into_vec).unwrap_or_default(),
            terminate: terminate.then(|| signum(signal)).transpose()?,
        })
    }
}

/// A command's keyword arguments; a `TypeError` reply when they don't fit,
/// as Python would raise calling the handler. Unknown ones are ignored (the
/// handlers take `**kwargs`).
fn args<T: DeserializeOwned>(method: &str, arguments: &Map<String, Value>) -> Result<T, Value> {
    serde_json::from_value(Value::Object(arguments.clone()))
        .map_err(|e| exception("TypeError", &format!("{method}(): {e}")))
}

/// One task id or a list of them (`maybe_list`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Ids {
    One(String),
    Many(Vec<String>),
}

impl Ids {
    /// The ids, duplicates dropped, in order.
    fn into_vec(self) -> Vec<String> {
        let ids = match self {
            Ids::One(id) => vec![id],
            Ids::Many(ids) => ids,
        };
        let mut seen = HashSet::new();
        ids.into_iter()
            .filter(|id| seen.insert(id.clone()))
            .collect()
    }
}

/// A flag as Python reads it (`if terminate:`): Flower sends `1`, the
/// command line `True`, others `"true"`.
fn truthy<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    Ok(match Value::deserialize(deserializer)? {
        Value::Null => false,
        Value::Bool(b) => b,
        Value::Number(n) => n.as_f64().is_some_and(|n| n != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    })
}

#[derive(Debug, Deserialize)]
struct RevokeArgs {
    #[serde(default)]
    task_id: Option<Ids>,
    #[serde(default, deserialize_with = "truthy")]
    terminate: bool,
    #[serde(default)]
    signal: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct TerminateArgs {
    #[serde(default)]
    task_id: Option<Ids>,
    #[serde(default)]
    signal: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct InspectArgs {
    #[serde(default, deserialize_with = "truthy")]
    safe: bool,
}

#[derive(Debug, Deserialize)]
struct QueryTaskArgs {
    #[serde(default)]
    ids: Option<Ids>,
}

/// Ids as a list (Celery 5.7) or as a map id → timestamp (earlier 5.x).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RevokedIds {
    List(Vec<String>),
    Map(Map<String, Value>),
}

#[derive(Debug, Deserialize)]
struct HelloArgs {
    from_node: String,
    #[serde(default)]
    revoked: Option<RevokedIds>,
}

#[derive(Debug, Deserialize)]
struct AddConsumerArgs {
    queue: String,
    #[serde(default)]
    exchange: Option<String>,
    #[serde(default)]
    exchange_type: Option<String>,
    #[serde(default)]
    routing_key: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CancelConsumerArgs {
    queue: String,
}

/// The names Python's `signal` module has beside the ones the C library
/// names alike (which `nix` parses).
const SIGNAL_ALIASES: [(&str, Signal); 3] = [
    ("IOT", Signal::SIGABRT),
    ("POLL", Signal::SIGIO),
    ("CLD", Signal::SIGCHLD),
];

/// Celery's `signals.signum()`: a number as is, an upper-case name with or
/// without `SIG`; none means `SIGTERM`. The error is the reply to send.
pub(super) fn signum(signal: Option<&Value>) -> Result<i32, Value> {
    let name = match signal {
        None | Some(Value::Null) => return Ok(15),
        Some(Value::Number(n)) => {
            return n
                .as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .filter(|n| (1..=64).contains(n))
                .ok_or_else(|| exception("ValueError", &format!("invalid signal number {n}")));
        }
        Some(Value::String(name)) => name,
        Some(other) => {
            return Err(exception(
                "TypeError",
                &format!("signal must be a name or a number, not {other}"),
            ));
        }
    };
    if name.is_empty() || name.chars().any(|c| c.is_ascii_lowercase()) {
        return Err(exception(
            "TypeError",
            "signal name must be uppercase string.",
        ));
    }
    let bare = name.strip_prefix("SIG").unwrap_or(name);
    format!("SIG{bare}")
        .parse::<Signal>()
        .ok()
        .or_else(|| {
            SIGNAL_ALIASES
                .iter()
                .find(|(alias, _)| *alias == bare)
                .map(|(_, signal)| *signal)
        })
        .map(|signal| signal as i32)
        .ok_or_else(|| {
            exception(
                "AttributeError",
                &format!("module 'signal' has no attribute 'SIG{bare}'"),
            )
        })
}

/// The queue `add_consumer` means, as Celery's `add_task_queue` builds it:
/// a Zimfarm queue name, without an exchange or with `offliner` (and no
/// other type than `topic`, no other routing key than its name), is bound
/// to the `offliner` topic exchange like the configured ones; another
/// queue gets the exchange given (default: one of its own name), `direct`
/// unless told, routing key = queue name unless told.
fn queue_for(args: &AddConsumerArgs) -> Result<TaskQueue, String> {
    let name = args.queue.trim();
    if name.is_empty() || name.len() > 255 {
        return Err("queue name must be 1 to 255 bytes".to_owned());
    }
    let zimfarm = TaskQueue::zimfarm(name);
    let fits = |given: &Option<String>, ours: &str| given.as_deref().is_none_or(|v| v == ours);
    if name.parse::<QueueName>().is_ok()
        && fits(&args.exchange, &zimfarm.exchange)
        && fits(&args.exchange_type, &zimfarm.exchange_type)
        && fits(&args.routing_key, &zimfarm.routing_key)
    {
        return Ok(zimfarm);
    }
    for (what, value) in [
        ("exchange", &args.exchange),
        ("routing_key", &args.routing_key),
    ] {
        if value.as_ref().is_some_and(|v| v.len() > 255) {
            return Err(format!(
                "{what} must be at most 255 bytes (an AMQP short string)"
            ));
        }
    }
    let exchange_type = args.exchange_type.as_deref().unwrap_or("direct");
    if !["direct", "topic", "fanout", "headers"].contains(&exchange_type) {
        return Err(format!(
            "exchange_type {exchange_type:?} is not one of direct, topic, fanout, headers"
        ));
    }
    Ok(TaskQueue {
        name: name.to_owned(),
        exchange: args.exchange.clone().unwrap_or_else(|| name.to_owned()),
        exchange_type: exchange_type.to_owned(),
        routing_key: args.routing_key.clone().unwrap_or_else(|| name.to_owned()),
    })
}
