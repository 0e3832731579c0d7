//! The `zimfarm-worker` binary: parses the command line and runs one
//! command (the worker by default, `check`, `register-key`, `run-task`,
//! `healthcheck`). Each command's start-up sequence lives here: its
//! settings, logging and signals, the library call that does the work
//! (`worker`, `ops`, `pipeline`, `monitor`), and the mapping of its errors
//! to the exit codes the README documents (2 for configuration).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use tracing::Instrument;
use zimfarm_worker::celery::request_from_json;
use zimfarm_worker::celery::{EventKind, ExceptionInfo};
use zimfarm_worker::config::{
    Config, DispatcherSettings, EXIT_CONFIG, LogFormat, PipelineSettings, RunnerKind,
    WarehouseSettings,
};
use zimfarm_worker::dispatcher::{Dispatcher, DispatcherError};
use zimfarm_worker::docker::DockerError;
use zimfarm_worker::ended::{EndedError, EndedLog};
use zimfarm_worker::metrics;
use zimfarm_worker::monitor::{self, MonitorError};
use zimfarm_worker::ops::{self, KeyNotRegistered};
use zimfarm_worker::pipeline::DockerRunner;
use zimfarm_worker::runner::{RunError, Runner, SimulateRunner, TaskContext, TaskEvents};
use zimfarm_worker::warehouse::{ClientKey, KeyError, Warehouse, WarehouseError};
use zimfarm_worker::worker::{Worker, WorkerError};

/// The openZIM Zimfarm worker: runs scraper tasks sent by the Zimfarm
/// dispatcher and uploads the ZIM files to the warehouse. Configured by
/// environment variables (see the README).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker (the default).
    Run,
    /// Run one task from a JSON file through the Docker pipeline, without a
    /// broker, printing its progress: {"task": "offliner.mwoffliner",
    /// "id": "...", "kwargs": {"flags": {...}, "image": {...},
    /// "warehouse_path": "/..."}}. Needs WORKING_DIR and NODE_NAME (and
    /// ZIM_DIR when it differs).
    RunTask {
        /// The task file.
        file: std::path::PathBuf,
        /// Keep the files in ZIM_DIR/<id> instead of uploading them (then
        /// USERNAME and the warehouse variables are not needed).
        #[arg(long)]
        no_upload: bool,
    },
    /// Check that this host is ready to be a worker: one line per check
    /// (configuration, dispatcher login, SSH key registered, broker, Docker,
    /// warehouse, free disk). The exit code is the number of failed checks.
    Check,
    /// Register the public key of SSH_KEY for USERNAME at the dispatcher
    /// (log in, upload it, confirm it is listed). Needs USERNAME, PASSWORD,
    /// SSH_KEY and DISPATCHER_URL when it is not the default.
    RegisterKey {
        /// The name the key is listed under (default: NODE_NAME, or
        /// "zimfarm-worker").
        #[arg(long)]
        name: Option<String>,
    },
    /// Ask the running worker's /healthz (at METRICS_ADDR) whether it is
    /// healthy: exit 0 if it is, 1 if not. With METRICS_ADDR unset there is
    /// nothing to ask: exit 0. The Docker image's HEALTHCHECK runs this.
    Healthcheck,
}

fn main() -> ExitCode {
    zimfarm_worker::memory::return_large_blocks_to_the_system();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::RunTask { file, no_upload }) => return run_task_command(&file, !no_upload),
        Some(Command::Check) => return check_command(),
        Some(Command::RegisterKey { name }) => return register_key_command(name),
        Some(Command::Healthcheck) => return healthcheck_command(),
        Some(Command::Run) | None => {}
    }
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(error) => {
            eprintln!("zimfarm-worker: {error}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    init_logging(config.log_format);
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let result = runtime.block_on(run(config));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is::<MonitorError>() => {
            eprintln!("zimfarm-worker: {error}");
            ExitCode::from(EXIT_CONFIG as u8)
        }
        Err(error) if error.is::<EndedError>() => {
            // Like a bad variable: one line, exit 2, nothing connected.
            eprintln!("zimfarm-worker: ZIM_DIR: {error}");
            ExitCode::from(EXIT_CONFIG as u8)
        }
        Err(error)
            if error.is::<KeyError>()
                || error.is::<KeyNotRegistered>()
                || error
                    .downcast_ref::<WorkerError>()
                    .is_some_and(WorkerError::is_configuration)
                || error.downcast_ref::<DockerError>().is_some_and(|e| {
                    matches!(e, DockerError::Connect(_) | DockerError::SocketPath { .. })
                })
                || error
                    .downcast_ref::<WarehouseError>()
                    .is_some_and(WarehouseError::is_permanent)
                || error
                    .downcast_ref::<DispatcherError>()
                    .is_some_and(|e| !e.is_transient()) =>
        {
            // Credentials, SSH_KEY, the host key: configuration to fix.
            tracing::error!("{error}");
            eprintln!("zimfarm-worker: {error}");
            ExitCode::from(EXIT_CONFIG as u8)
        }
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("zimfarm-worker: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// One thread: the worker waits on the network and the Docker engine, and
/// lapin runs its own I/O thread. CPU-heavy work goes to `spawn_blocking`.
fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(error) => {
            eprintln!("zimfarm-worker: cannot start the async runtime: {error}");
            None
        }
    }
}

/// Opens the record of ended tasks in ZIM_DIR (an [`EndedError`] if it
/// can't), then runs the worker until SIGTERM/SIGINT.
async fn run(config: Config) -> anyhow::Result<()> {
    let ended = EndedLog::open(&config.pipeline.zim_dir).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    metrics::global().set_info(&config.node_name);
    let monitor = match config.metrics_addr {
        Some(addr) => {
            let listener = monitor::bind(addr).await?;
            Some(tokio::spawn(monitor::serve(listener, shutdown.clone())))
        }
        None => None,
    };
    let dispatcher = login(&config).await?;
    let keeper = dispatcher.spawn_keeper(shutdown.clone());
    let result = serve(config, dispatcher, ended, shutdown.clone()).await;
    shutdown.cancel();
    let _ = keeper.await;
    if let Some(monitor) = monitor {
        let _ = monitor.await;
    }
    result
}

/// Logs in to the dispatcher. Refused credentials end the process; a
/// dispatcher that is down is a warning (the token keeper retries, and
/// tasks are served meanwhile).
async fn login(config: &Config) -> anyhow::Result<Dispatcher> {
    let d = Dispatcher::from_settings(&config.dispatcher())?;
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

/// Runs the worker with its runner until shutdown.
async fn serve(
    config: Config,
    dispatcher: Dispatcher,
    ended: EndedLog,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    match config.runner {
        RunnerKind::Docker => {
            let warehouse = Warehouse::new(config.warehouse.clone()).await?;
            if dispatcher.is_logged_in() {
                check_key_registered(&dispatcher, warehouse.key(), &config.username).await?;
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
) -> anyhow::Result<()> {
    match ops::key_status(dispatcher, key).await {
        ops::KeyStatus::Registered => {
            tracing::info!(
                key = %key.path().display(),
                md5 = %key.md5_fingerprint(),
                "the SSH key is registered at the dispatcher"
            );
            Ok(())
        }
        ops::KeyStatus::NotRegistered => {
            Err(KeyNotRegistered(ops::unregistered_message(key, username)).into())
        }
        ops::KeyStatus::Unknown(error) => {
            tracing::warn!(%error, "cannot check that the SSH key is registered");
            Ok(())
        }
    }
}

/// `check`: prints one line per check; exits with the number of failures.
fn check_command() -> ExitCode {
    init_logging_to_stderr_quietly();
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let failed = runtime.block_on(ops::check(Config::from_env(), |line| println!("{line}")));
    ExitCode::from(failed.min(255) as u8)
}

/// `register-key`: the seed README's three curl steps.
fn register_key_command(name: Option<String>) -> ExitCode {
    let settings = match DispatcherSettings::from_env() {
        Ok(s) => s,
        Err(error) => {
            eprintln!("zimfarm-worker: {error}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let ssh_key = match WarehouseSettings::from_env() {
        Ok(s) => s.ssh_key,
        Err(error) => {
            eprintln!("zimfarm-worker: {error}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let name = name
        .or_else(zimfarm_worker::config::node_name_from_env)
        .unwrap_or_else(|| "zimfarm-worker".to_owned());
    init_logging_to_stderr_quietly();
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    if let Ok(key) = runtime.block_on(ClientKey::load(&ssh_key))
        && !key.is_rsa()
    {
        eprintln!(
            "zimfarm-worker: note: {} is an {} key; the Zimfarm dispatcher has accepted only RSA keys, \
             so if it refuses this one, make an RSA key (ssh-keygen -t rsa -b 4096) and point SSH_KEY at it",
            ssh_key.display(),
            key.algorithm()
        );
    }
    match runtime.block_on(ops::register_key(&settings, &ssh_key, &name)) {
        Ok(ops::Registered::Added { fingerprint }) => {
            println!(
                "registered {} (MD5 {fingerprint}) as {name:?} for {}; it is listed by the dispatcher",
                ssh_key.display(),
                settings.username
            );
            ExitCode::SUCCESS
        }
        Ok(ops::Registered::AlreadyThere { fingerprint }) => {
            println!(
                "{} (MD5 {fingerprint}) is registered for {} already; nothing to do",
                ssh_key.display(),
                settings.username
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("zimfarm-worker: {error}");
            match error {
                ops::RegisterError::Key(_) => ExitCode::from(EXIT_CONFIG as u8),
                ops::RegisterError::Dispatcher(e) if !e.is_transient() => {
                    ExitCode::from(EXIT_CONFIG as u8)
                }
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// The operator commands print their own lines; the log says only what
/// went wrong, on stderr.
fn init_logging_to_stderr_quietly() {
    let filter = log_filter("error");
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
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

/// `healthcheck`: the running worker's `/healthz`, as an exit code.
fn healthcheck_command() -> ExitCode {
    let addr = match zimfarm_worker::config::metrics_addr_from_env() {
        Ok(Some(addr)) => addr,
        Ok(None) => {
            println!(
                "METRICS_ADDR is not set: the worker serves no health endpoint; nothing to check"
            );
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("zimfarm-worker: {error}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(monitor::probe(addr)) {
        Ok(health) if health.healthy => {
            println!(
                "healthy: {}",
                serde_json::to_string(&health).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Ok(health) => {
            println!(
                "unhealthy: {}",
                health.problem.as_deref().unwrap_or("no reason given")
            );
            ExitCode::FAILURE
        }
        Err(error) => {
            println!("unhealthy: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `run-task FILE`: one task through the pipeline, no broker.
fn run_task_command(file: &std::path::Path, upload: bool) -> ExitCode {
    let settings = match PipelineSettings::from_env() {
        Ok(s) => s,
        Err(error) => {
            eprintln!("zimfarm-worker: {error}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let warehouse_settings = if upload {
        match WarehouseSettings::from_env() {
            Ok(s) => Some(s),
            Err(error) => {
                eprintln!("zimfarm-worker: {error} (or pass --no-upload)");
                return ExitCode::from(EXIT_CONFIG as u8);
            }
        }
    } else {
        None
    };
    init_logging(LogFormat::Text);
    let request = match std::fs::read_to_string(file)
        .map_err(|e| e.to_string())
        .and_then(|text| request_from_json(&text))
    {
        Ok(r) => r,
        Err(error) => {
            eprintln!(
                "zimfarm-worker: cannot read the task file {}: {error}",
                file.display()
            );
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async move {
        let warehouse = match warehouse_settings {
            None => None,
            Some(s) => match Warehouse::new(s).await {
                Ok(w) => Some(w),
                Err(error) => {
                    eprintln!("zimfarm-worker: {error}");
                    return ExitCode::from(EXIT_CONFIG as u8);
                }
            },
        };
        let runner = match DockerRunner::new(settings, warehouse).await {
            Ok(r) => r,
            Err(error) => {
                eprintln!("zimfarm-worker: {error}");
                return ExitCode::FAILURE;
            }
        };
        let cancel = CancellationToken::new();
        tokio::spawn(watch_signals(cancel.clone()));
        let ctx = TaskContext::new(request.id.clone(), cancel, Arc::new(PrintEvents));
        let request = Arc::new(request);
        let span = tracing::info_span!("task", task_id = %request.id);
        let outcome = match runner.plan(&request) {
            Ok(plan) => runner.run(plan, ctx).instrument(span).await,
            Err(refused) => Err(refused.into()),
        };
        match outcome {
            Ok(files) => {
                // Uploaded (or kept, with --no-upload): the task dir can go.
                runner.release(&request.id).await;
                println!(
                    "{}",
                    serde_json::json!({"status": "SUCCESS", "files": files})
                );
                ExitCode::SUCCESS
            }
            Err(RunError::Cancelled) => {
                println!("{}", serde_json::json!({"status": "REVOKED"}));
                ExitCode::from(130)
            }
            Err(RunError::Failed(error)) => {
                let info = ExceptionInfo::from(&error);
                let error = format!("{}: {}", info.exc_type, info.message);
                println!(
                    "{}",
                    serde_json::json!({"status": "FAILURE", "error": error, "detail": info.traceback})
                );
                ExitCode::FAILURE
            }
        }
    })
}

/// Prints a task's events as JSON lines (for `run-task`).
struct PrintEvents;

impl TaskEvents for PrintEvents {
    fn emit(&self, event: EventKind) {
        if let EventKind::Custom {
            event_type, fields, ..
        } = event
        {
            println!(
                "{}",
                serde_json::json!({"event": event_type, "fields": fields})
            );
        }
    }
}

/// Fires `shutdown` on SIGTERM or SIGINT.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; use SIGKILL to stop");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received; shutting down"),
    }
    shutdown.cancel();
}

/// The log filter `LOG_LEVEL` says, or `default` when it is unset or not a
/// valid filter.
fn log_filter(default: &str) -> tracing_subscriber::EnvFilter {
    zimfarm_worker::config::log_level_from_env()
        .and_then(|directives| tracing_subscriber::EnvFilter::try_new(directives).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(default))
}

fn init_logging(format: LogFormat) {
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
