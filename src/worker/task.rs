//! One accepted task's life: the `eta` hold, a slot, the run (with its time
//! limits and cancellation), and the end: recorded in `ended`, reported
//! (final event, rpc result), then acked; or, when this node could not
//! hear the farm for a long while and another node took the task over
//! meanwhile (asked before the upload and before the end, see
//! [`crate::farm::taken_over`]), dropped: nothing reported or recorded,
//! its message requeued.
//!
//! Owns the order of those steps; how a task runs is the [`Runner`]'s.

use super::conclusion::{Ending, conclude};
use super::*;
use crate::farm::Ownership;
use crate::progress::TaskProgress;

impl<R: Runner> Inner<R> {
    /// One task from acceptance to ack: eta hold, slot, run, final event.
    pub(super) async fn task_life(
        self: Arc<Self>,
        request: Arc<TaskRequest>,
        cancel: Cancellation,
        delivery: DeliveryInfo,
    ) {
        if let Some(eta) = request.eta {
            let wait = (eta - chrono::Utc::now()).to_std().unwrap_or_default();
            if !wait.is_zero() {
                tracing::info!(eta = %eta, "holding the task until its eta");
                // Held without a slot: the broker may fill the one it took.
                self.prefetch.settle().await;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = cancel.cancelled() => {}
                }
            }
            // Its eta came (or passed on the way here): it wants a slot
            // now, unless it was cancelled or dropped meanwhile.
            if !cancel.is_cancelled() && self.registry.due(&request.id, &cancel) {
                self.prefetch.want_slot(&request.id).await;
            }
        }
        let permit = tokio::select! {
            permit = self.slots.clone().acquire_owned() => permit.ok(),
            _ = cancel.cancelled() => None,
        };
        // Started under the registry's lock, unless it was dropped (its
        // message went back with its session) at that very moment.
        let started_at = match &permit {
            Some(_) if !cancel.is_cancelled() => self.registry.start(&request, &cancel),
            _ => None,
        };
        let (outcome, slot) = match (permit, started_at) {
            // Cancelled while waiting (a revoke, shutdown, its message gone
            // with its session): it never ran.
            (None, _) | (Some(_), None) => (Err(RunError::Cancelled), None),
            (Some(permit), Some(started_at)) => {
                // The deaf episodes so far: one after this makes the task
                // ask the farm before it uploads or ends (`crate::farm`).
                let noted = Arc::new(AtomicU64::new(self.farm.episodes()));
                self.events.emit(&EventKind::TaskStarted {
                    uuid: request.id.clone(),
                });
                tracing::info!("task started");
                let active = metrics::global().task_running();
                // Planned as it starts: a refusal fails the task before
                // anything runs.
                let outcome = match self.runner.plan(&request) {
                    Ok(plan) => {
                        let carry = Arc::new(carry::carry(&request, &delivery));
                        self.run_guarded(&request, plan, &cancel, carry, started_at, &noted)
                            .await
                    }
                    Err(refused) => Err(refused.into()),
                };
                drop(active);
                (outcome, Some((permit, noted)))
            }
        };
        let (slot, noted) = slot.unzip();
        self.finish(&request, outcome, &cancel, slot, noted.as_deref())
            .await;
    }

    /// Runs the runner on `plan` in its own tokio task (a panic fails the
    /// task, not the worker), with the message's hard time limit counted
    /// from `started_at` (epoch seconds: now for a fresh task, the first
    /// run's start for an adopted one), handing it the worker's `carry`
    /// and the check before an upload (see [`crate::farm::taken_over`];
    /// `noted`: the deaf episodes counted when the task started).
    pub(super) async fn run_guarded(
        &self,
        request: &Arc<TaskRequest>,
        plan: TaskPlan<R>,
        cancel: &Cancellation,
        carry: Arc<serde_json::Value>,
        started_at: f64,
        noted: &Arc<AtomicU64>,
    ) -> Result<Vec<TaskFile>, RunError> {
        let progress = TaskProgress::new(started_at);
        self.registry
            .set_progress(&request.id, cancel, progress.clone());
        let ctx =
            TaskContext::with_cancellation(request.id.clone(), cancel.clone(), self.events.clone())
                .carrying(carry, started_at)
                .checking_uploads(self.upload_check(&request.id, cancel, noted))
                .with_progress(progress.clone());
        // Its `task-progress` events, until the run returns (or panics).
        let _reporter = {
            let (events, id) = (self.events.clone(), request.id.clone());
            let ended = Arc::new(std::sync::Mutex::new(false));
            let stop = ended.clone();
            let report = crate::progress::report(
                progress,
                self.config.worker.progress_interval,
                move |snapshot| {
                    let ended = stop.lock().unwrap_or_else(|p| p.into_inner());
                    if *ended {
                        return;
                    }
                    events.emit(&EventKind::progress(&id, &snapshot));
                    metrics::global().task_progress(&id, &snapshot);
                },
            );
            Reporter {
                handle: tokio::spawn(report.instrument(tracing::Span::current())),
                task_id: request.id.clone(),
                ended,
            }
        };
        let mut handle = tokio::spawn(
            self.runner
                .run(plan, ctx)
                .instrument(tracing::Span::current()),
        );
        let hard = request
            .time_limit
            .hard
            .filter(|h| h.is_finite() && *h > 0.0);
        let elapsed = celery::now_timestamp() - started_at;
        let limit = async {
            match hard {
                Some(h) => tokio::time::sleep(remaining(h, elapsed)).await,
                None => std::future::pending().await,
            }
        };
        let joined = tokio::select! {
            joined = &mut handle => joined,
            _ = limit => {
                let h = hard.unwrap_or_default();
                tracing::warn!(hard_limit = h, "task hit its hard time limit; stopping it");
                // Unless it was cancelled already: then the first reason
                // stands.
                cancel.cancel(CancelReason::TimeLimit { hard: h });
                handle.await
            }
        };
        match joined {
            Ok(outcome) => outcome,
            Err(join) => {
                let message = if join.is_panic() {
                    let panic = join.into_panic();
                    let text = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_else(|| "unknown panic".to_owned());
                    format!("the task panicked: {text}")
                } else {
                    "the task was aborted".to_owned()
                };
                tracing::error!("{message}");
                Err(TaskError::runtime(message).into())
            }
        }
    }

    /// The check a task's runner awaits before it uploads: whether another
    /// node took the task over while this node could not hear the farm.
    /// Taken over: its cancellation fires ([`CancelReason::TakenOver`]).
    /// The worker stopping meanwhile: it waits for the stop's own reason.
    fn upload_check(
        &self,
        id: &str,
        cancel: &Cancellation,
        noted: &Arc<AtomicU64>,
    ) -> crate::runner::BeforeUpload {
        let (farm, id, cancel, noted) = (
            self.farm.clone(),
            id.to_owned(),
            cancel.clone(),
            noted.clone(),
        );
        let stop = self.stop.token().clone();
        Arc::new(move || {
            let (farm, id, cancel, noted, stop) = (
                farm.clone(),
                id.clone(),
                cancel.clone(),
                noted.clone(),
                stop.clone(),
            );
            Box::pin(
                async move {
                    match crate::farm::taken_over(&farm, &id, &noted, &stop).await {
                        Ownership::Ours => Ok(()),
                        Ownership::TakenOver { node } => {
                            tracing::warn!(node = %node, "another node took this task over while this node could not hear the farm; not uploading");
                            cancel.cancel(CancelReason::TakenOver);
                            Err(RunError::Cancelled)
                        }
                        Ownership::Unknown => {
                            cancel.cancelled().await;
                            Err(RunError::Cancelled)
                        }
                    }
                }
                .in_current_span(),
            )
        })
    }

    /// Reports how the task ended (cancelled, with `cancel`'s reason, if it
    /// was), then acks its message(s) once the broker confirmed the report.
    /// A task stopped by shutdown is not acked: its message goes back to the
    /// queue for another worker. A task that ran here (`noted`: the deaf
    /// episodes counted when it started) first checks that no other node
    /// took it over while this node could not hear the farm; one taken
    /// over is dropped, nothing reported.
    pub(super) async fn finish(
        self: &Arc<Self>,
        request: &TaskRequest,
        outcome: Result<Vec<TaskFile>, RunError>,
        cancel: &Cancellation,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
        noted: Option<&AtomicU64>,
    ) {
        let id = request.id.clone();
        let mut reason = cancel.reason();
        let mut outcome = outcome;
        let leaving = matches!(
            reason,
            Some(CancelReason::Shutdown | CancelReason::Leave | CancelReason::TakenOver)
        );
        if let (Some(noted), false) = (noted, leaving) {
            match crate::farm::taken_over(&self.farm, &id, noted, self.stop.token()).await {
                Ownership::Ours => {}
                Ownership::TakenOver { node } => {
                    tracing::warn!(node = %node, "another node took this task over while this node could not hear the farm; not ending it here");
                    cancel.cancel(CancelReason::TakenOver);
                }
                Ownership::Unknown => {
                    // The worker stops: the task goes back to the broker
                    // unreported, as any task a shutdown stops.
                    cancel.cancel(CancelReason::Shutdown);
                    outcome = Err(RunError::Cancelled);
                }
            }
            reason = cancel.reason();
        }
        if reason == Some(CancelReason::TakenOver) {
            self.taken_over(&id, slot).await;
            return;
        }
        let started = self.registry.started(&id);
        let runtime = started.map_or(0.0, |s| (celery::now_timestamp() - s).max(0.0));
        match &outcome {
            Ok(files) => tracing::info!(files = files.len(), runtime, "task succeeded"),
            Err(RunError::Failed(error)) => tracing::error!(%error, "task failed"),
            Err(RunError::Cancelled) => {}
        }
        let Ending {
            event,
            state,
            outcome: ended_as,
        } = match conclude(&id, &outcome, reason, runtime) {
            Some(ending) => ending,
            // Dropped at its session's end, out of the registry and the
            // book already (a redelivery may be there now, under its id).
            None if reason == Some(CancelReason::MessageReturned) => {
                tracing::info!(
                    "dropping the task before it started: its message went back to the broker with the lost session"
                );
                return;
            }
            None => {
                tracing::info!("task stopped by shutdown; its message goes back to the queue");
                self.registry.remove(&id);
                self.prefetch.forget(&id);
                return;
            }
        };
        if let EventKind::TaskRevoked { terminated, .. } = &event {
            tracing::warn!(terminated, "task revoked");
        }
        // `ready` to `query_task` from here on: it ended (a task stopped by
        // shutdown never says so, and a holder elsewhere runs it).
        self.registry.set_phase(&id, TaskPhase::Ending);
        // On disk before the event leaves: if the worker dies after sending
        // it but before the ack, the redelivery (here or after a restart)
        // finds the record and re-sends the event instead of running the
        // task again. A failed write still lets the outcome go out.
        let succeeded = matches!(event, EventKind::TaskSucceeded { .. });
        metrics::global().task_ended(&request.name, ended_as);
        match self.ended.record(&id, &event).await {
            Ok(()) if releasable(&event) => {
                self.tasks.spawn(
                    self.runner
                        .release(&id)
                        .instrument(tracing::Span::current()),
                );
            }
            Ok(()) => {}
            Err(error) => {
                record_failed(&error);
                if succeeded {
                    tracing::warn!(
                        "keeping the task's files: without the record, a redelivery after a restart would need them"
                    );
                }
            }
        }
        let confirmed = self
            .events
            .emit_final(&event, request.reply_to.as_deref(), &id, &state);
        // The task is over for whoever watches the events: free its slot,
        // and let the broker send the next message while this one waits
        // for its confirm (it then holds no slot, but is still unacked).
        drop(slot);
        self.prefetch.slot_freed(&id);
        let this = self.clone();
        self.tasks
            .spawn(async move { this.prefetch.settle().await }.in_current_span());
        // Ack only once the final event is safely with the broker: if the
        // connection drops first, the redelivery finds the task in `ended`
        // and sends its final event again.
        if confirmed.await.is_ok() {
            self.ended.confirmed(&id);
        }
        self.registry.remove(&id);
        self.counters.processed.fetch_add(1, Ordering::Relaxed);
        self.prefetch.end(&id).await;
    }
}

impl<R: Runner> Inner<R> {
    /// Drops a task another node took over while this node could not hear
    /// the farm: what it left is stopped and removed, nothing is reported
    /// or recorded, and its messages held here go back to the broker.
    async fn taken_over(
        self: &Arc<Self>,
        id: &str,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        tracing::warn!(
            "another node took this task over while this node could not hear the farm; dropping it"
        );
        metrics::global().task_taken_over();
        self.tasks
            .spawn(self.runner.forsake(id).instrument(tracing::Span::current()));
        self.registry.remove(id);
        drop(slot);
        for acker in self.prefetch.give_back(id) {
            if let Err(error) = acker.reject(BasicRejectOptions { requeue: true }).await {
                tracing::debug!(%error, "requeue failed; the message goes back with its channel");
            }
        }
        self.prefetch.settle().await;
    }
}

/// What is left of a hard time limit of `hard` s after `elapsed` s of run
/// (a clock that went back counts as no time gone): at least nothing.
pub(super) fn remaining(hard: f64, elapsed: f64) -> Duration {
    let elapsed = if elapsed.is_finite() {
        elapsed.max(0.0)
    } else {
        0.0
    };
    Duration::from_secs_f64((hard.min(1e9) - elapsed).max(0.0))
}

/// A task's end could not be written to the record of ended tasks.
pub(super) fn record_failed(error: &crate::ended::EndedError) {
    tracing::error!(
        %error,
        "could not record the task's end on disk; sending its outcome anyway (a redelivery after a restart would run it again)"
    );
}

/// Whether what a task left behind can go once its end is recorded: its
/// files are uploaded (success), or nobody wants them any more (revoked).
/// A failed task's files stay: an upload that failed for good keeps them.
pub(super) fn releasable(event: &EventKind) -> bool {
    matches!(
        event,
        EventKind::TaskSucceeded { .. } | EventKind::TaskRevoked { .. }
    )
}

/// A task's progress reporter: stopped, and its metrics series removed,
/// when the run is over, on every path.
struct Reporter {
    handle: tokio::task::JoinHandle<()>,
    task_id: String,
    /// Set when the run is over: an abort does not stop a reporter that
    /// another thread is running right then, and its emit must not put the
    /// task's series back (a label left for good) nor follow the final
    /// event.
    ended: Arc<std::sync::Mutex<bool>>,
}

impl Drop for Reporter {
    fn drop(&mut self) {
        let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        *ended = true;
        self.handle.abort();
        metrics::global().task_progress_ended(&self.task_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hard_limit_counts_from_the_first_start() {
        assert_eq!(remaining(600.0, 0.0), Duration::from_secs(600));
        assert_eq!(remaining(600.0, 100.0), Duration::from_secs(500));
        // Adopted past its limit: it is stopped at once.
        assert_eq!(remaining(600.0, 900.0), Duration::ZERO);
        // A start in the future (the wall clock went back): no time gone.
        assert_eq!(remaining(600.0, -50.0), Duration::from_secs(600));
        assert_eq!(remaining(600.0, f64::NAN), Duration::from_secs(600));
        assert_eq!(remaining(1e12, 0.0), Duration::from_secs(1_000_000_000));
    }
}
