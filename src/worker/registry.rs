//! The registry of tasks held or running here, as Celery's
//! `worker/state.py`: each task's entry (its request, [`TaskPhase`], its
//! [`Cancellation`], when it started, where its message came from), the
//! revoked ids ([`RevokedSet`]), the tasks started by name (`inspect
//! stats` `total`) and how many tasks are held for their `eta` (bounded by
//! MAX_ETA_HELD), behind one lock with named methods.
//!
//! Owns that state and the rules that read and change it together (a
//! revoke stops only a task not ending yet; shutdown cancels all but the
//! ending ones; a session's end drops the tasks not started whose message
//! went with it, and such a task never starts). It must not await, publish
//! or ack: every method takes the lock and lets it go before it returns, so
//! the lock is never held across an await. Only [`Registry::admit`] and
//! [`Registry::drop_unstarted`] run a caller's code under it, and that code
//! may take the leaf locks of the record of ended tasks and of the
//! prefetch book, which never call back here; firing a cancellation
//! under it takes only tokio-util's own. The worker's other lock (its
//! topology) is never held with this one.
//!
//! Remote control ([`crate::control`]) reads its vocabulary ([`TaskPhase`],
//! [`TaskSnapshot`], the revoke limits), as Celery's `control.py` reads
//! `state.py`; this file imports nothing of control, and of the worker
//! only its bounded set of revoked ids (`revoked`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

pub use super::revoked::{REVOKE_EXPIRES, REVOKES_MAX, RevokedSet};
use crate::celery::{self, TaskRequest, control::DeliveryInfo};
use crate::progress::{Snapshot, TaskProgress};
use crate::runner::{CancelReason, Cancellation};

/// Where a task held here is in its life, in Celery's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskPhase {
    /// Held until its `eta` (`inspect scheduled`).
    Scheduled,
    /// Waiting for a free slot (`inspect reserved`).
    Reserved,
    /// Running (`inspect active`).
    Active,
    /// Ended; its message is acked once the broker confirmed its final
    /// event. Listed nowhere, as in Celery.
    Ending,
}

/// One task held or running here, as the listings of remote control see
/// it.
#[derive(Debug, Clone)]
pub struct TaskSnapshot {
    pub request: Arc<TaskRequest>,
    pub phase: TaskPhase,
    /// Epoch seconds when it started running.
    pub time_start: Option<f64>,
    pub delivery: DeliveryInfo,
    /// Where it is and how it goes, once it runs.
    pub progress: Option<Snapshot>,
}

/// A task taken here, from acceptance until its message is settled.
#[derive(Debug)]
pub struct TaskEntry {
    request: Arc<TaskRequest>,
    phase: TaskPhase,
    cancel: Cancellation,
    /// Epoch seconds when it started running.
    started: Option<f64>,
    /// Where its message came from (`inspect active`).
    delivery: DeliveryInfo,
    /// Its progress, once its run started.
    progress: Option<TaskProgress>,
}

impl TaskEntry {
    /// A task just accepted: held for its `eta` (`at_eta`) or waiting for a
    /// slot, stopped through `cancel`.
    pub fn new(
        request: Arc<TaskRequest>,
        at_eta: bool,
        cancel: Cancellation,
        delivery: DeliveryInfo,
    ) -> Self {
        Self {
            request,
            phase: if at_eta {
                TaskPhase::Scheduled
            } else {
                TaskPhase::Reserved
            },
            cancel,
            started: None,
            delivery,
            progress: None,
        }
    }

    /// A task an earlier run of this node left running, adopted: running
    /// since `started` (epoch seconds).
    pub fn adopted(
        request: Arc<TaskRequest>,
        cancel: Cancellation,
        delivery: DeliveryInfo,
        started: f64,
    ) -> Self {
        Self {
            request,
            phase: TaskPhase::Active,
            cancel,
            started: Some(started),
            delivery,
            progress: None,
        }
    }
}

#[derive(Debug, Default)]
struct Tables {
    tasks: HashMap<String, TaskEntry>,
    /// Task ids revoked by remote control (Celery's `revoked`).
    revoked: RevokedSet,
    /// Tasks started, by name.
    totals: BTreeMap<String, u64>,
    /// How many of `tasks` are [`TaskPhase::Scheduled`] (held for their
    /// `eta`): bounded by MAX_ETA_HELD.
    scheduled: usize,
}

impl Tables {
    /// Whether the entry of `id` is the one cancelled through `cancel`.
    fn is(&self, id: &str, cancel: &Cancellation) -> bool {
        (self.tasks.get(id)).is_some_and(|entry| entry.cancel.same_as(cancel))
    }

    /// Moves the entry of `id`, if any, to `phase`, keeping the count of
    /// scheduled tasks.
    fn set_phase(&mut self, id: &str, phase: TaskPhase) -> Option<&mut TaskEntry> {
        let entry = self.tasks.get_mut(id)?;
        self.scheduled -= usize::from(entry.phase == TaskPhase::Scheduled);
        self.scheduled += usize::from(phase == TaskPhase::Scheduled);
        entry.phase = phase;
        Some(entry)
    }
}

/// What the registry knows of a task id when its message arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Its phase, when a run of it is here.
    pub here: Option<TaskPhase>,
    /// Its id is among the revoked ids remembered.
    pub revoked: bool,
    /// How many tasks are held here for their `eta`.
    pub scheduled: usize,
}

/// The tasks held or running here, the revoked ids and the totals.
#[derive(Debug, Default)]
pub struct Registry {
    tables: Mutex<Tables>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides what becomes of task `id`'s message with `decide`, under the
    /// lock: it gets what is [`Seen`] of the id and returns its decision
    /// and, when it takes the task, the task's entry, entered before the
    /// lock goes (a redelivery sees either nothing or the whole entry, and
    /// what `decide` did besides, such as holding the message). `decide`
    /// may take the leaf locks (the record of ended tasks, the prefetch
    /// book), never this one.
    pub fn admit<T>(&self, id: &str, decide: impl FnOnce(Seen) -> (T, Option<TaskEntry>)) -> T {
        let mut tables = self.lock();
        let seen = Seen {
            here: tables.tasks.get(id).map(|entry| entry.phase),
            revoked: tables.revoked.contains(id, Instant::now()),
            scheduled: tables.scheduled,
        };
        let (decision, entry) = decide(seen);
        if let Some(entry) = entry {
            tables.scheduled += usize::from(entry.phase == TaskPhase::Scheduled);
            if let Some(old) = tables.tasks.insert(entry.request.id.clone(), entry) {
                tables.scheduled -= usize::from(old.phase == TaskPhase::Scheduled);
            }
        }
        decision
    }

    /// Moves task `id` to `phase`.
    pub fn set_phase(&self, id: &str, phase: TaskPhase) {
        self.lock().set_phase(id, phase);
    }

    /// Task `id`'s `eta` came: it waits for a slot now
    /// ([`TaskPhase::Reserved`]). `false` when its entry (the one
    /// cancelled through `cancel`) is no longer here: it was dropped.
    pub fn due(&self, id: &str, cancel: &Cancellation) -> bool {
        let mut tables = self.lock();
        if !tables.is(id, cancel) {
            return false;
        }
        tables.set_phase(id, TaskPhase::Reserved);
        true
    }

    /// Task `id` starts running now: [`TaskPhase::Active`], its start time
    /// and one more started for its name. Returns its start time (epoch
    /// seconds); `None`, and nothing changed, when its entry (the one
    /// cancelled through `cancel`) is no longer here: it was dropped
    /// ([`Registry::drop_unstarted`]) and must not start.
    pub fn start(&self, request: &TaskRequest, cancel: &Cancellation) -> Option<f64> {
        let now = celery::now_timestamp();
        let mut tables = self.lock();
        if !tables.is(&request.id, cancel) {
            return None;
        }
        if let Some(entry) = tables.set_phase(&request.id, TaskPhase::Active) {
            entry.started = Some(now);
        }
        *tables.totals.entry(request.name.clone()).or_default() += 1;
        Some(now)
    }

    /// Task `id`'s run reports into `progress` (the entry cancelled
    /// through `cancel` only).
    pub fn set_progress(&self, id: &str, cancel: &Cancellation, progress: TaskProgress) {
        let mut tables = self.lock();
        if tables.is(id, cancel)
            && let Some(entry) = tables.tasks.get_mut(id)
        {
            entry.progress = Some(progress);
        }
    }

    /// A session ended: every task not started yet (waiting for a slot, or
    /// held for its `eta`) came on it or an earlier one, and its message
    /// went back to the broker with it. Each is cancelled for
    /// [`CancelReason::MessageReturned`] and removed, and `forget` (the
    /// prefetch book's) is called with its id, all under the lock: a task
    /// dropped never starts ([`Registry::start`]), and a redelivery of it
    /// admitted after this finds nothing here. Adopted, running and ending
    /// tasks stay, and so do tasks cancelled already (a revoke): they end
    /// their own way. Returns the ids dropped.
    pub fn drop_unstarted(&self, forget: impl Fn(&str)) -> Vec<String> {
        let mut tables = self.lock();
        let dropped: Vec<String> = (tables.tasks.iter())
            .filter(|(_, entry)| {
                matches!(entry.phase, TaskPhase::Reserved | TaskPhase::Scheduled)
                    && !entry.cancel.is_cancelled()
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &dropped {
            if let Some(entry) = tables.tasks.remove(id) {
                tables.scheduled -= usize::from(entry.phase == TaskPhase::Scheduled);
                entry.cancel.cancel(CancelReason::MessageReturned);
            }
            forget(id);
        }
        dropped
    }

    /// Enters a task adopted at start (see [`TaskEntry::adopted`]). It is
    /// not counted in the totals: this run of the worker did not start it.
    pub fn adopt(&self, entry: TaskEntry) {
        let mut tables = self.lock();
        tables.scheduled += usize::from(entry.phase == TaskPhase::Scheduled);
        if let Some(old) = tables.tasks.insert(entry.request.id.clone(), entry) {
            tables.scheduled -= usize::from(old.phase == TaskPhase::Scheduled);
        }
    }

    /// Whether a run of task `id` is here (held, running or ending).
    pub fn contains(&self, id: &str) -> bool {
        self.lock().tasks.contains_key(id)
    }

    /// When task `id` started running (epoch seconds), if it did.
    pub fn started(&self, id: &str) -> Option<f64> {
        self.lock().tasks.get(id).and_then(|entry| entry.started)
    }

    /// Forgets task `id`: its message is settled.
    pub fn remove(&self, id: &str) {
        let mut tables = self.lock();
        if let Some(old) = tables.tasks.remove(id) {
            tables.scheduled -= usize::from(old.phase == TaskPhase::Scheduled);
        }
    }

    /// Whether `id` is among the revoked ids remembered.
    pub fn is_revoked(&self, id: &str) -> bool {
        self.lock().revoked.contains(id, Instant::now())
    }

    /// How many tasks are held here for their `eta`.
    pub fn scheduled(&self) -> usize {
        self.lock().scheduled
    }

    /// Cancels every task not ending yet for `reason` (shutdown).
    pub fn cancel_all(&self, reason: CancelReason) {
        for entry in self.lock().tasks.values() {
            if entry.phase != TaskPhase::Ending {
                entry.cancel.cancel(reason);
            }
        }
    }

    /// The worker leaves (a restart): every running task not cancelled yet
    /// is cancelled for [`CancelReason::Leave`], every task not running yet
    /// for [`CancelReason::Shutdown`] (it never started: nothing is left
    /// behind). Returns the ids of the tasks left running.
    pub fn leave(&self) -> Vec<String> {
        let mut left = Vec::new();
        for (id, entry) in &self.lock().tasks {
            match entry.phase {
                TaskPhase::Ending => {}
                TaskPhase::Active => {
                    if entry.cancel.cancel(CancelReason::Leave) {
                        left.push(id.clone());
                    }
                }
                TaskPhase::Scheduled | TaskPhase::Reserved => {
                    entry.cancel.cancel(CancelReason::Shutdown);
                }
            }
        }
        left.sort();
        left
    }

    /// Remembers `ids` as revoked and stops those held here (not ending,
    /// not cancelled already): one not started yet never runs; a running
    /// one is stopped only with `terminate` (the signal number to report),
    /// as Celery does. Returns the ids of the tasks stopped.
    pub fn revoke(&self, ids: &[String], terminate: Option<i32>) -> Vec<String> {
        let mut tables = self.lock();
        let now = Instant::now();
        for id in ids {
            tables.revoked.insert(id, now);
        }
        let mut found = Vec::new();
        for id in ids {
            let Some(entry) = tables.tasks.get(id) else {
                continue;
            };
            let reason = match (entry.phase, terminate) {
                (TaskPhase::Ending, _) => continue,
                (TaskPhase::Active, Some(signum)) => CancelReason::Revoked {
                    terminated: true,
                    signum: Some(signum),
                },
                // As Celery: without `terminate`, a running task goes on.
                (TaskPhase::Active, None) => continue,
                _ => CancelReason::Revoked {
                    terminated: false,
                    signum: None,
                },
            };
            if entry.cancel.cancel(reason) {
                tracing::warn!(task_id = %id, phase = ?entry.phase, ?terminate, "revoking the task");
                found.push(id.clone());
            }
        }
        found
    }

    /// Adds ids revoked elsewhere (mingle's `hello`).
    pub fn merge_revoked(&self, ids: &[String]) {
        let mut tables = self.lock();
        let now = Instant::now();
        for id in ids {
            tables.revoked.insert(id, now);
        }
    }

    /// The revoked ids remembered, oldest first.
    pub fn revoked(&self) -> Vec<String> {
        self.lock().revoked.ids(Instant::now())
    }

    /// Every task held or running here.
    pub fn snapshot(&self) -> Vec<TaskSnapshot> {
        self.lock()
            .tasks
            .values()
            .map(|entry| TaskSnapshot {
                request: entry.request.clone(),
                phase: entry.phase,
                time_start: entry.started,
                delivery: entry.delivery.clone(),
                progress: entry.progress.as_ref().map(TaskProgress::snapshot),
            })
            .collect()
    }

    /// How many tasks run now.
    pub fn active(&self) -> usize {
        self.lock()
            .tasks
            .values()
            .filter(|entry| entry.phase == TaskPhase::Active)
            .count()
    }

    /// The ids of the tasks running here (adopted ones included), sorted.
    pub fn running_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = (self.lock().tasks.iter())
            .filter(|(_, entry)| entry.phase == TaskPhase::Active)
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Tasks started since the worker started, by name.
    pub fn totals(&self) -> BTreeMap<String, u64> {
        self.lock().totals.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery() -> DeliveryInfo {
        DeliveryInfo {
            exchange: String::new(),
            routing_key: "q".to_owned(),
            priority: None,
            redelivered: false,
        }
    }

    fn request(id: &str) -> Arc<TaskRequest> {
        Arc::new(TaskRequest::new(
            id.to_owned(),
            "t".to_owned(),
            vec![],
            Default::default(),
        ))
    }

    /// Enters task `id` in `phase`; its cancellation.
    fn enter(registry: &Registry, id: &str, phase: TaskPhase) -> Cancellation {
        let cancel = Cancellation::new();
        let entry = TaskEntry::new(
            request(id),
            phase == TaskPhase::Scheduled,
            cancel.clone(),
            delivery(),
        );
        registry.admit(id, |_| ((), Some(entry)));
        registry.set_phase(id, phase);
        cancel
    }

    #[test]
    fn a_leave_leaves_the_running_tasks_and_stops_the_others() {
        let registry = Registry::default();
        let running = enter(&registry, "run", TaskPhase::Active);
        let waiting = enter(&registry, "wait", TaskPhase::Reserved);
        let eta = enter(&registry, "eta", TaskPhase::Scheduled);
        let ending = enter(&registry, "end", TaskPhase::Ending);
        let revoked = enter(&registry, "gone", TaskPhase::Active);
        revoked.cancel(CancelReason::Revoked {
            terminated: true,
            signum: Some(15),
        });
        let adopted = Cancellation::new();
        registry.adopt(TaskEntry::adopted(
            request("old"),
            adopted.clone(),
            delivery(),
            1_700_000_000.0,
        ));
        assert_eq!(registry.leave(), ["old", "run"]);
        assert_eq!(running.reason(), Some(CancelReason::Leave));
        assert_eq!(adopted.reason(), Some(CancelReason::Leave));
        assert_eq!(waiting.reason(), Some(CancelReason::Shutdown));
        assert_eq!(eta.reason(), Some(CancelReason::Shutdown));
        assert_eq!(ending.reason(), None);
        assert!(matches!(
            revoked.reason(),
            Some(CancelReason::Revoked { .. })
        ));
    }

    #[test]
    fn an_adopted_task_is_active_since_its_first_start_and_not_in_the_totals() {
        let registry = Registry::default();
        registry.adopt(TaskEntry::adopted(
            request("old"),
            Cancellation::new(),
            delivery(),
            1_700_000_000.0,
        ));
        assert!(registry.contains("old"));
        assert_eq!(registry.active(), 1);
        assert_eq!(registry.started("old"), Some(1_700_000_000.0));
        let listed = registry.snapshot();
        assert_eq!(listed[0].phase, TaskPhase::Active);
        assert_eq!(listed[0].time_start, Some(1_700_000_000.0));
        assert!(registry.totals().is_empty());
        registry.remove("old");
        assert!(!registry.contains("old"));
    }

    #[test]
    fn a_sessions_end_drops_the_tasks_not_started_and_only_those() {
        let registry = Registry::default();
        let running = enter(&registry, "run", TaskPhase::Active);
        let waiting = enter(&registry, "wait", TaskPhase::Reserved);
        let eta = enter(&registry, "eta", TaskPhase::Scheduled);
        let ending = enter(&registry, "end", TaskPhase::Ending);
        let revoked = enter(&registry, "gone", TaskPhase::Reserved);
        let revoke = CancelReason::Revoked {
            terminated: false,
            signum: None,
        };
        revoked.cancel(revoke);
        assert_eq!(registry.scheduled(), 1);
        let forgotten = Mutex::new(Vec::new());
        let mut dropped =
            registry.drop_unstarted(|id| forgotten.lock().unwrap().push(id.to_owned()));
        dropped.sort();
        assert_eq!(dropped, ["eta", "wait"]);
        let mut forgotten = forgotten.into_inner().unwrap();
        forgotten.sort();
        assert_eq!(forgotten, dropped);
        for cancel in [&waiting, &eta] {
            assert_eq!(cancel.reason(), Some(CancelReason::MessageReturned));
        }
        assert!(!running.is_cancelled() && !ending.is_cancelled());
        assert!(!registry.contains("wait") && !registry.contains("eta"));
        assert!(registry.contains("run") && registry.contains("end"));
        // Revoked while waiting: it ends as revoked, not dropped.
        assert!(registry.contains("gone"));
        assert_eq!(revoked.reason(), Some(revoke));
        assert_eq!(registry.scheduled(), 0);
        // Nothing left to drop.
        assert!(registry.drop_unstarted(|_| {}).is_empty());
    }

    #[test]
    fn a_dropped_task_never_starts_even_when_its_slot_came_at_that_moment() {
        let registry = Registry::default();
        let cancel = enter(&registry, "t", TaskPhase::Reserved);
        registry.drop_unstarted(|_| {});
        // task_life got its slot just before the drop: start refuses.
        assert_eq!(registry.start(&request("t"), &cancel), None);
        assert!(!registry.contains("t"));
        assert!(registry.totals().is_empty());
        // A redelivery of it accepted meanwhile is another entry: the old
        // life neither starts it nor moves it.
        let again = enter(&registry, "t", TaskPhase::Scheduled);
        assert_eq!(registry.start(&request("t"), &cancel), None);
        assert!(!registry.due("t", &cancel));
        assert_eq!(registry.snapshot()[0].phase, TaskPhase::Scheduled);
        // Its own life does.
        assert!(registry.due("t", &again));
        assert_eq!(registry.snapshot()[0].phase, TaskPhase::Reserved);
        assert!(registry.start(&request("t"), &again).is_some());
        assert_eq!(registry.active(), 1);
    }
}
