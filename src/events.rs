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

    /// Queues a task's final event, then its `rpc://` result when the
    /// request named a `reply_to`. The returned receiver resolves once the
    /// broker has confirmed the last of them: the outbox publishes in
    /// order, so the event is confirmed by then too.
    pub fn emit_final(
        &self,
        event: &EventKind,
        reply_to: Option<&str>,
        task_id: &str,
        state: &TaskState,
    ) -> Confirmed {
        let confirmed = self.emit_confirmed(event);
        match reply_to {
            Some(to) => self.publish_result(to, task_id, state),
            None => confirmed,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sink() -> (EventSink, Arc<Outbox>) {
        let outbox = Outbox::new(10);
        let identity = Identity {
            hostname: "alice@node1".into(),
            pid: 42,
            sw_ident: "zimfarm-worker".into(),
            sw_ver: "0.1.0".into(),
            sw_sys: "Linux".into(),
        };
        (EventSink::new(identity, outbox.clone()), outbox)
    }

    fn revoked(id: &str) -> EventKind {
        EventKind::TaskRevoked {
            uuid: id.into(),
            terminated: false,
            signum: None,
            expired: false,
        }
    }

    #[test]
    fn a_final_event_goes_before_its_result_and_is_confirmed_with_it() {
        let (sink, outbox) = sink();
        let state = TaskState::Revoked {
            reason: "revoked".into(),
        };
        let mut confirmed = sink.emit_final(&revoked("t1"), Some("client-q"), "t1", &state);
        let mut items = outbox.take_batch(10).into_iter();
        let (event, result) = (items.next().unwrap(), items.next().unwrap());
        assert!(items.next().is_none());
        assert_eq!(event.exchange, EVENT_EXCHANGE);
        assert_eq!(
            (result.exchange.as_str(), result.routing_key.as_str()),
            ("", "client-q")
        );
        assert!(event.keep && result.keep, "neither may be dropped");
        // The broker confirms in order: the result's confirm covers both.
        // (nobody waits on the event's own confirm)
        let _ = event.confirmed.unwrap().send(());
        assert!(confirmed.try_recv().is_err(), "resolved before the result");
        result.confirmed.unwrap().send(()).unwrap();
        assert_eq!(confirmed.try_recv(), Ok(()));
    }

    #[test]
    fn without_a_reply_to_only_the_event_goes() {
        let (sink, outbox) = sink();
        let state = TaskState::Revoked {
            reason: "revoked".into(),
        };
        let mut confirmed = sink.emit_final(&revoked("t2"), None, "t2", &state);
        let items = outbox.take_batch(10);
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].exchange, EVENT_EXCHANGE);
        let item = items.into_iter().next().unwrap();
        item.confirmed.unwrap().send(()).unwrap();
        assert_eq!(confirmed.try_recv(), Ok(()));
    }
}
