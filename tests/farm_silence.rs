//! One run in the farm whatever a node goes through (issue 27): two nodes
//! on a short delivery timeout, so that the running task's message is
//! redelivered to the idle node, which holds it while the task runs on the
//! first (see `zimfarm_worker::farm`); then a fault that makes a node
//! silent or its probe fail without anybody dying. Each test asserts one
//! `task-started` per run that should happen and exactly one final event
//! per task id, from the node that should send it. The last one, with
//! Docker and a warehouse, kills a node mid-scrape and brings it back
//! within RESTART_GRACE while an idle node holds the task's message.
//!
//! The delivery timeout and the memory alarm are settings of the whole
//! broker: the tests of this file take it one at a time
//! (`common::broker_wide`) and keep each change short.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::broker_wide::BrokerWide;
use common::sshd::Sshd;
use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(120);
/// What a holder logs when it holds a redelivery (either rule).
const HOLDING: &str = "holding it without running it";

/// Two nodes, CONCURRENCY=1, each with a metrics endpoint, on one queue of
/// a vhost of their own, and an event receiver.
struct Pair {
    nodes: Vec<WorkerProc>,
    metrics: [String; 2],
    events: EventsProc,
    _dirs: [tempfile::TempDir; 2],
    vh: Vhost,
}

impl Pair {
    fn start(label: &str, env: &WorkerEnv) -> Self {
        let vh = Vhost::new(label);
        let events = EventsProc::start(&vh, 300);
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let metrics = [free_addr(), free_addr()];
        let nodes: Vec<WorkerProc> = ["a", "b"]
            .iter()
            .zip(&dirs)
            .zip(&metrics)
            .map(|((n, dir), addr)| {
                let env = env.clone().set("CONCURRENCY", 1).set("METRICS_ADDR", addr);
                WorkerProc::start(&vh, dir.path(), &format!("{label}-{n}"), &env)
            })
            .collect();
        for n in &nodes {
            n.wait_connected();
        }
        Self {
            nodes,
            metrics,
            events,
            _dirs: dirs,
            vh,
        }
    }

    /// Sends a simulated task of `seconds`; its id, the index of the node
    /// that started it and that of the other, once the other holds its
    /// redelivered message.
    fn run_until_held(&self, seconds: f64) -> (String, usize, usize) {
        let id = task_id();
        send_task(
            &self.vh,
            "offliner.mwoffliner",
            &id,
            &simulated_task(seconds),
            &[],
        );
        let started = self
            .events
            .wait_task_event("task-started", &id, Duration::from_secs(30));
        let host = started["hostname"].as_str().unwrap().to_owned();
        let run = usize::from(!host.ends_with("-a"));
        let hold = 1 - run;
        self.nodes[hold].wait_log(HOLDING, Duration::from_secs(60));
        (id, run, hold)
    }

    fn host(&self, i: usize) -> String {
        let all = self.events.events();
        let suffix = if i == 0 { "-a" } else { "-b" };
        all.iter()
            .filter_map(|e| e["hostname"].as_str())
            .find(|h| h.ends_with(suffix))
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits for the task's end and the queue drained; then asserts
    /// `starts` `task-started` and one final event, a success from node
    /// `by`.
    fn expect_ended_once(&self, id: &str, starts: usize, by: usize) -> Vec<Value> {
        self.events.wait_task_event("task-succeeded", id, T);
        self.vh.wait_queue_depth("small", 0, 0, T);
        // Anything sent late (a second final event) has had time to come.
        std::thread::sleep(Duration::from_secs(3));
        let all = self.events.events();
        let report = dump_task_events(&all);
        let logs = || self.nodes[0].log_text() + "\n-----\n" + &self.nodes[1].log_text();
        assert_eq!(
            self.events.count("task-started", id),
            starts,
            "task-started:\n{report}\n{}",
            logs()
        );
        let finals: Vec<&Value> = all
            .iter()
            .filter(|e| e["uuid"] == id && e["type"].as_str().is_some_and(is_final_event))
            .collect();
        assert_eq!(finals.len(), 1, "one final event:\n{report}\n{}", logs());
        assert_eq!(finals[0]["type"], "task-succeeded", "{report}");
        assert_eq!(
            finals[0]["hostname"].as_str(),
            Some(self.host(by).as_str()),
            "{report}"
        );
        all
    }

    fn ran_here(&self, i: usize) -> f64 {
        redeliveries_held(&self.metrics[i], "ran_here")
    }
}

/// Stops node `i` (SIGSTOP) for `pause`, then lets it go on.
fn freeze(node: &WorkerProc, pause: Duration) {
    node.signal("STOP");
    std::thread::sleep(pause);
    node.signal("CONT");
}

/// The connections (their Erlang pids) of worker node `node` (its
/// connection name ends with it) on `vh`, as the broker has them now
/// (rabbitmqctl reads the connections themselves; the management API's
/// listing lags behind by its statistics interval).
fn connections_of(vh: &Vhost, node: &str) -> Vec<String> {
    let listed = rabbitmqctl(&[
        "list_connections",
        "-q",
        "-p",
        &vh.name,
        "pid",
        "client_properties",
    ]);
    let name = format!("\"zimfarm-worker tester@{node}\"");
    listed
        .lines()
        .filter(|line| line.contains(&name))
        .filter_map(|line| line.split('\t').next())
        .map(str::to_owned)
        .collect()
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn vhost_path(vh: &Vhost) -> String {
    url_encode(&vh.name)
}

#[test]
fn a_running_node_frozen_20_s_keeps_its_task_and_its_holder_waits() {
    // The hold starts before the freeze and outlasts it: the holder hears
    // the running node's silence for the whole 20 s.
    let _broker = BrokerWide::delivery_timeout(25_000, 1_000);
    let p = Pair::start("frozen-run", &WorkerEnv::new());
    let (id, run, hold) = p.run_until_held(55.0);
    let frozen = Instant::now();
    freeze(&p.nodes[run], Duration::from_secs(20));
    p.expect_ended_once(&id, 1, run);
    assert_eq!(p.ran_here(hold), 0.0, "{}", p.nodes[hold].log_text());
    p.nodes[hold].assert_log_lacks("running the redelivered task here");
    eprintln!(
        "frozen 20 s; the task ended on its node {:.0} s after the freeze",
        frozen.elapsed().as_secs_f64()
    );
}

#[test]
fn a_holder_frozen_20_s_does_not_run_the_task_when_it_thaws() {
    let _broker = BrokerWide::delivery_timeout(25_000, 1_000);
    let p = Pair::start("frozen-hold", &WorkerEnv::new());
    let (id, run, hold) = p.run_until_held(55.0);
    freeze(&p.nodes[hold], Duration::from_secs(20));
    p.expect_ended_once(&id, 1, run);
    assert_eq!(p.ran_here(hold), 0.0, "{}", p.nodes[hold].log_text());
}

#[test]
fn a_broker_memory_alarm_of_15_s_hands_nothing_over() {
    // RESTART_GRACE shorter than the alarm: silence counted while the
    // broker blocks publishers would hand the task over.
    let broker = BrokerWide::delivery_timeout(20_000, 1_000);
    let p = Pair::start("alarm", &WorkerEnv::new().set("RESTART_GRACE", 10));
    let (id, run, hold) = p.run_until_held(45.0);
    {
        let _alarm = broker.memory_alarm();
        std::thread::sleep(Duration::from_secs(15));
    }
    p.expect_ended_once(&id, 1, run);
    assert_eq!(p.ran_here(hold), 0.0, "{}", p.nodes[hold].log_text());
}

#[test]
fn a_holder_whose_reply_queue_is_deleted_keeps_holding() {
    let _broker = BrokerWide::delivery_timeout(20_000, 1_000);
    let p = Pair::start("noreply", &WorkerEnv::new());
    let (id, run, hold) = p.run_until_held(40.0);
    let queues = rabbit_api_call("GET", &format!("/queues/{}", vhost_path(&p.vh)), None);
    let replies: Vec<String> = queues
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|q| q["name"].as_str())
        .filter(|n| n.ends_with(".reply.celery.pidbox"))
        .map(str::to_owned)
        .collect();
    assert!(!replies.is_empty(), "the holder's reply queue: {queues}");
    // Exclusive queues: the management API refuses to delete them,
    // rabbitmqctl does (the broker cancels their consumer, as when an
    // operator or a policy removes them).
    for q in &replies {
        rabbitmqctl(&["delete_queue", "-p", &p.vh.name, q]);
    }
    p.nodes[hold].wait_log("still holding the redelivered message", T);
    p.expect_ended_once(&id, 1, run);
    assert_eq!(p.ran_here(hold), 0.0, "{}", p.nodes[hold].log_text());
}

#[test]
fn a_holder_whose_connection_is_closed_20_times_runs_nothing() {
    let _broker = BrokerWide::delivery_timeout(20_000, 1_000);
    let p = Pair::start("cut-hold", &WorkerEnv::new());
    let (id, run, hold) = p.run_until_held(55.0);
    let holder = format!("cut-hold-{}", if hold == 0 { "a" } else { "b" });
    let connected = |n: &WorkerProc| n.log_text().matches("connected to the broker").count();
    let mut closed: Vec<String> = Vec::new();
    for _ in 0..20 {
        let before = connected(&p.nodes[hold]);
        let mut names = Vec::new();
        eventually(
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                names = connections_of(&p.vh, &holder);
                names.retain(|n| !closed.contains(n));
                !names.is_empty()
            },
            || {
                format!(
                    "no new connection of {holder} listed:\n{}",
                    p.nodes[hold].log_text()
                )
            },
        );
        for name in &names {
            // Gone already, if it fell on its own meanwhile.
            let _ = std::process::Command::new("rabbitmqctl")
                .args(["close_connection", name, "test: connection closed"])
                .output();
            closed.push(name.clone());
        }
        eventually(
            Duration::from_secs(30),
            Duration::from_millis(100),
            || connected(&p.nodes[hold]) > before,
            || format!("{holder} did not reconnect:\n{}", p.nodes[hold].log_text()),
        );
    }
    p.expect_ended_once(&id, 1, run);
    assert_eq!(p.ran_here(hold), 0.0, "{}", p.nodes[hold].log_text());
}

#[test]
fn a_running_node_frozen_past_restart_grace_drops_the_task_its_holder_took_over() {
    // The holder decides within its own hold (RESTART_GRACE 10 s of
    // silence, the hold lasts 20 s); the frozen node thaws after its task's
    // time, deaf for 20 s (more than 10 s less a quarter).
    let _broker = BrokerWide::delivery_timeout(20_000, 1_000);
    let p = Pair::start("taken", &WorkerEnv::new().set("RESTART_GRACE", 10));
    let (id, run, hold) = p.run_until_held(40.0);
    freeze(&p.nodes[run], Duration::from_secs(22));
    p.nodes[run].wait_log(
        "another node took this task over while this node could not hear the farm; dropping it",
        T,
    );
    p.expect_ended_once(&id, 2, hold);
    assert_eq!(p.ran_here(hold), 1.0);
    assert_eq!(
        sample(
            &scrape(&p.metrics[run]),
            "zimfarm_worker_tasks_taken_over_total",
            &[]
        ),
        Some(1.0)
    );
}

#[test]
fn a_node_killed_mid_scrape_and_back_20_s_later_keeps_its_task_while_an_idle_node_waits() {
    let creates_a = ContainerCreates::watch("back-a");
    let creates_b = ContainerCreates::watch("back-b");
    let sshd = Sshd::start();
    let sv = Services::new("back");
    let events = sv.events(400);
    let env = WorkerEnv::docker(&sshd).set("RESTART_GRACE", 60);
    let dir_of = |node: &str| -> PathBuf {
        let dir = sv.dir.path().join(node);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    };
    let (dir_a, dir_b) = (dir_of("back-a"), dir_of("back-b"));
    let mut a = WorkerProc::start(&sv.vh, &dir_a, "back-a", &env);
    a.wait_connected();
    let id = Task::mw(json!({"count": "400:20"})).send(&sv.vh);
    wait_offliner_line(&id, "line 20", T);
    // B is idle, and hears A's heartbeats list the task.
    let b = WorkerProc::start(&sv.vh, &dir_b, "back-b", &env);
    b.wait_connected();
    std::thread::sleep(Duration::from_secs(3));
    a.signal("KILL");
    a.wait_exit(T);
    let killed = Instant::now();
    // The broker gives A's message to B, which finds A silent but last
    // seen running it: it waits.
    b.wait_log("last seen running on another node", T);
    if let Some(left) = Duration::from_secs(20).checked_sub(killed.elapsed()) {
        std::thread::sleep(left);
    }
    let a2 = WorkerProc::start(&sv.vh, &dir_a, "back-a", &env);
    a2.wait_connected();
    let done = events.wait_task_event("task-succeeded", &id, Duration::from_secs(180));
    assert_eq!(
        done["hostname"],
        format!("{}@back-a", sshd.user()),
        "{done}"
    );
    sv.vh.wait_queue_depth("small", 0, 0, T);
    std::thread::sleep(Duration::from_secs(3));
    let all = events.events();
    let report = dump_task_events(&all);
    assert_eq!(events.count("task-started", &id), 1, "{report}");
    let finals = all
        .iter()
        .filter(|e| e["uuid"] == id.as_str() && e["type"].as_str().is_some_and(is_final_event))
        .count();
    assert_eq!(finals, 1, "{report}");
    assert_eq!(
        (creates_a.offliners_of(&id), creates_b.offliners_of(&id)),
        (1, 0),
        "A's scrape only"
    );
    b.assert_log_lacks("running the redelivered task here");
    let landed: Vec<String> = std::fs::read_dir(sshd.chroot().join("zim/wikipedia"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(landed, ["wikipedia_en_test.zim"], "one ZIM");
    eprintln!(
        "A back {:.0} s after its kill; the task ended on A, B never ran it",
        killed.elapsed().as_secs_f64()
    );
}
