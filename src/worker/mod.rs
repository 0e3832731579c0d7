//! The worker: CONCURRENCY slots, the registry of tasks held or running
//! here, the broker session loop (connect, consume, reconnect), heartbeats
//! and shutdown.
//!
//! Owns the life of each task from delivery to ack. It must not parse wire
//! formats (the `celery` module does) nor know what a task does (a
//! [`Runner`] does): it decides *when*, never *how*.
//!
//! Laid out as Celery's `worker/`: this file holds the worker's state (the
//! registry of tasks, the slots, the topology) and its start and stop;
//! `session` the broker session loop; `admission` the decision of what a
//! task message becomes (pure, table-tested) and `delivery` carrying it
//! out; `task` an accepted task's life, ended as `conclusion` decides
//! (pure, table-tested); `heartbeat` the heartbeats;
//! `panel` the [`Panel`] remote control acts through.
//!
//! Remote control ([`crate::control`]) runs beside the session loop, in its
//! own task per session, and acts on the worker through that [`Panel`]:
//! revoke, the task listings, the queues consumed, shutdown.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicRejectOptions;
use lapin::{Acker, Channel, Connection, Consumer};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::broker::{Broker, BrokerError, Outbox, Session, TaskQueue, run_publisher};
use crate::celery::control::DeliveryInfo;
use crate::celery::{
    self, EventKind, ExceptionInfo, Identity, TaskRequest, TaskState, WorkerStats,
};
use crate::config::Config;
use crate::control::{ControlSession, Panel, RevokedSet, TaskPhase, TaskSnapshot, WorkerFacts};
use crate::ended::EndedLog;
use crate::events::EventSink;
use crate::farm::{Probe, Verdict};
use crate::metrics::{self, Outcome};
use crate::prefetch::{NotHeld, Prefetch, ack};
use crate::retry::Retry;
use crate::runner::{RunError, Runner, TaskContext, TaskError, TaskFile};
use heartbeat::heartbeat_confirmed;
use task::{record_failed, releasable};

mod admission;
mod conclusion;
mod delivery;
mod heartbeat;
mod panel;
mod session;
mod task;

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
        let prefetch = Prefetch::new(config.worker.concurrency);
        let queues = config
            .broker
            .queues
            .iter()
            .map(|q| TaskQueue::zimfarm(q.as_str()))
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                slots: Arc::new(Semaphore::new(config.worker.concurrency)),
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
        let deadline = tokio::time::Instant::now() + inner.config.worker.shutdown_grace;
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

    fn set_phase(&self, id: &str, phase: Phase) {
        if let Some(entry) = self.lock().tasks.get_mut(id) {
            entry.phase = phase;
            if phase == Phase::Running {
                entry.started = Some(celery::now_timestamp());
            }
        }
    }
}
