//! Throughput benchmark: 2,000 tasks published to a worker whose runner
//! returns at once (CONCURRENCY=2), against our worker and a Python Celery 5
//! worker with a no-op task, in the same run. Prints tasks/s, p50 and p99
//! latency from publish to `task-succeeded`, time from process start to
//! `worker-online`, and RSS after 30 s idle.
//!
//! Needs the services of `scripts/test-env.sh`; run it with
//! `scripts/bench.sh` (or `cargo bench --bench throughput`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Vhost, python, repo_root, worker_binary, worker_env};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

/// Tasks per run and idle seconds before RSS is read; `BENCH_TASKS` and
/// `BENCH_IDLE_SECS` override them for a quick look. `BENCH_WORKER_BIN`
/// runs another build of the worker (an older commit's, to compare).
fn tasks() -> usize {
    std::env::var("BENCH_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn idle() -> Duration {
    Duration::from_secs(
        std::env::var("BENCH_IDLE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30),
    )
}

/// Kills the worker under test however the run ends.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Figures {
    name: &'static str,
    online: Duration,
    throughput: f64,
    p50: Duration,
    p99: Duration,
    idle_rss_kib: u64,
}

fn main() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    if only == "celery" {
        rt.block_on(run("celery 5 (Python, prefork)", Kind::Celery));
        return;
    }
    let ours = rt.block_on(run("zimfarm-worker (Rust)", Kind::Ours));
    if only == "ours" {
        return;
    }
    let celery = rt.block_on(run("celery 5 (Python, prefork)", Kind::Celery));
    println!();
    println!(
        "{:<28} {:>12} {:>10} {:>10} {:>12} {:>14}",
        "worker", "tasks/s", "p50 ms", "p99 ms", "online ms", "idle RSS MiB"
    );
    for f in [&ours, &celery] {
        println!(
            "{:<28} {:>12.0} {:>10.1} {:>10.1} {:>12.0} {:>14.1}",
            f.name,
            f.throughput,
            f.p50.as_secs_f64() * 1e3,
            f.p99.as_secs_f64() * 1e3,
            f.online.as_secs_f64() * 1e3,
            f.idle_rss_kib as f64 / 1024.0
        );
    }
    println!(
        "ratio: throughput {:.1}x, idle RSS {:.2}x, p50 latency {:.2}x",
        ours.throughput / celery.throughput,
        ours.idle_rss_kib as f64 / celery.idle_rss_kib.max(1) as f64,
        ours.p50.as_secs_f64() / celery.p50.as_secs_f64()
    );
}

enum Kind {
    Ours,
    Celery,
}

fn spawn(kind: &Kind, vh: &Vhost, dir: &std::path::Path) -> Child {
    match kind {
        Kind::Ours => Command::new(
            std::env::var("BENCH_WORKER_BIN").unwrap_or_else(|_| worker_binary().to_owned()),
        )
        .env_clear()
        .envs(worker_env(
            vh,
            dir,
            "bench",
            &[(
                "LOG_LEVEL",
                std::env::var("BENCH_LOG").as_deref().unwrap_or("warn"),
            )],
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("worker starts"),
        Kind::Celery => Command::new(python())
            .arg(repo_root().join("tests/py/noop_celery_worker.py"))
            .args([
                "--broker",
                &vh.url(),
                "--concurrency",
                "2",
                "--hostname",
                "tester@bench",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("celery worker starts"),
    }
}

async fn run(name: &'static str, kind: Kind) -> Figures {
    let vh = Vhost::new("bench");
    let dir = tempfile::tempdir().expect("temp dir");
    let conn = Connection::connect(&vh.url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for ex in ["celeryev", "offliner"] {
        ch.exchange_declare(
            ex.into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .expect("exchange");
    }
    ch.queue_declare(
        "small".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("queue");
    ch.queue_bind(
        "small".into(),
        "offliner".into(),
        "small".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    let events = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("event queue");
    // Celery 5 batches task events into lists under `task.multi`.
    for key in ["task.succeeded", "task.multi", "worker.online"] {
        ch.queue_bind(
            events.name().clone(),
            "celeryev".into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind events");
    }
    let mut consumer = ch
        .basic_consume(
            events.name().clone(),
            "bench".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");

    let spawned = Instant::now();
    let child = Reap(spawn(&kind, &vh, dir.path()));
    let tasks = tasks();
    let online = loop {
        let d = tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await
            .expect("worker-online within 60 s")
            .expect("stream")
            .expect("delivery");
        let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap_or_default();
        if v["type"] == "worker-online" {
            break spawned.elapsed();
        }
    };
    // Let a Python worker finish its start-up before timing it.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let pub_ch = conn.create_channel().await.expect("channel");
    pub_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut sent = HashMap::with_capacity(tasks);
    let start = Instant::now();
    let mut confirms = Vec::with_capacity(tasks);
    for i in 0..tasks {
        let id = format!("{:024x}", i + 1);
        let (headers, body) = task_message(&id);
        sent.insert(id.clone(), Instant::now());
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_correlation_id(id.as_str().into())
            .with_delivery_mode(2)
            .with_headers(headers);
        confirms.push(
            pub_ch
                .basic_publish(
                    "offliner".into(),
                    "small".into(),
                    BasicPublishOptions::default(),
                    &body,
                    props,
                )
                .await
                .expect("publish"),
        );
    }
    let published = start.elapsed();
    let mut latencies = Vec::with_capacity(tasks);
    let mut last = start;
    while latencies.len() < tasks {
        let d = tokio::time::timeout(Duration::from_secs(120), consumer.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{name}: only {} of {tasks} tasks succeeded within 120 s",
                    latencies.len()
                )
            })
            .expect("stream")
            .expect("delivery");
        let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap_or_default();
        let batch = match v {
            serde_json::Value::Array(list) => list,
            one => vec![one],
        };
        for v in batch {
            if v["type"] == "task-succeeded"
                && let Some(t) = v["uuid"].as_str().and_then(|id| sent.remove(id))
            {
                last = Instant::now();
                latencies.push(last - t);
            }
        }
    }
    for c in confirms {
        let _ = c.await;
    }
    let elapsed = last - start;
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    tokio::time::sleep(idle()).await;
    let idle_rss_kib = tree_rss_kib(child.0.id());
    drop(child);
    let f = Figures {
        name,
        online,
        throughput: tasks as f64 / elapsed.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
        idle_rss_kib,
    };
    println!(
        "{name}: {tasks} tasks in {:.2} s (published in {:.2} s); online after {:.0} ms; idle RSS {} KiB",
        elapsed.as_secs_f64(),
        published.as_secs_f64(),
        online.as_secs_f64() * 1e3,
        idle_rss_kib
    );
    f
}

/// A protocol-2 task message as Celery 5's `send_task` builds it.
fn task_message(id: &str) -> (FieldTable, Vec<u8>) {
    let s = |v: &str| AMQPValue::LongString(LongString::from(v));
    let mut h = FieldTable::default();
    h.insert("lang".into(), s("py"));
    h.insert("task".into(), s("offliner.mwoffliner"));
    h.insert("id".into(), s(id));
    h.insert("root_id".into(), s(id));
    h.insert("parent_id".into(), AMQPValue::Void);
    h.insert("group".into(), AMQPValue::Void);
    h.insert("retries".into(), AMQPValue::LongLongInt(0));
    h.insert("eta".into(), AMQPValue::Void);
    h.insert("expires".into(), AMQPValue::Void);
    h.insert(
        "timelimit".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Void, AMQPValue::Void])),
    );
    h.insert("argsrepr".into(), s("()"));
    h.insert(
        "kwargsrepr".into(),
        s("{'flags': {}, 'warehouse_path': '/bench'}"),
    );
    h.insert("origin".into(), s("bench@localhost"));
    let body = br#"[[], {"flags": {}, "warehouse_path": "/bench"}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#;
    (h, body.to_vec())
}

/// RSS of a process and all its descendants (Celery's prefork children).
fn tree_rss_kib(root: u32) -> u64 {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Field 4 is the parent pid; the command name (field 2) may hold spaces.
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse().ok());
            if let Some(ppid) = ppid {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut total = 0;
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        total += status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        stack.extend(children.get(&pid).into_iter().flatten());
    }
    total
}
