//! What one upload is about: a local file and where it goes
//! ([`UploadItem`], its remote path and the checks that keep its name and
//! directory in their place), and what happened to it ([`UploadReport`]).
//!
//! Owns those two types. It must not talk to the warehouse nor read the
//! file: the file is read through its [`LocalSource`], never by path.

use std::path::PathBuf;

use serde::Serialize;

use super::journal::FileId;
use super::{LOGS_DIR, TMP_SUFFIX, WarehouseError, ZIM_ROOT};
use crate::taskfs::{LocalSource, OwnFile};

/// One local file and where it goes.
#[derive(Debug, Clone)]
pub struct UploadItem {
    /// Where the local file is: for messages only, never opened.
    pub local: PathBuf,
    /// What the upload reads: opened once per attempt, without following
    /// links, a regular file only, then sized, hashed and sent through
    /// that one descriptor.
    pub source: LocalSource,
    /// Absolute remote directory: `/zim<warehouse_path>` or `/logs`.
    pub remote_dir: String,
    /// The remote file name (one path component).
    pub name: String,
    /// Where this file's upload journal is kept (a file of the worker's
    /// own); without one the file goes over one stream, in file order.
    pub journal: Option<OwnFile>,
    /// The file as it was when its ZIM checksum was checked just before
    /// (early upload checks before it sends): while it is still that file,
    /// the upload does not hash it a second time.
    pub checked: Option<FileId>,
}

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UploadReport {
    pub name: String,
    pub remote_path: String,
    pub size: u64,
    /// It was in the warehouse already, with this size: nothing was sent.
    pub skipped: bool,
    /// Where the successful attempt started writing: above 0 when it
    /// resumed a `.tmp` left by an earlier, broken attempt.
    pub resumed_from: u64,
    /// Bytes the successful attempt wrote.
    pub bytes_sent: u64,
    /// Whether the ZIM checksum was verified.
    pub zim_verified: bool,
    /// The streams the last attempt opened (0 when nothing was sent).
    pub streams: usize,
    /// Seconds from the first write to the last status of the last
    /// attempt: the time the bytes were on their way.
    pub sending_secs: f64,
    /// Bytes the warehouse had synced to its disk while the last attempt
    /// went on (large files only), so the sync before the rename had only
    /// the rest to write.
    pub synced_early: u64,
}

impl UploadItem {
    /// A ZIM file (or any offliner output) for `/zim<warehouse_path>/<name>`,
    /// at a local path whose directory the caller trusts (the file itself
    /// is opened without following a link).
    pub fn output(local: PathBuf, warehouse_path: &str, name: &str) -> Self {
        Self::output_from(LocalSource::at(local), warehouse_path, name)
    }

    /// [`UploadItem::output`], read from `source`.
    pub fn output_from(source: LocalSource, warehouse_path: &str, name: &str) -> Self {
        let dir = format!("{ZIM_ROOT}{}", warehouse_path.trim_end_matches('/'));
        Self {
            local: source.shown(),
            source,
            remote_dir: dir,
            name: name.to_owned(),
            journal: None,
            checked: None,
        }
    }

    /// Keeps this file's upload journal at `path` (outside the listing of
    /// what is to be uploaded), so that it may go over several streams
    /// and resume exactly.
    pub fn with_journal(mut self, at: OwnFile) -> Self {
        self.journal = Some(at);
        self
    }

    /// Reads it from `source` instead (a file opened already).
    pub fn with_source(mut self, source: LocalSource) -> Self {
        self.local = source.shown();
        self.source = source;
        self
    }

    /// Says its ZIM checksum was checked while it was `file`.
    pub fn checked_as(mut self, file: FileId) -> Self {
        self.checked = Some(file);
        self
    }

    /// A container log for `/logs/<name>`, at a local path whose directory
    /// the caller trusts.
    pub fn log(local: PathBuf, name: &str) -> Self {
        Self::log_from(LocalSource::at(local), name)
    }

    /// [`UploadItem::log`], read from `source`.
    pub fn log_from(source: LocalSource, name: &str) -> Self {
        Self {
            local: source.shown(),
            source,
            remote_dir: LOGS_DIR.to_owned(),
            name: name.to_owned(),
            journal: None,
            checked: None,
        }
    }

    pub fn remote_path(&self) -> String {
        format!("{}/{}", self.remote_dir, self.name)
    }

    /// Refuses names and directories that could escape their place, and
    /// names that could stand for another upload's partial file.
    pub(super) fn validate(&self) -> Result<(), WarehouseError> {
        let bad = |what, value: &str, reason| WarehouseError::InvalidPath {
            what,
            value: value.to_owned(),
            reason,
        };
        let name = self.name.as_str();
        if name.is_empty() {
            return Err(bad("file name", name, "it is empty"));
        }
        if name.contains('/') {
            return Err(bad("file name", name, "it contains '/'"));
        }
        if name == "." || name == ".." {
            return Err(bad("file name", name, "it is '.' or '..'"));
        }
        if name.chars().any(char::is_control) {
            return Err(bad("file name", name, "it contains control characters"));
        }
        if name.ends_with(TMP_SUFFIX) {
            // `x.tmp` is where another upload writes `x`: publishing one
            // would plant a partial file for it.
            return Err(bad(
                "file name",
                name,
                "it ends in .tmp, the name the warehouse gives a file being written",
            ));
        }
        if name.len() > 255 - TMP_SUFFIX.len() {
            return Err(bad("file name", name, "it is longer than 251 bytes"));
        }
        let dir = self.remote_dir.as_str();
        if !dir.starts_with('/') {
            return Err(bad("remote directory", dir, "it is not absolute"));
        }
        if dir
            .split('/')
            .skip(1)
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(bad(
                "remote directory",
                dir,
                "it has an empty, '.' or '..' component",
            ));
        }
        if dir.chars().any(char::is_control) {
            return Err(bad(
                "remote directory",
                dir,
                "it contains control characters",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl UploadItem {
        fn in_dir(mut self, dir: &str) -> Self {
            self.remote_dir = dir.to_owned();
            self
        }
    }

    fn item(dir: &str, name: &str) -> UploadItem {
        UploadItem::output(PathBuf::from("/x"), "/w", name).in_dir(dir)
    }

    #[test]
    fn remote_paths() {
        let i = UploadItem::output(PathBuf::from("/w/a.zim"), "/wikipedia", "a.zim");
        assert_eq!(i.remote_path(), "/zim/wikipedia/a.zim");
        let i = UploadItem::output(PathBuf::from("/w/a.zim"), "/other/", "a.zim");
        assert_eq!(i.remote_path(), "/zim/other/a.zim");
        let i = UploadItem::log(PathBuf::from("/w/x.log.gz"), "x.log.gz");
        assert_eq!(i.remote_path(), "/logs/x.log.gz");
    }

    #[test]
    fn names_leave_room_for_the_tmp_suffix() {
        // The warehouse's file names hold 255 bytes, `<name>.tmp` included.
        assert!(item("/zim/w", &"n".repeat(251)).validate().is_ok());
        let err = item("/zim/w", &"n".repeat(252)).validate().unwrap_err();
        assert!(err.to_string().contains("251 bytes"), "{err}");
    }

    #[test]
    fn names_that_could_escape_are_refused() {
        for name in [
            "",
            ".",
            "..",
            "a/b.zim",
            "../x.zim",
            "a\nb",
            "a\0b",
            "a.zim.tmp",
            ".tmp",
        ] {
            assert!(
                matches!(
                    item("/zim/w", name).validate(),
                    Err(WarehouseError::InvalidPath { .. })
                ),
                "{name:?}"
            );
        }
        for dir in ["zim/w", "/zim/../etc", "/zim//w", "/zim/./w", "/zim/w/"] {
            assert!(
                matches!(
                    item(dir, "a.zim").validate(),
                    Err(WarehouseError::InvalidPath { .. })
                ),
                "{dir:?}"
            );
        }
        for name in [
            "a b.zim",
            "ünïcødé 文字.zim",
            "a..b.zim",
            ".hidden",
            "a.tmp.zim",
            "a.TMP",
        ] {
            item("/zim/w x", name).validate().unwrap();
        }
    }
}
