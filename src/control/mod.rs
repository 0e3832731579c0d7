//! Remote control (SPEC §6): the pidbox commands that `celery inspect`,
//! `celery control`, `celery status` and Flower send, turned into worker
//! actions, and their replies in the shapes Celery 5 gives.
//!
//! Laid out as Celery's `worker/pidbox.py` beside `worker/control.py`:
//! - `pidbox`: the node's pidbox queue per broker session (one tokio task,
//!   apart from the task consumer: a slow reply never delays a task);
//! - `command`: a request parsed into a `command::Command` first;
//! - `inspect` and `actions`: the commands, by group, applied through
//!   [`Panel`], the worker's facade;
//! - `revoked`: [`RevokedSet`], Celery's bounded memory of revoked ids.
//!
//! It must not block the task consumer nor touch tasks itself: it asks the
//! worker through [`Panel`]. Wire shapes live in [`crate::celery::control`].
//!
//! A request runs when its `destination` is null or names this node; a
//! reply `{"<node>": reply}` goes to its `reply_to`. A malformed request is
//! logged and ignored; an unknown command gets Celery's
//! `{"error": "KeyError('<method>')"}`.

mod actions;
mod command;
mod inspect;
mod pidbox;
mod revoked;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::broker::{BrokerError, TaskQueue};
use crate::celery::TaskRequest;
use crate::celery::control::{DeliveryInfo, exception, nok, ok};
use crate::config::Config;
use crate::events::EventSink;
use command::Command;
pub use pidbox::{ControlSession, serve};
pub use revoked::{REVOKE_EXPIRES, REVOKES_MAX, RevokedSet};

/// Where a task held here is in its life, in Celery's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskPhase {
    /// Held until its `eta` (`inspect scheduled`).
    Scheduled,
    /// Waiting for a free slot (`inspect reserved`).
    Reserved,
    /// Running (`inspect active`).
    Active,
    /// Ended; its message is acked once the broker confirmed its final
    /// event. Listed nowhere, as in Celery.
    Ending,
}

/// One task held or running here, as remote control sees it.
#[derive(Debug, Clone)]
pub struct TaskSnapshot {
    pub request: Arc<TaskRequest>,
    pub phase: TaskPhase,
    /// Epoch seconds when it started running.
    pub time_start: Option<f64>,
    pub delivery: DeliveryInfo,
}

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

/// What remote control may ask of the worker (implemented by
/// [`crate::worker::Worker`]).
pub trait Panel: Send + Sync + 'static {
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
    /// The task queues consumed now.
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
/// once the reply is out.
pub async fn dispatch<P: Panel>(
    panel: &P,
    method: &str,
    arguments: &Map<String, Value>,
) -> (Value, After) {
    match Command::parse(method, arguments) {
        Ok(command) => apply(panel, command).await,
        Err(reply) => (reply, After::Nothing),
    }
}

/// Applies a parsed command to the worker.
async fn apply<P: Panel>(panel: &P, command: Command) -> (Value, After) {
    let reply = match command {
        Command::Ping => ok("pong"),
        Command::Revoke { ids, terminate } => actions::revoke(panel, &ids, terminate),
        Command::Shutdown => {
            tracing::warn!("shutdown requested by remote control");
            return (ok("shutting down"), After::Shutdown);
        }
        Command::Stats => to_value(&inspect::stats(panel)),
        Command::Active { safe } => to_value(&inspect::requests(panel, TaskPhase::Active, safe)),
        Command::Reserved => to_value(&inspect::requests(panel, TaskPhase::Reserved, false)),
        Command::Scheduled => to_value(&inspect::scheduled(panel)),
        Command::Registered => json!(inspect::registered()),
        Command::ActiveQueues => to_value(&inspect::queue_infos(&panel.queues())),
        Command::Revoked => json!(panel.revoked()),
        Command::QueryTask { ids } => inspect::query_task(panel, &ids),
        Command::TaskEvents { enable } => actions::set_task_events(panel.events(), enable),
        Command::Heartbeat => {
            panel.heartbeat();
            Value::Null
        }
        Command::Clock => json!({"clock": panel.events().clock().value()}),
        Command::Hello { from_node, revoked } => actions::hello(panel, &from_node, &revoked),
        Command::AddConsumer(queue) => actions::add_consumer(panel, queue).await,
        Command::CancelConsumer { queue } => actions::cancel_consumer(panel, &queue).await,
        Command::Conf => to_value(&inspect::conf(panel)),
        Command::Report => ok(inspect::report(panel)),
        // Gossip is off: nothing to elect, as Celery without gossip.
        Command::Election => Value::Null,
        Command::PoolResize { method } => nok(format!(
            "{method} is not supported: the pool size is CONCURRENCY ({})",
            panel.config().worker.concurrency
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
