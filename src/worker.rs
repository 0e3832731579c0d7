//! The worker: CONCURRENCY slots, the registry of tasks held or running
//! here, the broker session loop (connect, consume, reconnect), heartbeats
//! and shutdown.
//!
//! Owns the life of each task from delivery to ack. It must not parse wire
//! formats (the `celery` module does) nor know what a task does (a
//! [`Runner`] does): it decides *when*, never *how*.
//!
//! Remote control ([`crate::control`]) runs beside the session loop, in its
//! own task per session, and acts on the worker through the
//! [`Panel`] this module implements: revoke, the task listings, the queues
//! consumed, shutdown.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicRejectOptions;
use lapin::{Acker, Channel, Connection, Consumer};
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::broker::{Broker, BrokerError, Outbox, Session, TaskQueue, run_publisher};
use crate::celery::control::DeliveryInfo;
use crate::celery::{
    self, EventKind, ExceptionInfo, Identity, TaskRequest, TaskState, WorkerStats, to_repr,
};
use crate::config::Config;
use crate::control::{ControlSession, Panel, RevokedSet, TaskPhase, TaskSnapshot, WorkerFacts};
use crate::ended::EndedLog;
use crate::events::EventSink;
use crate::farm::{Probe, Verdict};
use crate::metrics::{self, Outcome};
use crate::offliner::Offliner;
use crate::prefetch::{NotHeld, Prefetch, ack};
use crate::retry::Retry;
use crate::runner::{RunError, Runner, TaskContext, TaskError, TaskFile};

/// Seconds between `worker-heartbeat` events (SPEC §5).
pub const HEARTBEAT_SECS: f64 = 2.0;
/// Events kept while the broker is away, before non-final ones are dropped.
const OUTBOX_CAPACITY: usize = 10_000;
/// How long a reconnecting worker keeps finding its node's pidbox queue
/// locked before it concludes another worker took its name: the broker
/// drops a dead connection (and its exclusive queue) within about two
/// heartbeat intervals.
const NODE_LOCK_PATIENCE: Duration = Duration::from_secs(180);

/// Errors that stop the worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    /// Another worker with the same node name holds this node's pidbox
    /// queue (RabbitMQ's 405 RESOURCE_LOCKED): two workers must not share
    /// an identity (SPEC §2).
    #[error(
        "another worker named {node} is already connected to the broker (its remote-control \
         queue {node}.celery.pidbox is locked); each worker needs its own NODE_NAME: stop the \
         other worker or change NODE_NAME"
    )]
    NodeInUse { node: String },
}

impl WorkerError {
    /// Configuration to fix before starting again (exit code 2): a refused
    /// broker login or vhost, an unreadable `BROKER_CA_FILE`, a node name in
    /// use.
    pub fn is_configuration(&self) -> bool {
        match self {
            Self::Broker(error) => error.is_refusal(),
            Self::NodeInUse { .. } => true,
        }
    }
}

/// Why a task's cancel token fired.
#[derive(Debug, Clone, Copy, PartialEq)]
enum CancelReason {
    /// Revoked by remote control: `terminated` when it was running.
    Revoked {
        terminated: bool,
        signum: Option<i32>,
    },
    TimeLimit {
        hard: f64,
    },
    Shutdown,
}

/// Where a task is in its life here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Held until its `eta`.
    Scheduled,
    /// Waiting for a free slot.
    Reserved,
    Running,
    /// Its final event is queued; acked once the broker confirmed it.
    Ending,
}

struct TaskEntry {
    request: Arc<TaskRequest>,
    phase: Phase,
    cancel: CancellationToken,
    reason: Option<CancelReason>,
    started: Option<f64>,
    /// Where its message came from (`inspect active`).
    delivery: DeliveryInfo,
}

#[derive(Default)]
struct State {
    tasks: HashMap<String, TaskEntry>,
}

/// Counters reported in heartbeats.
#[derive(Default)]
struct Counters {
    processed: AtomicU64,
}

/// The running worker. Cheap to clone (an `Arc` inside).
pub struct Worker<R: Runner> {
    inner: Arc<Inner<R>>,
}

impl<R: Runner> Clone for Worker<R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<R> {
    config: Config,
    broker: Broker,
    runner: R,
    /// Tasks that ended here, on disk. An ending task is recorded here
    /// before it leaves `state.tasks`, so a redelivery always finds it in
    /// one or the other.
    ended: EndedLog,
    events: Arc<EventSink>,
    outbox: Arc<Outbox>,
    state: Mutex<State>,
    slots: Arc<Semaphore>,
    counters: Counters,
    /// The task messages held here (and their acks), and the prefetch that
    /// lets the broker send one more only for a free slot.
    prefetch: Prefetch,
    tasks: TaskTracker,
    started_at: Instant,
    /// Task ids revoked by remote control (Celery's `revoked`).
    revoked: Mutex<RevokedSet>,
    /// Tasks started, by name (`inspect stats` `total`).
    totals: Mutex<BTreeMap<String, u64>>,
    /// The queues consumed and the live session they are consumed on.
    topology: Mutex<Topology>,
    /// Fired by remote control's `shutdown` (and by `run`'s own token).
    stop: CancellationToken,
    /// Why the worker stops on its own, if it does.
    fatal: Mutex<Option<WorkerError>>,
}

/// The task queues to consume (QUEUES, then `add_consumer` /
/// `cancel_consumer`), and the session consuming them now.
struct Topology {
    queues: Vec<TaskQueue>,
    live: Option<LiveSession>,
}

/// What a held redelivery needs of the session it came on: the connection
/// to ask the farm on, and the token that fires when the session ends (its
/// messages went back to the broker).
#[derive(Clone)]
struct SessionLink {
    connection: Arc<Connection>,
    over: CancellationToken,
}

/// What remote control needs of the current session to change the queues
/// consumed.
#[derive(Clone)]
struct LiveSession {
    connection: Arc<Connection>,
    consume_channel: Channel,
    /// New consumers, merged into the session's deliveries.
    consumers: mpsc::UnboundedSender<Consumer>,
}

impl<R: Runner> Worker<R> {
    /// A worker running tasks with `runner`; `ended` is the record of tasks
    /// that ended here, opened in ZIM_DIR (see [`EndedLog::open`]).
    pub fn new(config: Config, runner: R, ended: EndedLog) -> Result<Self, WorkerError> {
        let broker = Broker::new(&config)?;
        let outbox = Outbox::new(OUTBOX_CAPACITY);
        let identity = Identity {
            hostname: config.hostname(),
            pid: std::process::id(),
            sw_ident: "zimfarm-worker".to_owned(),
            sw_ver: env!("CARGO_PKG_VERSION").to_owned(),
            sw_sys: std::env::consts::OS.to_owned(),
        };
        let events = Arc::new(EventSink::new(identity, outbox.clone()));
        let prefetch = Prefetch::new(config.concurrency);
        let queues = config
            .queues
            .iter()
            .map(|q| TaskQueue::zimfarm(q.as_str()))
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                slots: Arc::new(Semaphore::new(config.concurrency)),
                config,
                broker,
                runner,
                ended,
                events,
                outbox,
                state: Mutex::new(State::default()),
                counters: Counters::default(),
                prefetch,
                tasks: TaskTracker::new(),
                started_at: Instant::now(),
                revoked: Mutex::new(RevokedSet::default()),
                totals: Mutex::new(BTreeMap::new()),
                topology: Mutex::new(Topology { queues, live: None }),
                stop: CancellationToken::new(),
                fatal: Mutex::new(None),
            }),
        })
    }

    /// Runs until `shutdown` fires (or remote control's `shutdown`), then
    /// shuts down as SPEC §8 says: stops consuming, stops the tasks (their
    /// messages stay unacked and go back to the broker), sends
    /// `worker-offline` and returns. Returns [`WorkerError::NodeInUse`]
    /// when another worker holds this node's name.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let inner = self.inner;
        let (channel_tx, channel_rx) = watch::channel(None);
        let publisher_stop = CancellationToken::new();
        let publisher = tokio::spawn(run_publisher(
            inner.outbox.clone(),
            channel_rx,
            publisher_stop.clone(),
        ));
        let heartbeat_stop = CancellationToken::new();
        let heartbeat = tokio::spawn(inner.clone().heartbeats(heartbeat_stop.clone()));

        let session = {
            let session_loop = inner.session_loop(&channel_tx, &inner.stop);
            tokio::pin!(session_loop);
            tokio::select! {
                session = &mut session_loop => session,
                _ = shutdown.cancelled() => {
                    inner.stop.cancel();
                    session_loop.await
                }
            }
        };
        let session = match session {
            Ok(session) => session,
            Err(error) => {
                inner.set_fatal(error);
                None
            }
        };

        // Shutdown: stop consuming (the session loop has returned), stop
        // every task, then say goodbye while the connection is still up.
        let deadline = tokio::time::Instant::now() + inner.config.shutdown_grace;
        heartbeat_stop.cancel();
        let _ = heartbeat.await;
        inner.cancel_all(CancelReason::Shutdown);
        inner.tasks.close();
        if tokio::time::timeout_at(deadline, inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("tasks did not stop within SHUTDOWN_GRACE; exiting anyway");
        }
        inner.events.emit(&EventKind::WorkerOffline(inner.stats()));
        // Without a session the publisher has no channel: nothing more can
        // leave.
        if session.is_some() && !inner.outbox.drained(deadline).await {
            tracing::warn!(
                pending = inner.outbox.len(),
                "could not publish every event before SHUTDOWN_GRACE ran out"
            );
        }
        publisher_stop.cancel();
        let _ = publisher.await;
        if let Some(session) = session {
            session.close().await;
        }
        let fatal = inner.fatal.lock().unwrap_or_else(|e| e.into_inner()).take();
        match fatal {
            Some(error) => Err(error),
            None => {
                tracing::info!("worker stopped");
                Ok(())
            }
        }
    }
}

impl<R: Runner> Inner<R> {
    /// Connects (with backoff), consumes, and reconnects on loss until
    /// `shutdown` fires. Returns the live session, if any, for the goodbye;
    /// [`WorkerError::NodeInUse`] when another worker holds this node's
    /// name.
    async fn session_loop(
        self: &Arc<Self>,
        channels: &watch::Sender<Option<lapin::Channel>>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Session>, WorkerError> {
        let mut retry = Retry::broker();
        let mut first = true;
        let mut locked_since: Option<Instant> = None;
        loop {
            let prefetch = self.prefetch.next_session().await;
            let queues = self.topology().queues.clone();
            let session = tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                s = self.broker.connect_with(prefetch, &queues) => s,
            };
            let mut session = match session {
                Ok(s) => s,
                Err(BrokerError::NodeInUse { node }) => {
                    // At start: another worker has this name. After a
                    // connection loss: maybe our own old connection, which
                    // the broker has not dropped yet; wait for it a while.
                    let since = *locked_since.get_or_insert_with(Instant::now);
                    if first || since.elapsed() >= NODE_LOCK_PATIENCE {
                        return Err(WorkerError::NodeInUse { node });
                    }
                    let delay = retry.delay();
                    tracing::warn!(
                        node = %node,
                        retry_in = ?delay,
                        "this node's remote-control queue is still locked, probably by this \
                         worker's previous connection; retrying"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
                // At start a refused login is configuration to fix; later
                // it may be the broker's auth backend having a bad moment.
                Err(error) if first && error.is_refusal() => return Err(error.into()),
                Err(error) => {
                    let delay = retry.delay();
                    tracing::error!(%error, retry_in = ?delay, "broker unreachable");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            retry.reset();
            locked_since = None;
            if first {
                // The node's name is ours now: what an earlier run of it
                // left can go, before any task of this run starts.
                self.runner.claim_node().await;
            }
            // Before any delivery of this session is read: they are held on
            // this channel.
            self.prefetch
                .attach(session.consume_channel.clone(), prefetch)
                .await;
            let (consumers_tx, mut consumers) = mpsc::unbounded_channel();
            self.go_live(&mut session, &queues, consumers_tx).await;
            let _ = channels.send(Some(session.publish_channel.clone()));
            tracing::info!(
                broker = %self.broker.display_url(),
                queues = ?self.topology().queues.iter().map(|q| q.name.as_str()).collect::<Vec<_>>(),
                concurrency = self.config.concurrency,
                startup_ms = if first { self.started_at.elapsed().as_millis() } else { 0 },
                "connected to the broker; consuming"
            );
            metrics::global().broker_up(!first);
            first = false;
            let online = self
                .events
                .emit_confirmed(&EventKind::WorkerOnline(self.stats()));
            self.tasks.spawn(heartbeat_confirmed(online));

            let session_over = CancellationToken::new();
            let control = session.control.take().map(|control| {
                tokio::spawn(crate::control::serve(
                    Worker {
                        inner: self.clone(),
                    },
                    ControlSession {
                        broker: self.broker.clone(),
                        connection: session.connection.clone(),
                        control,
                    },
                    session_over.clone(),
                ))
            });
            let link = SessionLink {
                connection: session.connection.clone(),
                over: session_over.clone(),
            };
            let session_guard = session_over.clone().drop_guard();
            let shut = loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break true,
                    Some(consumer) = consumers.recv() => session.deliveries.push(consumer),
                    delivery = session.deliveries.next(), if !session.deliveries.is_empty() => {
                        match delivery {
                            Some(Ok(delivery)) => self.on_delivery(delivery, &link),
                            Some(Err(error)) => {
                                if let Some(reason) = crate::broker::delivery_timeout(&error) {
                                    metrics::global().delivery_timeout();
                                    tracing::error!(
                                        %reason,
                                        "the broker closed the task channel: a task's message stayed unacked past \
                                         its consumer_timeout (30 min by default) and was requeued, for this or \
                                         another node; tasks here keep running. The broker's operator should \
                                         raise it above the longest task: consumer_timeout in rabbitmq.conf \
                                         (e.g. consumer_timeout = 1209600000 for 14 days) or advanced.config, or \
                                         on RabbitMQ 3.12+ a consumer-timeout policy on the task queues; \
                                         reconnecting"
                                    );
                                } else {
                                    tracing::warn!(%error, "lost the broker connection; reconnecting");
                                }
                                break false;
                            }
                            // Every consumer was cancelled on purpose
                            // (`cancel_consumer`): consume nothing until
                            // `add_consumer`.
                            None if self.topology().queues.is_empty() => {
                                tracing::warn!("consuming no queue now (every queue was cancelled by remote control)");
                            }
                            None => {
                                tracing::warn!("the broker closed the consumer; reconnecting");
                                break false;
                            }
                        }
                    }
                }
            };
            // The session is over: remote control stops with it.
            metrics::global().broker_down();
            self.topology().live = None;
            drop(session_guard);
            if let Some(control) = control {
                let _ = control.await;
            }
            if shut {
                return Ok(Some(session));
            }
            let _ = channels.send(None);
            session.close().await;
            let delay = retry.delay();
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Makes a new session the one remote control acts on, and brings its
    /// consumers in line with the queues wanted now: `add_consumer` and
    /// `cancel_consumer` may have run between the connect (which consumed
    /// `consumed`) and this moment.
    async fn go_live(
        &self,
        session: &mut Session,
        consumed: &[TaskQueue],
        consumers: mpsc::UnboundedSender<Consumer>,
    ) {
        let (missing, extra): (Vec<TaskQueue>, Vec<TaskQueue>) = {
            let mut topology = self.topology();
            topology.live = Some(LiveSession {
                connection: session.connection.clone(),
                consume_channel: session.consume_channel.clone(),
                consumers,
            });
            (
                topology
                    .queues
                    .iter()
                    .filter(|q| !consumed.contains(q))
                    .cloned()
                    .collect(),
                consumed
                    .iter()
                    .filter(|q| !topology.queues.contains(q))
                    .cloned()
                    .collect(),
            )
        };
        for queue in missing {
            let consumer = async {
                self.broker
                    .declare_queue_apart(&session.connection, &queue)
                    .await?;
                self.broker
                    .consume_queue(&session.consume_channel, &queue.name)
                    .await
            };
            match consumer.await {
                Ok(consumer) => session.deliveries.push(consumer),
                Err(error) => tracing::warn!(queue = %queue.name, %error, "cannot consume a queue"),
            }
        }
        for queue in extra {
            if let Err(error) = self
                .broker
                .cancel_queue(&session.consume_channel, &queue.name)
                .await
            {
                tracing::warn!(queue = %queue.name, %error, "cannot stop consuming a queue");
            }
        }
    }

    fn topology(&self) -> std::sync::MutexGuard<'_, Topology> {
        self.topology.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records why the worker stops on its own (the first reason wins).
    fn set_fatal(&self, error: WorkerError) {
        let mut fatal = self.fatal.lock().unwrap_or_else(|e| e.into_inner());
        if fatal.is_none() {
            *fatal = Some(error);
        }
    }

    fn stats(&self) -> WorkerStats {
        let active = self
            .lock()
            .tasks
            .values()
            .filter(|t| t.phase == Phase::Running)
            .count();
        WorkerStats {
            freq: HEARTBEAT_SECS,
            active,
            processed: self.counters.processed.load(Ordering::Relaxed),
            loadavg: loadavg(),
        }
    }

    async fn heartbeats(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(HEARTBEAT_SECS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        tick.tick().await;
        // The last heartbeat sent, until the broker confirms it (health).
        let mut pending: Option<crate::events::Confirmed> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                confirmed = async { pending.as_mut().expect("guarded").await }, if pending.is_some() => {
                    pending = None;
                    if confirmed.is_ok() {
                        metrics::global().heartbeat_confirmed();
                    }
                }
                _ = tick.tick() => {
                    // A heartbeat queued while the broker is away would only
                    // be stale when it finally leaves.
                    if self.outbox.is_connected() {
                        pending = Some(self.events.emit_confirmed(&EventKind::WorkerHeartbeat(self.stats())));
                    }
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cancel_all(&self, reason: CancelReason) {
        let mut state = self.lock();
        for entry in state.tasks.values_mut() {
            if entry.phase != Phase::Ending && entry.reason.is_none() {
                entry.reason = Some(reason);
                entry.cancel.cancel();
            }
        }
    }

    /// Looks at one delivery and decides what becomes of it. Never blocks:
    /// acks and task runs are spawned.
    fn on_delivery(self: &Arc<Self>, delivery: Delivery, link: &SessionLink) {
        let Delivery {
            data,
            properties,
            acker,
            routing_key,
            exchange,
            redelivered,
            ..
        } = delivery;
        if data.len() > self.config.max_message_bytes {
            tracing::error!(
                bytes = data.len(),
                limit = self.config.max_message_bytes,
                routing_key = %routing_key,
                "dropping a task message larger than MAX_MESSAGE_BYTES"
            );
            metrics::global().task_ended("", Outcome::Rejected);
            self.spawn_ack(acker, None);
            return;
        }
        let request = match celery::decode(&properties, &data) {
            Ok(r) => Arc::new(r),
            Err(error) => {
                tracing::error!(task_id = ?error.task_id, %error, "dropping an undecodable task message");
                metrics::global().task_ended("", Outcome::Rejected);
                let confirmed = error.task_id.as_ref().map(|id| {
                    self.events.emit_confirmed(&EventKind::TaskFailed {
                        uuid: id.clone(),
                        exception: ExceptionInfo {
                            exc_type: "DecodeError".to_owned(),
                            exc_module: "builtins".to_owned(),
                            message: error.to_string(),
                            traceback: String::new(),
                        }
                        .repr(),
                        traceback: String::new(),
                    })
                });
                self.spawn_ack(acker, confirmed);
                return;
            }
        };
        drop(data);

        if Offliner::from_task_name(&request.name).is_none() {
            tracing::error!(task_id = %request.id, task = %request.name, "received an unregistered task; rejecting it");
            metrics::global().task_ended(&request.name, Outcome::Rejected);
            let info = ExceptionInfo {
                exc_type: "NotRegistered".to_owned(),
                exc_module: "celery.exceptions".to_owned(),
                message: request.name.clone(),
                traceback: String::new(),
            };
            // Like every final outcome: reported (and confirmed) first, then
            // the message goes.
            let confirmed = self.events.emit_final(
                &EventKind::TaskFailed {
                    uuid: request.id.clone(),
                    exception: info.repr(),
                    traceback: String::new(),
                },
                request.reply_to.as_deref(),
                &request.id,
                &TaskState::Failure(info),
            );
            self.spawn_settle(acker, Some(confirmed), Settle::Reject);
            return;
        }

        let delivery = DeliveryInfo {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            priority: *properties.priority(),
            redelivered,
        };
        let span = tracing::info_span!("task", task_id = %request.id);
        self.place(request, acker, delivery, Some(link), span);
    }

    /// Decides what becomes of a decoded task message: held for a run
    /// here already, its final event sent again, held while the farm is
    /// asked about it (a redelivery, when `link` is given), or accepted.
    fn place(
        self: &Arc<Self>,
        request: Arc<TaskRequest>,
        acker: Acker,
        delivery: DeliveryInfo,
        link: Option<&SessionLink>,
        span: tracing::Span,
    ) {
        let _enter = span.enter();
        let state = self.lock();
        if let Some(entry) = state.tasks.get(&request.id) {
            tracing::info!(phase = ?entry.phase, "redelivered message for a task already here; acking it when that run ends");
            drop(state);
            match self.prefetch.hold_again(&request.id, acker) {
                // Held without a slot: room for one more.
                Ok(()) => {
                    let this = self.clone();
                    self.tasks
                        .spawn(async move { this.prefetch.settle().await });
                }
                Err(NotHeld(acker)) => self.spawn_ack(acker, None),
            }
            return;
        }
        if let Some(event) = self.ended.get(&request.id) {
            drop(state);
            tracing::info!(
                event = event.event_type(),
                "redelivered message for a task that already ended here; sending its final event again"
            );
            let confirmed = self.events.emit_confirmed(&event);
            if releasable(&event) {
                // The worker may have died between the record and the
                // release: release again (it is idempotent).
                self.tasks
                    .spawn(self.runner.release(&request.id).instrument(span.clone()));
            }
            self.spawn_ack(acker, Some(confirmed));
            return;
        }
        if let Some(link) = link.filter(|_| delivery.redelivered) {
            // Not here, not ended here: the broker gave it back, maybe
            // while it runs on another node (past its consumer_timeout).
            // Held without a slot while the farm is asked.
            drop(state);
            let session = self.prefetch.hold(&request.id, acker, false);
            tracing::info!(
                "redelivered message for a task not run here; asking the farm whether a node runs it"
            );
            let this = self.clone();
            let link = link.clone();
            drop(_enter);
            self.tasks.spawn(
                async move {
                    this.prefetch.settle().await;
                    this.resolve_redelivery(request, delivery, session, link)
                        .await;
                }
                .instrument(span.clone()),
            );
            return;
        }
        self.admit(state, request, acker, delivery, &span);
    }

    /// Settles a redelivered message held by [`Inner::place`]: see
    /// [`crate::farm`].
    async fn resolve_redelivery(
        self: Arc<Self>,
        request: Arc<TaskRequest>,
        delivery: DeliveryInfo,
        session: u64,
        link: SessionLink,
    ) {
        let id = request.id.clone();
        let verdict = match Probe::open(&link.connection, self.events.hostname()).await {
            Ok(probe) => probe.resolve(&id, &link.over).await,
            Err(error) => Err(error),
        };
        let verdict = match verdict {
            Ok(verdict) => verdict,
            Err(_) if link.over.is_cancelled() => Verdict::Returned,
            Err(error) => {
                // The session lives but the farm cannot be asked: do what
                // a node that cannot ask would, rather than hold it until
                // the broker's timeout moves it on.
                tracing::warn!(%error, "running the redelivered task here without the farm's answer");
                Verdict::RunHere {
                    why: error.to_string(),
                }
            }
        };
        match verdict {
            Verdict::EndedElsewhere { node } => {
                tracing::info!(node = %node, "the task ended on another node; acking its redelivered message without running it");
                metrics::global().redelivery(metrics::Redelivery::EndedElsewhere);
                self.prefetch.end(&id).await;
            }
            Verdict::RunHere { why } => match self.prefetch.take(&id, session) {
                Some(acker) => {
                    tracing::info!(%why, "running the redelivered task here");
                    metrics::global().redelivery(metrics::Redelivery::RanHere);
                    self.place(request, acker, delivery, None, tracing::Span::current());
                    // It was held without a slot, now with one.
                    self.prefetch.settle().await;
                }
                None => {
                    metrics::global().redelivery(metrics::Redelivery::Returned);
                    self.prefetch.forget_session(&id, session);
                }
            },
            Verdict::Returned => {
                tracing::info!(
                    "this node's session ended while it held the redelivered message; the broker has it again"
                );
                metrics::global().redelivery(metrics::Redelivery::Returned);
                self.prefetch.forget_session(&id, session);
            }
        }
    }

    /// Accepts a task: not run if expired or revoked (its final event is
    /// sent), else held in the registry and started (or held for its
    /// `eta`).
    fn admit(
        self: &Arc<Self>,
        mut state: std::sync::MutexGuard<'_, State>,
        request: Arc<TaskRequest>,
        acker: Acker,
        delivery: DeliveryInfo,
        span: &tracing::Span,
    ) {
        let expired = request.expires.is_some_and(|e| e <= chrono::Utc::now());
        if expired || self.is_revoked(&request.id) {
            drop(state);
            if expired {
                tracing::warn!(expires = ?request.expires, "task expired before it could start; not running it");
            } else {
                tracing::warn!("task was revoked before it arrived; not running it");
            }
            let event = EventKind::TaskRevoked {
                uuid: request.id.clone(),
                terminated: false,
                signum: None,
                expired,
            };
            // Visible to the next delivery at once; on disk before the event
            // leaves, like every outcome (see `finish`).
            let recorded = self.ended.record(&request.id, &event);
            self.counters.processed.fetch_add(1, Ordering::Relaxed);
            metrics::global().task_ended(&request.name, Outcome::Revoked);
            let this = self.clone();
            self.tasks.spawn(
                async move {
                    if let Err(error) = recorded.await {
                        record_failed(&error);
                    }
                    let confirmed = this.events.emit_final(
                        &event,
                        request.reply_to.as_deref(),
                        &request.id,
                        &TaskState::Revoked {
                            reason: if expired { "expired" } else { "revoked" }.to_owned(),
                        },
                    );
                    settle(acker, Some(confirmed), Settle::Ack).await;
                }
                .instrument(span.clone()),
            );
            return;
        }
        let cancel = CancellationToken::new();
        let scheduled = request.eta.is_some_and(|eta| eta > chrono::Utc::now());
        state.tasks.insert(
            request.id.clone(),
            TaskEntry {
                request: request.clone(),
                phase: if scheduled {
                    Phase::Scheduled
                } else {
                    Phase::Reserved
                },
                cancel: cancel.clone(),
                reason: None,
                started: None,
                delivery,
            },
        );
        // Held before the registry lock goes: a redelivery that finds the
        // task there finds its message held too.
        self.prefetch.hold(&request.id, acker, !scheduled);
        drop(state);
        self.events.emit(&EventKind::TaskReceived {
            uuid: request.id.clone(),
            name: request.name.clone(),
            args: request.argsrepr.clone(),
            kwargs: request.kwargsrepr.clone(),
            root_id: request.root_id.clone(),
            parent_id: request.parent_id.clone(),
            retries: request.retries,
            eta: request.eta.as_ref().map(celery::iso8601::format),
            expires: request.expires.as_ref().map(celery::iso8601::format),
        });
        tracing::info!(task = %request.name, "task received");
        self.tasks.spawn(
            self.clone()
                .task_life(request, cancel)
                .instrument(span.clone()),
        );
    }

    /// Acks once `confirmed` resolves (the final event reached the broker).
    fn spawn_ack(&self, acker: Acker, confirmed: Option<crate::events::Confirmed>) {
        self.spawn_settle(acker, confirmed, Settle::Ack);
    }

    /// Settles a message once `confirmed` resolves, in a task of its own.
    fn spawn_settle(&self, acker: Acker, confirmed: Option<crate::events::Confirmed>, how: Settle) {
        self.tasks.spawn(settle(acker, confirmed, how));
    }

    fn set_phase(&self, id: &str, phase: Phase) {
        if let Some(entry) = self.lock().tasks.get_mut(id) {
            entry.phase = phase;
            if phase == Phase::Running {
                entry.started = Some(celery::now_timestamp());
            }
        }
    }

    /// One task from acceptance to ack: eta hold, slot, run, final event.
    async fn task_life(self: Arc<Self>, request: Arc<TaskRequest>, cancel: CancellationToken) {
        if let Some(eta) = request.eta {
            let wait = (eta - chrono::Utc::now()).to_std().unwrap_or_default();
            if !wait.is_zero() {
                tracing::info!(eta = %eta, "holding the task until its eta");
                // Held without a slot: the broker may fill the one it took.
                self.prefetch.settle().await;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = cancel.cancelled() => {}
                }
                if !cancel.is_cancelled() {
                    self.set_phase(&request.id, Phase::Reserved);
                    self.prefetch.want_slot(&request.id).await;
                }
            } else {
                // Its eta passed on the way here: it wants a slot now.
                self.set_phase(&request.id, Phase::Reserved);
                self.prefetch.want_slot(&request.id).await;
            }
        }
        let permit = tokio::select! {
            permit = self.slots.clone().acquire_owned() => permit.ok(),
            _ = cancel.cancelled() => None,
        };
        let (outcome, slot) = match permit {
            // Cancelled while waiting (a revoke, or shutdown): it never ran.
            _ if cancel.is_cancelled() => (Err(RunError::Cancelled), None),
            None => (Err(RunError::Cancelled), None),
            Some(permit) => {
                self.set_phase(&request.id, Phase::Running);
                *self
                    .totals
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(request.name.clone())
                    .or_default() += 1;
                self.events.emit(&EventKind::TaskStarted {
                    uuid: request.id.clone(),
                });
                tracing::info!("task started");
                let active = metrics::global().task_running();
                let outcome = self.run_guarded(&request, &cancel).await;
                drop(active);
                (outcome, Some(permit))
            }
        };
        self.finish(&request, outcome, slot).await;
    }

    /// Runs the runner in its own tokio task (a panic fails the task, not the
    /// worker), with the message's hard time limit.
    async fn run_guarded(
        &self,
        request: &Arc<TaskRequest>,
        cancel: &CancellationToken,
    ) -> Result<Vec<TaskFile>, RunError> {
        let ctx = TaskContext::new(request.id.clone(), cancel.clone(), self.events.clone());
        let mut handle = tokio::spawn(
            self.runner
                .run(request.clone(), ctx)
                .instrument(tracing::Span::current()),
        );
        let hard = request
            .time_limit
            .hard
            .filter(|h| h.is_finite() && *h > 0.0);
        let limit = async {
            match hard {
                Some(h) => tokio::time::sleep(Duration::from_secs_f64(h.min(1e9))).await,
                None => std::future::pending().await,
            }
        };
        let joined = tokio::select! {
            joined = &mut handle => joined,
            _ = limit => {
                let h = hard.unwrap_or_default();
                tracing::warn!(hard_limit = h, "task hit its hard time limit; stopping it");
                if let Some(entry) = self.lock().tasks.get_mut(&request.id)
                    && entry.reason.is_none()
                {
                    entry.reason = Some(CancelReason::TimeLimit { hard: h });
                }
                cancel.cancel();
                handle.await
            }
        };
        match joined {
            Ok(outcome) => outcome,
            Err(join) => {
                let message = if join.is_panic() {
                    let panic = join.into_panic();
                    let text = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_else(|| "unknown panic".to_owned());
                    format!("the task panicked: {text}")
                } else {
                    "the task was aborted".to_owned()
                };
                tracing::error!("{message}");
                Err(TaskError::runtime(message).into())
            }
        }
    }

    /// Reports how the task ended, then acks its message(s) once the broker
    /// confirmed the report. A task stopped by shutdown is not acked: its
    /// message goes back to the queue for another worker.
    async fn finish(
        self: &Arc<Self>,
        request: &TaskRequest,
        outcome: Result<Vec<TaskFile>, RunError>,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        let id = request.id.clone();
        let (reason, started) = self
            .lock()
            .tasks
            .get(&id)
            .map_or((None, None), |entry| (entry.reason, entry.started));
        let runtime = started.map_or(0.0, |s| (celery::now_timestamp() - s).max(0.0));
        let (event, state) = match outcome {
            Ok(files) => {
                let value = serde_json::to_value(&files).unwrap_or(Value::Null);
                tracing::info!(files = files.len(), runtime, "task succeeded");
                (
                    EventKind::TaskSucceeded {
                        uuid: id.clone(),
                        result: to_repr(&value),
                        runtime,
                    },
                    TaskState::Success(value),
                )
            }
            Err(RunError::Failed(error)) => {
                tracing::error!(%error, "task failed");
                failure(&id, error)
            }
            Err(RunError::Cancelled) => match reason {
                Some(CancelReason::Revoked { terminated, signum }) => {
                    tracing::warn!(terminated, "task revoked");
                    (
                        EventKind::TaskRevoked {
                            uuid: id.clone(),
                            terminated,
                            signum,
                            expired: false,
                        },
                        TaskState::Revoked {
                            reason: "revoked".to_owned(),
                        },
                    )
                }
                Some(CancelReason::TimeLimit { hard }) => failure(
                    &id,
                    TaskError {
                        kind: "TimeLimitExceeded".to_owned(),
                        module: "celery.exceptions".to_owned(),
                        message: format!("{hard}"),
                        detail: format!("the task ran past its hard time limit of {hard} s"),
                    },
                ),
                Some(CancelReason::Shutdown) | None => {
                    tracing::info!("task stopped by shutdown; its message goes back to the queue");
                    self.lock().tasks.remove(&id);
                    self.prefetch.forget(&id);
                    return;
                }
            },
        };
        // `ready` to `query_task` from here on: it ended (a task stopped by
        // shutdown never says so, and a holder elsewhere runs it).
        self.set_phase(&id, Phase::Ending);
        // On disk before the event leaves: if the worker dies after sending
        // it but before the ack, the redelivery (here or after a restart)
        // finds the record and re-sends the event instead of running the
        // task again. A failed write still lets the outcome go out.
        let succeeded = matches!(event, EventKind::TaskSucceeded { .. });
        metrics::global().task_ended(
            &request.name,
            match &event {
                EventKind::TaskSucceeded { .. } => Outcome::Succeeded,
                EventKind::TaskRevoked { .. } => Outcome::Revoked,
                _ => Outcome::Failed,
            },
        );
        match self.ended.record(&id, &event).await {
            Ok(()) if releasable(&event) => {
                self.tasks.spawn(
                    self.runner
                        .release(&id)
                        .instrument(tracing::Span::current()),
                );
            }
            Ok(()) => {}
            Err(error) => {
                record_failed(&error);
                if succeeded {
                    tracing::warn!(
                        "keeping the task's files: without the record, a redelivery after a restart would need them"
                    );
                }
            }
        }
        let confirmed = self
            .events
            .emit_final(&event, request.reply_to.as_deref(), &id, &state);
        // The task is over for whoever watches the events: free its slot,
        // and let the broker send the next message while this one waits
        // for its confirm (it then holds no slot, but is still unacked).
        drop(slot);
        self.prefetch.slot_freed(&id);
        let this = self.clone();
        self.tasks
            .spawn(async move { this.prefetch.settle().await }.in_current_span());
        // Ack only once the final event is safely with the broker: if the
        // connection drops first, the redelivery finds the task in `ended`
        // and sends its final event again.
        let _ = confirmed.await;
        self.lock().tasks.remove(&id);
        self.counters.processed.fetch_add(1, Ordering::Relaxed);
        self.prefetch.end(&id).await;
    }
}

/// What becomes of a task message whose outcome is reported.
#[derive(Debug, Clone, Copy)]
enum Settle {
    /// Done with: acked.
    Ack,
    /// Never to run anywhere (an unregistered task): rejected, not requeued.
    Reject,
}

/// Like every final outcome: the report is confirmed by the broker first
/// (`confirmed`, when there is one), then the message goes. If the
/// connection drops in between, the redelivery finds the task in `ended`
/// and sends its final event again.
async fn settle(acker: Acker, confirmed: Option<crate::events::Confirmed>, how: Settle) {
    if let Some(confirmed) = confirmed {
        let _ = confirmed.await;
    }
    match how {
        Settle::Ack => ack(&acker).await,
        Settle::Reject => {
            if let Err(error) = acker.reject(BasicRejectOptions { requeue: false }).await {
                tracing::debug!(%error, "reject failed; the broker will redeliver");
            }
        }
    }
}

/// Marks the worker as beating once the broker confirms `worker-online`.
async fn heartbeat_confirmed(confirmed: crate::events::Confirmed) {
    if confirmed.await.is_ok() {
        metrics::global().heartbeat_confirmed();
    }
}

/// A task's end could not be written to the record of ended tasks.
fn record_failed(error: &crate::ended::EndedError) {
    tracing::error!(
        %error,
        "could not record the task's end on disk; sending its outcome anyway (a redelivery after a restart would run it again)"
    );
}

/// Whether what a task left behind can go once its end is recorded: its
/// files are uploaded (success), or nobody wants them any more (revoked).
/// A failed task's files stay: an upload that failed for good keeps them.
fn releasable(event: &EventKind) -> bool {
    matches!(
        event,
        EventKind::TaskSucceeded { .. } | EventKind::TaskRevoked { .. }
    )
}

fn failure(id: &str, error: TaskError) -> (EventKind, TaskState) {
    let info = ExceptionInfo {
        exc_type: error.kind,
        exc_module: error.module,
        message: error.message,
        traceback: error.detail,
    };
    (
        EventKind::TaskFailed {
            uuid: id.to_owned(),
            exception: info.repr(),
            traceback: info.traceback.clone(),
        },
        TaskState::Failure(info),
    )
}

/// The 1, 5 and 15 minute load averages, as Celery reports them.
fn loadavg() -> [f64; 3] {
    // /proc/loadavg is a kernel buffer: reading it never blocks on I/O.
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut out = [0.0; 3];
    for (slot, part) in out.iter_mut().zip(text.split_whitespace()) {
        *slot = (part.parse::<f64>().unwrap_or(0.0) * 100.0).round() / 100.0;
    }
    out
}

impl<R: Runner> Inner<R> {
    fn is_revoked(&self, id: &str) -> bool {
        self.revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id, Instant::now())
    }

    /// See [`Panel::revoke`].
    fn revoke(&self, ids: &[String], terminate: Option<i32>) -> Vec<String> {
        {
            let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            for id in ids {
                revoked.insert(id, now);
            }
        }
        let mut found = Vec::new();
        let mut state = self.lock();
        for id in ids {
            let Some(entry) = state.tasks.get_mut(id) else {
                continue;
            };
            if entry.phase == Phase::Ending || entry.reason.is_some() {
                continue;
            }
            let reason = match (entry.phase, terminate) {
                (Phase::Running, Some(signum)) => CancelReason::Revoked {
                    terminated: true,
                    signum: Some(signum),
                },
                // As Celery: without `terminate`, a running task goes on.
                (Phase::Running, None) => continue,
                _ => CancelReason::Revoked {
                    terminated: false,
                    signum: None,
                },
            };
            tracing::warn!(task_id = %id, phase = ?entry.phase, ?terminate, "revoking the task");
            entry.reason = Some(reason);
            entry.cancel.cancel();
            found.push(id.clone());
        }
        found
    }
}

impl<R: Runner> Worker<R> {
    /// Stops a task held or running here: its runner is cancelled and the
    /// task ends with `task-revoked` (`terminated: true` with `signum` if
    /// it was running). Its id is remembered as revoked. Returns whether
    /// the task was here.
    pub fn revoke(&self, task_id: &str, signum: Option<i32>) -> bool {
        !self
            .inner
            .revoke(&[task_id.to_owned()], Some(signum.unwrap_or(15)))
            .is_empty()
    }

    /// The tasks running now.
    pub fn active(&self) -> Vec<Arc<TaskRequest>> {
        self.inner
            .lock()
            .tasks
            .values()
            .filter(|t| t.phase == Phase::Running)
            .map(|t| t.request.clone())
            .collect()
    }
}

impl<R: Runner> Panel for Worker<R> {
    fn config(&self) -> &Config {
        &self.inner.config
    }

    fn events(&self) -> &EventSink {
        &self.inner.events
    }

    fn facts(&self) -> WorkerFacts {
        let heartbeat = self
            .inner
            .topology()
            .live
            .as_ref()
            .map(|live| live.connection.configuration().heartbeat());
        WorkerFacts {
            pid: std::process::id(),
            uptime: self.inner.started_at.elapsed(),
            prefetch_count: self.inner.prefetch.in_force(),
            total: self
                .inner
                .totals
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            heartbeat,
        }
    }

    fn ended(&self, id: &str) -> bool {
        self.inner.ended.get(id).is_some()
    }

    fn tasks(&self) -> Vec<TaskSnapshot> {
        self.inner
            .lock()
            .tasks
            .values()
            .map(|entry| TaskSnapshot {
                request: entry.request.clone(),
                phase: match entry.phase {
                    Phase::Scheduled => TaskPhase::Scheduled,
                    Phase::Reserved => TaskPhase::Reserved,
                    Phase::Running => TaskPhase::Active,
                    Phase::Ending => TaskPhase::Ending,
                },
                time_start: entry.started,
                delivery: entry.delivery.clone(),
            })
            .collect()
    }

    fn revoke(&self, ids: &[String], terminate: Option<i32>) -> Vec<String> {
        self.inner.revoke(ids, terminate)
    }

    fn revoked(&self) -> Vec<String> {
        self.inner
            .revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ids(Instant::now())
    }

    fn merge_revoked(&self, ids: &[String]) {
        let mut revoked = self.inner.revoked.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        for id in ids {
            revoked.insert(id, now);
        }
    }

    fn queues(&self) -> Vec<TaskQueue> {
        self.inner.topology().queues.clone()
    }

    async fn add_queue(&self, queue: TaskQueue) -> Result<bool, BrokerError> {
        let live = {
            let mut topology = self.inner.topology();
            if topology.queues.iter().any(|q| q.name == queue.name) {
                return Ok(false);
            }
            // Listed first: a session that starts meanwhile consumes it.
            topology.queues.push(queue.clone());
            topology.live.clone()
        };
        let Some(live) = live else {
            return Ok(true);
        };
        let consumed = async {
            // Declared on a channel of its own: a refusal must not close
            // the channel consuming the tasks.
            self.inner
                .broker
                .declare_queue_apart(&live.connection, &queue)
                .await?;
            self.inner
                .broker
                .consume_queue(&live.consume_channel, &queue.name)
                .await
        };
        match consumed.await {
            Ok(consumer) => {
                // A session that ended meanwhile took its consumers along;
                // the next one consumes every listed queue.
                let _ = live.consumers.send(consumer);
                Ok(true)
            }
            Err(error) => {
                self.inner
                    .topology()
                    .queues
                    .retain(|q| q.name != queue.name);
                Err(error)
            }
        }
    }

    async fn cancel_queue(&self, name: &str) -> Result<bool, BrokerError> {
        let live = {
            let mut topology = self.inner.topology();
            let before = topology.queues.len();
            topology.queues.retain(|q| q.name != name);
            if topology.queues.len() == before {
                return Ok(false);
            }
            topology.live.clone()
        };
        if let Some(live) = live {
            self.inner
                .broker
                .cancel_queue(&live.consume_channel, name)
                .await?;
        }
        Ok(true)
    }

    fn heartbeat(&self) {
        self.inner
            .events
            .emit(&EventKind::WorkerHeartbeat(self.inner.stats()));
    }

    fn shutdown(&self) {
        self.inner.stop.cancel();
    }

    fn node_in_use(&self) {
        self.inner.set_fatal(WorkerError::NodeInUse {
            node: self.inner.config.hostname(),
        });
        self.inner.stop.cancel();
    }
}
