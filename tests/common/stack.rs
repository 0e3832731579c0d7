//! The one way the integration tests build their services: a [`Stack`] is
//! a RabbitMQ vhost and a temp dir of the test's own, a Celery event
//! receiver listening there, and a connected worker; [`Stack::submit`]
//! sends a [`Task`] the way the dispatcher does, [`Stack::expect_event`] and
//! [`Stack::expect_final`] wait for what the worker reports about it.
//!
//! A [`WorkerEnv`] is the worker's environment as a typed builder: the
//! test defaults (simulate runner, the shared dispatcher stand-in, two
//! slots) with the overrides of a test, owned, in one place.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use super::sshd::{KeyKind, Sshd};
use super::{
    EventsProc, TEST_PASSWORD, Vhost, WorkerProc, celery_client, eventually, is_final_event,
    last_json_line, register_at_shared_dispatcher, shared_dispatcher,
};

/// How long [`Stack::expect_event`] waits unless [`Stack::within`] says.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

/// The worker's environment: the defaults of a test worker with the
/// overrides a test sets. Names are the worker's variables; values are
/// owned, so a test builds them from whatever it has.
#[derive(Clone, Debug, Default)]
pub struct WorkerEnv {
    overrides: BTreeMap<&'static str, String>,
}

impl WorkerEnv {
    /// The defaults only (see [`WorkerEnv::vars`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `name` to `value`, replacing the default or an earlier value.
    pub fn set(mut self, name: &'static str, value: impl Display) -> Self {
        self.overrides.insert(name, value.to_string());
        self
    }

    /// Each pair of `vars` set in turn.
    pub fn set_all(self, vars: &[(&'static str, &str)]) -> Self {
        vars.iter().fold(self, |env, (k, v)| env.set(k, v))
    }

    /// The Docker runner with the local stand-in images, and `sshd` as the
    /// warehouse on its own port.
    pub fn docker(sshd: &Sshd) -> Self {
        Self::new()
            .set("TASK_RUNNER", "docker")
            .set("PULL_POLICY", "never")
            .set("REDIS_IMAGE", "zimfarm/redis:test")
            .set("MIN_FREE_DISK_MB", 10)
            .warehouse(sshd, sshd.port())
    }

    /// `sshd` as the warehouse, reached through `port` (sshd's own or a
    /// proxy's), logging in as sshd's user with its Ed25519 key, which is
    /// registered at the shared dispatcher stand-in.
    pub fn warehouse(self, sshd: &Sshd, port: u16) -> Self {
        let key = sshd.user_key(KeyKind::Ed25519);
        register_at_shared_dispatcher(sshd.user(), &key);
        self.set("USERNAME", sshd.user())
            .set("WAREHOUSE_HOST", "127.0.0.1")
            .set("WAREHOUSE_PORT", port)
            .set("SSH_KEY", key.display())
            .set(
                "WAREHOUSE_KNOWN_HOSTS",
                sshd.known_hosts_file_for_port(port).display(),
            )
            .set("UPLOAD_RETRIES", 2)
    }

    /// These overrides, then `other`'s over them.
    pub fn merge(mut self, other: WorkerEnv) -> Self {
        self.overrides.extend(other.overrides);
        self
    }

    /// The overrides alone (for a command that sets the rest itself).
    pub fn overrides(&self) -> impl Iterator<Item = (&str, &str)> {
        self.overrides.iter().map(|(k, v)| (*k, v.as_str()))
    }

    /// The value of `name` set so far, if a test set it.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.overrides.get(name).map(String::as_str)
    }

    /// The whole environment of a worker named `node` on `vhost`, working
    /// in `dir`: the test defaults, then the overrides.
    pub fn vars(&self, vhost: &Vhost, dir: &Path, node: &str) -> Vec<(String, String)> {
        let dir = dir.display().to_string();
        let mut vars: BTreeMap<&str, String> = [
            ("USERNAME", "tester".to_owned()),
            ("PASSWORD", TEST_PASSWORD.to_owned()),
            ("NODE_NAME", node.to_owned()),
            ("QUEUES", "small".to_owned()),
            ("CONCURRENCY", "2".to_owned()),
            ("TASK_RUNNER", "simulate".to_owned()),
            ("SHUTDOWN_GRACE", "5".to_owned()),
            ("LOG_LEVEL", "info,zimfarm_worker=debug".to_owned()),
            ("BROKER_URL", vhost.url()),
            ("DISPATCHER_URL", shared_dispatcher().url()),
            ("WORKING_DIR", dir.clone()),
            ("ZIM_DIR", dir),
        ]
        .into_iter()
        .collect();
        vars.extend(self.overrides.iter().map(|(k, v)| (*k, v.clone())));
        vars.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }
}

/// A task as the dispatcher sends it with Celery: a name, an id, kwargs,
/// and the `celery_client.py send` options beyond those.
#[derive(Clone, Debug)]
pub struct Task {
    name: String,
    id: String,
    kwargs: Value,
    queue: String,
    options: Vec<String>,
}

impl Task {
    /// `name` with `kwargs`, under a fresh id.
    pub fn new(name: &str, kwargs: Value) -> Self {
        Self {
            name: name.to_owned(),
            id: super::task_id(),
            kwargs,
            queue: "small".to_owned(),
            options: Vec::new(),
        }
    }

    /// `offliner.mwoffliner` of the stand-in image, with `flags`.
    pub fn mw(flags: Value) -> Self {
        Self::new("offliner.mwoffliner", mw_kwargs(flags))
    }

    /// An `offliner.mwoffliner` task the simulate runner runs for
    /// `seconds`.
    pub fn simulated(seconds: f64) -> Self {
        Self::new("offliner.mwoffliner", simulated_task(seconds))
    }

    /// The same task under `id`.
    pub fn with_id(mut self, id: &str) -> Self {
        self.id = id.to_owned();
        self
    }

    /// The same task routed to `queue` (the default: `small`).
    pub fn routed_to(mut self, queue: &str) -> Self {
        self.queue = queue.to_owned();
        self
    }

    /// More `celery_client.py send` options (`--time-limit 3`, ...).
    pub fn options(mut self, options: &[&str]) -> Self {
        self.options.extend(options.iter().map(|o| (*o).to_owned()));
        self
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Sends it to `vhost`'s `offliner` exchange, routed to its queue;
    /// returns its id.
    pub fn send(&self, vhost: &Vhost) -> String {
        self.send_for_reply(vhost);
        self.id.clone()
    }

    /// Sends it; the client's last JSON line.
    pub fn send_for_reply(&self, vhost: &Vhost) -> Value {
        let kwargs = self.kwargs.to_string();
        let mut args = vec![
            "send",
            "--name",
            &self.name,
            "--task-id",
            &self.id,
            "--kwargs",
            &kwargs,
            "--exchange",
            "offliner",
            "--routing-key",
            &self.queue,
        ];
        args.extend(self.options.iter().map(String::as_str));
        last_json_line(&celery_client(vhost, &args).stdout)
    }
}

/// Sends a task with Celery exactly as the 2019 dispatcher did; the
/// client's last JSON line.
pub fn send_task(vhost: &Vhost, name: &str, id: &str, kwargs: &Value, extra: &[&str]) -> Value {
    Task::new(name, kwargs.clone())
        .with_id(id)
        .options(extra)
        .send_for_reply(vhost)
}

pub fn mw_kwargs(flags: Value) -> Value {
    json!({
        "flags": flags,
        "image": {"name": "openzim/mwoffliner", "tag": "test"},
        "warehouse_path": "/wikipedia",
    })
}

/// The kwargs of an mwoffliner task the simulate runner runs for `seconds`.
pub fn simulated_task(seconds: f64) -> Value {
    json!({
        "flags": {"mwUrl": "https://en.wikipedia.org", "adminEmail": "a@b.c"},
        "image": {"name": "openzim/mwoffliner", "tag": "1.9"},
        "warehouse_path": "/wikipedia",
        "simulate": {"sleep": seconds},
    })
}

/// The services of a test without a worker: a RabbitMQ vhost and a temp
/// dir of its own, for a test that starts its workers itself (one that
/// must stop at start, several nodes). [`Stack`] is these, an event
/// receiver and a worker.
pub struct Services {
    pub vh: Vhost,
    pub dir: tempfile::TempDir,
}

impl Services {
    pub fn new(label: &str) -> Self {
        Self {
            vh: Vhost::new(label),
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// A Celery event receiver on the vhost, for `seconds`.
    pub fn events(&self, seconds: u64) -> EventsProc {
        EventsProc::start(&self.vh, seconds)
    }

    /// A worker process named `node` with `env`, not waited for.
    pub fn spawn(&self, node: &str, env: &WorkerEnv) -> WorkerProc {
        WorkerProc::start(&self.vh, self.dir.path(), node, env)
    }

    /// A worker, connected.
    pub fn start(&self, node: &str, env: &WorkerEnv) -> WorkerProc {
        let worker = self.spawn(node, env);
        worker.wait_connected();
        worker
    }
}

/// The usual services of a test and a worker on them: its own vhost and
/// temp dir, a Celery event receiver listening, and a connected worker.
/// Dropped in that order: the worker first, the vhost last.
pub struct Stack {
    pub worker: WorkerProc,
    pub events: EventsProc,
    pub dir: tempfile::TempDir,
    pub vh: Vhost,
    pub env: WorkerEnv,
    node: String,
    wait: Duration,
}

impl Stack {
    /// Services of their own and a connected worker named `node` with
    /// `env`.
    pub fn start(node: &str, env: WorkerEnv) -> Self {
        let stack = Self::spawn(node, env);
        stack.worker.wait_connected();
        stack
    }

    /// The same, without waiting for the worker to connect (a test of how
    /// it starts, or of a worker that must not).
    pub fn spawn(node: &str, env: WorkerEnv) -> Self {
        let Services { vh, dir } = Services::new(node);
        let events = EventsProc::start(&vh, 180);
        let worker = WorkerProc::start(&vh, dir.path(), node, &env);
        Self {
            worker,
            events,
            dir,
            vh,
            env,
            node: node.to_owned(),
            wait: DEFAULT_WAIT,
        }
    }

    /// How long the `expect_*` waits are (the default: [`DEFAULT_WAIT`]).
    pub fn within(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The worker's working dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Another worker process on these services and this dir, named
    /// `node`, with `env`; not waited for.
    pub fn spawn_worker(&self, node: &str, env: &WorkerEnv) -> WorkerProc {
        WorkerProc::start(&self.vh, self.dir.path(), node, env)
    }

    /// Sends `task`; its id.
    pub fn submit(&self, task: Task) -> String {
        task.send(&self.vh)
    }

    /// Waits for the event `kind` (`task-started`, ...) about task `id`.
    pub fn expect_event(&self, kind: &str, id: &str) -> Value {
        self.events.wait_task_event(kind, id, self.wait)
    }

    /// Waits for the event that ends task `id` (succeeded, failed or
    /// revoked) and returns it.
    pub fn expect_final(&self, id: &str) -> Value {
        self.events.wait_for(
            |v| v["uuid"] == id && v["type"].as_str().is_some_and(is_final_event),
            self.wait,
            &format!("final event for {id}"),
        )
    }

    /// How many events `kind` about task `id` came so far.
    pub fn count(&self, kind: &str, id: &str) -> usize {
        self.events.count(kind, id)
    }

    /// `celery control revoke` of task `id`, with `options`
    /// (`--terminate`, `--signal SIGKILL`).
    pub fn revoke(&self, id: &str, options: &[&str]) -> std::process::Output {
        let mut args = vec!["revoke", "--task-id", id];
        args.extend_from_slice(options);
        celery_client(&self.vh, &args)
    }

    /// Waits until the queue `small` holds `ready` ready and `unacked`
    /// unacked messages.
    pub fn expect_queue(&self, ready: u64, unacked: u64) {
        self.vh.wait_queue_depth("small", ready, unacked, self.wait);
    }

    /// Waits until `path` is gone (a task dir goes after its final event).
    pub fn expect_gone(&self, path: &Path) {
        eventually(
            self.wait,
            Duration::from_millis(50),
            || !path.exists(),
            || format!("{} is still there", path.display()),
        );
    }
}
