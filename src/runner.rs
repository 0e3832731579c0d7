//! The seam between the worker and what a task actually does.
//!
//! The worker accepts, schedules, reports and acks tasks; a [`Runner`] runs
//! one. This module owns that contract (what a runner gets, what it returns)
//! and the [`SimulateRunner`], which stands in for the Docker pipeline in
//! tests and benchmarks, and a task's [`Cancellation`]: the token a runner
//! watches, carrying why it fired. It must not touch the broker or events
//! directly: a runner reports through [`TaskContext`].

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::celery::{EventKind, TaskRequest};
use crate::events::EventSink;

/// One file a task produced (and, with the warehouse, uploaded).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct TaskFile {
    pub name: String,
    pub size: u64,
}

/// Why a task failed, in the shape Celery reports exceptions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct TaskError {
    /// The Python exception type name clients see (`RuntimeError`, ...).
    pub kind: String,
    /// The Python module of that type (`builtins`, `celery.exceptions`).
    pub module: String,
    pub message: String,
    /// Extra detail for the `traceback` field (e.g. a log tail).
    pub detail: String,
}

impl TaskError {
    /// A plain failure, reported as Python's `RuntimeError`.
    pub fn runtime(message: impl Into<String>) -> Self {
        let message = message.into();
        Self {
            kind: "RuntimeError".to_owned(),
            module: "builtins".to_owned(),
            detail: message.clone(),
            message,
        }
    }
}

/// How a run ended, short of success.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// The cancel token fired and the runner stopped what it had started.
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Failed(#[from] TaskError),
}

/// Where a runner's own task events go: the broker's event stream in the
/// worker, the terminal in `run-task`.
pub trait TaskEvents: Send + Sync + 'static {
    fn emit(&self, event: EventKind);
}

impl TaskEvents for EventSink {
    fn emit(&self, event: EventKind) {
        EventSink::emit(self, &event);
    }
}

/// Why a task's cancellation fired.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CancelReason {
    /// Revoked by remote control: `terminated` when it was running.
    Revoked {
        terminated: bool,
        signum: Option<i32>,
    },
    /// It ran past its hard time limit (s).
    TimeLimit { hard: f64 },
    /// The worker shuts down: its message goes back to the queue.
    Shutdown,
}

/// A task's cancellation: the token its runner watches and the first
/// reason it was fired for. Clones share both. The worker fires it with
/// [`Cancellation::cancel`] (the first reason wins, later ones are
/// ignored); a runner only watches it and never fires it.
#[derive(Debug, Clone, Default)]
pub struct Cancellation {
    token: CancellationToken,
    reason: Arc<OnceLock<CancelReason>>,
}

impl Cancellation {
    pub fn new() -> Self {
        Self::default()
    }

    /// Fires the cancellation for `reason`, unless it fired already (for
    /// any reason): returns whether this call fired it.
    pub fn cancel(&self, reason: CancelReason) -> bool {
        let first = self.reason.set(reason).is_ok();
        if first {
            self.token.cancel();
        }
        first
    }

    /// Why it fired: `None` until it does, or when its token was fired
    /// from outside (one made `From` a [`CancellationToken`]).
    pub fn reason(&self) -> Option<CancelReason> {
        self.reason.get().copied()
    }

    /// Completes once it fired.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// The token to hand to what watches it (an upload, a helper task).
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// A token fired with this cancellation, which can also be fired on
    /// its own (a part of the run stopped early).
    pub fn child_token(&self) -> CancellationToken {
        self.token.child_token()
    }
}

/// A cancellation whose token is fired from outside, without a reason
/// (`run-task`'s Ctrl-C, tests).
impl From<CancellationToken> for Cancellation {
    fn from(token: CancellationToken) -> Self {
        Self {
            token,
            reason: Arc::default(),
        }
    }
}

/// What a runner gets besides the request.
#[derive(Clone)]
pub struct TaskContext {
    /// Fires on revoke, time limit and shutdown, with its reason. A runner
    /// stops what it started (containers...) and returns
    /// [`RunError::Cancelled`].
    pub cancel: Cancellation,
    pub task_id: String,
    events: Arc<dyn TaskEvents>,
}

impl TaskContext {
    /// A context cancelled by firing `cancel` (no reason is carried).
    pub fn new(task_id: String, cancel: CancellationToken, events: Arc<dyn TaskEvents>) -> Self {
        Self::with_cancellation(task_id, cancel.into(), events)
    }

    /// A context cancelled by `cancel`, whose reason its holder reads.
    pub fn with_cancellation(
        task_id: String,
        cancel: Cancellation,
        events: Arc<dyn TaskEvents>,
    ) -> Self {
        Self {
            cancel,
            task_id,
            events,
        }
    }

    /// Sends a task event of the runner's own (`task-container_started`...).
    pub fn emit(&self, event_type: &str, fields: serde_json::Map<String, Value>) {
        self.events.emit(EventKind::Custom {
            event_type: event_type.to_owned(),
            uuid: self.task_id.clone(),
            fields,
        });
    }
}

/// Runs one task. The worker runs the returned future in its own tokio task
/// and always awaits it to the end, so a runner can clean up after
/// cancellation before returning.
pub trait Runner: Send + Sync + 'static {
    fn run(
        &self,
        request: Arc<TaskRequest>,
        ctx: TaskContext,
    ) -> impl Future<Output = Result<Vec<TaskFile>, RunError>> + Send + 'static;

    /// Lets go of what a **successful or revoked** task left behind. The
    /// worker calls it only once that end is recorded on disk (in the
    /// working dir's record of ended tasks, see [`crate::ended`]), so a
    /// redelivery of the task is answered from that record and never needs
    /// the files again; and again when such a redelivery comes (the worker
    /// may have died between the record and the release), so it must be
    /// idempotent and may find nothing to do. It runs beside the final event
    /// and the ack, in its own tokio task; shutdown waits for it up to
    /// `SHUTDOWN_GRACE`. A failed task is not released: its files may be
    /// what an upload that failed for good left for the operator.
    ///
    /// The Docker pipeline removes the task dir here. The default does
    /// nothing.
    fn release(&self, task_id: &str) -> impl Future<Output = ()> + Send + 'static {
        let _ = task_id;
        std::future::ready(())
    }

    /// Called once, when the worker first holds its node's name (the
    /// broker granted it the node's exclusive remote-control queue) and
    /// before it takes any task: the runner cleans up what an earlier run
    /// of this node left behind. Not sooner: a second worker started by
    /// mistake with a name in use must not touch the first one's work.
    ///
    /// The Docker pipeline removes the containers labelled for this node.
    /// The default does nothing.
    fn claim_node(&self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }
}

/// What a simulated task does, from the message's `simulate` kwarg:
/// `{"sleep": 1.5, "fail": "message", "panic": false, "files": [{"name", "size"}]}`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Simulation {
    sleep: f64,
    fail: Option<String>,
    panic: bool,
    files: Option<Vec<TaskFile>>,
}

/// Simulates tasks without Docker, for tests, benchmarks and demos:
/// sleeps (cancellably), then fails, panics or returns files as the task's
/// `simulate` kwarg asks. Without it, returns one file named after the task.
#[derive(Debug, Default, Clone)]
pub struct SimulateRunner;

impl Runner for SimulateRunner {
    // Not an `async fn`: the future must be 'static (it runs in its own
    // tokio task), so it must not borrow `self`.
    #[allow(clippy::manual_async_fn)]
    fn run(
        &self,
        request: Arc<TaskRequest>,
        ctx: TaskContext,
    ) -> impl Future<Output = Result<Vec<TaskFile>, RunError>> + Send + 'static {
        async move {
            let sim = match request.kwargs.get("simulate") {
                None | Some(Value::Null) => Simulation::default(),
                Some(v) => Simulation::deserialize(v)
                    .map_err(|e| TaskError::runtime(format!("invalid simulate parameters: {e}")))?,
            };
            if sim.sleep.is_finite() && sim.sleep > 0.0 {
                let nap = Duration::from_secs_f64(sim.sleep.min(86_400.0));
                tokio::select! {
                    _ = tokio::time::sleep(nap) => {}
                    _ = ctx.cancel.cancelled() => return Err(RunError::Cancelled),
                }
            }
            if sim.panic {
                panic!("simulated panic requested by task {}", ctx.task_id);
            }
            if let Some(message) = sim.fail {
                return Err(TaskError::runtime(message).into());
            }
            Ok(sim.files.unwrap_or_else(|| {
                vec![TaskFile {
                    name: format!("simulated_{}.zim", ctx.task_id),
                    size: 1024,
                }]
            }))
        }
    }
}
