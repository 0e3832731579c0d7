//! Pipeline overhead benchmark: tasks whose container exits at once (the
//! youtube stand-in, no helper), through the real worker and Docker engine,
//! beside a bare `docker run --rm` of the same image in the same run.
//!
//! Prints, as medians over 50 sequential tasks: publish → offliner container
//! started, container finished → `task-succeeded`, and the whole task end to
//! end; the bare `docker run --rm` median; and the wall time of 20 tasks at
//! CONCURRENCY=2. Needs `scripts/test-env.sh`; run with `scripts/bench.sh`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Vhost, worker_binary, worker_env};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};

const IMAGE: &str = "openzim/youtube:test";

struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let n: usize = std::env::var("BENCH_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    // Bare docker run --rm, the reference.
    let out = tempfile::tempdir().unwrap();
    let mut bare = Vec::new();
    for _ in 0..n.min(20) {
        let t = Instant::now();
        let status = Command::new("docker")
            .args(["run", "--rm", "--security-opt", "no-new-privileges", "-v"])
            .arg(format!("{}:/output", out.path().display()))
            .args([IMAGE, "youtube2zim", "--id=x", "--output=/output"])
            .stdout(Stdio::null())
            .status()
            .expect("docker runs");
        assert!(status.success());
        bare.push(t.elapsed());
    }
    let bare = median(bare);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (to_start, exit_to_done, end_to_end) = rt.block_on(sequential(n));
    let twenty = rt.block_on(batch(20));
    println!();
    println!("pipeline overhead, medians over {n} tasks (container exits at once, no helper)");
    println!(
        "  publish -> offliner container started   {:>8.1} ms",
        ms(to_start)
    );
    println!(
        "  container finished -> task-succeeded    {:>8.1} ms",
        ms(exit_to_done)
    );
    println!(
        "  whole task, publish -> task-succeeded   {:>8.1} ms",
        ms(end_to_end)
    );
    println!(
        "  bare `docker run --rm` of the image     {:>8.1} ms",
        ms(bare)
    );
    println!(
        "  ratio whole task / bare docker run      {:>8.2}x",
        end_to_end.as_secs_f64() / bare.as_secs_f64()
    );
    println!(
        "  20 tasks at CONCURRENCY=2               {:>8.2} s",
        twenty.as_secs_f64()
    );
}

struct Setup {
    _vh: Vhost,
    _dir: tempfile::TempDir,
    _worker: Reap,
    /// The warehouse; dropped after the worker.
    _sshd: common::sshd::Sshd,
    publish: Channel,
    events: Consumer,
}

async fn setup(concurrency: &str) -> Setup {
    let vh = Vhost::new("pipebench");
    let dir = tempfile::tempdir().unwrap();
    let conn = Connection::connect(&vh.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        "celeryev".into(),
        ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await
    .unwrap();
    let q = ch
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
        .unwrap();
    for key in ["task.#", "worker.online"] {
        ch.queue_bind(
            q.name().clone(),
            "celeryev".into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    let mut events = ch
        .basic_consume(
            q.name().clone(),
            "bench".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    // The upload stage is part of every task: a real sshd warehouse, with
    // the key registered at the (stand-in) dispatcher.
    let sshd = common::sshd::Sshd::start();
    let key = sshd.user_key(common::sshd::KeyKind::Ed25519);
    common::register_at_shared_dispatcher(sshd.user(), &key);
    let (port, key, known_hosts) = (
        sshd.port().to_string(),
        key.display().to_string(),
        sshd.known_hosts_file().display().to_string(),
    );
    let env = worker_env(
        &vh,
        dir.path(),
        &format!("pipebench{concurrency}"),
        &[
            ("TASK_RUNNER", "docker"),
            ("PULL_POLICY", "never"),
            ("MIN_FREE_DISK_MB", "10"),
            ("CONCURRENCY", concurrency),
            ("LOG_LEVEL", "warn"),
            ("USERNAME", sshd.user()),
            ("WAREHOUSE_HOST", "127.0.0.1"),
            ("WAREHOUSE_PORT", &port),
            ("SSH_KEY", &key),
            ("WAREHOUSE_KNOWN_HOSTS", &known_hosts),
        ],
    );
    let worker = Reap(
        Command::new(worker_binary())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    loop {
        let v = next_event(&mut events).await;
        if v["type"] == "worker-online" {
            break;
        }
    }
    let publish = conn.create_channel().await.unwrap();
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    Setup {
        _vh: vh,
        _dir: dir,
        _worker: worker,
        _sshd: sshd,
        publish,
        events,
    }
}

async fn next_event(events: &mut Consumer) -> serde_json::Value {
    let d = tokio::time::timeout(Duration::from_secs(60), events.next())
        .await
        .expect("an event within 60 s")
        .expect("stream")
        .expect("delivery");
    serde_json::from_slice(&d.data).unwrap_or_default()
}

async fn publish(ch: &Channel, id: &str) {
    let s = |v: &str| AMQPValue::LongString(LongString::from(v));
    let mut h = FieldTable::default();
    h.insert("lang".into(), s("py"));
    h.insert("task".into(), s("offliner.youtube"));
    h.insert("id".into(), s(id));
    let body = br#"[[], {"flags": {"id": "x"}, "image": {"name": "openzim/youtube", "tag": "test"}, "warehouse_path": "/videos"}, {}]"#;
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_headers(h);
    ch.basic_publish(
        "offliner".into(),
        "small".into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

async fn sequential(n: usize) -> (Duration, Duration, Duration) {
    let mut s = setup("1").await;
    let (mut to_start, mut exit_to_done, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let id = format!("{:024x}", 0xbe00 + i);
        let t0 = Instant::now();
        publish(&s.publish, &id).await;
        let (mut started, mut finished) = (None, None);
        loop {
            let v = next_event(&mut s.events).await;
            if v["uuid"] != id.as_str() {
                continue;
            }
            match v["type"].as_str() {
                Some("task-container_started") => started = Some(t0.elapsed()),
                Some("task-container_finished") => finished = Some(t0.elapsed()),
                Some("task-succeeded") => {
                    let done = t0.elapsed();
                    to_start.push(started.expect("started before succeeded"));
                    exit_to_done.push(done - finished.expect("finished before succeeded"));
                    total.push(done);
                    break;
                }
                Some("task-failed") => panic!("bench task failed: {v}"),
                _ => {}
            }
        }
    }
    (median(to_start), median(exit_to_done), median(total))
}

async fn batch(n: usize) -> Duration {
    let mut s = setup("2").await;
    let t0 = Instant::now();
    for i in 0..n {
        publish(&s.publish, &format!("{:024x}", 0xba00 + i)).await;
    }
    let mut done = 0;
    while done < n {
        let v = next_event(&mut s.events).await;
        match v["type"].as_str() {
            Some("task-succeeded") => done += 1,
            Some("task-failed") => panic!("bench task failed: {v}"),
            _ => {}
        }
    }
    t0.elapsed()
}
