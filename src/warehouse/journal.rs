//! The upload journal: which byte ranges of one local file the warehouse
//! has confirmed in its `<name>.tmp` (their SFTP WRITE status came back
//! OK), kept on the local disk so that an upload cut by anything, a kill -9
//! of the worker included, resumes by sending only what is missing.
//!
//! Owns the range arithmetic and the journal file (written to a temporary
//! name, synced, then renamed over the old one, so a crash leaves the old
//! journal or the new one, never half of one). It must not talk to the
//! warehouse or decide what is confirmed: callers record a range only once
//! its status is in, so the journal is never ahead of the server.

use std::fs;
use std::io::{self, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The journal format this code writes and reads.
const FORMAT: u32 = 1;

/// Sorted, disjoint, non-adjacent half-open byte ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `range`, merging it with the ranges it overlaps or touches.
    pub fn insert(&mut self, range: Range<u64>) {
        if range.start >= range.end {
            return;
        }
        let (mut start, mut end) = (range.start, range.end);
        // The first range that ends at or after `start` may merge; so may
        // every one after it that begins at or before `end`.
        let first = self.0.partition_point(|&(_, e)| e < start);
        let mut last = first;
        while last < self.0.len() && self.0[last].0 <= end {
            start = start.min(self.0[last].0);
            end = end.max(self.0[last].1);
            last += 1;
        }
        self.0.splice(first..last, [(start, end)]);
    }

    /// Whether every byte of `range` is covered.
    pub fn contains(&self, range: Range<u64>) -> bool {
        if range.start >= range.end {
            return true;
        }
        let i = self.0.partition_point(|&(_, e)| e <= range.start);
        self.0
            .get(i)
            .is_some_and(|&(s, e)| s <= range.start && range.end <= e)
    }

    /// Where the last range ends (0 when there is none).
    pub fn end(&self) -> u64 {
        self.0.last().map_or(0, |&(_, e)| e)
    }

    /// Bytes covered.
    pub fn covered(&self) -> u64 {
        self.0.iter().map(|&(s, e)| e - s).sum()
    }

    /// The gaps in `0..total`, in order.
    pub fn missing(&self, total: u64) -> Vec<Range<u64>> {
        let mut gaps = Vec::new();
        let mut at = 0;
        for &(s, e) in &self.0 {
            if s >= total {
                break;
            }
            if s > at {
                gaps.push(at..s);
            }
            at = at.max(e);
        }
        if at < total {
            gaps.push(at..total);
        }
        gaps
    }

    /// Checks the invariant (for data read from disk).
    fn is_well_formed(&self) -> bool {
        self.0.iter().all(|&(s, e)| s < e) && self.0.windows(2).all(|w| w[0].1 < w[1].0)
    }
}

/// What identifies the local file a journal was written for: a file with
/// another size or modification time is not the one the ranges are of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub size: u64,
    pub mtime_ns: u128,
}

impl FileId {
    /// The identity of the regular file at `path`.
    pub fn of(path: &Path) -> io::Result<Self> {
        let meta = fs::metadata(path)?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "it is not a regular file",
            ));
        }
        let mtime_ns = meta
            .modified()?
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Ok(Self {
            size: meta.len(),
            mtime_ns,
        })
    }

    /// [`FileId::of`], off the async runtime.
    pub async fn read(path: &Path) -> io::Result<Self> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || Self::of(&path))
            .await
            .map_err(|e| io::Error::other(e.to_string()))?
    }
}

/// The journal of one upload: the local file, the remote `.tmp` it fills,
/// and the ranges the warehouse confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    format: u32,
    pub file: FileId,
    /// The remote path being written (`…/<name>.tmp`).
    pub remote: String,
    pub confirmed: Ranges,
}

/// What was found where a journal may be.
#[derive(Debug)]
pub enum Found {
    /// No journal: nothing was sent in ranges for this file.
    Absent,
    /// A journal for this very file and remote path.
    Usable(Journal),
    /// A journal that cannot be trusted for this upload (another file or
    /// remote path, another format, unreadable): its ranges are unknown,
    /// so the `.tmp` must be written again from the start.
    Unusable(String),
}

#[derive(Debug, Error)]
pub enum JournalError {
    #[error("cannot write the upload journal {path}: {source}; check the disk under ZIM_DIR")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Journal {
    pub fn new(file: FileId, remote: String) -> Self {
        Self {
            format: FORMAT,
            file,
            remote,
            confirmed: Ranges::new(),
        }
    }

    /// Reads the journal at `path` and says whether it serves an upload of
    /// `file` to `remote`.
    pub fn load(path: &Path, file: FileId, remote: &str) -> Found {
        let text = match fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Found::Absent,
            Err(e) => return Found::Unusable(format!("it cannot be read: {e}")),
        };
        let journal: Journal = match serde_json::from_slice(&text) {
            Ok(j) => j,
            Err(e) => return Found::Unusable(format!("it is not a journal: {e}")),
        };
        if journal.format != FORMAT {
            return Found::Unusable(format!("it has format {}", journal.format));
        }
        if journal.file != file {
            return Found::Unusable("the local file changed since it was written".to_owned());
        }
        if journal.remote != remote {
            return Found::Unusable(format!("it is for {}", journal.remote));
        }
        if !journal.confirmed.is_well_formed()
            || journal
                .confirmed
                .0
                .last()
                .is_some_and(|&(_, e)| e > file.size)
        {
            return Found::Unusable("its ranges are not well formed".to_owned());
        }
        Found::Usable(journal)
    }

    /// Writes the journal to `path` atomically: `<path>.new`, synced, then
    /// renamed over `path`.
    pub fn save(&self, path: &Path) -> Result<(), JournalError> {
        let err = |source| JournalError::Write {
            path: path.to_owned(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".new");
        let tmp = PathBuf::from(tmp);
        let text = serde_json::to_vec(self).expect("a journal serializes");
        let mut f = fs::File::create(&tmp).map_err(err)?;
        f.write_all(&text).map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
        fs::rename(&tmp, path).map_err(err)?;
        Ok(())
    }

    /// Removes the journal at `path` (the upload is complete); a missing
    /// one is fine.
    pub fn remove(path: &Path) -> io::Result<()> {
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proptest_config::config;
    use proptest::prelude::*;

    fn model_covered(model: &[bool]) -> u64 {
        model.iter().filter(|&&b| b).count() as u64
    }

    proptest! {
        #![proptest_config(config())]

        /// Against a bitmap model: inserts in any order give the same
        /// coverage, gaps and containment, and the ranges stay canonical.
        #[test]
        fn ranges_match_a_bitmap(ops in proptest::collection::vec((0u64..200, 0u64..40), 0..40)) {
            let mut ranges = Ranges::new();
            let mut model = vec![false; 240];
            for (start, len) in ops {
                ranges.insert(start..start + len);
                for b in &mut model[start as usize..(start + len) as usize] {
                    *b = true;
                }
                prop_assert!(ranges.is_well_formed(), "{ranges:?}");
            }
            prop_assert_eq!(ranges.covered(), model_covered(&model));
            let total = 240;
            let gaps = ranges.missing(total);
            let mut from_gaps = vec![true; 240];
            for g in &gaps {
                prop_assert!(g.start < g.end);
                for b in &mut from_gaps[g.start as usize..g.end as usize] {
                    *b = false;
                }
            }
            prop_assert_eq!(&from_gaps, &model);
            for start in (0..240u64).step_by(7) {
                for len in [1u64, 5, 30] {
                    let end = (start + len).min(240);
                    let all = model[start as usize..end as usize].iter().all(|&b| b);
                    prop_assert_eq!(ranges.contains(start..end), all, "{}..{}", start, end);
                }
            }
        }
    }

    #[test]
    fn touching_ranges_merge_and_gaps_are_listed() {
        let mut r = Ranges::new();
        r.insert(10..20);
        r.insert(30..40);
        r.insert(20..30);
        assert_eq!(r, Ranges(vec![(10, 40)]));
        r.insert(50..60);
        assert_eq!(r.missing(70), vec![0..10, 40..50, 60..70]);
        assert_eq!(r.missing(55), vec![0..10, 40..50]);
        assert_eq!(r.covered(), 40);
        r.insert(5..5);
        assert_eq!(r.covered(), 40, "an empty range adds nothing");
    }

    fn file_id(size: u64) -> FileId {
        FileId {
            size,
            mtime_ns: 1_700_000_000_000_000_000,
        }
    }

    #[test]
    fn a_saved_journal_loads_back_for_the_same_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wiki.zim.journal");
        assert!(matches!(
            Journal::load(&path, file_id(100), "/zim/x/wiki.zim.tmp"),
            Found::Absent
        ));

        let mut j = Journal::new(file_id(100), "/zim/x/wiki.zim.tmp".to_owned());
        j.confirmed.insert(0..40);
        j.confirmed.insert(60..100);
        j.save(&path).unwrap();
        assert!(!dir.path().join("wiki.zim.journal.new").exists());
        match Journal::load(&path, file_id(100), "/zim/x/wiki.zim.tmp") {
            Found::Usable(back) => assert_eq!(back, j),
            other => panic!("{other:?}"),
        }

        let unusable = |found: Found| match found {
            Found::Unusable(why) => why,
            other => panic!("{other:?}"),
        };
        let why = unusable(Journal::load(&path, file_id(101), "/zim/x/wiki.zim.tmp"));
        assert!(why.contains("local file changed"), "{why}");
        let why = unusable(Journal::load(&path, file_id(100), "/zim/y/wiki.zim.tmp"));
        assert!(why.contains("/zim/x/wiki.zim.tmp"), "{why}");

        fs::write(&path, b"{\"format\":1,").unwrap();
        let why = unusable(Journal::load(&path, file_id(100), "/zim/x/wiki.zim.tmp"));
        assert!(why.contains("not a journal"), "{why}");

        // Ranges that overlap, or run past the file, are not trusted.
        for confirmed in ["[[0,50],[40,60]]", "[[0,101]]", "[[30,10]]"] {
            let text = format!(
                "{{\"format\":1,\"file\":{{\"size\":100,\"mtime_ns\":1700000000000000000}},\
                 \"remote\":\"/zim/x/wiki.zim.tmp\",\"confirmed\":{confirmed}}}"
            );
            fs::write(&path, text).unwrap();
            let why = unusable(Journal::load(&path, file_id(100), "/zim/x/wiki.zim.tmp"));
            assert!(why.contains("not well formed"), "{confirmed}: {why}");
        }

        Journal::remove(&path).unwrap();
        Journal::remove(&path).unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn a_journal_that_cannot_be_written_says_where() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no such dir").join("x.journal");
        let e = Journal::new(file_id(1), "/zim/x.tmp".to_owned())
            .save(&path)
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("x.journal") && text.contains("ZIM_DIR"),
            "{text}"
        );
    }
}
