//! The task queues to consume (QUEUES, then remote control's
//! `add_consumer` / `cancel_consumer`), the live session consuming them,
//! and whether it consumes them now or is paused (every slot busy: a full
//! node takes nothing), behind one lock with named methods.
//!
//! The queues *wanted* are the operator's view (`inspect active_queues`
//! lists them, paused or not); a paused session has no consumer on them
//! and consumes them all again when a slot frees.
//!
//! Owns the list, which session is live and whether it consumes; declaring,
//! consuming and cancelling on the broker is the caller's business, done
//! after the lock goes: no method awaits, so the lock is never held across
//! an await, and it is never held with the registry's. A change of the
//! consumers on the broker (pause, resume, add, cancel) is made whole in
//! its turn ([`Topology::turn`], an async lock taken before this one,
//! never after it), so two of them never interleave.

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
    /// New consumers, merged into the session's deliveries, each with the
    /// [`Topology::generation`] it was made in.
    pub consumers: mpsc::UnboundedSender<(Consumer, u64)>,
    /// Whether the session consumes the queues wanted (false: paused, every
    /// slot busy), when this copy was taken.
    pub consuming: bool,
}

struct Queues {
    wanted: Vec<TaskQueue>,
    live: Option<LiveSession>,
    /// Bumped before every task consumer cancelled on purpose (a pause,
    /// `cancel_consumer`, a queue no longer wanted when a session goes
    /// live): a consumer made before the last bump whose stream ends was
    /// cancelled on purpose; one made since, by the broker.
    generation: u64,
}

/// The queues consumed and the session consuming them.
pub(super) struct Topology {
    queues: Mutex<Queues>,
    /// Held through one change of the consumers on the broker.
    turn: tokio::sync::Mutex<()>,
}

/// What a live session must change to consume the queues wanted now.
pub(super) struct Drift {
    /// Wanted but not declared: to declare, and consume unless paused.
    pub missing: Vec<TaskQueue>,
    /// Declared (and consumed unless paused) but no longer wanted: to
    /// cancel.
    pub extra: Vec<TaskQueue>,
    /// The generation the session's first consumers were made in (before
    /// the bump for `extra`, if any).
    pub made_in: u64,
}

impl Topology {
    pub fn new(queues: Vec<TaskQueue>) -> Self {
        Self {
            queues: Mutex::new(Queues {
                wanted: queues,
                live: None,
                generation: 0,
            }),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    /// Waits for the turn to change the consumers on the broker; the
    /// change is over when the guard goes.
    pub async fn turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.turn.lock().await
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

    /// Makes `live` the session remote control acts on; returns how the
    /// queues it declared when it connected (`declared`, consumed too
    /// unless it started paused: see [`LiveSession::consuming`]) differ
    /// from the queues wanted now.
    pub fn go_live(&self, live: LiveSession, declared: &[TaskQueue]) -> Drift {
        let mut queues = self.lock();
        let consuming = live.consuming;
        queues.live = Some(live);
        let made_in = queues.generation;
        let missing = (queues.wanted.iter())
            .filter(|q| !declared.contains(q))
            .cloned()
            .collect();
        let extra: Vec<TaskQueue> = (declared.iter())
            .filter(|q| !queues.wanted.contains(q))
            .cloned()
            .collect();
        if consuming && !extra.is_empty() {
            queues.generation += 1;
        }
        Drift {
            missing,
            extra,
            made_in,
        }
    }

    /// The generation a consumer made now is made in (see [`Queues`]).
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// The session is over.
    pub fn go_offline(&self) {
        self.lock().live = None;
    }

    /// Pauses the live session, if it consumes: returns it and the names of
    /// the queues to cancel the consumers of. Paused, and the generation
    /// bumped, before they are cancelled, so that their streams' end reads
    /// as a pause.
    pub fn pause(&self) -> Option<(LiveSession, Vec<String>)> {
        let mut queues = self.lock();
        let names = queues.wanted.iter().map(|q| q.name.clone()).collect();
        let live = queues.live.as_mut().filter(|live| live.consuming)?;
        live.consuming = false;
        let live = live.clone();
        queues.generation += 1;
        Some((live, names))
    }

    /// The live session, if paused, and the names of the queues to consume
    /// again; [`Topology::resumed`] once their consumers are sent.
    pub fn to_resume(&self) -> Option<(LiveSession, Vec<String>)> {
        let queues = self.lock();
        let live = queues.live.as_ref().filter(|live| !live.consuming)?;
        let names = queues.wanted.iter().map(|q| q.name.clone()).collect();
        Some((live.clone(), names))
    }

    /// The live session consumes again (its new consumers are sent).
    pub fn resumed(&self) {
        if let Some(live) = self.lock().live.as_mut() {
            live.consuming = true;
        }
    }

    /// The live session, if any.
    pub fn live(&self) -> Option<LiveSession> {
        self.lock().live.clone()
    }

    /// Adds `queue` to the wanted ones (first: a session that starts
    /// meanwhile consumes it). `None` when it was wanted already; else the
    /// live session to declare it on, if any, and to consume it on unless
    /// it is paused (a resume consumes it).
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
    /// any (nothing to cancel while it is paused).
    pub fn remove(&self, name: &str) -> Option<Option<LiveSession>> {
        let mut queues = self.lock();
        let before = queues.wanted.len();
        queues.wanted.retain(|q| q.name != name);
        if queues.wanted.len() == before {
            return None;
        }
        queues.generation += 1;
        Some(queues.live.clone())
    }
}
