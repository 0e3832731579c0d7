//! This process's view of the farm (one per worker, shared by every
//! probe and task), and the watcher that feeds it: per broker session, its
//! own channel on the session's connection and an exclusive queue
//! `celeryev.<uuid>` of every node's `worker-heartbeat`, `worker-online`
//! and `worker-offline`.
//!
//! Owns the [`Silence`] behind one lock (never held across an await) and
//! the watcher's queue. It decides nothing about a task: the probe
//! ([`super::Hold`]) and the worker read it.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, Consumer};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::silence::Silence;
use super::{ProbeError, probe_error};
use crate::broker::EVENT_EXCHANGE;

/// Worker events the watcher reads.
const WORKER_EVENTS: [&str; 3] = ["worker.heartbeat", "worker.online", "worker.offline"];
/// A worker event body larger than this is not read.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;
/// An own heartbeat is fresh when it comes back within this long of being
/// sent (its `timestamp`, by this node's own clock).
pub const FRESH: f64 = 3.0;
/// Between two attempts of a watcher whose queue failed.
const RETRY: Duration = Duration::from_secs(2);

/// The farm as this process hears it.
pub struct FarmView {
    me: String,
    silence: Mutex<Silence>,
    /// Counts the fresh own heartbeats.
    heard: watch::Sender<u64>,
    /// The live session's connection, for one-shot questions.
    link: watch::Sender<Option<Arc<Connection>>>,
}

/// The parts of a worker event the watcher reads.
#[derive(Debug, Deserialize)]
struct WorkerEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    timestamp: f64,
    #[serde(default)]
    task_ids: Option<Vec<String>>,
    #[serde(default)]
    kept: Vec<String>,
}

impl FarmView {
    /// The view of node `me`, whose farm beats every `heartbeat`, with
    /// RESTART_GRACE `grace`.
    pub fn new(me: &str, heartbeat: Duration, grace: Duration) -> Self {
        Self {
            me: me.to_owned(),
            silence: Mutex::new(Silence::new(heartbeat, grace, Instant::now())),
            heard: watch::Sender::new(0),
            link: watch::Sender::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Silence> {
        self.silence.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This node's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// This node was away for `away` before this start (see
    /// [`Silence::heard_last_at`]).
    pub fn away_for(&self, away: Duration) {
        if let Some(at) = Instant::now().checked_sub(away) {
            self.lock().heard_last_at(at);
        }
    }

    /// The node whose last list has `id`, other than this one.
    pub fn who_runs(&self, id: &str) -> Option<String> {
        self.lock().who_runs(id).map(str::to_owned)
    }

    /// How long `node` has been silent while this node heard the farm.
    pub fn silence_of(&self, node: &str) -> Duration {
        self.lock().silence_of(node)
    }

    /// Whether `node` went offline letting its tasks go.
    pub fn let_go(&self, node: &str) -> bool {
        self.lock().let_go(node)
    }

    /// `nodes` answered a question: a sign of life of each.
    pub fn answered<'a>(&self, nodes: impl IntoIterator<Item = &'a String>) {
        let now = Instant::now();
        let mut silence = self.lock();
        for node in nodes {
            if *node != self.me {
                silence.seen(node, now, None);
            }
        }
    }

    /// The deaf episodes over so far: what a task notes when it starts.
    pub fn episodes(&self) -> u64 {
        self.lock().episodes()
    }

    /// Whether a deaf episode happened since a task noted `noted` (or one
    /// is open now), and how long this node has not heard itself.
    pub fn deaf_since(&self, noted: u64) -> Option<Duration> {
        let now = Instant::now();
        let silence = self.lock();
        (silence.episodes_at(now) > noted).then(|| silence.deafness(now))
    }

    /// Waits until this node hears the farm (a fresh own heartbeat within
    /// two intervals) and has a live session: its connection.
    pub async fn hearing(&self) -> Arc<Connection> {
        let mut heard = self.heard.subscribe();
        let mut link = self.link.subscribe();
        loop {
            let connection = link.borrow_and_update().clone();
            let hearing = self.lock().hearing(Instant::now());
            if let (true, Some(connection)) = (hearing, connection) {
                return connection;
            }
            tokio::select! {
                _ = heard.changed() => {}
                _ = link.changed() => {}
                // The link may have stayed while the hearing went stale.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Reads one worker event received at `at`; `blocked`: the broker
    /// blocks this connection's publishers now.
    fn event(&self, body: &[u8], at: Instant, blocked: bool) {
        if body.len() > MAX_EVENT_BYTES {
            tracing::debug!(bytes = body.len(), "ignoring a worker event over 64 KiB");
            return;
        }
        let Ok(event) = serde_json::from_slice::<WorkerEvent>(body) else {
            return;
        };
        if event.hostname.is_empty() {
            return;
        }
        if event.hostname == self.me {
            if event.kind != "worker-heartbeat" && event.kind != "worker-online" {
                return;
            }
            let age = crate::celery::now_timestamp() - event.timestamp;
            if (-1.0..=FRESH).contains(&age) && !blocked {
                self.lock().own_heartbeat(at);
                self.heard.send_modify(|n| *n += 1);
            }
            return;
        }
        let mut silence = self.lock();
        match event.kind.as_str() {
            "worker-heartbeat" | "worker-online" => {
                silence.seen(&event.hostname, at, event.task_ids)
            }
            "worker-offline" => silence.offline(&event.hostname, at, event.kept),
            _ => {}
        }
    }

    /// Feeds the view from the session of `connection` until `over` fires:
    /// the watcher. Its errors are logged and it starts again while the
    /// session lives.
    pub async fn watch(self: Arc<Self>, connection: Arc<Connection>, over: CancellationToken) {
        self.link.send_replace(Some(connection.clone()));
        let mut warned = false;
        while !over.is_cancelled() {
            let error = tokio::select! {
                _ = over.cancelled() => break,
                error = self.watch_once(&connection) => error,
            };
            if warned {
                tracing::debug!(%error, "the farm watcher failed again; retrying");
            } else {
                tracing::warn!(%error, "the farm watcher failed; retrying while the session lives");
                warned = true;
            }
            tokio::select! {
                _ = over.cancelled() => break,
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
        self.link.send_if_modified(|link| {
            let ours = link.as_ref().is_some_and(|c| Arc::ptr_eq(c, &connection));
            if ours {
                *link = None;
            }
            ours
        });
    }

    /// One watcher queue, read until it fails.
    async fn watch_once(&self, connection: &Connection) -> ProbeError {
        let (channel, mut events) = match open_watcher(connection).await {
            Ok(opened) => opened,
            Err(error) => return error,
        };
        let error = loop {
            match events.next().await {
                Some(Ok(delivery)) => {
                    let blocked = connection.status().blocked();
                    self.event(&delivery.data, Instant::now(), blocked);
                }
                Some(Err(source)) => {
                    break ProbeError::Broker {
                        what: "reading worker events",
                        source,
                    };
                }
                None => {
                    break ProbeError::ConsumerEnded {
                        what: "worker event",
                    };
                }
            }
        };
        if channel.status().connected() {
            let _ = channel.close(200, "done".into()).await;
        }
        error
    }
}

/// The watcher's channel and consumer.
async fn open_watcher(connection: &Connection) -> Result<(lapin::Channel, Consumer), ProbeError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(probe_error("opening the farm watcher's channel"))?;
    let queue = format!("celeryev.{}", uuid::Uuid::new_v4());
    let private = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.as_str().into(), private, FieldTable::default())
        .await
        .map_err(probe_error("declaring the farm watcher's queue"))?;
    for key in WORKER_EVENTS {
        channel
            .queue_bind(
                queue.as_str().into(),
                EVENT_EXCHANGE.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(probe_error("binding the farm watcher's queue"))?;
    }
    let consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(probe_error("consuming the farm watcher's queue"))?;
    Ok((channel, consumer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(kind: &str, host: &str, ts: f64, extra: &str) -> Vec<u8> {
        format!(r#"{{"type": "{kind}", "hostname": "{host}", "timestamp": {ts}{extra}}}"#)
            .into_bytes()
    }

    #[test]
    fn events_feed_the_view_and_only_fresh_unblocked_own_heartbeats_count() {
        let view = FarmView::new("me@x", Duration::from_secs(2), Duration::from_secs(16));
        let now = crate::celery::now_timestamp();
        let t0 = Instant::now();
        // Anchors this node's hearing at t0.
        view.event(&body("worker-heartbeat", "me@x", now, ""), t0, false);
        view.event(
            &body("worker-heartbeat", "a@x", now, r#", "task_ids": ["t1"]"#),
            t0,
            false,
        );
        assert_eq!(view.who_runs("t1").as_deref(), Some("a@x"));
        // A fresh own heartbeat: 2 s of silence for a.
        view.event(
            &body("worker-heartbeat", "me@x", now, ""),
            t0 + Duration::from_secs(2),
            false,
        );
        assert_eq!(view.silence_of("a@x"), Duration::from_secs(2));
        // A stale one, or one while blocked: nothing.
        view.event(
            &body("worker-heartbeat", "me@x", now - 10.0, ""),
            t0 + Duration::from_secs(4),
            false,
        );
        view.event(
            &body("worker-heartbeat", "me@x", now, ""),
            t0 + Duration::from_secs(4),
            true,
        );
        assert_eq!(view.silence_of("a@x"), Duration::from_secs(2));
        assert_eq!(*view.heard.borrow(), 2);
        // A body over 64 KiB is not read.
        let big = body(
            "worker-heartbeat",
            "a@x",
            now,
            &format!(r#", "pad": "{}""#, "x".repeat(MAX_EVENT_BYTES)),
        );
        view.event(&big, t0 + Duration::from_secs(5), false);
        assert_eq!(view.silence_of("a@x"), Duration::from_secs(2));
        // A goodbye keeping t1; then one letting go.
        view.event(
            &body("worker-offline", "a@x", now, r#", "kept": ["t1"]"#),
            t0,
            false,
        );
        assert_eq!(view.who_runs("t1").as_deref(), Some("a@x"));
        assert_eq!(view.silence_of("a@x"), Duration::ZERO);
        view.event(&body("worker-offline", "a@x", now, ""), t0, false);
        assert_eq!(view.who_runs("t1"), None);
        assert!(view.let_go("a@x"));
    }
}
