//! The Docker engine, through bollard: images (with the pull policy and
//! progress), containers (create with a bounded log driver, attach to their
//! output, start, read back the log driver's copy, pause, inspect, wait and
//! say how they ended, kill, remove), bridge
//! networks (made idempotently, inspected), and clean-up of this node's
//! containers by label. A `DOCKER_HOST` socket path too
//! long for a socket address is reached through its dir's descriptor.
//!
//! Owns every call to the Docker API. It must not know about Celery, tasks'
//! meaning or the warehouse: it runs what the pipeline describes in a
//! [`ContainerSpec`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig, NetworkCreateRequest};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, CreateImageOptions, InspectContainerOptions,
    KillContainerOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions,
    WaitContainerOptions,
};
use futures_util::{Stream, StreamExt};

/// A container's stdout and stderr, as the engine sends them.
pub type OutputStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;

/// Label naming the worker (Celery hostname) a container belongs to.
pub const LABEL_NODE: &str = "org.openzim.zimfarm.node";
/// Label naming the task a container belongs to.
pub const LABEL_TASK: &str = "org.openzim.zimfarm.task";
/// Label naming a container's role (`offliner`, `redis`).
pub const LABEL_ROLE: &str = "org.openzim.zimfarm.role";

/// When to pull an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    /// Pull every time (a local copy is used, with a warning, when the
    /// registry cannot be reached).
    Always,
    /// Pull only when no local copy exists.
    IfMissing,
    /// Never pull: the image must be present.
    Never,
}

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error(
        "cannot reach the Docker engine ({0}); is /var/run/docker.sock mounted and readable, or DOCKER_HOST set?"
    )]
    Connect(#[source] bollard::errors::Error),
    #[error(
        "cannot use DOCKER_HOST=unix://{path}: {problem}; a unix socket address holds {max} bytes, \
         so point DOCKER_HOST at a shorter path (a symlink to the socket works)",
        max = SUN_PATH_MAX
    )]
    SocketPath { path: String, problem: String },
    #[error("image {image} is not present and PULL_POLICY=never forbids pulling it")]
    ImageMissing { image: String },
    #[error("cannot pull image {image}: {reason}")]
    Pull { image: String, reason: String },
    #[error("Docker refused to {action} container {name}: {source}")]
    Container {
        action: &'static str,
        name: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("Docker API error while {action}: {source}")]
    Api {
        action: &'static str,
        #[source]
        source: bollard::errors::Error,
    },
}

/// What to run: everything the pipeline decides about one container.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// The command as argv; empty runs the image's own command.
    pub cmd: Vec<String>,
    pub labels: HashMap<String, String>,
    /// `host_path:container_path[:ro]`.
    pub binds: Vec<String>,
    /// No network at all (helpers).
    pub no_network: bool,
    /// The network to join (ignored with `no_network`); `None`: Docker's
    /// default bridge.
    pub network: Option<String>,
    /// Capabilities given back after dropping all of them (`CAP_` names
    /// without the prefix, e.g. `CHOWN`).
    pub cap_add: Vec<String>,
    /// Most processes and threads the container may have at once.
    pub pids_limit: Option<i64>,
    /// Namespaced kernel settings of the container (`net.*`).
    pub sysctls: HashMap<String, String>,
    /// `uid:gid` to run as; `None`: the image's user.
    pub user: Option<String>,
    /// Memory limit in bytes (swap included: the container cannot swap).
    pub memory: Option<i64>,
    /// CPU limit in billionths of a CPU.
    pub nano_cpus: Option<i64>,
    /// Bound on Docker's own copy of the output; `None` keeps the engine's
    /// default log config (unbounded `json-file` on a default engine).
    pub log_limit: Option<LogLimit>,
}

/// A bound on Docker's own copy of a container's output: the `json-file`
/// driver, rotated at `file_bytes`, keeping `files` files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimit {
    pub file_bytes: u64,
    pub files: u32,
}

impl LogLimit {
    /// `total_bytes` in all, split over `files` files (at least 1 KiB each).
    pub fn total(total_bytes: u64, files: u32) -> Self {
        let files = files.max(1);
        Self {
            file_bytes: (total_bytes / u64::from(files)).max(1024),
            files,
        }
    }

    fn log_config(self) -> HostConfigLogConfig {
        HostConfigLogConfig {
            typ: Some("json-file".to_owned()),
            config: Some(HashMap::from([
                (
                    "max-size".to_owned(),
                    format!("{}k", self.file_bytes / 1024),
                ),
                ("max-file".to_owned(), self.files.to_string()),
            ])),
        }
    }
}

/// How a container ended: its exit code, and whether the kernel killed a
/// process of it for going over its memory limit (Docker's `OOMKilled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerExit {
    pub code: i64,
    pub oom_killed: bool,
}

/// A container as the engine has it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerState {
    /// Running (or paused, restarting): not ended.
    pub running: bool,
    /// How it ended, when it is not running.
    pub exit: ContainerExit,
    /// When it started (RFC 3339), when it did.
    pub started_at: Option<String>,
    /// When it ended (RFC 3339), when it did.
    pub finished_at: Option<String>,
    /// The image it runs, as it was named at create.
    pub image: String,
}

/// A container found by its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub running: bool,
    pub labels: HashMap<String, String>,
}

/// A bridge network to make: its name, driver options and labels.
#[derive(Debug, Clone, Default)]
pub struct BridgeNetwork {
    pub name: String,
    pub options: HashMap<String, String>,
    pub labels: HashMap<String, String>,
}

/// A network as the engine has it.
#[derive(Debug, Clone, Default)]
pub struct NetworkInfo {
    pub id: String,
    pub driver: String,
    pub options: HashMap<String, String>,
}

/// bollard's own default read/write timeout for every request.
const DOCKER_TIMEOUT_SECS: u64 = 120;

/// Longest path a unix socket address (`sun_path`, 108 bytes with its
/// NUL) holds.
pub const SUN_PATH_MAX: usize = 107;

/// One reading of a running container's memory and CPU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContainerUsage {
    /// Bytes in use, without the inactive page cache (what `docker stats`
    /// shows).
    pub memory: u64,
    /// CPU time used since the container started, in nanoseconds.
    pub cpu_ns: u64,
}

impl ContainerUsage {
    /// `None` for a container that is not running (Docker then gives no
    /// memory figure).
    fn from_stats(stats: &bollard::models::ContainerStatsResponse) -> Option<Self> {
        let memory = stats.memory_stats.as_ref()?;
        let usage = memory.usage?;
        let inactive = memory.stats.as_ref().and_then(|s| {
            s.get("inactive_file")
                .or_else(|| s.get("total_inactive_file"))
                .copied()
        });
        let cpu_ns = stats
            .cpu_stats
            .as_ref()
            .and_then(|c| c.cpu_usage.as_ref())
            .and_then(|u| u.total_usage)
            .unwrap_or(0);
        Some(Self {
            memory: usage.saturating_sub(inactive.unwrap_or(0)),
            cpu_ns,
        })
    }
}

/// A connected Docker engine.
#[derive(Clone)]
pub struct DockerClient {
    docker: Docker,
    /// The socket's dir, held open while the client lives when DOCKER_HOST
    /// names a socket path too long for `sun_path`: bollard connects by
    /// `/proc/self/fd/<this>/<socket name>` instead.
    _socket_dir: Option<std::sync::Arc<rustix::fd::OwnedFd>>,
}

/// Opens the dir of a socket whose path is too long to connect to, and
/// returns the short path through that dir's descriptor.
fn short_socket_path(path: &str) -> Result<(String, rustix::fd::OwnedFd), DockerError> {
    let refused = |problem: String| DockerError::SocketPath {
        path: path.to_owned(),
        problem,
    };
    let path_ref = std::path::Path::new(path);
    let (Some(dir), Some(name)) = (path_ref.parent(), path_ref.file_name()) else {
        return Err(refused("it names no socket file".to_owned()));
    };
    let fd = rustix::fs::open(
        dir,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| {
        refused(format!(
            "cannot open {}: {}",
            dir.display(),
            std::io::Error::from(e)
        ))
    })?;
    let short = format!(
        "/proc/self/fd/{}/{}",
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        name.to_string_lossy()
    );
    if short.len() > SUN_PATH_MAX {
        return Err(refused(format!(
            "its path is {} bytes and its file name alone is too long to reach through its dir",
            path.len()
        )));
    }
    Ok((short, fd))
}

/// bollard's "not found" and "not modified / conflict" are normal while
/// cleaning up (the container is already gone or already stopped).
fn is_gone_or_stopped(error: &bollard::errors::Error) -> bool {
    matches!(
        error,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 304 | 404 | 409,
            ..
        }
    )
}

impl DockerClient {
    /// Connects as the docker CLI does (`DOCKER_HOST`: `unix://` or plain
    /// `tcp://`; else the local socket) and negotiates the API version with
    /// the engine.
    ///
    /// A `unix://` path longer than a socket address holds is reached
    /// through its dir's descriptor (see [`DockerClient`]).
    pub async fn connect() -> Result<Self, DockerError> {
        let long_path = std::env::var(crate::config::vars::DOCKER_HOST.name())
            .ok()
            .and_then(|host| {
                host.strip_prefix("unix://")
                    .filter(|path| path.len() > SUN_PATH_MAX)
                    .map(str::to_owned)
            });
        let (docker, socket_dir) = match long_path {
            None => (
                Docker::connect_with_defaults().map_err(DockerError::Connect)?,
                None,
            ),
            Some(path) => {
                let shown = path.clone();
                let (short, fd) = tokio::task::spawn_blocking(move || short_socket_path(&path))
                    .await
                    .map_err(|e| DockerError::SocketPath {
                        path: shown,
                        problem: e.to_string(),
                    })??;
                tracing::debug!(socket = %short, "DOCKER_HOST is too long for a socket address; connecting through its dir");
                let docker = Docker::connect_with_unix(
                    &short,
                    DOCKER_TIMEOUT_SECS,
                    bollard::API_DEFAULT_VERSION,
                )
                .map_err(DockerError::Connect)?;
                (docker, Some(std::sync::Arc::new(fd)))
            }
        };
        let docker = docker
            .negotiate_version()
            .await
            .map_err(DockerError::Connect)?;
        Ok(Self {
            docker,
            _socket_dir: socket_dir,
        })
    }

    /// The engine's version and API version, e.g. `20.10.24 (API 1.41)`.
    pub async fn version(&self) -> Result<String, DockerError> {
        let v = self.docker.version().await.map_err(DockerError::Connect)?;
        Ok(format!(
            "{} (API {})",
            v.version.unwrap_or_default(),
            v.api_version.unwrap_or_default()
        ))
    }

    async fn image_present(&self, image: &str) -> Result<bool, DockerError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(source) => Err(DockerError::Api {
                action: "inspecting an image",
                source,
            }),
        }
    }

    /// Makes sure `image` (`name:tag`) is present, pulling per `policy`.
    pub async fn ensure_image(&self, image: &str, policy: PullPolicy) -> Result<(), DockerError> {
        let present = self.image_present(image).await?;
        match policy {
            PullPolicy::Never if present => return Ok(()),
            PullPolicy::Never => {
                return Err(DockerError::ImageMissing {
                    image: image.to_owned(),
                });
            }
            PullPolicy::IfMissing if present => return Ok(()),
            PullPolicy::IfMissing | PullPolicy::Always => {}
        }
        match self.pull(image).await {
            Ok(()) => Ok(()),
            Err(error) if present => {
                tracing::warn!(%image, %error, "pull failed; using the local copy of the image");
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// Pulls an image, logging progress (layers, bytes) every few seconds.
    async fn pull(&self, image: &str) -> Result<(), DockerError> {
        let (name, tag) = match image.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, t),
            _ => (image, "latest"),
        };
        let options = CreateImageOptions {
            from_image: Some(name.to_owned()),
            tag: Some(tag.to_owned()),
            ..Default::default()
        };
        tracing::info!(%image, "pulling image");
        let mut stream = self.docker.create_image(Some(options), None, None);
        let mut layers: HashMap<String, (i64, i64)> = HashMap::new();
        let mut last_report = Instant::now();
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| DockerError::Pull {
                image: image.to_owned(),
                reason: e.to_string(),
            })?;
            if let Some(detail) = info.error_detail {
                return Err(DockerError::Pull {
                    image: image.to_owned(),
                    reason: detail.message.unwrap_or_default(),
                });
            }
            if let (Some(id), Some(progress)) = (info.id, info.progress_detail) {
                let entry = layers.entry(id).or_default();
                entry.0 = progress.current.unwrap_or(entry.0);
                entry.1 = progress.total.unwrap_or(entry.1);
            }
            if last_report.elapsed() >= Duration::from_secs(5) {
                last_report = Instant::now();
                let (done, total) = layers
                    .values()
                    .fold((0, 0), |(d, t), (c, tt)| (d + c, t + tt));
                tracing::info!(%image, layers = layers.len(), bytes = done, total, "pulling image");
            }
        }
        tracing::info!(%image, layers = layers.len(), "image pulled");
        Ok(())
    }

    /// Creates a container (not started).
    async fn create(&self, spec: &ContainerSpec) -> Result<(), DockerError> {
        let host_config = HostConfig {
            binds: Some(spec.binds.clone()),
            privileged: Some(false),
            // setuid binaries and file capabilities grant nothing.
            security_opt: Some(vec!["no-new-privileges".to_owned()]),
            // Every capability is dropped (Docker's default set includes
            // NET_RAW, MKNOD, DAC_OVERRIDE, ...); the spec names the few
            // given back, each justified where the spec is made.
            cap_drop: Some(vec!["ALL".to_owned()]),
            cap_add: Some(spec.cap_add.clone()),
            pids_limit: spec.pids_limit,
            sysctls: (!spec.sysctls.is_empty()).then(|| spec.sysctls.clone()),
            network_mode: if spec.no_network {
                Some("none".to_owned())
            } else {
                spec.network.clone()
            },
            memory: spec.memory,
            // Swap counts against the limit: without this a host with swap
            // lets the container swap up to twice its limit instead of
            // being stopped at it.
            memory_swap: spec.memory,
            nano_cpus: spec.nano_cpus,
            log_config: spec.log_limit.map(LogLimit::log_config),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            user: spec.user.clone(),
            cmd: (!spec.cmd.is_empty()).then(|| spec.cmd.clone()),
            labels: Some(spec.labels.clone()),
            network_disabled: spec.no_network.then_some(true),
            host_config: Some(host_config),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(spec.name.clone()),
            ..Default::default()
        };
        self.docker
            .create_container(Some(options), body)
            .await
            .map_err(|source| DockerError::Container {
                action: "create",
                name: spec.name.clone(),
                source,
            })?;
        Ok(())
    }

    async fn start_created(&self, name: &str) -> Result<(), DockerError> {
        self.docker
            .start_container(name, None)
            .await
            .map_err(|source| DockerError::Container {
                action: "start",
                name: name.to_owned(),
                source,
            })
    }

    /// Starts a container that was created and never started (a worker
    /// killed between the two steps of [`Docker::start_attached`]).
    pub async fn start_existing(&self, name: &str) -> Result<(), DockerError> {
        self.start_created(name).await
    }

    /// Creates and starts a container whose output nobody reads (helpers).
    pub async fn start(&self, spec: &ContainerSpec) -> Result<(), DockerError> {
        self.create(spec).await?;
        self.start_created(&spec.name).await
    }

    /// Creates a container, attaches to its stdout and stderr, then starts
    /// it: the stream holds every byte it prints, from the first.
    ///
    /// Attach, not `logs(follow)`: following the log driver's files loses
    /// whole files of output when the driver rotates them faster than it
    /// reads (measured on Docker 20.10: 3.8 to 20 MB of a 50 MB burst
    /// arrived with 1 MB kept, 9.9 MB with 50 MB kept), silently. Attach
    /// reads the container's output pipe itself, and a slow reader slows
    /// the container rather than losing anything.
    pub async fn start_attached(&self, spec: &ContainerSpec) -> Result<OutputStream, DockerError> {
        self.create(spec).await?;
        let output = self.attach(&spec.name).await?;
        self.start_created(&spec.name).await?;
        Ok(output)
    }

    /// Attaches to a container's stdout and stderr: what it prints from now
    /// on (nothing of the past).
    pub async fn attach(&self, name: &str) -> Result<OutputStream, DockerError> {
        let attached = self
            .docker
            .attach_container(
                name,
                Some(AttachContainerOptions {
                    stream: true,
                    stdout: true,
                    stderr: true,
                    logs: false,
                    ..Default::default()
                }),
            )
            .await
            .map_err(|source| DockerError::Container {
                action: "attach to",
                name: name.to_owned(),
                source,
            })?;
        Ok(attached.output)
    }

    /// Freezes a running container's processes (the cgroup freezer), or
    /// thaws them (`pause == false`).
    pub async fn set_paused(&self, name: &str, pause: bool) -> Result<(), DockerError> {
        let done = if pause {
            self.docker.pause_container(name).await
        } else {
            self.docker.unpause_container(name).await
        };
        done.map_err(|source| DockerError::Container {
            action: if pause { "pause" } else { "unpause" },
            name: name.to_owned(),
            source,
        })
    }

    /// A container's output as the log driver keeps it, each chunk one
    /// line (or part of a long one) prefixed with its RFC 3339 timestamp
    /// (nanoseconds) and a space: from `since` (epoch seconds, whole: the
    /// API takes no finer), then, with `follow`, as it is printed until the
    /// container stops. The worker reads it only to carry a task on: what
    /// the container printed while no worker read its output, up to what
    /// the bounded copy (`CONTAINER_LOG_MAX_MB`) still holds.
    pub fn logs(&self, name: &str, follow: bool, since: i64) -> OutputStream {
        let options = LogsOptions {
            follow,
            stdout: true,
            stderr: true,
            timestamps: true,
            since: i32::try_from(since.max(0)).unwrap_or(i32::MAX),
            ..Default::default()
        };
        Box::pin(self.docker.logs(name, Some(options)))
    }

    /// How a container is now; `None` when there is no such container.
    pub async fn state(&self, name: &str) -> Result<Option<ContainerState>, DockerError> {
        match self
            .docker
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
        {
            Ok(inspect) => {
                let state = inspect.state.unwrap_or_default();
                Ok(Some(ContainerState {
                    running: state.running.unwrap_or(false)
                        || state.restarting.unwrap_or(false)
                        || state.paused.unwrap_or(false),
                    exit: ContainerExit {
                        code: state.exit_code.unwrap_or(0),
                        oom_killed: state.oom_killed.unwrap_or(false),
                    },
                    started_at: state.started_at.filter(|t| !t.starts_with("0001-")),
                    finished_at: state.finished_at.filter(|t| !t.starts_with("0001-")),
                    image: inspect.config.and_then(|c| c.image).unwrap_or_default(),
                }))
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(source) => Err(DockerError::Container {
                action: "inspect",
                name: name.to_owned(),
                source,
            }),
        }
    }

    /// One reading of a container's memory and CPU (a one-shot stats
    /// call: no stream is held open). `None` when there is no such
    /// container or it is not running.
    pub async fn usage(&self, name: &str) -> Result<Option<ContainerUsage>, DockerError> {
        use futures_util::StreamExt;
        let options = bollard::query_parameters::StatsOptionsBuilder::default()
            .stream(false)
            .one_shot(true)
            .build();
        let mut stream = self.docker.stats(name, Some(options));
        match stream.next().await {
            None => Ok(None),
            Some(Ok(stats)) => Ok(ContainerUsage::from_stats(&stats)),
            Some(Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404 | 409,
                ..
            })) => Ok(None),
            Some(Err(source)) => Err(DockerError::Container {
                action: "read the stats of",
                name: name.to_owned(),
                source,
            }),
        }
    }

    /// Waits for a container to exit; says how it ended.
    pub async fn wait(&self, name: &str) -> Result<ContainerExit, DockerError> {
        let code = self.wait_code(name).await?;
        let oom_killed = match self
            .docker
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
        {
            Ok(inspect) => inspect.state.and_then(|s| s.oom_killed).unwrap_or(false),
            Err(error) => {
                tracing::warn!(container = name, %error, "cannot inspect the exited container; assuming it was not killed for memory");
                false
            }
        };
        Ok(ContainerExit { code, oom_killed })
    }

    async fn wait_code(&self, name: &str) -> Result<i64, DockerError> {
        let mut stream = self.docker.wait_container(
            name,
            Some(WaitContainerOptions {
                condition: "not-running".to_owned(),
            }),
        );
        match stream.next().await {
            Some(Ok(response)) => Ok(response.status_code),
            // bollard reports a non-zero exit as this error.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(source)) => Err(DockerError::Container {
                action: "wait for",
                name: name.to_owned(),
                source,
            }),
            None => Err(DockerError::Container {
                action: "wait for",
                name: name.to_owned(),
                source: bollard::errors::Error::DockerStreamError {
                    error: "the wait stream ended without a status".to_owned(),
                },
            }),
        }
    }

    /// Kills (SIGKILL) and removes a container; a container already
    /// stopped or gone is fine.
    pub async fn kill_and_remove(&self, name: &str) -> Result<(), DockerError> {
        if let Err(source) = self
            .docker
            .kill_container(
                name,
                Some(KillContainerOptions {
                    signal: "SIGKILL".to_owned(),
                }),
            )
            .await
            && !is_gone_or_stopped(&source)
        {
            tracing::warn!(container = name, error = %source, "kill failed; removing anyway");
        }
        match self
            .docker
            .remove_container(
                name,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(source) if is_gone_or_stopped(&source) => Ok(()),
            Err(source) => Err(DockerError::Container {
                action: "remove",
                name: name.to_owned(),
                source,
            }),
        }
    }

    /// A network by name: its id, driver and options; `None` when there is
    /// no such network.
    pub async fn network(&self, name: &str) -> Result<Option<NetworkInfo>, DockerError> {
        match self
            .docker
            .inspect_network(
                name,
                None::<bollard::query_parameters::InspectNetworkOptions>,
            )
            .await
        {
            Ok(n) => Ok(Some(NetworkInfo {
                id: n.id.unwrap_or_default(),
                driver: n.driver.unwrap_or_default(),
                options: n.options.unwrap_or_default(),
            })),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(source) => Err(DockerError::Api {
                action: "inspecting a network",
                source,
            }),
        }
    }

    /// Makes sure the bridge network `spec` exists, creating it when it
    /// does not; returns it as it is. Several processes may do this at
    /// once: the fixed bridge interface name lets only one creation
    /// succeed (Docker 20.10 refuses a second network with the same
    /// bridge name, and answers 409 to the same network name on newer
    /// engines), and the others find the winner's network.
    pub async fn ensure_bridge_network(
        &self,
        spec: &BridgeNetwork,
    ) -> Result<NetworkInfo, DockerError> {
        if let Some(found) = self.network(&spec.name).await? {
            return Ok(found);
        }
        let request = NetworkCreateRequest {
            name: spec.name.clone(),
            driver: Some("bridge".to_owned()),
            internal: Some(false),
            attachable: Some(false),
            enable_ipv6: Some(false),
            options: Some(spec.options.clone()),
            labels: Some(spec.labels.clone()),
            ..Default::default()
        };
        let created = self.docker.create_network(request).await;
        // Lost a race, or won it: either way the network is there now.
        match (self.network(&spec.name).await?, created) {
            (Some(found), Ok(_)) => Ok(found),
            (Some(found), Err(error)) => {
                tracing::debug!(network = %spec.name, %error, "network made by another process meanwhile");
                Ok(found)
            }
            (None, Err(source)) => Err(DockerError::Api {
                action: "creating the scrapers' network",
                source,
            }),
            (None, Ok(_)) => Err(DockerError::Api {
                action: "creating the scrapers' network",
                source: bollard::errors::Error::DockerStreamError {
                    error: format!("network {} was created but cannot be found", spec.name),
                },
            }),
        }
    }

    /// Names of the containers (running or not) carrying every given label.
    pub async fn containers_labelled(
        &self,
        labels: &[(&str, &str)],
    ) -> Result<Vec<String>, DockerError> {
        Ok(self
            .listed(labels)
            .await?
            .into_iter()
            .map(|c| c.name)
            .collect())
    }

    /// The containers (running or not) carrying every given label (`k` or
    /// `k=v`), with their labels.
    pub async fn listed(&self, labels: &[(&str, &str)]) -> Result<Vec<Listed>, DockerError> {
        let filters = HashMap::from([(
            "label".to_owned(),
            labels
                .iter()
                .map(|(k, v)| {
                    if v.is_empty() {
                        (*k).to_owned()
                    } else {
                        format!("{k}={v}")
                    }
                })
                .collect(),
        )]);
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|source| DockerError::Api {
                action: "listing containers",
                source,
            })?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let name = c.names?.into_iter().next()?;
                Some(Listed {
                    name: name.trim_start_matches('/').to_owned(),
                    running: c.state.is_some_and(|s| {
                        matches!(
                            s,
                            bollard::models::ContainerSummaryStateEnum::RUNNING
                                | bollard::models::ContainerSummaryStateEnum::PAUSED
                                | bollard::models::ContainerSummaryStateEnum::RESTARTING
                        )
                    }),
                    labels: c.labels.unwrap_or_default(),
                })
            })
            .collect())
    }

    /// Removes every container carrying the labels; returns how many.
    pub async fn remove_labelled(&self, labels: &[(&str, &str)]) -> Result<usize, DockerError> {
        let names = self.containers_labelled(labels).await?;
        for name in &names {
            self.kill_and_remove(name).await?;
        }
        Ok(names.len())
    }
}
