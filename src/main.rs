//! The `zimfarm-worker` binary: parse the command line, run one command
//! (the worker by default, `check`, `register-key`, `run-task`,
//! `healthcheck`), map its outcome to the exit code. The start-up order of
//! the worker, the errors a command can end with and their exit codes (2
//! for configuration, as the README documents) live in `startup`; the work
//! itself in the library (`worker`, `ops`, `pipeline`, `monitor`). What is
//! left here is each command's wiring: the settings it reads, its logging,
//! its output, and for `run-task` the plan, run and release of its one
//! task.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tracing::Instrument;

use zimfarm_worker::celery::{EventKind, ExceptionInfo, request_from_json};
use zimfarm_worker::config::{
    self, Config, DispatcherSettings, LogFormat, PipelineSettings, WarehouseSettings,
};
use zimfarm_worker::monitor;
use zimfarm_worker::ops;
use zimfarm_worker::pipeline::DockerRunner;
use zimfarm_worker::runner::{
    CancelReason, Cancellation, RunError, Runner, TaskContext, TaskEvents,
};
use zimfarm_worker::startup::{self, RunTaskError, StartupError};
use zimfarm_worker::warehouse::{ClientKey, Warehouse};

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
    /// List this host's tasks, one line each: id, offliner, state, stage,
    /// progress, age, memory, container. Asks the running worker (over
    /// its socket in ZIM_DIR/.zimfarm); when none runs, lists what the
    /// task records and Docker say was left for the next start. Needs the
    /// worker's environment (WORKING_DIR, NODE_NAME, ZIM_DIR).
    Ps {
        /// Print a JSON array instead, for scripts.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    zimfarm_worker::memory::return_large_blocks_to_the_system();
    let command = Cli::command().after_long_help(config::vars::help());
    let cli = Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    match run(cli.command.unwrap_or(Command::Run)) {
        Ok(code) => code,
        Err(error) => {
            error.report();
            error.exit_code()
        }
    }
}

/// Runs one command: its own exit code when it did its work (`check`
/// counts its failures, `healthcheck` and `run-task` say how it went), a
/// [`StartupError`] when it could not.
fn run(command: Command) -> Result<ExitCode, StartupError> {
    match command {
        Command::Run => run_worker(),
        Command::RunTask { file, no_upload } => run_task_command(&file, !no_upload),
        Command::Check => check_command(),
        Command::RegisterKey { name } => register_key_command(name),
        Command::Healthcheck => healthcheck_command(),
        Command::Ps { json } => ps_command(json),
    }
}

/// The worker, until SIGTERM/SIGINT.
fn run_worker() -> Result<ExitCode, StartupError> {
    let config = Config::from_env()?;
    startup::init_logging(config.worker.log_format);
    startup::runtime()?.block_on(startup::run_worker(config))?;
    Ok(ExitCode::SUCCESS)
}

/// `check`: prints one line per check; exits with the number of failures.
fn check_command() -> Result<ExitCode, StartupError> {
    startup::init_logging_to_stderr_quietly();
    let runtime = startup::runtime()?;
    let failed = runtime.block_on(ops::check(Config::from_env(), |line| println!("{line}")));
    Ok(ExitCode::from(failed.min(255) as u8))
}

/// `register-key`: the seed README's three curl steps.
fn register_key_command(name: Option<String>) -> Result<ExitCode, StartupError> {
    let settings = DispatcherSettings::from_env()?;
    let ssh_key = WarehouseSettings::from_env()?.ssh_key;
    let name = name
        .or_else(config::node_name_from_env)
        .unwrap_or_else(|| "zimfarm-worker".to_owned());
    startup::init_logging_to_stderr_quietly();
    let runtime = startup::runtime()?;
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
    match runtime.block_on(ops::register_key(&settings, &ssh_key, &name))? {
        ops::Registered::Added { fingerprint } => println!(
            "registered {} (MD5 {fingerprint}) as {name:?} for {}; it is listed by the dispatcher",
            ssh_key.display(),
            settings.username
        ),
        ops::Registered::AlreadyThere { fingerprint } => println!(
            "{} (MD5 {fingerprint}) is registered for {} already; nothing to do",
            ssh_key.display(),
            settings.username
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// `healthcheck`: the running worker's `/healthz`, as an exit code.
fn healthcheck_command() -> Result<ExitCode, StartupError> {
    let Some(addr) = config::metrics_addr_from_env()? else {
        println!("METRICS_ADDR is not set: the worker serves no health endpoint; nothing to check");
        return Ok(ExitCode::SUCCESS);
    };
    let runtime = startup::runtime()?;
    Ok(match runtime.block_on(monitor::probe(addr)) {
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
    })
}

/// `ps`: this host's tasks, from the running worker or what was left.
fn ps_command(json: bool) -> Result<ExitCode, StartupError> {
    let settings = PipelineSettings::from_env()?;
    startup::init_logging_to_stderr_quietly();
    let runtime = startup::runtime()?;
    let listed = runtime.block_on(async {
        match zimfarm_worker::ps::ask(&settings.zim_dir).await? {
            Some(rows) => Ok((rows, true)),
            None => zimfarm_worker::ps::left_behind(&settings)
                .await
                .map(|rows| (rows, false)),
        }
    });
    let (rows, running) = match listed {
        Ok(listed) => listed,
        Err(error) => {
            eprintln!("zimfarm-worker ps: {error}");
            return Ok(ExitCode::FAILURE);
        }
    };
    if json {
        println!("{}", serde_json::to_string(&rows).unwrap_or_default());
    } else {
        if !running {
            eprintln!(
                "no worker runs with ZIM_DIR={}: listing what the last one left for the next start",
                settings.zim_dir.display()
            );
        }
        print!("{}", zimfarm_worker::ps::table(&rows));
    }
    Ok(ExitCode::SUCCESS)
}

/// `run-task FILE`: one task through the pipeline, no broker.
fn run_task_command(file: &Path, upload: bool) -> Result<ExitCode, StartupError> {
    let settings = PipelineSettings::from_env()?;
    let progress_interval = config::progress_interval_from_env()?;
    let warehouse_settings = if upload {
        Some(WarehouseSettings::from_env().map_err(StartupError::UploadConfig)?)
    } else {
        None
    };
    startup::init_logging(LogFormat::Text);
    let request = std::fs::read_to_string(file)
        .map_err(|e| e.to_string())
        .and_then(|text| request_from_json(&text))
        .map_err(|problem| StartupError::TaskFile {
            path: file.to_owned(),
            problem,
        })?;
    startup::runtime()?.block_on(async move {
        let warehouse = match warehouse_settings {
            None => None,
            Some(s) => Some(Warehouse::new(s).await.map_err(RunTaskError::Key)?),
        };
        let runner = DockerRunner::new(settings, warehouse)
            .await
            .map_err(RunTaskError::Network)?;
        // Every signal stops the task for good: nothing adopts it later.
        let cancel = Cancellation::new();
        let on_signal = cancel.clone();
        let signals = tokio::spawn(async move {
            if let Some((signal, _)) = startup::stop_signal().await {
                tracing::info!("{signal} received; stopping the task");
                on_signal.cancel(CancelReason::Shutdown);
            }
        });
        let ctx =
            TaskContext::with_cancellation(request.id.clone(), cancel, Arc::new(PrintEvents));
        let request = Arc::new(request);
        // Its task-progress events, printed like the others.
        let reporter = tokio::spawn(ctx.report_progress(progress_interval));
        let span = tracing::info_span!("task", task_id = %request.id);
        let outcome = match runner.plan(&request) {
            Ok(plan) => runner.run(plan, ctx).instrument(span).await,
            Err(refused) => Err(refused.into()),
        };
        signals.abort();
        reporter.abort();
        Ok(match outcome {
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
        })
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
