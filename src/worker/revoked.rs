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
#[derive(Debug)]
pub struct RevokedSet {
    max: usize,
    expires: Duration,
    /// Oldest first.
    order: VecDeque<(Instant, String)>,
    ids: HashMap<String, Instant>,
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
        }
    }

    /// Adds `id` (again: it becomes the newest) as of `now`.
    pub fn insert(&mut self, id: &str, now: Instant) {
        if self.ids.insert(id.to_owned(), now).is_some() {
            // Rare (an id revoked twice): a linear pass is fine.
            self.order.retain(|(_, known)| known != id);
        }
        self.order.push_back((now, id.to_owned()));
        self.purge(now);
    }

    /// Whether `id` was revoked and is still remembered at `now`.
    pub fn contains(&self, id: &str, now: Instant) -> bool {
        self.ids
            .get(id)
            .is_some_and(|added| now.saturating_duration_since(*added) < self.expires)
    }

    /// The ids remembered at `now`, oldest first.
    pub fn ids(&mut self, now: Instant) -> Vec<String> {
        self.purge(now);
        self.order.iter().map(|(_, id)| id.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Forgets expired ids, then the oldest beyond `max`.
    fn purge(&mut self, now: Instant) {
        while let Some((added, _)) = self.order.front() {
            let expired = now.saturating_duration_since(*added) >= self.expires;
            if !expired && self.order.len() <= self.max {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                self.ids.remove(&id);
            }
        }
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
}
