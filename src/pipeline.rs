//! The stages of one task on the Docker engine: **prepare** (task dir, free
//! disk, images, the redis helper), **generate** (the offliner container,
//! its log, idle timeout, how it ended: a kill for memory or by SIGKILL is
//! said as such; each finished ZIM uploaded while it runs, see
//! [`crate::early`]), **upload** (the files not sent early, and the log, to
//! the warehouse; a file sent early and changed since fails the task) and **cleanup** (every container of the task removed on
//! every path, panics included; the task dir once its files are uploaded).
//!
//! A marker written in the task dir when generate succeeded lets a
//! redelivered task go straight to upload instead of scraping again.
//!
//! Free disk: before refusing a task for `MIN_FREE_DISK_MB` it has the
//! [`Sweeper`] remove kept task dirs (a task's own dir is claimed for its
//! whole run, so it is never swept); a scrape that fails with ZIM_DIR full
//! is reported as the disk having filled up.
//!
//! Owns the task dir and the task's containers. It must not decode messages
//! or publish anything itself: it works from a [`TaskPlan`] and reports
//! through the runner's [`TaskContext`].

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bollard::container::LogOutput;
use futures_util::StreamExt;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tracing::Instrument;

use crate::celery::TaskRequest;
use crate::config::PipelineSettings;
use crate::docker::{
    ContainerExit, ContainerSpec, DockerClient, LABEL_NODE, LABEL_ROLE, LABEL_TASK,
};
use crate::early::EarlyUploads;
use crate::metrics::{self, Stage};
use crate::offliner::{TaskPlan, plan};
use crate::runner::{RunError, Runner, TaskContext, TaskError, TaskFile};
use crate::sweep::{SWEEP_INTERVAL, Sweeper};
use crate::warehouse::journal::FileId;
use crate::warehouse::{UploadItem, Warehouse, WarehouseError};

/// Where the redis helper's socket is, inside both containers.
pub const REDIS_SOCKET_DIR: &str = "/run/redis";
/// The socket's path inside both containers.
pub const REDIS_SOCKET: &str = "/run/redis/redis.sock";
/// How long the redis helper may take to answer PING.
const REDIS_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of stdout and stderr kept for `task-container_finished`.
const TAIL_LINES: usize = 100;
/// Longest line kept in a tail (longer ones are cut).
const TAIL_LINE_MAX: usize = 2000;
/// Name of the directory (in ZIM_DIR) holding the per-task sockets dirs.
const SOCKETS_DIR: &str = ".sockets";
/// How long a failed task waits for its log to reach the warehouse before
/// it reports the failure anyway.
const FAILED_LOG_UPLOAD_LIMIT: Duration = Duration::from_secs(60);

/// Free space in ZIM_DIR under which a failed scrape is reported as the
/// disk having filled up.
const FULL_DISK_BELOW: u64 = 1 << 20;

/// The marker, in the task dir, of a generate stage that succeeded.
pub const GENERATED_MARKER: &str = ".zimfarm-generated.json";

/// What generate produced, as the marker records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Generated {
    /// The offliner's output files (top level of the task dir).
    pub files: Vec<TaskFile>,
    /// The container log's file name in the task dir, if it was kept.
    pub log: Option<String>,
    /// The files uploaded while the offliner ran, as they were then (not
    /// in the marker: a run that resumes checks the warehouse instead).
    #[serde(skip)]
    pub early: crate::early::EarlyRecord,
}

/// The Docker pipeline as a [`Runner`].
#[derive(Clone)]
pub struct DockerRunner {
    docker: DockerClient,
    settings: Arc<PipelineSettings>,
    /// `None`: no upload (`run-task --no-upload`); files stay in the task dir.
    warehouse: Option<Warehouse>,
    /// Sweeps the task dirs kept in ZIM_DIR; knows which ones are in use.
    sweeper: Sweeper,
}

/// A task's paths, as the host sees them (for bind mounts) and as this
/// process sees them.
struct TaskDirs {
    host_task: PathBuf,
    local_task: PathBuf,
    host_sockets: PathBuf,
    local_sockets: PathBuf,
}

impl TaskDirs {
    fn new(settings: &PipelineSettings, task_id: &str) -> Self {
        Self {
            host_task: settings.working_dir.join(task_id),
            local_task: settings.zim_dir.join(task_id),
            host_sockets: settings.working_dir.join(SOCKETS_DIR).join(task_id),
            local_sockets: settings.zim_dir.join(SOCKETS_DIR).join(task_id),
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
    ) -> Result<Self, crate::docker::DockerError> {
        let docker = DockerClient::connect().await?;
        let sweeper = Sweeper::new(settings.zim_dir.clone(), settings.kept_dir_max_age);
        Ok(Self {
            docker,
            settings: Arc::new(settings),
            warehouse,
            sweeper,
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
    }

    pub fn docker(&self) -> &DockerClient {
        &self.docker
    }

    /// Removes the containers an earlier run of this node left behind (a
    /// crash or kill -9): their tasks come back from the broker and would
    /// otherwise hit a name conflict.
    pub async fn remove_orphans(&self) -> Result<usize, crate::docker::DockerError> {
        self.docker
            .remove_labelled(&[(LABEL_NODE, &self.settings.node_name)])
            .await
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

    /// One task, start to end; containers are removed whatever happens.
    async fn run_task(
        self,
        request: Arc<TaskRequest>,
        ctx: TaskContext,
    ) -> Result<Vec<TaskFile>, RunError> {
        let plan = plan(&request, &self.settings.image_allowlist, REDIS_SOCKET).map_err(|e| {
            RunError::Failed(TaskError {
                kind: "ValueError".to_owned(),
                module: "builtins".to_owned(),
                message: e.to_string(),
                detail: "the task was refused before anything ran".to_owned(),
            })
        })?;
        // The sweeper leaves this task's dir alone until the run ends.
        let _claim = self.sweeper.claim(&plan.task_id).await;
        let dirs = TaskDirs::new(&self.settings, &plan.task_id);
        let generated = match read_marker(&dirs.local_task).await {
            Some(generated) => {
                tracing::info!(
                    files = generated.files.len(),
                    "an earlier run of this task generated its files already; going straight to upload"
                );
                generated
            }
            None => {
                let mut containers = Containers {
                    docker: self.docker.clone(),
                    names: Vec::new(),
                };
                let outcome = self.stages(&plan, &dirs, &mut containers, &ctx).await;
                containers.remove_all().await;
                let _ = tokio::fs::remove_dir_all(&dirs.local_sockets).await;
                match outcome {
                    Ok(generated) => {
                        write_marker(&dirs.local_task, &generated).await;
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
                        return Err(e);
                    }
                }
            }
        };
        if let Some(warehouse) = &self.warehouse {
            timed(
                Stage::Upload,
                self.upload(warehouse, &plan, &dirs, &generated, &ctx),
            )
            .await?;
        }
        Ok(generated.files)
    }

    /// Every output file, then the log, to the warehouse. The files stay
    /// in the task dir whatever happens here: they go only once uploaded.
    async fn upload(
        &self,
        warehouse: &Warehouse,
        plan: &TaskPlan,
        dirs: &TaskDirs,
        generated: &Generated,
        ctx: &TaskContext,
    ) -> Result<(), RunError> {
        let mut items = Vec::new();
        for f in &generated.files {
            match generated.early.get(&f.name) {
                None => items.push(output_item(&dirs.local_task, &plan.warehouse_path, &f.name)),
                Some(&then) => {
                    let now = FileId::read(&dirs.local_task.join(&f.name)).await.ok();
                    if now != Some(then) {
                        return Err(failed(format!(
                            "{} was uploaded to the warehouse while the offliner ran ({} bytes), \
                             and the offliner changed it afterwards ({}); the warehouse never \
                             overwrites a file: ask the Zimfarm admins to remove the first one, \
                             or have the offliner write each ZIM once",
                            f.name,
                            then.size,
                            now.map_or("it is gone".to_owned(), |n| format!(
                                "{} bytes now",
                                n.size
                            )),
                        )));
                    }
                }
            }
        }
        if let Some(log) = &generated.log {
            let path = dirs.local_task.join(log);
            if tokio::fs::try_exists(&path).await.unwrap_or(false) {
                items.push(UploadItem::log(path, log));
            }
        }
        let bytes: u64 = generated.files.iter().map(|f| f.size).sum();
        tracing::info!(
            files = items.len(),
            bytes,
            uploaded_early = generated.early.len(),
            "uploading to the warehouse"
        );
        let started = std::time::Instant::now();
        match warehouse.upload(&items, ctx.cancel.token()).await {
            Ok(reports) => {
                let secs = started.elapsed().as_secs_f64();
                tracing::info!(
                    files = reports.len(),
                    skipped = reports.iter().filter(|r| r.skipped).count(),
                    seconds = secs,
                    "upload done"
                );
                Ok(())
            }
            Err(WarehouseError::Cancelled) => {
                tracing::warn!(dir = %dirs.local_task.display(), "upload stopped; the files are kept for the next run of this task");
                Err(RunError::Cancelled)
            }
            Err(error) => {
                tracing::error!(%error, dir = %dirs.local_task.display(), "upload failed; the files are kept");
                Err(RunError::Failed(TaskError {
                    kind: "RuntimeError".to_owned(),
                    module: "builtins".to_owned(),
                    message: format!("upload to the warehouse failed: {error}"),
                    detail: format!(
                        "the generated files are kept in {} on the worker host",
                        dirs.host_task.display()
                    ),
                }))
            }
        }
    }

    /// Best effort, within [`FAILED_LOG_UPLOAD_LIMIT`]: the offliner's log
    /// of a failed run to `/logs/`, so that the task's page can show it.
    async fn upload_failed_log(
        &self,
        warehouse: &Warehouse,
        plan: &TaskPlan,
        dirs: &TaskDirs,
        ctx: &TaskContext,
    ) {
        let container = self.container_name(&plan.task_id, "offliner");
        let mut log = None;
        for name in [format!("{container}.log.gz"), format!("{container}.log")] {
            let path = dirs.local_task.join(&name);
            if tokio::fs::try_exists(&path).await.unwrap_or(false) {
                log = Some(UploadItem::log(path, &name));
                break;
            }
        }
        let Some(item) = log else { return };
        let upload = warehouse.upload(std::slice::from_ref(&item), ctx.cancel.token());
        match tokio::time::timeout(FAILED_LOG_UPLOAD_LIMIT, upload).await {
            Ok(Ok(_)) => tracing::info!(log = %item.remote_path(), "uploaded the failed run's log"),
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not upload the failed run's log")
            }
            Err(_) => tracing::warn!(
                limit_s = FAILED_LOG_UPLOAD_LIMIT.as_secs(),
                "gave up uploading the failed run's log"
            ),
        }
    }

    async fn stages(
        &self,
        plan: &TaskPlan,
        dirs: &TaskDirs,
        containers: &mut Containers,
        ctx: &TaskContext,
    ) -> Result<Generated, RunError> {
        let free_at_start =
            timed(Stage::Prepare, self.prepare(plan, dirs, containers, ctx)).await?;
        match timed(Stage::Generate, self.generate(plan, dirs, containers, ctx)).await {
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
        let zim_dir = self.settings.zim_dir.clone();
        let free_now = tokio::task::spawn_blocking(move || crate::sweep::free_bytes(&zim_dir))
            .await
            .ok()
            .and_then(Result::ok);
        let enospc = |text: &str| text.contains("No space left on device");
        let full = free_now.is_some_and(|free| free < FULL_DISK_BELOW)
            || enospc(&error.message)
            || enospc(&error.detail);
        if !full {
            return error;
        }
        let now = free_now.map_or_else(|| "unknown".to_owned(), |f| (f >> 20).to_string());
        tracing::error!(
            free_mib_now = %now,
            free_mib_at_start = free_at_start >> 20,
            "the disk of ZIM_DIR filled up during the scrape"
        );
        TaskError {
            message: format!(
                "the disk of ZIM_DIR filled up during the scrape ({now} MiB free now, {} MiB \
                 at the start); give ZIM_DIR more space or run fewer tasks at once ({})",
                free_at_start >> 20,
                error.message
            ),
            ..error
        }
    }

    /// Task dir, free disk, images, the redis helper; returns the bytes
    /// free in ZIM_DIR.
    async fn prepare(
        &self,
        plan: &TaskPlan,
        dirs: &TaskDirs,
        containers: &mut Containers,
        ctx: &TaskContext,
    ) -> Result<u64, RunError> {
        let cancel = ctx.cancel.token();
        let free = self.prepare_dirs(dirs).await?;
        cancellable(cancel, self.image(&plan.image.to_string())).await??;
        if plan.needs_redis {
            cancellable(cancel, self.image(&self.settings.redis_image)).await??;
            let name = self.container_name(&plan.task_id, "redis");
            containers.names.push(name.clone());
            let spec = ContainerSpec {
                name,
                image: self.settings.redis_image.clone(),
                cmd: [
                    "--port",
                    "0",
                    "--unixsocket",
                    REDIS_SOCKET,
                    "--unixsocketperm",
                    "777",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ]
                .map(str::to_owned)
                .to_vec(),
                labels: self.labels(&plan.task_id, "redis"),
                binds: vec![format!(
                    "{}:{REDIS_SOCKET_DIR}",
                    dirs.host_sockets.display()
                )],
                no_network: true,
                log_limit: self.settings.container_log_limit,
                ..Default::default()
            };
            cancellable(cancel, self.docker.start(&spec))
                .await?
                .map_err(docker_failed)?;
            cancellable(
                cancel,
                wait_for_redis(&dirs.local_sockets, REDIS_READY_TIMEOUT),
            )
            .await??;
            tracing::info!("redis helper ready");
        }
        Ok(free)
    }

    /// The offliner container, its log, its exit code, its files.
    async fn generate(
        &self,
        plan: &TaskPlan,
        dirs: &TaskDirs,
        containers: &mut Containers,
        ctx: &TaskContext,
    ) -> Result<Generated, RunError> {
        let cancel = ctx.cancel.token();
        let name = self.container_name(&plan.task_id, "offliner");
        containers.names.push(name.clone());
        let mut binds = vec![format!("{}:{}", dirs.host_task.display(), plan.output_dir)];
        if plan.needs_redis {
            binds.push(format!(
                "{}:{REDIS_SOCKET_DIR}",
                dirs.host_sockets.display()
            ));
        }
        let spec = ContainerSpec {
            name: name.clone(),
            image: plan.image.to_string(),
            cmd: plan.argv.clone(),
            labels: self.labels(&plan.task_id, "offliner"),
            binds,
            no_network: false,
            memory: self.settings.container_memory,
            nano_cpus: self.settings.container_nano_cpus,
            log_limit: self.settings.container_log_limit,
        };
        let output = cancellable(cancel, self.docker.start_attached(&spec))
            .await?
            .map_err(docker_failed)?;
        tracing::info!(container = %name, image = %spec.image, "offliner started");
        let mut fields = serde_json::Map::new();
        fields.insert("image".into(), json!(spec.image));
        fields.insert("command".into(), json!(plan.argv.join(" ")));
        ctx.emit("task-container_started", fields);

        // Each finished ZIM goes to the warehouse while the offliner runs.
        let early_uploads = self.warehouse.clone().map(|warehouse| {
            let (task_dir, warehouse_path) = (dirs.local_task.clone(), plan.warehouse_path.clone());
            EarlyUploads::start(
                warehouse,
                dirs.local_task.clone(),
                move |file| output_item(&task_dir, &warehouse_path, file),
                ctx.cancel.token().clone(),
            )
        });
        let log_name = format!("{name}.log");
        let run = self
            .follow(&name, output, &dirs.local_task.join(&log_name), ctx)
            .await?;
        let early = match early_uploads {
            Some(early) => early.finish().await,
            None => Default::default(),
        };
        let log_file = compress_log(dirs.local_task.join(&log_name)).await;
        let mut fields = serde_json::Map::new();
        fields.insert("exit_code".into(), json!(run.exit.code));
        fields.insert("stdout".into(), json!(run.stdout.joined()));
        fields.insert("stderr".into(), json!(run.stderr.joined()));
        fields.insert("log".into(), json!(log_file));
        ctx.emit("task-container_finished", fields);
        if run.exit.oom_killed && run.exit.code == 0 {
            tracing::warn!(
                "a process of the offliner was killed for memory (Docker reports OOMKilled), \
                 but the offliner exited with code 0"
            );
        }
        if let Some(message) = exit_failure(run.exit, self.settings.container_memory) {
            let tail: Vec<&str> = run
                .stderr
                .lines
                .iter()
                .chain(run.stdout.lines.iter())
                .rev()
                .take(20)
                .map(String::as_str)
                .collect();
            return Err(RunError::Failed(TaskError {
                kind: "RuntimeError".to_owned(),
                module: "builtins".to_owned(),
                message,
                detail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            }));
        }
        let files = produced_files(&dirs.local_task, &log_file).await?;
        if files.is_empty() {
            return Err(RunError::Failed(TaskError {
                kind: "RuntimeError".to_owned(),
                module: "builtins".to_owned(),
                message: "the offliner exited with code 0 but wrote no file".to_owned(),
                detail: format!(
                    "nothing in {} (the host's {}); if WORKING_DIR is not the host path of the \
                     directory mounted at ZIM_DIR, the offliner's files went to another place \
                     on the host",
                    dirs.local_task.display(),
                    dirs.host_task.display()
                ),
            }));
        }
        tracing::info!(files = files.len(), "offliner finished");
        let log_kept = tokio::fs::try_exists(dirs.local_task.join(&log_file))
            .await
            .unwrap_or(false);
        Ok(Generated {
            files,
            log: log_kept.then_some(log_file),
            early,
        })
    }

    /// The task dir, created empty; kept dirs swept by age, and under disk
    /// pressure before refusing. Returns the bytes free in ZIM_DIR.
    async fn prepare_dirs(&self, dirs: &TaskDirs) -> Result<u64, RunError> {
        self.sweeper.sweep_old().await;
        // A task dir left by an earlier, interrupted run of this task holds
        // partial output: start afresh.
        if tokio::fs::try_exists(&dirs.local_task)
            .await
            .unwrap_or(false)
        {
            tracing::warn!(dir = %dirs.local_task.display(), "removing the output of an earlier, interrupted run");
            let _ = tokio::fs::remove_dir_all(&dirs.local_task).await;
        }
        for dir in [&dirs.local_task, &dirs.local_sockets] {
            tokio::fs::create_dir_all(dir).await.map_err(|e| {
                failed(format!(
                    "cannot create {}: {e}; check ZIM_DIR",
                    dir.display()
                ))
            })?;
        }
        let zim_dir = self.settings.zim_dir.clone();
        let mut free = tokio::task::spawn_blocking(move || crate::sweep::free_bytes(&zim_dir))
            .await
            .map_err(|e| failed(format!("free-disk check failed: {e}")))?
            .map_err(|e| failed(format!("cannot read free disk of ZIM_DIR: {e}")))?;
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

    /// Streams the container's output to the log file until it exits,
    /// keeping the tails; kills it when it is silent for the idle timeout.
    async fn follow(
        &self,
        name: &str,
        mut logs: crate::docker::OutputStream,
        log_path: &Path,
        ctx: &TaskContext,
    ) -> Result<ContainerRun, RunError> {
        let file = tokio::fs::File::create(log_path)
            .await
            .map_err(|e| failed(format!("cannot write the log {}: {e}", log_path.display())))?;
        let mut log = tokio::io::BufWriter::with_capacity(64 * 1024, file);
        let mut stdout = Tail::default();
        let mut stderr = Tail::default();
        let idle = self.settings.idle_timeout;
        loop {
            let next = tokio::select! {
                _ = ctx.cancel.cancelled() => return Err(RunError::Cancelled),
                next = tokio::time::timeout(idle, logs.next()) => next,
            };
            match next {
                Err(_) => {
                    tracing::warn!(
                        idle_secs = idle.as_secs(),
                        "no output for IDLE_TIMEOUT; killing the offliner"
                    );
                    let _ = self.docker.kill_and_remove(name).await;
                    let mut fields = serde_json::Map::new();
                    fields.insert("timeout".into(), json!(idle.as_secs()));
                    ctx.emit("task-container_killed", fields);
                    let _ = log.flush().await;
                    return Err(failed(format!(
                        "the offliner printed nothing for {} s (IDLE_TIMEOUT) and was killed",
                        idle.as_secs()
                    )));
                }
                Ok(None) => break,
                Ok(Some(Err(error))) => {
                    tracing::warn!(%error, "lost the container's log stream; waiting for it to exit");
                    break;
                }
                Ok(Some(Ok(chunk))) => {
                    let (bytes, tail) = match &chunk {
                        LogOutput::StdErr { message } => (message, &mut stderr),
                        LogOutput::StdOut { message } | LogOutput::Console { message } => {
                            (message, &mut stdout)
                        }
                        LogOutput::StdIn { .. } => continue,
                    };
                    tail.push(bytes);
                    log.write_all(bytes).await.map_err(|e| {
                        failed(format!("cannot write the log {}: {e}", log_path.display()))
                    })?;
                }
            }
        }
        log.flush()
            .await
            .map_err(|e| failed(format!("cannot write the log: {e}")))?;
        let exit = cancellable(ctx.cancel.token(), self.docker.wait(name))
            .await?
            .map_err(docker_failed)?;
        stdout.finish();
        stderr.finish();
        Ok(ContainerRun {
            exit,
            stdout,
            stderr,
        })
    }
}

impl Runner for DockerRunner {
    // Not an `async fn`: the future must be 'static (it runs in its own
    // tokio task), so it owns a clone of the runner.
    #[allow(clippy::manual_async_fn)]
    fn run(
        &self,
        request: Arc<TaskRequest>,
        ctx: TaskContext,
    ) -> impl Future<Output = Result<Vec<TaskFile>, RunError>> + Send + 'static {
        let this = self.clone();
        async move { this.run_task(request, ctx).await }
    }

    #[allow(clippy::manual_async_fn)]
    fn release(&self, task_id: &str) -> impl Future<Output = ()> + Send + 'static {
        let this = self.clone();
        let task_id = task_id.to_owned();
        async move { this.remove_task_dir(&task_id).await }
    }

    async fn claim_node(&self) {
        match self.remove_orphans().await {
            Ok(0) => {}
            Ok(removed) => tracing::warn!(
                removed,
                "removed containers left by an earlier run of this node"
            ),
            Err(error) => {
                metrics::global().docker_error();
                tracing::error!(%error, "could not remove the containers left by an earlier run of this node");
            }
        }
        // Kept dirs too old to be worth an upload, at start and then every
        // SWEEP_INTERVAL (and before every task).
        self.sweeper.sweep_old().await;
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
}

/// The marker of an earlier successful generate, if it is there and every
/// file it lists is still there with its size; `None` otherwise (the task
/// then starts afresh).
async fn read_marker(task_dir: &Path) -> Option<Generated> {
    let text = tokio::fs::read(task_dir.join(GENERATED_MARKER))
        .await
        .ok()?;
    let generated: Generated = match serde_json::from_slice(&text) {
        Ok(g) => g,
        Err(error) => {
            tracing::warn!(%error, "unreadable generate marker; generating again");
            return None;
        }
    };
    for file in &generated.files {
        let plain_name = !file.name.contains('/') && file.name != "." && file.name != "..";
        let ok = plain_name
            && tokio::fs::metadata(task_dir.join(&file.name))
                .await
                .is_ok_and(|m| m.is_file() && m.len() == file.size);
        if !ok {
            tracing::warn!(file = %file.name, "a file the generate marker lists is missing or changed; generating again");
            return None;
        }
    }
    Some(generated)
}

/// Records a successful generate. Without it a redelivery scrapes again,
/// which is slow but not wrong, so a failure here is only logged.
async fn write_marker(task_dir: &Path, generated: &Generated) {
    let path = task_dir.join(GENERATED_MARKER);
    let tmp = task_dir.join(format!("{GENERATED_MARKER}.tmp"));
    let text = serde_json::to_vec(generated).unwrap_or_default();
    let result = async {
        tokio::fs::write(&tmp, &text).await?;
        tokio::fs::rename(&tmp, &path).await
    }
    .await;
    if let Err(error) = result {
        tracing::warn!(%error, path = %path.display(), "could not write the generate marker");
    }
}

/// Why an ended offliner failed the task, in words an operator can act on;
/// `None` when it succeeded. `memory_limit` is CONTAINER_MEMORY_MB's bytes.
fn exit_failure(exit: ContainerExit, memory_limit: Option<i64>) -> Option<String> {
    match exit {
        ContainerExit { code: 0, .. } => None,
        ContainerExit {
            code,
            oom_killed: true,
        } => Some(match memory_limit {
            Some(bytes) => format!(
                "the offliner was killed for using more than its memory limit \
                 (CONTAINER_MEMORY_MB={}; Docker reports OOMKilled, exit code {code}) \
                 — raise CONTAINER_MEMORY_MB or give the task less to do",
                bytes >> 20
            ),
            None => format!(
                "the offliner was killed for memory (Docker reports OOMKilled, exit code \
                 {code}) although CONTAINER_MEMORY_MB is not set: the host (or the cgroup \
                 Docker runs in) ran out of memory — run fewer tasks at once (CONCURRENCY) \
                 or give the host more memory"
            ),
        }),
        ContainerExit { code: 137, .. } => Some(
            "the offliner was killed by SIGKILL (exit code 137) from outside the worker \
             (docker kill, or the host's OOM killer: see dmesg); Docker does not report \
             OOMKilled, so it was not CONTAINER_MEMORY_MB"
                .to_owned(),
        ),
        ContainerExit { code, .. } => Some(format!("the offliner exited with code {code}")),
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

/// The task's containers; removed on every path. If the task's future is
/// dropped (a panic), `Drop` still removes them in the background.
struct Containers {
    docker: DockerClient,
    names: Vec<String>,
}

impl Containers {
    async fn remove_all(&mut self) {
        for name in std::mem::take(&mut self.names).iter().rev() {
            if let Err(error) = self.docker.kill_and_remove(name).await {
                metrics::global().docker_error();
                tracing::error!(%error, "could not remove a task container");
            }
        }
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        if self.names.is_empty() {
            return;
        }
        let docker = self.docker.clone();
        let names = std::mem::take(&mut self.names);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                for name in names.iter().rev() {
                    let _ = docker.kill_and_remove(name).await;
                }
            });
        }
    }
}

struct ContainerRun {
    exit: ContainerExit,
    stdout: Tail,
    stderr: Tail,
}

/// The last lines of a stream, bounded in count and length. Invalid UTF-8
/// becomes U+FFFD; a character split between two chunks is kept whole.
#[derive(Default)]
struct Tail {
    lines: VecDeque<String>,
    partial: String,
    /// The start of a UTF-8 character the last chunk cut (at most 3 bytes).
    split_char: Vec<u8>,
}

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        let mut joined = std::mem::take(&mut self.split_char);
        joined.extend_from_slice(bytes);
        let cut = complete_utf8_len(&joined);
        self.split_char = joined[cut..].to_vec();
        self.push_text(&String::from_utf8_lossy(&joined[..cut]));
    }

    fn push_text(&mut self, text: &str) {
        let mut parts = text.split('\n').peekable();
        while let Some(part) = parts.next() {
            if self.partial.len() < TAIL_LINE_MAX {
                let room = TAIL_LINE_MAX - self.partial.len();
                let cut = floor_char_boundary(part, room);
                self.partial.push_str(&part[..cut]);
            }
            if parts.peek().is_some() {
                self.end_line();
            }
        }
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.partial);
        self.lines.push_back(line.trim_end_matches('\r').to_owned());
        if self.lines.len() > TAIL_LINES {
            self.lines.pop_front();
        }
    }

    fn finish(&mut self) {
        let rest = std::mem::take(&mut self.split_char);
        self.push_text(&String::from_utf8_lossy(&rest));
        if !self.partial.is_empty() {
            self.end_line();
        }
    }

    fn joined(&self) -> String {
        self.lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// `bytes` without the unfinished UTF-8 character at its end, if any.
fn complete_utf8_len(bytes: &[u8]) -> usize {
    let tail_start = bytes.len().saturating_sub(3);
    for start in (tail_start..bytes.len()).rev() {
        if bytes[start] & 0xc0 != 0x80 {
            // The last character's first byte: cut only if it is incomplete.
            return match std::str::from_utf8(&bytes[start..]) {
                Err(e) if e.error_len().is_none() => start,
                _ => bytes.len(),
            };
        }
    }
    bytes.len()
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    if max >= s.len() {
        return s.len();
    }
    let mut i = max;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Waits until the redis helper answers PING on `redis.sock` in `dir`.
///
/// It connects through an open descriptor of the dir
/// (`/proc/self/fd/N/redis.sock`), so the socket's full path may be longer
/// than the 107 bytes a unix socket address holds: any ZIM_DIR works.
/// Errors that waiting cures (no socket yet, refused, no reply yet) are
/// retried until [`REDIS_READY_TIMEOUT`]; any other fails at once. Either
/// way the failure text carries the last OS error.
async fn wait_for_redis(dir: &Path, timeout: Duration) -> Result<(), RunError> {
    let socket_path = dir.join("redis.sock");
    let owned = dir.to_owned();
    let dir_fd = tokio::task::spawn_blocking(move || {
        rustix::fs::open(
            &owned,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
    })
    .await
    .map_err(|e| failed(format!("opening the redis helper's socket dir failed: {e}")))?
    .map_err(|e| {
        failed(format!(
            "cannot open the redis helper's socket dir {}: {}; check ZIM_DIR",
            dir.display(),
            std::io::Error::from(e)
        ))
    })?;
    let short = PathBuf::from(format!(
        "/proc/self/fd/{}/redis.sock",
        std::os::fd::AsRawFd::as_raw_fd(&dir_fd)
    ));
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let error = match ping_redis(&short).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if !waiting_cures(&error) {
            return Err(failed(format!(
                "cannot reach the redis helper on {}: {error}",
                socket_path.display()
            )));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(failed(format!(
                "the redis helper did not answer on {} within {} s (last error: {error})",
                socket_path.display(),
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One PING on the redis socket at `socket`.
async fn ping_redis(socket: &Path) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::UnixStream::connect(socket).await?;
    stream.write_all(b"PING\r\n").await?;
    let mut reply = [0u8; 7];
    tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut reply))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply to PING in 2 s")
        })??;
    if &reply == b"+PONG\r\n" {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "unexpected reply to PING: {:?}",
                String::from_utf8_lossy(&reply)
            ),
        ))
    }
}

/// Whether waiting may cure a failed PING: the helper is still starting
/// (no socket yet, nobody listening, no reply yet). A path too long, a
/// permission denied and the like never get better.
fn waiting_cures(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::NotFound
            | ErrorKind::ConnectionRefused
            | ErrorKind::ConnectionReset
            | ErrorKind::BrokenPipe
            | ErrorKind::UnexpectedEof
            | ErrorKind::TimedOut
            | ErrorKind::InvalidData
    )
}

/// Gzips the log next to itself and removes the plain one; returns the
/// name of the file kept.
async fn compress_log(path: PathBuf) -> String {
    let plain_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let result = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let gz_path = path.with_extension("log.gz");
        let mut input = std::fs::File::open(&path)?;
        let output = std::fs::File::create(&gz_path)?;
        let mut encoder = flate2::write::GzEncoder::new(output, flate2::Compression::default());
        let written =
            std::io::copy(&mut input, &mut encoder).and_then(|_| encoder.finish()?.flush());
        if let Err(error) = written {
            // A full disk: no half-written .gz left beside the plain log.
            let _ = std::fs::remove_file(&gz_path);
            return Err(error);
        }
        std::fs::remove_file(&path)?;
        Ok(gz_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default())
    })
    .await;
    match result {
        Ok(Ok(name)) => name,
        Ok(Err(error)) => {
            tracing::warn!(%error, "could not compress the container log; keeping it plain");
            plain_name
        }
        Err(_) => plain_name,
    }
}

/// Where output `name` of the task dir goes, with its upload journal.
fn output_item(task_dir: &Path, warehouse_path: &str, name: &str) -> UploadItem {
    UploadItem::output(task_dir.join(name), warehouse_path, name)
        .with_journal(task_dir.join(journal_name(name)))
}

/// The upload journal of output `name`, in the task dir: hidden from
/// [`produced_files`] by its `.zimfarm-` prefix, and of fixed length
/// whatever the name's.
fn journal_name(name: &str) -> String {
    format!(
        ".zimfarm-upload-{:x}.json",
        <md5::Md5 as md5::Digest>::digest(name.as_bytes())
    )
}

/// The files the offliner produced: regular files at the top of the task
/// dir, the container log excepted.
async fn produced_files(dir: &Path, log_file: &str) -> Result<Vec<TaskFile>, RunError> {
    let mut entries = tokio::fs::read_dir(dir)
        .await
        .map_err(|e| failed(format!("cannot list {}: {e}", dir.display())))?;
    let mut files = Vec::new();
    while let Some(entry) = entries
        .next_entry()
        .await
        .map_err(|e| failed(format!("cannot list {}: {e}", dir.display())))?
    {
        let Ok(meta) = entry.metadata().await else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let name = match entry.file_name().into_string() {
            Ok(name) => name,
            Err(raw) => {
                return Err(failed(format!(
                    "the offliner wrote a file whose name is not UTF-8 ({}); the warehouse needs UTF-8 names",
                    raw.to_string_lossy()
                )));
            }
        };
        if name == log_file || name.starts_with(".zimfarm-") {
            continue;
        }
        files.push(TaskFile {
            name,
            size: meta.len(),
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

#[cfg(test)]
mod proptests {
    use super::*;
    use crate::proptest_config::config;
    use proptest::prelude::*;

    /// Log chunks: random bytes (invalid UTF-8 too), ASCII with `\n` and
    /// `\r`, multi-byte text, and runs long enough to pass the line limit.
    fn chunk() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            ascii_chunk(),
            "[a-zé€🎉\n\r]{0,40}".prop_map(String::into_bytes),
            (any::<u8>(), 0..5000_usize).prop_map(|(b, n)| vec![b; n]),
        ]
    }

    fn ascii_chunk() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'\r'), b'a'..=b'z'], 0..64),
            (b'a'..=b'z', 0..5000_usize).prop_map(|(b, n)| vec![b; n]),
            (0..300_usize).prop_map(|n| b"l\n".repeat(n)),
        ]
    }

    /// What the tail of ASCII `input` must be.
    fn model(input: &[u8]) -> Vec<String> {
        let text = String::from_utf8(input.to_vec()).expect("ASCII");
        let mut parts: Vec<&str> = text.split('\n').collect();
        if parts.last() == Some(&"") {
            parts.pop();
        }
        let lines: Vec<String> = parts
            .iter()
            .map(|p| {
                p[..p.len().min(TAIL_LINE_MAX)]
                    .trim_end_matches('\r')
                    .to_owned()
            })
            .collect();
        lines[lines.len().saturating_sub(TAIL_LINES)..].to_vec()
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn tail_stays_bounded(chunks in proptest::collection::vec(chunk(), 0..12)) {
            let mut tail = Tail::default();
            for chunk in &chunks {
                tail.push(chunk);
                prop_assert!(tail.lines.len() <= TAIL_LINES);
                prop_assert!(tail.partial.len() <= TAIL_LINE_MAX);
            }
            tail.finish();
            prop_assert!(tail.lines.len() <= TAIL_LINES);
            for line in &tail.lines {
                prop_assert!(line.len() <= TAIL_LINE_MAX);
                prop_assert!(!line.contains('\n'));
            }
        }

        #[test]
        fn text_cut_anywhere_gives_the_same_tail(
            text in "[a-zé€🎉\n\r]{0,200}",
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let bytes = text.as_bytes();
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            at.sort_unstable();
            let (mut whole, mut pieces) = (Tail::default(), Tail::default());
            whole.push(bytes);
            whole.finish();
            let mut from = 0;
            for to in at.into_iter().chain([bytes.len()]) {
                pieces.push(&bytes[from..to]);
                from = to;
            }
            pieces.finish();
            prop_assert_eq!(&pieces.lines, &whole.lines);
            let clean = !pieces.joined().contains(char::REPLACEMENT_CHARACTER);
            prop_assert!(clean);
        }

        #[test]
        fn tail_of_ascii_is_its_last_lines(chunks in proptest::collection::vec(ascii_chunk(), 0..12)) {
            let mut tail = Tail::default();
            for chunk in &chunks {
                tail.push(chunk);
            }
            tail.finish();
            let lines: Vec<String> = tail.lines.iter().cloned().collect();
            prop_assert_eq!(lines, model(&chunks.concat()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_is_named_by_the_md5_of_its_file_name() {
        // Fixed across versions: a worker restarted on a newer build finds
        // the journals the older one left.
        assert_eq!(
            journal_name("wikipedia_en_all_maxi_2026-11.zim"),
            ".zimfarm-upload-29903e3d1352f1e1fd8f39c6a6b73511.json"
        );
    }

    #[test]
    fn a_character_split_between_chunks_is_kept_whole() {
        let mut t = Tail::default();
        t.push("é€".as_bytes().split_at(1).0);
        t.push(&"é€".as_bytes()[1..4]);
        t.push(&"é€".as_bytes()[4..]);
        t.push(b"\xff\n\xe2\x82");
        t.finish();
        assert_eq!(t.joined(), "é€\u{fffd}\n\u{fffd}");
    }

    #[test]
    fn exit_failure_names_memory_and_sigkill() {
        let exit = |code, oom_killed| ContainerExit { code, oom_killed };
        assert_eq!(exit_failure(exit(0, false), Some(16 << 20)), None);
        assert_eq!(exit_failure(exit(0, true), Some(16 << 20)), None);
        let oom = exit_failure(exit(137, true), Some(16 << 20)).unwrap();
        assert!(
            oom.contains("memory limit (CONTAINER_MEMORY_MB=16;"),
            "{oom}"
        );
        assert!(oom.contains("OOMKilled"), "{oom}");
        let oom_no_limit = exit_failure(exit(1, true), None).unwrap();
        assert!(
            oom_no_limit.contains("CONTAINER_MEMORY_MB is not set"),
            "{oom_no_limit}"
        );
        let killed = exit_failure(exit(137, false), Some(16 << 20)).unwrap();
        assert!(
            killed.contains("SIGKILL (exit code 137) from outside"),
            "{killed}"
        );
        assert_eq!(
            exit_failure(exit(3, false), None).unwrap(),
            "the offliner exited with code 3"
        );
    }

    #[test]
    fn tail_keeps_last_lines_bounded() {
        let mut t = Tail::default();
        for i in 0..250 {
            t.push(format!("line {i}\n").as_bytes());
        }
        t.push(b"partial");
        t.push(b" end");
        t.finish();
        assert_eq!(t.lines.len(), TAIL_LINES);
        assert_eq!(t.lines.back().unwrap(), "partial end");
        assert_eq!(t.lines.front().unwrap(), "line 151");
        let mut t = Tail::default();
        t.push(&vec![b'x'; 10 * TAIL_LINE_MAX]);
        t.push(b"\n");
        assert_eq!(t.lines[0].len(), TAIL_LINE_MAX);
    }

    /// A dir `depth` levels of 50-character names below `root`.
    fn deep_dir(root: &Path, depth: usize) -> PathBuf {
        let mut dir = root.to_owned();
        for i in 0..depth {
            dir.push(format!("{i:0>50}"));
        }
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn redis_answers_on_a_socket_path_longer_than_sun_path() {
        let root = tempfile::tempdir().unwrap();
        let dir = deep_dir(root.path(), 4);
        assert!(dir.join("redis.sock").as_os_str().len() > 200);
        // Bound through the dir's descriptor too: the full path cannot be.
        let fd =
            rustix::fs::open(&dir, rustix::fs::OFlags::PATH, rustix::fs::Mode::empty()).unwrap();
        let bind = format!(
            "/proc/self/fd/{}/redis.sock",
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        );
        let listener = tokio::net::UnixListener::bind(bind).unwrap();
        let server = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut ping = [0u8; 6];
            stream.read_exact(&mut ping).await.unwrap();
            assert_eq!(&ping, b"PING\r\n");
            stream.write_all(b"+PONG\r\n").await.unwrap();
        });
        wait_for_redis(&dir, Duration::from_secs(5)).await.unwrap();
        server.await.unwrap();
    }

    /// The failure text of a wait on `dir` that must fail at once, well
    /// before its 30 s timeout.
    async fn redis_wait_failure_at_once(dir: &Path) -> String {
        let started = std::time::Instant::now();
        let Err(RunError::Failed(error)) = wait_for_redis(dir, Duration::from_secs(30)).await
        else {
            panic!("waiting on {} must fail", dir.display());
        };
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "waited {:?}",
            started.elapsed()
        );
        error.message
    }

    #[tokio::test]
    async fn redis_wait_fails_at_once_when_the_socket_dir_is_missing() {
        let root = tempfile::tempdir().unwrap();
        let missing = root.path().join("gone");
        let message = redis_wait_failure_at_once(&missing).await;
        assert!(
            message.contains(&missing.display().to_string()),
            "{message}"
        );
        assert!(message.contains("No such file or directory"), "{message}");
    }

    #[tokio::test]
    async fn redis_wait_fails_at_once_on_an_error_waiting_cannot_cure() {
        let root = tempfile::tempdir().unwrap();
        // A file where the dir should be: ENOTDIR, now and forever.
        let file = root.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let message = redis_wait_failure_at_once(&file).await;
        assert!(message.contains("Not a directory"), "{message}");
    }

    #[tokio::test]
    async fn redis_wait_timeout_names_the_last_os_error() {
        let root = tempfile::tempdir().unwrap();
        let dir = deep_dir(root.path(), 3);
        let Err(RunError::Failed(error)) = wait_for_redis(&dir, Duration::from_millis(300)).await
        else {
            panic!("no socket must time out");
        };
        assert!(error.message.contains("within 0 s"), "{}", error.message);
        assert!(
            error
                .message
                .contains("last error: No such file or directory"),
            "{}",
            error.message
        );
    }
}
