//! The commands that change something: `revoke` / `terminate`, task
//! events on and off, mingle's `hello`, and `add_consumer` /
//! `cancel_consumer`, each applied through [`ControlledWorker`].
//!
//! Owns their replies and logs; the changes themselves are the worker's.

use serde_json::Value;

use super::{ControlledWorker, to_value};
use crate::broker::TaskQueue;
use crate::celery::control::{HelloReply, nok, ok};
use crate::celery::{log_text, repr_str, task_id};
use crate::events::EventSink;
use crate::worker::registry::REVOKES_MAX;

/// Most ids one `revoke` takes: as many as the set of revoked ids keeps.
pub(super) const MAX_REVOKE_IDS: usize = REVOKES_MAX;

/// Ids a reply or a log line names; the others are counted.
const MAX_ECHOED_IDS: usize = 10;

/// `revoke` / `terminate`, replying as Celery 5 does. Only task ids are
/// taken (no other id can match a task, see [`task_id::check`]), at most
/// [`MAX_REVOKE_IDS`] of them; the reply and the log name at most
/// [`MAX_ECHOED_IDS`] and count the rest, and say how many were refused.
pub(super) fn revoke<W: ControlledWorker>(
    worker: &W,
    ids: &[String],
    terminate: Option<i32>,
) -> Value {
    let (taken, refused): (Vec<&String>, Vec<&String>) =
        ids.iter().partition(|id| task_id::check(id).is_ok());
    let (taken, over) = taken.split_at(taken.len().min(MAX_REVOKE_IDS));
    let taken: Vec<String> = taken.iter().map(|id| (*id).clone()).collect();
    let refused_count = refused.len() + over.len();
    let found = worker.revoke(&taken, terminate);
    tracing::info!(
        given = ids.len(),
        ids = %python_set(&taken),
        ?terminate,
        found = %python_set(&found),
        "tasks revoked by remote control"
    );
    if let Some(first) = refused.first().or(over.first()) {
        tracing::warn!(
            refused = refused_count,
            first = %task_id::shown(first),
            "ignored revoke ids that are not task ids (1 to {} of A-Z a-z 0-9 _ -) or beyond \
             {MAX_REVOKE_IDS} in one request",
            task_id::MAX_TASK_ID_LEN,
        );
    }
    let refusal = match refused_count {
        0 => String::new(),
        n => format!("; {n} ignored (not task ids, or beyond {MAX_REVOKE_IDS} in one request)"),
    };
    match terminate {
        None => ok(format!(
            "tasks {} flagged as revoked{refusal}",
            python_set(&taken)
        )),
        Some(_) if found.is_empty() => ok(format!("terminate: tasks unknown{refusal}")),
        Some(_) => ok(format!("terminate: {}{refusal}", echoed(&found, ", "))),
    }
}

/// The Python repr of a set of strings: `{'a', 'b'}`, or `set()`; past
/// [`MAX_ECHOED_IDS`] items, the others counted: `{'a', ..., 'j', ...
/// (5 more)}`.
pub(super) fn python_set(ids: &[String]) -> String {
    if ids.is_empty() {
        return "set()".to_owned();
    }
    let items: Vec<String> = ids.iter().map(|id| repr_str(id)).collect();
    format!("{{{}}}", echoed(&items, ", "))
}

/// The first [`MAX_ECHOED_IDS`] of `items` joined by `sep`, then how many
/// more there were.
fn echoed(items: &[String], sep: &str) -> String {
    let shown = &items[..items.len().min(MAX_ECHOED_IDS)];
    let mut text = shown.join(sep);
    if items.len() > shown.len() {
        text.push_str(&format!("{sep}... ({} more)", items.len() - shown.len()));
    }
    text
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
    // Oldest first: the newest are kept, as many as the set keeps (which
    // takes task ids only).
    let theirs = &theirs[theirs.len().saturating_sub(REVOKES_MAX)..];
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
