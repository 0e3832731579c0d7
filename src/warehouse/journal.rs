//! The upload journal: which byte ranges of one local file the warehouse
//! has confirmed in its `<name>.tmp` (their SFTP WRITE status came back
//! OK), kept on the local disk so that an upload cut by anything, a kill -9
//! of the worker included, resumes by sending only what is missing.
//!
//! Owns the range arithmetic and the journal file's format. The file is
//! one of the worker's own ([`OwnFile`], out of every container's reach):
//! written to a fresh temporary name, synced, then renamed over the old
//! one, so a crash leaves the old journal or the new one, never half of
//! one. It must not talk to the
//! warehouse or decide what is confirmed: callers record a range only once
//! its status is in, so the journal is never ahead of the server.

use std::fs;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::taskfs::OwnFile;

/// The journal format this code writes and reads.
const FORMAT: u32 = 1;
/// A journal larger than this is not read (its ranges merge as they are
/// confirmed: a real one is a few hundred bytes).
const MAX_JOURNAL_BYTES: u64 = 16 << 20;

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
    /// The identity of what `stat` describes, if it is a regular file.
    pub fn from_stat(stat: &rustix::fs::Stat) -> io::Result<Self> {
        if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "it is not a regular file",
            ));
        }
        let mtime_ns = if stat.st_mtime < 0 {
            0
        } else {
            stat.st_mtime as u128 * 1_000_000_000 + stat.st_mtime_nsec as u128
        };
        Ok(Self {
            size: stat.st_size.max(0) as u64,
            mtime_ns,
        })
    }

    /// The identity of an open file (`fstat`).
    pub fn of_file(file: &fs::File) -> io::Result<Self> {
        Self::from_stat(&rustix::fs::fstat(file)?)
    }

    /// [`FileId::of_file`], off the async runtime.
    pub async fn of_open(file: &std::sync::Arc<fs::File>) -> io::Result<Self> {
        let file = file.clone();
        tokio::task::spawn_blocking(move || Self::of_file(&file))
            .await
            .map_err(|e| io::Error::other(e.to_string()))?
    }

    /// The identity of the regular file at `path`, links followed: for
    /// paths the caller trusts (tests, tools), never a task dir's.
    pub fn of(path: &Path) -> io::Result<Self> {
        Self::from_stat(&rustix::fs::stat(path)?)
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

    /// Reads the journal `at` and says whether it serves an upload of
    /// `file` to `remote`.
    pub fn load(at: &OwnFile, file: FileId, remote: &str) -> Found {
        let text = match at.read(MAX_JOURNAL_BYTES) {
            Ok(Some(text)) => text,
            Ok(None) => return Found::Absent,
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

    /// Writes the journal `at` atomically: a fresh temporary file, synced,
    /// then renamed over it.
    pub fn save(&self, at: &OwnFile) -> Result<(), JournalError> {
        let text = serde_json::to_vec(self).expect("a journal serializes");
        at.replace(&text, true)
            .map_err(|source| JournalError::Write {
                path: at.path(),
                source,
            })
    }

    /// Removes the journal `at` (the upload is complete); a missing one is
    /// fine.
    pub fn remove(at: &OwnFile) -> io::Result<()> {
        at.remove()
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
        let at = OwnFile::at(&path).unwrap();
        assert!(matches!(
            Journal::load(&at, file_id(100), "/zim/x/wiki.zim.tmp"),
            Found::Absent
        ));

        let mut j = Journal::new(file_id(100), "/zim/x/wiki.zim.tmp".to_owned());
        j.confirmed.insert(0..40);
        j.confirmed.insert(60..100);
        j.save(&at).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
        match Journal::load(&at, file_id(100), "/zim/x/wiki.zim.tmp") {
            Found::Usable(back) => assert_eq!(back, j),
            other => panic!("{other:?}"),
        }

        let unusable = |found: Found| match found {
            Found::Unusable(why) => why,
            other => panic!("{other:?}"),
        };
        let why = unusable(Journal::load(&at, file_id(101), "/zim/x/wiki.zim.tmp"));
        assert!(why.contains("local file changed"), "{why}");
        let why = unusable(Journal::load(&at, file_id(100), "/zim/y/wiki.zim.tmp"));
        assert!(why.contains("/zim/x/wiki.zim.tmp"), "{why}");

        fs::write(&path, b"{\"format\":1,").unwrap();
        let why = unusable(Journal::load(&at, file_id(100), "/zim/x/wiki.zim.tmp"));
        assert!(why.contains("not a journal"), "{why}");

        // Ranges that overlap, or run past the file, are not trusted.
        for confirmed in ["[[0,50],[40,60]]", "[[0,101]]", "[[30,10]]"] {
            let text = format!(
                "{{\"format\":1,\"file\":{{\"size\":100,\"mtime_ns\":1700000000000000000}},\
                 \"remote\":\"/zim/x/wiki.zim.tmp\",\"confirmed\":{confirmed}}}"
            );
            fs::write(&path, text).unwrap();
            let why = unusable(Journal::load(&at, file_id(100), "/zim/x/wiki.zim.tmp"));
            assert!(why.contains("not well formed"), "{confirmed}: {why}");
        }

        Journal::remove(&at).unwrap();
        Journal::remove(&at).unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn a_journal_that_cannot_be_written_says_where() {
        let dir = tempfile::tempdir().unwrap();
        let at = OwnFile::at(&dir.path().join("x.journal")).unwrap();
        std::fs::remove_dir(dir.path()).unwrap();
        let e = Journal::new(file_id(1), "/zim/x.tmp".to_owned())
            .save(&at)
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("x.journal") && text.contains("ZIM_DIR"),
            "{text}"
        );
    }
}
