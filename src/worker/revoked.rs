//! Celery's bounded memory of revoked task ids (`worker_state.revoked`).
//!
//! Owns the set and its limits only: what a revoke does to a task held here
//! is the registry's business ([`super::registry::Registry::revoke`]), which
//! holds this set behind its lock.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Celery's `REVOKES_MAX`: revoked ids remembered.
pub const REVOKES_MAX: usize = 50_000;
/// Celery's `REVOKE_EXPIRES`: how long a revoked id is remembered.
pub const REVOKE_EXPIRES: Duration = Duration::from_secs(10_800);

/// The ids of revoked tasks, as Celery's `worker_state.revoked` (a
/// `LimitedSet`): at most `max` ids, each forgotten `expires` after it was
/// (last) added, the oldest first when full. A task whose id is here is
/// never run: it ends `task-revoked` as soon as its message arrives.
///
/// Every operation costs O(1), amortized: an id added again is not looked
/// for in the order (which made revoking ids already revoked quadratic,
/// under the registry's lock): its older place is left there, stale, and
/// skipped when it comes out; the order is compacted when stale places
/// outnumber the live ones. Only task ids are kept
/// ([`crate::celery::task_id::check`]): no other id can match a task, and
/// each id stays short.
#[derive(Debug)]
pub struct RevokedSet {
    max: usize,
    expires: Duration,
    /// Oldest first: when each id was added, by the sequence number of that
    /// addition; an entry whose number is not its id's in `ids` is stale.
    order: VecDeque<(u64, Instant, String)>,
    /// Each id's last addition: its sequence number and time.
    ids: HashMap<String, (u64, Instant)>,
    next: u64,
    /// Steps taken on the order (pushes, pops, compaction moves): what the
    /// tests bound.
    work: u64,
}

impl Default for RevokedSet {
    fn default() -> Self {
        Self::new(REVOKES_MAX, REVOKE_EXPIRES)
    }
}

impl RevokedSet {
    pub fn new(max: usize, expires: Duration) -> Self {
        Self {
            max,
            expires,
            order: VecDeque::new(),
            ids: HashMap::new(),
            next: 0,
            work: 0,
        }
    }

    /// Adds `id` (again: it becomes the newest) as of `now`. Returns false,
    /// and keeps nothing, when `id` is not a task id.
    pub fn insert(&mut self, id: &str, now: Instant) -> bool {
        if crate::celery::task_id::check(id).is_err() {
            return false;
        }
        let seq = self.next;
        self.next += 1;
        self.ids.insert(id.to_owned(), (seq, now));
        self.order.push_back((seq, now, id.to_owned()));
        self.work += 1;
        self.purge(now);
        if self.order.len() > 2 * self.ids.len() + 16 {
            self.compact();
        }
        true
    }

    /// Whether `id` was revoked and is still remembered at `now`.
    pub fn contains(&self, id: &str, now: Instant) -> bool {
        self.ids
            .get(id)
            .is_some_and(|(_, added)| now.saturating_duration_since(*added) < self.expires)
    }

    /// The ids remembered at `now`, oldest first.
    pub fn ids(&mut self, now: Instant) -> Vec<String> {
        self.purge(now);
        self.order
            .iter()
            .filter(|(seq, _, id)| self.is_live(*seq, id))
            .map(|(_, _, id)| id.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Steps taken on the order since the set was made.
    pub fn work(&self) -> u64 {
        self.work
    }

    fn is_live(&self, seq: u64, id: &str) -> bool {
        self.ids.get(id).is_some_and(|(live, _)| *live == seq)
    }

    /// Drops stale places from the front, then forgets expired ids and the
    /// oldest beyond `max`.
    fn purge(&mut self, now: Instant) {
        while let Some((seq, added, id)) = self.order.front() {
            if self.is_live(*seq, id) {
                let expired = now.saturating_duration_since(*added) >= self.expires;
                if !expired && self.ids.len() <= self.max {
                    break;
                }
                self.ids.remove(id.as_str());
            }
            self.order.pop_front();
            self.work += 1;
        }
    }

    /// Drops every stale place: linear, once per as many additions.
    fn compact(&mut self) {
        let order = std::mem::take(&mut self.order);
        self.work += order.len() as u64;
        self.order = order
            .into_iter()
            .filter(|(seq, _, id)| self.is_live(*seq, id))
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoked_set_is_bounded_and_expires() {
        let start = Instant::now();
        let mut set = RevokedSet::new(3, Duration::from_secs(10));
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            set.insert(id, start + Duration::from_secs(i as u64));
        }
        assert_eq!(set.ids(start + Duration::from_secs(4)), ["b", "c", "d"]);
        assert!(!set.contains("a", start + Duration::from_secs(4)));
        assert!(set.contains("b", start + Duration::from_secs(4)));
        // Revoked again: newest, and its time starts over.
        set.insert("b", start + Duration::from_secs(5));
        assert_eq!(set.ids(start + Duration::from_secs(5)), ["c", "d", "b"]);
        assert!(!set.contains("c", start + Duration::from_secs(12)));
        assert_eq!(set.ids(start + Duration::from_secs(14)), ["b"]);
        assert_eq!(set.len(), 1);
        assert!(set.ids(start + Duration::from_secs(15)).is_empty());
        assert!(set.is_empty());
    }

    #[test]
    fn only_task_ids_are_kept() {
        let now = Instant::now();
        let mut set = RevokedSet::default();
        assert!(set.insert("6f1c9a0b2d3e4f5a6b7c8d9e", now));
        for bad in ["", "a b", "a\nb", "../x"] {
            assert!(!set.insert(bad, now), "{bad:?}");
        }
        assert!(!set.insert(&"x".repeat(100_000), now));
        assert_eq!(set.ids(now), ["6f1c9a0b2d3e4f5a6b7c8d9e"]);
    }

    /// 50,000 ids revoked, then the same 50,000 again, then 50,000 new
    /// ones: a bounded number of steps per addition (it was one pass over
    /// the whole order per id already there), and never more than `max`
    /// ids kept.
    #[test]
    fn revoking_again_is_linear_and_the_set_bounded() {
        let now = Instant::now();
        let mut set = RevokedSet::default();
        let ids: Vec<String> = (0..REVOKES_MAX).map(|i| format!("{i:024x}")).collect();
        for id in &ids {
            assert!(set.insert(id, now));
        }
        assert_eq!(set.len(), REVOKES_MAX);
        for id in &ids {
            set.insert(id, now);
        }
        assert_eq!(set.len(), REVOKES_MAX);
        assert!(set.order.len() <= 2 * REVOKES_MAX + 16);
        for i in 0..REVOKES_MAX {
            set.insert(&format!("new{i:021x}"), now);
        }
        assert_eq!(set.len(), REVOKES_MAX);
        assert!(!set.contains(&ids[0], now));
        let first_new = format!("new{:021x}", 0);
        assert!(set.contains(&first_new, now));
        let additions = 3 * REVOKES_MAX as u64;
        assert!(
            set.work() <= 4 * additions,
            "{} steps for {additions} additions",
            set.work()
        );
        // The order again, oldest first: the second round came out stale.
        let kept = set.ids(now);
        assert_eq!(kept.len(), REVOKES_MAX);
        assert_eq!(kept[0], first_new);
    }
}
