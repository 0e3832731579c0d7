//! The broker side: the lapin connection, the SPEC §2 topology, consuming the
//! task queues, and the outbox through which every outgoing message (events,
//! `rpc://` results) is published in order, with publisher confirms.
//!
//! Owns AMQP connections and channels. It must not run tasks or decide what
//! a message means: deliveries go to the worker as they are, and the worker
//! hands back bytes to publish.
//!
//! Remote control (SPEC §6) has its own channel per session: the node's
//! pidbox queue `<node>.celery.pidbox` (exclusive, so a second worker with
//! the same node name is refused with [`BrokerError::NodeInUse`] before it
//! consumes any task), consumed without acks as kombu's pidbox does, and the
//! replies published on that same channel.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::stream::SelectAll;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use tokio::sync::{Notify, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{BrokerUrl, Config, QueueName};

/// The exchange the dispatcher sends tasks to (SPEC §2).
pub const TASK_EXCHANGE: &str = "offliner";
/// The exchange Celery events go to (SPEC §5).
pub const EVENT_EXCHANGE: &str = "celeryev";
/// The fanout exchange remote-control requests are broadcast on (SPEC §6).
pub const CONTROL_EXCHANGE: &str = "celery.pidbox";
/// Celery's `control_queue_ttl`: a request left unread in a node's pidbox
/// queue is dropped after this long (ms).
pub const CONTROL_QUEUE_TTL_MS: i32 = 300_000;
/// Celery's `control_queue_expires`: a node's pidbox queue is deleted this
/// long (ms) after its last consumer left.
pub const CONTROL_QUEUE_EXPIRES_MS: i32 = 10_000;

/// The name of a node's own pidbox queue, as kombu's `Mailbox` names it.
pub fn control_queue_name(node: &str) -> String {
    format!("{node}.celery.pidbox")
}

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
    /// The broker turned the login down (403 ACCESS_REFUSED) or does not
    /// let this user into the vhost (530 NOT_ALLOWED): configuration, not
    /// an outage.
    #[error(
        "the broker at {url} refused this worker: {reason}; check USERNAME and PASSWORD (or the \
         user, password and vhost in BROKER_URL)"
    )]
    Refused { url: String, reason: String },
    /// The node's pidbox queue is held by another connection (405
    /// RESOURCE_LOCKED on the exclusive queue): another worker runs with the
    /// same node name.
    #[error(
        "another worker named {node} is already connected to the broker (its remote-control \
         queue {queue} is locked by another connection); each worker needs its own NODE_NAME: \
         stop the other worker or change NODE_NAME",
        queue = control_queue_name(node)
    )]
    NodeInUse { node: String },
}

impl BrokerError {
    /// Whether retrying cannot help until the configuration changes.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Refused { .. } | Self::CaFile { .. })
    }
}

/// The broker's reason when it refused the login or the vhost.
fn refusal(error: &lapin::Error) -> Option<String> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e)
            if matches!(
                e.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                    | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
            ) =>
        {
            Some(e.get_message().to_string())
        }
        _ => None,
    }
}

/// The broker's reason, when it closed a consuming channel because a
/// delivery stayed unacked past its `consumer_timeout` (RabbitMQ 3.8.15 and
/// later: PRECONDITION_FAILED, "delivery acknowledgement on channel N timed
/// out"). Every unacked delivery of that channel is requeued.
pub fn delivery_timeout(error: &lapin::Error) -> Option<String> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e)
            if matches!(
                e.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
            ) =>
        {
            let message = e.get_message().to_string();
            (message.contains("delivery acknowledgement") && message.contains("timed out"))
                .then_some(message)
        }
        _ => None,
    }
}

/// Whether the broker refused an exclusive queue held by another connection.
fn is_resource_locked(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(e)
            if matches!(e.kind(), AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED))
    )
}

/// A task queue to consume and the exchange it is bound to: the part of
/// kombu's `Queue` this worker uses. Queues and exchanges are durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskQueue {
    pub name: String,
    /// The exchange it is bound to; empty: the default exchange only.
    pub exchange: String,
    /// `direct`, `topic`, `fanout` or `headers`.
    pub exchange_type: String,
    pub routing_key: String,
}

impl TaskQueue {
    /// A Zimfarm queue: bound to the `offliner` topic exchange with routing
    /// key = its name (SPEC §2).
    pub fn zimfarm(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            exchange: TASK_EXCHANGE.to_owned(),
            exchange_type: "topic".to_owned(),
            routing_key: name.to_owned(),
        }
    }

    fn exchange_kind(&self) -> ExchangeKind {
        match self.exchange_type.as_str() {
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "headers" => ExchangeKind::Headers,
            "topic" => ExchangeKind::Topic,
            other => ExchangeKind::Custom(other.to_owned()),
        }
    }
}

/// The node's remote-control channel and the consumer of its pidbox queue.
pub struct ControlChannel {
    pub channel: Channel,
    pub consumer: Consumer,
}

/// How to reach the broker and what to declare there.
#[derive(Clone)]
pub struct Broker {
    url: BrokerUrl,
    tls: Option<String>,
    connection_name: String,
    queues: Vec<QueueName>,
    /// The Celery node name, `USERNAME@NODE_NAME`.
    node: String,
}

/// The AMQP frame size asked for, unless BROKER_URL says `?frame_max=`.
const DEFAULT_FRAME_MAX: u32 = 16 * 1024;

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

impl Broker {
    /// Reads the CA file (if any) now, so a bad path fails at start-up.
    pub fn new(config: &Config) -> Result<Self, BrokerError> {
        let tls = match &config.broker.ca_file {
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
            url: config.broker.url.clone(),
            tls,
            connection_name: format!("zimfarm-worker {}", config.hostname()),
            queues: config.broker.queues.clone(),
            node: config.hostname(),
        })
    }

    /// The broker URL with its password redacted, for log lines.
    pub fn display_url(&self) -> String {
        self.url.to_string()
    }

    /// Connects, declares the topology and opens the channels a session
    /// needs: one consuming the configured task queues and one publishing
    /// (in confirm mode); no remote control (see [`Broker::connect_with`]),
    /// so it works beside a running worker of this node.
    pub async fn connect(&self, prefetch: u16) -> Result<Session, BrokerError> {
        let queues: Vec<TaskQueue> = self
            .queues
            .iter()
            .map(|q| TaskQueue::zimfarm(q.as_str()))
            .collect();
        self.open_session(prefetch, &queues, false).await
    }

    /// For `check`: connects and declares the exchanges and the task
    /// queues (so the vhost's permissions are exercised), then closes,
    /// having consumed nothing and without the control queue, which a
    /// running worker of this node holds exclusively.
    pub async fn check(&self) -> Result<(), BrokerError> {
        let session = self.open_session(1, &[], false).await?;
        let mut result = Ok(());
        for queue in &self.queues {
            result = self
                .declare_queue(
                    &session.consume_channel,
                    &TaskQueue::zimfarm(queue.as_str()),
                )
                .await;
            if result.is_err() {
                break;
            }
        }
        session.close().await;
        result
    }

    /// The worker's session: [`Broker::connect`] consuming `queues`, plus
    /// the remote-control channel. The node's pidbox queue is declared
    /// before any task queue is consumed, so a worker whose node name is
    /// taken ([`BrokerError::NodeInUse`]) never takes a task.
    pub async fn connect_with(
        &self,
        prefetch: u16,
        queues: &[TaskQueue],
    ) -> Result<Session, BrokerError> {
        self.open_session(prefetch, queues, true).await
    }

    async fn open_session(
        &self,
        prefetch: u16,
        queues: &[TaskQueue],
        control: bool,
    ) -> Result<Session, BrokerError> {
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
                if let Some(reason) = refusal(&source) {
                    return BrokerError::Refused {
                        url: url.clone(),
                        reason,
                    };
                }
                let hint = if source.to_string().contains("certificate") {
                    "; the broker's TLS certificate is not trusted: if it comes from a \
                     private CA, set BROKER_CA_FILE to that CA's PEM file"
                } else {
                    ""
                };
                BrokerError::Connect { url, source, hint }
            })?;

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
        let control = if control {
            Some(self.open_control(&connection).await?)
        } else {
            None
        };
        for queue in queues {
            self.declare_queue(&consume_channel, queue).await?;
        }
        // Global QoS: RabbitMQ applies it to the whole channel and lets it
        // change while consuming (per-consumer QoS only affects new
        // consumers), which is what holding `eta` tasks needs.
        consume_channel
            .basic_qos(prefetch, BasicQosOptions { global: true })
            .await
            .map_err(setup("prefetch settings"))?;
        let mut deliveries = SelectAll::new();
        for queue in queues {
            deliveries.push(self.consume_queue(&consume_channel, &queue.name).await?);
        }
        Ok(Session {
            connection: Arc::new(connection),
            consume_channel,
            publish_channel,
            deliveries,
            control,
        })
    }

    /// Opens the remote-control channel: declares the `celery.pidbox`
    /// fanout exchange and this node's pidbox queue (exclusive, auto-delete,
    /// with Celery's message TTL and expiry) bound to it, and consumes it
    /// without acks, as kombu's pidbox `Node` does.
    pub async fn open_control(
        &self,
        connection: &Connection,
    ) -> Result<ControlChannel, BrokerError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(setup("a channel"))?;
        channel
            .exchange_declare(
                CONTROL_EXCHANGE.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(setup("exchange celery.pidbox"))?;
        let queue = control_queue_name(&self.node);
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-message-ttl".into(),
            AMQPValue::LongInt(CONTROL_QUEUE_TTL_MS),
        );
        arguments.insert(
            "x-expires".into(),
            AMQPValue::LongInt(CONTROL_QUEUE_EXPIRES_MS),
        );
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        match channel
            .queue_declare(queue.as_str().into(), options, arguments)
            .await
        {
            Ok(_) => {}
            Err(e) if is_resource_locked(&e) => {
                return Err(BrokerError::NodeInUse {
                    node: self.node.clone(),
                });
            }
            Err(e) => return Err(setup(&format!("queue {queue}"))(e)),
        }
        channel
            .queue_bind(
                queue.as_str().into(),
                CONTROL_EXCHANGE.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(setup(&format!("binding of queue {queue}")))?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                self.consumer_tag(&queue).into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(setup(&format!("consuming queue {queue}")))?;
        Ok(ControlChannel { channel, consumer })
    }

    /// Declares a task queue and its exchange, and binds them, on `channel`
    /// (a refusal closes that channel: see [`Broker::declare_queue_apart`]).
    pub async fn declare_queue(
        &self,
        channel: &Channel,
        queue: &TaskQueue,
    ) -> Result<(), BrokerError> {
        let name = queue.name.as_str();
        if !queue.exchange.is_empty() {
            channel
                .exchange_declare(
                    queue.exchange.as_str().into(),
                    queue.exchange_kind(),
                    ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(setup(&format!("exchange {}", queue.exchange)))?;
        }
        channel
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
        if !queue.exchange.is_empty() {
            channel
                .queue_bind(
                    name.into(),
                    queue.exchange.as_str().into(),
                    queue.routing_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(setup(&format!("binding of queue {name}")))?;
        }
        Ok(())
    }

    /// [`Broker::declare_queue`] on a channel of its own, closed afterwards:
    /// a queue the broker refuses (declared elsewhere with other arguments,
    /// exclusive to another connection...) then costs that channel only,
    /// not the one consuming tasks.
    pub async fn declare_queue_apart(
        &self,
        connection: &Connection,
        queue: &TaskQueue,
    ) -> Result<(), BrokerError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(setup("a channel"))?;
        let declared = self.declare_queue(&channel, queue).await;
        if channel.status().connected() {
            let _ = channel.close(200, "queue declared".into()).await;
        }
        declared
    }

    /// Starts consuming a (declared) task queue on `channel`, with acks,
    /// asking for [`CONSUMER_TIMEOUT_MS`] as this consumer's delivery
    /// timeout.
    pub async fn consume_queue(
        &self,
        channel: &Channel,
        queue: &str,
    ) -> Result<Consumer, BrokerError> {
        channel
            .basic_consume(
                queue.into(),
                self.consumer_tag(queue).into(),
                BasicConsumeOptions::default(),
                task_consumer_arguments(),
            )
            .await
            .map_err(setup(&format!("consuming queue {queue}")))
    }

    /// Stops consuming a task queue on `channel`; its consumer's stream
    /// ends. Unacked messages stay with this worker until acked.
    pub async fn cancel_queue(&self, channel: &Channel, queue: &str) -> Result<(), BrokerError> {
        channel
            .basic_cancel(
                self.consumer_tag(queue).into(),
                BasicCancelOptions::default(),
            )
            .await
            .map_err(setup(&format!("cancelling the consumer of queue {queue}")))
    }

    /// The consumer tag of a queue: the connection name and the queue name.
    fn consumer_tag(&self, queue: &str) -> String {
        consumer_tag(&self.connection_name, queue)
    }
}

/// The delivery acknowledgement timeout the worker asks for on its own
/// task consumers (`x-consumer-timeout`, ms): 14 days. RabbitMQ 3.11.15,
/// 3.12 and later apply it to this consumer only, over the broker's
/// `consumer_timeout` (30 min by default), without changing the queue,
/// which others declared; older brokers ignore the argument (seen with
/// 3.10.8). A task that outlives even this is held by the farm (see
/// [`crate::farm`]).
pub const CONSUMER_TIMEOUT_MS: i64 = 14 * 24 * 3600 * 1000;

/// The arguments of a task consumer.
fn task_consumer_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-consumer-timeout".into(),
        AMQPValue::LongLongInt(CONSUMER_TIMEOUT_MS),
    );
    arguments
}

/// `<connection name>.<queue>`, the connection name cut so the tag fits
/// the 255 bytes of an AMQP short string (lapin's `ShortString::from`
/// panics on longer ones, killing the worker); the queue name, unique on
/// the channel, is kept whole.
fn consumer_tag(connection_name: &str, queue: &str) -> String {
    const MAX: usize = 255;
    if queue.len() >= MAX - 1 {
        return queue.to_owned();
    }
    let prefix = connection_name.replace(' ', "-");
    let mut cut = prefix.len().min(MAX - 1 - queue.len());
    while !prefix.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}.{queue}", &prefix[..cut])
}

/// Maps a lapin error to [`BrokerError::Setup`] about `what`.
fn setup(what: &str) -> impl FnOnce(lapin::Error) -> BrokerError {
    let what = what.to_owned();
    move |source| BrokerError::Setup { what, source }
}

/// One live connection with its channels.
pub struct Session {
    /// Shared with remote control, which opens channels of its own on it.
    pub connection: Arc<Connection>,
    pub consume_channel: Channel,
    pub publish_channel: Channel,
    /// Deliveries from every task queue, merged.
    pub deliveries: SelectAll<Consumer>,
    /// The pidbox consumer, until the worker takes it for remote control.
    pub control: Option<ControlChannel>,
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

/// Publishes a remote-control reply on the control channel, declaring its
/// exchange first as kombu does (direct, transient) unless `declared` says
/// it was declared on this channel already.
pub async fn publish_reply(
    channel: &Channel,
    declared: &mut std::collections::HashSet<String>,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), lapin::Error> {
    if !exchange.is_empty() && !declared.contains(exchange) {
        channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        declared.insert(exchange.to_owned());
    }
    channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await?;
    Ok(())
}

/// Changes a consuming channel's prefetch (one message per free slot, plus
/// one per unacked message that holds no slot).
pub async fn set_prefetch(channel: &Channel, prefetch: u16) -> Result<(), lapin::Error> {
    channel
        .basic_qos(prefetch, BasicQosOptions { global: true })
        .await
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
    #[test]
    fn the_delivery_timeout_close_is_told_from_other_closes() {
        use lapin::protocol::AMQPError;
        let close = |kind, text: &str| {
            lapin::Error::from(lapin::ErrorKind::ProtocolError(AMQPError::new(
                kind,
                text.into(),
            )))
        };
        // RabbitMQ 3.10.8's own words.
        let text = "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. \
                    Timeout value used: 60000 ms. This timeout value can be configured, see \
                    consumers doc guide to learn more";
        let timeout = close(AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED), text);
        assert_eq!(delivery_timeout(&timeout).as_deref(), Some(text));
        let other = close(
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
            "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'small'",
        );
        assert_eq!(delivery_timeout(&other), None);
        let hard = close(AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED), text);
        assert_eq!(delivery_timeout(&hard), None);
    }

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
    fn consumer_tags_fit_an_amqp_short_string() {
        let long_host = format!("zimfarm-worker {}@{}", "u".repeat(177), "p".repeat(63));
        assert_eq!(
            consumer_tag("zimfarm-worker a@b", "small"),
            "zimfarm-worker-a@b.small"
        );
        for queue in [
            "small".to_owned(),
            control_queue_name(&long_host[15..]),
            "q".repeat(254),
            "q".repeat(255),
        ] {
            let tag = consumer_tag(&long_host, &queue);
            assert!(tag.len() <= 255, "{} bytes", tag.len());
            assert!(tag.ends_with(&queue));
        }
        assert!(consumer_tag(&"é".repeat(200), "small").len() <= 255);
    }
}
