//! The worker core against a real RabbitMQ and real Python Celery 5:
//! interop (protocol 2 and 1, events, `rpc://`), bad input, `expires`,
//! `eta`, time limits, faults (connection cut, kill -9) and shutdown.

mod common;
mod keeping;

use std::time::{Duration, Instant};

use common::*;
use keeping::{Keeping, in_process, kept_task};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

fn kwargs(simulate: Value) -> Value {
    json!({
        "flags": {"mwUrl": "https://en.wikipedia.org", "adminEmail": "a@b.c", "format": ["nopic", "novid"]},
        "image": {"name": "openzim/mwoffliner", "tag": "1.9"},
        "warehouse_path": "/wikipedia",
        "simulate": simulate,
    })
}

fn setup(label: &str) -> (Vhost, tempfile::TempDir) {
    (Vhost::new(label), tempfile::tempdir().expect("temp dir"))
}

/// Python's `ast.literal_eval` of a repr string, as JSON.
fn literal_eval(repr: &str) -> Value {
    let out = run_ok(
        std::process::Command::new(python()).args([
            "-c",
            "import ast, json, sys; print(json.dumps(ast.literal_eval(sys.argv[1])))",
            repr,
        ]),
        &format!("literal_eval({repr:?})"),
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn celery_send_task_runs_and_reports_every_event() {
    let s = Stack::start("interop", WorkerEnv::new()).within(T);
    s.events.wait_for(
        |v| v["type"] == "worker-online" && v["hostname"] == "tester@interop",
        T,
        "worker-online",
    );
    let id = task_id();
    let files = json!([{"name": "wikipedia_en_all.zim", "size": 123456789}, {"name": "it's \"quoted\".zim", "size": 0}]);
    send_task(
        &s.vh,
        "offliner.mwoffliner",
        &id,
        &kwargs(json!({"sleep": 0.3, "files": files})),
        &[],
    );

    let received = s.expect_event("task-received", &id);
    assert_eq!(received["name"], "offliner.mwoffliner");
    assert_eq!(received["hostname"], "tester@interop");
    assert!(
        received["kwargs"]
            .as_str()
            .unwrap()
            .contains("'warehouse_path': '/wikipedia'"),
        "{received}"
    );
    s.expect_event("task-started", &id);
    let succeeded = s.expect_event("task-succeeded", &id);
    assert_eq!(literal_eval(succeeded["result"].as_str().unwrap()), files);
    assert!(succeeded["runtime"].as_f64().unwrap() >= 0.3);
    for e in ["task-received", "task-started", "task-succeeded"] {
        assert_eq!(s.count(e, &id), 1, "{e} once");
    }
    // A heartbeat every 2 s, with a Lamport clock that only goes forward.
    s.events.wait_for(
        |v| v["type"] == "worker-heartbeat" && v["processed"] == 1,
        T,
        "heartbeat after the task",
    );
    let clocks: Vec<u64> = s
        .events
        .events()
        .iter()
        .filter(|v| v["hostname"] == "tester@interop")
        .filter_map(|v| v["clock"].as_u64())
        .collect();
    assert!(
        clocks.windows(2).all(|w| w[0] < w[1]),
        "clock goes forward: {clocks:?}"
    );
    s.expect_queue(0, 0);
}

#[test]
fn celery_state_sees_worker_alive_and_task_succeeded() {
    let s = Stack::start("state", WorkerEnv::new()).within(T);
    let id = s.submit(Task::new("offliner.mwoffliner", kwargs(Value::Null)));
    s.expect_event("task-succeeded", &id);
    let summary = s.events.finish();
    assert_eq!(
        summary["summary"]["workers"]["tester@state"]["alive"], true,
        "{summary}"
    );
    assert_eq!(
        summary["summary"]["tasks"][&id]["state"], "SUCCESS",
        "{summary}"
    );
    let text = summary.to_string();
    assert!(!text.contains("drift"), "no clock-drift warning: {text}");
}

#[test]
fn protocol_1_message_is_consumed() {
    let s = Stack::start("proto1", WorkerEnv::new()).within(T);
    let id =
        s.submit(Task::new("offliner.youtube", kwargs(Value::Null)).options(&["--protocol", "1"]));
    let received = s.expect_event("task-received", &id);
    assert_eq!(received["name"], "offliner.youtube");
    let succeeded = s.expect_event("task-succeeded", &id);
    assert_eq!(
        literal_eval(succeeded["result"].as_str().unwrap()),
        json!([{"name": format!("simulated_{id}.zim"), "size": 1024}])
    );
}

#[test]
fn rpc_backend_result_reaches_async_result_get() {
    let (vh, dir) = setup("rpc");
    let worker = WorkerProc::start(&vh, dir.path(), "rpc", &WorkerEnv::new());
    worker.wait_connected();
    let id = task_id();
    let reply = send_task(
        &vh,
        "offliner.mwoffliner",
        &id,
        &kwargs(Value::Null),
        &["--rpc", "--wait", "30"],
    );
    assert_eq!(reply["status"], "SUCCESS", "{reply}");
    assert_eq!(
        reply["result"],
        json!([{"name": format!("simulated_{id}.zim"), "size": 1024}])
    );

    let id = task_id();
    let reply = send_task(
        &vh,
        "offliner.mwoffliner",
        &id,
        &kwargs(json!({"fail": "scraper exited with code 3"})),
        &["--rpc", "--wait", "30"],
    );
    assert_eq!(reply["status"], "FAILURE", "{reply}");
    assert_eq!(reply["exc_type"], "RuntimeError", "{reply}");
    assert!(
        reply["exc"]
            .as_str()
            .unwrap()
            .contains("scraper exited with code 3"),
        "{reply}"
    );
}

#[test]
fn failing_and_panicking_tasks_fail_and_the_worker_goes_on() {
    let s = Stack::start("fail", WorkerEnv::new()).within(T);
    let failing = s.submit(Task::new(
        "offliner.mwoffliner",
        kwargs(json!({"fail": "exit code 1: 'boom'"})),
    ));
    let failed = s.expect_event("task-failed", &failing);
    assert_eq!(
        failed["exception"], r#"RuntimeError("exit code 1: 'boom'")"#,
        "{failed}"
    );

    let panicking = s.submit(Task::new(
        "offliner.mwoffliner",
        kwargs(json!({"panic": true})),
    ));
    let failed = s.expect_event("task-failed", &panicking);
    assert!(
        text_of(&failed, "exception").contains("panicked"),
        "{failed}"
    );

    let fine = s.submit(Task::new("offliner.mwoffliner", kwargs(Value::Null)));
    s.expect_event("task-succeeded", &fine);
    s.expect_queue(0, 0);
}

#[test]
fn unknown_task_is_rejected_with_task_failed() {
    let s = Stack::start("unknown", WorkerEnv::new()).within(T);
    let id = s.submit(Task::new("offliner.nosuchthing", kwargs(Value::Null)));
    let failed = s.expect_event("task-failed", &id);
    assert!(
        text_of(&failed, "exception").starts_with("NotRegistered("),
        "{failed}"
    );
    assert_eq!(s.count("task-started", &id), 0);
    // Rejected without requeue: gone from the queue, not redelivered.
    let next = s.submit(Task::new("offliner.mwoffliner", kwargs(Value::Null)));
    s.expect_event("task-succeeded", &next);
    s.expect_queue(0, 0);
    assert_eq!(s.count("task-failed", &id), 1);
}

/// Publishes raw bytes to the `offliner` exchange, routing key `small`.
fn publish_raw(vh: &Vhost, dir: &std::path::Path, body: &[u8], extra: &[&str]) {
    publish_raw_to(vh, dir, "offliner", "small", body, extra);
}

#[test]
fn bad_messages_are_dropped_and_the_worker_serves_the_next_task() {
    let s = Stack::start("bad", WorkerEnv::new()).within(T);
    let d = s.dir();
    let v2 = |id: &str| json!({"task": "offliner.mwoffliner", "id": id, "lang": "py"}).to_string();
    // As protocol 2 (the task in the headers) and as protocol 1 (the body
    // only), both declared JSON.
    let publish_v2 = |body: &[u8], id: &str| {
        let headers = v2(id);
        publish_raw(
            &s.vh,
            d,
            body,
            &["--headers", &headers, "--content-type", "application/json"],
        );
    };
    let publish_v1 =
        |body: &[u8]| publish_raw(&s.vh, d, body, &["--content-type", "application/json"]);
    let wrong_shape_id = task_id();

    // Invalid JSON, as protocol 2 (headers) and as protocol 1 (body only).
    publish_v2(b"[[], {\"flags\": ", &task_id());
    publish_v1(b"{not json");
    // A body of the wrong shape.
    publish_v2(br#"{"args": "nope"}"#, &wrong_shape_id);
    publish_v1(b"[1, 2, 3]");
    // Non-UTF-8 bytes.
    publish_v2(b"[[], {\"a\": \"\xff\xfe\"}, {}]", &task_id());
    // A pickle, which must never be loaded.
    publish_raw(
        &s.vh,
        d,
        b"\x80\x04\x95",
        &[
            "--headers",
            &v2(&task_id()),
            "--content-type",
            "application/x-python-serialize",
        ],
    );
    // 50 MB.
    let mut big = b"[[], {\"flags\": {\"x\": \"".to_vec();
    big.extend(std::iter::repeat_n(b'a', 50 * 1024 * 1024));
    big.extend_from_slice(b"\"}}, {}]");
    let big_id = task_id();
    publish_v2(&big, &big_id);
    drop(big);

    let next = s.submit(Task::new("offliner.mwoffliner", kwargs(Value::Null)));
    s.events
        .wait_task_event("task-succeeded", &next, Duration::from_secs(60));
    s.expect_queue(0, 0);
    // The decode failure of a message whose id was readable is reported.
    s.expect_event("task-failed", &wrong_shape_id);
    let log = s.worker.log_text();
    assert!(
        log.contains("dropping an undecodable task message"),
        "{log}"
    );
    assert!(log.contains("larger than MAX_MESSAGE_BYTES"), "{log}");
    // Its id is in its headers: its task is failed, its body never read.
    let failed = s.expect_event("task-failed", &big_id);
    let exception = text_of(&failed, "exception");
    assert!(
        exception.starts_with("ValueError(") && exception.contains("MAX_MESSAGE_BYTES"),
        "{failed}"
    );
    assert!(
        s.worker.rss_kib() < 200 * 1024,
        "RSS after a 50 MB message: {} KiB",
        s.worker.rss_kib()
    );
    assert_eq!(
        s.events
            .events()
            .iter()
            .filter(|v| v["type"] == "task-started")
            .count(),
        1
    );
}

/// A message over MAX_MESSAGE_BYTES goes through admission by the id in
/// its headers: a copy of a task running here is held until that run ends
/// and fails nothing, a copy of a task ended here gets that task's end, a
/// task of its own is failed; a v1 one (its id in its body) is dropped
/// with an error in the log only.
#[test]
fn an_oversized_message_fails_only_a_task_run_nowhere() {
    let s = Stack::start("oversized", WorkerEnv::new().set("MAX_MESSAGE_BYTES", 1024)).within(T);
    let d = s.dir();
    let oversized = |id: &str, protocol_1: bool| {
        let mut body = json!([[], {"pad": "x".repeat(2048)}, {}]).to_string();
        let mut options = vec!["--content-type".to_owned(), "application/json".to_owned()];
        if protocol_1 {
            body = json!({"task": "offliner.mwoffliner", "id": id, "pad": "x".repeat(2048)})
                .to_string();
        } else {
            options.push("--headers".to_owned());
            options
                .push(json!({"task": "offliner.mwoffliner", "id": id, "lang": "py"}).to_string());
        }
        let options: Vec<&str> = options.iter().map(String::as_str).collect();
        publish_raw(&s.vh, d, body.as_bytes(), &options);
    };
    let running = s.submit(Task::new(
        "offliner.mwoffliner",
        kwargs(json!({"sleep": 4.0})),
    ));
    s.expect_event("task-started", &running);
    oversized(&running, false);
    s.worker.wait_log(
        "redelivered message for a task already here",
        Duration::from_secs(10),
    );
    s.expect_event("task-succeeded", &running);
    // Held, then acked once its run ended.
    s.expect_queue(0, 0);
    oversized(&running, false);
    let alone = task_id();
    oversized(&alone, false);
    let v1 = task_id();
    oversized(&v1, true);
    let failed = s.expect_event("task-failed", &alone);
    assert!(
        text_of(&failed, "exception").contains("MAX_MESSAGE_BYTES"),
        "{failed}"
    );
    s.worker
        .wait_log("its task id is not in its headers", Duration::from_secs(10));
    s.expect_queue(0, 0);
    // Its run's end was confirmed to this process: not sent again.
    s.worker.wait_log(
        "redelivered message for a task that already ended here, its final event confirmed",
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(s.count("task-failed", &running), 0);
    assert_eq!(s.count("task-succeeded", &running), 1);
    assert_eq!(s.count("task-started", &running), 1);
    assert_eq!(s.count("task-failed", &alone), 1);
    assert_eq!(s.count("task-started", &alone), 0);
    assert_eq!(
        s.events
            .events()
            .iter()
            .filter(|e| e["uuid"] == v1.as_str())
            .count(),
        0
    );
}

#[test]
fn expired_task_is_revoked_not_run() {
    let s = Stack::start("expires", WorkerEnv::new()).within(T);
    let id = s.submit(
        Task::new("offliner.mwoffliner", kwargs(Value::Null)).options(&[
            "--expires",
            "-60",
            "--no-message-ttl",
        ]),
    );
    let revoked = s.expect_event("task-revoked", &id);
    assert_eq!(revoked["expired"], true, "{revoked}");
    assert_eq!(revoked["terminated"], false, "{revoked}");
    let next = s.submit(Task::new("offliner.mwoffliner", kwargs(Value::Null)));
    s.expect_event("task-succeeded", &next);
    assert_eq!(s.count("task-started", &id), 0);
    s.expect_queue(0, 0);
}

#[test]
fn eta_task_is_held_without_blocking_others() {
    let (vh, dir) = setup("eta");
    let events = EventsProc::start(&vh, 60);
    // One slot only: a held eta task must not take it.
    let worker = WorkerProc::start(
        &vh,
        dir.path(),
        "eta",
        &WorkerEnv::new().set("CONCURRENCY", "1"),
    );
    worker.wait_connected();
    let later = task_id();
    let sent_at = Instant::now();
    send_task(
        &vh,
        "offliner.mwoffliner",
        &later,
        &kwargs(Value::Null),
        &["--countdown", "3"],
    );
    events.wait_task_event("task-received", &later, T);
    let now_id = Task::new("offliner.mwoffliner", kwargs(Value::Null)).send(&vh);
    events.wait_task_event("task-succeeded", &now_id, T);
    assert_eq!(
        events.count("task-started", &later),
        0,
        "eta task must not start early"
    );
    events.wait_task_event("task-started", &later, T);
    assert!(sent_at.elapsed() >= Duration::from_millis(2900));
    events.wait_task_event("task-succeeded", &later, T);
    vh.wait_queue_depth("small", 0, 0, T);
}

#[test]
fn hard_time_limit_stops_the_task() {
    let s = Stack::start("timelimit", WorkerEnv::new()).within(T);
    let id = task_id();
    let start = Instant::now();
    send_task(
        &s.vh,
        "offliner.mwoffliner",
        &id,
        &kwargs(json!({"sleep": 60})),
        &["--time-limit", "1"],
    );
    let failed = s.expect_event("task-failed", &id);
    assert!(start.elapsed() < Duration::from_secs(15));
    assert!(
        text_of(&failed, "exception").starts_with("TimeLimitExceeded("),
        "{failed}"
    );
    s.expect_queue(0, 0);
}

#[test]
fn concurrency_bounds_running_tasks() {
    let s = Stack::start("slots", WorkerEnv::new().set("CONCURRENCY", "2")).within(T);
    let ids: Vec<String> = (0..4).map(|_| task_id()).collect();
    for id in &ids {
        send_task(
            &s.vh,
            "offliner.mwoffliner",
            id,
            &kwargs(json!({"sleep": 1.0})),
            &[],
        );
    }
    for id in &ids {
        s.expect_event("task-succeeded", id);
    }
    // Replay the events: never more than two started-but-not-ended.
    let mut running = 0i32;
    let mut peak = 0;
    for e in s.events.events() {
        match e["type"].as_str() {
            Some("task-started") => running += 1,
            Some("task-succeeded") => running -= 1,
            _ => {}
        }
        peak = peak.max(running);
    }
    assert_eq!(peak, 2, "CONCURRENCY=2 runs two at once");
}

#[test]
fn connection_cut_mid_task_completes_exactly_once() {
    let s = Stack::start("cut", WorkerEnv::new()).within(T);
    let id = s.submit(Task::new(
        "offliner.mwoffliner",
        kwargs(json!({"sleep": 6.0})),
    ));
    s.expect_event("task-started", &id);
    s.vh.close_all_connections();
    s.worker.wait_log("reconnecting", T);
    let succeeded = s.expect_event("task-succeeded", &id);
    assert!(succeeded["runtime"].as_f64().unwrap() >= 6.0);
    let next = s.submit(Task::new("offliner.mwoffliner", kwargs(Value::Null)));
    s.expect_event("task-succeeded", &next);
    // The redelivered copy was acked with the run, not run again.
    assert!(
        s.worker
            .log_text()
            .contains("redelivered message for a task already here"),
        "the broker redelivered the unacked message after the cut"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(s.count("task-started", &id), 1);
    assert_eq!(s.count("task-succeeded", &id), 1);
    s.expect_queue(0, 0);
}

#[test]
fn kill_9_mid_task_redelivers_to_a_new_worker() {
    let (vh, dir) = setup("kill9");
    let events = EventsProc::start(&vh, 90);
    let mut first = WorkerProc::start(&vh, dir.path(), "kill9", &WorkerEnv::new());
    first.wait_connected();
    let id = Task::new("offliner.mwoffliner", kwargs(json!({"sleep": 2.0}))).send(&vh);
    events.wait_task_event("task-started", &id, T);
    first.signal("KILL");
    first.wait_exit(T);
    let second = WorkerProc::start(&vh, dir.path(), "kill9", &WorkerEnv::new());
    second.wait_connected();
    events.wait_task_event("task-succeeded", &id, T);
    assert_eq!(
        events.count("task-started", &id),
        2,
        "started by the first, then by the new worker"
    );
    vh.wait_queue_depth("small", 0, 0, T);
}

/// Waits until `events` holds `n` events of `event_type` about `uuid`.
fn wait_count(events: &EventsProc, event_type: &str, uuid: &str, n: usize) {
    eventually(
        T,
        Duration::from_millis(50),
        || events.count(event_type, uuid) >= n,
        || {
            format!(
                "{event_type} for {uuid}: {} of {n} within {T:?}; events:\n{}",
                events.count(event_type, uuid),
                events
                    .events()
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        },
    );
}

#[test]
fn a_task_that_ended_is_answered_from_the_disk_record_after_a_restart() {
    let (vh, dir) = setup("ended");
    let events = EventsProc::start(&vh, 120);
    let mut first = WorkerProc::start(&vh, dir.path(), "ended", &WorkerEnv::new());
    first.wait_connected();
    let ok = task_id();
    let failing = task_id();
    send_task(
        &vh,
        "offliner.mwoffliner",
        &ok,
        &kwargs(json!({"files": [{"name": "first_run.zim", "size": 7}]})),
        &[],
    );
    send_task(
        &vh,
        "offliner.mwoffliner",
        &failing,
        &kwargs(json!({"fail": "first run failed"})),
        &[],
    );
    let succeeded = events.wait_task_event("task-succeeded", &ok, T);
    let failed = events.wait_task_event("task-failed", &failing, T);
    vh.wait_queue_depth("small", 0, 0, T);
    assert!(
        dir.path().join(".zimfarm-ended.jsonl").exists(),
        "the record is in ZIM_DIR"
    );
    // kill -9: no clean shutdown, the record must already be on disk.
    first.signal("KILL");
    first.wait_exit(T);

    let second = WorkerProc::start(&vh, dir.path(), "ended", &WorkerEnv::new());
    second.wait_connected();
    // The same task ids again, as a redelivery after a lost ack brings them.
    // Running them now would give another outcome.
    send_task(
        &vh,
        "offliner.mwoffliner",
        &ok,
        &kwargs(json!({"fail": "ran a second time"})),
        &[],
    );
    send_task(
        &vh,
        "offliner.mwoffliner",
        &failing,
        &kwargs(json!({"files": [{"name": "second_run.zim", "size": 9}]})),
        &[],
    );
    wait_count(&events, "task-succeeded", &ok, 2);
    wait_count(&events, "task-failed", &failing, 2);
    // Acked: nothing ready, nothing unacked.
    vh.wait_queue_depth("small", 0, 0, T);

    let last = |event_type: &str, uuid: &str| {
        events
            .events()
            .into_iter()
            .rev()
            .find(|v| v["type"] == event_type && v["uuid"] == uuid)
            .expect("event")
    };
    let again = last("task-succeeded", &ok);
    assert_eq!(again["result"], succeeded["result"], "{again}");
    assert_eq!(again["pid"], second.child.id(), "sent by the new worker");
    let again = last("task-failed", &failing);
    assert_eq!(again["exception"], failed["exception"], "{again}");
    assert_eq!(again["pid"], second.child.id(), "sent by the new worker");

    // Not run again: no second start, no other outcome.
    std::thread::sleep(Duration::from_secs(1));
    for id in [&ok, &failing] {
        assert_eq!(events.count("task-started", id), 1, "{id} started once");
        assert_eq!(events.count("task-received", id), 1, "{id} received once");
    }
    assert_eq!(events.count("task-failed", &ok), 0);
    assert_eq!(events.count("task-succeeded", &failing), 0);
    assert!(
        second.log_text().contains("already ended here"),
        "{}",
        second.log_text()
    );
}

/// Stops the worker of `s` with `stop` while a task runs: it exits 0
/// quickly, its `worker-offline` lists no kept task (the simulate runner
/// keeps nothing, whatever the mode), the task sends no outcome and its
/// message is back in the queue, whole.
fn stops_requeuing_and_says_offline(node: &str, stop: impl FnOnce(&Stack), said: &str) {
    let mut s = Stack::start(node, WorkerEnv::new()).within(T);
    let id = s.submit(Task::new(
        "offliner.mwoffliner",
        kwargs(json!({"sleep": 30.0})),
    ));
    s.expect_event("task-started", &id);
    let start = Instant::now();
    stop(&s);
    let status = s.worker.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{node}: exit 0, got {status}");
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{node}: within the grace period"
    );
    let hostname = format!("tester@{node}");
    let offline = s.events.wait_for(
        |v| v["type"] == "worker-offline" && v["hostname"] == hostname.as_str(),
        T,
        "worker-offline",
    );
    assert_eq!(offline["kept"], json!([]), "{node}: {offline}");
    assert_eq!(s.count("task-succeeded", &id), 0);
    assert_eq!(s.count("task-failed", &id), 0);
    assert_eq!(s.count("task-revoked", &id), 0);
    // The message went back to the queue, whole.
    s.expect_queue(1, 0);
    let log = s.worker.log_text();
    assert!(log.contains(said), "{node}: {log}");
    assert!(
        log.contains("task stopped by shutdown; its message goes back to the queue"),
        "{node}: {log}"
    );
}

#[test]
fn sigterm_requeues_unfinished_tasks_and_says_offline() {
    // A leave; the simulate runner keeps nothing, so its task stops as on
    // a stop for good.
    stops_requeuing_and_says_offline(
        "term",
        |s| s.worker.signal("TERM"),
        "SIGTERM received; leaving",
    );
}

#[test]
fn sigint_leaves_as_sigterm_does() {
    stops_requeuing_and_says_offline(
        "sigint",
        |s| s.worker.signal("INT"),
        "SIGINT received; leaving",
    );
}

#[test]
fn sigquit_stops_for_good_as_sigterm_did() {
    stops_requeuing_and_says_offline(
        "quit",
        |s| s.worker.signal("QUIT"),
        "SIGQUIT received; stopping for good",
    );
}

#[test]
fn remote_shutdown_stops_for_good() {
    stops_requeuing_and_says_offline(
        "remoteoff",
        |s| {
            let reply = broadcast(&s.vh, "tester@remoteoff", "shutdown", json!({}));
            assert_eq!(reply, json!({"ok": "shutting down"}), "{reply}");
        },
        "mode=ForGood",
    );
}

#[test]
fn bad_environment_exits_2_with_one_clear_line() {
    let sv = Services::new("env");
    let cases: &[(&str, Option<&str>, &str)] = &[
        ("NODE_NAME", Some("default_node_name"), "NODE_NAME"),
        ("QUEUES", Some("default,gigantic"), "QUEUES"),
        ("CONCURRENCY", Some("-3"), "CONCURRENCY"),
        ("USERNAME", None, "USERNAME"),
        (
            "BROKER_URL",
            Some("amqp://u:hunter2@host:notaport/v"),
            "BROKER_URL",
        ),
    ];
    for (var, value, named) in cases {
        let mut env = worker_env(&sv.vh, sv.dir.path(), "envtest", &[]);
        env.retain(|(k, _)| k != var);
        if let Some(v) = value {
            env.push((var.to_string(), v.to_string()));
        }
        let out = std::process::Command::new(worker_binary())
            .env_clear()
            .envs(env)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(named), "{stderr}");
        assert!(
            !stderr.contains("hunter2"),
            "no password in errors: {stderr}"
        );
    }
}

#[test]
fn unusable_zim_dir_exits_2_with_one_line_naming_it() {
    let sv = Services::new("zimdir");
    let not_a_dir = sv.dir.path().join("a-file");
    std::fs::write(&not_a_dir, b"").unwrap();
    for zim_dir in [sv.dir.path().join("missing"), not_a_dir] {
        let zim_dir = zim_dir.display().to_string();
        let env = worker_env(&sv.vh, sv.dir.path(), "zimdir", &[("ZIM_DIR", &zim_dir)]);
        let start = Instant::now();
        let out = std::process::Command::new(worker_binary())
            .env_clear()
            .envs(env)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{zim_dir}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains("ZIM_DIR"), "{stderr}");
        assert!(stderr.contains(&zim_dir), "{stderr}");
        assert!(stderr.contains("must exist and be writable"), "{stderr}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "before connecting"
        );
    }
}

#[test]
fn broker_down_at_start_is_retried_until_it_answers() {
    // A port where nothing listens: the worker keeps retrying, with backoff,
    // and exits cleanly on SIGTERM meanwhile.
    let sv = Services::new("down");
    let mut worker = sv.spawn(
        "down",
        &WorkerEnv::new().set(
            "BROKER_URL",
            "amqp://zimfarm-test:zimfarm-test@127.0.0.1:1/x",
        ),
    );
    worker.wait_log("broker unreachable", T);
    worker.signal("TERM");
    assert!(worker.wait_exit(T).success());
    assert!(
        !worker.log_text().contains("zimfarm-test:zimfarm-test"),
        "password redacted"
    );
}

#[test]
fn events_produced_while_the_broker_is_away_are_published_after_reconnecting() {
    let (vh, dir) = setup("outage");
    let events = EventsProc::start(&vh, 90);
    let proxy = FaultProxy::start("127.0.0.1:5672");
    let url = proxy.url(&vh);
    let worker = WorkerProc::start(
        &vh,
        dir.path(),
        "outage",
        &WorkerEnv::new().set("BROKER_URL", &url),
    );
    worker.wait_connected();
    let id = Task::new("offliner.mwoffliner", kwargs(json!({"sleep": 1.5}))).send(&vh);
    events.wait_task_event("task-started", &id, T);
    proxy.cut();
    // The task ends while the worker cannot reach the broker.
    worker.wait_log("task succeeded", T);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        events.count("task-succeeded", &id),
        0,
        "nothing can leave during the outage"
    );
    worker.wait_log("broker unreachable", T);
    proxy.restore();
    let succeeded = events.wait_task_event("task-succeeded", &id, Duration::from_secs(60));
    assert!(succeeded["runtime"].as_f64().unwrap() >= 1.5);
    // Acked after the reconnection (through the redelivered copy), run once.
    vh.wait_queue_depth("small", 0, 0, T);
    let next = Task::new("offliner.mwoffliner", kwargs(Value::Null)).send(&vh);
    events.wait_task_event("task-succeeded", &next, T);
    assert_eq!(events.count("task-started", &id), 1);
    assert_eq!(events.count("task-succeeded", &id), 1);
}

#[test]
fn amqps_verifies_the_broker_certificate() {
    let (vh, dir) = setup("tls");
    let ca = std::env::var("ZIMFARM_TEST_TLS_CA")
        .unwrap_or_else(|_| "/etc/rabbitmq/zimfarm-test-tls/ca.pem".to_owned());
    let url = format!(
        "amqps://zimfarm-test:zimfarm-test@127.0.0.1:5671/{}",
        vh.name
    );

    // A private CA the worker was not told about: refused, and retried.
    let mut untrusted = WorkerProc::start(
        &vh,
        dir.path(),
        "tlsbad",
        &WorkerEnv::new().set("BROKER_URL", &url),
    );
    untrusted.wait_log("broker unreachable", T);
    let log = untrusted.log_text().to_lowercase();
    assert!(
        log.contains("certificate") || log.contains("issuer"),
        "says why: {log}"
    );
    untrusted.signal("TERM");
    assert!(untrusted.wait_exit(T).success());

    // A CA file that is not there: a clear error at start.
    let mut missing = WorkerProc::start(
        &vh,
        dir.path(),
        "tlsmissing",
        &WorkerEnv::new()
            .set("BROKER_URL", &url)
            .set("BROKER_CA_FILE", "/nonexistent/ca.pem"),
    );
    assert!(!missing.wait_exit(T).success());
    assert!(
        missing
            .log_text()
            .contains("BROKER_CA_FILE /nonexistent/ca.pem"),
        "{}",
        missing.log_text()
    );

    // With BROKER_CA_FILE: verified, connected, serving.
    let events = EventsProc::start(&vh, 60);
    let worker = WorkerProc::start(
        &vh,
        dir.path(),
        "tlsok",
        &WorkerEnv::new()
            .set("BROKER_URL", &url)
            .set("BROKER_CA_FILE", ca),
    );
    worker.wait_connected();
    let id = Task::new("offliner.mwoffliner", kwargs(Value::Null)).send(&vh);
    events.wait_task_event("task-succeeded", &id, T);
}

#[test]
fn adopted_tasks_carry_on_hold_their_slots_take_nothing_while_full_and_a_leave_keeps_them() {
    let sv = Services::new("adopt");
    let events = sv.events(120);
    // Two kept tasks, one slot (CONCURRENCY lowered across the restart):
    // `a` ends in 10 s, `b` runs on until the leave.
    let (a, b) = (task_id(), task_id());
    let runner = Keeping {
        tasks: vec![
            kept_task(&a, json!({"sleep": 10.0}), 100.0, Some(3600.0)),
            kept_task(&b, json!({"sleep": 120.0}), 50.0, None),
        ],
        away: Some(Duration::from_secs(5)),
        ..Default::default()
    };
    let seen = runner.seen.clone();
    let shutdown = zimfarm_worker::worker::Shutdown::new();
    let env = WorkerEnv::new().set("CONCURRENCY", 1);
    let worker = in_process(&sv, "adopt", &env, runner, shutdown.clone());
    events.wait_for(
        |v| v["type"] == "worker-online" && v["hostname"] == "tester@adopt",
        T,
        "worker-online",
    );
    // Both adopted: kept at the claim, running with their carry and their
    // first start, shown by `inspect active`.
    let mut both = vec![a.clone(), b.clone()];
    both.sort();
    assert_eq!(seen.lock().unwrap().claimed.as_ref(), Some(&both));
    eventually(
        T,
        Duration::from_millis(50),
        || seen.lock().unwrap().runs.len() == 2,
        || format!("{:?}", seen.lock().unwrap()),
    );
    for (id, carry, started_at) in &seen.lock().unwrap().runs {
        let carry = carry.as_ref().expect("the carry is handed back");
        assert_eq!(carry["request"]["id"], json!(id));
        assert_eq!(carry["delivery"]["routing_key"], json!("small"));
        let age = zimfarm_worker::celery::now_timestamp() - started_at;
        let expected = if *id == a { 100.0 } else { 50.0 };
        assert!((age - expected).abs() < 30.0, "{id}: started {age} s ago");
    }
    let active = broadcast(&sv.vh, "tester@adopt", "active", json!({}));
    let listed: Vec<&str> = active
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|t| t["id"].as_str())
        .collect();
    assert!(
        listed.contains(&a.as_str()) && listed.contains(&b.as_str()),
        "{active}"
    );
    let stats = broadcast(&sv.vh, "tester@adopt", "stats", json!({}));
    assert_eq!(stats["prefetch_count"], json!(1), "{stats}");

    // Both adopted tasks hold the node's one slot in turn: the node is
    // full from its start and consumes nothing (issue 27). `a`'s message,
    // back in the queue, stays there for a node with a free slot (which
    // asks the farm about it), and so does a new task.
    Task::simulated(4.0).with_id(&a).send(&sv.vh);
    let c = Task::simulated(0.5).send(&sv.vh);
    sv.vh.wait_queue_depth("small", 2, 0, T);
    let done = events.wait_task_event("task-succeeded", &a, T);
    assert!(done["runtime"].as_f64().unwrap_or(0.0) >= 100.0, "{done}");
    // `b` takes the slot `a` left: still full, still nothing taken.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        events.count("task-started", &c),
        0,
        "no slot for c while b runs"
    );
    assert_eq!(
        events.count("task-started", &a),
        0,
        "no second task-started"
    );
    assert_eq!(events.count("task-received", &a), 0);
    assert_eq!(events.count("task-received", &c), 0, "nothing taken");
    assert_eq!(events.count("task-succeeded", &a), 1);
    sv.vh.wait_queue_depth("small", 2, 0, T);

    // The leave: `b` is left running for the next start; `a`'s message and
    // `c` were never taken.
    let start = Instant::now();
    shutdown.leave();
    worker.join().expect("the worker thread").expect("exit 0");
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    let offline = events.wait_for(
        |v| v["type"] == "worker-offline" && v["hostname"] == "tester@adopt",
        T,
        "worker-offline",
    );
    assert_eq!(offline["kept"], json!([b]), "{offline}");
    assert_eq!(events.count("task-succeeded", &b), 0);
    assert_eq!(events.count("task-failed", &b), 0);
    sv.vh.wait_queue_depth("small", 2, 0, T);
    let seen = seen.lock().unwrap();
    assert!(seen.forsaken.is_empty(), "{seen:?}");
    assert!(seen.alive >= 2, "at start and at the leave: {seen:?}");
}

#[test]
fn an_adopted_task_past_its_hard_limit_fails_at_once() {
    let sv = Services::new("adoptlimit");
    let events = sv.events(60);
    let a = task_id();
    let runner = Keeping {
        tasks: vec![kept_task(&a, json!({"sleep": 60.0}), 100.0, Some(90.0))],
        away: None,
        ..Default::default()
    };
    let shutdown = zimfarm_worker::worker::Shutdown::new();
    let worker = in_process(
        &sv,
        "adoptlimit",
        &WorkerEnv::new(),
        runner,
        shutdown.clone(),
    );
    let failed = events.wait_task_event("task-failed", &a, Duration::from_secs(15));
    assert!(
        failed["exception"]
            .as_str()
            .unwrap_or("")
            .contains("TimeLimitExceeded"),
        "{failed}"
    );
    shutdown.stop_for_good();
    worker.join().expect("the worker thread").expect("exit 0");
}

#[test]
fn kept_tasks_of_a_node_away_too_long_are_not_adopted_and_forsaken_after_stale_wait() {
    let sv = Services::new("stale");
    let events = sv.events(120);
    let a = task_id();
    let runner = Keeping {
        tasks: vec![kept_task(&a, json!({"sleep": 60.0}), 700.0, None)],
        away: Some(Duration::from_secs(30)),
        ..Default::default()
    };
    let seen = runner.seen.clone();
    let shutdown = zimfarm_worker::worker::Shutdown::new();
    let env = WorkerEnv::new().set("RESTART_GRACE", 20);
    let worker = in_process(&sv, "stale", &env, runner, shutdown.clone());
    events.wait_for(
        |v| v["type"] == "worker-online" && v["hostname"] == "tester@stale",
        T,
        "worker-online",
    );
    let online = Instant::now();
    // Kept at the claim (its message may still come back here), not run.
    assert_eq!(
        seen.lock().unwrap().claimed.as_ref(),
        Some(&vec![a.clone()])
    );
    let active = broadcast(&sv.vh, "tester@stale", "active", json!({}));
    assert_eq!(active, json!([]), "{active}");
    std::thread::sleep(Duration::from_secs(50));
    assert!(
        seen.lock().unwrap().forsaken.is_empty(),
        "not before STALE_WAIT"
    );
    eventually(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || !seen.lock().unwrap().forsaken.is_empty(),
        || format!("{:?}", seen.lock().unwrap()),
    );
    assert!(
        online.elapsed() >= Duration::from_secs(55),
        "{:?}",
        online.elapsed()
    );
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.forsaken, vec![a.clone()]);
        assert!(seen.runs.is_empty(), "{seen:?}");
    }
    assert_eq!(events.count("task-started", &a), 0);
    assert_eq!(events.count("task-failed", &a), 0);
    shutdown.leave();
    worker.join().expect("the worker thread").expect("exit 0");
    let offline = events.wait_for(
        |v| v["type"] == "worker-offline" && v["hostname"] == "tester@stale",
        T,
        "worker-offline",
    );
    assert_eq!(offline["kept"], json!([]), "{offline}");
}

#[test]
fn a_kept_task_whose_carry_cannot_be_read_is_forsaken_once_the_node_is_claimed() {
    let sv = Services::new("unreadable");
    let events = sv.events(60);
    let (a, broken) = (task_id(), task_id());
    let mut unreadable = kept_task(&broken, json!({"sleep": 60.0}), 10.0, None);
    unreadable.carry = json!({"version": 99});
    let runner = Keeping {
        tasks: vec![kept_task(&a, json!({"sleep": 6.0}), 10.0, None), unreadable],
        away: None,
        ..Default::default()
    };
    let seen = runner.seen.clone();
    let shutdown = zimfarm_worker::worker::Shutdown::new();
    let env = WorkerEnv::new().set("CONCURRENCY", 3);
    let worker = in_process(&sv, "unreadable", &env, runner, shutdown.clone());
    events.wait_for(
        |v| v["type"] == "worker-online" && v["hostname"] == "tester@unreadable",
        T,
        "worker-online",
    );
    // The adopted task holds one of the three slots from the first
    // prefetch on; the forsaken one holds none.
    let stats = broadcast(&sv.vh, "tester@unreadable", "stats", json!({}));
    assert_eq!(stats["prefetch_count"], json!(2), "{stats}");
    let active = broadcast(&sv.vh, "tester@unreadable", "active", json!({}));
    let time_start = active[0]["time_start"].as_f64().unwrap_or_default();
    let age = zimfarm_worker::celery::now_timestamp() - time_start;
    assert!(
        (10.0..40.0).contains(&age),
        "started at its first start: {active}"
    );
    events.wait_task_event("task-succeeded", &a, T);
    let stats = broadcast(&sv.vh, "tester@unreadable", "stats", json!({}));
    assert_eq!(stats["prefetch_count"], json!(3), "{stats}");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.claimed.as_ref(), Some(&vec![a.clone()]));
        assert_eq!(seen.forsaken, vec![broken.clone()]);
        assert_eq!(seen.runs.len(), 1, "{seen:?}");
    }
    assert_eq!(
        events.count("task-failed", &broken),
        0,
        "nothing is sent for it"
    );
    shutdown.stop_for_good();
    worker.join().expect("the worker thread").expect("exit 0");
}

#[test]
fn a_kept_task_that_already_ended_here_is_not_run_again() {
    let sv = Services::new("keptended");
    let events = sv.events(60);
    let (done, fresh) = (task_id(), task_id());
    // The earlier run recorded the end, then died before letting go.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let ended = zimfarm_worker::ended::EndedLog::open(sv.dir.path())
            .await
            .expect("the record of ended tasks");
        let event = zimfarm_worker::celery::EventKind::TaskSucceeded {
            uuid: done.clone(),
            result: "[]".to_owned(),
            runtime: 12.0,
        };
        ended.record(&done, &event).await.expect("recorded");
    });
    let runner = Keeping {
        tasks: vec![
            kept_task(&done, json!({"sleep": 30.0}), 20.0, None),
            kept_task(&fresh, json!({"sleep": 1.0}), 20.0, None),
        ],
        away: None,
        ..Default::default()
    };
    let seen = runner.seen.clone();
    let shutdown = zimfarm_worker::worker::Shutdown::new();
    let worker = in_process(
        &sv,
        "keptended",
        &WorkerEnv::new(),
        runner,
        shutdown.clone(),
    );
    events.wait_task_event("task-succeeded", &fresh, T);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen.claimed.as_ref(),
            Some(&vec![fresh.clone()]),
            "{seen:?}"
        );
        let ran: Vec<&str> = seen.runs.iter().map(|(id, _, _)| id.as_str()).collect();
        assert_eq!(ran, [fresh.as_str()], "{seen:?}");
    }
    assert_eq!(events.count("task-succeeded", &done), 0, "no second end");
    shutdown.stop_for_good();
    worker.join().expect("the worker thread").expect("exit 0");
}
