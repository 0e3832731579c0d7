//! The seam between the worker and what a task actually does.
//!
//! The worker accepts, schedules, reports and acks tasks; a [`Runner`] runs
//! one. This module owns that contract (what a runner gets, what it returns)
//! and the [`Planner`]s that turn a decoded Celery request into the plan a
//! runner gets (so no runner ever sees a Celery message): the
//! [`OfflinerPlanner`] of the Docker pipeline, and the [`SimulatePlanner`]
//! of the [`SimulateRunner`], which stands in for the Docker pipeline in
//! tests and benchmarks; and a task's [`Cancellation`]: the token a runner
//! watches, carrying why it fired. It must not touch the broker: a runner
//! reports through [`TaskContext`], in the domain's words of
//! [`crate::report`], and the context hands its container events as Celery
//! events to a [`TaskEvents`] (the worker's [`EventSink`], `run-task`'s
//! terminal).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::celery::{EventKind, TaskRequest};
use crate::events::EventSink;
use crate::offliner::{self, AllowList};
use crate::progress::{Stage, TaskProgress};
pub use crate::report::{ContainerEvent, TaskError};

/// One file a task produced (and, with the warehouse, uploaded).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct TaskFile {
    pub name: String,
    pub size: u64,
}

/// How a run ended, short of success.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
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
    /// The worker stops for good (SIGQUIT, remote `shutdown`): the runner
    /// stops and removes what it started; the message goes back to the
    /// queue.
    Shutdown,
    /// The worker leaves for a while (SIGTERM, SIGINT: a restart, an
    /// upgrade): the runner stops *watching* the task and returns
    /// [`RunError::Cancelled`] at once, leaving what runs (containers, task
    /// dir, the task's state on disk) for the next start of this node to
    /// adopt ([`Runner::kept`]). The message goes back to the queue.
    Leave,
    /// The task had not started and its message went back to the broker
    /// with the session it came on (a lost connection): it is dropped here,
    /// without an event, for whichever node the broker gives the message
    /// to. Never fired on a running task.
    MessageReturned,
    /// Another node took the task over while this node could not hear the
    /// farm (see [`crate::farm`]): the runner stops and removes what it
    /// started, as for [`CancelReason::Shutdown`]; nothing is reported and
    /// the message goes back to the broker.
    TakenOver,
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

    /// Whether `other` is a clone of this one (the same task's).
    pub fn same_as(&self, other: &Cancellation) -> bool {
        Arc::ptr_eq(&self.reason, &other.reason)
    }

    /// The token to hand to what watches it (an upload, a helper task).
    pub fn token(&self) -> &CancellationToken {
        &self.token
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

/// What a runner gets besides its plan.
#[derive(Clone)]
pub struct TaskContext {
    /// Fires on revoke, time limit and shutdown, with its reason. A runner
    /// stops what it started (containers...) and returns
    /// [`RunError::Cancelled`]; on [`CancelReason::Leave`] it leaves them.
    pub cancel: Cancellation,
    pub task_id: String,
    /// What the worker needs to carry the task on after a restart (its
    /// request, where its message came from), opaque to the runner: it
    /// stores it with the task's state, as is, and hands it back in
    /// [`KeptTask::carry`]. `None`: nothing to store (`run-task`).
    pub carry: Option<Arc<Value>>,
    /// When the task started running, as epoch seconds: now for a fresh
    /// task, the first run's start for an adopted one. The runner stores a
    /// fresh task's start with its state.
    pub started_at: f64,
    /// Where the task is and how it goes, written by the runner (its
    /// stage, its readings), read by the worker (`task-progress` events,
    /// `inspect`, `ps`, metrics). See [`crate::progress`].
    pub progress: TaskProgress,
    events: Arc<dyn TaskEvents>,
    /// What the worker checks before the task uploads (see
    /// [`TaskContext::before_upload`]).
    before_upload: Option<BeforeUpload>,
}

/// The worker's check before a task uploads: `Err(RunError::Cancelled)`
/// when the task must not upload (its cancellation fired, with its reason).
pub type BeforeUpload =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), RunError>> + Send>> + Send + Sync>;

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
        let started_at = crate::celery::now_timestamp();
        Self {
            cancel,
            task_id,
            carry: None,
            started_at,
            progress: TaskProgress::new(started_at),
            events,
            before_upload: None,
        }
    }

    /// This context, with the worker's check before an upload.
    pub fn checking_uploads(mut self, check: BeforeUpload) -> Self {
        self.before_upload = Some(check);
        self
    }

    /// Awaited by a runner right before it uploads what the task made:
    /// the worker may hold it there (this node could not hear the farm for
    /// a long while and asks whether another node took the task over).
    /// `Err(RunError::Cancelled)`: do not upload; the cancellation fired
    /// ([`CancelReason::TakenOver`]) and the runner stops as it does on
    /// any cancellation. Without a check (`run-task`, tests): `Ok` at once.
    pub async fn before_upload(&self) -> Result<(), RunError> {
        match &self.before_upload {
            Some(check) => check().await,
            None => Ok(()),
        }
    }

    /// This context, with what the worker needs stored with the task's
    /// state, and when the task started running.
    pub fn carrying(mut self, carry: Arc<Value>, started_at: f64) -> Self {
        self.carry = Some(carry);
        self.started_at = started_at;
        self.progress.set_started(started_at);
        self
    }

    /// This context, reporting into `progress` (the worker's handle on
    /// the task's progress), which takes the context's start.
    pub fn with_progress(mut self, progress: TaskProgress) -> Self {
        progress.set_started(self.started_at);
        self.progress = progress;
        self
    }

    /// Sends `task-progress` events of the task's progress (see
    /// [`crate::progress::report`]) until dropped.
    pub fn report_progress(&self, interval: Duration) -> impl Future<Output = ()> + Send + 'static {
        let (events, task_id) = (self.events.clone(), self.task_id.clone());
        crate::progress::report(self.progress.clone(), interval, move |snapshot| {
            events.emit(EventKind::progress(&task_id, &snapshot));
        })
    }

    /// Sends an event of the task's container.
    pub fn emit(&self, event: ContainerEvent) {
        self.events
            .emit(EventKind::container(&self.task_id, &event));
    }
}

/// A task an earlier run of this node left running (SIGTERM, a crash), as
/// [`Runner::kept`] found it on disk and in the engine.
#[derive(Debug, Clone)]
pub struct KeptTask {
    pub task_id: String,
    /// What the worker stored through [`TaskContext::carry`].
    pub carry: Value,
    /// When it started running (epoch seconds, [`TaskContext::started_at`]).
    pub started_at: f64,
    /// How long it has run, measured with the boot clock when this boot
    /// started it (a wall-clock jump cannot change it).
    pub age: Duration,
    /// Where it is: `prepare`, `generate` or `upload`.
    pub stage: &'static str,
    /// What it runs (the offliner's image), for the start-up line.
    pub offliner: String,
}

/// What an earlier run of this node left: the tasks that can be carried
/// on, and how long the node was away.
#[derive(Debug, Clone, Default)]
pub struct KeptTasks {
    pub tasks: Vec<KeptTask>,
    /// How long no worker of this node ran: from the alive-time the last
    /// one kept on disk ([`Runner::alive`]) to now, with the boot id and the
    /// boot clock when it is the same boot. `None`: no earlier run on record.
    pub away: Option<Duration>,
}

/// Decides, from a decoded request and before anything runs, what running
/// the task means for one kind of runner; or why it can't run, which fails
/// the task with that error.
pub trait Planner: Send + Sync + 'static {
    /// What the runner gets instead of the request.
    type Plan: Send + 'static;

    fn plan(&self, request: &TaskRequest) -> Result<Self::Plan, TaskError>;
}

/// The plan runner `R` gets: what its planner makes of a request.
pub type TaskPlan<R> = <<R as Runner>::Planner as Planner>::Plan;

/// The Docker pipeline's planner: the offliner task table (see
/// [`crate::offliner`]), with the image allow-list and the address of the
/// task's redis that mwoffliner is given.
#[derive(Debug, Clone)]
pub struct OfflinerPlanner {
    pub allow: AllowList,
    pub redis_url: String,
}

impl Planner for OfflinerPlanner {
    type Plan = offliner::TaskPlan;

    fn plan(&self, request: &TaskRequest) -> Result<offliner::TaskPlan, TaskError> {
        offliner::plan(request, &self.allow, &self.redis_url).map_err(|e| TaskError::Refused {
            reason: e.to_string(),
        })
    }
}

/// Runs one task. The worker runs the returned future in its own tokio task
/// and always awaits it to the end, so a runner can clean up after
/// cancellation before returning.
pub trait Runner: Send + Sync + 'static {
    type Planner: Planner;

    /// Who makes this runner's plans.
    fn planner(&self) -> &Self::Planner;

    /// The plan for `request`, or why it is refused. The worker plans each
    /// task as it starts it, and fails it with the refusal.
    fn plan(&self, request: &TaskRequest) -> Result<TaskPlan<Self>, TaskError> {
        self.planner().plan(request)
    }

    fn run(
        &self,
        plan: TaskPlan<Self>,
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
    /// The Docker pipeline removes the containers labelled for this node,
    /// but those of the tasks in `keep` (adopted, or kept until their
    /// message says whether they run here), each removal with one log line
    /// saying why. The default does nothing.
    fn claim_node(&self, keep: &[String]) -> impl Future<Output = ()> + Send {
        let _ = keep;
        std::future::ready(())
    }

    /// At start, before the worker computes its prefetch or takes a
    /// message, and before it holds the node's name: the tasks an earlier
    /// run of this node left that can be carried on (read only: nothing
    /// is removed or started here), and how long the node was away. The
    /// worker then runs each adopted one through [`Runner::run`] with its
    /// plan, and the runner carries it on from the stage its state says.
    /// The default finds nothing.
    fn kept(&self) -> impl Future<Output = KeptTasks> + Send {
        std::future::ready(KeptTasks::default())
    }

    /// Whether [`CancelReason::Leave`] leaves this runner's tasks running
    /// for the next start (the Docker pipeline's do; a simulated task just
    /// stops).
    fn keeps_on_leave(&self) -> bool {
        false
    }

    /// Stops and removes a kept task that is not carried on (the node was
    /// away too long and its message did not come back here): its
    /// containers, its dirs and its state. Nothing is sent for it. The
    /// default does nothing.
    fn forsake(&self, task_id: &str) -> impl Future<Output = ()> + Send + 'static {
        let _ = task_id;
        std::future::ready(())
    }

    /// Called every few seconds while the worker runs: the runner keeps an
    /// alive-time on disk, from which the next start measures how long the
    /// node was away ([`KeptTasks::away`]). The default does nothing.
    fn alive(&self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }
}

/// What a simulated task does, from the message's `simulate` kwarg:
/// `{"sleep": 1.5, "fail": "message", "panic": false, "files": [{"name", "size"}]}`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Simulation {
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

/// Plans simulated tasks: reads the `simulate` kwarg.
#[derive(Debug, Default, Clone)]
pub struct SimulatePlanner;

impl Planner for SimulatePlanner {
    type Plan = Simulation;

    fn plan(&self, request: &TaskRequest) -> Result<Simulation, TaskError> {
        match request.kwargs.get("simulate") {
            None | Some(Value::Null) => Ok(Simulation::default()),
            Some(v) => Simulation::deserialize(v)
                .map_err(|e| TaskError::runtime(format!("invalid simulate parameters: {e}"))),
        }
    }
}

impl Runner for SimulateRunner {
    type Planner = SimulatePlanner;

    fn planner(&self) -> &SimulatePlanner {
        &SimulatePlanner
    }

    // Not an `async fn`: the future must be 'static (it runs in its own
    // tokio task), so it must not borrow `self`.
    #[allow(clippy::manual_async_fn)]
    fn run(
        &self,
        sim: Simulation,
        ctx: TaskContext,
    ) -> impl Future<Output = Result<Vec<TaskFile>, RunError>> + Send + 'static {
        async move {
            ctx.progress.set_stage(Stage::Generate);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::celery::request_from_json;

    fn request(text: &str) -> TaskRequest {
        request_from_json(text).expect("a task message")
    }

    #[test]
    fn an_offliner_task_the_table_refuses_is_refused() {
        let planner = OfflinerPlanner {
            allow: AllowList::default(),
            redis_url: "/run/redis/redis.sock".to_owned(),
        };
        let refused = planner.plan(&request(
            r#"{"task": "offliner.nope", "id": "abc", "kwargs": {"warehouse_path": "/v"}}"#,
        ));
        let Err(TaskError::Refused { reason }) = refused else {
            panic!("{refused:?}");
        };
        assert!(reason.contains("not registered on this worker"), "{reason}");
        let plan = planner
            .plan(&request(
                r#"{"task": "offliner.youtube", "id": "abc", "kwargs": {"warehouse_path": "/v"}}"#,
            ))
            .expect("a plan");
        assert_eq!(plan.warehouse_path, "/v");
    }

    #[test]
    fn a_simulation_is_planned_from_its_kwarg() {
        let plan = |kwargs: &str| {
            SimulateRunner.plan(&request(&format!(
                r#"{{"task": "t", "id": "abc", "kwargs": {kwargs}}}"#
            )))
        };
        assert!(plan("{}").is_ok());
        let sim = plan(r#"{"simulate": {"fail": "boom"}}"#).expect("a plan");
        assert_eq!(sim.fail.as_deref(), Some("boom"));
        let Err(TaskError::Runtime(message)) = plan(r#"{"simulate": {"nap": 1}}"#) else {
            panic!("an unknown field is refused");
        };
        assert!(
            message.starts_with("invalid simulate parameters"),
            "{message}"
        );
    }
}
