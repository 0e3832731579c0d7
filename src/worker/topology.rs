//! The task queues to consume (QUEUES, then remote control's
//! `add_consumer` / `cancel_consumer`) and the live session consuming
//! them, behind one lock with named methods.
//!
//! Owns the list and which session is live; declaring and consuming on the
//! broker is the caller's business, done after the lock goes: no method
//! awaits, so the lock is never held across an await, and it is never held
//! with the registry's.

use std::sync::{Arc, Mutex, MutexGuard};

use lapin::{Channel, Connection, Consumer};
use tokio::sync::mpsc;

use crate::broker::TaskQueue;

/// What remote control needs of the current session to change the queues
/// consumed.
#[derive(Clone)]
pub(super) struct LiveSession {
    pub connection: Arc<Connection>,
    pub consume_channel: Channel,
    /// New consumers, merged into the session's deliveries.
    pub consumers: mpsc::UnboundedSender<Consumer>,
}

struct Queues {
    wanted: Vec<TaskQueue>,
    live: Option<LiveSession>,
}

/// The queues consumed and the session consuming them.
pub(super) struct Topology {
    queues: Mutex<Queues>,
}

/// What a live session must change to consume the queues wanted now.
pub(super) struct Drift {
    /// Wanted but not consumed: to consume.
    pub missing: Vec<TaskQueue>,
    /// Consumed but no longer wanted: to cancel.
    pub extra: Vec<TaskQueue>,
}

impl Topology {
    pub fn new(queues: Vec<TaskQueue>) -> Self {
        Self {
            queues: Mutex::new(Queues {
                wanted: queues,
                live: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The queues to consume now.
    pub fn queues(&self) -> Vec<TaskQueue> {
        self.lock().wanted.clone()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().wanted.is_empty()
    }

    /// Makes `live` the session remote control acts on; returns how its
    /// consumers (of the queues `consumed` when it connected) differ from
    /// the queues wanted now.
    pub fn go_live(&self, live: LiveSession, consumed: &[TaskQueue]) -> Drift {
        let mut queues = self.lock();
        queues.live = Some(live);
        Drift {
            missing: (queues.wanted.iter())
                .filter(|q| !consumed.contains(q))
                .cloned()
                .collect(),
            extra: (consumed.iter())
                .filter(|q| !queues.wanted.contains(q))
                .cloned()
                .collect(),
        }
    }

    /// The session is over.
    pub fn go_offline(&self) {
        self.lock().live = None;
    }

    /// The live session, if any.
    pub fn live(&self) -> Option<LiveSession> {
        self.lock().live.clone()
    }

    /// Adds `queue` to the wanted ones (first: a session that starts
    /// meanwhile consumes it). `None` when it was wanted already; else the
    /// live session to consume it on, if any.
    pub fn add(&self, queue: &TaskQueue) -> Option<Option<LiveSession>> {
        let mut queues = self.lock();
        if queues.wanted.iter().any(|q| q.name == queue.name) {
            return None;
        }
        queues.wanted.push(queue.clone());
        Some(queues.live.clone())
    }

    /// Removes the queue called `name` from the wanted ones. `None` when it
    /// was not wanted; else the live session to stop consuming it on, if
    /// any.
    pub fn remove(&self, name: &str) -> Option<Option<LiveSession>> {
        let mut queues = self.lock();
        let before = queues.wanted.len();
        queues.wanted.retain(|q| q.name != name);
        if queues.wanted.len() == before {
            return None;
        }
        Some(queues.live.clone())
    }
}
