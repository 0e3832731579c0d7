//! Flushes a large file to the warehouse's disk while it is still being
//! written, so that the sync before the rename finds little left to write:
//! without it, the server's disk takes the whole file at the end, while
//! the task waits (a second per GiB on a fast disk, more on a busy one).
//!
//! Owns a second SFTP session on the upload's connection (a channel of its
//! own, served by its own server process, so the writes never wait behind
//! its syncs) and the pace of its syncs. It must not write, judge or
//! publish the file, nor fail the upload: a sync that cannot be had is
//! only a slower end, and the publish still syncs the file itself.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

use super::WarehouseError;
use super::session::Sftp;

/// Bytes confirmed between two syncs: the server's disk takes them in
/// well under the time they take to arrive.
pub(super) const SYNC_EVERY: u64 = 64 << 20;

/// The syncs of one file's upload; dropping it stops them.
pub(super) struct Syncer {
    confirmed: watch::Sender<u64>,
    /// Bytes confirmed before the last sync that worked began.
    synced: Arc<AtomicU64>,
    _task: tokio::task::JoinSet<()>,
}

impl Syncer {
    /// Starts syncing `path` on the session `side` opens, once the first
    /// [`SYNC_EVERY`] bytes are confirmed, then after each next
    /// [`SYNC_EVERY`].
    pub(super) fn start(
        side: impl Future<Output = Result<Sftp, WarehouseError>> + Send + 'static,
        path: String,
    ) -> Self {
        let (confirmed, mut seen) = watch::channel(0u64);
        let synced = Arc::new(AtomicU64::new(0));
        let mut task = tokio::task::JoinSet::new();
        let done = synced.clone();
        task.spawn(async move {
            if seen.wait_for(|&c| c >= SYNC_EVERY).await.is_err() {
                return;
            }
            let sftp = match side.await {
                Ok(sftp) if sftp.can_sync() => sftp,
                Ok(_) => return,
                Err(error) => {
                    tracing::debug!(%error, "no second session to sync the upload on");
                    return;
                }
            };
            let handle = match sftp.open_for_write(&path, false, false).await {
                Ok(handle) => handle,
                Err(error) => {
                    tracing::debug!(%error, path, "cannot open the upload to sync it");
                    return;
                }
            };
            loop {
                let before = *seen.borrow();
                if let Err(error) = sftp.sync(&handle).await {
                    tracing::debug!(%error, path, "the upload's sync failed");
                    return;
                }
                done.store(before, Ordering::Relaxed);
                let next = before + SYNC_EVERY;
                if seen.wait_for(|&c| c >= next).await.is_err() {
                    break;
                }
            }
            let _ = sftp.close(&handle).await;
        });
        Self {
            confirmed,
            synced,
            _task: task,
        }
    }

    /// Tells how many bytes of the file the warehouse has confirmed.
    pub(super) fn confirmed(&self, bytes: u64) {
        self.confirmed.send_replace(bytes);
    }

    /// Bytes the warehouse had on its disk at the last sync.
    pub(super) fn synced(&self) -> u64 {
        self.synced.load(Ordering::Relaxed)
    }
}
