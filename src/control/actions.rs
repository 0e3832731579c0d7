//! The commands that change something: `revoke` / `terminate`, task
//! events on and off, mingle's `hello`, and `add_consumer` /
//! `cancel_consumer`, each applied through [`ControlledWorker`].
//!
//! Owns their replies and logs; the changes themselves are the worker's.

use serde_json::Value;

use super::{ControlledWorker, to_value};
use crate::broker::TaskQueue;
use crate::celery::control::{HelloReply, nok, ok};
use crate::celery::{log_text, repr_str};
use crate::events::EventSink;

/// `revoke` / `terminate`, replying as Celery 5 does.
pub(super) fn revoke<W: ControlledWorker>(
    worker: &W,
    ids: &[String],
    terminate: Option<i32>,
) -> Value {
    let found = worker.revoke(ids, terminate);
    tracing::info!(ids = ?ids, ?terminate, found = ?found, "tasks revoked by remote control");
    match terminate {
        None => ok(format!("tasks {} flagged as revoked", python_set(ids))),
        Some(_) if found.is_empty() => ok("terminate: tasks unknown"),
        Some(_) => ok(format!("terminate: {}", found.join(", "))),
    }
}

/// The Python repr of a set of strings: `{'a', 'b'}`, or `set()`.
pub(super) fn python_set(ids: &[String]) -> String {
    if ids.is_empty() {
        return "set()".to_owned();
    }
    let items: Vec<String> = ids.iter().map(|id| repr_str(id)).collect();
    format!("{{{}}}", items.join(", "))
}

pub(super) fn set_task_events(events: &EventSink, enable: bool) -> Value {
    let (verb, was) = if enable {
        ("enabled", events.is_enabled())
    } else {
        ("disabled", !events.is_enabled())
    };
    if was {
        return ok(format!("task events already {verb}"));
    }
    events.set_enabled(enable);
    tracing::info!("task events {verb} by remote control");
    ok(format!("task events {verb}"))
}

/// Mingle's `hello`: merge the sender's revoked ids, answer with ours and
/// our clock; nothing to say to ourselves.
pub(super) fn hello<W: ControlledWorker>(worker: &W, from_node: &str, theirs: &[String]) -> Value {
    if from_node == worker.events().hostname() {
        return Value::Null;
    }
    tracing::info!(from = %log_text(from_node), "sync with another node");
    if !theirs.is_empty() {
        worker.merge_revoked(theirs);
    }
    to_value(&HelloReply {
        revoked: worker.revoked(),
        clock: worker.events().clock().forward(),
    })
}

pub(super) async fn add_consumer<W: ControlledWorker>(worker: &W, queue: TaskQueue) -> Value {
    let name = queue.name.clone();
    match worker.add_queue(queue).await {
        Ok(added) => {
            if added {
                tracing::info!(queue = %log_text(&name), "started consuming a queue, as remote control asked");
            }
            ok(format!("add consumer {name}"))
        }
        Err(error) => {
            tracing::warn!(queue = %log_text(&name), %error, "add_consumer failed");
            nok(format!("cannot consume from {name}: {error}"))
        }
    }
}

pub(super) async fn cancel_consumer<W: ControlledWorker>(worker: &W, queue: &str) -> Value {
    match worker.cancel_queue(queue).await {
        Ok(cancelled) => {
            if cancelled {
                tracing::info!(queue = %log_text(queue), "stopped consuming a queue, as remote control asked");
            }
            ok(format!("no longer consuming from {queue}"))
        }
        Err(error) => {
            tracing::warn!(queue = %log_text(queue), %error, "cancel_consumer failed");
            nok(format!("cannot stop consuming from {queue}: {error}"))
        }
    }
}
