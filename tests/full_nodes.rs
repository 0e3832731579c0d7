//! A full node takes nothing it cannot start (issue 27, finding 3): three
//! nodes of CONCURRENCY=1 on one queue, simulate runner. Node X runs a long
//! task; its connection is closed by the broker (the management API) and
//! it reconnects with its slot busy. Fresh tasks published then go to the
//! two free nodes; X holds none of them (before, its prefetch floor of 1
//! let it take one and keep it, `reserved`, until its long task ended).
//!
//! Checked from the outside only: the events (who started what, one
//! `task-started` and one final event per task), `inspect reserved` of
//! every node polled through the run (X's stays empty; no node lists a
//! task as reserved for more than 5 s), `inspect active_queues` of X while
//! it is paused (the queues it consumes, still listed), and a queue added
//! by `add_consumer` while X is paused, consumed once its slot frees.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(90);
/// The longest a task may be seen `reserved` on a node: a node here takes
/// a task only for a free slot, and starts it at once.
const RESERVED_AT_MOST: Duration = Duration::from_secs(5);

/// The Celery hostname of a test node.
fn host(node: &str) -> String {
    format!("tester@{node}")
}

/// Closes `node`'s broker connection(s) through the management API, as an
/// operator (or a network fault the broker notices) would; how many.
fn close_connection_of(vh: &Vhost, node: &str) -> usize {
    let wanted = format!("zimfarm-worker {}", host(node));
    let mut closed = 0;
    eventually(
        Duration::from_secs(20),
        Duration::from_millis(250),
        || {
            let all = rabbit_api_call("GET", &format!("/vhosts/{}/connections", vh.name), None);
            for c in all.as_array().into_iter().flatten() {
                let name = c["client_properties"]["connection_name"].as_str();
                if name == Some(wanted.as_str()) {
                    let id = c["name"].as_str().unwrap_or_default();
                    rabbit_api_call("DELETE", &format!("/connections/{}", encode(id)), None);
                    closed += 1;
                }
            }
            closed > 0
        },
        || format!("no connection named {wanted:?} on {}", vh.name),
    );
    closed
}

/// Percent-encodes a path segment (connection names hold spaces, `>`, `:`).
fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One round of `inspect reserved` of every node: when it was asked, and
/// the ids each node answered with.
type Round = (Instant, HashMap<String, Vec<String>>);

/// Asks every node for its reserved tasks, over and over, until stopped.
struct ReservedPoller {
    rounds: Arc<Mutex<Vec<Round>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ReservedPoller {
    fn start(vh: &Vhost) -> Self {
        let rounds: Arc<Mutex<Vec<Round>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (sink, done) = (rounds.clone(), stop.clone());
        // The test's vhost, named again here: never deleted by this copy.
        let vhost = std::mem::ManuallyDrop::new(Vhost {
            name: vh.name.clone(),
        });
        let thread = std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                let at = Instant::now();
                let out = celery_client(
                    &vhost,
                    &["control", "--method", "reserved", "--timeout", "1.5"],
                );
                let replies = last_json_line(&out.stdout);
                let mut round = HashMap::new();
                for reply in replies["replies"].as_array().into_iter().flatten() {
                    for (node, tasks) in reply.as_object().into_iter().flatten() {
                        let ids = (tasks.as_array().into_iter().flatten())
                            .filter_map(|t| t["id"].as_str().map(str::to_owned))
                            .collect();
                        round.insert(node.clone(), ids);
                    }
                }
                sink.lock().unwrap().push((at, round));
            }
        });
        Self {
            rounds,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Round> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.rounds.lock().unwrap().clone()
    }
}

impl Drop for ReservedPoller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// How long each (node, task) was listed as reserved: from its first
/// sighting to its last one in an unbroken run of rounds.
fn reserved_spans(rounds: &[Round]) -> Vec<(String, String, Duration)> {
    let mut open: HashMap<(String, String), (Instant, Instant)> = HashMap::new();
    let mut spans = Vec::new();
    for (at, round) in rounds {
        let seen: Vec<(String, String)> = round
            .iter()
            .flat_map(|(node, ids)| ids.iter().map(move |id| (node.clone(), id.clone())))
            .collect();
        open.retain(|key, (first, last)| {
            if seen.contains(key) {
                return true;
            }
            spans.push((key.0.clone(), key.1.clone(), *last - *first));
            false
        });
        for key in seen {
            open.entry(key).or_insert((*at, *at)).1 = *at;
        }
    }
    spans.extend(
        open.into_iter()
            .map(|((node, id), (first, last))| (node, id, last - first)),
    );
    spans
}

/// The events of task `id` of type `kind`.
fn of<'a>(all: &'a [Value], kind: &str, id: &str) -> Vec<&'a Value> {
    all.iter()
        .filter(|e| e["type"] == kind && e["uuid"] == id)
        .collect()
}

fn finals<'a>(all: &'a [Value], id: &str) -> Vec<&'a Value> {
    all.iter()
        .filter(|e| e["uuid"] == id && e["type"].as_str().is_some_and(is_final_event))
        .collect()
}

#[test]
fn a_full_node_that_reconnects_takes_nothing_and_free_nodes_get_the_fresh_tasks() {
    let vh = Vhost::new("full");
    let events = EventsProc::start(&vh, 300);
    let env = WorkerEnv::new().set("CONCURRENCY", 1);
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (x, y, z) = ("full-x", "full-y", "full-z");

    // X alone gets the long task, then the others join.
    let worker_x = WorkerProc::start(&vh, dirs[0].path(), x, &env);
    worker_x.wait_connected();
    let long = Task::simulated(35.0).send(&vh);
    events.wait_task_event("task-started", &long, T);
    let _others: Vec<WorkerProc> = [(y, &dirs[1]), (z, &dirs[2])]
        .into_iter()
        .map(|(node, dir)| {
            let w = WorkerProc::start(&vh, dir.path(), node, &env);
            w.wait_connected();
            w
        })
        .collect();

    // X's connection goes; it comes back with its slot busy.
    assert_eq!(close_connection_of(&vh, x), 1);
    eventually(
        T,
        Duration::from_millis(100),
        || {
            worker_x
                .log_text()
                .matches("connected to the broker; consuming")
                .count()
                >= 2
        },
        || format!("X did not reconnect:\n{}", worker_x.log_text()),
    );
    let poller = ReservedPoller::start(&vh);

    // A queue added while X is paused: declared now, consumed once X's
    // slot frees; its task waits for X meanwhile.
    let added = broadcast(&vh, &host(x), "add_consumer", json!({"queue": "medium"}));
    assert_eq!(added, json!({"ok": "add consumer medium"}), "{added}");
    let queues = broadcast(&vh, &host(x), "active_queues", json!({}));
    let names: Vec<&str> = (queues.as_array().into_iter().flatten())
        .filter_map(|q| q["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["small", "medium"],
        "paused, X still lists what it consumes: {queues}"
    );
    let later = Task::simulated(1.0).routed_to("medium").send(&vh);

    // Fresh tasks, more than the free slots: they go to Y and Z.
    let sent_at = Instant::now();
    let fresh: Vec<String> = (0..4).map(|_| task_id()).collect();
    let kwargs = simulated_task(3.0).to_string();
    let mut args = vec!["send", "--name", "offliner.mwoffliner", "--kwargs", &kwargs];
    for id in &fresh {
        args.extend(["--task-id", id.as_str()]);
    }
    celery_client(&vh, &args);
    events.wait_all_ended(&fresh, T);
    let fresh_done = sent_at.elapsed();
    let long_running = events.count("task-succeeded", &long) == 0;

    // Then X's long task ends, and X consumes again: the added queue too.
    events.wait_task_event("task-succeeded", &long, T);
    events.wait_task_event("task-succeeded", &later, T);
    vh.wait_queue_depth("small", 0, 0, T);
    vh.wait_queue_depth("medium", 0, 0, T);
    let rounds = poller.finish();
    // A late second final event has had time to come.
    std::thread::sleep(Duration::from_secs(2));
    let all = events.events();
    let dump = dump_task_events(&all);

    assert!(
        long_running,
        "the long task outlasts the fresh ones, so X stayed full through them:\n{dump}"
    );
    let hx = host(x);
    for id in &fresh {
        let started = of(&all, "task-started", id);
        assert_eq!(started.len(), 1, "{id} started once:\n{dump}");
        assert_ne!(
            started[0]["hostname"],
            hx.as_str(),
            "{id} not on the full node:\n{dump}"
        );
        let ended = finals(&all, id);
        assert_eq!(ended.len(), 1, "{id}: one final event:\n{dump}");
        assert_eq!(ended[0]["type"], "task-succeeded", "{id}:\n{dump}");
    }
    for (id, node) in [(&long, &hx), (&later, &hx)] {
        let started = of(&all, "task-started", id);
        assert_eq!(started.len(), 1, "{id} started once:\n{dump}");
        assert_eq!(started[0]["hostname"], node.as_str(), "{id}:\n{dump}");
        assert_eq!(finals(&all, id).len(), 1, "{id}: one final event:\n{dump}");
    }
    // The queue added while paused was consumed only once the slot freed.
    let long_end = finals(&all, &long)[0]["timestamp"].as_f64().unwrap();
    let later_start = of(&all, "task-started", &later)[0]["timestamp"]
        .as_f64()
        .unwrap();
    assert!(later_start >= long_end, "{later} ran after {long}:\n{dump}");

    // No node listed a task it could not start; X none at all.
    assert!(rounds.len() >= 3, "the poller asked {} times", rounds.len());
    assert!(
        rounds.iter().all(|(_, round)| round.contains_key(&hx)),
        "X answered every round"
    );
    let spans = reserved_spans(&rounds);
    let on_x: Vec<_> = spans.iter().filter(|(node, _, _)| *node == hx).collect();
    assert!(
        on_x.is_empty(),
        "X held tasks it could not start: {on_x:?}\n{dump}"
    );
    let long_held: Vec<_> = spans
        .iter()
        .filter(|(_, _, held)| *held > RESERVED_AT_MOST)
        .collect();
    assert!(
        long_held.is_empty(),
        "held without a slot: {long_held:?}\n{dump}"
    );
    let log = worker_x.log_text();
    assert!(
        log.contains("every slot is busy: taking no task until one frees"),
        "X says why it takes nothing:\n{log}"
    );
    eprintln!(
        "full nodes: 4 fresh tasks ran on the free nodes in {:.1} s; {} rounds of \
         `inspect reserved`, {} sightings of a reserved task",
        fresh_done.as_secs_f64(),
        rounds.len(),
        spans.len()
    );
}
