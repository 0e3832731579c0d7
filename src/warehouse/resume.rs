//! Resuming a file: what of its `<name>.tmp` in the warehouse the worker
//! can vouch for ([`plan`]: the file's own upload journal, or, without one,
//! a prefix to read back and compare; else nothing), and the [`Record`]
//! that keeps that journal on disk as the warehouse confirms ranges, never
//! ahead of it.
//!
//! Owns the journal's use during one upload and the resume decision. It
//! must not talk to the warehouse (the caller brings the `.tmp`'s size,
//! reads it back with `readback` and truncates it) nor choose how the
//! bytes are sent.

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

/// Below this many bytes, a `.tmp` without a journal is not worth reading
/// back: sending them again costs about the same (one window of writes of
/// one stream, `STREAM_IN_FLIGHT`).
pub(super) const READ_BACK_MIN: u64 = 4 << 20;

/// What to do with the `.tmp` found in the warehouse: keep only bytes the
/// worker can vouch for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Plan {
    /// There is none, or it is empty: write it from the start.
    Fresh,
    /// This file's own journal vouches for these ranges: the warehouse
    /// confirmed each write of them, for this very local file.
    Journal(Ranges),
    /// No journal: its first `n` bytes may be an earlier upload of this
    /// file, made over one stream in file order. They are read back and
    /// compared with the local bytes; only the prefix that matches is kept.
    ReadBack(u64),
    /// Nothing of it can be vouched for (the reason): written from the
    /// start.
    StartOver(String),
}

/// The [`Plan`] for a `.tmp` of `tmp_size` bytes (`None`: there is none)
/// when uploading a local file of `size` bytes whose journal is `found`.
pub(super) fn plan(found: Found, tmp_size: Option<u64>, size: u64) -> Plan {
    let Some(partial) = tmp_size else {
        return Plan::Fresh;
    };
    match found {
        Found::Usable(journal) if partial >= journal.confirmed.end() => {
            Plan::Journal(journal.confirmed)
        }
        Found::Usable(journal) => Plan::StartOver(format!(
            "the partial upload has {partial} bytes, fewer than its journal says ({})",
            journal.confirmed.end()
        )),
        Found::Unusable(why) => {
            Plan::StartOver(format!("the upload journal cannot be trusted: {why}"))
        }
        Found::Absent if partial == 0 => Plan::Fresh,
        Found::Absent if partial.min(size) < READ_BACK_MIN => Plan::StartOver(format!(
            "it has no journal, and its {partial} bytes are not worth reading back"
        )),
        Found::Absent => Plan::ReadBack(partial.min(size)),
    }
}

/// Loads `item`'s journal for an upload of `file` to `tmp_path`, off the
/// runtime.
pub(super) async fn load_journal(item: &UploadItem, file: FileId, tmp_path: &str) -> Found {
    let Some(path) = item.journal.clone() else {
        return Found::Absent;
    };
    let remote = tmp_path.to_owned();
    tokio::task::spawn_blocking(move || Journal::load(&path, file, &remote))
        .await
        .unwrap_or_else(|e| Found::Unusable(e.to_string()))
}

/// The length to cut a `.tmp` of `tmp_size` bytes to, when it holds more
/// than the bytes `kept` (everything after them is written again anyway):
/// no byte that was not vouched for stays behind the last kept one.
pub(super) fn cut_to(tmp_size: Option<u64>, kept: &Ranges) -> Option<u64> {
    tmp_size.filter(|&t| t > kept.end()).map(|_| kept.end())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(list: &[(u64, u64)]) -> Ranges {
        let mut r = Ranges::new();
        for &(s, e) in list {
            r.insert(s..e);
        }
        r
    }

    fn usable(list: &[(u64, u64)]) -> Found {
        let file = FileId {
            size: 100 << 20,
            mtime_ns: 1,
        };
        let mut journal = Journal::new(file, "/zim/w/a.zim.tmp".to_owned());
        journal.confirmed = ranges(list);
        Found::Usable(journal)
    }

    #[test]
    fn only_the_journal_or_a_read_back_is_trusted() {
        let mib = 1u64 << 20;
        let size = 100 * mib;
        let journal = |list: &[(u64, u64)]| Some(Plan::Journal(ranges(list)));
        // (journal, .tmp size, expected plan; `None`: start over)
        let cases: Vec<(Found, Option<u64>, Option<Plan>)> = vec![
            // Nothing there.
            (Found::Absent, None, Some(Plan::Fresh)),
            (usable(&[(0, mib)]), None, Some(Plan::Fresh)),
            (Found::Absent, Some(0), Some(Plan::Fresh)),
            // The journal vouches for its ranges, however long the .tmp.
            (
                usable(&[(0, mib), (2 * mib, 3 * mib)]),
                Some(3 * mib),
                journal(&[(0, mib), (2 * mib, 3 * mib)]),
            ),
            (usable(&[(0, mib)]), Some(size + 5), journal(&[(0, mib)])),
            (usable(&[]), Some(0), journal(&[])),
            // A .tmp shorter than its journal says: someone cut it.
            (usable(&[(0, 3 * mib)]), Some(3 * mib - 1), None),
            // A journal of another file, or unreadable: never trusted.
            (Found::Unusable("x".to_owned()), Some(50 * mib), None),
            // No journal: read back, at most the local file's size.
            (
                Found::Absent,
                Some(50 * mib),
                Some(Plan::ReadBack(50 * mib)),
            ),
            (Found::Absent, Some(size), Some(Plan::ReadBack(size))),
            (Found::Absent, Some(size * 3), Some(Plan::ReadBack(size))),
            (
                Found::Absent,
                Some(READ_BACK_MIN),
                Some(Plan::ReadBack(READ_BACK_MIN)),
            ),
            // ... unless sending it again costs about the same.
            (Found::Absent, Some(READ_BACK_MIN - 1), None),
            (Found::Absent, Some(1), None),
        ];
        for (i, (found, tmp, expected)) in cases.into_iter().enumerate() {
            let got = plan(found, tmp, size);
            match expected {
                Some(plan) => assert_eq!(got, plan, "case {i}"),
                None => assert!(matches!(got, Plan::StartOver(_)), "case {i}: {got:?}"),
            }
        }
        // A small file is never read back: sent again whole.
        assert!(matches!(
            plan(Found::Absent, Some(mib), mib),
            Plan::StartOver(_)
        ));
    }

    #[test]
    fn the_reasons_to_start_over_say_what_was_found() {
        let Plan::StartOver(why) = plan(usable(&[(0, 3 << 20)]), Some(1000), 100 << 20) else {
            panic!("not a start over");
        };
        assert!(
            why.contains("1000") && why.contains(&(3u64 << 20).to_string()),
            "{why}"
        );
        let Plan::StartOver(why) = plan(Found::Unusable("it is for /zim/x".to_owned()), Some(1), 9)
        else {
            panic!("not a start over");
        };
        assert!(why.contains("cannot be trusted: it is for /zim/x"), "{why}");
    }

    #[test]
    fn what_was_not_vouched_for_is_cut_off() {
        // (.tmp size, kept, cut to)
        let cases = [
            (None, ranges(&[]), None),
            (Some(0), ranges(&[]), None),
            (Some(10), ranges(&[]), Some(0)),
            (Some(10), ranges(&[(0, 10)]), None),
            (Some(10), ranges(&[(0, 4)]), Some(4)),
            (Some(10), ranges(&[(0, 2), (5, 7)]), Some(7)),
            (Some(7), ranges(&[(0, 2), (5, 7)]), None),
        ];
        for (tmp, kept, expected) in cases {
            assert_eq!(cut_to(tmp, &kept), expected, "{tmp:?} {kept:?}");
        }
    }
}
