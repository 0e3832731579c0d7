//! Remote control (SPEC §6): the pidbox commands that `celery inspect`,
//! `celery control`, `celery status` and Flower send, turned into worker
//! actions, and their replies in the shapes Celery 5 gives.
//!
//! Laid out as Celery's `worker/pidbox.py` beside `worker/control.py`:
//! - `pidbox`: the node's pidbox queue per broker session (one tokio task,
//!   apart from the task consumer: a slow reply never delays a task);
//! - `command`: a request parsed into a `command::Command` first;
//! - `inspect` and `actions`: the commands, by group, applied through
//!   [`ControlledWorker`], the worker as remote control sees it.
//!
//! This file holds that facade, [`dispatch`] (parse, then apply) and the
//! commands answered in one line (`ping`, `shutdown`, `revoked`, `clock`,
//! `heartbeat`, and the refusals of pool, autoscale and limit changes).
//!
//! It must not block the task consumer nor touch tasks itself: it asks the
//! worker through [`ControlledWorker`]. Wire shapes live in
//! [`crate::celery::control`]; the words for the tasks held here
//! ([`TaskPhase`], [`TaskSnapshot`]) and the revoke limits are the worker
//! registry's ([`crate::worker::registry`], a leaf that imports nothing of
//! control), as Celery's `control.py` reads `worker/state.py`.
//!
//! A request runs when its `destination` is null or names this node; a
//! reply `{"<node>": reply}` goes to its `reply_to`. Under the default
//! [`ControlPolicy`] (`policy`), `shutdown`, `add_consumer` and
//! `cancel_consumer` run only when the destination names this node, and
//! `add_consumer` only for a Zimfarm queue; others get `{"error": ...}`. A malformed request is
//! logged and ignored; an unknown command gets Celery's
//! `{"error": "KeyError('<method>')"}`.

mod actions;
mod command;
mod inspect;
mod pidbox;
mod policy;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::broker::{BrokerError, TaskQueue};
use crate::celery::control::{exception, nok, ok};
use crate::celery::log_text;
use crate::config::Config;
use crate::events::EventSink;
use crate::worker::registry::{TaskPhase, TaskSnapshot};
use command::Command;
pub use pidbox::{ControlSession, serve};
pub use policy::ControlPolicy;

/// Figures of the worker that `inspect stats` reports.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerFacts {
    pub pid: u32,
    pub uptime: Duration,
    /// The prefetch count in force now.
    pub prefetch_count: u16,
    /// Tasks started since the worker started, by task name.
    pub total: BTreeMap<String, u64>,
    /// The heartbeat negotiated with the broker (seconds), when connected.
    pub heartbeat: Option<u16>,
}

/// The worker as remote control sees it: what a command may read of it or
/// ask of it (implemented by [`crate::worker::Worker`]). Named for what it
/// is rather than Celery's `Panel`, which in Celery is the table of
/// commands, not the worker they act on.
pub trait ControlledWorker: Send + Sync + 'static {
    fn config(&self) -> &Config;
    /// The event sink: identity, Lamport clock, task events on/off.
    fn events(&self) -> &EventSink;
    fn facts(&self) -> WorkerFacts;
    /// Every task held or running here.
    fn tasks(&self) -> Vec<TaskSnapshot>;
    /// Whether task `id` ended here (the on-disk record of ended tasks).
    fn ended(&self, id: &str) -> bool;
    /// Remembers `ids` as revoked (a task that arrives later never runs)
    /// and stops those held here: a task not started yet never runs; a
    /// running one is stopped (its containers killed) only with
    /// `terminate` (the signal number to report). Returns the ids of the
    /// tasks found here, as Celery's `terminate: ...` reply lists them.
    fn revoke(&self, ids: &[String], terminate: Option<i32>) -> Vec<String>;
    /// The revoked ids remembered, oldest first.
    fn revoked(&self) -> Vec<String>;
    /// Adds ids revoked elsewhere (mingle's `hello`).
    fn merge_revoked(&self, ids: &[String]);
    /// The task queues this node consumes: the operator's view, listed
    /// even while a node whose every slot is busy has paused its consumers
    /// (it consumes them again when a slot frees).
    fn queues(&self) -> Vec<TaskQueue>;
    /// Starts consuming a queue (declared first); `Ok(false)` when it was
    /// consumed already.
    fn add_queue(&self, queue: TaskQueue)
    -> impl Future<Output = Result<bool, BrokerError>> + Send;
    /// Stops consuming a queue; `Ok(false)` when it was not consumed.
    fn cancel_queue(&self, name: &str) -> impl Future<Output = Result<bool, BrokerError>> + Send;
    /// Sends a `worker-heartbeat` now.
    fn heartbeat(&self);
    /// Shuts the worker down as SIGTERM does.
    fn shutdown(&self);
    /// Another worker took this node's pidbox queue: stop with
    /// [`crate::worker::WorkerError::NodeInUse`].
    fn node_in_use(&self);
}

/// What to do once a command's reply is out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Nothing,
    /// `shutdown`: the reply goes first, then the worker stops.
    Shutdown,
}

/// Runs one command; returns its reply (Celery's shape) and what to do
/// once the reply is out. `addressed`: the request's destination names
/// this node (see [`ControlPolicy`]).
pub async fn dispatch<W: ControlledWorker>(
    worker: &W,
    method: &str,
    arguments: &Map<String, Value>,
    addressed: bool,
) -> (Value, After) {
    let command = match Command::parse(method, arguments) {
        Ok(command) => command,
        Err(reply) => return (reply, After::Nothing),
    };
    let policy = worker.config().worker.control_policy;
    if let Some(refusal) = policy.refusal(&command, addressed) {
        tracing::warn!(
            method = %log_text(method),
            addressed,
            %policy,
            reason = %refusal,
            "remote-control request refused"
        );
        return (nok(refusal), After::Nothing);
    }
    apply(worker, command).await
}

/// Applies a parsed command to the worker.
async fn apply<W: ControlledWorker>(worker: &W, command: Command) -> (Value, After) {
    let reply = match command {
        Command::Ping => ok("pong"),
        Command::Revoke { ids, terminate } => actions::revoke(worker, &ids, terminate),
        Command::Shutdown => {
            tracing::warn!("shutdown requested by remote control");
            return (ok("shutting down"), After::Shutdown);
        }
        Command::Stats => to_value(&inspect::stats(worker)),
        Command::Active { safe } => to_value(&inspect::requests(worker, TaskPhase::Active, safe)),
        Command::Reserved => to_value(&inspect::requests(worker, TaskPhase::Reserved, false)),
        Command::Scheduled => to_value(&inspect::scheduled(worker)),
        Command::Registered => json!(inspect::registered()),
        Command::ActiveQueues => to_value(&inspect::queue_infos(&worker.queues())),
        Command::Revoked => json!(worker.revoked()),
        Command::QueryTask { ids } => inspect::query_task(worker, &ids),
        Command::TaskEvents { enable } => actions::set_task_events(worker.events(), enable),
        Command::Heartbeat => {
            worker.heartbeat();
            Value::Null
        }
        Command::Clock => json!({"clock": worker.events().clock().value()}),
        Command::Hello { from_node, revoked } => actions::hello(worker, &from_node, &revoked),
        Command::AddConsumer(queue) => actions::add_consumer(worker, queue).await,
        Command::CancelConsumer { queue } => actions::cancel_consumer(worker, &queue).await,
        Command::Conf => to_value(&inspect::conf(worker)),
        Command::Report => ok(inspect::report(worker)),
        // Gossip is off: nothing to elect, as Celery without gossip.
        Command::Election => Value::Null,
        Command::PoolResize { method } => nok(format!(
            "{method} is not supported: the pool size is CONCURRENCY ({})",
            worker.config().worker.concurrency
        )),
        Command::PoolRestart => exception("ValueError", "Pool restarts not enabled"),
        Command::Autoscale => exception("ValueError", "Autoscale not enabled"),
        Command::Limits { method } => nok(format!(
            "{method} is not supported: limits come with each task message"
        )),
    };
    (reply, After::Nothing)
}

pub(super) fn to_value<T: Serialize>(value: &T) -> Value {
    // The reply types are plain structs of strings, numbers, lists and maps.
    serde_json::to_value(value).unwrap_or(Value::Null)
}
