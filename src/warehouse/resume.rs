//! Resuming a file: how far its `<name>.tmp` in the warehouse can be
//! trusted (from the file's upload journal, or taken for a prefix when it
//! has none), and the [`Record`] that keeps that journal on disk as the
//! warehouse confirms ranges, never ahead of it.
//!
//! Owns the journal's use during one upload. It must not talk to the
//! warehouse (the caller brings the `.tmp`'s size and truncates it) nor
//! choose how the bytes are sent.

use std::time::{Duration, Instant};

use super::UploadItem;
use super::journal::{FileId, Found, Journal, JournalError, Ranges};
use crate::taskfs::OwnFile;

/// The journal is saved after this many newly confirmed bytes (or 1/200
/// of the file, if more) ...
const JOURNAL_EVERY_BYTES: u64 = 4 << 20;
/// ... or this long after its last save, whichever comes first.
const JOURNAL_EVERY: Duration = Duration::from_secs(1);

/// The journal of the file being uploaded: where it is kept (`None`: no
/// journal, so one stream writing in file order), and what it says.
pub(super) struct Record {
    pub(super) path: Option<OwnFile>,
    pub(super) journal: Journal,
    pub(super) unsaved: u64,
    last_save: Instant,
    save_failed: bool,
}

impl Record {
    /// No confirmed range yet, to be kept at `path` (`None`: no journal).
    pub(super) fn new(path: Option<OwnFile>, journal: Journal) -> Self {
        Self {
            path,
            journal,
            unsaved: 0,
            last_save: Instant::now(),
            save_failed: false,
        }
    }

    /// Saves the journal; `Err` only matters before the first write.
    pub(super) async fn save(&mut self) -> Result<(), JournalError> {
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        let journal = self.journal.clone();
        let target = path.clone();
        let result = tokio::task::spawn_blocking(move || journal.save(&target))
            .await
            .unwrap_or_else(|e| {
                Err(JournalError::Write {
                    path: path.path(),
                    source: std::io::Error::other(e.to_string()),
                })
            });
        self.unsaved = 0;
        self.last_save = Instant::now();
        result
    }

    /// A range the warehouse confirmed; saved now and then, never ahead.
    pub(super) async fn confirmed(&mut self, range: std::ops::Range<u64>) {
        self.unsaved += range.end - range.start;
        self.journal.confirmed.insert(range);
        let every = JOURNAL_EVERY_BYTES.max(self.journal.file.size / 200);
        if self.path.is_some()
            && (self.unsaved >= every || self.last_save.elapsed() >= JOURNAL_EVERY)
            && let Err(error) = self.save().await
            && !self.save_failed
        {
            // The journal on disk stays as it was: behind the warehouse,
            // so a resume sends a little more, never less.
            self.save_failed = true;
            tracing::warn!(%error, "could not update the upload journal; going on");
        }
    }

    pub(super) fn remove(&self) {
        if let Some(path) = &self.path
            && let Err(error) = Journal::remove(path)
        {
            tracing::warn!(path = %path.path().display(), %error, "could not remove the upload journal");
        }
    }
}

/// What of `item`'s `.tmp` (`tmp_size` bytes at `tmp_path`, `None`: there
/// is none) can be kept, if anything (`None`: start over), and whether its
/// journal on disk says so already.
pub(super) async fn resumable(
    item: &UploadItem,
    file: FileId,
    tmp_path: &str,
    tmp_size: Option<u64>,
) -> (Option<Ranges>, bool) {
    let size = file.size;
    let found = match &item.journal {
        None => Found::Absent,
        Some(path) => {
            let path = path.clone();
            let remote = tmp_path.to_owned();
            tokio::task::spawn_blocking(move || Journal::load(&path, file, &remote))
                .await
                .unwrap_or_else(|e| Found::Unusable(e.to_string()))
        }
    };
    match (found, tmp_size) {
        (_, None) => (None, false),
        (Found::Usable(journal), Some(partial)) if partial >= journal.confirmed.end() => {
            (Some(journal.confirmed), true)
        }
        (Found::Usable(_), Some(partial)) => {
            tracing::warn!(file = %item.name, partial, "the partial upload is shorter than its journal says; starting over");
            (None, false)
        }
        (Found::Absent, Some(partial)) if partial <= size => {
            // Never written in ranges: what is there is a prefix.
            let mut prefix = Ranges::new();
            prefix.insert(0..partial);
            (Some(prefix), false)
        }
        (Found::Absent, Some(partial)) => {
            tracing::warn!(file = %item.name, partial, size, "a longer partial upload is there; starting over");
            (None, false)
        }
        (Found::Unusable(why), Some(_)) => {
            tracing::warn!(file = %item.name, why, "the upload journal cannot be trusted; starting over");
            (None, false)
        }
    }
}
