//! The outbox: every outgoing message (events, `rpc://` results) waits here,
//! in order, and one publisher sends it on whichever channel the session
//! loop currently provides, with publisher confirms.
//!
//! Owns the bounded queue (dropping the oldest droppable message when full,
//! never one marked `keep`) and the publish-then-confirm rounds. It must not
//! open connections or channels (the session loop hands them over) nor
//! build messages: callers push bytes and properties ready to send.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel};
use tokio::sync::{Notify, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// One message waiting to be published.
pub struct Outgoing {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    /// Must never be dropped (a final task event or a task result).
    pub keep: bool,
    /// Told once the broker has confirmed this message.
    pub confirmed: Option<oneshot::Sender<()>>,
}

/// The ordered, bounded queue of messages to publish. Messages wait here
/// while the broker is away; when it is full the oldest message that is not
/// `keep` is dropped (a stale heartbeat, never a final task event).
pub struct Outbox {
    state: Mutex<OutboxState>,
    notify: Notify,
    capacity: usize,
    dropped: AtomicU64,
    connected: AtomicBool,
}

struct OutboxState {
    items: VecDeque<Outgoing>,
}

impl Outbox {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(OutboxState {
                items: VecDeque::new(),
            }),
            notify: Notify::new(),
            capacity,
            dropped: AtomicU64::new(0),
            connected: AtomicBool::new(false),
        })
    }

    pub fn push(&self, item: Outgoing) {
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if state.items.len() >= self.capacity
                && let Some(pos) = state.items.iter().position(|m| !m.keep)
            {
                state.items.remove(pos);
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(
                        dropped = n,
                        "event outbox full while the broker is away: dropping the oldest \
                         non-final events"
                    );
                }
            }
            state.items.push_back(item);
        }
        self.notify.notify_one();
    }

    pub fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .items
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the publisher currently has a live channel.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub(crate) fn take_batch(&self, max: usize) -> Vec<Outgoing> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let n = state.items.len().min(max);
        state.items.drain(..n).collect()
    }

    /// Puts messages that were not confirmed back at the front, in order.
    fn put_back(&self, items: Vec<Outgoing>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for item in items.into_iter().rev() {
            state.items.push_front(item);
        }
    }

    /// Waits until the outbox is empty, or the deadline passes.
    pub async fn drained(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            if self.is_empty() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// How many messages one publish round sends before awaiting confirms.
const BATCH: usize = 256;

/// Publishes the outbox on whichever channel `channels` currently holds,
/// until `stop` is cancelled. Messages leave the outbox only once the broker
/// confirmed them; anything unconfirmed is retried, in order, on the next
/// channel.
pub async fn run_publisher(
    outbox: Arc<Outbox>,
    mut channels: watch::Receiver<Option<Channel>>,
    stop: CancellationToken,
) {
    loop {
        let channel = channels.borrow_and_update().clone();
        let Some(channel) = channel.filter(|c| c.status().connected()) else {
            outbox.connected.store(false, Ordering::Relaxed);
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = channels.changed() => if changed.is_err() { return },
            }
            continue;
        };
        outbox.connected.store(true, Ordering::Relaxed);
        let batch = outbox.take_batch(BATCH);
        if batch.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = outbox.notify.notified() => {}
                changed = channels.changed() => if changed.is_err() { return },
            }
            continue;
        }
        if let Err(unconfirmed) = publish_batch(&channel, batch).await {
            outbox.put_back(unconfirmed);
            outbox.connected.store(false, Ordering::Relaxed);
            // Wait for a new channel (the session loop reconnects).
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = channels.changed() => if changed.is_err() { return },
            }
        }
    }
}

/// Sends the batch, then awaits every confirm. On failure returns the
/// messages from the first unconfirmed one on.
async fn publish_batch(channel: &Channel, batch: Vec<Outgoing>) -> Result<(), Vec<Outgoing>> {
    let mut pending = Vec::with_capacity(batch.len());
    let mut iter = batch.into_iter();
    for item in iter.by_ref() {
        let sent = channel
            .basic_publish(
                item.exchange.as_str().into(),
                item.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &item.body,
                item.properties.clone(),
            )
            .await;
        match sent {
            Ok(confirm) => pending.push((item, confirm)),
            Err(error) => {
                tracing::debug!(%error, "publish failed; will retry after reconnecting");
                let mut rest: Vec<Outgoing> = pending.into_iter().map(|(i, _)| i).collect();
                rest.push(item);
                rest.extend(iter);
                return Err(rest);
            }
        }
    }
    let mut pending = pending.into_iter();
    while let Some((item, confirm)) = pending.next() {
        match confirm.await {
            Ok(c) if c.is_ack() || !c.is_nack() => {
                if let Some(tx) = item.confirmed {
                    let _ = tx.send(());
                }
            }
            outcome => {
                if let Err(error) = &outcome {
                    tracing::debug!(%error, "publish not confirmed; will retry");
                } else {
                    tracing::warn!("broker refused (nack) a published message; will retry");
                }
                let mut rest = vec![item];
                rest.extend(pending.map(|(i, _)| i));
                return Err(rest);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(key: &str, keep: bool) -> Outgoing {
        Outgoing {
            exchange: String::new(),
            routing_key: key.to_owned(),
            body: Vec::new(),
            properties: BasicProperties::default(),
            keep,
            confirmed: None,
        }
    }

    #[test]
    fn full_outbox_drops_oldest_droppable_never_kept() {
        let outbox = Outbox::new(3);
        outbox.push(msg("final-1", true));
        outbox.push(msg("hb-1", false));
        outbox.push(msg("hb-2", false));
        outbox.push(msg("final-2", true));
        outbox.push(msg("final-3", true));
        outbox.push(msg("final-4", true));
        let keys: Vec<_> = outbox
            .take_batch(10)
            .into_iter()
            .map(|m| m.routing_key)
            .collect();
        assert_eq!(keys, ["final-1", "final-2", "final-3", "final-4"]);
    }

    #[test]
    fn put_back_keeps_order() {
        let outbox = Outbox::new(10);
        for k in ["a", "b", "c", "d"] {
            outbox.push(msg(k, false));
        }
        let first = outbox.take_batch(2);
        outbox.put_back(first);
        let keys: Vec<_> = outbox
            .take_batch(10)
            .into_iter()
            .map(|m| m.routing_key)
            .collect();
        assert_eq!(keys, ["a", "b", "c", "d"]);
    }
}
