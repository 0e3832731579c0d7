//! The `zimfarm-worker` binary: reads the configuration, sets up logging and
//! signals, and runs the worker. No logic lives here.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use tracing::Instrument;
use zimfarm_worker::celery::EventKind;
use zimfarm_worker::config::{
    Config, EXIT_CONFIG, LogFormat, PipelineSettings, RunnerKind, WarehouseSettings,
};
use zimfarm_worker::ended::{EndedError, EndedLog};
use zimfarm_worker::pipeline::{DockerRunner, request_from_json};
use zimfarm_worker::runner::{RunError, Runner, SimulateRunner, TaskContext, TaskEvents};
use zimfarm_worker::warehouse::{KeyError, Warehouse, WarehouseError};
use zimfarm_worker::worker::Worker;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::RunTask { file, no_upload }) = cli.command {
        return run_task_command(&file, !no_upload);
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
        Err(error) if error.is::<EndedError>() => {
            // Like a bad variable: one line, exit 2, nothing connected.
            eprintln!("zimfarm-worker: ZIM_DIR: {error}");
            ExitCode::from(EXIT_CONFIG as u8)
        }
        Err(error)
            if error.is::<KeyError>()
                || error
                    .downcast_ref::<WarehouseError>()
                    .is_some_and(WarehouseError::is_permanent) =>
        {
            // SSH_KEY, the host key or the login: configuration to fix.
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
    match config.runner {
        RunnerKind::Docker => {
            let warehouse = Warehouse::new(config.warehouse.clone()).await?;
            check_warehouse(&warehouse).await?;
            let runner = DockerRunner::new(config.pipeline.clone(), Some(warehouse)).await?;
            let version = runner.docker().version().await?;
            tracing::info!(docker = %version, "Docker engine reachable");
            let removed = runner.remove_orphans().await?;
            if removed > 0 {
                tracing::warn!(
                    removed,
                    "removed containers left by an earlier run of this node"
                );
            }
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
        match runner.run(request.clone(), ctx).instrument(span).await {
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
                println!(
                    "{}",
                    serde_json::json!({"status": "FAILURE", "error": error.to_string(), "detail": error.detail})
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

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("LOG_LEVEL").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
