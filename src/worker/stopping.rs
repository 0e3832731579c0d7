//! How the worker is asked to stop, and how: [`Shutdown`], fired once with
//! a [`StopMode`] (SIGTERM/SIGINT leave, SIGQUIT and remote control's
//! `shutdown` stop for good), and which running tasks a leave keeps.
//!
//! Owns the stop request only; what stopping does to the tasks is the
//! worker's (`mod.rs`), what it does to their containers the runner's.

use std::sync::{Arc, OnceLock};

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// How the worker stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// A restart or an upgrade (SIGTERM, SIGINT): running tasks are left
    /// running, when the runner keeps them, for the next start to adopt.
    Leave,
    /// For good (SIGQUIT, remote control's `shutdown`): every task is
    /// stopped and its message goes back to the queue.
    ForGood,
}

/// A request to stop, with its [`StopMode`]. Clones share it; the first
/// mode asked for wins. A `Shutdown` made `From` a [`CancellationToken`]
/// fired from outside stops for good, as every stop did before leaving
/// existed.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    mode: Arc<OnceLock<StopMode>>,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks to stop in `mode`, unless a stop was asked already: returns
    /// whether this call asked it.
    pub fn fire(&self, mode: StopMode) -> bool {
        if self.token.is_cancelled() {
            return false;
        }
        let first = self.mode.set(mode).is_ok();
        self.token.cancel();
        first
    }

    /// Asks to stop for a while (SIGTERM).
    pub fn leave(&self) -> bool {
        self.fire(StopMode::Leave)
    }

    /// Asks to stop for good (SIGQUIT, remote `shutdown`).
    pub fn stop_for_good(&self) -> bool {
        self.fire(StopMode::ForGood)
    }

    /// The mode asked for: [`StopMode::ForGood`] when the token was fired
    /// without one (or not fired yet).
    pub fn mode(&self) -> StopMode {
        self.mode.get().copied().unwrap_or(StopMode::ForGood)
    }

    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes once a stop is asked.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// The token that fires with it (for what stops with the worker, in
    /// any mode: the metrics listener, the dispatcher's token keeper).
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

impl From<CancellationToken> for Shutdown {
    fn from(token: CancellationToken) -> Self {
        Self {
            token,
            mode: Arc::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_mode_asked_for_wins() {
        let shutdown = Shutdown::new();
        assert!(!shutdown.is_cancelled());
        assert!(shutdown.leave());
        assert!(!shutdown.stop_for_good());
        assert!(shutdown.clone().is_cancelled());
        assert_eq!(shutdown.mode(), StopMode::Leave);
    }

    #[test]
    fn a_token_fired_from_outside_stops_for_good() {
        let token = CancellationToken::new();
        let shutdown = Shutdown::from(token.clone());
        token.cancel();
        assert!(shutdown.is_cancelled());
        assert_eq!(shutdown.mode(), StopMode::ForGood);
        // Already fired: a later mode is not taken.
        assert!(!shutdown.leave());
    }
}
