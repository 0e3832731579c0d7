//! The environment variables, each defined once: its name, what unset
//! means (required, a default value, or off), a one-line doc and the parser
//! of its value. Configuration loading, the error messages (named by the
//! table's names), `--help` and the test that holds the README's
//! Environment table to this one all read [`TABLE`].
//!
//! Owns [`Env`], the variables as the process has them, and turning one
//! value into its typed setting. It must not combine variables into
//! settings (that is `load`'s) nor touch the network.

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::parse;
use super::{
    BrokerUrl, ConfigError, LogFormat, LogLimit, PullPolicy, QueueName, RunnerKind, Secret,
    UploadStreams,
};
use crate::control::ControlPolicy;
use crate::offliner::AllowList;

/// What an unset (or empty) variable means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unset {
    /// The worker cannot start without it.
    Required,
    /// This value, parsed like a given one (the README shows it in
    /// backquotes).
    Value(&'static str),
    /// No value: the setting is off or computed; the text says what
    /// (the README's default column starts with it).
    Means(&'static str),
}

/// Who reads a variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadBy {
    /// Configuration loading ([`Env`]): a bad value is a [`ConfigError`].
    Config,
    /// The logging set-up, before anything else (`config::log_level_from_env`).
    Logging,
    /// The Docker client, as Docker's own tools do.
    Docker,
}

/// One row of the table: what the README documents.
#[derive(Debug, Clone, Copy)]
pub struct Info {
    pub name: &'static str,
    pub unset: Unset,
    pub doc: &'static str,
    pub by: ReadBy,
    /// Whether surrounding spaces are dropped (all but PASSWORD).
    pub trim: bool,
}

/// A variable and the parser of its value into a `T` (the problem as text
/// on error: [`Env`] names the variable).
pub struct Var<T> {
    pub info: Info,
    parse: fn(&str) -> Result<T, String>,
}

impl<T> Var<T> {
    const fn new(
        name: &'static str,
        unset: Unset,
        parse: fn(&str) -> Result<T, String>,
        doc: &'static str,
    ) -> Self {
        let info = Info {
            name,
            unset,
            doc,
            by: ReadBy::Config,
            trim: true,
        };
        Self { info, parse }
    }

    /// Kept as given, spaces included.
    const fn untrimmed(mut self) -> Self {
        self.info.trim = false;
        self
    }

    const fn read_by(mut self, by: ReadBy) -> Self {
        self.info.by = by;
        self
    }

    pub fn name(&self) -> &'static str {
        self.info.name
    }

    /// The value when unset, if it has one.
    pub fn default_value(&self) -> Option<&'static str> {
        match self.info.unset {
            Unset::Value(v) => Some(v),
            Unset::Required | Unset::Means(_) => None,
        }
    }

    /// Parses `value` as this variable's (for tests and the table's own check).
    pub fn parse(&self, value: &str) -> Result<T, ConfigError> {
        (self.parse)(value).map_err(|problem| ConfigError::new(self.info.name, problem))
    }
}

/// Defines each variable as a `Var` constant named as the variable, and
/// [`TABLE`] in the README's order.
macro_rules! vars {
    ($($(#[$attr:meta])* $id:ident: $ty:ty = ($unset:expr, $parse:expr, $doc:expr) $(.$modifier:ident($($arg:expr),*))*;)*) => {
        $($(#[$attr])* pub const $id: Var<$ty> = Var::new(stringify!($id), $unset, $parse, $doc)$(.$modifier($($arg),*))*;)*
        /// Every variable, in the README's order.
        pub const TABLE: &[Info] = &[$($id.info),*];
    };
}

use Unset::{Means, Required, Value};

vars! {
    USERNAME: String = (Required, parse::username,
        "Zimfarm account: dispatcher login, broker login, SFTP user");
    PASSWORD: Secret = (Required, |v| Ok(Secret::new(v)),
        "its password (never logged; kept as given)").untrimmed();
    WORKING_DIR: PathBuf = (Required, parse::working_dir,
        "the working dir's absolute path on the host (for container bind mounts)");
    NODE_NAME: String = (Required, parse::node_name,
        "this node's name; the Celery hostname is USERNAME@NODE_NAME");
    QUEUES: Vec<QueueName> = (Required, parse::queues,
        "comma list of default, small, medium, large, debug");
    CONCURRENCY: usize = (Means("number of CPU cores"), |v| parse::bounded(v, 1, 1024).map(|n| n as usize),
        "tasks run at once");
    DISPATCHER_URL: String = (Value("https://farm.openzim.org/api"), parse::http_url,
        "dispatcher HTTP API base");
    BROKER_URL: BrokerUrl = (Means("`amqps://USERNAME:PASSWORD@DISPATCHER_HOST:RABBIT_PORT/zimfarm`"), parse::broker_url,
        "full amqp:// or amqps:// URL; overrides the next two");
    DISPATCHER_HOST: String = (Value("farm.openzim.org"), parse::host_name,
        "broker host");
    RABBIT_PORT: u16 = (Value("5671"), parse::port,
        "broker port");
    BROKER_CA_FILE: PathBuf = (Means("system roots only"), parse::absolute_path,
        "PEM CA certificate trusted for an amqps:// broker");
    CONTROL_POLICY: ControlPolicy = (Value("node"), |v| v.parse(),
        "node: shutdown, add_consumer, cancel_consumer only when addressed to this node; celery: Celery's rules");
    WAREHOUSE_HOST: String = (Value("warehouse.farm.openzim.org"), parse::host_name,
        "SFTP warehouse host");
    WAREHOUSE_PORT: u16 = (Value("1522"), parse::port,
        "SFTP warehouse port");
    SSH_KEY: PathBuf = (Value("/usr/src/.ssh/id_rsa"), parse::absolute_path,
        "private key for the warehouse (RSA or ed25519, no passphrase)");
    WAREHOUSE_KNOWN_HOSTS: PathBuf = (Value("/usr/src/.ssh/known_hosts"), parse::absolute_path,
        "known_hosts file trusted for the warehouse's host key");
    WAREHOUSE_HOST_KEY: Vec<String> = (Means("none"), parse::host_key_pins,
        "comma list of host-key fingerprints (SHA256:...) trusted besides that file");
    UPLOAD_RETRIES: u32 = (Value("10"), |v| parse::bounded(v, 0, 1000).map(|n| n as u32),
        "upload attempts in a row without progress before the task fails");
    UPLOAD_STREAMS: UploadStreams = (Value("auto"), parse::upload_streams,
        "SSH connections a large file is written over at once");
    ZIM_DIR: PathBuf = (Value("/zim_files"), parse::dir_path,
        "where WORKING_DIR is mounted inside the worker's container");
    TASK_RUNNER: RunnerKind = (Value("docker"), parse::runner,
        "what runs tasks: docker or simulate");
    PULL_POLICY: PullPolicy = (Value("always"), parse::pull_policy,
        "when to pull a task's image: always, if-missing, never");
    IMAGE_ALLOWLIST: AllowList = (Means("each task runs its own image only"), parse::allow_list,
        "comma list of TASK=PATTERN (images that task may run too) or PATTERN (every task)");
    REDIS_IMAGE: String = (Value("redis:7"), parse::image_name,
        "image of mwoffliner's per-task redis helper");
    IDLE_TIMEOUT: Duration = (Value("7200"), |v| parse::bounded(v, 1, 30 * 86_400).map(Duration::from_secs),
        "seconds an offliner may print nothing before it is killed");
    PROGRESS_INTERVAL: Duration = (Value("60"), |v| parse::bounded(v, 1, 86_400).map(Duration::from_secs),
        "seconds between two task-progress events of a task (1 to 86400)");
    MIN_FREE_DISK_MB: u64 = (Value("1024"), |v| parse::bounded(v, 0, u64::MAX >> 20).map(|mb| mb << 20),
        "free space in ZIM_DIR a task needs to start (MB)");
    KEPT_DIR_MAX_AGE: Option<Duration> = (Value("168"), parse::kept_dir_max_age,
        "hours a kept task dir stays before it is swept; 0: only under disk pressure");
    CONTAINER_MEMORY_MB: i64 = (Means("none"), |v| parse::bounded(v, 6, 1 << 30).map(|mb| (mb << 20) as i64),
        "memory limit of offliner containers (MB)");
    CONTAINER_CPUS: i64 = (Means("none"), parse::nano_cpus,
        "CPU limit of offliner containers, e.g. 2 or 1.5");
    CONTAINER_LOG_MAX_MB: Option<LogLimit> = (Value("50"), parse::log_limit,
        "Docker's own copy of each task container's output (MB); 0: the engine's config");
    CONTAINER_PIDS: i64 = (Value("4096"), |v| parse::bounded(v, 64, 4_194_304).map(|n| n as i64),
        "most processes and threads an offliner container may have at once");
    REDIS_MEMORY_MB: i64 = (Value("4096"), |v| parse::bounded(v, 6, 1 << 30).map(|mb| (mb << 20) as i64),
        "memory limit of mwoffliner's redis helper (MB)");
    SCRAPER_NETWORK: String = (Means("the worker's own"), parse::network_name,
        "an operator-made Docker network for offliners instead of the worker's own");
    SHUTDOWN_GRACE: Duration = (Value("8"), |v| parse::bounded(v, 0, 3600).map(Duration::from_secs),
        "seconds SIGTERM waits for tasks to stop and events to leave");
    RESTART_GRACE: Duration = (Value("600"), |v| parse::bounded(v, 0, 30 * 86_400).map(Duration::from_secs),
        "seconds a node may be away and still carry on the scrapes it left running");
    MAX_MESSAGE_BYTES: usize = (Value("1048576"), |v| parse::bounded(v, 1024, 512 * 1024 * 1024).map(|n| n as usize),
        "larger task messages are never read: one naming its task in its headers fails it (unless it runs here or elsewhere), another is dropped with an error");
    MAX_ETA_HELD: usize = (Value("100"), |v| parse::bounded(v, 1, 10_000).map(|n| n as usize),
        "task messages held for a future eta; more go back to the tail of their queue");
    METRICS_ADDR: SocketAddr = (Means("off"), parse::metrics_addr,
        "IP address and port of the /metrics and /healthz listener");
    LOG_FORMAT: LogFormat = (Value("text"), parse::log_format,
        "text, or json for one JSON object per line");
    LOG_LEVEL: String = (Value("info"), |v| Ok(v.to_owned()),
        "a tracing filter, e.g. warn or info,zimfarm_worker=debug").read_by(ReadBy::Logging);
    DOCKER_HOST: String = (Value("unix:///var/run/docker.sock"), |v| Ok(v.to_owned()),
        "the Docker engine: unix:///path/to/docker.sock or tcp://host:2375").read_by(ReadBy::Docker);
}

/// The variables and their doc lines, for `--help`.
pub fn help() -> String {
    let mut text = String::from("Environment (see the README for each one):\n");
    for info in TABLE {
        let unset = match info.unset {
            Unset::Required => "required".to_owned(),
            Unset::Value(v) => format!("default {v}"),
            Unset::Means(m) => format!("default: {}", m.trim_matches('`')),
        };
        text.push_str(&format!("  {:<22} {} ({unset})\n", info.name, info.doc));
    }
    text
}

/// The variables that configuration loading reads, as the process has
/// them (UTF-8 checked), before any is parsed.
#[derive(Debug, Clone, Default)]
pub struct Env {
    values: HashMap<&'static str, String>,
}

impl Env {
    /// The process environment.
    pub fn from_process() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars_os())
    }

    /// The given variables (the environment, in tests). Names are matched
    /// as written; others are ignored.
    pub fn from_vars<I>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (OsString, OsString)>,
    {
        let mut values = HashMap::new();
        for (key, value) in vars {
            let Some(info) = TABLE
                .iter()
                .find(|i| i.by == ReadBy::Config && key.to_str() == Some(i.name))
            else {
                continue;
            };
            let Ok(value) = value.into_string() else {
                return Err(ConfigError::new(info.name, "is not valid UTF-8"));
            };
            if values.insert(info.name, value).is_some() {
                return Err(ConfigError::new(info.name, "is set more than once"));
            }
        }
        Ok(Self { values })
    }

    /// The variable's value (its default when unset or empty), parsed;
    /// `None` when it is unset and that means off. A required one that is
    /// unset is an error.
    pub fn get<T>(&self, var: &Var<T>) -> Result<Option<T>, ConfigError> {
        let info = &var.info;
        let given = self
            .values
            .get(info.name)
            .map(|v| if info.trim { v.trim() } else { v.as_str() })
            .filter(|v| !v.is_empty());
        let value = match (given, info.unset) {
            (Some(v), _) => v,
            (None, Unset::Value(default)) => default,
            (None, Unset::Means(_)) => return Ok(None),
            (None, Unset::Required) => return Err(required(info.name)),
        };
        var.parse(value).map(Some)
    }

    /// Like [`Env::get`], for a variable that is required or has a default.
    pub fn value<T>(&self, var: &Var<T>) -> Result<T, ConfigError> {
        self.get(var)?.ok_or_else(|| required(var.info.name))
    }
}

fn required(name: &'static str) -> ConfigError {
    ConfigError::new(name, "is required but not set")
}
