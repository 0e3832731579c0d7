//! The operator commands: `check` (is this host ready to be a worker?) and
//! `register-key` (the seed README's three curl steps in one command).
//!
//! Owns the checks and `check`'s lines (its exit code is the number of
//! failed checks), and the steps of `register-key`; how a command that
//! failed is reported, and its exit code, are `startup`'s. It must not run
//! tasks or keep connections open: every check connects, looks, and leaves.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use crate::broker::Broker;
use crate::config::{Config, ConfigError, DispatcherSettings, WarehouseSettings};
use crate::dispatcher::{Dispatcher, DispatcherError};
use crate::docker::DockerClient;
use crate::scraper_net::{BRIDGE_NAME, DEFAULT_NETWORK, FilterState, ScraperNetwork};
use crate::warehouse::{ClientKey, Warehouse};

/// How long one check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(45);

/// The verdict of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ok(String),
    Failed(String),
    /// Not run: something it needs failed first.
    Skipped(String),
}

/// One line of `check`'s report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    pub name: &'static str,
    pub verdict: Verdict,
}

impl fmt::Display for CheckLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (tag, text) = match &self.verdict {
            Verdict::Ok(t) => ("ok  ", t),
            Verdict::Failed(t) => ("FAIL", t),
            Verdict::Skipped(t) => ("skip", t),
        };
        write!(f, "{tag}  {:<16} {text}", self.name)
    }
}

/// Runs `check`: one line per check, printed as it completes; returns the
/// number of failed checks (the exit code).
pub async fn check(
    config: Result<Config, ConfigError>,
    mut print: impl FnMut(&CheckLine),
) -> usize {
    let mut failed = 0;
    let mut report = |name: &'static str, verdict: Verdict| {
        if matches!(verdict, Verdict::Failed(_)) {
            failed += 1;
        }
        print(&CheckLine { name, verdict });
    };
    let config = match config {
        Ok(c) => {
            report(
                "config",
                Verdict::Ok(format!(
                    "{} consuming {} with {} slot(s)",
                    c.hostname(),
                    c.broker
                        .queues
                        .iter()
                        .map(|q| q.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                    c.worker.concurrency
                )),
            );
            c
        }
        Err(e) => {
            report("config", Verdict::Failed(e.to_string()));
            for name in [
                "dispatcher login",
                "key registered",
                "broker",
                "docker",
                "scraper network",
                "warehouse",
                "disk",
                "kept scrapes",
            ] {
                report(
                    name,
                    Verdict::Skipped("needs a valid configuration".to_owned()),
                );
            }
            return failed;
        }
    };

    // The SSH key is needed by two checks; read it once.
    let key = ClientKey::load(&config.warehouse.ssh_key).await;

    let dispatcher = dispatcher_login(&config.dispatcher).await;
    match &dispatcher {
        Ok(_) => report(
            "dispatcher login",
            Verdict::Ok(format!(
                "{} as {}",
                config.dispatcher.url, config.dispatcher.username
            )),
        ),
        Err(e) => report("dispatcher login", Verdict::Failed(e.to_string())),
    }
    match (&dispatcher, &key) {
        (Err(_), _) => report(
            "key registered",
            Verdict::Skipped("needs the dispatcher login".to_owned()),
        ),
        (_, Err(e)) => report("key registered", Verdict::Failed(e.to_string())),
        (Ok(d), Ok(key)) => report(
            "key registered",
            key_registered(d, key, &config.dispatcher.username).await,
        ),
    }

    report("broker", timed(broker_check(&config)).await);
    report("docker", timed(docker_check()).await);
    report(
        "scraper network",
        timed(scraper_network_check(
            config.pipeline.scraper_network.as_deref(),
        ))
        .await,
    );
    match &key {
        Err(e) => report("warehouse", Verdict::Failed(e.to_string())),
        Ok(_) => report(
            "warehouse",
            timed(warehouse_check(config.warehouse.clone())).await,
        ),
    }
    report(
        "disk",
        disk_check(&config.pipeline.zim_dir, config.pipeline.min_free_disk).await,
    );
    report(
        "kept scrapes",
        timed(kept_check(
            &config.pipeline.zim_dir,
            &config.pipeline.node_name,
        ))
        .await,
    );
    failed
}

/// The scrapes an earlier run of this node left (adoptable or not, and
/// why), and the containers labelled for another NODE_NAME, which this
/// node never adopts: one indented line each.
async fn kept_check(zim_dir: &Path, node: &str) -> Verdict {
    use crate::pipeline::kept::{Judged, survey};
    let docker = match DockerClient::connect().await {
        Ok(d) => d,
        Err(e) => return Verdict::Skipped(format!("needs Docker: {e}")),
    };
    let found = match survey(&docker, zim_dir, node).await {
        Ok(found) => found,
        Err(e) => return Verdict::Failed(e.to_string()),
    };
    let mut lines = Vec::new();
    for f in &found {
        match f.judge(node) {
            Judged::Kept(task) => lines.push(format!(
                "{} {} ({}), {} h old: carried on by the next start within RESTART_GRACE",
                task.task_id,
                task.stage,
                task.offliner,
                task.age.as_secs() / 3600
            )),
            Judged::Removed { why, .. } => lines.push(format!(
                "{}: not adoptable, removed by the next start: {why}",
                f.task_id
            )),
            Judged::Ignored => {}
        }
    }
    let kept = lines.len();
    let others = match docker.listed(&[(crate::docker::LABEL_NODE, "")]).await {
        Ok(listed) => listed,
        Err(e) => return Verdict::Failed(e.to_string()),
    };
    let mut other_nodes = 0;
    for c in &others {
        let of = c
            .labels
            .get(crate::docker::LABEL_NODE)
            .map_or("", String::as_str);
        if of == node {
            continue;
        }
        other_nodes += 1;
        lines.push(format!(
            "container {} of NODE_NAME {of} (task {}, {}): another node's, never adopted here",
            c.name,
            c.labels
                .get(crate::docker::LABEL_TASK)
                .map_or("?", String::as_str),
            if c.running { "running" } else { "stopped" },
        ));
    }
    let listed: String = lines.iter().map(|l| format!("\n    {l}")).collect();
    Verdict::Ok(format!(
        "{kept} kept by {node} (a running worker's own tasks show too), {other_nodes} \
         container(s) of other nodes{listed}"
    ))
}

async fn timed(check: impl Future<Output = Verdict>) -> Verdict {
    match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(v) => v,
        Err(_) => Verdict::Failed(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())),
    }
}

async fn dispatcher_login(settings: &DispatcherSettings) -> Result<Dispatcher, DispatcherError> {
    let d = Dispatcher::from_settings(settings)?;
    match tokio::time::timeout(CHECK_TIMEOUT, d.login()).await {
        Ok(r) => r.map(|()| d),
        Err(_) => Err(DispatcherError::Unreachable {
            url: settings.url.clone(),
            detail: format!("no answer within {} s", CHECK_TIMEOUT.as_secs()),
        }),
    }
}

/// Whether the SSH key is registered for the user at the dispatcher.
#[derive(Debug)]
pub enum KeyStatus {
    Registered,
    NotRegistered,
    /// The dispatcher could not say.
    Unknown(DispatcherError),
}

/// Looks `key`'s MD5 fingerprint up among the user's registered keys.
pub async fn key_status(d: &Dispatcher, key: &ClientKey) -> KeyStatus {
    let fingerprint = key.md5_fingerprint();
    match d.keys().await {
        Ok(keys) if keys.iter().any(|k| k.matches_fingerprint(&fingerprint)) => {
            KeyStatus::Registered
        }
        Ok(_) => KeyStatus::NotRegistered,
        Err(e) => KeyStatus::Unknown(e),
    }
}

async fn key_registered(d: &Dispatcher, key: &ClientKey, username: &str) -> Verdict {
    match key_status(d, key).await {
        KeyStatus::Registered => Verdict::Ok(format!(
            "{} (MD5 {}) is registered for {username}",
            key.path().display(),
            key.md5_fingerprint()
        )),
        KeyStatus::NotRegistered => Verdict::Failed(unregistered_message(key, username)),
        KeyStatus::Unknown(e) => Verdict::Failed(e.to_string()),
    }
}

/// What to say when the SSH key is not registered, with the fix.
pub fn unregistered_message(key: &ClientKey, username: &str) -> String {
    format!(
        "the SSH key {} (MD5 {}) is not registered for {username} at the dispatcher, so the \
         warehouse will refuse uploads; register it with: zimfarm-worker register-key \
         (same USERNAME, PASSWORD and SSH_KEY)",
        key.path().display(),
        key.md5_fingerprint()
    )
}

async fn broker_check(config: &Config) -> Verdict {
    let broker = match Broker::new(config) {
        Ok(b) => b,
        Err(e) => return Verdict::Failed(e.to_string()),
    };
    match broker.check().await {
        Ok(()) => Verdict::Ok(format!(
            "{}: connected, exchanges and queues declared",
            broker.display_url()
        )),
        Err(e) => Verdict::Failed(format!("{}: {e}", broker.display_url())),
    }
}

async fn docker_check() -> Verdict {
    let docker = match DockerClient::connect().await {
        Ok(d) => d,
        Err(e) => return Verdict::Failed(e.to_string()),
    };
    match docker.version().await {
        Ok(v) => Verdict::Ok(v),
        Err(e) => Verdict::Failed(e.to_string()),
    }
}

/// The scrapers' network and its packet filter: in place, missing (with
/// the commands that install it), or not visible from here (a worker in a
/// container: the commands, to run and check on the host).
async fn scraper_network_check(configured: Option<&str>) -> Verdict {
    let docker = match DockerClient::connect().await {
        Ok(d) => d,
        Err(e) => return Verdict::Skipped(format!("needs Docker: {e}")),
    };
    let (network, made) = match ScraperNetwork::find(&docker, configured).await {
        Ok(Some(n)) => (n, true),
        // The worker's own is made at start; its filter's commands name
        // its fixed bridge all the same.
        Ok(None) => {
            let own = ScraperNetwork {
                name: DEFAULT_NETWORK.to_owned(),
                bridge: Some(BRIDGE_NAME.to_owned()),
                own: true,
                ipv6_off: false,
            };
            (own, false)
        }
        Err(e) => return Verdict::Failed(e.to_string()),
    };
    let Some(filter) = network.filter().await else {
        return Verdict::Failed(format!(
            "{}: not a bridge network, so no filter can name its interface; \
             use a bridge network (see the README)",
            network.name
        ));
    };
    let name = &network.name;
    let bridge = &filter.bridge;
    // Indented under the check's line, ready to paste.
    let commands: String = filter
        .commands()
        .lines()
        .map(|line| format!("\n    {line}"))
        .collect();
    if !made {
        return Verdict::Skipped(format!(
            "{name} does not exist yet: the worker makes it (bridge {bridge}) when it starts. \
             Then, unless the worker says it installed the packet filter, run as root on the \
             host (each line adds only what is missing; rerun after a reboot):{commands}"
        ));
    }
    match filter.state().await {
        Ok(FilterState::InPlace { backend }) => Verdict::Ok(format!(
            "{name} (bridge {bridge}): packet filter in place (iptables, {backend})"
        )),
        Ok(FilterState::Missing { backend, missing }) => Verdict::Failed(format!(
            "{name} (bridge {bridge}): packet filter missing ({} of {} rules, iptables {backend}); \
             scrapers can reach the host, its LAN and cloud metadata. Run as root on the host:{commands}",
            missing.len(),
            filter.steps.len()
        )),
        // Not known to be missing: the operator checks it on the host.
        Err(e) => Verdict::Skipped(format!(
            "{name} (bridge {bridge}): cannot verify the packet filter: {e}. \
             Run as root on the host (each line adds only what is missing; \
             rerun after a reboot):{commands}"
        )),
    }
}

async fn warehouse_check(settings: WarehouseSettings) -> Verdict {
    let addr = format!("{}:{}", settings.host, settings.port);
    let warehouse = match Warehouse::new(settings).await {
        Ok(w) => w,
        Err(e) => return Verdict::Failed(e.to_string()),
    };
    match warehouse.probe().await {
        Ok(()) => Verdict::Ok(format!(
            "{addr}: host key verified, SSH key {} accepted",
            warehouse.key().sha256_fingerprint()
        )),
        Err(e) => Verdict::Failed(e.to_string()),
    }
}

/// Kept task dirs listed by `check`; more are counted, not named.
const KEPT_DIRS_LISTED: usize = 10;

async fn disk_check(dir: &Path, min_free: u64) -> Verdict {
    let path = dir.to_owned();
    let found = tokio::task::spawn_blocking(move || {
        let free = crate::sweep::free_bytes(&path)?;
        let kept = crate::sweep::kept_dirs(&path, &Default::default())?;
        Ok::<_, std::io::Error>((free, kept))
    })
    .await;
    match found {
        Ok(Ok((free, kept))) if free >= min_free => Verdict::Ok(format!(
            "{} MiB free in {} (MIN_FREE_DISK_MB={}); {}",
            free >> 20,
            dir.display(),
            min_free >> 20,
            kept_summary(&kept)
        )),
        Ok(Ok((free, kept))) => Verdict::Failed(format!(
            "only {} MiB free in {}, below MIN_FREE_DISK_MB={}: free some space \
             (the worker sweeps kept task dirs, oldest first, before refusing a task); {}",
            free >> 20,
            dir.display(),
            min_free >> 20,
            kept_summary(&kept)
        )),
        Ok(Err(e)) => Verdict::Failed(format!(
            "cannot read {}: {e}; is ZIM_DIR mounted?",
            dir.display()
        )),
        Err(e) => Verdict::Failed(e.to_string()),
    }
}

/// `2 task dirs kept (150 MiB): 6a1f… 100 MiB 30 h old, …`, oldest first.
/// A running worker's own task dirs are listed too: `check` cannot tell.
fn kept_summary(kept: &[crate::sweep::KeptDir]) -> String {
    if kept.is_empty() {
        return "no task dir kept".to_owned();
    }
    let total: u64 = kept.iter().map(|d| d.bytes).sum();
    let mut text = format!(
        "{} task dir(s) kept ({} MiB, swept after KEPT_DIR_MAX_AGE or under disk pressure): ",
        kept.len(),
        total >> 20
    );
    let named: Vec<String> = kept
        .iter()
        .take(KEPT_DIRS_LISTED)
        .map(|d| {
            format!(
                "{} {} MiB {} h old",
                d.task_id,
                d.bytes >> 20,
                d.age.as_secs() / 3600
            )
        })
        .collect();
    text.push_str(&named.join(", "));
    if kept.len() > KEPT_DIRS_LISTED {
        text.push_str(&format!(", and {} more", kept.len() - KEPT_DIRS_LISTED));
    }
    text
}

/// Why `register-key` failed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(transparent)]
    Key(#[from] crate::warehouse::KeyError),
    #[error(transparent)]
    Dispatcher(#[from] DispatcherError),
    #[error(
        "the dispatcher accepted the key but does not list MD5 {fingerprint} for {username}; \
         check with the Zimfarm admins"
    )]
    NotListed {
        fingerprint: String,
        username: String,
    },
}

/// What `register-key` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    /// The key was uploaded, then found in the list.
    Added { fingerprint: String },
    /// It was registered already; nothing was uploaded.
    AlreadyThere { fingerprint: String },
}

/// `register-key`: log in, upload the public key of SSH_KEY under `name`,
/// confirm it is listed. Does nothing when it is registered already.
pub async fn register_key(
    settings: &DispatcherSettings,
    ssh_key: &Path,
    name: &str,
) -> Result<Registered, RegisterError> {
    let key = ClientKey::load(ssh_key).await?;
    let fingerprint = key.md5_fingerprint();
    let d = Dispatcher::from_settings(settings)?;
    d.login().await?;
    let listed = |keys: &[crate::dispatcher::RegisteredKey]| {
        keys.iter().any(|k| k.matches_fingerprint(&fingerprint))
    };
    if listed(&d.keys().await?) {
        return Ok(Registered::AlreadyThere { fingerprint });
    }
    d.add_key(name, &key.public_key_base64()).await?;
    if listed(&d.keys().await?) {
        Ok(Registered::Added { fingerprint })
    } else {
        Err(RegisterError::NotListed {
            fingerprint,
            username: settings.username.clone(),
        })
    }
}
