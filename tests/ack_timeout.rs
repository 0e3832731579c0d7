//! A task that outlives the broker's `consumer_timeout` (RabbitMQ 3.8.15 and
//! later close the channel of a delivery left unacked that long, 30 min by
//! default, and requeue it), against a real RabbitMQ with the timeout
//! lowered for the length of the test.
//!
//! The timeout is a setting of the whole broker: this file holds one test,
//! so that no other test of its binary runs meanwhile, and the settings
//! come back when it ends, however it ends.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// The broker's delivery timeout and how often its channels check it,
/// lowered while alive and restored when dropped.
struct ShortDeliveryTimeout {
    saved: Vec<(&'static str, String)>,
}

fn rabbit_eval(expr: &str) -> String {
    rabbitmqctl(&["eval", expr])
}

impl ShortDeliveryTimeout {
    fn set(timeout_ms: u64, tick_ms: u64) -> Self {
        let mut saved = Vec::new();
        for key in ["consumer_timeout", "channel_tick_interval"] {
            saved.push((
                key,
                rabbit_eval(&format!("application:get_env(rabbit, {key}).")),
            ));
        }
        rabbit_eval(&format!(
            "application:set_env(rabbit, consumer_timeout, {timeout_ms})."
        ));
        rabbit_eval(&format!(
            "application:set_env(rabbit, channel_tick_interval, {tick_ms})."
        ));
        Self { saved }
    }
}

impl Drop for ShortDeliveryTimeout {
    fn drop(&mut self) {
        for (key, was) in &self.saved {
            // `{ok,1800000}` or `undefined`.
            let expr = match was.strip_prefix("{ok,").and_then(|v| v.strip_suffix('}')) {
                Some(value) => format!("application:set_env(rabbit, {key}, {value})."),
                None => format!("application:unset_env(rabbit, {key})."),
            };
            let _ = std::process::Command::new("rabbitmqctl")
                .args(["eval", &expr])
                .output();
        }
    }
}

#[test]
fn a_task_past_the_delivery_timeout_is_named_counted_and_still_runs_once() {
    let _short = ShortDeliveryTimeout::set(3_000, 1_000);
    let metrics = free_addr();
    let (vh, _dir, events, worker) = stack("acktimeout", &[("METRICS_ADDR", metrics.as_str())]);
    let id = task_id();
    send_task(
        &vh,
        "offliner.mwoffliner",
        &id,
        &json!({
            "flags": {"mwUrl": "https://en.wikipedia.org", "adminEmail": "a@b.c"},
            "image": {"name": "openzim/mwoffliner", "tag": "1.9"},
            "warehouse_path": "/wikipedia",
            "simulate": {"sleep": 12.0},
        }),
        &[],
    );
    let started = Instant::now();
    events.wait_task_event("task-started", &id, Duration::from_secs(30));
    worker.wait_log("past its consumer_timeout", Duration::from_secs(30));
    let closed_after = started.elapsed();
    let log = worker.log_text();
    assert!(
        log.contains("delivery acknowledgement on channel")
            && log.contains("consumer_timeout in rabbitmq.conf"),
        "the log names the broker's reason and what to set:\n{log}"
    );
    events.wait_task_event("task-succeeded", &id, Duration::from_secs(60));
    let scraped = scrape(&metrics);
    assert!(
        sample(
            &scraped,
            "zimfarm_worker_broker_delivery_timeouts_total",
            &[]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{scraped}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        events.count("task-started", &id),
        1,
        "ran once on this single node"
    );
    assert_eq!(events.count("task-succeeded", &id), 1);
    eprintln!(
        "channel closed {:.1} s after the task was sent",
        closed_after.as_secs_f64()
    );
}
