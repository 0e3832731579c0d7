//! The SFTP warehouse: one SSH connection (russh) per upload batch, and
//! for a large file extra ones opened beside it (`UPLOAD_STREAMS`), the
//! warehouse's host key verified on each; files written as `<name>.tmp`,
//! resumed after a cut only from bytes the worker can vouch for (their
//! journal, or a prefix read back and compared), checked (ZIM MD5, remote
//! size) and renamed; a file already there skipped only when its bytes,
//! read back, are this file's; retried with backoff while attempts make
//! progress.
//!
//! Owns the connections and the remote file layout (`/zim<warehouse_path>`,
//! `/logs`). It must not know about Docker, Celery or the task dir: it is
//! given local sources (read through one descriptor each, never opened by
//! path, see [`crate::taskfs`]), remote names and where each journal goes,
//! and reports what it did.
//!
//! - `item`: what one upload is about ([`UploadItem`]) and what became of it;
//! - `upload`: one file, step by step (skip, `.tmp`, resume, send, rename);
//! - `resume`: how much of a `.tmp` can be trusted, and its journal record;
//! - `readback`: comparing what the warehouse holds with the local bytes;
//! - `send`: one file's missing ranges over its streams;
//! - `streams`: the reader and the SFTP streams writing the pieces;
//! - `syncer`: flushing a large file to the warehouse's disk as it arrives;
//! - `progress`: a batch's progress, its metrics and log line;
//! - `journal`: the ranges the warehouse confirmed, kept on local disk;
//! - `session`: one SSH connection and its SFTP session;
//! - `keys`, `known_hosts`: the worker's SSH key and the host-key trust;
//! - `zim`: the ZIM checksum.
//!
//! This file holds [`Warehouse`], [`WarehouseError`], the start-up probe
//! and the retried batch of uploads.

mod item;
pub mod journal;
mod keys;
mod known_hosts;
mod progress;
mod readback;
mod resume;
mod send;
mod session;
mod streams;
mod syncer;
mod upload;
pub mod zim;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use thiserror::Error;
use tokio_util::sync::CancellationToken;

pub use item::{UploadItem, UploadReport};
pub use keys::{ClientKey, HostKeyError, HostKeyTrust, KeyError, parse_public_key_line};
pub use zim::ZimError;

use crate::config::WarehouseSettings;
use crate::retry::Retry;
use progress::Progress;
use session::Connection;
use streams::Extras;
use upload::upload_one;

/// Where ZIM files go: `/zim<warehouse_path>`.
pub const ZIM_ROOT: &str = "/zim";
/// Where container logs go.
pub const LOGS_DIR: &str = "/logs";
/// Suffix of a file being written.
pub const TMP_SUFFIX: &str = ".tmp";
/// First wait after a failed attempt (then as [`Retry::upload`] says).
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// What went wrong talking to the warehouse.
#[derive(Debug, Error)]
pub enum WarehouseError {
    #[error(
        "cannot reach the warehouse at {addr}: {detail}; check WAREHOUSE_HOST, \
         WAREHOUSE_PORT and this host's network"
    )]
    Connect { addr: String, detail: String },
    #[error(transparent)]
    HostKey(#[from] HostKeyError),
    #[error(
        "the warehouse refused the SSH key {key_path} ({algorithm} {fingerprint}) for user \
         {user}: register its public key with the Zimfarm for that user (see the README), \
         or check USERNAME and SSH_KEY"
    )]
    AuthRejected {
        user: String,
        key_path: String,
        algorithm: String,
        fingerprint: String,
    },
    #[error("SSH with the warehouse failed while {context}: {detail}")]
    Ssh {
        context: &'static str,
        detail: String,
    },
    #[error("SFTP {operation} of {path} failed on the warehouse: {detail}")]
    Sftp {
        operation: &'static str,
        path: String,
        detail: String,
    },
    #[error("cannot read {path} for the upload: {detail}")]
    Local { path: PathBuf, detail: String },
    #[error("{name} {source}; it was not kept in the warehouse")]
    Corrupt {
        name: String,
        #[source]
        source: ZimError,
    },
    #[error(
        "{path} already exists in the warehouse with {remote_size} bytes, but the file here has \
         {local_size}; the warehouse never overwrites: ask the Zimfarm admins to remove it"
    )]
    Conflict {
        path: String,
        remote_size: u64,
        local_size: u64,
    },
    #[error(
        "{path} already exists in the warehouse with the same size ({size} bytes) but other \
         bytes (from byte {first_difference} on): it is another file of that name; the \
         warehouse never overwrites: ask the Zimfarm admins to remove it"
    )]
    Differs {
        path: String,
        size: u64,
        first_difference: u64,
    },
    #[error("{path} has {remote_size} bytes in the warehouse after the upload, not {local_size}")]
    SizeMismatch {
        path: String,
        remote_size: u64,
        local_size: u64,
    },
    #[error("refusing to upload {what} {value:?}: {reason}")]
    InvalidPath {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("the upload was cancelled")]
    Cancelled,
    #[error(
        "giving up on the upload after {attempts} attempts without progress; last error: {last}"
    )]
    GaveUp {
        attempts: u32,
        #[source]
        last: Box<WarehouseError>,
    },
}

impl WarehouseError {
    /// An error that another attempt cannot cure: fail at once.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::HostKey(_)
                | Self::AuthRejected { .. }
                | Self::Local { .. }
                | Self::Corrupt { .. }
                | Self::Conflict { .. }
                | Self::Differs { .. }
                | Self::InvalidPath { .. }
                | Self::Cancelled
                | Self::GaveUp { .. }
        )
    }
}

/// The warehouse client: settings, the key (loaded once, at start-up) and
/// the host-key trust. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Warehouse {
    settings: Arc<WarehouseSettings>,
    key: ClientKey,
    trust: Arc<HostKeyTrust>,
    first_backoff: Duration,
    /// The last round trip measured to the warehouse, in µs (0: none yet):
    /// a batch's extra connections open beside its first one.
    rtt_hint: Arc<AtomicU64>,
}

impl Warehouse {
    /// Loads SSH_KEY: a missing, encrypted or unsupported key is an error
    /// now, not after a two-day scrape.
    pub async fn new(settings: WarehouseSettings) -> Result<Self, KeyError> {
        let key = ClientKey::load(&settings.ssh_key).await?;
        let trust = HostKeyTrust::new(
            &settings.host,
            settings.port,
            &settings.known_hosts,
            &settings.host_key_pins,
        );
        Ok(Self {
            settings: Arc::new(settings),
            key,
            trust: Arc::new(trust),
            first_backoff: FIRST_BACKOFF,
            rtt_hint: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The retry policy of an upload attempt, and of each stream.
    fn retry(&self) -> Retry {
        Retry::upload(self.first_backoff, self.settings.upload_retries)
    }

    /// Shortens the wait between attempts (tests, benchmarks).
    pub fn with_first_backoff(mut self, backoff: Duration) -> Self {
        self.first_backoff = backoff;
        self
    }

    pub fn key(&self) -> &ClientKey {
        &self.key
    }

    pub fn settings(&self) -> &WarehouseSettings {
        &self.settings
    }

    /// Connects, checks the host key, logs in and starts SFTP, then says
    /// goodbye: the start-up check that the warehouse will take our files.
    pub async fn probe(&self) -> Result<(), WarehouseError> {
        self.connect().await?.close().await;
        Ok(())
    }

    /// A connection for the extra streams of a file: the first one of the
    /// batch has measured the link and asked the limits already.
    async fn connect_extra(&self) -> Result<Connection, WarehouseError> {
        Connection::open(&self.settings, &self.key, &self.trust, false).await
    }

    async fn connect(&self) -> Result<Connection, WarehouseError> {
        let conn = Connection::open(&self.settings, &self.key, &self.trust, true).await?;
        let micros = u64::try_from(conn.rtt().as_micros()).unwrap_or(u64::MAX);
        self.rtt_hint.store(micros.max(1), Ordering::Relaxed);
        Ok(conn)
    }

    fn rtt_hint(&self) -> Option<Duration> {
        match self.rtt_hint.load(Ordering::Relaxed) {
            0 => None,
            micros => Some(Duration::from_micros(micros)),
        }
    }

    /// The extra connections a batch whose largest striped file has
    /// `largest` bytes wants at `rtt`.
    fn extras_for(&self, rtt: Duration, largest: u64) -> usize {
        if largest == 0 {
            return 0;
        }
        send::streams_for(self.settings.upload_streams, rtt, largest) - 1
    }

    /// Uploads every item, in order, over one connection; reconnects and
    /// resumes after a failure. Gives up after UPLOAD_RETRIES attempts in a
    /// row that made no progress, or at once on a permanent error.
    pub async fn upload(
        &self,
        items: &[UploadItem],
        cancel: &CancellationToken,
    ) -> Result<Vec<UploadReport>, WarehouseError> {
        self.upload_telling(items, cancel, None).await
    }

    /// [`Warehouse::upload`], telling `task` (a task's progress) how far
    /// the batch is as it goes.
    pub async fn upload_telling(
        &self,
        items: &[UploadItem],
        cancel: &CancellationToken,
        task: Option<crate::progress::TaskProgress>,
    ) -> Result<Vec<UploadReport>, WarehouseError> {
        for item in items {
            item.validate()?;
        }
        // The batch's bytes, and its largest file with a journal: only
        // those go over several streams.
        let (mut total, mut largest) = (0, 0);
        for item in items {
            let local = |e: std::io::Error| WarehouseError::Local {
                path: item.local.clone(),
                detail: e.to_string(),
            };
            let source = item.source.open().await.map_err(local)?;
            let size = journal::FileId::of_open(&source).await.map_err(local)?.size;
            total += size;
            if item.journal.is_some() {
                largest = largest.max(size);
            }
        }
        let mut progress = Progress::new(total).telling(task);
        let mut reports: Vec<UploadReport> = Vec::with_capacity(items.len());
        let mut extras = Extras::none();
        if let Some(rtt) = self.rtt_hint() {
            // Known from an earlier connection: they open beside the first.
            extras.open(self, self.extras_for(rtt, largest));
        }
        let mut retry = self.retry();
        loop {
            let before = (reports.len(), progress.sent());
            let attempt = async {
                let mut conn = self.connect().await?;
                if !extras.started() {
                    extras.open(self, self.extras_for(conn.rtt(), largest));
                }
                while reports.len() < items.len() {
                    let item = &items[reports.len()];
                    let report =
                        upload_one(self, &mut conn, &mut extras, item, &mut progress).await?;
                    reports.push(report);
                }
                conn.close().await;
                Ok::<_, WarehouseError>(())
            };
            let result = tokio::select! {
                r = attempt => r,
                _ = cancel.cancelled() => Err(WarehouseError::Cancelled),
            };
            let error = match result {
                Ok(()) => {
                    extras.close().await;
                    return Ok(reports);
                }
                Err(e) if e.is_permanent() => return Err(e),
                Err(e) => e,
            };
            // The next attempt opens its extra connections afresh: these
            // may have broken with the first one, or never come up.
            std::mem::replace(&mut extras, Extras::none()).close().await;
            if (reports.len(), progress.sent()) != before {
                // This attempt got somewhere: the link works, it just broke.
                retry.reset();
            }
            let Some(delay) = retry.failed() else {
                return Err(WarehouseError::GaveUp {
                    attempts: retry.failures(),
                    last: Box::new(error),
                });
            };
            tracing::warn!(
                %error,
                attempt = retry.failures(),
                of = self.settings.upload_retries + 1,
                retry_in = ?delay,
                "upload attempt failed; reconnecting and resuming"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => return Err(WarehouseError::Cancelled),
            }
        }
    }
}
