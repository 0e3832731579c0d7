//! The worker's Prometheus metrics and its health verdict: what is counted,
//! under which names and labels, and when the worker counts as healthy.
//!
//! One process-wide [`Metrics`] ([`global`]): the worker, the pipeline and
//! the uploader record into it with cheap atomic updates. It must not do
//! I/O or decide anything about tasks; serving it over HTTP is the
//! `monitor` module's job.

use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::offliner::Offliner;

/// Every metric name starts with this.
pub const PREFIX: &str = "zimfarm_worker";

/// The worker sends a heartbeat every 2 s; with none confirmed by the
/// broker for this long, the worker is unhealthy.
pub const HEARTBEAT_STALE_SECS: f64 = 10.0;

/// Stage durations: from half a second (a task refused in prepare) to four
/// days (a full Wikipedia).
const STAGE_BUCKETS: [f64; 15] = [
    0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 10800.0, 21600.0, 43200.0, 86400.0,
    172800.0, 345600.0,
];

/// How a task ended here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    Revoked,
    /// Never run: an unregistered task, or a message that could not be
    /// read or was too large.
    Rejected,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Revoked => "revoked",
            Self::Rejected => "rejected",
        }
    }
}

/// The pipeline's stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Prepare,
    Generate,
    Upload,
}

impl Stage {
    pub fn label(self) -> &'static str {
        match self {
            Self::Prepare => "prepare",
            Self::Generate => "generate",
            Self::Upload => "upload",
        }
    }
}

/// Why a kept task dir was swept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepReason {
    /// Older than `KEPT_DIR_MAX_AGE`.
    Age,
    /// A task needed the space (`MIN_FREE_DISK_MB`).
    Pressure,
    /// Of the layout before `ZIM_DIR/.zimfarm`: its marker and journals lay
    /// within the scraper's reach, so nothing in it can be trusted.
    OldLayout,
}

impl SweepReason {
    pub fn label(self) -> &'static str {
        match self {
            Self::Age => "age",
            Self::Pressure => "pressure",
            Self::OldLayout => "old_layout",
        }
    }
}

/// What became of a redelivered message for a task this node neither ran
/// nor ended (see [`crate::farm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redelivery {
    /// Another node ended the task: acked without running.
    EndedElsewhere,
    /// Nobody had it, or its node let it go: run here.
    RanHere,
    /// Held until this node's session ended: back to the broker.
    Returned,
}

impl Redelivery {
    pub fn label(self) -> &'static str {
        match self {
            Self::EndedElsewhere => "ended_elsewhere",
            Self::RanHere => "ran_here",
            Self::Returned => "returned",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SweepLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    task: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
}

/// A running task's series: its id is a label only while it runs.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskIdLabels {
    task_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskStageLabels {
    task_id: String,
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    version: &'static str,
    node: String,
}

fn stage_histogram() -> Histogram {
    Histogram::new(STAGE_BUCKETS)
}

/// The worker's metrics.
pub struct Metrics {
    registry: Registry,
    info: Family<InfoLabels, Gauge>,
    tasks: Family<TaskLabels, Counter>,
    stages: Family<StageLabels, Histogram, fn() -> Histogram>,
    uploaded_bytes: Counter,
    upload_streams: Gauge,
    upload_stream_retries: Counter,
    early_uploads: Counter,
    early_upload_seconds: Counter<f64, AtomicU64>,
    active_tasks: Gauge,
    broker_connected: Gauge,
    broker_reconnects: Counter,
    delivery_timeouts: Counter,
    redeliveries: Family<VerdictLabels, Counter>,
    docker_errors: Counter,
    kept_dirs_swept: Family<SweepLabels, Counter>,
    kept_dirs_swept_bytes: Family<SweepLabels, Counter>,
    kept_tasks_adopted: Counter,
    tasks_taken_over: Counter,
    kept_tasks_removed: Family<SweepLabels, Counter>,
    last_heartbeat: Gauge<f64, AtomicU64>,
    task_progress_ratio: Family<TaskIdLabels, Gauge<f64, AtomicU64>>,
    task_stage: Family<TaskStageLabels, Gauge>,
    task_uploaded_bytes: Family<TaskIdLabels, Gauge>,
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let info = Family::<InfoLabels, Gauge>::default();
        let tasks = Family::<TaskLabels, Counter>::default();
        let stages: Family<StageLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(stage_histogram);
        let uploaded_bytes = Counter::default();
        let upload_streams = Gauge::default();
        let upload_stream_retries = Counter::default();
        let early_uploads = Counter::default();
        let early_upload_seconds = Counter::<f64, AtomicU64>::default();
        let active_tasks = Gauge::default();
        let broker_connected = Gauge::default();
        let broker_reconnects = Counter::default();
        let delivery_timeouts = Counter::default();
        let redeliveries = Family::<VerdictLabels, Counter>::default();
        let docker_errors = Counter::default();
        let kept_dirs_swept = Family::<SweepLabels, Counter>::default();
        let kept_dirs_swept_bytes = Family::<SweepLabels, Counter>::default();
        let last_heartbeat = Gauge::<f64, AtomicU64>::default();
        let kept_tasks_adopted = Counter::default();
        let tasks_taken_over = Counter::default();
        let kept_tasks_removed = Family::<SweepLabels, Counter>::default();
        let task_progress_ratio = Family::<TaskIdLabels, Gauge<f64, AtomicU64>>::default();
        let task_stage = Family::<TaskStageLabels, Gauge>::default();
        let task_uploaded_bytes = Family::<TaskIdLabels, Gauge>::default();
        registry.register(
            "task_progress_ratio",
            "A running task's progress between 0 and 1: the scraper's done/total in generate, \
             bytes sent of the total in upload (series removed when the task ends)",
            task_progress_ratio.clone(),
        );
        registry.register(
            "task_stage",
            "1 for the stage a running task is in (prepare, generate, upload; series removed \
             when the task ends)",
            task_stage.clone(),
        );
        registry.register(
            "task_uploaded_bytes",
            "Bytes of a running task's files the warehouse has (series removed when the task ends)",
            task_uploaded_bytes.clone(),
        );
        registry.register(
            "info",
            "The worker's version and node name (always 1)",
            info.clone(),
        );
        registry.register(
            "tasks",
            "Tasks ended here, by task name and outcome (succeeded, failed, revoked, rejected)",
            tasks.clone(),
        );
        registry.register(
            "stage_duration_seconds",
            "Time spent in each pipeline stage (prepare, generate, upload), whatever its outcome",
            stages.clone(),
        );
        registry.register(
            "uploaded_bytes",
            "Bytes the warehouse confirmed writing, over every attempt",
            uploaded_bytes.clone(),
        );
        registry.register(
            "upload_streams",
            "SSH connections writing the file being uploaded now",
            upload_streams.clone(),
        );
        registry.register(
            "upload_stream_retries",
            "Upload streams that broke and reconnected on their own while the others went on",
            upload_stream_retries.clone(),
        );
        registry.register(
            "early_uploads",
            "ZIMs uploaded while their scraper still ran",
            early_uploads.clone(),
        );
        registry.register(
            "early_upload_seconds",
            "Seconds spent uploading ZIMs while their scraper still ran: time the tasks did not \
             spend uploading after the scraper's exit",
            early_upload_seconds.clone(),
        );
        registry.register(
            "active_tasks",
            "Tasks running now (holding a slot)",
            active_tasks.clone(),
        );
        registry.register(
            "broker_connected",
            "1 while the worker holds a live broker session, else 0",
            broker_connected.clone(),
        );
        registry.register(
            "broker_reconnects",
            "Broker sessions opened again after a loss",
            broker_reconnects.clone(),
        );
        registry.register(
            "broker_delivery_timeouts",
            "Consuming channels the broker closed because a task's message stayed unacked past its \
             consumer_timeout (the message was requeued)",
            delivery_timeouts.clone(),
        );
        registry.register(
            "redeliveries_held",
            "Redelivered messages of tasks not run nor ended here, held while the farm was asked, \
             by verdict (ended_elsewhere: acked without running; ran_here; returned: went back to \
             the broker with this node's session)",
            redeliveries.clone(),
        );
        registry.register(
            "docker_errors",
            "Docker engine calls that failed (a task failed by it, or a cleanup that did not work)",
            docker_errors.clone(),
        );
        registry.register(
            "kept_dirs_swept",
            "Kept task dirs removed by the sweep, by reason (age, pressure)",
            kept_dirs_swept.clone(),
        );
        registry.register(
            "kept_dirs_swept_bytes",
            "Disk space freed by sweeping kept task dirs, by reason (age, pressure)",
            kept_dirs_swept_bytes.clone(),
        );
        registry.register(
            "kept_tasks_adopted",
            "Tasks an earlier run of this worker left running (a restart, an upgrade, a crash) \
             that this run carried on",
            kept_tasks_adopted.clone(),
        );
        registry.register(
            "tasks_taken_over",
            "Tasks dropped here because another node took them over while this node could not hear the farm",
            tasks_taken_over.clone(),
        );
        registry.register(
            "kept_tasks_removed",
            "Tasks an earlier run of this worker left that this run stopped and removed instead \
             of carrying on, by reason (no_record, unreadable, not_followable, away_too_long)",
            kept_tasks_removed.clone(),
        );
        registry.register(
            "last_heartbeat_timestamp_seconds",
            "When the broker last confirmed a worker heartbeat (Unix time; 0 before the first)",
            last_heartbeat.clone(),
        );
        Self {
            registry,
            info,
            tasks,
            stages,
            uploaded_bytes,
            upload_streams,
            upload_stream_retries,
            early_uploads,
            early_upload_seconds,
            active_tasks,
            broker_connected,
            broker_reconnects,
            delivery_timeouts,
            redeliveries,
            docker_errors,
            kept_dirs_swept,
            kept_dirs_swept_bytes,
            kept_tasks_adopted,
            tasks_taken_over,
            kept_tasks_removed,
            last_heartbeat,
            task_progress_ratio,
            task_stage,
            task_uploaded_bytes,
        }
    }

    /// A running task's progress, as its last `task-progress` event said.
    pub fn task_progress(&self, task_id: &str, snapshot: &crate::progress::Snapshot) {
        let id = || TaskIdLabels {
            task_id: task_id.to_owned(),
        };
        if let Some(ratio) = snapshot.progress {
            self.task_progress_ratio.get_or_create(&id()).set(ratio);
        }
        for stage in crate::progress::Stage::ALL {
            let labels = TaskStageLabels {
                task_id: task_id.to_owned(),
                stage: stage.label(),
            };
            if snapshot.stage == Some(stage) {
                self.task_stage.get_or_create(&labels).set(1);
            } else {
                self.task_stage.remove(&labels);
            }
        }
        if let Some(sent) = snapshot.upload_sent {
            self.task_uploaded_bytes
                .get_or_create(&id())
                .set(i64::try_from(sent).unwrap_or(i64::MAX));
        }
    }

    /// A task's run is over: its series go.
    pub fn task_progress_ended(&self, task_id: &str) {
        let id = TaskIdLabels {
            task_id: task_id.to_owned(),
        };
        self.task_progress_ratio.remove(&id);
        self.task_uploaded_bytes.remove(&id);
        for stage in crate::progress::Stage::ALL {
            self.task_stage.remove(&TaskStageLabels {
                task_id: task_id.to_owned(),
                stage: stage.label(),
            });
        }
    }

    /// The `info` series: this build's version and the node name.
    pub fn set_info(&self, node: &str) {
        self.info
            .get_or_create(&InfoLabels {
                version: env!("CARGO_PKG_VERSION"),
                node: node.to_owned(),
            })
            .set(1);
    }

    /// A task ended. Unregistered names are counted as `unknown`, so a
    /// stream of junk messages cannot grow the label set.
    pub fn task_ended(&self, task: &str, outcome: Outcome) {
        let task = Offliner::from_task_name(task).map_or("unknown", |o| o.task_name());
        self.tasks
            .get_or_create(&TaskLabels {
                task,
                outcome: outcome.label(),
            })
            .inc();
    }

    /// A stage took `seconds`.
    pub fn stage_done(&self, stage: Stage, seconds: f64) {
        self.stages
            .get_or_create(&StageLabels {
                stage: stage.label(),
            })
            .observe(seconds);
    }

    pub fn upload_streams(&self, streams: usize) {
        self.upload_streams.set(streams as i64);
    }

    pub fn early_upload(&self, seconds: f64) {
        self.early_uploads.inc();
        self.early_upload_seconds.inc_by(seconds);
    }

    pub fn upload_stream_retry(&self) {
        self.upload_stream_retries.inc();
    }

    pub fn uploaded(&self, bytes: u64) {
        self.uploaded_bytes.inc_by(bytes);
    }

    /// A task took a slot; it counts as active until the guard is dropped.
    pub fn task_running(&self) -> ActiveTask<'_> {
        self.active_tasks.inc();
        ActiveTask { metrics: self }
    }

    /// A broker session is live; `reconnect` when it replaces a lost one.
    pub fn broker_up(&self, reconnect: bool) {
        self.broker_connected.set(1);
        if reconnect {
            self.broker_reconnects.inc();
        }
    }

    pub fn broker_down(&self) {
        self.broker_connected.set(0);
    }

    /// The broker closed the consuming channel for a delivery left unacked
    /// past its `consumer_timeout`.
    pub fn delivery_timeout(&self) {
        self.delivery_timeouts.inc();
    }

    /// A held redelivery was resolved.
    pub fn redelivery(&self, verdict: Redelivery) {
        self.redeliveries
            .get_or_create(&VerdictLabels {
                verdict: verdict.label(),
            })
            .inc();
    }

    pub fn docker_error(&self) {
        self.docker_errors.inc();
    }

    /// A kept task dir taking `bytes` was swept.
    pub fn kept_dir_swept(&self, reason: SweepReason, bytes: u64) {
        let labels = SweepLabels {
            reason: reason.label(),
        };
        self.kept_dirs_swept.get_or_create(&labels).inc();
        self.kept_dirs_swept_bytes
            .get_or_create(&labels)
            .inc_by(bytes);
    }

    /// The broker confirmed a worker heartbeat (or `worker-online`).
    /// A kept task was adopted at start.
    pub fn kept_task_adopted(&self) {
        self.kept_tasks_adopted.inc();
    }

    /// A task was dropped here: another node took it over while this node
    /// could not hear the farm (see [`crate::farm`]).
    pub fn task_taken_over(&self) {
        self.tasks_taken_over.inc();
    }

    /// A kept task was stopped and removed instead of adopted, for
    /// `reason` (a short snake_case label).
    pub fn kept_task_removed(&self, reason: &'static str) {
        self.kept_tasks_removed
            .get_or_create(&SweepLabels { reason })
            .inc();
    }

    pub fn heartbeat_confirmed(&self) {
        self.last_heartbeat.set(unix_now());
    }

    /// The metrics in the OpenMetrics text format (which Prometheus
    /// scrapes, and whose lines are valid Prometheus text).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Healthy while the broker session is up and heartbeats reach it.
    pub fn health(&self) -> Health {
        let last = self.last_heartbeat.get();
        let heartbeat_age = (last > 0.0).then(|| (unix_now() - last).max(0.0));
        Health::judge(self.broker_connected.get() == 1, heartbeat_age)
    }
}

/// Decrements the active-task gauge when dropped.
pub struct ActiveTask<'a> {
    metrics: &'a Metrics,
}

impl Drop for ActiveTask<'_> {
    fn drop(&mut self) {
        self.metrics.active_tasks.dec();
    }
}

/// The answer of `/healthz`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Health {
    pub healthy: bool,
    pub broker_connected: bool,
    /// Seconds since the broker last confirmed a heartbeat; `None` before
    /// the first.
    pub heartbeat_age_seconds: Option<f64>,
    /// Why it is unhealthy; `None` when healthy.
    pub problem: Option<String>,
}

impl Health {
    pub fn judge(broker_connected: bool, heartbeat_age: Option<f64>) -> Self {
        let problem = if !broker_connected {
            Some("no broker connection; the worker is reconnecting (see its log)".to_owned())
        } else {
            match heartbeat_age {
                None => Some("no heartbeat confirmed by the broker yet".to_owned()),
                Some(age) if age > HEARTBEAT_STALE_SECS => Some(format!(
                    "the broker has confirmed no heartbeat for {age:.0} s"
                )),
                Some(_) => None,
            }
        };
        Self {
            healthy: problem.is_none(),
            broker_connected,
            heartbeat_age_seconds: heartbeat_age.map(|a| (a * 10.0).round() / 10.0),
            problem,
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_needs_the_broker_and_fresh_heartbeats() {
        assert!(Health::judge(true, Some(1.0)).healthy);
        let down = Health::judge(false, Some(1.0));
        assert!(!down.healthy);
        assert!(down.problem.unwrap().contains("broker"));
        assert!(!Health::judge(true, None).healthy);
        let stale = Health::judge(true, Some(HEARTBEAT_STALE_SECS + 5.0));
        assert!(!stale.healthy);
        assert!(stale.problem.unwrap().contains("15 s"));
    }

    #[test]
    fn a_fresh_registry_is_unhealthy_until_connected_and_beating() {
        let m = Metrics::new();
        assert!(!m.health().healthy);
        m.broker_up(false);
        assert!(!m.health().healthy);
        m.heartbeat_confirmed();
        assert!(m.health().healthy);
        m.broker_down();
        assert!(!m.health().healthy);
    }

    #[test]
    fn a_task_has_its_progress_series_only_while_it_runs() {
        use crate::progress::{Snapshot, Stage as Progress};
        let m = Metrics::new();
        let generating = Snapshot {
            stage: Some(Progress::Generate),
            progress: Some(0.25),
            ..Snapshot::default()
        };
        m.task_progress("t1", &generating);
        let text = m.encode();
        for line in [
            "zimfarm_worker_task_progress_ratio{task_id=\"t1\"} 0.25",
            "zimfarm_worker_task_stage{task_id=\"t1\",stage=\"generate\"} 1",
        ] {
            assert!(text.contains(line), "{line} not in:\n{text}");
        }
        let uploading = Snapshot {
            stage: Some(Progress::Upload),
            progress: Some(0.5),
            upload_sent: Some(2048),
            ..Snapshot::default()
        };
        m.task_progress("t1", &uploading);
        let text = m.encode();
        assert!(!text.contains("stage=\"generate\""), "{text}");
        assert!(
            text.contains("zimfarm_worker_task_uploaded_bytes{task_id=\"t1\"} 2048"),
            "{text}"
        );
        m.task_progress_ended("t1");
        assert!(!m.encode().contains("t1"), "{}", m.encode());
    }

    #[test]
    fn encoding_names_every_metric_with_its_labels() {
        let m = Metrics::new();
        m.set_info("node1");
        m.task_ended("offliner.mwoffliner", Outcome::Succeeded);
        m.task_ended("offliner.mwoffliner", Outcome::Succeeded);
        m.task_ended("evil.task.with.a.long.name", Outcome::Rejected);
        m.stage_done(Stage::Upload, 2.0);
        m.uploaded(1234);
        m.broker_up(true);
        m.docker_error();
        m.kept_dir_swept(SweepReason::Pressure, 4096);
        {
            let _a = m.task_running();
            assert!(m.encode().contains("zimfarm_worker_active_tasks 1\n"));
        }
        let text = m.encode();
        for line in [
            "zimfarm_worker_tasks_total{task=\"offliner.mwoffliner\",outcome=\"succeeded\"} 2",
            "zimfarm_worker_tasks_total{task=\"unknown\",outcome=\"rejected\"} 1",
            "zimfarm_worker_stage_duration_seconds_count{stage=\"upload\"} 1",
            "zimfarm_worker_stage_duration_seconds_bucket{le=\"5.0\",stage=\"upload\"} 1",
            "zimfarm_worker_uploaded_bytes_total 1234",
            "zimfarm_worker_active_tasks 0",
            "zimfarm_worker_broker_connected 1",
            "zimfarm_worker_broker_reconnects_total 1",
            "zimfarm_worker_docker_errors_total 1",
            "zimfarm_worker_kept_dirs_swept_total{reason=\"pressure\"} 1",
            "zimfarm_worker_kept_dirs_swept_bytes_total{reason=\"pressure\"} 4096",
            "zimfarm_worker_info{version=\"",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
