//! A task that outlives the broker's `consumer_timeout` (RabbitMQ 3.8.15 and
//! later close the channel of a delivery left unacked that long, 30 min by
//! default, and requeue it), against a real RabbitMQ with the timeout
//! lowered for the length of the test.
//!
//! The timeout is a setting of the whole broker: the tests of this file run
//! one at a time (no other test binary runs meanwhile), and the settings
//! come back when each ends, however it ends (`common::broker_wide`).
//!
//! With two nodes the requeued message reaches the idle node while the
//! first one still runs the task: the idle node must hold it without
//! running it (asking the farm with `query_task`), ack it once the task
//! ended there, and run it only if the running node dies. The same holds
//! in a farm of mixed versions: a node that does not know a task a newer
//! node runs, or cannot read its message, never fails its redelivery.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::broker_wide::BrokerWide;
use common::*;
use serde_json::json;

#[test]
fn a_task_past_the_delivery_timeout_is_named_counted_and_still_runs_once() {
    let _short = BrokerWide::delivery_timeout(3_000, 1_000);
    let metrics = free_addr();
    let s = Stack::start("acktimeout", WorkerEnv::new().set("METRICS_ADDR", &metrics));
    let id = s.submit(Task::new(
        "offliner.mwoffliner",
        json!({
            "flags": {"mwUrl": "https://en.wikipedia.org", "adminEmail": "a@b.c"},
            "image": {"name": "openzim/mwoffliner", "tag": "1.9"},
            "warehouse_path": "/wikipedia",
            "simulate": {"sleep": 12.0},
        }),
    ));
    let started = Instant::now();
    s.events
        .wait_task_event("task-started", &id, Duration::from_secs(30));
    s.worker
        .wait_log("past its consumer_timeout", Duration::from_secs(30));
    let closed_after = started.elapsed();
    let log = s.worker.log_text();
    assert!(
        log.contains("delivery acknowledgement on channel")
            && log.contains("consumer_timeout in rabbitmq.conf"),
        "the log names the broker's reason and what to set:\n{log}"
    );
    s.events
        .wait_task_event("task-succeeded", &id, Duration::from_secs(60));
    let scraped = scrape(&metrics);
    assert!(
        sample(
            &scraped,
            "zimfarm_worker_broker_delivery_timeouts_total",
            &[]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{scraped}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        s.count("task-started", &id),
        1,
        "ran once on this single node"
    );
    assert_eq!(s.count("task-succeeded", &id), 1);
    eprintln!(
        "channel closed {:.1} s after the task was sent",
        closed_after.as_secs_f64()
    );
}

/// Two nodes with a metrics endpoint each, CONCURRENCY=1, on one queue of
/// a vhost of their own, with an event receiver listening for `seconds`:
/// the vhost, the receiver, the nodes' dirs and metrics addresses, and the
/// nodes (dropped first).
#[allow(clippy::type_complexity)]
fn two_nodes(
    label: &str,
    seconds: u64,
    env: &WorkerEnv,
) -> (
    Vhost,
    EventsProc,
    [tempfile::TempDir; 2],
    [String; 2],
    Vec<WorkerProc>,
) {
    let vh = Vhost::new(label);
    let events = EventsProc::start(&vh, seconds);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let metrics = [free_addr(), free_addr()];
    let nodes: Vec<WorkerProc> = ["ackt-a", "ackt-b"]
        .iter()
        .zip(&dirs)
        .zip(&metrics)
        .map(|((node, dir), addr)| {
            let env = env.clone().set("CONCURRENCY", 1).set("METRICS_ADDR", addr);
            WorkerProc::start(&vh, dir.path(), node, &env)
        })
        .collect();
    for n in &nodes {
        n.wait_connected();
    }
    (vh, events, dirs, metrics, nodes)
}

#[test]
fn a_task_past_the_delivery_timeout_runs_once_in_a_farm_of_two() {
    let _short = BrokerWide::delivery_timeout(3_000, 1_000);
    let (vh, events, _dirs, metrics, nodes) = two_nodes("acktimeout-farm", 180, &WorkerEnv::new());
    // The worker asks for a longer delivery timeout on its own consumers
    // (RabbitMQ 3.11.15+ apply it; older ones, such as Debian's, ignore it).
    // (The management API lists consumers a moment after they start.)
    let asked = Instant::now();
    let on_tasks = loop {
        let consumers = rabbit_api_call("GET", &format!("/consumers/{}", vh.name), None);
        let on_tasks: Vec<serde_json::Value> = consumers
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["queue"]["name"] == "small")
            .cloned()
            .collect();
        if on_tasks.len() == 2 || asked.elapsed() > Duration::from_secs(20) {
            break on_tasks;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(on_tasks.len(), 2, "{on_tasks:?}");
    for c in &on_tasks {
        assert_eq!(
            c["arguments"]["x-consumer-timeout"],
            json!(1_209_600_000u64),
            "{c}"
        );
    }

    let id = task_id();
    let began = Instant::now();
    send_task(&vh, "offliner.mwoffliner", &id, &simulated_task(15.0), &[]);
    events.wait_task_event("task-succeeded", &id, Duration::from_secs(90));
    let ran_for = began.elapsed();
    // Whoever holds it last acks it; the queue drains.
    vh.wait_queue_depth("small", 0, 0, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    let all = events.events();
    let report = dump_task_events(&all);
    assert_eq!(events.count("task-started", &id), 1, "one run:\n{report}");
    assert_eq!(events.count("task-succeeded", &id), 1, "{report}");
    assert_eq!(events.count("task-failed", &id), 0, "{report}");
    let timeouts: usize = nodes
        .iter()
        .map(|n| n.log_text().matches("past its consumer_timeout").count())
        .sum();
    assert!(timeouts >= 2, "the message moved at least twice");
    let holds: Vec<f64> = metrics
        .iter()
        .map(|m| redeliveries_held(m, "ended_elsewhere") + redeliveries_held(m, "returned"))
        .collect();
    let ran_here: f64 = metrics
        .iter()
        .map(|m| redeliveries_held(m, "ran_here"))
        .sum();
    assert!(
        holds.iter().sum::<f64>() >= 1.0,
        "the idle node held the redelivered message: {holds:?}\n{}",
        nodes[0].log_text() + &nodes[1].log_text()
    );
    assert_eq!(ran_here, 0.0, "no node ran the redelivery");
    eprintln!(
        "15 s task, consumer_timeout 3 s: ended after {:.1} s, {timeouts} channel closes, \
         redeliveries held per node {holds:?}",
        ran_for.as_secs_f64()
    );
}

#[test]
fn a_held_task_runs_on_the_holder_when_its_node_dies() {
    // Long enough for the holder to count RESTART_GRACE of the dead node's
    // silence before its own hold times out.
    let _short = BrokerWide::delivery_timeout(25_000, 1_000);
    let env = WorkerEnv::new().set("RESTART_GRACE", 15);
    let (vh, events, _dirs, metrics, mut nodes) = two_nodes("acktimeout-orphan", 240, &env);
    let id = task_id();
    // Past the timeout, with time to run again once its node is gone.
    send_task(&vh, "offliner.mwoffliner", &id, &simulated_task(40.0), &[]);
    let started = events.wait_task_event("task-started", &id, Duration::from_secs(30));
    let runner = started["hostname"].as_str().unwrap().to_owned();
    let (run, hold) = if runner.ends_with("ackt-a") {
        (0, 1)
    } else {
        (1, 0)
    };
    // Held because its node answers it runs the task, or (that node
    // reconnecting after its own channel's timeout) because its last
    // heartbeat listed it.
    nodes[hold].wait_log("holding it without running it", Duration::from_secs(60));
    let killed = Instant::now();
    nodes[run].signal("KILL");
    nodes[run].wait_exit(Duration::from_secs(10));
    nodes[hold].wait_log("running the redelivered task here", Duration::from_secs(30));
    let took_over = killed.elapsed();
    events.wait_task_event("task-succeeded", &id, Duration::from_secs(60));
    vh.wait_queue_depth("small", 0, 0, Duration::from_secs(30));
    let all = events.events();
    let report = dump_task_events(&all);
    let starts: Vec<&str> = all
        .iter()
        .filter(|e| e["type"] == "task-started" && e["uuid"] == id.as_str())
        .filter_map(|e| e["hostname"].as_str())
        .collect();
    assert_eq!(
        starts.len(),
        2,
        "the dead node's run, then the holder's:\n{report}"
    );
    assert_ne!(starts[0], starts[1], "{report}");
    assert_eq!(events.count("task-succeeded", &id), 1, "{report}");
    assert_eq!(redeliveries_held(&metrics[hold], "ran_here"), 1.0);
    eprintln!(
        "the holder ran the task {:.1} s after its node was killed",
        took_over.as_secs_f64()
    );
}

/// The build of the worker that knows one more task name (cargo feature
/// `test-extra-task`), which scripts/test.sh puts next to the worker binary.
fn extra_task_binary() -> PathBuf {
    let path = Path::new(worker_binary()).with_file_name("zimfarm-worker-extra-task");
    assert!(
        path.is_file(),
        "{} is missing: run the tests with scripts/test.sh, which builds it \
         (cargo build --features test-extra-task --bin zimfarm-worker, copied there) \
         before the normal build",
        path.display()
    );
    path
}

/// The task name only the extra build knows (`offliner::EXTRA_TEST_TASK`).
const EXTRA_TEST_TASK: &str = "offliner.extra_test_task";

#[test]
fn a_farm_of_mixed_versions_never_fails_a_redelivery_a_newer_node_runs() {
    let extra = extra_task_binary();
    let _short = BrokerWide::delivery_timeout(3_000, 1_000);
    let vh = Vhost::new("acktimeout-mixed");
    let events = EventsProc::start(&vh, 180);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    // The newer node takes both tasks before the older one is up: one of a
    // name only it knows, one whose message is too large for the older.
    let newer = WorkerProc::start_binary(
        &extra,
        &vh,
        dirs[0].path(),
        "ackt-newer",
        &WorkerEnv::new().set("CONCURRENCY", 2),
    );
    newer.wait_connected();
    let unknown = task_id();
    send_task(&vh, EXTRA_TEST_TASK, &unknown, &simulated_task(15.0), &[]);
    let large = task_id();
    let mut padded = simulated_task(15.0);
    padded["pad"] = json!("x".repeat(2048));
    send_task(&vh, "offliner.mwoffliner", &large, &padded, &[]);
    for id in [&unknown, &large] {
        events.wait_task_event("task-started", id, Duration::from_secs(30));
    }
    let older = WorkerProc::start(
        &vh,
        dirs[1].path(),
        "ackt-older",
        &WorkerEnv::new()
            .set("CONCURRENCY", 1)
            .set("MAX_MESSAGE_BYTES", 1024),
    );
    older.wait_connected();
    // Their messages go past the delivery timeout and reach the older node.
    for id in [&unknown, &large] {
        eventually(
            Duration::from_secs(60),
            Duration::from_millis(100),
            || {
                older
                    .log_text()
                    .lines()
                    .any(|line| line.contains(id.as_str()) && line.contains("asking the farm"))
            },
            || format!("the older node never held {id}:\n{}", older.log_text()),
        );
    }
    for id in [&unknown, &large] {
        events.wait_task_event("task-succeeded", id, Duration::from_secs(90));
    }
    vh.wait_queue_depth("small", 0, 0, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    let report = dump_task_events(&events.events());
    for id in [&unknown, &large] {
        let starts: Vec<serde_json::Value> = events
            .events()
            .into_iter()
            .filter(|e| e["type"] == "task-started" && e["uuid"] == id.as_str())
            .collect();
        assert_eq!(starts.len(), 1, "one run of {id}:\n{report}");
        assert!(
            starts[0]["hostname"]
                .as_str()
                .is_some_and(|h| h.ends_with("ackt-newer")),
            "{report}"
        );
        assert_eq!(events.count("task-succeeded", id), 1, "{report}");
        assert_eq!(events.count("task-failed", id), 0, "{report}");
    }
    older.assert_log_lacks("unregistered task");
    older.assert_log_lacks("failing a task whose message is larger");
    let moved: usize = [&newer, &older]
        .iter()
        .map(|n| n.log_text().matches("past its consumer_timeout").count())
        .sum();
    eprintln!("two 15 s tasks on the newer node, consumer_timeout 3 s: {moved} channel closes");
}
