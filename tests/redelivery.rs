//! A redelivered message for a task the receiving node neither runs nor
//! ended: the node holds it and asks the farm (`query_task`) before running
//! it. Made deterministic without touching the broker's timeouts: the first
//! node stops consuming (`cancel_consumer`) but keeps answering remote
//! control, a bare AMQP client takes the message without acking it and
//! disconnects (the broker requeues it, marked redelivered), and only then
//! does the second node start.

mod common;
mod keeping;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use keeping::{Keeping, in_process, kept_task};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

/// Takes one message from `queue` without acking it and disconnects: the
/// broker puts it back, `redelivered` set.
fn take_and_drop(vh: &Vhost, queue: &str) {
    let script = r#"
import sys, amqp, time
conn = amqp.Connection(sys.argv[1], userid=sys.argv[2], password=sys.argv[3], virtual_host=sys.argv[4])
conn.connect()
ch = conn.channel()
for _ in range(100):
    msg = ch.basic_get(queue=sys.argv[5], no_ack=False)
    if msg is not None:
        break
    time.sleep(0.1)
assert msg is not None, "no message to take"
conn.close()
print("taken", msg.delivery_info.get("redelivered"))
"#;
    run_ok(
        Command::new(python()).args([
            "-c",
            script,
            "127.0.0.1:5672",
            "zimfarm-test",
            "zimfarm-test",
            &vh.name,
            queue,
        ]),
        "take_and_drop",
    );
}

/// The second node, with a metrics endpoint, started once the message
/// waits redelivered; keep the returned dir alive as long as the node.
fn second_node(vh: &Vhost, node: &str) -> (tempfile::TempDir, String, WorkerProc) {
    let dir = tempfile::tempdir().unwrap();
    let metrics = free_addr();
    let worker = WorkerProc::start(
        vh,
        dir.path(),
        node,
        &WorkerEnv::new()
            .set("CONCURRENCY", "1")
            .set("METRICS_ADDR", &metrics),
    );
    (dir, metrics, worker)
}

/// `node` stops consuming `small`; it still answers remote control.
fn stop_consuming(vh: &Vhost, node: &str) {
    let reply = broadcast(vh, node, "cancel_consumer", json!({"queue": "small"}));
    assert_eq!(reply, json!({"ok": "no longer consuming from small"}));
}

#[test]
fn a_redelivery_of_a_task_that_ended_on_another_node_is_acked_not_run() {
    let s = Stack::start("redeliv-ended", WorkerEnv::new().set("CONCURRENCY", "1")).within(T);
    let first = "tester@redeliv-ended";
    let id = s.submit(Task::simulated(0.2));
    s.expect_event("task-succeeded", &id);
    stop_consuming(&s.vh, first);
    // The dispatcher's message comes again, and is redelivered (as after
    // a consumer_timeout, or a node killed after its final event).
    send_task(&s.vh, "offliner.mwoffliner", &id, &simulated_task(0.2), &[]);
    take_and_drop(&s.vh, "small");

    let (_dir2, metrics, second) = second_node(&s.vh, "redeliv-ended-2");
    second.wait_log("the task ended on another node", T);
    s.expect_queue(0, 0);
    std::thread::sleep(Duration::from_secs(1));
    let all = s.events.events();
    assert_eq!(
        s.count("task-started", &id),
        1,
        "{}",
        dump_task_events(&all)
    );
    assert_eq!(s.count("task-succeeded", &id), 1);
    assert_eq!(redeliveries_held(&metrics, "ended_elsewhere"), 1.0);
    assert_eq!(redeliveries_held(&metrics, "ran_here"), 0.0);
    assert!(second.log_text().contains("node=tester@redeliv-ended"));
}

#[test]
fn a_redelivery_nobody_runs_runs_here_after_the_grace() {
    let s = Stack::start("redeliv-none", WorkerEnv::new().set("CONCURRENCY", "1")).within(T);
    stop_consuming(&s.vh, "tester@redeliv-none");
    let id = s.submit(Task::simulated(0.2));
    take_and_drop(&s.vh, "small");

    let (_dir2, metrics, second) = second_node(&s.vh, "redeliv-none-2");
    second.wait_log("asking the farm", T);
    let asked = Instant::now();
    let done = s.expect_event("task-succeeded", &id);
    let waited = asked.elapsed();
    assert_eq!(done["hostname"], "tester@redeliv-none-2");
    assert!(
        waited >= Duration::from_secs(9),
        "asked for the whole grace before running: {waited:?}"
    );
    assert_eq!(s.count("task-started", &id), 1);
    assert_eq!(redeliveries_held(&metrics, "ran_here"), 1.0);
    assert!(
        second
            .log_text()
            .contains("no node has it or was seen running it (2 answered, asked for 10 s)"),
        "both nodes answered, neither has it:\n{}",
        second.log_text()
    );
    s.expect_queue(0, 0);
}

#[test]
fn a_node_that_leaves_keeping_the_held_task_is_waited_for_and_carries_it_on() {
    let sv = Services::new("redeliv-kept");
    let events = sv.events(180);
    let first = "tester@redeliv-kept";
    let id = task_id();
    let runner = || Keeping {
        tasks: vec![kept_task(&id, json!({"sleep": 8.0}), 30.0, None)],
        away: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    let env = WorkerEnv::new().set("CONCURRENCY", "1");
    let shutdown = zimfarm_worker::worker::Shutdown::new();
    let a = in_process(&sv, "redeliv-kept", &env, runner(), shutdown.clone());
    events.wait_for(
        |v| v["type"] == "worker-online" && v["hostname"] == first,
        T,
        "worker-online",
    );
    stop_consuming(&sv.vh, first);
    // The task's message, given back to the broker by the earlier run's
    // restart, reaches another node, redelivered.
    Task::simulated(8.0).with_id(&id).send(&sv.vh);
    take_and_drop(&sv.vh, "small");
    let (_dir2, _metrics, second) = second_node(&sv.vh, "redeliv-kept-2");
    second.wait_log("holding it without running it", T);

    // The first node restarts: it leaves, keeping the task...
    shutdown.leave();
    a.join().expect("the worker thread").expect("exit 0");
    let offline = events.wait_for(
        |v| v["type"] == "worker-offline" && v["hostname"] == first,
        T,
        "worker-offline",
    );
    assert_eq!(offline["kept"], json!([id]), "{offline}");
    second.wait_log("went offline keeping it for its next start", T);
    // ...and comes back well within RESTART_GRACE, carrying it on.
    let again = zimfarm_worker::worker::Shutdown::new();
    let a = in_process(&sv, "redeliv-kept", &env, runner(), again.clone());
    let done = events.wait_task_event("task-succeeded", &id, T);
    assert_eq!(done["hostname"], first, "{done}");
    // The held message is acked on that final event, never run there.
    sv.vh.wait_queue_depth("small", 0, 0, T);
    std::thread::sleep(Duration::from_secs(1));
    let all = events.events();
    assert_eq!(
        events.count("task-started", &id),
        0,
        "{}",
        dump_task_events(&all)
    );
    assert_eq!(events.count("task-succeeded", &id), 1);
    assert!(
        !second
            .log_text()
            .contains("running the redelivered task here"),
        "{}",
        second.log_text()
    );
    again.stop_for_good();
    a.join().expect("the worker thread").expect("exit 0");
}
