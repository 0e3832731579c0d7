//! Configuration: the environment read once into a typed, validated
//! [`Config`] of nested settings (dispatcher, broker, warehouse, pipeline,
//! worker), or into one group of them for a command that needs only that.
//!
//! Owns every environment variable of the README's Environment table, each
//! defined once in [`vars::TABLE`] (name, what unset means, doc line,
//! parser; a test holds the README to it): `LOG_LEVEL` is read from there
//! for the logging set-up, and `DOCKER_HOST` alone is read where the Docker
//! client is made, as Docker's tools do. Also owns the redaction of
//! secrets. It must not touch the network: everything here is checked
//! before the first connection, so a typo costs the operator one clear line
//! and exit code 2, not a crash loop.

mod load;
mod parse;
pub mod vars;

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use lapin::uri::{AMQPScheme, AMQPUri};

pub use crate::control::ControlPolicy;
pub use crate::docker::{LogLimit, PullPolicy};
use crate::offliner::AllowList;
pub use parse::{CONTAINER_LOG_FILES, MAX_DIR_LEN};
use vars::Env;

/// The exit code for a configuration error, as documented in the README.
pub const EXIT_CONFIG: i32 = 2;

/// AMQP short strings (queue names, consumer tags) hold 255 bytes.
pub const AMQP_NAME_MAX: usize = 255;

/// A secret string (password, token, key material). It cannot be printed:
/// `Debug` and `Display` both show `***`. Use [`Secret::expose`] at the one
/// place that really needs the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value, for the one call that sends it somewhere.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The broker URL. It embeds the password, so it is redacted like a
/// [`Secret`]; `Display` shows the URL with the password as `***`.
#[derive(Clone)]
pub struct BrokerUrl(AMQPUri);

impl BrokerUrl {
    /// The parsed URI, to connect with.
    pub fn uri(&self) -> &AMQPUri {
        &self.0
    }

    pub fn is_tls(&self) -> bool {
        self.0.scheme == AMQPScheme::AMQPS
    }

    pub fn vhost(&self) -> &str {
        &self.0.vhost
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let uri = &self.0;
        let scheme = match uri.scheme {
            AMQPScheme::AMQP => "amqp",
            AMQPScheme::AMQPS => "amqps",
        };
        write!(
            f,
            "{scheme}://{}:***@{}:{}/{}",
            uri.authority.userinfo.username, uri.authority.host, uri.authority.port, uri.vhost
        )
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrl({self})")
    }
}

/// The queues a worker may consume (SPEC §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueName {
    Default,
    Small,
    Medium,
    Large,
    Debug,
}

impl QueueName {
    pub const ALL: [QueueName; 5] = [
        QueueName::Default,
        QueueName::Small,
        QueueName::Medium,
        QueueName::Large,
        QueueName::Debug,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            QueueName::Default => "default",
            QueueName::Small => "small",
            QueueName::Medium => "medium",
            QueueName::Large => "large",
            QueueName::Debug => "debug",
        }
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for QueueName {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        QueueName::ALL
            .into_iter()
            .find(|q| q.as_str() == s)
            .ok_or(())
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// What runs a task once it has been accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerKind {
    /// The real pipeline: offliner containers through the Docker engine.
    Docker,
    /// Simulates a task without Docker: sleeps, fails or succeeds as the
    /// task's `simulate` kwarg asks. For tests, benchmarks and demos.
    Simulate,
}

/// Everything the Docker pipeline needs, also on its own (`run-task`).
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    /// The working dir's path on the host, for bind mounts of containers.
    pub working_dir: PathBuf,
    /// Where the working dir is seen by this process.
    pub zim_dir: PathBuf,
    pub node_name: String,
    pub pull_policy: PullPolicy,
    /// A container printing nothing for this long is killed.
    pub idle_timeout: Duration,
    /// A task does not start with less free space than this in ZIM_DIR.
    pub min_free_disk: u64,
    /// A kept task dir (its upload failed) is swept once this old; `None`:
    /// only under disk pressure.
    pub kept_dir_max_age: Option<Duration>,
    pub container_memory: Option<i64>,
    pub container_nano_cpus: Option<i64>,
    /// Bound on Docker's own copy of each container's output; `None`
    /// (CONTAINER_LOG_MAX_MB=0) keeps the engine's log config.
    pub container_log_limit: Option<LogLimit>,
    /// Most processes and threads an offliner container may have.
    pub container_pids: i64,
    /// Memory limit of the redis helper, in bytes.
    pub redis_memory: i64,
    /// An operator-made network for offliners; `None`: the worker's own.
    pub scraper_network: Option<String>,
    pub image_allowlist: AllowList,
    pub redis_image: String,
}

/// The SFTP warehouse: where ZIM files go, and how the worker proves who
/// it is and checks who the server is.
#[derive(Debug, Clone)]
pub struct WarehouseSettings {
    pub host: String,
    pub port: u16,
    /// The SFTP login (the Zimfarm USERNAME).
    pub username: String,
    /// The private key file (SSH_KEY).
    pub ssh_key: PathBuf,
    /// A known_hosts file consulted for the warehouse's host key.
    pub known_hosts: PathBuf,
    /// Host-key fingerprints (`SHA256:...`) trusted besides known_hosts.
    pub host_key_pins: Vec<String>,
    /// Attempts in a row that make no progress before an upload fails for
    /// good (each waits longer before the next).
    pub upload_retries: u32,
    /// SSH connections a large file is written over at once.
    pub upload_streams: UploadStreams,
}

/// How many SSH connections (each with one SFTP session) one file is
/// written over: OpenSSH's server gives a session 2 MiB of window per round
/// trip, so a far warehouse needs several to fill the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadStreams {
    /// Chosen per file from the measured round trip and the file's size.
    Auto,
    /// This many (1 to [`MAX_UPLOAD_STREAMS`]), fewer for small files.
    Fixed(u8),
}

/// The most SSH connections one upload opens.
pub const MAX_UPLOAD_STREAMS: u8 = 16;

/// The Zimfarm dispatcher's API and the account to log in with.
#[derive(Debug, Clone)]
pub struct DispatcherSettings {
    /// API base, without a trailing `/`.
    pub url: String,
    pub username: String,
    pub password: Secret,
}

/// The broker: where it is, the CA to trust, and the queues to consume
/// (SPEC §2).
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub url: BrokerUrl,
    /// Extra CA certificate (PEM) trusted for `amqps://` brokers.
    pub ca_file: Option<PathBuf>,
    pub queues: Vec<QueueName>,
}

/// The worker process itself: how many tasks at once, how it stops, what
/// it accepts, what runs tasks, and how it logs and is watched.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub concurrency: usize,
    /// How long SIGTERM waits for events to be flushed before exiting.
    pub shutdown_grace: Duration,
    /// How long a node may be away (stopped, crashed) and still adopt the
    /// scrapes it left running when it starts again (`RESTART_GRACE`).
    pub restart_grace: Duration,
    /// Largest task message accepted; larger ones are dropped with an error.
    pub max_message_bytes: usize,
    /// Most task messages held for a future `eta`; more are published
    /// again at the tail of their queue.
    pub max_eta_held: usize,
    pub runner: RunnerKind,
    pub log_format: LogFormat,
    /// Where the metrics and health listener binds (`METRICS_ADDR`); off
    /// when unset.
    pub metrics_addr: Option<SocketAddr>,
    /// Which remote-control commands may act on this node (`CONTROL_POLICY`).
    pub control_policy: ControlPolicy,
    /// Most time between two `task-progress` events of a running task
    /// (`PROGRESS_INTERVAL`).
    pub progress_interval: Duration,
}

/// The whole configuration, validated, in the groups of the SPEC.
#[derive(Debug, Clone)]
pub struct Config {
    /// The account (USERNAME, PASSWORD) and the dispatcher's API.
    pub dispatcher: DispatcherSettings,
    pub broker: BrokerSettings,
    pub warehouse: WarehouseSettings,
    /// The Docker pipeline, with NODE_NAME.
    pub pipeline: PipelineSettings,
    pub worker: WorkerSettings,
}

impl Config {
    /// The Celery hostname: `USERNAME@NODE_NAME`.
    pub fn hostname(&self) -> String {
        format!("{}@{}", self.dispatcher.username, self.pipeline.node_name)
    }

    /// Reads and validates the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Env::from_process()?.config()
    }

    /// Reads and validates the given variables (the environment, in tests).
    pub fn from_vars<I>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (OsString, OsString)>,
    {
        Env::from_vars(vars)?.config()
    }
}

impl PipelineSettings {
    /// Reads only what the pipeline needs (for `run-task`).
    pub fn from_env() -> Result<Self, ConfigError> {
        Env::from_process()?.pipeline()
    }
}

impl DispatcherSettings {
    /// Reads only what talking to the dispatcher needs (`register-key`).
    pub fn from_env() -> Result<Self, ConfigError> {
        Env::from_process()?.dispatcher()
    }
}

impl WarehouseSettings {
    /// Reads only what the upload needs (for `run-task`).
    pub fn from_env() -> Result<Self, ConfigError> {
        let env = Env::from_process()?;
        let username = env.value(&vars::USERNAME)?;
        env.warehouse(username)
    }
}

/// `METRICS_ADDR` alone (for the `healthcheck` command, which needs
/// nothing else): `None` when it is unset or empty.
pub fn metrics_addr_from_env() -> Result<Option<SocketAddr>, ConfigError> {
    Env::from_process()?.get(&vars::METRICS_ADDR)
}

/// `PROGRESS_INTERVAL` alone, for `run-task` (which needs no other worker
/// setting).
pub fn progress_interval_from_env() -> Result<Duration, ConfigError> {
    Env::from_process()?.value(&vars::PROGRESS_INTERVAL)
}

/// `LOG_LEVEL`, read before anything else so that the start-up is logged:
/// `tracing` filter directives such as `warn` or `info,zimfarm_worker=debug`;
/// `None` when unset or not UTF-8 (the caller's default level then).
pub fn log_level_from_env() -> Option<String> {
    std::env::var(vars::LOG_LEVEL.name()).ok()
}

/// `NODE_NAME` as it is, for `register-key`'s default key name (that
/// command needs no other setting): `None` when unset or blank.
pub fn node_name_from_env() -> Option<String> {
    std::env::var(vars::NODE_NAME.name())
        .ok()
        .filter(|n| !n.trim().is_empty())
}

/// A configuration error: which variable, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration error: {var} {problem}")]
pub struct ConfigError {
    pub var: &'static str,
    pub problem: String,
}

impl ConfigError {
    fn new(var: &'static str, problem: impl Into<String>) -> Self {
        Self {
            var,
            problem: problem.into(),
        }
    }
}

#[cfg(test)]
mod tests;
