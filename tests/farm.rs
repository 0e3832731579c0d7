//! A farm of nodes: three worker processes (each with its own NODE_NAME and
//! working dir, CONCURRENCY=1) on one queue, nine Docker tasks of the
//! stand-in mwoffliner uploading to one real sshd, and one node killed -9
//! during its scrape, then restarted.
//!
//! Checked from the outside: every task ends once (one final event, a
//! success), the killed node's task finishes on another node, each ZIM
//! lands once, the queue drains, no node ever runs more than its slot, and
//! the restarted node removes its own left-over containers and nobody
//! else's.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::sshd::Sshd;
use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(120);
const NODES: [&str; 3] = ["farm-a", "farm-b", "farm-c"];

/// The hostname of a node in the events: `USERNAME@NODE_NAME`.
fn host(sshd: &Sshd, node: &str) -> String {
    format!("{}@{node}", sshd.user())
}

/// Replays the events: the most tasks any one node ran at once. A node's
/// count starts again at its `worker-online` (a restarted process holds
/// nothing of the killed one).
fn peak_running(events: &[Value]) -> HashMap<String, usize> {
    let mut running: HashMap<String, HashSet<String>> = HashMap::new();
    let mut peak: HashMap<String, usize> = HashMap::new();
    for e in events {
        let (Some(kind), Some(node)) = (e["type"].as_str(), e["hostname"].as_str()) else {
            continue;
        };
        let uuid = e["uuid"].as_str().unwrap_or_default();
        if kind == "worker-online" {
            running.remove(node);
        } else if kind == "task-started" {
            let set = running.entry(node.to_owned()).or_default();
            set.insert(uuid.to_owned());
            let p = peak.entry(node.to_owned()).or_default();
            *p = (*p).max(set.len());
        } else if is_final_event(kind) {
            for set in running.values_mut() {
                set.remove(uuid);
            }
        }
    }
    peak
}

#[test]
fn three_nodes_run_nine_tasks_once_each_through_a_kill_9() {
    let sshd = Sshd::start();
    let vh = Vhost::new("farm");
    let events = EventsProc::start(&vh, 300);
    let dirs: Vec<tempfile::TempDir> = NODES.iter().map(|_| tempfile::tempdir().unwrap()).collect();
    // A node's silence hands its task over after RESTART_GRACE of it.
    let env = WorkerEnv::docker(&sshd)
        .set("CONCURRENCY", 1)
        .set("RESTART_GRACE", 15);
    let mut workers: Vec<WorkerProc> = NODES
        .iter()
        .zip(&dirs)
        .map(|(node, dir)| WorkerProc::start(&vh, dir.path(), node, &env))
        .collect();
    for w in &workers {
        w.wait_connected();
    }
    let began = Instant::now();
    let ids: Vec<String> = (0..9).map(|_| task_id()).collect();
    for (i, id) in ids.iter().enumerate() {
        let flags = json!({
            "mwUrl": "https://en.wikipedia.org",
            "adminEmail": "a@b.c",
            "sleep": 5,
            "name": format!("farm_{i}"),
        });
        send_task(&vh, "offliner.mwoffliner", id, &mw_kwargs(flags), &[]);
    }

    // Kill farm-b in the middle of its first scrape.
    let victim_host = host(&sshd, "farm-b");
    let mut killed = String::new();
    events.wait_until("farm-b starting a container", T, |all| {
        match all.iter().find(|e| {
            e["type"] == "task-container_started" && e["hostname"] == victim_host.as_str()
        }) {
            Some(e) => {
                killed = e["uuid"].as_str().unwrap_or_default().to_owned();
                true
            }
            None => false,
        }
    });
    workers[1].signal("KILL");
    workers[1].wait_exit(T);
    let killed_at = began.elapsed();
    assert!(
        !containers_of("farm-b").is_empty(),
        "the killed node's containers are left behind"
    );

    // Its task is taken by another node once the broker sees the
    // connection gone and farm-b was silent for RESTART_GRACE; then farm-b
    // comes back while the others run.
    events.wait_until("the killed task started on another node", T, |all| {
        all.iter().any(|e| {
            e["type"] == "task-started"
                && e["uuid"] == killed.as_str()
                && e["hostname"] != victim_host.as_str()
        })
    });
    let retaken_at = began.elapsed();
    // The restart must find the others' scrapes under way, to show it
    // leaves them alone.
    let start = Instant::now();
    let others_running = loop {
        let others: Vec<String> = ["farm-a", "farm-c"]
            .iter()
            .flat_map(|n| containers_of(n))
            .filter(|c| c.ends_with("_offliner"))
            .collect();
        if !others.is_empty() {
            break others;
        }
        assert!(
            start.elapsed() < T,
            "no scrape of farm-a or farm-c under way"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // farm-b was away longer than its RESTART_GRACE (its task ran
    // elsewhere meanwhile): it does not adopt its kept scrape, and removes
    // it once the task's message did not come back to it (60 s), sending
    // nothing for it. (Back within the grace, its heartbeats list the task
    // again and the holder waits for it: tests/farm_silence.rs.)
    let away = env.clone().set("RESTART_GRACE", 5);
    workers[1] = WorkerProc::start(&vh, dirs[1].path(), "farm-b", &away);
    workers[1].wait_connected();

    events.wait_all_ended(&ids, T);
    let drained_at = began.elapsed();
    eventually(
        Duration::from_secs(120),
        Duration::from_millis(200),
        || containers_of("farm-b").iter().all(|c| !c.contains(&killed)),
        || {
            format!(
                "farm-b's stale scrape is still there: {:?}",
                containers_of("farm-b")
            )
        },
    );
    vh.wait_queue_depth("small", 0, 0, T);
    std::thread::sleep(Duration::from_secs(2));
    let all = events.events();

    for (i, id) in ids.iter().enumerate() {
        let finals: Vec<&Value> = all
            .iter()
            .filter(|e| e["uuid"] == id.as_str() && e["type"].as_str().is_some_and(is_final_event))
            .collect();
        assert_eq!(
            finals.len(),
            1,
            "{id}: one final event:\n{}",
            dump_task_events(&all)
        );
        assert_eq!(
            finals[0]["type"],
            "task-succeeded",
            "{id}:\n{}",
            dump_task_events(&all)
        );
        let result = finals[0]["result"].as_str().unwrap_or_default();
        assert!(
            result.contains(&format!("'name': 'farm_{i}.zim'")),
            "{id}: {result}"
        );
        // Every container of the task that was not killed with farm-b
        // exited cleanly: the restart removed none of the others'.
        for finished in all
            .iter()
            .filter(|e| e["type"] == "task-container_finished" && e["uuid"] == id.as_str())
        {
            assert_eq!(finished["exit_code"], 0, "{id}: {finished}");
        }
    }
    let killed_final = all
        .iter()
        .find(|e| e["uuid"] == killed.as_str() && e["type"] == "task-succeeded")
        .unwrap();
    assert_ne!(
        killed_final["hostname"],
        victim_host.as_str(),
        "finished elsewhere"
    );
    assert_eq!(
        events.count("task-started", &killed),
        2,
        "killed once, redone once"
    );
    for id in ids.iter().filter(|id| **id != killed) {
        assert_eq!(events.count("task-started", id), 1, "{id} ran once");
    }

    // Each ZIM landed once, and nothing else did.
    let mut landed: Vec<String> = std::fs::read_dir(sshd.chroot().join("zim/wikipedia"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    landed.sort();
    let mut expected: Vec<String> = (0..9).map(|i| format!("farm_{i}.zim")).collect();
    expected.sort();
    assert_eq!(landed, expected);

    for (node, peak) in peak_running(&all) {
        assert!(
            peak <= 1,
            "{node} ran {peak} tasks at once:\n{}",
            dump_task_events(&all)
        );
    }
    let per_node: Vec<String> = NODES
        .iter()
        .map(|n| {
            let h = host(&sshd, n);
            let done = all
                .iter()
                .filter(|e| e["type"] == "task-succeeded" && e["hostname"] == h.as_str())
                .count();
            format!("{n} {done}")
        })
        .collect();
    eprintln!(
        "farm: killed {killed} at {:.1} s, retaken at {:.1} s, all ended at {:.1} s; \
         succeeded per node: {}; offliners of the others at the restart: {}",
        killed_at.as_secs_f64(),
        retaken_at.as_secs_f64(),
        drained_at.as_secs_f64(),
        per_node.join(", "),
        others_running.len()
    );
    for node in NODES {
        eventually(
            T,
            Duration::from_millis(100),
            || containers_of(node).is_empty(),
            || format!("{node} left {:?}", containers_of(node)),
        );
    }
}
