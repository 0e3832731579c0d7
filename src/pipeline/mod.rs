//! The stages of one task on the Docker engine: **prepare** (task dir, free
//! disk, images, the redis helper), **generate** (the offliner container,
//! its log, idle timeout, how it ended: a kill for memory or by SIGKILL is
//! said as such; each finished ZIM uploaded while it runs, see
//! [`crate::early`]), **upload** (the files not sent early, and the log, to
//! the warehouse; a file sent early and changed since fails the task) and
//! **cleanup** (every container of the task removed on every path, panics
//! included; the task dir once its files are uploaded).
//!
//! A scrape outlives the worker (SPEC §8): the task's record
//! ([`crate::taskfs::record`]) says where it is, and a run starts from the
//! stage it says, for a fresh task and for one an earlier run of this node
//! left alike: none or prepare → afresh; generate with its offliner still
//! there (running or exited) → following it on from the log cursor;
//! upload → upload (the journals make it exact). On
//! [`CancelReason::Leave`] a run leaves its containers, dirs and record as
//! they are and returns at once; on any other cancel it removes them.
//!
//! The task dir (`ZIM_DIR/<id>`) is the scraper's: it is read only through
//! its handle, without following links ([`crate::taskfs`]). The worker's
//! own files of the task (the container log, the task record, the upload
//! journals) live in `ZIM_DIR/.zimfarm/<id>/`, which no container sees; it
//! goes and stays with the task dir.
//!
//! Free disk: before refusing a task for `MIN_FREE_DISK_MB` it has the
//! [`Sweeper`] remove kept task dirs (a task's own dir is claimed for its
//! whole run, so it is never swept); a scrape that fails with ZIM_DIR full
//! is reported as the disk having filled up.
//!
//! Here: the runner and its stages. Beside it: `confine.rs` (capabilities,
//! pids limits and dir modes of the task's containers), `follow.rs` (the
//! offliner's output into the log, from cursors), `containers.rs` (its
//! tails, how it ended; the task's containers removed), `sample.rs` (the
//! generate stage's progress readings), `kept.rs` (what an
//! earlier run left: carried on or removed), `redis.rs` (the redis helper
//! and the wait on its socket) and `output.rs` (produced files, the log,
//! journals' names, the upload).
//!
//! Owns the task dir and the task's containers. It must not decode messages
//! or publish anything itself (it never imports `celery`): it works from an
//! offliner [`TaskPlan`], which [`OfflinerPlanner`] made from the request,
//! and reports through the runner's [`TaskContext`] in the words of
//! [`crate::report`]; what the worker needs to carry a task on is an opaque
//! carry it stores as is.

mod confine;
mod containers;
mod follow;
pub mod kept;
mod output;
mod redis;
mod sample;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use crate::config::PipelineSettings;
use crate::docker::{ContainerSpec, DockerClient, LABEL_NODE, LABEL_ROLE, LABEL_TASK};
use crate::early::EarlyUploads;
use crate::metrics::{self, Stage};
use crate::offliner::TaskPlan;
use crate::progress::Stage as ProgressStage;
use crate::runner::{
    CancelReason, ContainerEvent, KeptTasks, OfflinerPlanner, RunError, Runner, TaskContext,
    TaskError, TaskFile,
};
use crate::scraper_net::ScraperNetwork;
use crate::sweep::{SWEEP_INTERVAL, Sweeper};
use crate::taskfs::OwnDir;
use crate::taskfs::record::{
    Clock, Generating, LogCursor, Stage as RecordStage, TaskRecord, Uploading,
};
use crate::warehouse::Warehouse;
use containers::{Containers, exit_failure};
pub use output::Generated;
use output::{
    compress_log, is_old_layout, open_dir, output_item, own_dir, produced_files, verify_uploading,
};
pub use redis::{REDIS_SOCKET, REDIS_SOCKET_DIR};

/// Name of the directory (in ZIM_DIR) holding the per-task sockets dirs.
const SOCKETS_DIR: &str = ".sockets";
/// How long a failed task waits for its log to reach the warehouse before
/// it reports the failure anyway.
const FAILED_LOG_UPLOAD_LIMIT: Duration = Duration::from_secs(60);

/// Free space in ZIM_DIR under which a failed scrape is reported as the
/// disk having filled up.
const FULL_DISK_BELOW: u64 = 1 << 20;

/// The Docker pipeline as a [`Runner`].
#[derive(Clone)]
pub struct DockerRunner {
    docker: DockerClient,
    /// Makes the offliner plan of each task from its request.
    planner: OfflinerPlanner,
    settings: Arc<PipelineSettings>,
    /// `None`: no upload (`run-task --no-upload`); files stay in the task dir.
    warehouse: Option<Warehouse>,
    /// Sweeps the task dirs kept in ZIM_DIR; knows which ones are in use.
    sweeper: Sweeper,
    /// The network offliners join.
    network: Arc<ScraperNetwork>,
}

/// A task's paths, as the host sees them (for bind mounts) and as this
/// process sees them.
struct TaskDirs {
    zim_dir: PathBuf,
    task_id: String,
    host_task: PathBuf,
    local_task: PathBuf,
    host_sockets: PathBuf,
    local_sockets: PathBuf,
}

impl TaskDirs {
    fn new(settings: &PipelineSettings, task_id: &str) -> Self {
        Self {
            zim_dir: settings.zim_dir.clone(),
            task_id: task_id.to_owned(),
            host_task: settings.working_dir.join(task_id),
            local_task: settings.zim_dir.join(task_id),
            host_sockets: settings.working_dir.join(SOCKETS_DIR).join(task_id),
            local_sockets: settings.zim_dir.join(SOCKETS_DIR).join(task_id),
        }
    }
}

/// What the stages of one run share: the plan, the task's dirs and
/// context, and the containers started so far (the caller removes them on
/// every path).
struct Job<'a> {
    plan: &'a TaskPlan,
    dirs: &'a TaskDirs,
    ctx: &'a TaskContext,
    containers: Containers,
    keeper: &'a mut RecordKeeper,
}

/// Where a run starts, from what the task's record says.
enum Start {
    /// Afresh: no record, or one of a stage that cannot be carried on.
    Prepare,
    /// Following an offliner an earlier run started (running or exited).
    Generate(Generating),
    /// Uploading what an earlier run generated.
    Upload(Generated),
}

/// The task's record as this run keeps it, written into the worker's own
/// dir of the task at each stage and as the log cursor moves. A record
/// that cannot be written is logged, not fatal: the task then cannot be
/// carried on by a later start, and runs again instead.
pub(crate) struct RecordKeeper {
    record: TaskRecord,
    zim_dir: PathBuf,
    own: Option<OwnDir>,
}

impl RecordKeeper {
    async fn save(&mut self) {
        if self.own.is_none() {
            match OwnDir::create_async(&self.zim_dir, &self.record.task_id).await {
                Ok(own) => self.own = Some(own),
                Err(error) => {
                    tracing::warn!(%error, "cannot open the worker's own dir of the task to write its record");
                    return;
                }
            }
        }
        let Some(own) = &self.own else { return };
        if let Err(error) = self.record.save_async(own).await {
            tracing::warn!(%error, "could not write the task record; a restart will not carry this task on");
        }
    }

    async fn set_stage(&mut self, stage: RecordStage) {
        self.record.stage = stage;
        self.save().await;
    }

    pub(crate) async fn save_cursor(&mut self, cursor: LogCursor) {
        if let RecordStage::Generate(g) = &mut self.record.stage {
            g.cursor = cursor;
            self.save().await;
        }
    }
}

fn failed(message: impl Into<String>) -> RunError {
    RunError::Failed(TaskError::runtime(message))
}

impl DockerRunner {
    pub async fn new(
        settings: PipelineSettings,
        warehouse: Option<Warehouse>,
    ) -> Result<Self, crate::scraper_net::NetError> {
        // The boot id, read once, off the runtime: every record's clock
        // uses it.
        let _ = tokio::task::spawn_blocking(crate::taskfs::record::Clock::now).await;
        let docker = DockerClient::connect().await?;
        let network = ScraperNetwork::prepare(&docker, settings.scraper_network.as_deref()).await?;
        network.install_filter().await;
        let sweeper = Sweeper::new(settings.zim_dir.clone(), settings.kept_dir_max_age);
        let planner = OfflinerPlanner {
            allow: settings.image_allowlist.clone(),
            redis_url: REDIS_SOCKET.to_owned(),
        };
        Ok(Self {
            docker,
            planner,
            settings: Arc::new(settings),
            warehouse,
            sweeper,
            network: Arc::new(network),
        })
    }

    /// Removes a task's dir once its end is recorded: its files are
    /// uploaded, or the task was revoked. Keeps it when there is no
    /// warehouse to upload to (`run-task --no-upload`).
    pub async fn remove_task_dir(&self, task_id: &str) {
        if self.warehouse.is_none() || crate::offliner::validate_task_id(task_id).is_err() {
            return;
        }
        let dir = self.settings.zim_dir.join(task_id);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => tracing::info!(dir = %dir.display(), "task dir removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove the task dir")
            }
        }
        remove_own(&self.settings.zim_dir, task_id).await;
    }

    pub fn docker(&self) -> &DockerClient {
        &self.docker
    }

    fn container_name(&self, task_id: &str, role: &str) -> String {
        format!("zimfarm_{}_{}_{}", self.settings.node_name, task_id, role)
    }

    fn labels(&self, task_id: &str, role: &str) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_NODE.to_owned(), self.settings.node_name.clone()),
            (LABEL_TASK.to_owned(), task_id.to_owned()),
            (LABEL_ROLE.to_owned(), role.to_owned()),
        ])
    }

    /// One task, start to end, from the stage its record says (a fresh
    /// task and one an earlier run left run the same code); containers are
    /// removed whatever happens, unless the worker leaves them for its next
    /// start.
    async fn run_task(self, plan: TaskPlan, ctx: TaskContext) -> Result<Vec<TaskFile>, RunError> {
        // The sweeper leaves this task's dir alone until the run ends.
        let _claim = self.sweeper.claim(&plan.task_id).await;
        let dirs = TaskDirs::new(&self.settings, &plan.task_id);
        let found = self.read_record(&dirs).await;
        let started = found
            .as_ref()
            .and_then(|r| r.started.clone())
            .unwrap_or_else(|| Clock::before_now(ctx.started_at));
        let mut keeper = RecordKeeper {
            record: TaskRecord {
                version: crate::taskfs::record::VERSION,
                node: Some(self.settings.node_name.clone()),
                task_id: plan.task_id.clone(),
                carry: ctx.carry.as_deref().cloned(),
                started: Some(started),
                image: plan.image.to_string(),
                stage: RecordStage::Prepare,
            },
            zim_dir: self.settings.zim_dir.clone(),
            own: None,
        };
        let generated = match self.start_from(&dirs, found).await {
            Start::Upload(generated) => {
                // Containers an earlier run left when it stopped between
                // its generate and their removal.
                if let Err(error) = self
                    .docker
                    .remove_labelled(&[
                        (LABEL_NODE, &self.settings.node_name),
                        (LABEL_TASK, &plan.task_id),
                    ])
                    .await
                {
                    metrics::global().docker_error();
                    tracing::warn!(%error, "could not remove the containers an earlier run of this task left");
                }
                tracing::info!(
                    files = generated.files.len(),
                    "an earlier run of this task generated its files already; going straight to upload"
                );
                keeper
                    .set_stage(RecordStage::Upload(Uploading {
                        files: generated.files.clone(),
                        log: generated.log.clone(),
                    }))
                    .await;
                generated
            }
            start => {
                let mut job = Job {
                    plan: &plan,
                    dirs: &dirs,
                    ctx: &ctx,
                    containers: Containers::new(self.docker.clone()),
                    keeper: &mut keeper,
                };
                let outcome = self.stages(&mut job, start).await;
                if matches!(outcome, Err(RunError::Cancelled))
                    && ctx.cancel.reason() == Some(CancelReason::Leave)
                {
                    job.containers.forget();
                    tracing::info!(
                        stage = job.keeper.record.stage.label(),
                        "the worker leaves: the task's containers, dirs and record stay for its next start"
                    );
                    return Err(RunError::Cancelled);
                }
                job.containers.remove_all().await;
                let _ = tokio::fs::remove_dir_all(&dirs.local_sockets).await;
                match outcome {
                    Ok(generated) => {
                        job.keeper
                            .set_stage(RecordStage::Upload(Uploading {
                                files: generated.files.clone(),
                                log: generated.log.clone(),
                            }))
                            .await;
                        generated
                    }
                    Err(e) => {
                        // The log of a failed scrape is what its operator
                        // needs; nothing else of it is worth keeping.
                        if let (Some(warehouse), RunError::Failed(_)) = (&self.warehouse, &e) {
                            self.upload_failed_log(warehouse, &plan, &dirs, &ctx)
                                .instrument(tracing::info_span!("stage", stage = "upload"))
                                .await;
                        }
                        let _ = tokio::fs::remove_dir_all(&dirs.local_task).await;
                        remove_own(&dirs.zim_dir, &dirs.task_id).await;
                        return Err(e);
                    }
                }
            }
        };
        let uploaded = match &self.warehouse {
            // The worker's word first: another node may have taken the
            // task over while this node could not hear the farm.
            Some(_) if let Err(e) = ctx.before_upload().await => Err(e),
            Some(warehouse) => {
                ctx.progress.set_stage(ProgressStage::Upload);
                timed(
                    Stage::Upload,
                    self.upload(warehouse, &plan, &dirs, &generated, &ctx),
                )
                .await
            }
            None => Ok(()),
        };
        if !(matches!(uploaded, Err(RunError::Cancelled))
            && ctx.cancel.reason() == Some(CancelReason::Leave))
        {
            // The task ends here: no later start may carry it on (a
            // redelivery still goes straight to upload from the record).
            keeper.record.carry = None;
            keeper.save().await;
        }
        uploaded.map(|()| generated.files)
    }

    /// The task's record, if it has one this worker can use; an
    /// unreadable one is said and ignored (the task starts afresh).
    async fn read_record(&self, dirs: &TaskDirs) -> Option<TaskRecord> {
        let (zim_dir, task_id) = (dirs.zim_dir.clone(), dirs.task_id.clone());
        let old = {
            let dirs = TaskDirs::new(&self.settings, &dirs.task_id);
            tokio::task::spawn_blocking(move || is_old_layout(&dirs))
                .await
                .unwrap_or(false)
        };
        if old {
            tracing::warn!(
                dir = %dirs.local_task.display(),
                "this task dir is of the layout before ZIM_DIR/.zimfarm: its marker lay within \
                 the scraper's reach and is not trusted; generating again"
            );
            return None;
        }
        let loaded = tokio::task::spawn_blocking(move || TaskRecord::load_from(&zim_dir, &task_id))
            .await
            .map_err(|e| e.to_string());
        match loaded {
            Ok(Ok(record)) => record,
            Ok(Err(error)) => {
                tracing::warn!(%error, "unreadable task record; generating again");
                None
            }
            Err(error) => {
                tracing::warn!(%error, "could not read the task record; generating again");
                None
            }
        }
    }

    /// Where the run starts, from the task's record: an offliner still
    /// there (running or exited) is followed on, files generated are
    /// uploaded; anything else starts afresh.
    async fn start_from(&self, dirs: &TaskDirs, found: Option<TaskRecord>) -> Start {
        match found.map(|r| r.stage) {
            None | Some(RecordStage::Prepare) => Start::Prepare,
            Some(RecordStage::Upload(uploading)) => match verify_uploading(dirs, uploading).await {
                Some(generated) => Start::Upload(generated),
                None => Start::Prepare,
            },
            Some(RecordStage::Generate(g)) => match self.docker.state(&g.offliner).await {
                // Created, never started: the earlier run died between the
                // two. Started now and followed on like any kept offliner
                // (Docker's copy of its output holds it from its first
                // line); taken as exited, it would read as exit code 0
                // with no file, and a scrape lost.
                Ok(Some(state)) if !state.running && state.started_at.is_none() => {
                    tracing::info!(
                        container = %g.offliner,
                        "an earlier run of this task created its offliner but died before starting it; starting it now"
                    );
                    match self.docker.start_existing(&g.offliner).await {
                        Ok(()) => Start::Generate(g),
                        Err(error) => {
                            metrics::global().docker_error();
                            tracing::warn!(%error, container = %g.offliner, "cannot start the offliner an earlier run of this task created; generating again");
                            if let Err(error) = self.docker.kill_and_remove(&g.offliner).await {
                                tracing::warn!(%error, container = %g.offliner, "cannot remove it");
                            }
                            Start::Prepare
                        }
                    }
                }
                Ok(Some(state)) => {
                    tracing::info!(
                        container = %g.offliner,
                        running = state.running,
                        "an earlier run of this task started its offliner; following it on"
                    );
                    Start::Generate(g)
                }
                Ok(None) => {
                    tracing::warn!(container = %g.offliner, "the offliner an earlier run of this task started is gone; generating again");
                    Start::Prepare
                }
                Err(error) => {
                    metrics::global().docker_error();
                    tracing::warn!(%error, container = %g.offliner, "cannot inspect the offliner an earlier run of this task started; generating again");
                    Start::Prepare
                }
            },
        }
    }

    /// Prepare, then generate; or generate only, following an offliner an
    /// earlier run started. A failed generate may have failed for a full
    /// disk.
    async fn stages(&self, job: &mut Job<'_>, start: Start) -> Result<Generated, RunError> {
        let (free_at_start, adopted) = match start {
            Start::Generate(g) => (self.free_disk().await.map_err(RunError::Failed)?, Some(g)),
            _ => (timed(Stage::Prepare, self.prepare(job)).await?, None),
        };
        match timed(Stage::Generate, self.generate(job, adopted)).await {
            Err(RunError::Failed(error)) => Err(RunError::Failed(
                self.explain_full_disk(error, free_at_start).await,
            )),
            other => other,
        }
    }

    /// A scrape that failed with ZIM_DIR (nearly) full failed because of
    /// it, whatever the offliner printed: say so, with the space free now
    /// and at the start.
    async fn explain_full_disk(&self, error: TaskError, free_at_start: u64) -> TaskError {
        let free_now = self.free_disk().await.ok();
        let enospc = |text: String| text.contains("No space left on device");
        let full = free_now.is_some_and(|free| free < FULL_DISK_BELOW)
            || enospc(error.message())
            || enospc(error.detail());
        if !full {
            return error;
        }
        let now = free_now.map_or_else(|| "unknown".to_owned(), |f| (f >> 20).to_string());
        tracing::error!(
            free_mib_now = %now,
            free_mib_at_start = free_at_start >> 20,
            "the disk of ZIM_DIR filled up during the scrape"
        );
        TaskError::DiskFilled {
            free_mib_now: now,
            free_mib_at_start: free_at_start >> 20,
            cause: Box::new(error),
        }
    }

    /// Task dir, free disk, images, the redis helper; returns the bytes
    /// free in ZIM_DIR.
    async fn prepare(&self, job: &mut Job<'_>) -> Result<u64, RunError> {
        job.ctx.progress.set_stage(ProgressStage::Prepare);
        let free = self.prepare_dirs(job.dirs).await?;
        job.keeper.set_stage(RecordStage::Prepare).await;
        cancellable(
            job.ctx.cancel.token(),
            self.image(&job.plan.image.to_string()),
        )
        .await??;
        if job.plan.needs_redis {
            self.start_redis(job).await?;
        }
        Ok(free)
    }

    /// The offliner container (started here, or `adopted`: started by an
    /// earlier run), its log, its exit code, its files.
    async fn generate(
        &self,
        job: &mut Job<'_>,
        adopted: Option<Generating>,
    ) -> Result<Generated, RunError> {
        let (plan, dirs, ctx) = (job.plan, job.dirs, job.ctx);
        let name = self.container_name(&plan.task_id, "offliner");
        let (cursor, live) = match adopted {
            Some(g) => {
                job.containers.names = g.helpers.clone();
                job.containers.names.push(g.offliner.clone());
                let cursor = g.cursor.clone();
                job.keeper.record.stage = RecordStage::Generate(g);
                (cursor, None)
            }
            None => {
                // On record before the container exists: a worker that dies
                // in between leaves a record whose container is missing,
                // never a scraper that no record names.
                let helpers = job.containers.names.clone();
                job.keeper
                    .set_stage(RecordStage::Generate(Generating {
                        offliner: name.clone(),
                        helpers,
                        cursor: LogCursor::default(),
                    }))
                    .await;
                let live = self.start_offliner(job, &name).await?;
                (LogCursor::default(), Some(live))
            }
        };
        let offliner = match &job.keeper.record.stage {
            RecordStage::Generate(g) => g.offliner.clone(),
            _ => name,
        };
        let name = offliner;
        let task_dir = open_dir(&dirs.local_task).await?;
        let own = own_dir(dirs).await?;
        ctx.progress.set_stage(ProgressStage::Generate);
        ctx.progress.set_container(&name);
        let _sampling = sample::Sampling::start(
            &ctx.progress,
            self.docker.clone(),
            &name,
            task_dir.clone(),
            plan.writes_progress,
        );
        // Each finished ZIM goes to the warehouse while the offliner runs.
        let early_uploads = self.warehouse.clone().map(|warehouse| {
            let (task_dir, own, warehouse_path) =
                (task_dir.clone(), own.clone(), plan.warehouse_path.clone());
            EarlyUploads::start(
                warehouse,
                task_dir.clone(),
                move |file| output_item(&task_dir, &own, &warehouse_path, file),
                ctx.cancel.token().clone(),
            )
        });
        let log = own.file(&format!("{name}.log"));
        let run = self
            .follow(&name, &log, cursor, live, job.keeper, ctx)
            .await?;
        let early = match early_uploads {
            Some(early) => early.finish().await,
            None => Default::default(),
        };
        let log_file = compress_log(log).await;
        ctx.emit(ContainerEvent::Finished {
            exit_code: run.exit.code,
            stdout: run.stdout.joined(),
            stderr: run.stderr.joined(),
            log: log_file.clone(),
        });
        if run.exit.oom_killed && run.exit.code == 0 {
            tracing::warn!(
                "a process of the offliner was killed for memory (Docker reports OOMKilled), \
                 but the offliner exited with code 0"
            );
        }
        if let Some(error) = exit_failure(&run, self.settings.container_memory) {
            return Err(error.into());
        }
        let files = produced_files(&task_dir).await?;
        if files.is_empty() {
            return Err(TaskError::NoOutput {
                dir: dirs.local_task.clone(),
                host_dir: dirs.host_task.clone(),
            }
            .into());
        }
        tracing::info!(files = files.len(), "offliner finished");
        let log_kept = {
            let file = own.file(&log_file);
            tokio::task::spawn_blocking(move || file.exists())
                .await
                .unwrap_or(false)
        };
        Ok(Generated {
            files,
            log: log_kept.then_some(log_file),
            early,
        })
    }

    /// Creates the offliner container, attaches to its output and starts
    /// it (see `follow.rs`).
    async fn start_offliner(
        &self,
        job: &mut Job<'_>,
        name: &str,
    ) -> Result<crate::docker::OutputStream, RunError> {
        let (plan, dirs, ctx) = (job.plan, job.dirs, job.ctx);
        job.containers.names.push(name.to_owned());
        let mut binds = vec![format!("{}:{}", dirs.host_task.display(), plan.output_dir)];
        if plan.needs_redis {
            binds.push(redis::redis_bind(dirs));
        }
        let spec = ContainerSpec {
            name: name.to_owned(),
            image: plan.image.to_string(),
            cmd: plan.argv.clone(),
            labels: self.labels(&plan.task_id, "offliner"),
            binds,
            no_network: false,
            network: Some(self.network.name.clone()),
            cap_add: confine::OFFLINER_CAPS
                .iter()
                .map(|c| (*c).to_owned())
                .collect(),
            pids_limit: Some(self.settings.container_pids),
            sysctls: self.network.sysctls(),
            memory: self.settings.container_memory,
            nano_cpus: self.settings.container_nano_cpus,
            log_limit: self.settings.container_log_limit,
            ..Default::default()
        };
        let live = cancellable(ctx.cancel.token(), self.docker.start_attached(&spec))
            .await?
            .map_err(docker_failed)?;
        tracing::info!(container = %name, image = %spec.image, "offliner started");
        ctx.emit(ContainerEvent::Started {
            image: spec.image.clone(),
            command: plan.argv.join(" "),
        });
        Ok(live)
    }

    /// The task dir and the worker's own dir of the task, created empty;
    /// kept dirs swept by age, and under disk pressure before refusing.
    /// Returns the bytes free in ZIM_DIR.
    async fn prepare_dirs(&self, dirs: &TaskDirs) -> Result<u64, RunError> {
        self.sweeper.sweep_old().await;
        // Containers an earlier run of this task left (it was left in
        // prepare, or its offliner is gone): this run starts them afresh.
        match self
            .docker
            .remove_labelled(&[
                (LABEL_NODE, &self.settings.node_name),
                (LABEL_TASK, &dirs.task_id),
            ])
            .await
        {
            Ok(0) => {}
            Ok(removed) => {
                tracing::warn!(
                    removed,
                    "removed the containers an earlier run of this task left"
                )
            }
            Err(error) => return Err(docker_failed(error)),
        }
        // A task dir left by an earlier, interrupted run of this task holds
        // partial output: start afresh.
        if tokio::fs::try_exists(&dirs.local_task)
            .await
            .unwrap_or(false)
        {
            tracing::warn!(dir = %dirs.local_task.display(), "removing the output of an earlier, interrupted run");
            let _ = tokio::fs::remove_dir_all(&dirs.local_task).await;
        }
        remove_own(&dirs.zim_dir, &dirs.task_id).await;
        own_dir(dirs).await?;
        // The sockets dir afresh: a killed run's containers may have left
        // anything in it.
        let made = async {
            let task = &dirs.local_task;
            tokio::fs::create_dir_all(task)
                .await
                .map_err(|e| (task, e))?;
            let sockets = &dirs.local_sockets;
            redis::fresh_sockets_dir(sockets)
                .await
                .map_err(|e| (sockets, e))
        };
        made.await.map_err(|(dir, e)| {
            failed(format!(
                "cannot create {}: {e}; check ZIM_DIR",
                dir.display()
            ))
        })?;
        let shared = async {
            confine::share_task_dir(&dirs.local_task).await?;
            confine::share_dir(&dirs.local_sockets).await
        };
        shared.await.map_err(|e| {
            failed(format!(
                "cannot open the task's dirs in ZIM_DIR to its containers: {e}"
            ))
        })?;
        let mut free = self.free_disk().await.map_err(RunError::Failed)?;
        if free < self.settings.min_free_disk {
            tracing::warn!(
                free_mib = free >> 20,
                min_free_mib = self.settings.min_free_disk >> 20,
                "ZIM_DIR is below MIN_FREE_DISK_MB; sweeping kept task dirs, oldest first"
            );
            free = self
                .sweeper
                .make_room(self.settings.min_free_disk)
                .await
                .map_err(|e| failed(format!("cannot read free disk of ZIM_DIR: {e}")))?;
        }
        if free < self.settings.min_free_disk {
            return Err(failed(format!(
                "only {} MiB free in ZIM_DIR, below MIN_FREE_DISK_MB={}, and no kept task dir \
                 is left to sweep; free some space",
                free >> 20,
                self.settings.min_free_disk >> 20
            )));
        }
        Ok(free)
    }

    async fn image(&self, image: &str) -> Result<(), RunError> {
        self.docker
            .ensure_image(image, self.settings.pull_policy)
            .await
            .map_err(docker_failed)
    }

    /// The bytes free in ZIM_DIR.
    async fn free_disk(&self) -> Result<u64, TaskError> {
        let zim_dir = self.settings.zim_dir.clone();
        tokio::task::spawn_blocking(move || crate::sweep::free_bytes(&zim_dir))
            .await
            .map_err(|e| TaskError::runtime(format!("free-disk check failed: {e}")))?
            .map_err(|e| TaskError::runtime(format!("cannot read free disk of ZIM_DIR: {e}")))
    }
}

impl Runner for DockerRunner {
    type Planner = OfflinerPlanner;

    fn planner(&self) -> &OfflinerPlanner {
        &self.planner
    }

    // Not an `async fn`: the future must be 'static (it runs in its own
    // tokio task), so it owns a clone of the runner.
    #[allow(clippy::manual_async_fn)]
    fn run(
        &self,
        plan: TaskPlan,
        ctx: TaskContext,
    ) -> impl Future<Output = Result<Vec<TaskFile>, RunError>> + Send + 'static {
        let this = self.clone();
        async move { this.run_task(plan, ctx).await }
    }

    #[allow(clippy::manual_async_fn)]
    fn release(&self, task_id: &str) -> impl Future<Output = ()> + Send + 'static {
        let this = self.clone();
        let task_id = task_id.to_owned();
        async move { this.remove_task_dir(&task_id).await }
    }

    async fn claim_node(&self, keep: &[String]) {
        self.remove_unkept(keep).await;
        // Kept dirs of the layout before ZIM_DIR/.zimfarm cannot be
        // trusted; then kept dirs too old to be worth an upload, at start
        // and then every SWEEP_INTERVAL (and before every task). The kept
        // tasks' dirs are claimed meanwhile: their runs start next.
        let mut claims = Vec::new();
        for task_id in keep {
            claims.push(self.sweeper.claim(task_id).await);
        }
        self.sweeper.sweep_old_layout().await;
        self.sweeper.sweep_old().await;
        drop(claims);
        let sweeper = self.sweeper.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SWEEP_INTERVAL);
            every.tick().await;
            loop {
                every.tick().await;
                sweeper.sweep_old().await;
            }
        });
    }

    async fn kept(&self) -> KeptTasks {
        self.find_kept().await
    }

    fn keeps_on_leave(&self) -> bool {
        true
    }

    #[allow(clippy::manual_async_fn)]
    fn forsake(&self, task_id: &str) -> impl Future<Output = ()> + Send + 'static {
        let this = self.clone();
        let task_id = task_id.to_owned();
        async move { this.remove_kept(&task_id).await }
    }

    async fn alive(&self) {
        let zim_dir = self.settings.zim_dir.clone();
        let written =
            tokio::task::spawn_blocking(move || crate::taskfs::record::write_alive(&zim_dir))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        if let Err(error) = written {
            tracing::warn!(%error, "could not write the node's alive file in ZIM_DIR/.zimfarm; the next start may take this node for away too long");
        }
    }
}

/// Removes the worker's own dir of a task, with a line if that fails.
async fn remove_own(zim_dir: &std::path::Path, task_id: &str) {
    let (zim_dir, task_id) = (zim_dir.to_owned(), task_id.to_owned());
    let shown = crate::taskfs::own_dir_path(&zim_dir, &task_id);
    let removed =
        tokio::task::spawn_blocking(move || crate::taskfs::remove_own_dir(&zim_dir, &task_id))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
    if let Err(error) = removed {
        tracing::warn!(dir = %shown.display(), %error, "could not remove the worker's own dir of the task");
    }
}

fn docker_failed(error: crate::docker::DockerError) -> RunError {
    metrics::global().docker_error();
    failed(error.to_string())
}

/// Runs one stage in its span (every log line in it carries the stage) and
/// records how long it took.
async fn timed<T>(stage: Stage, fut: impl Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let out = fut
        .instrument(tracing::info_span!("stage", stage = stage.label()))
        .await;
    metrics::global().stage_done(stage, started.elapsed().as_secs_f64());
    out
}

/// Runs `fut` unless the task is cancelled first.
async fn cancellable<T>(
    cancel: &tokio_util::sync::CancellationToken,
    fut: impl Future<Output = T>,
) -> Result<T, RunError> {
    tokio::select! {
        _ = cancel.cancelled() => Err(RunError::Cancelled),
        out = fut => Ok(out),
    }
}
