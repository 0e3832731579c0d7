//! Who runs what in the farm and how long each node has been silent *while
//! this node heard the farm*: pure bookkeeping driven by explicit
//! [`Instant`]s, so every rule is a unit test. [`super::view`] feeds it
//! from the events it receives and puts it behind a lock.
//!
//! The rules (see the module doc of [`super`] for why):
//!
//! - Each node's heartbeat and `worker-online` list the ids it runs or
//!   keeps; [`Silence::who_runs`] is the node whose last list has an id.
//!   A `worker-offline` whose `kept` lists ids keeps them listed (the node
//!   left them running for its next start); one without lets them go.
//! - Silence counts only while this node hears the farm: each *fresh* own
//!   heartbeat (it came back through the broker within a few seconds, and
//!   the broker was not blocking publishers) adds the gap since the
//!   previous fresh one, at most two heartbeat intervals, to the silence of
//!   every other node. A node that gives any sign of life (a heartbeat,
//!   `worker-online`, an answer, a goodbye that keeps its tasks) is back to
//!   no silence. A frozen, stalled or cut-off holder, or one behind a
//!   broker alarm, hears nothing of its own and so counts nothing.
//! - This node's own *deafness*: the time since its last fresh own
//!   heartbeat. A gap of at least [`Silence::deaf_after`] (RESTART_GRACE
//!   less a quarter of it) is a *deaf episode*; an open one counts too.
//!
//! Owns that state only; it reads no clock, no broker, no event.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Most nodes remembered; the one seen longest ago goes first.
pub const MAX_NODES: usize = 1024;
/// Most task ids remembered of one node's list.
pub const MAX_IDS: usize = 64;

/// What is known of one other node.
#[derive(Debug, Clone)]
struct Node {
    /// The ids it last listed (or kept at its goodbye).
    ids: Vec<String>,
    /// Its last sign of life.
    seen: Instant,
    /// Its silence while this node heard the farm, since that sign.
    silence: Duration,
    /// It went offline letting its tasks go, and said nothing since.
    let_go: bool,
}

/// The farm as this node hears it.
#[derive(Debug, Clone)]
pub struct Silence {
    heartbeat: Duration,
    grace: Duration,
    nodes: HashMap<String, Node>,
    /// This node's last fresh own heartbeat (at first: when it began, or
    /// when it was last heard before a restart).
    heard: Instant,
    /// Closed deaf episodes.
    episodes: u64,
}

impl Silence {
    /// A view that begins at `now`, for a farm beating every `heartbeat`
    /// whose RESTART_GRACE is `grace`.
    pub fn new(heartbeat: Duration, grace: Duration, now: Instant) -> Self {
        Self {
            heartbeat,
            grace,
            nodes: HashMap::new(),
            heard: now,
            episodes: 0,
        }
    }

    /// This node was last heard at `at` (before a restart: the node was
    /// away since then), if that is earlier than what is known.
    pub fn heard_last_at(&mut self, at: Instant) {
        self.heard = self.heard.min(at);
    }

    /// A gap between fresh own heartbeats at least this long is a deaf
    /// episode: RESTART_GRACE less a margin of a quarter of it, so that a
    /// node counts itself deaf before any holder counts it silent for
    /// RESTART_GRACE.
    pub fn deaf_after(&self) -> Duration {
        self.grace - self.grace / 4
    }

    /// The most one fresh own heartbeat adds to the others' silence.
    fn step(&self) -> Duration {
        self.heartbeat * 2
    }

    /// A fresh own heartbeat came back at `at`: this node hears the farm.
    pub fn own_heartbeat(&mut self, at: Instant) {
        let gap = at.saturating_duration_since(self.heard);
        if gap >= self.deaf_after() {
            self.episodes += 1;
        }
        let add = gap.min(self.step());
        for node in self.nodes.values_mut() {
            node.silence += add;
        }
        self.heard = self.heard.max(at);
    }

    /// `node` gave a sign of life at `at`; `ids`: the list it sent with it
    /// (a heartbeat, `worker-online`), `None` for a sign without a list
    /// (an answer to `query_task`).
    pub fn seen(&mut self, node: &str, at: Instant, ids: Option<Vec<String>>) {
        let entry = self.entry(node, at);
        entry.seen = entry.seen.max(at);
        entry.silence = Duration::ZERO;
        entry.let_go = false;
        if let Some(mut ids) = ids {
            ids.truncate(MAX_IDS);
            entry.ids = ids;
        }
    }

    /// `node` went offline at `at`: keeping `kept` running for its next
    /// start (a sign of life, its list is those), or letting everything go.
    pub fn offline(&mut self, node: &str, at: Instant, mut kept: Vec<String>) {
        if kept.is_empty() {
            let entry = self.entry(node, at);
            entry.ids.clear();
            entry.let_go = true;
            return;
        }
        kept.truncate(MAX_IDS);
        self.seen(node, at, Some(kept));
    }

    fn entry(&mut self, node: &str, at: Instant) -> &mut Node {
        if !self.nodes.contains_key(node) && self.nodes.len() >= MAX_NODES {
            let oldest = (self.nodes.iter())
                .min_by_key(|(_, n)| n.seen)
                .map(|(name, _)| name.clone());
            if let Some(oldest) = oldest {
                self.nodes.remove(&oldest);
            }
        }
        self.nodes.entry(node.to_owned()).or_insert(Node {
            ids: Vec::new(),
            seen: at,
            silence: Duration::ZERO,
            let_go: false,
        })
    }

    /// The node whose last list has `id` (the one seen last, if several
    /// do: a node that took the task over).
    pub fn who_runs(&self, id: &str) -> Option<&str> {
        (self.nodes.iter())
            .filter(|(_, n)| n.ids.iter().any(|i| i == id))
            .max_by_key(|(_, n)| n.seen)
            .map(|(name, _)| name.as_str())
    }

    /// How long `node` has been silent while this node heard the farm
    /// (nothing for a node never seen).
    pub fn silence_of(&self, node: &str) -> Duration {
        self.nodes.get(node).map_or(Duration::ZERO, |n| n.silence)
    }

    /// Whether `node` went offline letting its tasks go, and said nothing
    /// since.
    pub fn let_go(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(|n| n.let_go)
    }

    /// How long this node has not heard itself, at `now`.
    pub fn deafness(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.heard)
    }

    /// Whether this node hears the farm at `now`: its last fresh own
    /// heartbeat is at most two heartbeat intervals (and a second) old.
    pub fn hearing(&self, now: Instant) -> bool {
        self.deafness(now) <= self.step() + Duration::from_secs(1)
    }

    /// The deaf episodes that are over: what a task notes when it starts.
    pub fn episodes(&self) -> u64 {
        self.episodes
    }

    /// The deaf episodes at `now`, the open one included.
    pub fn episodes_at(&self, now: Instant) -> u64 {
        self.episodes + u64::from(self.deafness(now) >= self.deaf_after())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HB: Duration = Duration::from_secs(2);
    const GRACE: Duration = Duration::from_secs(600);

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn ids(list: &[&str]) -> Option<Vec<String>> {
        Some(list.iter().map(|s| (*s).to_owned()).collect())
    }

    /// Fresh own heartbeats every `HB` from `from` for `span`.
    fn hear(view: &mut Silence, from: Instant, span: Duration) -> Instant {
        let mut at = from;
        while at < from + span {
            at += HB;
            view.own_heartbeat(at);
        }
        at
    }

    #[test]
    fn a_node_is_found_by_the_ids_it_listed_last() {
        let t0 = Instant::now();
        let mut v = Silence::new(HB, GRACE, t0);
        v.seen("a", t0, ids(&["t1", "t2"]));
        v.seen("b", t0, ids(&["t3"]));
        assert_eq!(v.who_runs("t1"), Some("a"));
        assert_eq!(v.who_runs("t3"), Some("b"));
        assert_eq!(v.who_runs("t9"), None);
        // Its next list without the task: nobody runs it.
        v.seen("a", t0 + s(2), ids(&["t2"]));
        assert_eq!(v.who_runs("t1"), None);
        // An answer carries no list: the last one stands.
        v.seen("a", t0 + s(3), None);
        assert_eq!(v.who_runs("t2"), Some("a"));
        // Listed by two nodes (one took it over): the one seen last.
        v.seen("b", t0 + s(4), ids(&["t2"]));
        assert_eq!(v.who_runs("t2"), Some("b"));
    }

    #[test]
    fn silence_counts_only_while_this_node_hears_itself() {
        let t0 = Instant::now();
        let mut v = Silence::new(HB, GRACE, t0);
        v.seen("a", t0, ids(&["t1"]));
        let t = hear(&mut v, t0, s(20));
        assert_eq!(v.silence_of("a"), s(20));
        // Deaf 100 s (frozen, cut off, a broker alarm): the heartbeat that
        // comes back adds at most two intervals.
        v.own_heartbeat(t + s(100));
        assert_eq!(v.silence_of("a"), s(24));
        // Any sign of it: back to nothing.
        v.seen("a", t + s(101), None);
        assert_eq!(v.silence_of("a"), Duration::ZERO);
        // A node never seen has no silence.
        assert_eq!(v.silence_of("z"), Duration::ZERO);
    }

    #[test]
    fn a_goodbye_that_keeps_tasks_keeps_them_listed_and_is_a_sign_of_life() {
        let t0 = Instant::now();
        let mut v = Silence::new(HB, GRACE, t0);
        v.seen("a", t0, ids(&["t1", "t2"]));
        let t = hear(&mut v, t0, s(10));
        v.offline("a", t, vec!["t1".to_owned()]);
        assert_eq!(v.who_runs("t1"), Some("a"));
        assert_eq!(v.who_runs("t2"), None);
        assert_eq!(v.silence_of("a"), Duration::ZERO);
        assert!(!v.let_go("a"));
        // Its silence counts from the goodbye.
        hear(&mut v, t, s(30));
        assert_eq!(v.silence_of("a"), s(30));
        // A goodbye that keeps nothing lets everything go.
        v.offline("a", t + s(31), vec![]);
        assert_eq!(v.who_runs("t1"), None);
        assert!(v.let_go("a"));
        v.seen("a", t + s(40), ids(&[]));
        assert!(!v.let_go("a"));
    }

    #[test]
    fn a_long_gap_between_own_heartbeats_is_a_deaf_episode_open_or_closed() {
        let t0 = Instant::now();
        let mut v = Silence::new(HB, s(16), t0);
        assert_eq!(v.deaf_after(), s(12));
        let t = hear(&mut v, t0, s(10));
        assert_eq!(v.episodes(), 0);
        assert!(v.hearing(t));
        // 11 s: short of the margin.
        v.own_heartbeat(t + s(11));
        assert_eq!(v.episodes(), 0);
        let t = t + s(11);
        // An open gap counts as soon as it is long enough.
        assert_eq!(v.episodes_at(t + s(11)), 0);
        assert_eq!(v.episodes_at(t + s(12)), 1);
        assert!(!v.hearing(t + s(12)));
        assert_eq!(v.deafness(t + s(12)), s(12));
        // Closed: the count keeps it.
        v.own_heartbeat(t + s(30));
        assert_eq!(v.episodes(), 1);
        assert_eq!(v.episodes_at(t + s(31)), 1);
        assert!(v.hearing(t + s(31)));
    }

    #[test]
    fn a_restart_after_a_long_absence_is_an_open_episode() {
        let now = Instant::now() + s(1000);
        let mut v = Silence::new(HB, s(16), now);
        v.heard_last_at(now - s(14));
        assert_eq!(v.episodes(), 0);
        assert_eq!(v.episodes_at(now), 1);
        // Later than known: ignored.
        v.heard_last_at(now);
        assert_eq!(v.deafness(now), s(14));
        v.own_heartbeat(now + s(1));
        assert_eq!(v.episodes(), 1);
    }

    #[test]
    fn lists_and_nodes_are_bounded() {
        let t0 = Instant::now();
        let mut v = Silence::new(HB, GRACE, t0);
        let many: Vec<String> = (0..100).map(|i| format!("t{i}")).collect();
        v.seen("a", t0, Some(many));
        assert_eq!(v.who_runs("t63"), Some("a"));
        assert_eq!(v.who_runs("t64"), None);
        for i in 0..MAX_NODES {
            v.seen(&format!("n{i}"), t0 + s(1 + i as u64), ids(&[]));
        }
        // "a", seen first, went.
        assert_eq!(v.who_runs("t0"), None);
        assert_eq!(v.nodes.len(), MAX_NODES);
    }
}
