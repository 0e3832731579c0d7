//! Start-up: the order in which the worker comes up (the record of ended
//! tasks, signals, the metrics listener, the dispatcher login, the SSH key
//! and the warehouse, the Docker engine and the scrapers' network, then
//! the worker until shutdown), the process's runtime, logging and signal
//! set-up that every command shares, and [`StartupError`]: every way a
//! command can fail before or instead of doing its work, with its exit code
//! and how it is reported.
//!
//! It must not parse the command line (`main.rs` does) nor hold task logic
//! (the worker does): each step here is a library call and a verdict.

use std::error::Error as _;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{Config, ConfigError, EXIT_CONFIG, LogFormat, RunnerKind};
use crate::dispatcher::{Dispatcher, DispatcherError};
use crate::docker::DockerError;
use crate::ended::{EndedError, EndedLog};
use crate::metrics;
use crate::monitor::{self, MonitorError};
use crate::ops::{self, RegisterError};
use crate::pipeline::DockerRunner;
use crate::runner::SimulateRunner;
use crate::scraper_net::NetError;
use crate::warehouse::{ClientKey, KeyError, Warehouse, WarehouseError};
use crate::worker::{Shutdown, StopMode, Worker, WorkerError};

/// Why a command could not do its work. Each variant says its exit code
/// ([`StartupError::exit_code`]: 2 for configuration to fix, as the
/// README documents, 1 otherwise) and how it is reported.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A variable is bad or missing.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `run-task`: the warehouse's variables, needed to upload.
    #[error("{0} (or pass --no-upload)")]
    UploadConfig(ConfigError),
    /// `run-task`: the task file cannot be read or is not a task.
    #[error("cannot read the task file {}: {problem}", path.display())]
    TaskFile { path: PathBuf, problem: String },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// The record of ended tasks cannot be opened in ZIM_DIR.
    #[error("ZIM_DIR: {0}")]
    ZimDir(EndedError),
    /// The metrics listener cannot bind METRICS_ADDR.
    #[error(transparent)]
    Monitor(#[from] MonitorError),
    #[error(transparent)]
    Dispatcher(#[from] DispatcherError),
    /// SSH_KEY is missing or unusable.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The SSH key is not registered at the dispatcher: the message says
    /// the command that fixes it.
    #[error("{0}")]
    KeyNotRegistered(String),
    #[error(transparent)]
    Warehouse(#[from] WarehouseError),
    #[error(transparent)]
    Docker(#[from] DockerError),
    /// The scrapers' network cannot be made or found.
    #[error(transparent)]
    ScraperNetwork(#[from] NetError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// `register-key` failed.
    #[error(transparent)]
    Register(#[from] RegisterError),
    /// `run-task`: the pipeline cannot be set up.
    #[error(transparent)]
    RunTask(#[from] RunTaskError),
}

/// Why `run-task` could not set its pipeline up.
#[derive(Debug, thiserror::Error)]
pub enum RunTaskError {
    #[error(transparent)]
    Key(KeyError),
    #[error(transparent)]
    Docker(DockerError),
    #[error(transparent)]
    Network(NetError),
}

/// How an error is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Report {
    /// One line on stderr, not logged: before logging is set up, or where
    /// the log would only repeat it.
    Line,
    /// Logged and on stderr: configuration found wrong by trying it
    /// (credentials, SSH_KEY, the host key, the Docker socket).
    Fix,
    /// Logged and on stderr with its causes.
    Failure,
}

impl StartupError {
    fn report_kind(&self) -> Report {
        match self {
            Self::Config(_)
            | Self::UploadConfig(_)
            | Self::TaskFile { .. }
            | Self::Runtime(_)
            | Self::ZimDir(_)
            | Self::Monitor(_)
            | Self::Register(_)
            | Self::RunTask(_) => Report::Line,
            Self::Key(_) | Self::KeyNotRegistered(_) => Report::Fix,
            Self::Dispatcher(e) if !e.is_transient() => Report::Fix,
            Self::Warehouse(e) if e.is_permanent() => Report::Fix,
            Self::Docker(DockerError::Connect(_) | DockerError::SocketPath { .. })
            | Self::ScraperNetwork(NetError::Docker(
                DockerError::Connect(_) | DockerError::SocketPath { .. },
            )) => Report::Fix,
            Self::ScraperNetwork(NetError::Missing(_) | NetError::NotOurs { .. }) => Report::Fix,
            Self::Worker(e) if e.is_configuration() => Report::Fix,
            Self::Dispatcher(_)
            | Self::Warehouse(_)
            | Self::Docker(_)
            | Self::ScraperNetwork(_)
            | Self::Worker(_) => Report::Failure,
        }
    }

    /// The process's exit code: 2 for configuration to fix, 1 otherwise.
    pub fn exit_code(&self) -> ExitCode {
        let config = match self {
            Self::Runtime(_) | Self::RunTask(RunTaskError::Docker(_)) => false,
            Self::RunTask(RunTaskError::Network(e)) => {
                matches!(e, NetError::Missing(_) | NetError::NotOurs { .. })
            }
            Self::Register(RegisterError::Key(_)) => true,
            Self::Register(RegisterError::Dispatcher(e)) => !e.is_transient(),
            Self::Register(RegisterError::NotListed { .. }) => false,
            _ => self.report_kind() != Report::Failure,
        };
        if config {
            ExitCode::from(EXIT_CONFIG as u8)
        } else {
            ExitCode::FAILURE
        }
    }

    /// Says what went wrong: on stderr, and in the log where it belongs.
    pub fn report(&self) {
        let kind = self.report_kind();
        let text = match kind {
            Report::Line | Report::Fix => self.to_string(),
            Report::Failure => with_causes(self),
        };
        if kind != Report::Line {
            tracing::error!("{text}");
        }
        eprintln!("zimfarm-worker: {text}");
    }
}

/// The error and its causes, `: `-separated.
fn with_causes(error: &StartupError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// One thread: the worker waits on the network and the Docker engine, and
/// lapin runs its own I/O thread. CPU-heavy work goes to `spawn_blocking`.
pub fn runtime() -> Result<tokio::runtime::Runtime, StartupError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartupError::Runtime)
}

/// The worker from its validated configuration to its shutdown: opens the
/// record of ended tasks in ZIM_DIR, watches SIGTERM/SIGINT (leave) and
/// SIGQUIT (stop for good), starts the metrics listener, logs in, then
/// serves until shutdown.
pub async fn run_worker(config: Config) -> Result<(), StartupError> {
    let ended = EndedLog::open(&config.pipeline.zim_dir)
        .await
        .map_err(StartupError::ZimDir)?;
    let shutdown = Shutdown::new();
    let signals = tokio::spawn(watch_signals(shutdown.clone()));
    metrics::global().set_info(&config.pipeline.node_name);
    let monitor = match config.worker.metrics_addr {
        Some(addr) => {
            let listener = monitor::bind(addr).await?;
            Some(tokio::spawn(monitor::serve(
                listener,
                shutdown.token().clone(),
            )))
        }
        None => None,
    };
    let dispatcher = login(&config).await?;
    let keeper = dispatcher.spawn_keeper(shutdown.token().clone());
    let result = serve(config, dispatcher, ended, shutdown.clone()).await;
    shutdown.stop_for_good();
    signals.abort();
    let _ = keeper.await;
    if let Some(monitor) = monitor {
        let _ = monitor.await;
    }
    result
}

/// Logs in to the dispatcher. Refused credentials end the process; a
/// dispatcher that is down is a warning (the token keeper retries, and
/// tasks are served meanwhile).
async fn login(config: &Config) -> Result<Dispatcher, StartupError> {
    let d = Dispatcher::from_settings(&config.dispatcher)?;
    match d.login().await {
        // The dispatcher module logs the login itself.
        Ok(()) => {}
        Err(error) if error.is_transient() => tracing::warn!(
            %error,
            "dispatcher not reachable now; logging in again in the background, serving tasks meanwhile"
        ),
        Err(error) => return Err(error.into()),
    }
    Ok(d)
}

/// Runs the worker with its runner until shutdown: for Docker, after
/// checking the SSH key, the warehouse and the engine.
async fn serve(
    config: Config,
    dispatcher: Dispatcher,
    ended: EndedLog,
    shutdown: Shutdown,
) -> Result<(), StartupError> {
    match config.worker.runner {
        RunnerKind::Docker => {
            let warehouse = Warehouse::new(config.warehouse.clone()).await?;
            if dispatcher.is_logged_in() {
                check_key_registered(&dispatcher, warehouse.key(), &config.dispatcher.username)
                    .await?;
            }
            check_warehouse(&warehouse).await?;
            let runner = DockerRunner::new(config.pipeline.clone(), Some(warehouse)).await?;
            let version = runner.docker().version().await?;
            tracing::info!(docker = %version, "Docker engine reachable");
            Worker::new(config, runner, ended)?.run(shutdown).await?;
        }
        RunnerKind::Simulate => {
            tracing::warn!("TASK_RUNNER=simulate: tasks are simulated, no container runs");
            Worker::new(config, SimulateRunner, ended)?
                .run(shutdown)
                .await?;
        }
    }
    Ok(())
}

/// The SSH key must be registered at the dispatcher, or the warehouse will
/// refuse every upload: stop now with the command that fixes it.
async fn check_key_registered(
    dispatcher: &Dispatcher,
    key: &ClientKey,
    username: &str,
) -> Result<(), StartupError> {
    match ops::key_status(dispatcher, key).await {
        ops::KeyStatus::Registered => {
            tracing::info!(
                key = %key.path().display(),
                md5 = %key.md5_fingerprint(),
                "the SSH key is registered at the dispatcher"
            );
            Ok(())
        }
        ops::KeyStatus::NotRegistered => Err(StartupError::KeyNotRegistered(
            ops::unregistered_message(key, username),
        )),
        ops::KeyStatus::Unknown(error) => {
            tracing::warn!(%error, "cannot check that the SSH key is registered");
            Ok(())
        }
    }
}

/// Connects to the warehouse once at start-up, so that an untrusted host
/// key or a refused SSH key stops the worker now rather than after a
/// two-day scrape. A warehouse that is merely unreachable is only a
/// warning: uploads retry when tasks get there.
async fn check_warehouse(warehouse: &Warehouse) -> Result<(), WarehouseError> {
    let settings = warehouse.settings();
    match warehouse.probe().await {
        Ok(()) => {
            tracing::info!(
                host = %settings.host,
                port = settings.port,
                key = %warehouse.key().sha256_fingerprint(),
                "warehouse reachable: host key verified, SSH key accepted"
            );
            Ok(())
        }
        Err(error) if error.is_permanent() => Err(error),
        Err(error) => {
            tracing::warn!(%error, "warehouse not reachable now; uploads will retry when tasks get there");
            Ok(())
        }
    }
}

/// Fires `shutdown` on the first of SIGTERM or SIGINT (leave: a restart,
/// an upgrade; running scrapes are left for the next start) or SIGQUIT
/// (stop for good).
pub async fn watch_signals(shutdown: Shutdown) {
    let Some((signal, mode)) = stop_signal().await else {
        return;
    };
    match mode {
        StopMode::Leave => tracing::info!(
            "{signal} received; leaving: running scrapes carry on at the next start of this \
             node (SIGQUIT stops them)"
        ),
        StopMode::ForGood => tracing::info!(
            "{signal} received; stopping for good: every task is stopped, its message goes back \
             to the queue"
        ),
    }
    shutdown.fire(mode);
}

/// The first of SIGTERM, SIGINT (leave) or SIGQUIT (stop for good) to
/// arrive, named; `None` when the handlers cannot be installed (logged).
pub async fn stop_signal() -> Option<(&'static str, StopMode)> {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::quit()),
    ) else {
        tracing::error!("cannot install signal handlers; use SIGKILL to stop");
        return None;
    };
    Some(tokio::select! {
        _ = term.recv() => ("SIGTERM", StopMode::Leave),
        _ = int.recv() => ("SIGINT", StopMode::Leave),
        _ = quit.recv() => ("SIGQUIT", StopMode::ForGood),
    })
}

/// The log filter `LOG_LEVEL` says, or `default` when it is unset or not a
/// valid filter.
fn log_filter(default: &str) -> tracing_subscriber::EnvFilter {
    crate::config::log_level_from_env()
        .and_then(|directives| tracing_subscriber::EnvFilter::try_new(directives).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(default))
}

/// The worker's log (and `run-task`'s): stderr, at `LOG_LEVEL` or info.
pub fn init_logging(format: LogFormat) {
    let filter = log_filter("info");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        // One object per line: the event's fields at the top level, and the
        // spans (`task` with `task_id`, `stage` with `stage`) under "spans".
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .init(),
    }
}

/// The operator commands print their own lines; the log says only what
/// went wrong, on stderr.
pub fn init_logging_to_stderr_quietly() {
    let filter = log_filter("error");
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}
