//! `worker-heartbeat` every [`HEARTBEAT_SECS`] (the session loop sends
//! `worker-online` when it goes live), and the worker figures both carry
//! (Celery's `WorkerStats`, and the ids of the tasks running here, which
//! the farm reads: see [`crate::farm`]).
//!
//! Owns the heartbeat and its figures; it decides nothing about tasks.

use super::*;

impl<R: Runner> Inner<R> {
    pub(super) fn stats(&self) -> WorkerStats {
        let mut task_ids = self.registry.running_ids();
        if task_ids.len() > celery::MAX_LISTED_TASKS {
            tracing::debug!(
                running = task_ids.len(),
                listed = celery::MAX_LISTED_TASKS,
                "more tasks run here than a heartbeat lists; the rest are left out"
            );
            task_ids.truncate(celery::MAX_LISTED_TASKS);
        }
        WorkerStats {
            freq: HEARTBEAT_SECS,
            active: self.registry.active(),
            processed: self.counters.processed.load(Ordering::Relaxed),
            loadavg: loadavg(),
            task_ids,
        }
    }

    pub(super) async fn heartbeats(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(HEARTBEAT_SECS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        tick.tick().await;
        // The last heartbeat sent, until the broker confirms it (health).
        let mut pending: Option<crate::events::Confirmed> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                confirmed = async { pending.as_mut().expect("guarded").await }, if pending.is_some() => {
                    pending = None;
                    if confirmed.is_ok() {
                        metrics::global().heartbeat_confirmed();
                    }
                }
                _ = tick.tick() => {
                    // A heartbeat queued while the broker is away would only
                    // be stale when it finally leaves.
                    if self.outbox.is_connected() {
                        pending = Some(self.events.emit_confirmed(&EventKind::WorkerHeartbeat(self.stats())));
                    }
                }
            }
        }
    }
}

/// Marks the worker as beating once the broker confirms `worker-online`.
pub(super) async fn heartbeat_confirmed(confirmed: crate::events::Confirmed) {
    if confirmed.await.is_ok() {
        metrics::global().heartbeat_confirmed();
    }
}

/// The 1, 5 and 15 minute load averages, as Celery reports them.
pub(super) fn loadavg() -> [f64; 3] {
    // /proc/loadavg is a kernel buffer: reading it never blocks on I/O.
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut out = [0.0; 3];
    for (slot, part) in out.iter_mut().zip(text.split_whitespace()) {
        *slot = (part.parse::<f64>().unwrap_or(0.0) * 100.0).round() / 100.0;
    }
    out
}
