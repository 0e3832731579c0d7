//! The broker side: the lapin connection, the SPEC §2 topology, consuming the
//! task queues, and the outbox through which every outgoing message (events,
//! `rpc://` results) is published in order, with publisher confirms.
//!
//! Owns AMQP connections and channels. It must not run tasks or decide what
//! a message means: deliveries go to the worker as they are, and the worker
//! hands back bytes to publish.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::stream::SelectAll;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use tokio::sync::{Notify, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{BrokerUrl, Config, QueueName};

/// The exchange the dispatcher sends tasks to (SPEC §2).
pub const TASK_EXCHANGE: &str = "offliner";
/// The exchange Celery events go to (SPEC §5).
pub const EVENT_EXCHANGE: &str = "celeryev";

/// Everything that can go wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot read BROKER_CA_FILE {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot connect to the broker at {url}: {source}{hint}")]
    Connect {
        url: String,
        source: lapin::Error,
        /// What to do, when the error says it (e.g. an untrusted certificate).
        hint: &'static str,
    },
    #[error(
        "the broker at {url} did not answer within {secs} s; check the host, port and firewall"
    )]
    ConnectTimeout { url: String, secs: u64 },
    #[error("broker refused {what}: {source}")]
    Setup { what: String, source: lapin::Error },
}

/// How to reach the broker and what to declare there.
#[derive(Clone)]
pub struct Broker {
    url: BrokerUrl,
    tls: Option<String>,
    connection_name: String,
    queues: Vec<QueueName>,
}

/// The AMQP frame size asked for, unless BROKER_URL says `?frame_max=`.
const DEFAULT_FRAME_MAX: u32 = 16 * 1024;

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

impl Broker {
    /// Reads the CA file (if any) now, so a bad path fails at start-up.
    pub fn new(config: &Config) -> Result<Self, BrokerError> {
        let tls = match &config.broker_ca_file {
            None => None,
            Some(path) => {
                Some(
                    std::fs::read_to_string(path).map_err(|source| BrokerError::CaFile {
                        path: path.display().to_string(),
                        source,
                    })?,
                )
            }
        };
        Ok(Self {
            url: config.broker_url.clone(),
            tls,
            connection_name: format!("zimfarm-worker {}", config.hostname()),
            queues: config.queues.clone(),
        })
    }

    /// The broker URL with its password redacted, for log lines.
    pub fn display_url(&self) -> String {
        self.url.to_string()
    }

    /// Connects, declares the topology and opens the two channels a session
    /// needs: one consuming tasks, one publishing (in confirm mode).
    pub async fn connect(&self, prefetch: u16) -> Result<Session, BrokerError> {
        let props = ConnectionProperties::default()
            .with_connection_name(LongString::from(self.connection_name.clone()));
        let url = self.display_url();
        let mut uri = self.url.uri().clone();
        // lapin keeps two buffers of 32 frames each: with RabbitMQ's default
        // 128 KiB frames that is 8 MiB of resident memory for messages that
        // are a few hundred bytes. Larger messages just take more frames.
        uri.query.frame_max = uri.query.frame_max.or(Some(DEFAULT_FRAME_MAX));
        let connect = async {
            match &self.tls {
                None => Connection::connect_uri(uri.clone(), props).await,
                Some(pem) => {
                    let runtime = lapin::runtime::default_runtime()?;
                    let tls = OwnedTLSConfig {
                        identity: None,
                        cert_chain: Some(pem.clone()),
                    };
                    Connection::connect_uri_with_config(uri.clone(), props, tls, runtime).await
                }
            }
        };
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| BrokerError::ConnectTimeout {
                url: url.clone(),
                secs: CONNECT_TIMEOUT.as_secs(),
            })?
            .map_err(|source| {
                let hint = if source.to_string().contains("certificate") {
                    "; the broker's TLS certificate is not trusted: if it comes from a \
                     private CA, set BROKER_CA_FILE to that CA's PEM file"
                } else {
                    ""
                };
                BrokerError::Connect { url, source, hint }
            })?;

        let setup = |what: &str| {
            let what = what.to_owned();
            move |source| BrokerError::Setup { what, source }
        };
        let consume_channel = connection
            .create_channel()
            .await
            .map_err(setup("a channel"))?;
        let publish_channel = connection
            .create_channel()
            .await
            .map_err(setup("a channel"))?;
        publish_channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(setup("publisher confirms"))?;

        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for (name, what) in [
            (TASK_EXCHANGE, "exchange offliner"),
            (EVENT_EXCHANGE, "exchange celeryev"),
        ] {
            consume_channel
                .exchange_declare(
                    name.into(),
                    ExchangeKind::Topic,
                    durable,
                    FieldTable::default(),
                )
                .await
                .map_err(setup(what))?;
        }
        for queue in &self.queues {
            let name = queue.as_str();
            consume_channel
                .queue_declare(
                    name.into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(setup(&format!("queue {name}")))?;
            consume_channel
                .queue_bind(
                    name.into(),
                    TASK_EXCHANGE.into(),
                    name.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(setup(&format!("binding of queue {name}")))?;
        }
        // Global QoS: RabbitMQ applies it to the whole channel and lets it
        // change while consuming (per-consumer QoS only affects new
        // consumers), which is what holding `eta` tasks needs.
        consume_channel
            .basic_qos(prefetch, BasicQosOptions { global: true })
            .await
            .map_err(setup("prefetch settings"))?;
        let mut deliveries = SelectAll::new();
        for queue in &self.queues {
            let consumer: Consumer = consume_channel
                .basic_consume(
                    queue.as_str().into(),
                    format!("{}.{}", self.connection_name.replace(' ', "-"), queue).into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(setup(&format!("consuming queue {queue}")))?;
            deliveries.push(consumer);
        }
        Ok(Session {
            connection,
            consume_channel,
            publish_channel,
            deliveries,
        })
    }
}

/// One live connection with its channels.
pub struct Session {
    pub connection: Connection,
    pub consume_channel: Channel,
    pub publish_channel: Channel,
    /// Deliveries from every task queue, merged.
    pub deliveries: SelectAll<Consumer>,
}

impl Session {
    /// Closes the connection; unacked deliveries go back to their queues.
    pub async fn close(&self) {
        let _ = self
            .connection
            .close(200, "worker shutting down".into())
            .await;
    }
}

/// Changes a consuming channel's prefetch (one message per free slot, plus
/// one per unacked message that holds no slot).
pub async fn set_prefetch(channel: &Channel, prefetch: u16) -> Result<(), lapin::Error> {
    channel
        .basic_qos(prefetch, BasicQosOptions { global: true })
        .await
}

/// Capped exponential backoff for reconnecting.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Self { next: first, max }
    }

    /// The delay to wait now; the next one doubles, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

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

    fn take_batch(&self, max: usize) -> Vec<Outgoing> {
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

    #[test]
    fn backoff_doubles_to_cap() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(2));
        let d: Vec<_> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(d, [500, 1000, 2000, 2000]);
    }
}
