//! The `zimfarm-worker` binary: reads the configuration, sets up logging and
//! signals, and runs the worker. No logic lives here.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use zimfarm_worker::config::{Config, EXIT_CONFIG, LogFormat, RunnerKind};
use zimfarm_worker::runner::SimulateRunner;
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(error) => {
            eprintln!("zimfarm-worker: {error}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    init_logging(config.log_format);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("zimfarm-worker: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Run) {
            Command::Run => run(config).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("zimfarm-worker: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    match config.runner {
        RunnerKind::Simulate => {
            tracing::warn!("TASK_RUNNER=simulate: tasks are simulated, no container runs");
            Worker::new(config, SimulateRunner)?.run(shutdown).await?;
        }
    }
    Ok(())
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
