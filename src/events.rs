//! The worker's one way out to the monitoring world: Celery events and
//! `rpc://` results, stamped (Lamport clock, timestamp, utcoffset) and queued
//! on the broker [`Outbox`] in the order they happen.
//!
//! Owns the event identity and clock. It must not talk to the broker itself
//! (the outbox's publisher does) nor decide when an event is due (the worker
//! does).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::oneshot;

use crate::broker::{EVENT_EXCHANGE, Outbox, Outgoing};
use crate::celery::{
    EventKind, Identity, LamportClock, TaskState, encode_event, encode_rpc_result,
    event_properties, now_timestamp, utcoffset_now,
};

/// Resolves once the broker confirmed the message, or errors if it was
/// dropped (only non-final events can be).
pub type Confirmed = oneshot::Receiver<()>;

/// Stamps and queues events and results.
pub struct EventSink {
    identity: Identity,
    clock: LamportClock,
    outbox: Arc<Outbox>,
    enabled: AtomicBool,
}

impl EventSink {
    pub fn new(identity: Identity, outbox: Arc<Outbox>) -> Self {
        Self {
            identity,
            clock: LamportClock::new(),
            outbox,
            enabled: AtomicBool::new(true),
        }
    }

    pub fn hostname(&self) -> &str {
        &self.identity.hostname
    }

    /// Turns task events on or off (`enable_events` / `disable_events`).
    /// Final task events and worker events are always sent: the dispatcher
    /// depends on them.
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Relaxed);
    }

    /// Whether task events are on.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// The Lamport clock every event carries; remote control merges the
    /// clocks of the requests it gets into it, as Celery does.
    pub fn clock(&self) -> &LamportClock {
        &self.clock
    }

    /// Who sends the events.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Queues one event, fire and forget.
    pub fn emit(&self, kind: &EventKind) {
        self.queue(kind, None);
    }

    /// Queues one event. The returned receiver resolves once the broker has
    /// confirmed it.
    pub fn emit_confirmed(&self, kind: &EventKind) -> Confirmed {
        let (tx, rx) = oneshot::channel();
        self.queue(kind, Some(tx));
        rx
    }

    fn queue(&self, kind: &EventKind, confirmed: Option<oneshot::Sender<()>>) {
        let is_worker_event = kind.task_id().is_none();
        if !kind.is_final() && !is_worker_event && !self.enabled.load(Ordering::Relaxed) {
            if let Some(tx) = confirmed {
                let _ = tx.send(());
            }
            return;
        }
        let clock = self.clock.forward();
        let encoded = encode_event(
            kind,
            &self.identity,
            clock,
            now_timestamp(),
            utcoffset_now(),
        );
        tracing::debug!(event = %encoded.event_type, clock, "event queued");
        self.outbox.push(Outgoing {
            exchange: EVENT_EXCHANGE.to_owned(),
            routing_key: encoded.routing_key,
            body: encoded.body,
            properties: event_properties(&self.identity.hostname),
            keep: encoded.is_final,
            confirmed,
        });
    }

    /// Queues an `rpc://` result for a client waiting on `reply_to`.
    pub fn publish_result(&self, reply_to: &str, task_id: &str, state: &TaskState) -> Confirmed {
        let (tx, rx) = oneshot::channel();
        let (body, properties) = encode_rpc_result(task_id, state, chrono::Utc::now());
        self.outbox.push(Outgoing {
            exchange: String::new(),
            routing_key: reply_to.to_owned(),
            body,
            properties,
            keep: true,
            confirmed: Some(tx),
        });
        rx
    }
}
