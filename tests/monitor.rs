//! The metrics and health listener (`METRICS_ADDR`): `/metrics` read by
//! Python's `prometheus_client` parsers (Prometheus text and strict
//! OpenMetrics) shows each task under its outcome; `/healthz` and the
//! `healthcheck` command turn unhealthy when the broker goes away and
//! healthy again when it comes back; a bad or busy address stops the
//! worker at start with exit code 2.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);

/// `/healthz`: status code and body.
fn healthz(addr: &str) -> (u16, Value) {
    let out = Command::new("curl")
        .args(["-s", "-m", "5", "-w", "\n%{http_code}"])
        .arg(format!("http://{addr}/healthz"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

fn wait_health(addr: &str, code: u16, timeout: Duration) -> Value {
    let start = Instant::now();
    loop {
        let (status, body) = healthz(addr);
        if status == code {
            return body;
        }
        assert!(
            start.elapsed() < timeout,
            "/healthz stayed {status} {body}, expected {code}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `zimfarm-worker healthcheck` with `METRICS_ADDR`: exit code and output.
fn healthcheck(metrics_addr: Option<&str>) -> (i32, String) {
    let env: Vec<(String, String)> = metrics_addr
        .map(|addr| ("METRICS_ADDR".to_owned(), addr.to_owned()))
        .into_iter()
        .collect();
    let out = run_worker(&["healthcheck"], &env);
    (out.status.code().unwrap_or(-1), output_text(&out))
}

#[test]
fn metrics_show_each_task_under_its_outcome_and_parse_as_prometheus_text() {
    let addr = free_addr();
    let s = Stack::start("metrics", WorkerEnv::new().set("METRICS_ADDR", &addr)).within(T);
    let ok = [task_id(), task_id()];
    for id in &ok {
        send_task(&s.vh, "offliner.mwoffliner", id, &json!({}), &[]);
    }
    let bad = s.submit(Task::new(
        "offliner.youtube",
        json!({"simulate": {"fail": "boom"}}),
    ));
    let unknown = s.submit(Task::new("offliner.nope", json!({})));
    for id in &ok {
        s.expect_event("task-succeeded", id);
    }
    s.expect_event("task-failed", &bad);
    s.expect_event("task-failed", &unknown);
    // The first heartbeat goes out 2 s after start.
    let healthy = wait_health(&addr, 200, T);
    assert_eq!(healthy["healthy"], true, "{healthy}");

    let m = scrape(&addr);
    assert!(
        m["content_type"]
            .as_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{m}"
    );
    let tasks = "zimfarm_worker_tasks_total";
    assert_eq!(
        sample(
            &m,
            tasks,
            &[("task", "offliner.mwoffliner"), ("outcome", "succeeded")]
        ),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            tasks,
            &[("task", "offliner.youtube"), ("outcome", "failed")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, tasks, &[("task", "unknown"), ("outcome", "rejected")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, tasks, &[("outcome", "revoked")]),
        None,
        "no task was revoked"
    );
    assert_eq!(sample(&m, "zimfarm_worker_active_tasks", &[]), Some(0.0));
    assert_eq!(
        sample(&m, "zimfarm_worker_broker_connected", &[]),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "zimfarm_worker_broker_reconnects_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        sample(&m, "zimfarm_worker_info", &[("node", "metrics")]),
        Some(1.0)
    );
    let beat = sample(&m, "zimfarm_worker_last_heartbeat_timestamp_seconds", &[]).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - beat).abs() < 15.0, "heartbeat at {beat}, now {now}");
    let families = &m["families"];
    assert_eq!(families["zimfarm_worker_tasks"], "counter", "{families}");
    assert_eq!(families["zimfarm_worker_active_tasks"], "gauge");

    let (code, out) = healthcheck(Some(&addr));
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("healthy"), "{out}");
}

#[test]
fn healthz_turns_unhealthy_while_the_broker_is_gone() {
    let addr = free_addr();
    let sv = Services::new("health");
    let proxy = FaultProxy::start("127.0.0.1:5672");
    let url = proxy.url(&sv.vh);
    let worker = sv.spawn(
        "health",
        &WorkerEnv::new()
            .set("METRICS_ADDR", &addr)
            .set("BROKER_URL", &url),
    );
    worker.wait_connected();
    wait_health(&addr, 200, T);

    proxy.cut();
    let body = wait_health(&addr, 503, Duration::from_secs(20));
    assert_eq!(body["healthy"], false, "{body}");
    assert_eq!(body["broker_connected"], false, "{body}");
    assert!(
        body["problem"].as_str().unwrap().contains("broker"),
        "{body}"
    );
    let (code, out) = healthcheck(Some(&addr));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("unhealthy") && out.contains("broker"), "{out}");
    let m = scrape(&addr);
    assert_eq!(
        sample(&m, "zimfarm_worker_broker_connected", &[]),
        Some(0.0)
    );

    proxy.restore();
    let body = wait_health(&addr, 200, T);
    assert_eq!(body["broker_connected"], true, "{body}");
    let m = scrape(&addr);
    assert!(
        sample(&m, "zimfarm_worker_broker_reconnects_total", &[]).unwrap() >= 1.0,
        "{m}"
    );
}

#[test]
fn a_bad_or_busy_metrics_addr_stops_the_worker_with_exit_2() {
    let sv = Services::new("badmetrics");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    for (value, expect) in [
        (busy_addr.as_str(), "free port"),
        ("localhost:9090", "expected an IP address and port"),
    ] {
        let mut worker = sv.spawn("badmetrics", &WorkerEnv::new().set("METRICS_ADDR", value));
        let log = worker.expect_exit_2(T);
        assert!(
            log.contains("METRICS_ADDR") && log.contains(expect),
            "{value}: {log}"
        );
    }
    drop(busy);
}

#[test]
fn healthcheck_without_a_listener() {
    let (code, out) = healthcheck(None);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("nothing to check"), "{out}");
    let (code, out) = healthcheck(Some(&free_addr()));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("unhealthy") && out.contains("cannot reach"),
        "{out}"
    );
    let (code, out) = healthcheck(Some("nonsense"));
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("METRICS_ADDR"), "{out}");
}
