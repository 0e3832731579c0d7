//! Messages that would exhaust the worker (issue 25, §5), against a real
//! RabbitMQ and Celery's own client:
//!
//! - a flood of `eta` messages: at most MAX_ETA_HELD are held, the others
//!   go back to the tail of their queue; the worker's RSS stays bounded, a
//!   plain task sent after the flood still starts, and no message is lost;
//! - task ids that break the rule: refused at decode, the log and the
//!   record of ended tasks stay small, a short printable one still gets
//!   its `task-failed`.
//!
//! Revoke's bounds are unit tests (`worker::revoked`, `control::tests`) and
//! a bench (`benches/revoke.rs`).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// Longest line the worker may log about a message, whatever it holds.
const MAX_LOG_LINE: usize = 2_000;

fn longest_line(text: &str) -> usize {
    text.lines().map(str::len).max().unwrap_or(0)
}

/// CPU time (user + system) process `pid` used so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}

/// Samples the worker's RSS every 100 ms until dropped; the highest seen.
struct RssWatch {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssWatch {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let status =
                        std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                    let kib = status
                        .lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    peak.fetch_max(kib, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Self {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn peak_kib(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// 10,000 messages of 64 KiB with an `eta` a day ahead (within the 14-day
/// bound): the worker holds MAX_ETA_HELD of them and sends the others back
/// to the tail of the queue. Its RSS stays under 64 MB, a plain task sent
/// after them starts once the flood ahead of it went by (not at their eta),
/// and once the worker stopped the queue holds every one of them, once.
#[test]
fn an_eta_flood_neither_fills_memory_nor_blocks_the_queue() {
    const FLOOD: usize = 10_000;
    let stack = Stack::start(
        "eta-flood",
        // MAX_ETA_HELD: its default.
        WorkerEnv::new().set("LOG_LEVEL", "info"),
    )
    .within(Duration::from_secs(120));
    let rss = RssWatch::start(stack.worker.pid());

    let pad = "x".repeat(64 * 1024);
    let mut kwargs = simulated_task(0.1);
    kwargs["flags"]["pad"] = json!(pad);
    let ids: Vec<String> = (0..FLOOD).map(|_| task_id()).collect();
    let kwargs = kwargs.to_string();
    let sent = Instant::now();
    for chunk in ids.chunks(2_500) {
        let mut args = vec![
            "send",
            "--name",
            "offliner.mwoffliner",
            "--kwargs",
            &kwargs,
            "--countdown",
            "86400",
        ];
        for id in chunk {
            args.extend(["--task-id", id.as_str()]);
        }
        let out = celery_client(&stack.vh, &args);
        assert!(out.status.success(), "{}", output_text(&out));
    }
    eprintln!("published {FLOOD} eta messages in {:?}", sent.elapsed());

    let plain = stack.submit(Task::new("offliner.mwoffliner", simulated_task(0.1)));
    let sent = Instant::now();
    stack.expect_event("task-started", &plain);
    let took = sent.elapsed();
    eprintln!("the plain task started {took:?} after it was sent");
    stack.expect_final(&plain);
    let received = stack
        .events
        .events()
        .iter()
        .filter(|e| e["type"] == "task-received")
        .count();
    eprintln!("task-received events: {received}");

    eprintln!(
        "worker CPU time so far: {:.1} s",
        cpu_seconds(stack.worker.pid())
    );
    let peak = rss.peak_kib();
    eprintln!("peak RSS: {peak} KiB");
    assert!(peak > 0, "RSS was read");
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB, over 64 MB");

    // Stopped, the worker gives back what it holds: every eta message is in
    // the queue again, once, and only the plain task was acked.
    let mut worker = stack.worker;
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(60)).success());
    stack
        .vh
        .wait_queue_depth("small", FLOOD as u64, 0, Duration::from_secs(60));
    let log = worker.log_text();
    assert!(
        log.contains("MAX_ETA_HELD tasks are held for their eta"),
        "the log says why messages went back"
    );
    assert!(longest_line(&log) < MAX_LOG_LINE);
    // The flood goes by at the pace the broker takes its copies (persistent
    // messages of 64 KiB, about 250 a second on a loaded test machine): the
    // plain task waits for the flood ahead of it to pass once, not for the
    // etas.
    assert!(
        took < Duration::from_secs(150),
        "the plain task waited {took:?} behind the eta flood"
    );
}

/// Publishes an mwoffliner task with id `id` to the `small` queue, in
/// Celery's protocol v2.
fn publish_v2(stack: &Stack, id: &str) {
    let body = json!([[], simulated_task(0.1), {}]);
    let headers = json!({"task": "offliner.mwoffliner", "id": id, "lang": "py"}).to_string();
    let out = publish_raw_to(
        &stack.vh,
        stack.dir(),
        "offliner",
        "small",
        body.to_string(),
        &["--headers", &headers],
    );
    assert!(out.status.success(), "publish-raw failed");
}

/// A task id of 100 KB: refused at decode, no event (it is not short), the
/// message acked; the log and the record of ended tasks stay small. A short
/// printable id that breaks the rule still gets its `task-failed`, and the
/// worker goes on with the next task.
#[test]
fn ids_that_break_the_rule_are_refused_at_decode() {
    let stack = Stack::start("bad-ids", WorkerEnv::new());
    let huge = "x".repeat(100_000);
    let refused = "../../etc/passwd";
    // Celery's client cannot send them (the id is also its correlation id,
    // an AMQP short string): published as Celery 5 lays a message out.
    publish_v2(&stack, &huge);
    publish_v2(&stack, refused);
    let failed = stack.expect_final(refused);
    assert_eq!(failed["type"], "task-failed", "{failed}");
    assert!(
        failed["exception"]
            .as_str()
            .is_some_and(|e| e.contains("DecodeError")),
        "{failed}"
    );
    let good = stack.submit(Task::new("offliner.mwoffliner", simulated_task(0.1)));
    assert_eq!(stack.expect_final(&good)["type"], "task-succeeded");
    stack.expect_queue(0, 0);

    let log = stack.worker.log_text();
    assert!(
        log.contains("dropping an undecodable task message"),
        "{log}"
    );
    assert!(
        log.contains("100000 bytes"),
        "the log gives the id's length"
    );
    assert!(
        longest_line(&log) < MAX_LOG_LINE,
        "a log line of {} bytes",
        longest_line(&log)
    );
    assert!(
        !stack
            .events
            .events()
            .iter()
            .any(|e| e["uuid"].as_str().is_some_and(|u| u.len() > 200)),
        "no event names the 100 KB id"
    );
    let ended =
        std::fs::read_to_string(stack.dir().join(".zimfarm-ended.jsonl")).unwrap_or_default();
    assert!(
        ended.len() < 4_096,
        "record of ended tasks: {} bytes",
        ended.len()
    );
    assert!(!ended.contains("xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"));
}

/// An `eta` 30 days ahead (past the 14-day bound) is refused with
/// `task-failed` and acked; one within the bound is held (`task-received`,
/// not started, its message unacked).
#[test]
fn an_eta_too_far_ahead_is_refused() {
    let stack = Stack::start("eta-far", WorkerEnv::new());
    let far = stack.submit(
        Task::new("offliner.mwoffliner", simulated_task(0.1))
            .options(&["--countdown", &(30 * 86_400).to_string()]),
    );
    let failed = stack.expect_final(&far);
    assert_eq!(failed["type"], "task-failed", "{failed}");
    assert!(
        failed["exception"]
            .as_str()
            .is_some_and(|e| e.contains("ValueError") && e.contains("14 days")),
        "{failed}"
    );
    let near = stack.submit(
        Task::new("offliner.mwoffliner", simulated_task(0.1))
            .options(&["--countdown", &(13 * 86_400).to_string()]),
    );
    stack.expect_event("task-received", &near);
    stack.expect_queue(0, 1);
    assert_eq!(stack.count("task-started", &near), 0);
}
