//! Adopting at start the tasks an earlier run of this node left running
//! (a SIGTERM, a crash): which ones ([`decide`], pure, from what the
//! runner found and how long the node was away), their place in the
//! registry, the prefetch book and the slots before the first connect,
//! their lives once the node's name is ours, and the kept tasks not
//! adopted (away too long), forsaken after [`STALE_WAIT`] unless their
//! message ran them here. Also the alive-time the runner keeps on disk,
//! every [`ALIVE_EVERY`].
//!
//! Owns those decisions and the order of those steps; what a kept task
//! is on disk and in the engine is the runner's, and an adopted task runs
//! through the same [`Runner::plan`] and [`Runner::run`] as a fresh one.

use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use super::carry::{self, Carried};
use super::*;
use crate::celery::log_text;
use crate::runner::{KeptTask, KeptTasks};

/// How long after the first connect a kept task not adopted (the node was
/// away longer than RESTART_GRACE) may still be run here, when its
/// message comes back to this node, before it is forsaken.
pub(super) const STALE_WAIT: Duration = Duration::from_secs(60);
/// Between two alive-times written by the runner.
pub(super) const ALIVE_EVERY: Duration = Duration::from_secs(5);

/// What becomes of the kept tasks, decided from what the runner found.
#[derive(Debug, Default)]
pub(super) struct Decision {
    /// Carried on: each with its request read back from its carry.
    pub adopt: Vec<(KeptTask, Carried)>,
    /// The node was away too long: kept until [`STALE_WAIT`] says whether
    /// their message runs them here.
    pub stale: Vec<KeptTask>,
    /// Their carry cannot be read (a newer worker wrote it, or it is
    /// broken): forsaken once the node's name is ours, with why.
    pub unreadable: Vec<(KeptTask, String)>,
}

/// Decides which kept tasks are adopted: all those whose carry reads back,
/// when the node was away no longer than `grace` (or there is no record of
/// its absence); none when it was away longer.
pub(super) fn decide(kept: KeptTasks, grace: Duration) -> Decision {
    let mut decision = Decision::default();
    let mut seen = std::collections::HashSet::new();
    let too_long = kept.away.is_some_and(|away| away > grace);
    for task in kept.tasks {
        if !seen.insert(task.task_id.clone()) {
            continue;
        }
        if too_long {
            decision.stale.push(task);
            continue;
        }
        match carry::read(&task.carry) {
            Ok(carried) if carried.request.id == task.task_id => {
                decision.adopt.push((task, carried))
            }
            Ok(carried) => {
                let why = format!(
                    "its carry is of another task ({})",
                    celery::log_text(&carried.request.id)
                );
                decision.unreadable.push((task, why));
            }
            Err(error) => {
                let why = error.to_string();
                decision.unreadable.push((task, why));
            }
        }
    }
    decision
}

/// What the start decided, for the first connect to carry out.
#[derive(Default)]
pub(super) struct Adoption {
    adopted: Vec<Adopted>,
    stale: Vec<String>,
    unreadable: Vec<String>,
    /// Kept tasks that ended here already (the earlier run died between
    /// recording the end and letting go of the task): not run again; with
    /// whether what they left can go.
    ended: Vec<(String, bool)>,
}

impl Adoption {
    /// The tasks whose containers the runner keeps when it claims the
    /// node: the adopted ones and those that wait for their message.
    pub(super) fn keep(&self) -> Vec<String> {
        (self.adopted.iter().map(|a| a.request.id.clone()))
            .chain(self.stale.iter().cloned())
            .collect()
    }
}

/// One adopted task, in the registry and the prefetch book, waiting for
/// the node's name to be ours.
struct Adopted {
    request: Arc<TaskRequest>,
    cancel: Cancellation,
    started_at: f64,
    carry: Arc<Value>,
    slot: Slot,
}

/// An adopted task's slot: taken at adoption, or (more adopted than
/// CONCURRENCY) waited for in the slots' queue while it runs, ahead of
/// every task received later.
enum Slot {
    Held(OwnedSemaphorePermit),
    Queued {
        permit: oneshot::Receiver<OwnedSemaphorePermit>,
        /// Fired when the task ends: the wait stops.
        done: CancellationToken,
    },
}

impl<R: Runner> Inner<R> {
    /// Adopts what [`decide`] says of `kept`: each adopted task enters the
    /// registry (active, since its first start), the prefetch book (a slot
    /// held, its message not here yet) and takes a slot, in order. Runs
    /// before the first connect, so the first prefetch counts them; their
    /// lives start once the node's name is ours ([`Inner::carry_on`]).
    pub(super) fn adopt(self: &Arc<Self>, kept: KeptTasks) -> Adoption {
        let away = kept.away;
        let grace = self.config.worker.restart_grace;
        let decision = decide(kept, grace);
        if !decision.stale.is_empty() {
            tracing::warn!(
                away_s = away.map(|a| a.as_secs()),
                restart_grace_s = grace.as_secs(),
                kept = decision.stale.len(),
                stale_wait_s = STALE_WAIT.as_secs(),
                "this node was away longer than RESTART_GRACE: its kept scrapes are not carried on, \
                 unless a task's message comes back to this node within STALE_WAIT of the first \
                 connect; the others are then removed (their tasks may have run elsewhere)"
            );
        }
        let mut adoption = Adoption {
            stale: decision.stale.into_iter().map(|t| t.task_id).collect(),
            ..Adoption::default()
        };
        for (task, why) in decision.unreadable {
            tracing::warn!(
                task_id = %task.task_id,
                offliner = %log_text(&task.offliner),
                stage = task.stage,
                %why,
                "cannot carry on a kept task: it is removed once this node's name is ours"
            );
            adoption.unreadable.push(task.task_id);
        }
        for (task, carried) in decision.adopt {
            if let Some(event) = self.ended.get(&task.task_id) {
                tracing::warn!(
                    task_id = %task.task_id,
                    offliner = %log_text(&task.offliner),
                    stage = task.stage,
                    event = event.event_type(),
                    "a kept task already ended here (its end is on record): not carrying it on; \
                     what it left is removed once this node's name is ours"
                );
                adoption.ended.push((task.task_id, releasable(&event)));
                continue;
            }
            let Carried { request, delivery } = carried;
            let request = Arc::new(request);
            let cancel = Cancellation::new();
            self.registry.adopt(TaskEntry::adopted(
                request.clone(),
                cancel.clone(),
                delivery,
                task.started_at,
            ));
            self.prefetch.adopt(&request.id);
            let slot = match self.slots.clone().try_acquire_owned() {
                Ok(permit) => Slot::Held(permit),
                Err(_) => self.queue_for_slot(&cancel),
            };
            tracing::info!(
                task_id = %request.id,
                offliner = %log_text(&task.offliner),
                age_s = task.age.as_secs(),
                stage = task.stage,
                slot = matches!(slot, Slot::Held(_)),
                "adopting a task an earlier run of this node left running"
            );
            metrics::global().kept_task_adopted();
            adoption.adopted.push(Adopted {
                request,
                cancel,
                started_at: task.started_at,
                carry: Arc::new(task.carry),
                slot,
            });
        }
        adoption
    }

    /// Waits for a slot in the slots' queue, in a task of its own started
    /// now (before any task is received, so ahead of all of them).
    fn queue_for_slot(&self, cancel: &Cancellation) -> Slot {
        let (sent, permit) = oneshot::channel();
        let done = CancellationToken::new();
        let slots = self.slots.clone();
        let (stop, cancel) = (done.clone(), cancel.clone());
        self.tasks.spawn(async move {
            tokio::select! {
                permit = slots.acquire_owned() => {
                    if let Ok(permit) = permit {
                        let _ = sent.send(permit);
                    }
                }
                _ = stop.cancelled() => {}
                _ = cancel.cancelled() => {}
            }
        });
        Slot::Queued { permit, done }
    }

    /// Once the node's name is ours (the runner claimed it, keeping the
    /// adopted and stale tasks): removes the kept tasks that cannot be
    /// carried on, starts the adopted tasks' lives, and the wait after
    /// which the stale ones not run here are forsaken.
    pub(super) fn carry_on(self: &Arc<Self>, adoption: Adoption) {
        for id in adoption.unreadable {
            self.forsake(id, "unreadable_carry");
        }
        for (id, releasable) in adoption.ended {
            // Not kept at the claim: its containers are gone; its files go
            // as any ended task's do (a failed one's stay).
            metrics::global().kept_task_removed("ended_here");
            if releasable {
                let span = tracing::info_span!("task", task_id = %id);
                self.tasks.spawn(self.runner.release(&id).instrument(span));
            }
        }
        for adopted in adoption.adopted {
            let span = tracing::info_span!("task", task_id = %adopted.request.id);
            self.tasks
                .spawn(self.clone().adopted_life(adopted).instrument(span));
        }
        if !adoption.stale.is_empty() {
            let this = self.clone();
            self.tasks.spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(STALE_WAIT) => {}
                    _ = this.stop.cancelled() => return,
                }
                for id in adoption.stale {
                    if this.registry.contains(&id) {
                        continue;
                    }
                    tracing::warn!(
                        task_id = %id,
                        stale_wait_s = STALE_WAIT.as_secs(),
                        "removing a scrape kept while this node was away longer than \
                         RESTART_GRACE: its message did not come back here within STALE_WAIT"
                    );
                    this.forsake(id, "away_too_long");
                }
            });
        }
    }

    /// Removes a kept task that is not carried on; nothing is sent for it.
    fn forsake(self: &Arc<Self>, id: String, reason: &'static str) {
        metrics::global().kept_task_removed(reason);
        let span = tracing::info_span!("task", task_id = %id);
        self.tasks.spawn(self.runner.forsake(&id).instrument(span));
    }

    /// An adopted task's life: the same run as a fresh task's (planned,
    /// then run with its carry and its first start), without a second
    /// `task-started`, ended as any task.
    async fn adopted_life(self: Arc<Self>, adopted: Adopted) {
        let Adopted {
            request,
            cancel,
            started_at,
            carry,
            slot,
        } = adopted;
        let active = metrics::global().task_running();
        // Noted at its (re)start: an absence long enough is an open deaf
        // episode, and the task asks the farm before it ends.
        let noted = Arc::new(AtomicU64::new(self.farm.episodes()));
        let mut refused = false;
        let outcome = if cancel.is_cancelled() {
            Err(RunError::Cancelled)
        } else {
            match self.runner.plan(&request) {
                Ok(plan) => {
                    self.run_guarded(&request, plan, &cancel, carry, started_at, &noted)
                        .await
                }
                Err(error) => {
                    // Its scraper runs on otherwise, with nobody to follow it.
                    refused = true;
                    tracing::error!(%error, "an adopted task is refused now; failing it and removing what it left");
                    Err(error.into())
                }
            }
        };
        drop(active);
        let permit = match slot {
            Slot::Held(permit) => Some(permit),
            Slot::Queued { mut permit, done } => {
                done.cancel();
                permit.try_recv().ok()
            }
        };
        self.finish(&request, outcome, &cancel, permit, Some(&noted))
            .await;
        if refused {
            self.runner.forsake(&request.id).await;
        }
    }

    /// Has the runner keep an alive-time on disk every [`ALIVE_EVERY`]
    /// until `stop`.
    pub(super) async fn alive(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(ALIVE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.runner.alive().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::celery::control::DeliveryInfo;
    use serde_json::Map;

    const A: &str = "6f1c9a0b-2d3e-4f5a-8b7c-8d9e0f1a2b3c";
    const B: &str = "7a2d0b1c-3e4f-5a6b-9c8d-9e0f1a2b3c4d";

    fn kept(id: &str, carry_id: &str) -> KeptTask {
        let request = TaskRequest::new(carry_id.to_owned(), "t".to_owned(), vec![], Map::new());
        let delivery = DeliveryInfo {
            exchange: String::new(),
            routing_key: "q".to_owned(),
            priority: None,
            redelivered: false,
        };
        KeptTask {
            task_id: id.to_owned(),
            carry: carry::carry(&request, &delivery),
            started_at: 1_700_000_000.0,
            age: Duration::from_secs(30),
            stage: "generate",
            offliner: "ghcr.io/openzim/mwoffliner:1".to_owned(),
        }
    }

    fn ids<T>(list: &[T], id: impl Fn(&T) -> &str) -> Vec<String> {
        list.iter().map(|t| id(t).to_owned()).collect()
    }

    #[test]
    fn within_the_grace_every_readable_kept_task_is_adopted() {
        let mut broken = kept(B, B);
        broken.carry = serde_json::json!({"version": 99});
        let grace = Duration::from_secs(600);
        for away in [None, Some(Duration::from_secs(5)), Some(grace)] {
            let d = decide(
                KeptTasks {
                    tasks: vec![kept(A, A), broken.clone(), kept(A, A)],
                    away,
                },
                grace,
            );
            assert_eq!(ids(&d.adopt, |(t, _)| &t.task_id), [A]);
            assert_eq!(d.adopt[0].1.request.id, A);
            assert_eq!(ids(&d.unreadable, |(t, _)| &t.task_id), [B]);
            assert!(
                d.unreadable[0].1.contains("newer worker"),
                "{}",
                d.unreadable[0].1
            );
            assert!(d.stale.is_empty());
        }
    }

    #[test]
    fn away_longer_than_the_grace_nothing_is_adopted() {
        let d = decide(
            KeptTasks {
                tasks: vec![kept(A, A), kept(B, B)],
                away: Some(Duration::from_secs(601)),
            },
            Duration::from_secs(600),
        );
        assert!(d.adopt.is_empty());
        assert_eq!(ids(&d.stale, |t| &t.task_id), [A, B]);
    }

    #[test]
    fn a_carry_of_another_task_is_not_adopted() {
        let d = decide(
            KeptTasks {
                tasks: vec![kept(A, B)],
                away: None,
            },
            Duration::from_secs(600),
        );
        assert!(d.adopt.is_empty());
        assert!(d.unreadable[0].1.contains("another task"));
    }
}
