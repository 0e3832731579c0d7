//! Keeping the access token fresh for the worker's whole life: refresh at
//! 80% of its lifetime, log in with the password when a refresh is refused
//! or there is no session, and retry with the dispatcher's backoff while it
//! is down; re-plan whenever someone else logged in meanwhile.
//!
//! Owns the keeper task. It must not make API calls nor hold the grant lock
//! across its waits: it takes it only for one grant at a time.

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Dispatcher;
use super::token::generation;
use crate::retry::Retry;

impl Dispatcher {
    /// Keeps the access token fresh until `cancel` fires: logs in when there
    /// is no session, refreshes at 80% of the token's lifetime with the
    /// current refresh token (and stores the new one), logs in with the
    /// password when a refresh is refused, and waits 1 s, 2 s, 4 s... up to
    /// 5 min between failed attempts. Never gives up; the returned task ends
    /// only when `cancel` fires.
    pub fn spawn_keeper(&self, cancel: CancellationToken) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move { this.keep(cancel).await })
    }

    async fn keep(self, cancel: CancellationToken) {
        let inner = &self.inner;
        let mut seen = inner.session.subscribe();
        let mut retry = Retry::dispatcher();
        loop {
            let current = seen.borrow_and_update().clone();
            if let Some(session) = &current {
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => return,
                    // Someone else logged in: plan from the new session.
                    _ = seen.changed() => continue,
                    () = tokio::time::sleep_until(session.refresh_at()) => {}
                }
            }
            let attempt = async {
                let _grant = inner.grant.lock().await;
                let now = inner.session.borrow().clone();
                if generation(&now) != generation(&current) {
                    // Replaced while we waited for the lock: nothing to do.
                    return Ok(());
                }
                match &now {
                    None => inner.password_grant().await,
                    Some(session) => inner.refresh_or_login(session).await,
                }
            };
            let result = tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                result = attempt => result,
            };
            match result {
                Ok(()) => retry.reset(),
                Err(error) => {
                    let delay = retry.delay();
                    let what = if current.is_some() {
                        "refreshing the dispatcher token failed"
                    } else {
                        "logging in to the dispatcher failed"
                    };
                    tracing::warn!(%error, retry_in_s = delay.as_secs(), "{what}; will retry");
                    let _ = seen.borrow_and_update();
                    tokio::select! {
                        biased;
                        () = cancel.cancelled() => return,
                        // Someone else logged in meanwhile: start over.
                        _ = seen.changed() => retry.reset(),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}
