//! The worker: CONCURRENCY slots, the registry of tasks held or running
//! here, the broker session loop (connect, consume while a slot is free,
//! reconnect), heartbeats and shutdown.
//!
//! Owns the life of each task from delivery to ack. It must not parse wire
//! formats (the `celery` module does) nor know what a task does (a
//! [`Runner`] does): it decides *when*, never *how*.
//!
//! Laid out as Celery's `worker/`: this file holds the worker (its parts,
//! the slots) and its start and stop; `registry` the tasks held here, the
//! revoked ids and the totals (Celery's `state.py`; `revoked` its bounded
//! set of ids); `topology` the queues consumed; `session` the broker
//! session loop; `admission` the decision of what a task message becomes
//! (pure, table-tested) and `delivery` carrying it out; `task` an accepted
//! task's life, ended as `conclusion` decides (pure, table-tested);
//! `heartbeat` the heartbeats; `controlled` the [`ControlledWorker`]
//! remote control acts through; `stopping` how it is asked to stop (leave
//! or for good, [`Shutdown`]); `carry` what it stores with a task's state
//! to carry it on after a restart, and `adoption` the start that does.
//!
//! Remote control ([`crate::control`]) runs beside the session loop, in its
//! own task per session, and acts on the worker through that
//! [`ControlledWorker`]: revoke, the task listings, the queues consumed,
//! shutdown.
//!
//! Locks: the worker's own state is behind two locks, each in its own type
//! with named methods that never await: the [`Registry`]'s and the
//! `Topology`'s (`topology`), never held together. Under the registry's
//! lock, and only while a message is admitted or a lost session's unstarted
//! tasks are dropped, the leaf locks of [`EndedLog`] and [`Prefetch`] may
//! be taken (they never call back into the worker). One async lock, the
//! topology's turn, is held across the broker's answers while the task
//! consumers change (the session's pacer, `add_consumer`,
//! `cancel_consumer`), and only ever taken before the topology's lock. Why
//! the worker stops on its own is set once, without a lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicRejectOptions;
use lapin::{Acker, Connection, Consumer};
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
use crate::control::{ControlSession, ControlledWorker, WorkerFacts};
use crate::ended::EndedLog;
use crate::events::EventSink;
use crate::farm::{FarmView, Verdict};
use crate::metrics::{self, Outcome};
use crate::prefetch::{NotHeld, Prefetch, ack};
use crate::retry::Retry;
use crate::runner::{
    CancelReason, Cancellation, RunError, Runner, TaskContext, TaskError, TaskFile, TaskPlan,
};
use adoption::Adoption;
use heartbeat::heartbeat_confirmed;
use registry::{Registry, TaskEntry, TaskPhase, TaskSnapshot};
pub use stopping::{Shutdown, StopMode};
use task::{record_failed, releasable};
use topology::{LiveSession, Topology};

mod admission;
mod adoption;
pub mod carry;
mod conclusion;
mod controlled;
mod delivery;
mod heartbeat;
pub mod registry;
mod revoked;
mod session;
mod stopping;
mod task;
mod topology;

/// Seconds between `worker-heartbeat` events (SPEC §5).
pub const HEARTBEAT_SECS: f64 = 2.0;
/// Events kept while the broker is away, before non-final ones are dropped.
const OUTBOX_CAPACITY: usize = 10_000;
/// How long a reconnecting worker keeps finding its node's pidbox queue
/// locked before it concludes another worker took its name: the broker
/// drops a dead connection (and its exclusive queue) within about two
/// heartbeat intervals.
const NODE_LOCK_PATIENCE: Duration = Duration::from_secs(180);
/// Longest a leave waits for the running tasks to return (a runner that
/// leaves its tasks returns within about a second): with the events after
/// them, the worker exits well within Docker's default 10 s stop timeout.
const LEAVE_WAIT: Duration = Duration::from_secs(6);

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

/// Counters reported in heartbeats.
#[derive(Default)]
struct Counters {
    processed: AtomicU64,
    /// `eta` messages published again at the tail of their queue, beyond
    /// MAX_ETA_HELD.
    eta_requeued: AtomicU64,
    /// Of those, how many are on their way, held in the prefetch book.
    passing: std::sync::atomic::AtomicUsize,
    /// Numbers them (their key in the book).
    passed: AtomicU64,
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
    /// before it leaves the registry, so a redelivery always finds it in
    /// one or the other.
    ended: EndedLog,
    events: Arc<EventSink>,
    outbox: Arc<Outbox>,
    /// The tasks held or running here, the revoked ids, the totals.
    registry: Registry,
    slots: Arc<Semaphore>,
    counters: Counters,
    /// The task messages held here (and their acks), and the prefetch that
    /// lets the broker send one more only for a free slot.
    prefetch: Prefetch,
    tasks: TaskTracker,
    started_at: Instant,
    /// The queues consumed and the live session they are consumed on.
    topology: Topology,
    /// Who runs what in the farm, and who has been silent while this node
    /// heard it (fed by a watcher per session; see [`crate::farm`]).
    farm: Arc<FarmView>,
    /// Fired by remote control's `shutdown` (for good) and by `run`'s own
    /// [`Shutdown`] (in its mode).
    stop: Shutdown,
    /// Set by remote control when another worker took this node's pidbox
    /// queue: `run` then returns [`WorkerError::NodeInUse`]. It is set
    /// while a session is live, so before the session loop can return an
    /// error of its own: the first reason wins, without a lock.
    node_taken: AtomicBool,
}

impl<R: Runner> Inner<R> {
    /// The tasks held or running here, as `zimfarm-worker ps` lists them.
    fn ps_rows(&self) -> Vec<crate::ps::PsTask> {
        let now = celery::now_timestamp();
        let mut rows: Vec<crate::ps::PsTask> = self
            .registry
            .snapshot()
            .into_iter()
            .map(|task| {
                let detail = task.progress;
                crate::ps::PsTask {
                    id: task.request.id.clone(),
                    offliner: task.request.name.clone(),
                    state: match task.phase {
                        TaskPhase::Active => "running",
                        TaskPhase::Reserved => "reserved",
                        TaskPhase::Scheduled => "scheduled",
                        TaskPhase::Ending => "ending",
                    }
                    .to_owned(),
                    stage: detail.as_ref().and_then(|d| d.stage),
                    progress: detail.as_ref().and_then(|d| d.progress),
                    age: task.time_start.map(|t| (now - t).max(0.0)),
                    memory: detail.as_ref().and_then(|d| d.memory),
                    container: detail.as_ref().and_then(|d| d.container.clone()),
                    note: None,
                    detail,
                }
            })
            .collect();
        rows.sort_by(|a, b| {
            b.age
                .partial_cmp(&a.age)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then_with(|| a.id.cmp(&b.id))
        });
        rows
    }
}

/// What a held redelivery needs of the session it came on: the connection
/// to ask the farm on, and the token that fires when the session ends (its
/// messages went back to the broker).
#[derive(Clone)]
struct SessionLink {
    connection: Arc<Connection>,
    over: CancellationToken,
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
        let farm = Arc::new(FarmView::new(
            &config.hostname(),
            Duration::from_secs_f64(HEARTBEAT_SECS),
            config.worker.restart_grace,
        ));
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
                registry: Registry::default(),
                counters: Counters::default(),
                prefetch,
                tasks: TaskTracker::new(),
                started_at: Instant::now(),
                topology: Topology::new(queues),
                farm,
                stop: Shutdown::new(),
                node_taken: AtomicBool::new(false),
            }),
        })
    }

    /// Runs until `shutdown` fires (or remote control's `shutdown`), then
    /// shuts down as SPEC §8 says: stops consuming, stops the tasks (their
    /// messages stay unacked and go back to the broker), sends
    /// `worker-offline` and returns. A [`StopMode::Leave`] leaves the
    /// running tasks running when the runner keeps them
    /// ([`Runner::keeps_on_leave`]), for the next start to adopt; a
    /// [`CancellationToken`] fired from outside stops for good. Returns
    /// [`WorkerError::NodeInUse`] when another worker holds this node's
    /// name.
    ///
    /// At start, before the first connect (so that the first prefetch
    /// counts them), the tasks an earlier run of this node left running
    /// are adopted (see `adoption`).
    pub async fn run(self, shutdown: impl Into<Shutdown>) -> Result<(), WorkerError> {
        let shutdown = shutdown.into();
        let inner = self.inner;
        let kept = inner.runner.kept().await;
        if let Some(away) = kept.away {
            // Not heard while away: a task adopted after a long absence
            // asks the farm before it ends (see `crate::farm`).
            inner.farm.away_for(away);
        }
        inner.runner.alive().await;
        let adoption = inner.adopt(kept);
        let (channel_tx, channel_rx) = watch::channel(None);
        let publisher_stop = CancellationToken::new();
        let publisher = tokio::spawn(run_publisher(
            inner.outbox.clone(),
            channel_rx,
            publisher_stop.clone(),
        ));
        let heartbeat_stop = CancellationToken::new();
        let heartbeat = tokio::spawn(inner.clone().heartbeats(heartbeat_stop.clone()));
        let alive = tokio::spawn(inner.clone().alive(heartbeat_stop.clone()));
        // `zimfarm-worker ps` asks here while the worker runs.
        let ps = {
            let listed = inner.clone();
            let zim_dir = &inner.config.pipeline.zim_dir;
            match crate::ps::Server::start(zim_dir, move || listed.ps_rows()).await {
                Ok(server) => Some(server),
                Err(error) => {
                    tracing::warn!(
                        %error,
                        socket = %crate::ps::socket_path(zim_dir).display(),
                        "cannot serve `zimfarm-worker ps` on its socket; `ps` will list what the task records say"
                    );
                    None
                }
            }
        };

        let session = {
            let session_loop = inner.session_loop(&channel_tx, inner.stop.token(), adoption);
            tokio::pin!(session_loop);
            tokio::select! {
                session = &mut session_loop => session,
                _ = shutdown.cancelled() => {
                    inner.stop.fire(shutdown.mode());
                    session_loop.await
                }
            }
        };
        // The session loop may have returned on its own (a node name in
        // use, a refused login): what waits for the stop stops now.
        inner.stop.stop_for_good();
        let (session, fatal) = match session {
            Ok(session) => (session, None),
            Err(error) => (None, Some(error)),
        };

        // Shutdown: stop consuming (the session loop has returned), stop
        // every task (or leave the running ones), then say goodbye while
        // the connection is still up.
        let began = tokio::time::Instant::now();
        let deadline = began + inner.config.worker.shutdown_grace;
        heartbeat_stop.cancel();
        let _ = heartbeat.await;
        let _ = alive.await;
        let leave = inner.stop.mode() == StopMode::Leave && inner.runner.keeps_on_leave();
        let left = if leave {
            inner.registry.leave()
        } else {
            inner.registry.cancel_all(CancelReason::Shutdown);
            Vec::new()
        };
        tracing::info!(
            mode = ?inner.stop.mode(),
            left = left.len(),
            "stopping: {}",
            if leave {
                "running tasks are left running for the next start of this node"
            } else {
                "every task is stopped; their messages go back to the queue"
            }
        );
        // A leave must end well within `docker stop`'s 10 s: the tasks get
        // at most LEAVE_WAIT to return, the events the rest of the grace.
        let tasks_deadline = if leave {
            deadline.min(began + LEAVE_WAIT)
        } else {
            deadline
        };
        inner.tasks.close();
        if tokio::time::timeout_at(tasks_deadline, inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                wait_s = (tasks_deadline - began).as_secs(),
                "tasks did not return in time (SHUTDOWN_GRACE, at most 6 s on a leave); exiting anyway"
            );
        }
        drop(ps);
        // The tasks that ended meanwhile are not kept.
        let kept: Vec<String> = (left.into_iter())
            .filter(|id| inner.ended.get(id).is_none())
            .collect();
        if leave {
            // The node is away from now on, as the next start measures it.
            inner.runner.alive().await;
        }
        inner.events.emit(&EventKind::WorkerOffline {
            stats: inner.stats(),
            kept,
        });
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
        let fatal = if inner.node_taken.load(Ordering::SeqCst) {
            Some(WorkerError::NodeInUse {
                node: inner.config.hostname(),
            })
        } else {
            fatal
        };
        match fatal {
            Some(error) => Err(error),
            None => {
                tracing::info!("worker stopped");
                Ok(())
            }
        }
    }
}
