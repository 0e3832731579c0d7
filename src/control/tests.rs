use std::ffi::OsString;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use lapin::BasicProperties;

use super::actions::python_set;
use super::command::signum;
use super::inspect::{request_info, rusage};
use super::*;
use crate::broker::Outbox;
use crate::celery::Identity;
use crate::celery::control::DeliveryInfo;
use crate::worker::registry::RevokedSet;

/// A worker stand-in that records what remote control asked of it.
struct Fake {
    config: Config,
    events: EventSink,
    outbox: Arc<Outbox>,
    tasks: Vec<TaskSnapshot>,
    /// What remote control changed, behind one lock as in the worker.
    state: Mutex<FakeState>,
    heartbeats: AtomicUsize,
    shutdown: AtomicBool,
    /// How many times the record of ended tasks was asked.
    ended_calls: AtomicUsize,
}

#[derive(Default)]
struct FakeState {
    revoked: RevokedSet,
    revokes: Vec<(Vec<String>, Option<i32>)>,
    queues: Vec<TaskQueue>,
}

impl Fake {
    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }
}

fn fake(tasks: Vec<TaskSnapshot>) -> Fake {
    fake_with(tasks, ControlPolicy::Node)
}

fn fake_with(tasks: Vec<TaskSnapshot>, policy: ControlPolicy) -> Fake {
    let vars = [
        ("CONTROL_POLICY", policy.as_str()),
        ("USERNAME", "alice"),
        ("PASSWORD", "s3cr3t"),
        ("WORKING_DIR", "/srv/zim"),
        ("NODE_NAME", "node1"),
        ("QUEUES", "small"),
        ("CONCURRENCY", "3"),
        (
            "BROKER_URL",
            "amqps://alice:s3cr3t@broker.example:5671/zimfarm",
        ),
    ];
    let config = Config::from_vars(
        vars.iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v))),
    )
    .expect("valid config");
    let outbox = Outbox::new(100);
    let identity = Identity {
        hostname: config.hostname(),
        pid: 42,
        sw_ident: "zimfarm-worker".into(),
        sw_ver: "0.1.0".into(),
        sw_sys: "Linux".into(),
    };
    Fake {
        events: EventSink::new(identity, outbox.clone()),
        outbox,
        state: Mutex::new(FakeState {
            queues: vec![TaskQueue::zimfarm("small")],
            ..FakeState::default()
        }),
        config,
        tasks,
        heartbeats: AtomicUsize::new(0),
        shutdown: AtomicBool::new(false),
        ended_calls: AtomicUsize::new(0),
    }
}

impl ControlledWorker for Fake {
    fn config(&self) -> &Config {
        &self.config
    }
    fn events(&self) -> &EventSink {
        &self.events
    }
    fn facts(&self) -> WorkerFacts {
        WorkerFacts {
            pid: 42,
            uptime: Duration::from_millis(61_600),
            prefetch_count: 3,
            total: BTreeMap::from([("offliner.mwoffliner".to_owned(), 2)]),
            heartbeat: Some(60),
        }
    }
    fn tasks(&self) -> Vec<TaskSnapshot> {
        self.tasks.clone()
    }
    fn ended(&self, id: &str) -> bool {
        self.ended_calls.fetch_add(1, Ordering::Relaxed);
        id == "long-gone"
    }
    fn revoke(&self, ids: &[String], terminate: Option<i32>) -> Vec<String> {
        self.state().revokes.push((ids.to_vec(), terminate));
        self.merge_revoked(ids);
        ids.iter()
            .filter(|id| self.tasks.iter().any(|t| &t.request.id == *id))
            .cloned()
            .collect()
    }
    fn revoked(&self) -> Vec<String> {
        self.state().revoked.ids(Instant::now())
    }
    fn merge_revoked(&self, ids: &[String]) {
        let revoked = &mut self.state().revoked;
        for id in ids {
            revoked.insert(id, Instant::now());
        }
    }
    fn queues(&self) -> Vec<TaskQueue> {
        self.state().queues.clone()
    }
    async fn add_queue(&self, queue: TaskQueue) -> Result<bool, BrokerError> {
        let queues = &mut self.state().queues;
        if queues.iter().any(|q| q.name == queue.name) {
            return Ok(false);
        }
        queues.push(queue);
        Ok(true)
    }
    async fn cancel_queue(&self, name: &str) -> Result<bool, BrokerError> {
        let queues = &mut self.state().queues;
        let before = queues.len();
        queues.retain(|q| q.name != name);
        Ok(queues.len() != before)
    }
    fn heartbeat(&self) {
        self.heartbeats.fetch_add(1, Ordering::SeqCst);
    }
    fn shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
    }
    fn node_in_use(&self) {}
}

fn task(id: &str, phase: TaskPhase, time_start: Option<f64>) -> TaskSnapshot {
    task_with(id, phase, time_start, json!({"flags": {"id": "UC1"}}))
}

/// [`task`] with these `kwargs`.
fn task_with(id: &str, phase: TaskPhase, time_start: Option<f64>, kwargs: Value) -> TaskSnapshot {
    let text = json!({
        "task": "offliner.youtube", "id": id,
        "kwargs": kwargs, "eta": "2030-01-01T00:00:00+00:00",
    })
    .to_string();
    // A protocol 1 message: the whole request in the body.
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into());
    let request = crate::celery::decode(&properties, text.as_bytes()).expect("task message");
    TaskSnapshot {
        request: Arc::new(request),
        phase,
        time_start,
        delivery: DeliveryInfo {
            exchange: "offliner".into(),
            routing_key: "small".into(),
            priority: None,
            redelivered: false,
        },
        progress: None,
    }
}

fn args(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// Runs a command addressed to the fake's node by name.
async fn run(worker: &Fake, method: &str, arguments: Value) -> Value {
    let (reply, after) = dispatch(worker, method, &args(arguments), true).await;
    assert_eq!(after, After::Nothing, "{method}");
    reply
}

#[tokio::test]
async fn ping_and_unknown_commands() {
    let worker = fake(Vec::new());
    assert_eq!(run(&worker, "ping", json!({})).await, json!({"ok": "pong"}));
    assert_eq!(
        run(&worker, "no_such", json!({})).await,
        json!({"error": "KeyError('no_such')"})
    );
    assert_eq!(
        run(&worker, "autoscale", json!({"max": 3})).await,
        json!({"error": "ValueError('Autoscale not enabled')"})
    );
}

#[tokio::test]
async fn revoke_replies_as_celery() {
    let worker = fake(vec![task("run1", TaskPhase::Active, Some(1.0))]);
    assert_eq!(
        run(&worker, "revoke", json!({"task_id": "abc"})).await,
        json!({"ok": "tasks {'abc'} flagged as revoked"})
    );
    assert_eq!(
        run(&worker, "revoke", json!({"task_id": ["a1", "a2", "a1"]})).await,
        json!({"ok": "tasks {'a1', 'a2'} flagged as revoked"})
    );
    assert_eq!(
        run(
            &worker,
            "revoke",
            json!({"task_id": "zzz", "terminate": true, "signal": "SIGKILL"})
        )
        .await,
        json!({"ok": "terminate: tasks unknown"})
    );
    assert_eq!(
        run(
            &worker,
            "revoke",
            json!({"task_id": "run1", "terminate": true, "signal": "KILL"})
        )
        .await,
        json!({"ok": "terminate: run1"})
    );
    assert_eq!(
        run(
            &worker,
            "terminate",
            json!({"task_id": "run1", "signal": 2})
        )
        .await,
        json!({"ok": "terminate: run1"})
    );
    // Flower sends `terminate=1`.
    assert_eq!(
        run(
            &worker,
            "revoke",
            json!({"task_id": "run1", "terminate": 1, "signal": "SIGTERM"})
        )
        .await,
        json!({"ok": "terminate: run1"})
    );
    let revokes = worker.state().revokes.clone();
    let terminate: Vec<Option<i32>> = revokes.iter().map(|(_, t)| *t).collect();
    assert_eq!(terminate, [None, None, Some(9), Some(9), Some(2), Some(15)]);
    assert_eq!(
        run(&worker, "revoked", json!({})).await,
        json!(["abc", "a1", "a2", "zzz", "run1"])
    );
    // A bad signal changes nothing.
    assert_eq!(
        run(
            &worker,
            "revoke",
            json!({"task_id": "x", "terminate": true, "signal": "kill"})
        )
        .await,
        json!({"error": "TypeError('signal name must be uppercase string.')"})
    );
    assert_eq!(
        run(
            &worker,
            "revoke",
            json!({"task_id": "x", "terminate": true, "signal": "SIGNOPE"})
        )
        .await,
        json!({"error": "AttributeError(\"module 'signal' has no attribute 'SIGNOPE'\")"})
    );
    assert_eq!(worker.state().revokes.len(), 6);
    // Celery's default signal is SIGTERM.
    run(
        &worker,
        "revoke",
        json!({"task_id": "y", "terminate": "yes"}),
    )
    .await;
    assert_eq!(worker.state().revokes[6].1, Some(15));
    run(&worker, "revoke", json!({"task_id": "z", "terminate": 0})).await;
    assert_eq!(worker.state().revokes[7].1, None);
}

#[tokio::test]
async fn task_listings() {
    let worker = fake(vec![
        task("act", TaskPhase::Active, Some(1_700_000_000.5)),
        task("res", TaskPhase::Reserved, None),
        task("sch", TaskPhase::Scheduled, None),
        task("end", TaskPhase::Ending, Some(1.0)),
    ]);
    let active = run(&worker, "active", json!({})).await;
    assert_eq!(
        active,
        json!([{
            "id": "act", "name": "offliner.youtube", "args": [],
            "kwargs": {"flags": {"id": "UC1"}}, "type": "offliner.youtube",
            "hostname": "alice@node1", "time_start": 1_700_000_000.5,
            "acknowledged": false,
            "delivery_info": {"exchange": "offliner", "routing_key": "small",
                              "priority": null, "redelivered": false},
            "worker_pid": std::process::id(),
        }])
    );
    let safe = run(&worker, "active", json!({"safe": true})).await;
    assert_eq!(safe[0]["args"], "[]");
    assert_eq!(safe[0]["kwargs"], "{'flags': {'id': 'UC1'}}");
    let reserved = run(&worker, "reserved", json!({})).await;
    assert_eq!(reserved.as_array().map(Vec::len), Some(1));
    assert_eq!(reserved[0]["id"], "res");
    assert_eq!(reserved[0]["worker_pid"], Value::Null);
    let scheduled = run(&worker, "scheduled", json!({})).await;
    assert_eq!(scheduled[0]["eta"], "2030-01-01T00:00:00+00:00");
    assert_eq!(scheduled[0]["priority"], 6);
    assert_eq!(scheduled[0]["request"]["id"], "sch");
    assert_eq!(
        run(
            &worker,
            "query_task",
            json!({"ids": ["act", "end", "nope", "long-gone"]})
        )
        .await,
        json!({
            "act": ["active", to_value(&request_info(&worker.tasks[0], "alice@node1", std::process::id(), false))],
            "end": ["ready", to_value(&request_info(&worker.tasks[3], "alice@node1", std::process::id(), false))],
            "long-gone": ["ready", {"id": "long-gone", "hostname": "alice@node1"}],
        })
    );
    assert_eq!(
        run(&worker, "registered", json!({})).await,
        json!([
            "offliner.gutenberg",
            "offliner.mwoffliner",
            "offliner.phet",
            "offliner.youtube"
        ])
    );
}

#[tokio::test]
async fn stats_has_what_flower_reads() {
    let worker = fake(Vec::new());
    let stats = run(&worker, "stats", json!({})).await;
    assert_eq!(stats["total"], json!({"offliner.mwoffliner": 2}));
    assert_eq!(stats["pid"], 42);
    assert_eq!(stats["uptime"], 62);
    assert_eq!(stats["prefetch_count"], 3);
    assert_eq!(stats["pool"]["max-concurrency"], 3);
    assert_eq!(stats["pool"]["processes"], json!([42]));
    assert_eq!(
        stats["broker"],
        json!({
            "hostname": "broker.example", "userid": "alice", "virtual_host": "zimfarm",
            "port": 5671, "insist": false, "ssl": true, "transport": "amqp",
            "connect_timeout": 15, "transport_options": {}, "login_method": "PLAIN",
            "uri_prefix": null, "heartbeat": 60.0, "failover_strategy": "round-robin",
            "alternates": [], "credential_provider": null,
        })
    );
    assert!(
        stats["rusage"]["maxrss"].as_u64().unwrap_or(0) > 0,
        "{stats}"
    );
    assert!(stats["clock"].is_string());
    let text = stats.to_string();
    assert!(!text.contains("s3cr3t"), "no password in {text}");
    let conf = run(&worker, "conf", json!({})).await;
    assert_eq!(
        conf["broker_url"],
        "amqps://alice:********@broker.example:5671/zimfarm"
    );
    assert_eq!(conf["worker_concurrency"], 3);
    assert!(!conf.to_string().contains("s3cr3t"));
}

#[tokio::test]
async fn queues_come_and_go() {
    let worker = fake_with(Vec::new(), ControlPolicy::Celery);
    let queues = run(&worker, "active_queues", json!({})).await;
    assert_eq!(queues[0]["name"], "small");
    assert_eq!(queues[0]["exchange"]["name"], "offliner");
    assert_eq!(queues[0]["exchange"]["type"], "topic");
    assert_eq!(
        run(&worker, "add_consumer", json!({"queue": "medium"})).await,
        json!({"ok": "add consumer medium"})
    );
    run(&worker, "add_consumer", json!({"queue": "extra"})).await;
    assert_eq!(
        run(
            &worker,
            "add_consumer",
            json!({"queue": "bad", "exchange_type": "weird"})
        )
        .await,
        json!({"error": "exchange_type \"weird\" is not one of direct, topic, fanout, headers"})
    );
    assert_eq!(
        worker.queues(),
        [
            TaskQueue::zimfarm("small"),
            TaskQueue::zimfarm("medium"),
            TaskQueue {
                name: "extra".into(),
                exchange: "extra".into(),
                exchange_type: "direct".into(),
                routing_key: "extra".into(),
            }
        ]
    );
    assert_eq!(
        run(&worker, "cancel_consumer", json!({"queue": "small"})).await,
        json!({"ok": "no longer consuming from small"})
    );
    assert_eq!(worker.queues().len(), 2);
    let long = "x".repeat(256);
    for args in [
        json!({"queue": long}),
        json!({"queue": "q", "exchange": long}),
        json!({"queue": "q", "routing_key": long}),
    ] {
        let reply = run(&worker, "add_consumer", args).await;
        assert!(reply["error"].as_str().unwrap().contains("255"), "{reply}");
    }
    assert_eq!(worker.queues().len(), 2);
    assert_eq!(
        run(&worker, "add_consumer", json!({})).await["error"]
            .as_str()
            .map(|e| e.starts_with("TypeError(")),
        Some(true)
    );
}

#[tokio::test]
async fn events_heartbeat_hello_and_shutdown() {
    let worker = fake(Vec::new());
    assert_eq!(
        run(&worker, "enable_events", json!({})).await,
        json!({"ok": "task events already enabled"})
    );
    assert_eq!(
        run(&worker, "disable_events", json!({})).await,
        json!({"ok": "task events disabled"})
    );
    assert!(!worker.events.is_enabled());
    assert_eq!(
        run(&worker, "disable_events", json!({})).await,
        json!({"ok": "task events already disabled"})
    );
    assert_eq!(
        run(&worker, "enable_events", json!({})).await,
        json!({"ok": "task events enabled"})
    );
    assert_eq!(run(&worker, "heartbeat", json!({})).await, Value::Null);
    assert_eq!(worker.heartbeats.load(Ordering::SeqCst), 1);

    let clock = worker.events.clock().value();
    let hello = run(
        &worker,
        "hello",
        json!({"from_node": "bob@node2", "revoked": ["r1", "r2"]}),
    )
    .await;
    assert_eq!(hello["revoked"], json!(["r1", "r2"]));
    assert_eq!(hello["clock"], clock + 1);
    // Celery 5 before 5.7 sent a map of id -> timestamp.
    run(
        &worker,
        "hello",
        json!({"from_node": "bob@node2", "revoked": {"r3": 1.5}}),
    )
    .await;
    assert_eq!(worker.revoked(), ["r1", "r2", "r3"]);
    assert_eq!(
        run(&worker, "hello", json!({"from_node": "alice@node1"})).await,
        Value::Null
    );

    let (reply, after) = dispatch(&worker, "shutdown", &Map::new(), true).await;
    assert_eq!(reply, json!({"ok": "shutting down"}));
    assert_eq!(after, After::Shutdown);
    assert!(worker.outbox.is_empty());
}

/// A request not addressed to the node by name (a broadcast or a pattern).
async fn broadcast(worker: &Fake, method: &str, arguments: Value) -> (Value, After) {
    dispatch(worker, method, &args(arguments), false).await
}

fn refused(reply: &Value, what: &str) -> bool {
    reply["error"]
        .as_str()
        .is_some_and(|e| e.contains("refused") && e.contains(what))
}

#[tokio::test]
async fn broadcasts_that_move_the_node_are_refused_by_default() {
    let worker = fake(Vec::new());
    for (method, arguments) in [
        ("shutdown", json!({})),
        ("add_consumer", json!({"queue": "medium"})),
        (
            "add_consumer",
            json!({"queue": "everything", "exchange": "offliner", "exchange_type": "topic", "routing_key": "#"}),
        ),
        ("cancel_consumer", json!({"queue": "small"})),
    ] {
        let (reply, after) = broadcast(&worker, method, arguments).await;
        assert!(refused(&reply, "destination"), "{method}: {reply}");
        assert_eq!(after, After::Nothing, "{method}");
    }
    assert!(!worker.shutdown.load(Ordering::SeqCst));
    assert_eq!(worker.queues(), [TaskQueue::zimfarm("small")]);
    // The others run as Celery runs them: the dispatcher broadcasts revoke.
    assert_eq!(
        broadcast(&worker, "ping", json!({})).await.0,
        json!({"ok": "pong"})
    );
    let (reply, _) = broadcast(&worker, "revoke", json!({"task_id": "t1"})).await;
    assert_eq!(reply, json!({"ok": "tasks {'t1'} flagged as revoked"}));
    assert_eq!(worker.revoked(), ["t1"]);
    // A malformed one still gets its own error first.
    let (reply, _) = broadcast(&worker, "add_consumer", json!({})).await;
    assert!(
        reply["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("TypeError(")),
        "{reply}"
    );
}

#[tokio::test]
async fn addressed_requests_move_the_node_within_zimfarm_queues() {
    let worker = fake(Vec::new());
    for arguments in [
        json!({"queue": "medium"}),
        json!({"queue": "large", "exchange": "offliner"}),
        json!({"queue": "debug", "exchange": "offliner", "exchange_type": "topic", "routing_key": "debug"}),
    ] {
        let name = arguments["queue"].as_str().unwrap().to_owned();
        assert_eq!(
            run(&worker, "add_consumer", arguments).await,
            json!({"ok": format!("add consumer {name}")})
        );
    }
    for arguments in [
        json!({"queue": "zimit"}),
        json!({"queue": "small", "exchange": "offliner", "exchange_type": "topic", "routing_key": "#"}),
        json!({"queue": "small", "routing_key": "*"}),
        json!({"queue": "small", "exchange": "amq.topic"}),
        json!({"queue": "small", "exchange": "offliner", "exchange_type": "fanout"}),
        json!({"queue": "Small"}),
    ] {
        let reply = run(&worker, "add_consumer", arguments.clone()).await;
        assert!(refused(&reply, "only the queues"), "{arguments}: {reply}");
    }
    assert_eq!(
        worker.queues(),
        ["small", "medium", "large", "debug"].map(TaskQueue::zimfarm)
    );
    assert_eq!(
        run(&worker, "cancel_consumer", json!({"queue": "large"})).await,
        json!({"ok": "no longer consuming from large"})
    );
    assert_eq!(worker.queues().len(), 3);
    let (reply, after) = dispatch(&worker, "shutdown", &Map::new(), true).await;
    assert_eq!(
        (reply, after),
        (json!({"ok": "shutting down"}), After::Shutdown)
    );
}

#[tokio::test]
async fn celery_policy_lets_broadcasts_move_the_node() {
    let worker = fake_with(Vec::new(), ControlPolicy::Celery);
    let everything = json!({"queue": "everything", "exchange": "offliner", "exchange_type": "topic", "routing_key": "#"});
    let (reply, _) = broadcast(&worker, "add_consumer", everything).await;
    assert_eq!(reply, json!({"ok": "add consumer everything"}));
    let (reply, _) = broadcast(&worker, "cancel_consumer", json!({"queue": "small"})).await;
    assert_eq!(reply, json!({"ok": "no longer consuming from small"}));
    assert_eq!(
        worker.queues(),
        [TaskQueue {
            name: "everything".into(),
            exchange: "offliner".into(),
            exchange_type: "topic".into(),
            routing_key: "#".into(),
        }]
    );
    let (reply, after) = broadcast(&worker, "shutdown", json!({})).await;
    assert_eq!(
        (reply, after),
        (json!({"ok": "shutting down"}), After::Shutdown)
    );
}

#[test]
fn control_policy_values() {
    assert_eq!("node".parse(), Ok(ControlPolicy::Node));
    assert_eq!("celery".parse(), Ok(ControlPolicy::Celery));
    assert_eq!(ControlPolicy::default(), ControlPolicy::Node);
    let err = "Celery".parse::<ControlPolicy>().unwrap_err();
    assert!(
        err.contains("\"Celery\"") && err.contains("use node"),
        "{err}"
    );
}

#[test]
fn signal_names_and_numbers() {
    assert_eq!(signum(None), Ok(15));
    assert_eq!(signum(Some(&json!("SIGKILL"))), Ok(9));
    assert_eq!(signum(Some(&json!("KILL"))), Ok(9));
    assert_eq!(signum(Some(&json!("SIGUSR1"))), Ok(10));
    assert_eq!(signum(Some(&json!(9))), Ok(9));
    assert!(signum(Some(&json!(0))).is_err());
    assert!(signum(Some(&json!("sigkill"))).is_err());
    assert!(signum(Some(&json!(["x"]))).is_err());
    // Python's aliases, which the C names do not cover.
    assert_eq!(signum(Some(&json!("SIGIOT"))), Ok(6));
    assert_eq!(signum(Some(&json!("POLL"))), Ok(29));
    assert_eq!(signum(Some(&json!("SIGCLD"))), Ok(17));
    assert_eq!(signum(Some(&json!("SIGSTKFLT"))), Ok(16));
    assert_eq!(signum(Some(&json!("SIGPWR"))), Ok(30));
    assert_eq!(
        signum(Some(&json!("SIGNOPE"))),
        Err(exception(
            "AttributeError",
            "module 'signal' has no attribute 'SIGNOPE'"
        ))
    );
    assert_eq!(python_set(&[]), "set()");
}

#[test]
fn rusage_is_the_process_own() {
    let usage = rusage();
    assert!(usage.maxrss > 0);
    assert!(usage.minflt > 0);
    assert!(usage.utime + usage.stime > 0.0);
}

#[test]
fn requests_are_parsed_before_anything_runs() {
    use super::command::Command;
    let parse = |method: &str, arguments: Value| Command::parse(method, &args(arguments));
    // One alias table: the old names are the same commands.
    for (alias, name) in [
        ("dump_active", "active"),
        ("dump_reserved", "reserved"),
        ("dump_schedule", "scheduled"),
        ("dump_tasks", "registered"),
        ("dump_revoked", "revoked"),
        ("dump_conf", "conf"),
    ] {
        assert_eq!(parse(alias, json!({})), parse(name, json!({})), "{alias}");
    }
    assert_eq!(
        parse("dump_active", json!({"safe": 1})),
        Ok(Command::Active { safe: true })
    );
    assert_eq!(
        parse(
            "terminate",
            json!({"task_id": ["a", "b", "a"], "signal": "KILL"})
        ),
        Ok(Command::Revoke {
            ids: vec!["a".into(), "b".into()],
            terminate: Some(9)
        })
    );
    assert_eq!(
        parse("revoke", json!({"task_id": "a"})),
        Ok(Command::Revoke {
            ids: vec!["a".into()],
            terminate: None
        })
    );
    // A bad signal is only an error when something is to be terminated.
    assert_eq!(
        parse("revoke", json!({"task_id": "a", "signal": "NOPE"})),
        Ok(Command::Revoke {
            ids: vec!["a".into()],
            terminate: None
        })
    );
    assert_eq!(
        parse(
            "revoke",
            json!({"task_id": "a", "terminate": true, "signal": "NOPE"})
        ),
        Err(exception(
            "AttributeError",
            "module 'signal' has no attribute 'SIGNOPE'"
        ))
    );
    assert_eq!(
        parse("hello", json!({"from_node": "x@y", "revoked": {"r1": 1.0}})),
        Ok(Command::Hello {
            from_node: "x@y".into(),
            revoked: vec!["r1".into()]
        })
    );
    assert_eq!(
        parse("add_consumer", json!({"queue": "small"})),
        Ok(Command::AddConsumer(TaskQueue::zimfarm("small")))
    );
    assert_eq!(
        parse(
            "add_consumer",
            json!({"queue": "q", "exchange_type": "fan"})
        ),
        Err(nok(
            "exchange_type \"fan\" is not one of direct, topic, fanout, headers"
        ))
    );
    assert!(
        parse("hello", json!({}))
            .unwrap_err()
            .to_string()
            .contains("TypeError"),
        "hello without from_node"
    );
    assert_eq!(parse("nope", json!({})), Err(exception("KeyError", "nope")));
}

/// A revoke of 50,000 ids, twice, with ids that are no task ids and more
/// than one request takes: the reply and the set stay bounded, and say how
/// many were ignored.
#[tokio::test]
async fn revoke_is_bounded() {
    let worker = fake(vec![]);
    let mut ids: Vec<String> = (0..actions::MAX_REVOKE_IDS)
        .map(|i| format!("{i:024x}"))
        .collect();
    for _ in 0..2 {
        let reply = run(&worker, "revoke", json!({ "task_id": ids })).await;
        let text = reply["ok"].as_str().expect("an ok reply");
        assert!(text.len() < 600, "{} bytes: {text}", text.len());
        assert!(text.contains("... (49990 more)}"), "{text}");
        assert!(!text.contains("ignored"), "{text}");
    }
    assert_eq!(worker.state().revoked.len(), actions::MAX_REVOKE_IDS);

    ids.insert(0, "x".repeat(100_000));
    ids.insert(1, "a\nfake log line".to_owned());
    ids.push("one-too-many".to_owned());
    let reply = run(&worker, "revoke", json!({ "task_id": ids })).await;
    let text = reply["ok"].as_str().expect("an ok reply");
    assert!(text.len() < 600, "{} bytes: {text}", text.len());
    assert!(
        text.ends_with("; 3 ignored (not task ids, or beyond 50000 in one request)"),
        "{text}"
    );
    let taken = worker.state().revokes.last().expect("a revoke").0.clone();
    assert_eq!(taken.len(), actions::MAX_REVOKE_IDS);
    assert!(!taken.iter().any(|id| id.len() > 64 || id.contains('\n')));
    assert!(
        !worker
            .state()
            .revoked
            .contains("one-too-many", Instant::now())
    );

    let reply = run(
        &worker,
        "revoke",
        json!({"task_id": ["a/b", "x"], "terminate": true}),
    )
    .await;
    assert_eq!(
        reply,
        json!({"ok": "terminate: tasks unknown; 1 ignored (not task ids, or beyond 50000 in one request)"})
    );
}

/// A `query_task` of more ids than one request takes, with ids that are no
/// task ids: each taken id is looked up once, at most
/// [`inspect::MAX_QUERY_IDS`] of them, and the others are not answered.
#[tokio::test]
async fn query_task_is_bounded() {
    let worker = fake(vec![task("act", TaskPhase::Active, Some(1.0))]);
    let mut ids: Vec<String> = vec!["x".repeat(100_000), "act".to_owned(), "act".to_owned()];
    ids.extend((0..inspect::MAX_QUERY_IDS + 10_000).map(|i| format!("{i:024x}")));
    // Beyond the bound: not looked up.
    ids.push("long-gone".to_owned());
    let reply = run(&worker, "query_task", json!({ "ids": ids })).await;
    let answered: Vec<&String> = reply.as_object().expect("a map").keys().collect();
    assert_eq!(answered, ["act"]);
    let calls = worker.ended_calls.load(Ordering::Relaxed);
    assert!(
        calls <= inspect::MAX_QUERY_IDS,
        "{calls} look-ups of the ended record"
    );

    let reply = run(&worker, "query_task", json!({"ids": ["long-gone", "a\nb"]})).await;
    assert_eq!(
        reply,
        json!({"long-gone": ["ready", {"id": "long-gone", "hostname": "alice@node1"}]})
    );
}

/// A held request with 1 MB of kwargs: `scheduled`, `reserved`, `active`
/// and `query_task` echo its reprs cut as Celery's saferepr cuts them, and
/// a `safe` reply cuts a repr header of any size too.
#[tokio::test]
async fn echoed_arguments_are_bounded() {
    let big = json!({"flags": {"articleList": "y".repeat(1_000_000)}});
    let worker = fake(vec![
        task_with("sch", TaskPhase::Scheduled, None, big.clone()),
        task_with("res", TaskPhase::Reserved, None, big.clone()),
        task_with("act", TaskPhase::Active, Some(1.0), big),
    ]);
    let bound = 2 * inspect::REPR_MAXSIZE + 1024;
    for (method, arguments) in [
        ("scheduled", json!({})),
        ("reserved", json!({})),
        ("active", json!({})),
        ("active", json!({"safe": true})),
        ("query_task", json!({"ids": ["sch", "res", "act"]})),
    ] {
        let reply = run(&worker, method, arguments).await;
        let size = reply.to_string().len();
        assert!(size < 3 * bound, "{method}: {size} bytes");
    }
    let scheduled = run(&worker, "scheduled", json!({})).await;
    let kwargs = scheduled[0]["request"]["kwargs"]
        .as_str()
        .expect("the repr of kwargs too large to echo whole");
    assert_eq!(kwargs.chars().count(), inspect::REPR_MAXSIZE + 3);
    assert!(
        kwargs.starts_with("{'flags': {'articleList': 'yyy"),
        "{kwargs}"
    );
    assert!(kwargs.ends_with("y..."), "{kwargs}");
    assert_eq!(scheduled[0]["request"]["args"], "[]");
}

#[test]
fn cut_repr_cuts_at_celerys_maxsize_in_characters() {
    assert_eq!(inspect::cut_repr("'short'"), "'short'");
    let exact = "é".repeat(inspect::REPR_MAXSIZE);
    assert_eq!(inspect::cut_repr(&exact), exact);
    let long = "é".repeat(inspect::REPR_MAXSIZE + 1);
    assert_eq!(
        inspect::cut_repr(&long),
        format!("{}...", "é".repeat(inspect::REPR_MAXSIZE))
    );
}

/// Replies that echo what a request carried (an unknown method, a signal
/// name, a queue name) stay within
/// [`crate::celery::control::MAX_REPLY_TEXT`] characters.
#[tokio::test]
async fn echoing_replies_are_bounded() {
    use crate::celery::control::MAX_REPLY_TEXT;
    let worker = fake(vec![]);
    let long = "Q".repeat(100_000);
    let replies = [
        dispatch(&worker, &long, &args(json!({})), true).await.0,
        run(
            &worker,
            "revoke",
            json!({"task_id": "a", "terminate": true, "signal": long}),
        )
        .await,
        run(&worker, "cancel_consumer", json!({"queue": long})).await,
    ];
    for reply in replies {
        let (_, text) = reply
            .as_object()
            .and_then(|o| o.iter().next())
            .unwrap_or_else(|| panic!("an ok or error reply: {reply}"));
        let text = text.as_str().expect("a text");
        assert!(
            text.chars().count() <= MAX_REPLY_TEXT + 3,
            "{} chars",
            text.len()
        );
        assert!(text.ends_with("..."), "{text}");
    }
}
