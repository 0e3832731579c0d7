//! Remote control (SPEC §6) with the real clients: the `celery` command
//! line (`inspect`, `control`, `status`, `events`), `app.control` from
//! Python, and Flower 2, against the worker binary and a real RabbitMQ.

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::flower::Flower;
use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

fn kwargs(simulate: Value) -> Value {
    json!({
        "flags": {"mwUrl": "https://en.wikipedia.org", "adminEmail": "a@b.c"},
        "image": {"name": "openzim/mwoffliner", "tag": "1.9"},
        "warehouse_path": "/wikipedia",
        "simulate": simulate,
    })
}

/// Runs the `celery` command line of the test venv against the vhost.
fn celery_cli(vh: &Vhost, args: &[&str]) -> Output {
    Command::new(python())
        .args(["-m", "celery", "-b", &vh.url()])
        .args(args)
        .output()
        .expect("python runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `celery inspect <method> -j -d <node>`: the node's reply.
fn inspect(vh: &Vhost, node: &str, method: &str) -> Value {
    let out = celery_cli(vh, &["inspect", method, "-j", "-d", node, "-t", "5"]);
    assert!(
        out.status.success(),
        "celery inspect {method} failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let all: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "inspect {method} -j is not JSON ({e}): {}",
            text(&out.stdout)
        )
    });
    all[node].clone()
}

/// Sends a task to `routing_key` on the `offliner` exchange.
fn send_to(vh: &Vhost, id: &str, routing_key: &str, simulate: Value) {
    Task::new("offliner.mwoffliner", kwargs(simulate))
        .with_id(id)
        .routed_to(routing_key)
        .send(vh);
}

fn no_drift_warning(events: &EventsProc) {
    let warnings: Vec<Value> = events
        .events()
        .into_iter()
        .filter(|v| v.get("warning").is_some())
        .collect();
    assert!(
        !warnings.iter().any(|w| w.to_string().contains("drift")),
        "clock drift warnings: {warnings:?}"
    );
}

#[test]
fn celery_inspect_ping_status_and_the_listings_answer() {
    let s = Stack::start("inspect", WorkerEnv::new().set("CONCURRENCY", "1")).within(T);
    let node = "tester@inspect";

    let out = celery_cli(&s.vh, &["inspect", "ping", "-d", node]);
    assert!(
        out.status.success(),
        "inspect ping: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("pong"), "{}", text(&out.stdout));

    let out = celery_cli(&s.vh, &["status"]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "status: {stdout}{}",
        text(&out.stderr)
    );
    assert!(stdout.contains(&format!("{node}: OK")), "{stdout}");
    assert!(stdout.contains("1 node online"), "{stdout}");

    // One task held for its eta (it takes no slot), one running. (With one
    // message prefetched per free slot, no task waits here for a slot.)
    let running = task_id();
    let later = Task::new("offliner.youtube", kwargs(Value::Null))
        .options(&["--countdown", "600"])
        .send(&s.vh);
    s.expect_event("task-received", &later);
    send_to(&s.vh, &running, "small", json!({"sleep": 30}));
    s.expect_event("task-started", &running);

    let active = inspect(&s.vh, node, "active");
    assert_eq!(active.as_array().map(Vec::len), Some(1), "{active}");
    let request = &active[0];
    assert_eq!(request["id"], running.as_str());
    assert_eq!(request["name"], "offliner.mwoffliner");
    assert_eq!(request["type"], "offliner.mwoffliner");
    assert_eq!(request["hostname"], node);
    assert_eq!(request["acknowledged"], false);
    assert_eq!(request["kwargs"]["warehouse_path"], "/wikipedia");
    assert!(request["time_start"].as_f64().is_some(), "{request}");
    assert!(request["worker_pid"].as_u64().is_some(), "{request}");
    assert_eq!(
        request["delivery_info"],
        json!({"exchange": "offliner", "routing_key": "small", "priority": 0, "redelivered": false})
    );

    assert_eq!(inspect(&s.vh, node, "reserved"), json!([]));
    let scheduled = inspect(&s.vh, node, "scheduled");
    assert_eq!(scheduled[0]["request"]["id"], later.as_str(), "{scheduled}");
    assert_eq!(scheduled[0]["priority"], 6);
    assert!(scheduled[0]["eta"].as_str().is_some(), "{scheduled}");
    assert_eq!(scheduled[0]["request"]["time_start"], Value::Null);
    assert_eq!(scheduled[0]["request"]["worker_pid"], Value::Null);

    let stats = inspect(&s.vh, node, "stats");
    assert_eq!(stats["total"], json!({"offliner.mwoffliner": 1}), "{stats}");
    assert_eq!(stats["pid"], s.worker.child.id());
    assert_eq!(stats["pool"]["max-concurrency"], 1);
    assert_eq!(stats["broker"]["virtual_host"], s.vh.name.as_str());
    assert_eq!(stats["broker"]["userid"], "zimfarm-test");
    assert_eq!(stats["broker"]["transport"], "amqp");
    assert!(stats["prefetch_count"].as_u64().is_some(), "{stats}");
    assert!(stats["uptime"].as_u64().is_some(), "{stats}");
    assert!(
        stats["rusage"]["maxrss"].as_u64().unwrap_or(0) > 0,
        "{stats}"
    );
    assert!(!stats.to_string().contains("zimfarm-test@"), "{stats}");

    let registered = inspect(&s.vh, node, "registered");
    assert_eq!(
        registered,
        json!([
            "offliner.gutenberg",
            "offliner.mwoffliner",
            "offliner.phet",
            "offliner.youtube"
        ])
    );
    let queues = inspect(&s.vh, node, "active_queues");
    assert_eq!(
        queues,
        json!([{
            "name": "small",
            "exchange": {"name": "offliner", "type": "topic", "arguments": null, "durable": true,
                         "passive": false, "auto_delete": false, "delivery_mode": null,
                         "no_declare": false},
            "routing_key": "small", "queue_arguments": null, "binding_arguments": null,
            "consumer_arguments": null, "durable": true, "exclusive": false,
            "auto_delete": false, "no_ack": false, "alias": null, "bindings": [],
            "no_declare": null, "expires": null, "message_ttl": null, "max_length": null,
            "max_length_bytes": null, "max_priority": null,
        }])
    );
    assert_eq!(inspect(&s.vh, node, "revoked"), json!([]));
    let conf = inspect(&s.vh, node, "conf");
    assert_eq!(conf["task_acks_late"], true, "{conf}");
    assert!(
        !conf.to_string().contains("zimfarm-test@"),
        "no password in conf: {conf}"
    );

    // The pidbox queue is Celery's: exclusive, auto-delete, with its TTLs.
    let pidbox = rabbit_api_call(
        "GET",
        &format!("/queues/{}/{node}.celery.pidbox", s.vh.name),
        None,
    );
    assert_eq!(pidbox["exclusive"], true, "{pidbox}");
    assert_eq!(pidbox["auto_delete"], true, "{pidbox}");
    assert_eq!(pidbox["durable"], false, "{pidbox}");
    assert_eq!(
        pidbox["arguments"],
        json!({"x-expires": 10000, "x-message-ttl": 300000})
    );
    no_drift_warning(&s.events);
}

#[test]
fn revoke_terminate_kills_a_running_task_within_seconds() {
    let s = Stack::start("revokerun", WorkerEnv::new()).within(T);
    let id = task_id();
    send_to(&s.vh, &id, "small", json!({"sleep": 120}));
    s.expect_event("task-started", &id);
    let start = Instant::now();
    let out = s.revoke(&id, &["--terminate", "--signal", "SIGKILL", "--reply"]);
    let replies = last_json_line(&out.stdout);
    assert_eq!(
        replies["replies"],
        json!([{"tester@revokerun": {"ok": format!("terminate: {id}")}}])
    );
    let revoked = s
        .events
        .wait_task_event("task-revoked", &id, Duration::from_secs(10));
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(revoked["terminated"], true, "{revoked}");
    assert_eq!(revoked["signum"], 9, "{revoked}");
    assert_eq!(revoked["expired"], false, "{revoked}");
    s.expect_queue(0, 0);
    assert_eq!(s.count("task-succeeded", &id), 0);
    assert_eq!(s.count("task-failed", &id), 0);
    // Remembered: `inspect revoked` lists it.
    let listed = inspect(&s.vh, "tester@revokerun", "revoked");
    assert_eq!(listed, json!([id]));
}

#[test]
fn revoked_before_it_is_sent_the_task_never_runs() {
    let s = Stack::start("revokefirst", WorkerEnv::new().set("CONCURRENCY", "1")).within(T);
    let early = task_id();
    celery_client(&s.vh, &["revoke", "--task-id", &early]);
    // The cast has no reply: wait until the worker has it.
    eventually(
        T,
        Duration::from_millis(100),
        || inspect(&s.vh, "tester@revokefirst", "revoked") == json!([early]),
        || "the revoke never arrived".to_owned(),
    );
    send_to(&s.vh, &early, "small", Value::Null);
    let revoked = s.expect_event("task-revoked", &early);
    assert_eq!(revoked["terminated"], false, "{revoked}");
    assert_eq!(revoked["expired"], false, "{revoked}");
    s.expect_queue(0, 0);

    // Held here for its eta when revoked (without terminate): it never
    // starts; the running task, revoked too, goes on (as in Celery, only
    // `terminate` stops a running task).
    let running = task_id();
    let waiting = Task::new("offliner.mwoffliner", kwargs(Value::Null))
        .options(&["--countdown", "600"])
        .send(&s.vh);
    s.expect_event("task-received", &waiting);
    send_to(&s.vh, &running, "small", json!({"sleep": 2}));
    s.expect_event("task-started", &running);
    let reply = broadcast(
        &s.vh,
        "tester@revokefirst",
        "revoke",
        json!({"task_id": [waiting.clone(), running.clone()]}),
    );
    let message = reply["ok"].as_str().unwrap_or_default().to_owned();
    assert!(message.ends_with("flagged as revoked"), "{reply}");
    assert!(message.contains(&format!("'{waiting}'")), "{reply}");
    let revoked = s.expect_event("task-revoked", &waiting);
    assert_eq!(revoked["terminated"], false, "{revoked}");
    s.expect_event("task-succeeded", &running);
    s.expect_queue(0, 0);
    for id in [&early, &waiting] {
        assert_eq!(s.count("task-started", id), 0, "{id} never started");
    }
    assert_eq!(s.count("task-received", &early), 0);
    no_drift_warning(&s.events);
}

#[test]
fn unknown_and_malformed_control_messages_do_no_harm() {
    let s = Stack::start("badctl", WorkerEnv::new()).within(T);
    let node = "tester@badctl";
    assert_eq!(
        broadcast(&s.vh, node, "no_such_command", json!({})),
        json!({"error": "KeyError('no_such_command')"})
    );
    for body in [&b"\xff\xfe not json"[..], b"[1, 2]", b"{\"method\": 7}"] {
        publish_pidbox(&s.vh, s.dir(), body);
    }
    assert_eq!(
        broadcast(&s.vh, node, "ping", json!({})),
        json!({"ok": "pong"})
    );
    // Not for this node: no reply.
    let out = celery_client(
        &s.vh,
        &[
            "control",
            "--method",
            "ping",
            "--destination",
            "someone@else",
            "--timeout",
            "1",
        ],
    );
    assert_eq!(last_json_line(&out.stdout), json!({"replies": []}));
    s.worker
        .wait_log("ignoring a malformed remote-control message", T);

    // A reply to an exchange the broker refuses to redeclare (the durable
    // topic `offliner`) closes the control channel: it is reopened, and the
    // task channel never notices.
    let request = json!({
        "method": "ping", "arguments": {}, "destination": null, "ticket": "t-1",
        "reply_to": {"exchange": "offliner", "routing_key": "nobody"},
    });
    publish_pidbox(&s.vh, s.dir(), request.to_string());
    s.worker.wait_log("remote-control channel reopened", T);
    assert_eq!(
        broadcast(&s.vh, node, "ping", json!({})),
        json!({"ok": "pong"})
    );
    let id = task_id();
    send_to(&s.vh, &id, "small", Value::Null);
    s.expect_event("task-succeeded", &id);
    s.worker.assert_log_lacks("reconnecting");
}

#[test]
fn remote_control_comes_back_after_the_connection_is_lost() {
    let s = Stack::start("ctlreconnect", WorkerEnv::new()).within(T);
    let node = "tester@ctlreconnect";
    assert_eq!(
        broadcast(&s.vh, node, "ping", json!({})),
        json!({"ok": "pong"})
    );
    s.vh.close_all_connections();
    eventually(
        T,
        Duration::from_millis(100),
        || s.worker.log_text().matches("consuming").count() >= 2,
        || format!("no reconnection: {}", s.worker.log_text()),
    );
    // The event receiver reconnects by itself; the worker's pidbox queue
    // is its own again.
    assert_eq!(
        broadcast(&s.vh, node, "ping", json!({})),
        json!({"ok": "pong"})
    );
    let id = task_id();
    send_to(&s.vh, &id, "small", Value::Null);
    s.expect_event("task-succeeded", &id);
}

#[test]
fn add_consumer_and_cancel_consumer_change_what_is_consumed() {
    let s = Stack::start("queues", WorkerEnv::new()).within(T);
    let node = "tester@queues";

    let out = celery_cli(&s.vh, &["control", "add_consumer", "medium", "-d", node]);
    assert!(
        out.status.success(),
        "add_consumer: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("add consumer medium"),
        "{}",
        text(&out.stdout)
    );
    let names = |queues: &Value| -> Vec<String> {
        queues
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|q| q["name"].as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(
        names(&inspect(&s.vh, node, "active_queues")),
        ["small", "medium"]
    );
    let id = task_id();
    send_to(&s.vh, &id, "medium", Value::Null);
    let done = s.expect_event("task-succeeded", &id);
    assert_eq!(done["hostname"], node);
    s.vh.wait_queue_depth("medium", 0, 0, T);

    // A queue of another name is refused under CONTROL_POLICY=node, even
    // addressed (see `control_policy_celery_restores_celery_rules`).
    let reply = broadcast(&s.vh, node, "add_consumer", json!({"queue": "zimit"}));
    assert!(refused(&reply, "only the queues"), "{reply}");

    let out = celery_cli(&s.vh, &["control", "cancel_consumer", "medium", "-d", node]);
    assert!(
        text(&out.stdout).contains("no longer consuming from medium"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(names(&inspect(&s.vh, node, "active_queues")), ["small"]);
    let parked = task_id();
    send_to(&s.vh, &parked, "medium", Value::Null);
    s.vh.wait_queue_depth("medium", 1, 0, T);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(s.count("task-received", &parked), 0);

    // Every queue cancelled: nothing consumed, the worker stays up; adding
    // one back resumes.
    broadcast(&s.vh, node, "cancel_consumer", json!({"queue": "small"}));
    assert_eq!(inspect(&s.vh, node, "active_queues"), json!([]));
    let small = task_id();
    send_to(&s.vh, &small, "small", Value::Null);
    s.expect_queue(1, 0);
    broadcast(&s.vh, node, "add_consumer", json!({"queue": "small"}));
    s.expect_event("task-succeeded", &small);
    s.worker.assert_log_lacks("reconnecting");
}

/// Whether a control reply is the policy's refusal, naming `what`.
fn refused(reply: &Value, what: &str) -> bool {
    reply["error"]
        .as_str()
        .is_some_and(|e| e.contains("refused") && e.contains(what))
}

/// `app.control.broadcast(method, arguments, reply=True)` with no
/// destination, as anyone on the broker can send it: `node`'s reply.
fn broadcast_to_all(vh: &Vhost, node: &str, method: &str, arguments: Value) -> Value {
    let arguments = arguments.to_string();
    let out = celery_client(
        vh,
        &["control", "--method", method, "--arguments", &arguments],
    );
    let replies = last_json_line(&out.stdout);
    replies["replies"]
        .as_array()
        .and_then(|r| r.iter().find_map(|reply| reply.get(node).cloned()))
        .unwrap_or_else(|| panic!("no reply from {node} to {method}: {replies}"))
}

/// The vhost's queues and their bindings, from the management API:
/// `(queue, exchange, routing key)`, sorted; the pidbox and event queues,
/// and the server-named ones (a worker's task-channel watch), left out
/// (they come and go with clients).
fn task_bindings(vh: &Vhost) -> Vec<(String, String, String)> {
    let bindings = rabbit_api_call("GET", &format!("/bindings/{}", vh.name), None);
    let mut out: Vec<(String, String, String)> = bindings
        .as_array()
        .expect("bindings are a list")
        .iter()
        .filter(|b| b["destination_type"] == "queue")
        .map(|b| {
            let field = |f: &str| b[f].as_str().unwrap_or_default().to_owned();
            (field("destination"), field("source"), field("routing_key"))
        })
        .filter(|(queue, _, _)| !client_queue(queue))
        .collect();
    out.sort();
    out
}

fn queue_names(vh: &Vhost) -> Vec<String> {
    let queues = rabbit_api_call("GET", &format!("/queues/{}", vh.name), None);
    let mut names: Vec<String> = queues
        .as_array()
        .expect("queues are a list")
        .iter()
        .filter_map(|q| q["name"].as_str().map(str::to_owned))
        .filter(|name| !client_queue(name))
        .collect();
    names.sort();
    names
}

/// A queue that comes and goes with a client: a pidbox, an event
/// receiver's (a worker's task-channel watch is named like one).
fn client_queue(name: &str) -> bool {
    name.contains("pidbox") || name.starts_with("celeryev")
}

#[test]
fn broadcasts_that_stop_or_reroute_every_node_are_refused() {
    let s = Stack::start("ctlpolicy", WorkerEnv::new()).within(T);
    let node = "tester@ctlpolicy";
    let (queues, bindings) = (queue_names(&s.vh), task_bindings(&s.vh));
    assert_eq!(queues, ["small"]);
    assert!(
        bindings.contains(&("small".into(), "offliner".into(), "small".into())),
        "{bindings:?}"
    );

    let everything = json!({"queue": "everything", "exchange": "offliner",
                            "exchange_type": "topic", "routing_key": "#"});
    let shutdown = broadcast_to_all(&s.vh, node, "shutdown", json!({}));
    assert!(refused(&shutdown, "destination"), "{shutdown}");
    let add = broadcast_to_all(&s.vh, node, "add_consumer", everything.clone());
    assert!(refused(&add, "destination"), "{add}");
    let cancel = broadcast_to_all(&s.vh, node, "cancel_consumer", json!({"queue": "small"}));
    assert!(refused(&cancel, "destination"), "{cancel}");
    // Addressed by name, the catch-all binding is still refused.
    let add = broadcast(&s.vh, node, "add_consumer", everything);
    assert!(refused(&add, "only the queues"), "{add}");

    // The node is alive and consumes as before; nothing new on the broker.
    assert_eq!(
        broadcast_to_all(&s.vh, node, "ping", json!({})),
        json!({"ok": "pong"})
    );
    assert_eq!(
        inspect(&s.vh, node, "active_queues")[0]["name"],
        "small",
        "still consuming small"
    );
    assert_eq!(queue_names(&s.vh), queues);
    assert_eq!(task_bindings(&s.vh), bindings);
    let id = task_id();
    send_to(&s.vh, &id, "small", Value::Null);
    s.expect_event("task-succeeded", &id);
    let log = s.worker.log_text();
    assert_eq!(
        log.matches("remote-control request refused").count(),
        4,
        "one warning per refusal: {log}"
    );

    // Addressed by name, they act.
    let add = broadcast(&s.vh, node, "add_consumer", json!({"queue": "medium"}));
    assert_eq!(add, json!({"ok": "add consumer medium"}));
    let now = queue_names(&s.vh);
    // (`celery`: the Python client declared its default queue to send.)
    assert!(now.contains(&"medium".to_owned()), "{now:?}");
    assert!(!now.contains(&"everything".to_owned()), "{now:?}");
    let cancel = broadcast(&s.vh, node, "cancel_consumer", json!({"queue": "small"}));
    assert_eq!(cancel, json!({"ok": "no longer consuming from small"}));
    assert_eq!(inspect(&s.vh, node, "active_queues")[0]["name"], "medium");
}

#[test]
fn control_policy_celery_restores_celery_rules() {
    let mut s = Stack::start(
        "ctlcelery",
        WorkerEnv::new().set("CONTROL_POLICY", "celery"),
    )
    .within(T);
    let node = "tester@ctlcelery";
    let everything = json!({"queue": "everything", "exchange": "offliner",
                            "exchange_type": "topic", "routing_key": "#"});
    let add = broadcast_to_all(&s.vh, node, "add_consumer", everything);
    assert_eq!(add, json!({"ok": "add consumer everything"}));
    assert!(
        task_bindings(&s.vh).contains(&("everything".into(), "offliner".into(), "#".into())),
        "{:?}",
        task_bindings(&s.vh)
    );
    // A queue of another name: its own direct exchange, as Celery does.
    let reply = broadcast_to_all(&s.vh, node, "add_consumer", json!({"queue": "zimit"}));
    assert_eq!(reply, json!({"ok": "add consumer zimit"}));
    let queues = inspect(&s.vh, node, "active_queues");
    assert_eq!(queues[2]["exchange"]["name"], "zimit", "{queues}");
    assert_eq!(queues[2]["exchange"]["type"], "direct", "{queues}");
    let cancel = broadcast_to_all(&s.vh, node, "cancel_consumer", json!({"queue": "zimit"}));
    assert_eq!(cancel, json!({"ok": "no longer consuming from zimit"}));

    let shutdown = broadcast_to_all(&s.vh, node, "shutdown", json!({}));
    assert_eq!(shutdown, json!({"ok": "shutting down"}));
    let status = s.worker.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn a_bad_control_policy_stops_the_worker_with_one_line() {
    let sv = Services::new("ctlbad");
    let mut worker = sv.spawn(
        "ctlbad",
        &WorkerEnv::new().set("CONTROL_POLICY", "everyone"),
    );
    let log = worker.expect_exit_2(T);
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("CONTROL_POLICY"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].contains("\"everyone\"") && lines[0].contains("use node"),
        "{log}"
    );
    assert!(!log.contains("consuming"), "{log}");
}

/// Publishes a pidbox request with AMQP `headers`, as any broker user can.
fn publish_pidbox_with(vh: &Vhost, dir: &std::path::Path, body: &Value, headers: &Value) {
    let headers = headers.to_string();
    publish_raw_to(
        vh,
        dir,
        "celery.pidbox",
        "",
        body.to_string(),
        &["--headers", &headers],
    );
}

#[test]
fn forged_clocks_and_newlines_in_pidbox_requests_do_no_harm() {
    let s = Stack::start("ctlforge", WorkerEnv::new()).within(T);
    let node = "tester@ctlforge";
    // The largest clock an AMQP header carries (signed 64 bits): merged as
    // Celery merges, it would pin the clock near its maximum.
    let ping = json!({"method": "ping", "arguments": {}, "destination": null});
    publish_pidbox_with(&s.vh, s.dir(), &ping, &json!({"clock": i64::MAX}));
    let forged = "2026-01-01T00:00:00.000000Z  INFO zimfarm_worker::worker::task: forged";
    let method = format!("nope\n{forged}");
    let body = json!({"method": method, "arguments": {}, "destination": [node]});
    publish_pidbox_with(&s.vh, s.dir(), &body, &json!({"clock": 3}));
    s.worker.wait_log("unknown remote-control command", T);

    let clock = broadcast(&s.vh, node, "clock", json!({}))["clock"]
        .as_u64()
        .expect("a clock");
    assert!(
        clock < 1 << 32,
        "the clock followed a forged header: {clock}"
    );
    let log = s.worker.log_text();
    assert!(
        !log.lines().any(|line| line.starts_with(forged)),
        "a forged log line: {log}"
    );
    assert!(
        log.contains("nope\\n2026-01-01"),
        "the newline is escaped: {log}"
    );
    // Events still carry a moving clock.
    let id = task_id();
    send_to(&s.vh, &id, "small", Value::Null);
    let done = s.expect_event("task-succeeded", &id);
    assert!(
        done["clock"]
            .as_u64()
            .is_some_and(|c| c > clock && c < 1 << 32),
        "{done}"
    );
}

#[test]
fn disable_events_and_enable_events_toggle_task_events() {
    let s = Stack::start("evtoggle", WorkerEnv::new()).within(T);
    let node = "tester@evtoggle";
    let out = celery_cli(&s.vh, &["control", "disable_events", "-d", node]);
    assert!(
        text(&out.stdout).contains("task events disabled"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let quiet = task_id();
    send_to(&s.vh, &quiet, "small", Value::Null);
    // The final event still goes: the dispatcher depends on it.
    s.expect_event("task-succeeded", &quiet);
    assert_eq!(s.count("task-received", &quiet), 0);
    assert_eq!(s.count("task-started", &quiet), 0);

    let out = celery_cli(&s.vh, &["control", "enable_events", "-d", node]);
    assert!(
        text(&out.stdout).contains("task events enabled"),
        "{}",
        text(&out.stdout)
    );
    let loud = task_id();
    send_to(&s.vh, &loud, "small", Value::Null);
    s.expect_event("task-succeeded", &loud);
    assert_eq!(s.count("task-received", &loud), 1);
    assert_eq!(s.count("task-started", &loud), 1);

    // `heartbeat`: Celery replies None and sends a worker-heartbeat.
    let asked = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    let reply = broadcast(&s.vh, node, "heartbeat", json!({}));
    assert_eq!(reply, Value::Null);
    s.events.wait_for(
        |v| {
            v["type"] == "worker-heartbeat"
                && v["local_received"].as_f64().is_some_and(|t| t >= asked)
        },
        Duration::from_secs(5),
        "a heartbeat",
    );
}

#[test]
fn shutdown_by_remote_control_stops_the_worker_with_exit_0() {
    let mut s = Stack::start("remoteshut", WorkerEnv::new()).within(T);
    let out = celery_cli(&s.vh, &["control", "shutdown", "-d", "tester@remoteshut"]);
    assert!(
        text(&out.stdout).contains("shutting down"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let status = s.worker.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit status {status:?}");
    s.events.wait_for(
        |v| v["type"] == "worker-offline" && v["hostname"] == "tester@remoteshut",
        T,
        "worker-offline",
    );
}

#[test]
fn a_second_worker_with_the_same_node_name_exits_with_a_clear_error() {
    let s = Stack::start("dup", WorkerEnv::new()).within(T);
    let other_dir = tempfile::tempdir().expect("temp dir");
    let mut second = WorkerProc::start(&s.vh, other_dir.path(), "dup", &WorkerEnv::new());
    let status = second.wait_exit(Duration::from_secs(20));
    assert_eq!(
        status.code(),
        Some(2),
        "the second worker must fail: {status:?}"
    );
    let log = second.log_text();
    assert!(
        log.contains("another worker named tester@dup is already connected"),
        "{log}"
    );
    assert!(!log.contains("consuming"), "it never consumed: {log}");

    // The first one goes on, remote control included.
    let id = task_id();
    send_to(&s.vh, &id, "small", Value::Null);
    s.expect_event("task-succeeded", &id);
    assert_eq!(
        broadcast(&s.vh, "tester@dup", "ping", json!({})),
        json!({"ok": "pong"})
    );
    assert!(!s.worker.log_text().contains("reconnecting"));
}

#[test]
fn celery_events_dump_shows_worker_and_task_events() {
    let s = Stack::start("dump", WorkerEnv::new()).within(T);
    let mut dump = Command::new(python())
        .args(["-m", "celery", "-b", &s.vh.url(), "events", "--dump"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("celery events runs");
    // Its queue is bound once it runs (the stack's receiver has the other
    // `celeryev.*` queue); then a task and a few heartbeats.
    eventually(
        T,
        Duration::from_millis(100),
        || event_queues(&s.vh) >= 2,
        || "celery events never bound its queue".to_owned(),
    );
    let id = task_id();
    send_to(&s.vh, &id, "small", json!({"sleep": 0.5}));
    let done = s.expect_event("task-succeeded", &id);
    // Two heartbeats after the task: the dump has had the first for 2 s.
    let after = done["timestamp"].as_f64().unwrap_or_default();
    s.events
        .wait_until("two heartbeats after the task", T, |all| {
            all.iter()
                .filter(|v| v["type"] == "worker-heartbeat")
                .filter(|v| v["timestamp"].as_f64().is_some_and(|t| t > after))
                .count()
                >= 2
        });
    let _ = Command::new("kill")
        .args(["-INT", &dump.id().to_string()])
        .status();
    let out = wait_output(&mut dump, Duration::from_secs(10));
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(stdout.contains("tester@dump"), "{stdout}\n{stderr}");
    assert!(stdout.contains("heartbeat"), "{stdout}");
    for event in ["received", "started", "succeeded"] {
        assert!(
            stdout.contains(&format!("task {event}")) && stdout.contains(&id),
            "task {event}: {stdout}"
        );
    }
    assert!(
        !stdout.contains("drift") && !stderr.contains("drift"),
        "{stdout}\n{stderr}"
    );
}

/// The queues of the vhost that take every event (bound to `celeryev` with
/// `#`): one per event receiver. The worker's own `celeryev.*` queues (its
/// view of the farm, bound to worker events only, and its task channel's
/// watch, bound to nothing) are not receivers.
fn event_queues(vh: &Vhost) -> usize {
    let bindings = rabbit_api_call("GET", &format!("/bindings/{}", vh.name), None);
    bindings.as_array().map_or(0, |bs| {
        bs.iter()
            .filter(|b| b["source"] == "celeryev" && b["routing_key"] == "#")
            .count()
    })
}

fn wait_output(child: &mut Child, timeout: Duration) -> Output {
    let start = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if start.elapsed() > timeout {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut out = Output {
        status: child.wait().expect("wait"),
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    use std::io::Read;
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_end(&mut out.stdout);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_end(&mut out.stderr);
    }
    out
}

#[test]
fn flower_shows_the_worker_its_queues_and_tasks() {
    let s = Stack::start("flower", WorkerEnv::new()).within(T);
    let node = "tester@flower";
    let flower = Flower::start(&s.vh, s.dir(), T);

    // Online, from the events (Flower's own receiver wakes the worker up
    // with a `heartbeat` broadcast).
    flower.wait_json(
        "/api/workers?status=true",
        |v| v[node] == true,
        "worker online",
    );
    // Inspected: Flower's worker record holds every inspect reply.
    let workers = flower.wait_json(
        &format!("/api/workers?refresh=true&workername={node}"),
        |v| v[node]["stats"]["broker"].is_object() && v[node]["active_queues"].is_array(),
        "worker inspected",
    );
    let worker = &workers[node];
    assert_eq!(worker["active_queues"][0]["name"], "small", "{worker}");
    assert_eq!(
        worker["registered"].as_array().map(Vec::len),
        Some(4),
        "{worker}"
    );
    assert!(worker["stats"]["total"].is_object(), "{worker}");
    assert!(
        worker["stats"]["pool"]["max-concurrency"].is_number(),
        "{worker}"
    );
    for method in ["conf", "active", "reserved", "scheduled", "revoked"] {
        assert!(worker.get(method).is_some(), "{method} in {worker}");
    }
    assert!(
        !flower.log_text().contains("failed"),
        "flower log: {}",
        flower.log_text()
    );

    let (code, page) = flower.get(&format!("/worker/{node}"));
    assert_eq!(code, 200, "{page}\n{}", flower.log_text());
    assert!(page.contains(node), "{page}");
    assert!(
        page.contains("<td>small</td>"),
        "queues tab lists small: {page}"
    );
    assert!(page.contains("offliner.mwoffliner"), "{page}");
    let (code, page) = flower.get("/workers");
    assert_eq!(code, 200, "{page}");

    let id = task_id();
    send_to(&s.vh, &id, "small", json!({"sleep": 0.3}));
    s.expect_event("task-succeeded", &id);
    let tasks = flower.wait_json(
        "/api/tasks",
        |v| v[&id]["state"] == "SUCCESS",
        "task succeeded in flower",
    );
    assert_eq!(tasks[&id]["name"], "offliner.mwoffliner", "{tasks}");
    assert_eq!(tasks[&id]["worker"], node, "{tasks}");
    let (code, page) = flower.get(&format!("/task/{id}"));
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("SUCCESS"), "{page}");

    // Flower's revoke button (its API): terminate a running task.
    let long = task_id();
    send_to(&s.vh, &long, "small", json!({"sleep": 120}));
    s.expect_event("task-started", &long);
    let (code, body) = flower.request(
        "POST",
        &format!("/api/task/revoke/{long}?terminate=true&signal=SIGKILL"),
    );
    assert_eq!(code, 200, "{body}");
    let revoked = s
        .events
        .wait_task_event("task-revoked", &long, Duration::from_secs(10));
    assert_eq!(revoked["terminated"], true, "{revoked}");
    assert_eq!(revoked["signum"], 9, "{revoked}");
    // Celery's State ranks any custom state (PROGRESS, from the task's
    // task-progress events) above REVOKED, so Flower may keep showing
    // PROGRESS for a task revoked while it ran: its revoke time is what
    // Flower sets whatever the state (README, Seeing a task live).
    let revoked = flower.wait_json(
        "/api/tasks",
        |v| v[&long]["revoked"].is_number(),
        "task revoked in flower",
    );
    let state = &revoked[&long]["state"];
    assert!(state == "REVOKED" || state == "PROGRESS", "{revoked}");
    no_drift_warning(&s.events);
}
