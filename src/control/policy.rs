//! Which remote-control commands may act on this node (`CONTROL_POLICY`,
//! SPEC §6).
//!
//! Anyone who can publish to `celery.pidbox` reaches every node. On a
//! broker shared by volunteer accounts, Celery's own rules let one account
//! stop every node (`shutdown`), idle them (`cancel_consumer`) or make them
//! take every task (`add_consumer` on `offliner` with routing key `#`, a
//! durable binding that outlives the request). The default policy,
//! [`ControlPolicy::Node`], lets those three act only when the request
//! names this node in its `destination` (as Flower's buttons and
//! `celery control -d` do), and `add_consumer` only for a Zimfarm queue
//! name bound to `offliner` with routing key = that name.
//! [`ControlPolicy::Celery`] keeps Celery's rules, for a private broker.
//! Every other command (`revoke` included: the dispatcher broadcasts it)
//! runs as Celery runs it.
//!
//! Owns that decision and the refusal's reply text; it must not touch the
//! worker nor parse requests (`command` does).

use std::fmt;
use std::str::FromStr;

use super::command::Command;
use crate::broker::TaskQueue;
use crate::config::QueueName;

/// How far remote control is trusted (`CONTROL_POLICY`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ControlPolicy {
    /// `shutdown`, `add_consumer` and `cancel_consumer` only when addressed
    /// to this node by name; `add_consumer` only for Zimfarm queues.
    #[default]
    Node,
    /// Celery's rules: a broadcast reaches every node, `add_consumer` takes
    /// any exchange and routing key.
    Celery,
}

impl ControlPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlPolicy::Node => "node",
            ControlPolicy::Celery => "celery",
        }
    }

    /// Why `command` may not act here, or `None` when it may. `addressed`:
    /// the request's `destination` lists this node by name (a pattern or
    /// no destination at all is not addressing).
    pub(super) fn refusal(self, command: &Command, addressed: bool) -> Option<String> {
        if self == ControlPolicy::Celery {
            return None;
        }
        let method = match command {
            Command::Shutdown => "shutdown",
            Command::AddConsumer(_) => "add_consumer",
            Command::CancelConsumer { .. } => "cancel_consumer",
            _ => return None,
        };
        if !addressed {
            return Some(format!(
                "{method} refused: it must name this node in its destination \
                 (e.g. celery control {method} -d <node>); broadcasts and patterns \
                 are refused on a shared broker (CONTROL_POLICY=node)"
            ));
        }
        match command {
            Command::AddConsumer(queue) if !is_zimfarm_queue(queue) => Some(format!(
                "add_consumer refused: only the queues default, small, medium, large and \
                 debug, bound to exchange offliner with routing key = queue name, may be \
                 added (CONTROL_POLICY=node); got queue {:?} on exchange {:?} ({}) with \
                 routing key {:?}",
                queue.name, queue.exchange, queue.exchange_type, queue.routing_key
            )),
            _ => None,
        }
    }
}

/// A queue QUEUES accepts, bound as SPEC §2 binds it.
fn is_zimfarm_queue(queue: &TaskQueue) -> bool {
    queue.name.parse::<QueueName>().is_ok() && *queue == TaskQueue::zimfarm(&queue.name)
}

impl fmt::Display for ControlPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ControlPolicy {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "node" => Ok(ControlPolicy::Node),
            "celery" => Ok(ControlPolicy::Celery),
            other => Err(format!(
                "is {other:?}; use node (shutdown, add_consumer and cancel_consumer only \
                 when addressed to this node) or celery (Celery's rules, for a private broker)"
            )),
        }
    }
}
