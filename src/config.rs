//! Configuration: the environment read once into a typed, validated [`Config`].
//!
//! Owns the names of every environment variable of the README's
//! Environment table (a test holds the two together; `DOCKER_HOST` alone is
//! read where the Docker client is made, as Docker's tools do), their
//! defaults and their validation, and the redaction of secrets. It must not
//! touch the network: everything here is checked before the first
//! connection, so a typo costs the operator one clear line and exit code 2,
//! not a crash loop.

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use lapin::uri::{AMQPAuthority, AMQPScheme, AMQPUri, AMQPUserInfo};
use serde::Deserialize;

pub use crate::docker::{LogLimit, PullPolicy};
use crate::offliner::AllowList;

/// The exit code for a configuration error, as documented in the README.
pub const EXIT_CONFIG: i32 = 2;

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

/// The whole configuration, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub username: String,
    pub password: Secret,
    pub node_name: String,
    pub concurrency: usize,
    pub queues: Vec<QueueName>,
    pub dispatcher_url: String,
    pub broker_url: BrokerUrl,
    /// Extra CA certificate (PEM) trusted for `amqps://` brokers.
    pub broker_ca_file: Option<PathBuf>,
    pub warehouse: WarehouseSettings,
    /// How long SIGTERM waits for events to be flushed before exiting.
    pub shutdown_grace: Duration,
    /// Largest task message accepted; larger ones are dropped with an error.
    pub max_message_bytes: usize,
    pub log_format: LogFormat,
    pub runner: RunnerKind,
    pub pipeline: PipelineSettings,
    /// Where the metrics and health listener binds (`METRICS_ADDR`); off
    /// when unset.
    pub metrics_addr: Option<SocketAddr>,
}

impl PipelineSettings {
    /// Reads only what the pipeline needs (for `run-task`).
    pub fn from_env() -> Result<Self, ConfigError> {
        RawEnv::from_vars(std::env::vars_os())?.pipeline()
    }
}

/// `METRICS_ADDR` alone (for the `healthcheck` command, which needs
/// nothing else): `None` when it is unset or empty.
pub fn metrics_addr_from_env() -> Result<Option<SocketAddr>, ConfigError> {
    RawEnv::from_vars(std::env::vars_os())?.metrics_addr()
}

/// `LOG_LEVEL`, read before anything else so that the start-up is logged:
/// `tracing` filter directives such as `warn` or `info,zimfarm_worker=debug`;
/// `None` when unset or not UTF-8 (the caller's default level then).
pub fn log_level_from_env() -> Option<String> {
    std::env::var("LOG_LEVEL").ok()
}

/// `NODE_NAME` as it is, for `register-key`'s default key name (that
/// command needs no other setting): `None` when unset or blank.
pub fn node_name_from_env() -> Option<String> {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.trim().is_empty())
}

impl DispatcherSettings {
    /// Reads only what talking to the dispatcher needs (`register-key`).
    pub fn from_env() -> Result<Self, ConfigError> {
        RawEnv::from_vars(std::env::vars_os())?.dispatcher()
    }
}

impl Config {
    /// The dispatcher part of the configuration.
    pub fn dispatcher(&self) -> DispatcherSettings {
        DispatcherSettings {
            url: self.dispatcher_url.clone(),
            username: self.username.clone(),
            password: self.password.clone(),
        }
    }
}

impl WarehouseSettings {
    /// Reads only what the upload needs (for `run-task`).
    pub fn from_env() -> Result<Self, ConfigError> {
        let raw = RawEnv::from_vars(std::env::vars_os())?;
        let username = username(raw.username.clone())?;
        raw.warehouse(username)
    }
}

impl Config {
    /// The Celery hostname: `USERNAME@NODE_NAME`.
    pub fn hostname(&self) -> String {
        format!("{}@{}", self.username, self.node_name)
    }

    /// Reads and validates the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars_os())
    }

    /// Reads and validates the given variables (the environment, in tests).
    pub fn from_vars<I>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (OsString, OsString)>,
    {
        RawEnv::from_vars(vars)?.validate()
    }
}

impl RawEnv {
    fn from_vars<I>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (OsString, OsString)>,
    {
        let mut utf8 = Vec::new();
        for (key, value) in vars {
            let Some(key) = key.to_str().map(str::to_owned) else {
                continue;
            };
            if !RawEnv::NAMES.contains(&key.as_str()) {
                continue;
            }
            match value.into_string() {
                Ok(value) => utf8.push((key, value)),
                Err(_) => return Err(ConfigError::new(leak_name(&key), "is not valid UTF-8")),
            }
        }
        envy::from_iter(utf8).map_err(|e| ConfigError {
            var: "environment",
            problem: e.to_string(),
        })
    }
}

/// The one place a variable name from the environment becomes `&'static`:
/// only names of [`RawEnv::NAMES`] get here.
fn leak_name(key: &str) -> &'static str {
    RawEnv::NAMES
        .iter()
        .copied()
        .find(|n| *n == key)
        .unwrap_or("environment")
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

/// The variables as strings, before validation. Every field is optional
/// here; [`RawEnv::validate`] says which are required.
/// (envy matches variables to fields case-insensitively, by lower case.)
#[derive(Deserialize, Default, Clone)]
struct RawEnv {
    username: Option<String>,
    password: Option<String>,
    working_dir: Option<String>,
    node_name: Option<String>,
    concurrency: Option<String>,
    queues: Option<String>,
    dispatcher_url: Option<String>,
    broker_url: Option<String>,
    dispatcher_host: Option<String>,
    rabbit_port: Option<String>,
    broker_ca_file: Option<String>,
    warehouse_host: Option<String>,
    warehouse_port: Option<String>,
    ssh_key: Option<String>,
    warehouse_known_hosts: Option<String>,
    warehouse_host_key: Option<String>,
    upload_retries: Option<String>,
    upload_streams: Option<String>,
    zim_dir: Option<String>,
    shutdown_grace: Option<String>,
    max_message_bytes: Option<String>,
    log_format: Option<String>,
    task_runner: Option<String>,
    pull_policy: Option<String>,
    idle_timeout: Option<String>,
    min_free_disk_mb: Option<String>,
    kept_dir_max_age: Option<String>,
    container_memory_mb: Option<String>,
    container_cpus: Option<String>,
    container_log_max_mb: Option<String>,
    image_allowlist: Option<String>,
    redis_image: Option<String>,
    metrics_addr: Option<String>,
}

pub const DEFAULT_DISPATCHER_URL: &str = "https://farm.openzim.org/api";
pub const DEFAULT_DISPATCHER_HOST: &str = "farm.openzim.org";
pub const DEFAULT_RABBIT_PORT: u16 = 5671;
pub const DEFAULT_WAREHOUSE_HOST: &str = "warehouse.farm.openzim.org";
pub const DEFAULT_WAREHOUSE_PORT: u16 = 1522;
pub const DEFAULT_SSH_KEY: &str = "/usr/src/.ssh/id_rsa";
pub const DEFAULT_WAREHOUSE_KNOWN_HOSTS: &str = "/usr/src/.ssh/known_hosts";
pub const DEFAULT_UPLOAD_RETRIES: u32 = 10;
pub const DEFAULT_ZIM_DIR: &str = "/zim_files";
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 8;
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 7200;
pub const DEFAULT_MIN_FREE_DISK_MB: u64 = 1024;
/// Hours a kept task dir stays before it is swept (7 days).
pub const DEFAULT_KEPT_DIR_MAX_AGE_HOURS: u64 = 168;
pub const DEFAULT_REDIS_IMAGE: &str = "redis:7";
/// Docker's own copy of a container's output, in all (MB). The worker keeps
/// the full log itself (task dir, then the warehouse's /logs/), so Docker's
/// copy only serves `docker logs` on a running task: the last few hundred
/// thousand lines are plenty.
pub const DEFAULT_CONTAINER_LOG_MAX_MB: u64 = 50;
/// Docker's copy rotates over this many files (`max-file`), so the newest
/// lines survive a rotation with 4/5 of the bound still on disk.
pub const CONTAINER_LOG_FILES: u32 = 5;

impl RawEnv {
    const NAMES: [&'static str; 33] = [
        "USERNAME",
        "PASSWORD",
        "WORKING_DIR",
        "NODE_NAME",
        "CONCURRENCY",
        "QUEUES",
        "DISPATCHER_URL",
        "BROKER_URL",
        "DISPATCHER_HOST",
        "RABBIT_PORT",
        "BROKER_CA_FILE",
        "WAREHOUSE_HOST",
        "WAREHOUSE_PORT",
        "SSH_KEY",
        "WAREHOUSE_KNOWN_HOSTS",
        "WAREHOUSE_HOST_KEY",
        "UPLOAD_RETRIES",
        "UPLOAD_STREAMS",
        "ZIM_DIR",
        "SHUTDOWN_GRACE",
        "MAX_MESSAGE_BYTES",
        "LOG_FORMAT",
        "TASK_RUNNER",
        "PULL_POLICY",
        "IDLE_TIMEOUT",
        "MIN_FREE_DISK_MB",
        "KEPT_DIR_MAX_AGE",
        "CONTAINER_MEMORY_MB",
        "CONTAINER_CPUS",
        "CONTAINER_LOG_MAX_MB",
        "IMAGE_ALLOWLIST",
        "REDIS_IMAGE",
        "METRICS_ADDR",
    ];

    /// The pipeline's settings (also read alone by `run-task`).
    fn pipeline(&self) -> Result<PipelineSettings, ConfigError> {
        let working_dir = dir_path(
            "WORKING_DIR",
            required("WORKING_DIR", self.working_dir.clone())?,
        )?;
        if working_dir.to_string_lossy().contains(':') {
            return Err(ConfigError::new(
                "WORKING_DIR",
                format!(
                    "is {:?}; it must not contain ':', which separates the parts of a Docker bind mount",
                    working_dir.display()
                ),
            ));
        }
        let node_name = node_name(required("NODE_NAME", self.node_name.clone())?)?;
        let zim_dir = dir_path(
            "ZIM_DIR",
            non_empty(self.zim_dir.clone()).unwrap_or_else(|| DEFAULT_ZIM_DIR.to_owned()),
        )?;
        let pull_policy = match non_empty(self.pull_policy.clone()).as_deref() {
            None | Some("always") => PullPolicy::Always,
            Some("if-missing") => PullPolicy::IfMissing,
            Some("never") => PullPolicy::Never,
            Some(other) => {
                return Err(ConfigError::new(
                    "PULL_POLICY",
                    format!("is {other:?}; use always, if-missing or never"),
                ));
            }
        };
        let idle_timeout = match non_empty(self.idle_timeout.clone()) {
            None => Duration::from_secs(DEFAULT_IDLE_TIMEOUT_SECS),
            Some(v) => Duration::from_secs(parse_bounded("IDLE_TIMEOUT", &v, 1, 30 * 86_400)?),
        };
        let min_free_disk = match non_empty(self.min_free_disk_mb.clone()) {
            None => DEFAULT_MIN_FREE_DISK_MB,
            Some(v) => parse_bounded("MIN_FREE_DISK_MB", &v, 0, u64::MAX / (1 << 20))?,
        } << 20;
        let kept_dir_max_age = match non_empty(self.kept_dir_max_age.clone()) {
            None => DEFAULT_KEPT_DIR_MAX_AGE_HOURS,
            Some(v) => parse_bounded("KEPT_DIR_MAX_AGE", &v, 0, 10 * 365 * 24).map_err(|e| {
                ConfigError::new(
                    "KEPT_DIR_MAX_AGE",
                    format!("{} (hours; 0 sweeps only under disk pressure)", e.problem),
                )
            })?,
        };
        let kept_dir_max_age =
            (kept_dir_max_age > 0).then(|| Duration::from_secs(kept_dir_max_age * 3600));
        let container_memory = match non_empty(self.container_memory_mb.clone()) {
            None => None,
            Some(v) => Some((parse_bounded("CONTAINER_MEMORY_MB", &v, 6, 1 << 30)? << 20) as i64),
        };
        let container_nano_cpus = match non_empty(self.container_cpus.clone()) {
            None => None,
            Some(v) => match v.parse::<f64>() {
                Ok(c) if c.is_finite() && (0.01..=1024.0).contains(&c) => {
                    Some((c * 1e9).round() as i64)
                }
                _ => {
                    return Err(ConfigError::new(
                        "CONTAINER_CPUS",
                        format!("is {v:?}; expected a number of CPUs such as 2 or 1.5"),
                    ));
                }
            },
        };
        let container_log_limit = match non_empty(self.container_log_max_mb.clone()) {
            None => Some(DEFAULT_CONTAINER_LOG_MAX_MB),
            Some(v) => Some(parse_bounded("CONTAINER_LOG_MAX_MB", &v, 0, 1 << 20)?),
        }
        .filter(|&mb| mb > 0)
        .map(|mb| LogLimit::total(mb << 20, CONTAINER_LOG_FILES));
        let image_allowlist = match non_empty(self.image_allowlist.clone()) {
            None => AllowList::default_openzim(),
            Some(v) => AllowList::parse(&v)
                .map_err(|e| ConfigError::new("IMAGE_ALLOWLIST", format!("is {v:?}: {e}")))?,
        };
        let redis_image =
            non_empty(self.redis_image.clone()).unwrap_or_else(|| DEFAULT_REDIS_IMAGE.to_owned());
        if redis_image
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(ConfigError::new(
                "REDIS_IMAGE",
                format!("is {redis_image:?}; expected an image name such as redis:7"),
            ));
        }
        Ok(PipelineSettings {
            working_dir,
            zim_dir,
            node_name,
            pull_policy,
            idle_timeout,
            min_free_disk,
            kept_dir_max_age,
            container_memory,
            container_nano_cpus,
            container_log_limit,
            image_allowlist,
            redis_image,
        })
    }

    /// The dispatcher's settings (also read alone by `register-key`).
    fn dispatcher(&self) -> Result<DispatcherSettings, ConfigError> {
        let username = username(self.username.clone())?;
        let password = Secret::new(required_raw("PASSWORD", self.password.clone())?);
        let url = match non_empty(self.dispatcher_url.clone()) {
            None => DEFAULT_DISPATCHER_URL.to_owned(),
            Some(url) => http_url("DISPATCHER_URL", url)?,
        };
        Ok(DispatcherSettings {
            url,
            username,
            password,
        })
    }

    /// The warehouse's settings (also read alone by `run-task`).
    fn warehouse(&self, username: String) -> Result<WarehouseSettings, ConfigError> {
        let host = non_empty(self.warehouse_host.clone())
            .unwrap_or_else(|| DEFAULT_WAREHOUSE_HOST.to_owned());
        host_name("WAREHOUSE_HOST", &host)?;
        let port = match non_empty(self.warehouse_port.clone()) {
            None => DEFAULT_WAREHOUSE_PORT,
            Some(p) => port("WAREHOUSE_PORT", &p)?,
        };
        let ssh_key = absolute_path(
            "SSH_KEY",
            non_empty(self.ssh_key.clone()).unwrap_or_else(|| DEFAULT_SSH_KEY.to_owned()),
        )?;
        let known_hosts = absolute_path(
            "WAREHOUSE_KNOWN_HOSTS",
            non_empty(self.warehouse_known_hosts.clone())
                .unwrap_or_else(|| DEFAULT_WAREHOUSE_KNOWN_HOSTS.to_owned()),
        )?;
        let host_key_pins = match non_empty(self.warehouse_host_key.clone()) {
            None => Vec::new(),
            Some(v) => host_key_pins(&v)?,
        };
        let upload_retries = match non_empty(self.upload_retries.clone()) {
            None => DEFAULT_UPLOAD_RETRIES,
            Some(v) => parse_bounded("UPLOAD_RETRIES", &v, 0, 1000)? as u32,
        };
        let upload_streams = match non_empty(self.upload_streams.clone()) {
            None => UploadStreams::Auto,
            Some(v) if v.trim().eq_ignore_ascii_case("auto") => UploadStreams::Auto,
            Some(v) => match v.trim().parse::<u8>() {
                Ok(n) if (1..=MAX_UPLOAD_STREAMS).contains(&n) => UploadStreams::Fixed(n),
                _ => {
                    return Err(ConfigError::new(
                        "UPLOAD_STREAMS",
                        format!(
                            "is {v:?}; expected `auto` or a number of SSH connections from 1 \
                             to {MAX_UPLOAD_STREAMS} (unset it for `auto`)"
                        ),
                    ));
                }
            },
        };
        Ok(WarehouseSettings {
            host,
            port,
            username,
            ssh_key,
            known_hosts,
            host_key_pins,
            upload_retries,
            upload_streams,
        })
    }

    fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let Some(value) = non_empty(self.metrics_addr.clone()) else {
            return Ok(None);
        };
        value.parse::<SocketAddr>().map(Some).map_err(|_| {
            ConfigError::new(
                "METRICS_ADDR",
                format!(
                    "is {value:?}; expected an IP address and port to listen on, such as \
                     0.0.0.0:9090 or 127.0.0.1:9090 (unset it to turn the listener off)"
                ),
            )
        })
    }

    fn validate(self) -> Result<Config, ConfigError> {
        let pipeline = self.pipeline()?;
        let metrics_addr = self.metrics_addr()?;
        let DispatcherSettings {
            url: dispatcher_url,
            username,
            password,
        } = self.dispatcher()?;
        let warehouse = self.warehouse(username.clone())?;
        let node_name = pipeline.node_name.clone();
        let pidbox_len = username.len() + 1 + node_name.len() + PIDBOX_SUFFIX.len();
        if pidbox_len > AMQP_NAME_MAX {
            return Err(ConfigError::new(
                "USERNAME",
                format!(
                    "is {} bytes long; with NODE_NAME ({} bytes) the pidbox queue \
                     USERNAME@NODE_NAME{PIDBOX_SUFFIX} would be {pidbox_len} bytes, over \
                     the {AMQP_NAME_MAX} an AMQP queue name may have; use a shorter USERNAME or NODE_NAME",
                    username.len(),
                    node_name.len()
                ),
            ));
        }
        let concurrency = match non_empty(self.concurrency) {
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Some(v) => parse_bounded("CONCURRENCY", &v, 1, 1024)? as usize,
        };
        let queues = queues(required("QUEUES", self.queues)?)?;

        let broker_url = match non_empty(self.broker_url) {
            Some(url) => broker_url(&url)?,
            None => {
                let host = non_empty(self.dispatcher_host)
                    .unwrap_or_else(|| DEFAULT_DISPATCHER_HOST.to_owned());
                host_name("DISPATCHER_HOST", &host)?;
                let port = match non_empty(self.rabbit_port) {
                    None => DEFAULT_RABBIT_PORT,
                    Some(p) => port("RABBIT_PORT", &p)?,
                };
                BrokerUrl(AMQPUri {
                    scheme: AMQPScheme::AMQPS,
                    authority: AMQPAuthority {
                        userinfo: AMQPUserInfo {
                            username: username.clone(),
                            password: password.expose().to_owned(),
                        },
                        host,
                        port,
                    },
                    vhost: "zimfarm".to_owned(),
                    query: Default::default(),
                })
            }
        };
        let broker_ca_file = match non_empty(self.broker_ca_file) {
            None => None,
            Some(p) => Some(absolute_path("BROKER_CA_FILE", p)?),
        };

        let shutdown_grace = match non_empty(self.shutdown_grace) {
            None => Duration::from_secs(DEFAULT_SHUTDOWN_GRACE_SECS),
            Some(v) => Duration::from_secs(parse_bounded("SHUTDOWN_GRACE", &v, 0, 3600)?),
        };
        let max_message_bytes = match non_empty(self.max_message_bytes) {
            None => DEFAULT_MAX_MESSAGE_BYTES,
            Some(v) => parse_bounded("MAX_MESSAGE_BYTES", &v, 1024, 512 * 1024 * 1024)? as usize,
        };
        let log_format = match non_empty(self.log_format).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::new(
                    "LOG_FORMAT",
                    format!("is {other:?}; use \"text\" or \"json\""),
                ));
            }
        };
        let runner = match non_empty(self.task_runner).as_deref() {
            None | Some("docker") => RunnerKind::Docker,
            Some("simulate") => RunnerKind::Simulate,
            Some(other) => {
                return Err(ConfigError::new(
                    "TASK_RUNNER",
                    format!("is {other:?}; use docker or simulate"),
                ));
            }
        };

        Ok(Config {
            username,
            password,
            node_name,
            concurrency,
            queues,
            dispatcher_url,
            broker_url,
            broker_ca_file,
            warehouse,
            shutdown_grace,
            max_message_bytes,
            log_format,
            runner,
            pipeline,
            metrics_addr,
        })
    }
}

fn username(value: Option<String>) -> Result<String, ConfigError> {
    let username = required("USERNAME", value)?;
    if username
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '@')
    {
        return Err(ConfigError::new(
            "USERNAME",
            "must not contain spaces, control characters or '@'",
        ));
    }
    Ok(username)
}

/// `SHA256:<43 base64 chars>` fingerprints, as `ssh-keygen -lf` prints them,
/// separated by commas.
fn host_key_pins(value: &str) -> Result<Vec<String>, ConfigError> {
    let mut pins = Vec::new();
    for pin in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let ok = pin.strip_prefix("SHA256:").is_some_and(|b64| {
            b64.len() == 43
                && b64
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
        });
        if !ok {
            return Err(ConfigError::new(
                "WAREHOUSE_HOST_KEY",
                format!(
                    "has {pin:?}; expected SHA256 fingerprints such as \
                     SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s (what `ssh-keygen -lf` prints), \
                     separated by commas"
                ),
            ));
        }
        pins.push(pin.to_owned());
    }
    Ok(pins)
}

/// `None` for unset and for empty values: an empty variable means "default".
fn non_empty(value: Option<String>) -> Option<String> {
    value.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

fn required(var: &'static str, value: Option<String>) -> Result<String, ConfigError> {
    non_empty(value).ok_or_else(|| ConfigError::new(var, "is required but not set"))
}

/// Like [`required`] but keeps the value untrimmed (passwords may have spaces).
fn required_raw(var: &'static str, value: Option<String>) -> Result<String, ConfigError> {
    match value {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(ConfigError::new(var, "is required but not set")),
    }
}

fn parse_bounded(var: &'static str, value: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
    match value.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(ConfigError::new(
            var,
            format!("is {value:?}; expected a whole number from {min} to {max}"),
        )),
    }
}

fn port(var: &'static str, value: &str) -> Result<u16, ConfigError> {
    parse_bounded(var, value, 1, 65535).map(|p| p as u16)
}

fn absolute_path(var: &'static str, value: String) -> Result<PathBuf, ConfigError> {
    if value.contains('\0') {
        return Err(ConfigError::new(var, "contains a NUL character"));
    }
    let path = PathBuf::from(&value);
    if !path.is_absolute() {
        return Err(ConfigError::new(
            var,
            format!("is {value:?}; expected an absolute path (starting with /)"),
        ));
    }
    Ok(path)
}

/// Longest path the kernel takes (PATH_MAX, 4096, less its NUL).
const PATH_MAX: usize = 4095;
/// Longest path the worker appends to ZIM_DIR or WORKING_DIR: `/<task id,
/// 64>/<a file name, 255>` (the sockets dir, the log and the markers are
/// shorter).
const LONGEST_SUFFIX: usize = 1 + 64 + 1 + 255;
/// Longest ZIM_DIR or WORKING_DIR: every path below it still fits PATH_MAX.
pub const MAX_DIR_LEN: usize = PATH_MAX - LONGEST_SUFFIX;
/// AMQP short strings (queue names, consumer tags) hold 255 bytes.
pub const AMQP_NAME_MAX: usize = 255;
/// What kombu appends to the Celery hostname for a node's pidbox queue.
const PIDBOX_SUFFIX: &str = ".celery.pidbox";

/// An absolute dir path short enough for every path the worker makes in it.
fn dir_path(var: &'static str, value: String) -> Result<PathBuf, ConfigError> {
    let path = absolute_path(var, value)?;
    let len = path.as_os_str().len();
    if len > MAX_DIR_LEN {
        return Err(ConfigError::new(
            var,
            format!(
                "is {len} bytes long, over the {MAX_DIR_LEN} the worker can use \
                 (PATH_MAX {PATH_MAX} less {LONGEST_SUFFIX} for a task's files); use a shorter path"
            ),
        ));
    }
    Ok(path)
}

fn host_name(var: &'static str, value: &str) -> Result<(), ConfigError> {
    let ok = value.len() <= 253
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            var,
            format!("is {value:?}; expected a host name or IP address"),
        ))
    }
}

/// Node names become part of the Celery hostname, pidbox queue names and
/// container names, so they are held to Docker's container-name alphabet.
fn node_name(value: String) -> Result<String, ConfigError> {
    if value == "default_node_name" {
        return Err(ConfigError::new(
            "NODE_NAME",
            "is still \"default_node_name\" from the README example; \
             choose a name for this machine (e.g. its host name)",
        ));
    }
    let mut chars = value.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !first_ok || !rest_ok || value.len() > 63 {
        return Err(ConfigError::new(
            "NODE_NAME",
            format!(
                "is {value:?}; use 1 to 63 letters, digits, '_', '.' or '-', starting with a letter or digit"
            ),
        ));
    }
    Ok(value)
}

fn queues(value: String) -> Result<Vec<QueueName>, ConfigError> {
    let mut out = Vec::new();
    for part in value.split(',').map(str::trim) {
        if part.is_empty() {
            continue;
        }
        let queue = part.parse::<QueueName>().map_err(|()| {
            ConfigError::new(
                "QUEUES",
                format!(
                    "has unknown queue {part:?}; choose from default, small, medium, large, debug"
                ),
            )
        })?;
        if !out.contains(&queue) {
            out.push(queue);
        }
    }
    if out.is_empty() {
        return Err(ConfigError::new(
            "QUEUES",
            "names no queue; e.g. QUEUES=default,small",
        ));
    }
    Ok(out)
}

fn http_url(var: &'static str, value: String) -> Result<String, ConfigError> {
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"));
    match rest {
        Some(rest)
            if !rest.is_empty()
                && !rest.starts_with('/')
                && !value.contains(char::is_whitespace) =>
        {
            Ok(value.trim_end_matches('/').to_owned())
        }
        _ => Err(ConfigError::new(
            var,
            format!("is {value:?}; expected an http:// or https:// URL"),
        )),
    }
}

fn broker_url(value: &str) -> Result<BrokerUrl, ConfigError> {
    if !(value.starts_with("amqp://") || value.starts_with("amqps://")) {
        return Err(ConfigError::new(
            "BROKER_URL",
            "must start with amqp:// or amqps://",
        ));
    }
    // The parser's message may quote the URL, password included: say only
    // that it is malformed.
    let uri = AMQPUri::from_str(value).map_err(|_| {
        ConfigError::new(
            "BROKER_URL",
            "is not a valid AMQP URL (amqp[s]://user:password@host:port/vhost, \
             with special characters percent-encoded)",
        )
    })?;
    if uri.authority.host.is_empty() {
        return Err(ConfigError::new("BROKER_URL", "has no host"));
    }
    Ok(BrokerUrl(uri))
}

#[cfg(test)]
mod proptests {
    use super::*;
    use crate::proptest_config::{config, text};
    use proptest::prelude::*;
    use std::os::unix::ffi::OsStringExt as _;

    /// A value: tricky text, numbers, paths, URLs, or bytes that are not UTF-8.
    fn value() -> impl Strategy<Value = OsString> {
        prop_oneof![
            text().prop_map(OsString::from),
            any::<i64>().prop_map(|n| OsString::from(n.to_string())),
            any::<f64>().prop_map(|n| OsString::from(n.to_string())),
            proptest::sample::select(vec![
                "",
                " ",
                "0",
                "-1",
                "18446744073709551616",
                "1e309",
                "NaN",
                "/",
                "/srv/zim",
                "relative",
                "default",
                "default,small",
                "always",
                "amqp://u:p@h:1/v",
                "amqps://h",
                "http://x",
                "json",
                "docker",
                "simulate",
                "openzim/*",
                "127.0.0.1:0",
                "[::1]:9",
                "node1",
                "default_node_name",
            ])
            .prop_map(OsString::from),
            proptest::collection::vec(any::<u8>(), 0..16).prop_map(OsString::from_vec),
        ]
    }

    /// Known names (as-is or in the wrong case) and unknown ones.
    fn name() -> impl Strategy<Value = OsString> {
        prop_oneof![
            4 => proptest::sample::select(RawEnv::NAMES.to_vec()).prop_map(OsString::from),
            1 => proptest::sample::select(RawEnv::NAMES.to_vec())
                .prop_map(|n| OsString::from(n.to_lowercase())),
            1 => proptest::collection::vec(any::<u8>(), 0..8).prop_map(OsString::from_vec),
        ]
    }

    fn base() -> Vec<(OsString, OsString)> {
        [
            ("USERNAME", "alice"),
            ("PASSWORD", "pass"),
            ("WORKING_DIR", "/srv/zim"),
            ("NODE_NAME", "node1"),
            ("QUEUES", "default"),
            ("TASK_RUNNER", "simulate"),
        ]
        .into_iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)))
        .collect()
    }

    fn check(result: Result<Config, ConfigError>) -> Result<(), TestCaseError> {
        if let Err(error) = result {
            prop_assert!(
                error.var == "environment" || RawEnv::NAMES.contains(&error.var),
                "{}",
                error
            );
            prop_assert!(!error.problem.is_empty());
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn any_environment_gives_a_config_or_a_config_error(
            vars in proptest::collection::vec((name(), value()), 0..12),
        ) {
            check(Config::from_vars(vars))?;
        }

        #[test]
        fn any_value_of_a_valid_environment_gives_a_config_or_a_config_error(
            extra in proptest::collection::vec(
                (proptest::sample::select(RawEnv::NAMES.to_vec()), value()),
                1..4,
            ),
        ) {
            let mut vars = base();
            vars.retain(|(k, _)| !extra.iter().any(|(e, _)| k == e));
            vars.extend(extra.into_iter().map(|(k, v)| (OsString::from(k), v)));
            check(Config::from_vars(vars))?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's Environment table lists exactly the variables the
    /// worker reads: a new one cannot go undocumented, nor a removed one
    /// stay documented.
    #[test]
    fn the_readme_documents_every_variable_and_no_other() {
        let readme = include_str!("../README.md");
        let section = readme
            .split("\n## Environment\n")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("the README has an Environment section");
        let documented: std::collections::BTreeSet<&str> = section
            .lines()
            .filter_map(|line| line.strip_prefix("| `"))
            .filter_map(|line| line.split('`').next())
            .collect();
        let mut read: std::collections::BTreeSet<&str> = RawEnv::NAMES.into_iter().collect();
        // Read on their own: LOG_LEVEL before the rest (log_level_from_env),
        // DOCKER_HOST by the Docker client, as Docker's own tools do.
        read.extend(["LOG_LEVEL", "DOCKER_HOST"]);
        assert_eq!(documented, read);
    }

    fn base() -> Vec<(&'static str, &'static str)> {
        vec![
            ("USERNAME", "alice"),
            ("PASSWORD", "s3cr3t pass"),
            ("WORKING_DIR", "/srv/zim"),
            ("NODE_NAME", "node1"),
            ("QUEUES", "default, small"),
            ("TASK_RUNNER", "simulate"),
        ]
    }

    fn load(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(
            vars.iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        )
    }

    fn with<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut vars: Vec<_> = base()
            .into_iter()
            .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
            .collect();
        vars.extend_from_slice(extra);
        vars
    }

    #[test]
    fn seed_variables_with_defaults() {
        let c = load(&base()).unwrap();
        assert_eq!(c.hostname(), "alice@node1");
        assert_eq!(c.queues, vec![QueueName::Default, QueueName::Small]);
        assert_eq!(c.pipeline.zim_dir, PathBuf::from("/zim_files"));
        assert_eq!(c.pipeline.working_dir, PathBuf::from("/srv/zim"));
        assert_eq!(c.runner, RunnerKind::Simulate);
        assert_eq!(c.pipeline.pull_policy, PullPolicy::Always);
        assert_eq!(c.pipeline.idle_timeout, Duration::from_secs(7200));
        assert_eq!(c.dispatcher_url, DEFAULT_DISPATCHER_URL);
        assert!(c.concurrency >= 1);
        let uri = c.broker_url.uri();
        assert_eq!(uri.scheme, AMQPScheme::AMQPS);
        assert_eq!(uri.authority.host, "farm.openzim.org");
        assert_eq!(uri.authority.port, 5671);
        assert_eq!(uri.authority.userinfo.password, "s3cr3t pass");
        assert_eq!(uri.vhost, "zimfarm");
        assert_eq!(c.warehouse.port, 1522);
        assert_eq!(c.warehouse.host, DEFAULT_WAREHOUSE_HOST);
        assert_eq!(c.warehouse.username, "alice");
        assert_eq!(c.warehouse.ssh_key, PathBuf::from(DEFAULT_SSH_KEY));
        assert_eq!(
            c.warehouse.known_hosts,
            PathBuf::from(DEFAULT_WAREHOUSE_KNOWN_HOSTS)
        );
        assert!(c.warehouse.host_key_pins.is_empty());
        assert_eq!(c.warehouse.upload_retries, DEFAULT_UPLOAD_RETRIES);
        assert_eq!(c.warehouse.upload_streams, UploadStreams::Auto);
    }

    #[test]
    fn warehouse_variables() {
        let pin = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s";
        let pins = format!("{pin}, SHA256:{}", "A".repeat(43));
        let mut vars = base();
        vars.extend([
            ("WAREHOUSE_HOST", "127.0.0.1"),
            ("WAREHOUSE_PORT", "2222"),
            ("WAREHOUSE_KNOWN_HOSTS", "/etc/kh"),
            ("WAREHOUSE_HOST_KEY", pins.as_str()),
            ("UPLOAD_RETRIES", "0"),
            ("UPLOAD_STREAMS", "16"),
        ]);
        let c = load(&vars).unwrap();
        assert_eq!(c.warehouse.upload_streams, UploadStreams::Fixed(16));
        assert_eq!(c.warehouse.port, 2222);
        assert_eq!(c.warehouse.known_hosts, PathBuf::from("/etc/kh"));
        assert_eq!(c.warehouse.host_key_pins.len(), 2);
        assert_eq!(c.warehouse.host_key_pins[0], pin);
        assert_eq!(c.warehouse.upload_retries, 0);
        for auto in ["auto", " AUTO ", ""] {
            let mut vars = base();
            vars.push(("UPLOAD_STREAMS", auto));
            assert_eq!(
                load(&vars).unwrap().warehouse.upload_streams,
                UploadStreams::Auto
            );
        }
        for (var, value) in [
            ("WAREHOUSE_HOST_KEY", "MD5:aa:bb"),
            ("WAREHOUSE_HOST_KEY", "SHA256:short"),
            ("WAREHOUSE_KNOWN_HOSTS", "relative/kh"),
            ("UPLOAD_RETRIES", "-1"),
            ("UPLOAD_RETRIES", "many"),
            ("UPLOAD_STREAMS", "0"),
            ("UPLOAD_STREAMS", "17"),
            ("UPLOAD_STREAMS", "fast"),
        ] {
            let mut vars = base();
            vars.push((var, value));
            let e = load(&vars).unwrap_err();
            assert_eq!(e.var, var, "{value}: {e}");
        }
    }

    #[test]
    fn secrets_never_print() {
        let c = load(&base()).unwrap();
        let shown = format!("{c:?} {}", c.broker_url);
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("***"));
    }

    #[test]
    fn missing_required_names_the_variable() {
        for var in ["USERNAME", "PASSWORD", "WORKING_DIR", "NODE_NAME", "QUEUES"] {
            let vars: Vec<_> = base().into_iter().filter(|(k, _)| *k != var).collect();
            let err = load(&vars).unwrap_err();
            assert_eq!(err.var, var);
            assert!(err.to_string().contains(var), "{err}");
        }
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases: &[(&'static str, &'static str)] = &[
            ("NODE_NAME", "default_node_name"),
            ("NODE_NAME", "bad name"),
            ("NODE_NAME", "-x"),
            ("CONCURRENCY", "0"),
            ("CONCURRENCY", "two"),
            ("QUEUES", "huge"),
            ("QUEUES", " , "),
            ("WORKING_DIR", "relative/dir"),
            ("ZIM_DIR", "zim"),
            ("BROKER_URL", "http://x"),
            ("BROKER_URL", "amqp://u:p@host:notaport/v"),
            ("DISPATCHER_URL", "ftp://x"),
            ("RABBIT_PORT", "70000"),
            ("WAREHOUSE_PORT", "0"),
            ("WAREHOUSE_HOST", "bad host"),
            ("LOG_FORMAT", "xml"),
            ("TASK_RUNNER", "podman"),
            ("PULL_POLICY", "sometimes"),
            ("IDLE_TIMEOUT", "0"),
            ("MIN_FREE_DISK_MB", "lots"),
            ("KEPT_DIR_MAX_AGE", "a week"),
            ("CONTAINER_MEMORY_MB", "1"),
            ("CONTAINER_CPUS", "-1"),
            ("CONTAINER_LOG_MAX_MB", "-1"),
            ("CONTAINER_LOG_MAX_MB", "2000000"),
            ("IMAGE_ALLOWLIST", " , "),
            ("SHUTDOWN_GRACE", "-1"),
            ("USERNAME", "a@b"),
            ("METRICS_ADDR", "localhost:9090"),
            ("METRICS_ADDR", "0.0.0.0"),
            ("METRICS_ADDR", "0.0.0.0:99999"),
            ("WORKING_DIR", "/srv/a:b"),
        ];
        for (var, value) in cases {
            let err = load(&with(&[(var, value)])).unwrap_err();
            assert_eq!(&err.var, var, "{var}={value}: {err}");
        }
    }

    #[test]
    fn broker_url_overrides_and_keeps_password_out_of_errors() {
        let c = load(&with(&[(
            "BROKER_URL",
            "amqp://bob:p%40ss@127.0.0.1:5672/test",
        )]))
        .unwrap();
        assert_eq!(c.broker_url.uri().authority.userinfo.password, "p@ss");
        assert_eq!(c.broker_url.vhost(), "test");
        assert!(!c.broker_url.is_tls());
        let err = load(&with(&[("BROKER_URL", "amqp://bob:topsecret@h:99999/v")])).unwrap_err();
        assert!(!err.to_string().contains("topsecret"));
    }

    #[test]
    fn docker_log_copy_is_bounded_unless_zero() {
        let limit = |c: Config| c.pipeline.container_log_limit;
        assert_eq!(
            limit(load(&base()).unwrap()),
            Some(LogLimit {
                file_bytes: 10 << 20,
                files: 5
            })
        );
        let one = limit(load(&with(&[("CONTAINER_LOG_MAX_MB", "1")])).unwrap()).unwrap();
        assert_eq!(one.files, 5);
        assert!(one.file_bytes * 5 <= 1 << 20 && one.file_bytes > 200 << 10);
        assert_eq!(
            limit(load(&with(&[("CONTAINER_LOG_MAX_MB", "0")])).unwrap()),
            None
        );
    }

    #[test]
    fn metrics_addr_is_optional() {
        assert_eq!(load(&base()).unwrap().metrics_addr, None);
        let c = load(&with(&[("METRICS_ADDR", "127.0.0.1:9090")])).unwrap();
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9090".parse().unwrap()));
        let c = load(&with(&[("METRICS_ADDR", "[::]:9100")])).unwrap();
        assert_eq!(c.metrics_addr, Some("[::]:9100".parse().unwrap()));
    }

    #[test]
    fn queues_are_deduplicated() {
        let c = load(&with(&[("QUEUES", "small,small,debug")])).unwrap();
        assert_eq!(c.queues, vec![QueueName::Small, QueueName::Debug]);
    }

    #[test]
    fn non_utf8_value_is_an_error() {
        use std::os::unix::ffi::OsStringExt;
        let mut vars: Vec<(OsString, OsString)> = base()
            .into_iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect();
        vars.push((
            OsString::from("NODE_NAME"),
            OsString::from_vec(vec![0xff, 0xfe]),
        ));
        let err = Config::from_vars(vars).unwrap_err();
        assert_eq!(err.var, "NODE_NAME");
    }

    #[test]
    fn dir_lengths_up_to_the_limit_are_taken() {
        let longest = format!("/{}", "d".repeat(MAX_DIR_LEN - 1));
        let c = load(&with(&[("WORKING_DIR", &longest), ("ZIM_DIR", &longest)])).unwrap();
        assert_eq!(c.pipeline.zim_dir.as_os_str().len(), MAX_DIR_LEN);
        let over = format!("/{}", "d".repeat(MAX_DIR_LEN));
        for var in ["WORKING_DIR", "ZIM_DIR"] {
            let err = load(&with(&[(var, &over)])).unwrap_err();
            assert_eq!(err.var, var);
            let text = err.to_string();
            assert!(
                text.contains(&MAX_DIR_LEN.to_string()) && !text.contains('\n'),
                "{text}"
            );
        }
    }

    #[test]
    fn pidbox_queue_name_fits_an_amqp_short_string() {
        let node = "p".repeat(63);
        let fits = "u".repeat(AMQP_NAME_MAX - 1 - 63 - PIDBOX_SUFFIX.len());
        let c = load(&with(&[("NODE_NAME", &node), ("USERNAME", &fits)])).unwrap();
        assert_eq!(
            crate::broker::control_queue_name(&c.hostname()).len(),
            AMQP_NAME_MAX
        );
        let over = format!("{fits}u");
        let err = load(&with(&[("NODE_NAME", &node), ("USERNAME", &over)])).unwrap_err();
        assert_eq!(err.var, "USERNAME");
        assert!(err.to_string().contains("255"), "{err}");
    }
}
