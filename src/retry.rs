//! The one retry policy of the worker: every loop that reconnects or tries
//! again (the broker session, the remote-control channel, the dispatcher
//! login, the upload attempts and each upload stream) asks a [`Retry`] how
//! long to wait and whether to go on.
//!
//! The wait doubles from a first delay up to a cap, with jitter: each delay
//! is drawn between the doubled one and half as much again (never above the
//! cap), so a farm of volunteers whose broker restarts does not reconnect
//! in step, and a wait is never shorter than the schedule says. A budget,
//! where there is one, counts failures without progress: progress starts
//! the count and the delays over (the warehouse's rule: a link that works
//! but breaks now and then never runs out of tries).
//!
//! Owns the arithmetic only: it never sleeps, logs, or decides what a
//! failure or progress is.

use std::time::Duration;

/// How much of a delay the jitter may add: up to half of it.
const JITTER_SHARE: f64 = 0.5;
/// The broker session and the remote-control channel: back soon after a
/// broker restart, and at least every 30 s while it is down.
const BROKER: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(30));
/// The dispatcher login: a remote service, asked at most every 5 min.
const DISPATCHER: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(300));
/// The cap of an upload's retries: the warehouse is far, and may be down
/// for a while.
const UPLOAD_MAX: Duration = Duration::from_secs(300);

/// Capped exponential backoff with jitter and an optional budget.
#[derive(Debug)]
pub struct Retry {
    first: Duration,
    max: Duration,
    /// The delay before jitter that the next failure gets.
    next: Duration,
    /// Failures since the start or the last progress.
    failures: u32,
    /// Failures allowed without progress; `None`: never gives up.
    budget: Option<u32>,
    rng: fastrand::Rng,
}

impl Retry {
    /// Waits `first` after the first failure, doubling up to `max`, and
    /// never gives up.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max: max.max(first),
            next: first,
            failures: 0,
            budget: None,
            rng: fastrand::Rng::new(),
        }
    }

    /// Reconnecting to the broker (the session, the control channel).
    pub fn broker() -> Self {
        Self::new(BROKER.0, BROKER.1)
    }

    /// Logging in to the dispatcher.
    pub fn dispatcher() -> Self {
        Self::new(DISPATCHER.0, DISPATCHER.1)
    }

    /// An upload attempt or stream: `first`, doubling up to 5 min, giving up
    /// after `retries` failures in a row without progress.
    pub fn upload(first: Duration, retries: u32) -> Self {
        Self::new(first, UPLOAD_MAX).with_budget(retries)
    }

    /// Gives up at the failure after `retries` failures in a row without
    /// progress (so `retries + 1` tries in all).
    pub fn with_budget(mut self, retries: u32) -> Self {
        self.budget = Some(retries);
        self
    }

    /// Counts a failure: the time to wait before the next try, or `None`
    /// when the budget is spent.
    pub fn failed(&mut self) -> Option<Duration> {
        self.failures = self.failures.saturating_add(1);
        if self.budget.is_some_and(|budget| self.failures > budget) {
            return None;
        }
        Some(self.next_wait())
    }

    /// Counts a failure of a loop that never gives up (no budget): the
    /// time to wait before the next try.
    pub fn delay(&mut self) -> Duration {
        debug_assert!(self.budget.is_none(), "a budgeted retry asks failed()");
        self.failures = self.failures.saturating_add(1);
        self.next_wait()
    }

    /// The scheduled delay with its jitter; the next one doubles.
    fn next_wait(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = base.mul_f64(JITTER_SHARE * self.rng.f64());
        (base + jitter).min(self.max).max(base)
    }

    /// Something worked: the count and the delays start over.
    pub fn reset(&mut self) {
        self.failures = 0;
        self.next = self.first;
    }

    /// Failures since the start or the last [`Retry::reset`].
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Each delay lies between its schedule's value and half as much again,
    /// capped.
    fn assert_within(delay: Duration, base: Duration, max: Duration) {
        let high = base.mul_f64(1.0 + JITTER_SHARE).min(max);
        assert!(
            delay >= base && delay <= high,
            "{delay:?} outside {base:?}..={high:?}"
        );
    }

    #[test]
    fn delays_double_with_jitter_up_to_the_cap() {
        for _ in 0..200 {
            let mut r = Retry::new(500 * MS, 30_000 * MS);
            for base in [500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000] {
                assert_within(r.failed().unwrap(), base * MS, 30_000 * MS);
            }
        }
    }

    #[test]
    fn jitter_spreads_nodes_that_fail_together() {
        // Two workers that lost the same broker at the same moment: their
        // next tries do not fall together.
        let delays = |mut r: Retry| (0..6).map(|_| r.failed().unwrap()).collect::<Vec<_>>();
        let a = delays(Retry::new(500 * MS, 30_000 * MS));
        let b = delays(Retry::new(500 * MS, 30_000 * MS));
        assert_ne!(a, b);
        let spread: Vec<bool> = a.iter().zip(&b).map(|(x, y)| x != y).collect();
        assert!(spread.iter().filter(|&&s| s).count() >= 5, "{a:?} {b:?}");
    }

    #[test]
    fn the_budget_counts_failures_without_progress() {
        let mut r = Retry::new(MS, 10 * MS).with_budget(2);
        assert!(r.failed().is_some());
        assert!(r.failed().is_some());
        assert_eq!(
            r.failed(),
            None,
            "the third failure in a row is one too many"
        );
        assert_eq!(r.failures(), 3);

        // Progress between failures: never runs out.
        let mut r = Retry::new(MS, 10 * MS).with_budget(2);
        for _ in 0..10 {
            assert!(r.failed().is_some());
            assert!(r.failed().is_some());
            r.reset();
        }
        assert_eq!(r.failures(), 0);
    }

    #[test]
    fn a_zero_budget_gives_up_at_the_first_failure() {
        let mut r = Retry::new(MS, MS).with_budget(0);
        assert_eq!(r.failed(), None);
    }

    #[test]
    fn progress_starts_the_delays_over() {
        let mut r = Retry::new(100 * MS, 10_000 * MS);
        for _ in 0..5 {
            r.failed();
        }
        r.reset();
        assert_within(r.failed().unwrap(), 100 * MS, 10_000 * MS);
    }

    #[test]
    fn without_a_budget_it_never_gives_up() {
        let mut r = Retry::new(MS, 2 * MS);
        for _ in 0..10_000 {
            assert!(r.failed().is_some());
        }
    }

    #[test]
    fn a_loop_without_a_budget_counts_and_waits_the_same() {
        let mut r = Retry::broker();
        for base in [500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000] {
            assert_within(r.delay(), base * MS, 30_000 * MS);
        }
        assert_eq!(r.failures(), 8);
        r.reset();
        assert_within(r.delay(), 500 * MS, 30_000 * MS);
    }

    #[test]
    fn a_cap_below_the_first_delay_is_the_first_delay() {
        let mut r = Retry::new(50 * MS, 10 * MS);
        assert_within(r.failed().unwrap(), 50 * MS, 50 * MS);
        assert_within(r.failed().unwrap(), 50 * MS, 50 * MS);
    }
}
