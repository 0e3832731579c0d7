//! Fixtures for the integration tests: a RabbitMQ vhost of their own, the
//! worker binary as a child process, and the Python Celery client
//! (`tests/py/celery_client.py`) as the dispatcher and the event monitor.
//! A test builds them one way, as a [`Stack`] (or [`Services`] when it
//! starts its workers itself), with the worker's environment as a
//! [`WorkerEnv`] (`stack.rs`). It waits for something to happen on the
//! events or with [`eventually`] (`support.rs`, which `sshd.rs` includes);
//! a fixed sleep is left only where time passing is the scenario.
//!
//! Every test gets its own vhost and temp dir, so tests run in parallel
//! without seeing each other. The services themselves are started by
//! `scripts/test-env.sh`; the addresses come from the environment that
//! `scripts/test.sh` exports, with the same values as defaults. The test
//! targets that use this module are built only with the `services` feature
//! (`tests/without_services.rs` says which).
#![allow(dead_code)]

pub mod broker_wide;
pub mod dispatcher;
pub mod flower;
pub mod sshd;
mod stack;

pub use sshd::support::{eventually, run_ok, wait_log_file};
#[allow(unused_imports)]
pub use stack::{
    DEFAULT_WAIT, Services, Stack, Task, WorkerEnv, mw_kwargs, send_task, simulated_task,
};

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn python() -> String {
    std::env::var("ZIMFARM_TEST_PYTHON")
        .unwrap_or_else(|_| repo_root().join(".venv/bin/python").display().to_string())
}

fn amqp_base() -> String {
    std::env::var("ZIMFARM_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://zimfarm-test:zimfarm-test@127.0.0.1:5672".to_owned())
}

pub fn rabbit_api() -> String {
    std::env::var("ZIMFARM_TEST_RABBIT_API")
        .unwrap_or_else(|_| "http://zimfarm-test:zimfarm-test@127.0.0.1:15672/api".to_owned())
}

/// A 24-hex-character task id, as the dispatcher makes them.
pub fn task_id() -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    u[..24].to_owned()
}

/// Calls the RabbitMQ management API with curl; returns the parsed JSON body
/// (or Null for an empty one).
pub fn rabbit_api_call(method: &str, path: &str, body: Option<&str>) -> Value {
    let url = format!("{}{}", rabbit_api(), path);
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--fail-with-body",
        "-X",
        method,
        "-H",
        "content-type: application/json",
    ]);
    if let Some(b) = body {
        cmd.args(["-d", b]);
    }
    cmd.arg(&url);
    let out = run_ok(&mut cmd, &format!("RabbitMQ API {method} {path}"));
    if out.stdout.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }
}

/// Runs `rabbitmqctl` with `args`, failing the test if it fails; its
/// stdout, trimmed.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = run_ok(
        Command::new("rabbitmqctl").args(args),
        &format!("rabbitmqctl {args:?}"),
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

static VHOST_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A RabbitMQ vhost of this test's own, deleted when dropped.
pub struct Vhost {
    pub name: String,
}

impl Vhost {
    pub fn new(label: &str) -> Self {
        let name = format!(
            "zwt-{label}-{}-{}",
            std::process::id(),
            VHOST_SEQ.fetch_add(1, Ordering::SeqCst)
        );
        rabbit_api_call("PUT", &format!("/vhosts/{name}"), Some("{}"));
        rabbit_api_call(
            "PUT",
            &format!("/permissions/{name}/zimfarm-test"),
            Some(r#"{"configure":".*","write":".*","read":".*"}"#),
        );
        Self { name }
    }

    pub fn url(&self) -> String {
        format!("{}/{}", amqp_base(), self.name)
    }

    /// Messages in a queue: (ready, unacked).
    pub fn queue_depth(&self, queue: &str) -> (u64, u64) {
        // The management API's counters lag by up to a few seconds; ask for
        // fresh figures by listing with `disable_stats` off and retrying.
        let v = rabbit_api_call("GET", &format!("/queues/{}/{queue}", self.name), None);
        (
            v["messages_ready"].as_u64().unwrap_or(0),
            v["messages_unacknowledged"].as_u64().unwrap_or(0),
        )
    }

    /// Waits until the queue holds `ready` ready and `unacked` unacked
    /// messages (the management API's figures refresh every few seconds).
    pub fn wait_queue_depth(&self, queue: &str, ready: u64, unacked: u64, timeout: Duration) {
        let depth = std::cell::Cell::new((0, 0));
        eventually(
            timeout,
            Duration::from_millis(250),
            || {
                depth.set(self.queue_depth(queue));
                depth.get() == (ready, unacked)
            },
            || {
                format!(
                    "queue {queue}: expected (ready, unacked) = ({ready}, {unacked}), got {:?}",
                    depth.get()
                )
            },
        );
    }

    /// Closes every client connection to this vhost (the fault test).
    pub fn close_all_connections(&self) {
        rabbitmqctl(&[
            "close_all_connections",
            "-p",
            &self.name,
            "test: connection cut",
        ]);
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("curl")
            .args(["-sS", "-X", "DELETE"])
            .arg(format!("{}/vhosts/{}", rabbit_api(), self.name))
            .output();
    }
}

/// The worker binary running as a child process, its log in a file.
pub struct WorkerProc {
    pub child: Child,
    pub log: PathBuf,
    pub node: String,
    pub dir: PathBuf,
}

pub fn worker_binary() -> &'static str {
    env!("CARGO_BIN_EXE_zimfarm-worker")
}

/// The password every test worker logs in with (the test broker takes any).
pub const TEST_PASSWORD: &str = "not-used-by-the-test-broker";

/// One dispatcher stand-in for the whole test process, serving from its
/// first use, which knows the test users `tester` and `zimfarm-sftp` (the
/// warehouse's SFTP user) with [`TEST_PASSWORD`]. Tests that need a
/// dispatcher of their own (down, other users) start their own.
pub fn shared_dispatcher() -> &'static dispatcher::DispatcherStandin {
    static SHARED: std::sync::OnceLock<dispatcher::DispatcherStandin> = std::sync::OnceLock::new();
    SHARED.get_or_init(|| {
        let standin = dispatcher::DispatcherStandin::spawn();
        for user in ["tester", sshd::SFTP_USER] {
            standin.add_user(user, TEST_PASSWORD);
        }
        standin
    })
}

/// Registers the public key next to `private_key` (`<path>.pub`) for
/// `user` at the shared dispatcher; a key registered already is fine.
pub fn register_at_shared_dispatcher(user: &str, private_key: &Path) {
    let public = std::fs::read_to_string(private_key.with_extension("pub"))
        .or_else(|_| std::fs::read_to_string(format!("{}.pub", private_key.display())))
        .expect("the key's .pub file");
    let _ = shared_dispatcher().register_key(user, "test key", public.trim());
}

/// The environment of a test worker with `extra` overriding it (the
/// benches' form of [`WorkerEnv::vars`]).
pub fn worker_env(
    vhost: &Vhost,
    dir: &Path,
    node: &str,
    extra: &[(&'static str, &str)],
) -> Vec<(String, String)> {
    WorkerEnv::new().set_all(extra).vars(vhost, dir, node)
}

impl WorkerProc {
    pub fn start(vhost: &Vhost, dir: &Path, node: &str, env: &WorkerEnv) -> Self {
        Self::start_binary(Path::new(worker_binary()), vhost, dir, node, env)
    }

    /// [`WorkerProc::start`] with another build of the worker (a farm of
    /// mixed versions).
    pub fn start_binary(
        binary: &Path,
        vhost: &Vhost,
        dir: &Path,
        node: &str,
        env: &WorkerEnv,
    ) -> Self {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let log = dir.join(format!(
            "worker-{node}-{}.log",
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(binary)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.vars(vhost, dir, node))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("worker starts");
        Self {
            child,
            log,
            node: node.to_owned(),
            dir: dir.to_owned(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        wait_log_file(&self.log, "worker", needle, timeout);
    }

    /// Fails the test if the log contains `needle` (showing the log).
    pub fn assert_log_lacks(&self, needle: &str) {
        let log = self.log_text();
        assert!(!log.contains(needle), "{needle:?} in the log:\n{log}");
    }

    /// Waits for the worker to stop at start, as it must on a setting it
    /// cannot work with: exit code 2. Its log.
    pub fn expect_exit_2(&mut self, timeout: Duration) -> String {
        let status = self.wait_exit(timeout);
        let log = self.log_text();
        assert_eq!(status.code(), Some(2), "{log}");
        log
    }

    pub fn wait_connected(&self) {
        self.wait_log("consuming", Duration::from_secs(20));
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Whether the process is still running (it has not exited).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut status = None;
        let log = self.log.clone();
        eventually(
            timeout,
            Duration::from_millis(50),
            || {
                status = self.child.try_wait().expect("try_wait");
                status.is_some()
            },
            || {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                format!("worker did not exit; log:\n{log}")
            },
        );
        status.expect("exited")
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- worker {} log ----\n{}", self.node, self.log_text());
        }
    }
}

/// Runs `celery_client.py` with the given arguments and returns its output.
pub fn celery_client(vhost: &Vhost, args: &[&str]) -> Output {
    let script = repo_root().join("tests/py/celery_client.py");
    let mut cmd = Command::new(python());
    cmd.arg(script)
        .arg(args[0])
        .args(["--broker", &vhost.url()]);
    cmd.args(&args[1..]);
    run_ok(&mut cmd, &format!("celery_client.py {args:?}"))
}

/// `app.control.broadcast(method, arguments, reply=True)` to one node, as
/// `celery control` makes it: that node's reply.
pub fn broadcast(vh: &Vhost, node: &str, method: &str, arguments: Value) -> Value {
    let arguments = arguments.to_string();
    let out = celery_client(
        vh,
        &[
            "control",
            "--method",
            method,
            "--arguments",
            &arguments,
            "--destination",
            node,
        ],
    );
    let replies = last_json_line(&out.stdout);
    replies["replies"]
        .as_array()
        .and_then(|r| r.iter().find_map(|reply| reply.get(node).cloned()))
        .unwrap_or_else(|| panic!("no reply from {node} to {method}: {replies}"))
}

pub fn last_json_line(stdout: &[u8]) -> Value {
    String::from_utf8_lossy(stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null)
}

/// A Celery `EventReceiver` (Python) listening on the vhost; every event it
/// gets is kept here, in arrival order.
pub struct EventsProc {
    child: Child,
    lines: Arc<(Mutex<Vec<Value>>, Condvar)>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl EventsProc {
    pub fn start(vhost: &Vhost, seconds: u64) -> Self {
        let script = repo_root().join("tests/py/celery_client.py");
        let mut child = Command::new(python())
            .arg(script)
            .args([
                "events",
                "--broker",
                &vhost.url(),
                "--seconds",
                &seconds.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python runs");
        let stdout = child.stdout.take().expect("stdout");
        let lines: Arc<(Mutex<Vec<Value>>, Condvar)> = Arc::default();
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let (lock, cv) = &*sink;
                    lock.lock().unwrap().push(v);
                    cv.notify_all();
                }
            }
        });
        let this = Self {
            child,
            lines,
            reader: Some(reader),
        };
        this.wait_for(
            |v| v["ready"] == true,
            Duration::from_secs(30),
            "receiver ready",
        );
        this
    }

    /// Waits for a line matching `pred` and returns it.
    pub fn wait_for(&self, pred: impl Fn(&Value) -> bool, timeout: Duration, what: &str) -> Value {
        let (lock, cv) = &*self.lines;
        let start = Instant::now();
        let mut lines = lock.lock().unwrap();
        loop {
            if let Some(v) = lines.iter().find(|v| pred(v)) {
                return v.clone();
            }
            let left = timeout.checked_sub(start.elapsed()).unwrap_or_else(|| {
                panic!(
                    "no {what} within {timeout:?}; events so far:\n{}",
                    lines
                        .iter()
                        .map(|v| v.to_string())
                        .collect::<Vec<_>>()
                        .join("\n")
                )
            });
            lines = cv.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Waits for the event of `event_type` about task `uuid`.
    pub fn wait_task_event(&self, event_type: &str, uuid: &str, timeout: Duration) -> Value {
        self.wait_for(
            |v| v["type"] == event_type && v["uuid"] == uuid,
            timeout,
            &format!("{event_type} for {uuid}"),
        )
    }

    /// Every event line so far.
    pub fn events(&self) -> Vec<Value> {
        self.lines.0.lock().unwrap().clone()
    }

    pub fn count(&self, event_type: &str, uuid: &str) -> usize {
        self.events()
            .iter()
            .filter(|v| v["type"] == event_type && v["uuid"] == uuid)
            .count()
    }

    /// Stops the receiver (SIGTERM: it prints its summary and exits) and
    /// returns its summary line.
    pub fn finish(mut self) -> Value {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.events()
            .into_iter()
            .rev()
            .find(|v| v.get("summary").is_some())
            .unwrap_or(Value::Null)
    }
}

/// A task event that ends the task.
pub fn is_final_event(kind: &str) -> bool {
    matches!(kind, "task-succeeded" | "task-failed" | "task-revoked")
}

/// The task events, one line each: seconds from the first event, type,
/// node, task id (for failure messages).
pub fn dump_task_events(events: &[Value]) -> String {
    let first = events
        .iter()
        .find_map(|e| e["timestamp"].as_f64())
        .unwrap_or_default();
    events
        .iter()
        .filter(|e| e["type"].as_str().is_some_and(|t| t.starts_with("task-")))
        .map(|e| {
            format!(
                "{:8.3} {:<16} {:<14} {}",
                e["timestamp"].as_f64().unwrap_or_default() - first,
                e["type"].as_str().unwrap_or_default(),
                e["hostname"].as_str().unwrap_or_default(),
                e["uuid"].as_str().unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl EventsProc {
    /// Waits until `done` holds of the events received so far.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&[Value]) -> bool,
    ) {
        eventually(
            timeout,
            Duration::from_millis(100),
            || done(&self.events()),
            || format!("{what}; events:\n{}", dump_task_events(&self.events())),
        );
    }

    /// Waits until every task of `ids` has a final event.
    pub fn wait_all_ended(&self, ids: &[String], timeout: Duration) {
        self.wait_until("every task ended", timeout, |all| {
            ids.iter().all(|id| {
                all.iter().any(|e| {
                    e["uuid"] == id.as_str() && e["type"].as_str().is_some_and(is_final_event)
                })
            })
        });
    }
}

impl Drop for EventsProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy in front of RabbitMQ that a test can cut (every connection
/// closed, new ones refused) and restore: a broker outage for one worker,
/// without disturbing other tests or the event monitor.
pub struct FaultProxy {
    pub port: u16,
    state: Arc<Mutex<ProxyState>>,
}

#[derive(Default)]
struct ProxyState {
    open: bool,
    streams: Vec<std::net::TcpStream>,
}

impl FaultProxy {
    pub fn start(upstream: &str) -> Self {
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(ProxyState {
            open: true,
            streams: Vec::new(),
        }));
        let shared = state.clone();
        let upstream = upstream.to_owned();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let mut st = shared.lock().unwrap();
                if !st.open {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                st.streams.push(client.try_clone().unwrap());
                st.streams.push(server.try_clone().unwrap());
                drop(st);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Self { port, state }
    }

    /// Closes every proxied connection and refuses new ones.
    pub fn cut(&self) {
        let mut st = self.state.lock().unwrap();
        st.open = false;
        for s in st.streams.drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.state.lock().unwrap().open = true;
    }

    /// The vhost's AMQP URL, through this proxy.
    pub fn url(&self, vhost: &Vhost) -> String {
        format!(
            "amqp://zimfarm-test:zimfarm-test@127.0.0.1:{}/{}",
            self.port, vhost.name
        )
    }
}

/// A TCP proxy for the upload tests: forwards 127.0.0.1:<port> to an
/// upstream address (an [`sshd::Sshd`]), with a rate limit on the
/// client→server direction (shared by all its connections), counters of the
/// bytes forwarded, and faults: [`ThrottleProxy::cut`] drops every current
/// connection at once (new ones are accepted), [`ThrottleProxy::block`]
/// also refuses new ones until [`ThrottleProxy::restore`].
pub struct ThrottleProxy {
    port: u16,
    shared: Arc<ThrottleShared>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

struct ThrottleShared {
    upstream: String,
    /// Client→server bytes per second; 0: unlimited.
    rate: std::sync::atomic::AtomicU64,
    /// When the rate limiter's next byte may go.
    next_free: Mutex<Instant>,
    up_bytes: std::sync::atomic::AtomicU64,
    down_bytes: std::sync::atomic::AtomicU64,
    accepted: AtomicUsize,
    /// Connections refused because `max_active` were open.
    refused: AtomicUsize,
    /// While set, nothing more goes client→server (a link that stalls).
    held: std::sync::atomic::AtomicBool,
    state: Mutex<ThrottleState>,
    shutdown: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct ThrottleState {
    blocked: bool,
    /// At most this many connections at once (0: any); the others are
    /// accepted and closed at once, as a busy sshd does.
    max_active: usize,
    next_id: u64,
    /// id -> (client, upstream, directions still running)
    conns: std::collections::HashMap<u64, (std::net::TcpStream, std::net::TcpStream, u8)>,
}

impl ThrottleShared {
    fn close(conns: impl IntoIterator<Item = (std::net::TcpStream, std::net::TcpStream, u8)>) {
        for (c, s, _) in conns {
            let _ = c.shutdown(std::net::Shutdown::Both);
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Waits until `n` more client→server bytes may go at the current rate.
    fn throttle(&self, n: usize) {
        let rate = self.rate.load(Ordering::SeqCst);
        if rate == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(n as f64 / rate as f64);
        let until = {
            let mut next = self.next_free.lock().unwrap();
            // Up to 50 ms of credit for time lost (scheduling, a slow
            // client), so that the average holds; a longer pause does not
            // allow a longer burst.
            let now = Instant::now();
            let floor = now.checked_sub(Duration::from_millis(50)).unwrap_or(now);
            let start = (*next).max(floor);
            *next = start + cost;
            *next
        };
        if let Some(wait) = until.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }

    /// Copies one direction of connection `id` until EOF or error.
    fn pump(&self, id: u64, mut from: std::net::TcpStream, mut to: std::net::TcpStream, up: bool) {
        use std::io::{Read, Write};
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // About 50 slices a second at the rate limit: smooth enough to
            // cut a transfer at a chosen point.
            let rate = self.rate.load(Ordering::SeqCst) as usize;
            let chunk = if up && rate > 0 {
                (rate / 50).clamp(1024, buf.len())
            } else {
                buf.len()
            };
            let n = match from.read(&mut buf[..chunk]) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if up {
                self.throttle(n);
                while self.held.load(Ordering::SeqCst) && !self.shutdown.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            let counter = if up { &self.up_bytes } else { &self.down_bytes };
            counter.fetch_add(n as u64, Ordering::SeqCst);
        }
        // Pass the EOF on; the connection is forgotten when both directions
        // are done.
        let _ = to.shutdown(std::net::Shutdown::Write);
        let _ = from.shutdown(std::net::Shutdown::Read);
        let mut st = self.state.lock().unwrap();
        let done = match st.conns.get_mut(&id) {
            Some(entry) => {
                entry.2 -= 1;
                entry.2 == 0
            }
            None => false,
        };
        if done {
            let conn = st.conns.remove(&id);
            drop(st);
            Self::close(conn);
        }
    }
}

impl ThrottleProxy {
    /// A proxy to `upstream` (`host:port`), without a rate limit.
    pub fn start(upstream: &str) -> Self {
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(ThrottleShared {
            upstream: upstream.to_owned(),
            rate: 0.into(),
            next_free: Mutex::new(Instant::now()),
            up_bytes: 0.into(),
            down_bytes: 0.into(),
            accepted: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            held: false.into(),
            state: Mutex::default(),
            shutdown: false.into(),
        });
        let sh = shared.clone();
        let acceptor = std::thread::spawn(move || {
            for client in listener.incoming() {
                if sh.shutdown.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                if sh.state.lock().unwrap().blocked {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&sh.upstream) else {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
                    client.try_clone(),
                    server.try_clone(),
                    client.try_clone(),
                    server.try_clone(),
                ) else {
                    continue;
                };
                let id = {
                    let mut st = sh.state.lock().unwrap();
                    if st.blocked || (st.max_active > 0 && st.conns.len() >= st.max_active) {
                        if !st.blocked {
                            sh.refused.fetch_add(1, Ordering::SeqCst);
                        }
                        drop(st);
                        ThrottleShared::close([(client, server, 0)]);
                        continue;
                    }
                    let id = st.next_id;
                    st.next_id += 1;
                    st.conns.insert(id, (c3, s3, 2));
                    id
                };
                sh.accepted.fetch_add(1, Ordering::SeqCst);
                let up = sh.clone();
                std::thread::spawn(move || up.pump(id, client, server, true));
                let down = sh.clone();
                std::thread::spawn(move || down.pump(id, s2, c2, false));
            }
        });
        Self {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// A proxy to `upstream` whose client→server traffic is limited to
    /// `bytes_per_sec`.
    pub fn with_rate(upstream: &str, bytes_per_sec: u64) -> Self {
        let p = Self::start(upstream);
        p.set_rate(bytes_per_sec);
        p
    }

    /// Sets the client→server limit in bytes/s (0: unlimited); applies to
    /// the transfers under way too.
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.shared.rate.store(bytes_per_sec, Ordering::SeqCst);
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Client→server bytes forwarded (written to the upstream) since the
    /// start or the last reset.
    pub fn bytes_up(&self) -> u64 {
        self.shared.up_bytes.load(Ordering::SeqCst)
    }

    /// Server→client bytes forwarded since the start or the last reset.
    pub fn bytes_down(&self) -> u64 {
        self.shared.down_bytes.load(Ordering::SeqCst)
    }

    /// Sets both byte counters to zero; returns the client→server count.
    pub fn reset_bytes(&self) -> u64 {
        self.shared.down_bytes.store(0, Ordering::SeqCst);
        self.shared.up_bytes.swap(0, Ordering::SeqCst)
    }

    /// Waits until at least `n` client→server bytes have been forwarded.
    pub fn wait_bytes_up(&self, n: u64, timeout: Duration) {
        eventually(
            timeout,
            Duration::from_millis(10),
            || self.bytes_up() >= n,
            || format!("proxy forwarded only {} of {n} bytes", self.bytes_up()),
        );
    }

    /// Connections accepted (and forwarded) so far.
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections open right now.
    pub fn active_connections(&self) -> usize {
        self.shared.state.lock().unwrap().conns.len()
    }

    /// Closes every current connection at once (both sides see it end);
    /// new connections are still accepted.
    pub fn cut(&self) {
        let conns: Vec<_> = self
            .shared
            .state
            .lock()
            .unwrap()
            .conns
            .drain()
            .map(|(_, c)| c)
            .collect();
        ThrottleShared::close(conns);
    }

    /// Closes every current connection and refuses new ones (accepted, then
    /// closed at once) until [`ThrottleProxy::restore`].
    pub fn block(&self) {
        self.shared.state.lock().unwrap().blocked = true;
        self.cut();
    }

    /// Accepts new connections again after [`ThrottleProxy::block`].
    pub fn restore(&self) {
        self.shared.state.lock().unwrap().blocked = false;
    }

    /// Takes at most `n` connections at once (0: any number): the others
    /// are closed as soon as they are accepted.
    pub fn set_max_active(&self, n: usize) {
        self.shared.state.lock().unwrap().max_active = n;
    }

    /// Connections closed at once because `max_active` were open.
    pub fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Stops forwarding client→server bytes (the connections stay open,
    /// as on a link that stalls) until [`ThrottleProxy::release`].
    pub fn hold(&self) {
        self.shared.held.store(true, Ordering::SeqCst);
    }

    pub fn release(&self) {
        self.shared.held.store(false, Ordering::SeqCst);
    }

    /// Closes the `pick % n`-th of the `n` current connections (by age);
    /// returns whether there was one.
    pub fn cut_one(&self, pick: usize) -> bool {
        let conn = {
            let mut st = self.shared.state.lock().unwrap();
            let mut ids: Vec<u64> = st.conns.keys().copied().collect();
            if ids.is_empty() {
                return false;
            }
            ids.sort_unstable();
            let id = ids[pick % ids.len()];
            st.conns.remove(&id)
        };
        ThrottleShared::close(conn);
        true
    }
}

impl Drop for ThrottleProxy {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        // Wake the acceptor up so that it sees the flag.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        self.cut();
    }
}

/// An address on 127.0.0.1 free now (for `METRICS_ADDR`).
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// `/metrics` through `tests/py/metrics.py` (both parsers must accept it).
pub fn scrape(addr: &str) -> Value {
    let out = run_ok(
        Command::new(python())
            .arg(repo_root().join("tests/py/metrics.py"))
            .arg(format!("http://{addr}/metrics")),
        "metrics.py",
    );
    last_json_line(&out.stdout)
}

/// The value of the sample `name` whose labels include `labels`.
pub fn sample(scraped: &Value, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scraped["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            s["name"] == name
                && labels
                    .iter()
                    .all(|(k, v)| s["labels"][*k].as_str() == Some(*v))
        })
        .map(|s| s["value"].as_f64().unwrap())
}

/// Runs the worker binary with `args` and only `env` (and PATH).
pub fn run_worker(args: &[&str], env: &[(String, String)]) -> Output {
    Command::new(worker_binary())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap()
}

/// Fails the test unless `text` contains `needle` (showing `text`).
pub fn assert_contains(text: &str, needle: &str) {
    assert!(text.contains(needle), "{needle:?} not in:\n{text}");
}

/// A command's stdout then stderr, as text.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ------------------------------------------------ the Docker pipeline's tests

/// Fails the test if a container labelled for `node` is left.
pub fn assert_no_containers(node: &str) {
    let left = containers_of(node);
    assert!(left.is_empty(), "containers left: {left:?}");
}

/// Publishes `body` as it is to `exchange` with `routing_key`, through
/// the Python client's `publish-raw` (the body goes through a file in
/// `dir`); `extra` are more of its options, such as `--headers`.
pub fn publish_raw_to(
    vh: &Vhost,
    dir: &Path,
    exchange: &str,
    routing_key: &str,
    body: impl AsRef<[u8]>,
    extra: &[&str],
) -> Output {
    let file = dir.join(format!("body-{}", task_id()));
    std::fs::write(&file, body).unwrap();
    let file = file.display().to_string();
    let mut args = vec![
        "publish-raw",
        "--exchange",
        exchange,
        "--routing-key",
        routing_key,
        "--body-file",
        &file,
    ];
    args.extend_from_slice(extra);
    celery_client(vh, &args)
}

/// Publishes `body` to `celery.pidbox`, as a control client
/// that does not follow the protocol would; the body goes through a file
/// in `dir`.
pub fn publish_pidbox(vh: &Vhost, dir: &Path, body: impl AsRef<[u8]>) {
    publish_raw_to(vh, dir, "celery.pidbox", "", body, &[]);
}

/// A text field of an event (`exception`, `traceback`, ...); "" if absent.
pub fn text_of<'a>(event: &'a Value, field: &str) -> &'a str {
    event[field].as_str().unwrap_or_default()
}

/// Names of the containers labelled for `node`, running or not.
pub fn containers_of(node: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-a", "--format", "{{.Names}}", "--filter"])
        .arg(format!("label=org.openzim.zimfarm.node={node}"))
        .output()
        .expect("docker runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `zimfarm_worker_redeliveries_held_total` of the node serving metrics at
/// `metrics`, for one verdict (0 before the first).
pub fn redeliveries_held(metrics: &str, verdict: &str) -> f64 {
    sample(
        &scrape(metrics),
        "zimfarm_worker_redeliveries_held_total",
        &[("verdict", verdict)],
    )
    .unwrap_or(0.0)
}

// ------------------------------------------ restarts (tests/restart.rs)

/// Now, as seconds since the epoch (for `docker events --since`).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs_f64()
}

/// Docker's `create` events of the containers labelled for a node,
/// followed live from the moment it is made (the engine replays only its
/// last 256 events, so a later `docker events --since` may miss some on a
/// busy engine). A scrape carried on across a restart is created once, a
/// scrape redone twice.
pub struct ContainerCreates {
    child: Child,
    events: Arc<Mutex<Vec<Value>>>,
}

impl ContainerCreates {
    pub fn watch(node: &str) -> Self {
        let mut child = Command::new("docker")
            .args([
                "events",
                "--since",
                &format!("{:.3}", unix_now()),
                "--filter",
                "type=container",
                "--filter",
                "event=create",
                "--filter",
                &format!("label=org.openzim.zimfarm.node={node}"),
                "--format",
                "{{json .}}",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("docker runs");
        let stdout = child.stdout.take().expect("stdout");
        let events: Arc<Mutex<Vec<Value>>> = Arc::default();
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        Self { child, events }
    }

    /// How many offliner containers of task `id` were created so far.
    pub fn offliners_of(&self, id: &str) -> usize {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| {
                let labels = &e["Actor"]["Attributes"];
                labels["org.openzim.zimfarm.task"] == id
                    && labels["org.openzim.zimfarm.role"] == "offliner"
            })
            .count()
    }
}

impl Drop for ContainerCreates {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The state (`running`, `exited`, ...) of the offliner container of task
/// `id`, or `None` when there is none.
pub fn offliner_state(id: &str) -> Option<String> {
    let out = run_ok(
        Command::new("docker").args([
            "ps",
            "-a",
            "--filter",
            &format!("label=org.openzim.zimfarm.task={id}"),
            "--format",
            "{{.Label \"org.openzim.zimfarm.role\"}} {{.State}}",
        ]),
        "docker ps",
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("offliner ").map(str::to_owned))
}

/// Waits until the offliner container of task `id` is in `state`.
pub fn wait_offliner_state(id: &str, state: &str, timeout: Duration) {
    eventually(
        timeout,
        Duration::from_millis(100),
        || offliner_state(id).as_deref() == Some(state),
        || {
            format!(
                "the offliner of {id} is {:?}, not {state}",
                offliner_state(id)
            )
        },
    );
}

/// The name of the offliner container of task `id`, if there is one.
pub fn offliner_name(id: &str) -> Option<String> {
    let out = run_ok(
        Command::new("docker").args([
            "ps",
            "-a",
            "--filter",
            &format!("label=org.openzim.zimfarm.task={id}"),
            "--format",
            "{{.Label \"org.openzim.zimfarm.role\"}} {{.Names}}",
        ]),
        "docker ps",
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("offliner ").map(str::to_owned))
}

/// The last `tail` lines of what Docker kept of the output of task `id`'s
/// offliner (stdout and stderr), "" when it has none.
pub fn offliner_output(id: &str, tail: usize) -> String {
    let Some(name) = offliner_name(id) else {
        return String::new();
    };
    let out = Command::new("docker")
        .args(["logs", "--tail", &tail.to_string(), &name])
        .output()
        .expect("docker runs");
    output_text(&out)
}

/// Waits until task `id`'s offliner printed the line `line` (the scrape
/// is under way that far), as Docker's copy of its output shows.
pub fn wait_offliner_line(id: &str, line: &str, timeout: Duration) {
    eventually(
        timeout,
        Duration::from_millis(100),
        || offliner_output(id, 200).lines().any(|l| l == line),
        || format!("the offliner of {id} never printed {line:?}"),
    );
}
