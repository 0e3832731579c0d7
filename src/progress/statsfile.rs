//! The scraper's own progress file (openZIM's `--stats-filename`: JSON
//! `{"done": N, "total": N}`), read the way every file of the task dir is
//! read: as the scraper's, so hostile.
//!
//! It is opened beneath the task dir's handle without following a link at
//! any step, only when it is a regular file (a fifo is never opened, so a
//! read never blocks), checked for size before it is read and read at most
//! [`MAX_STATS_FILE_BYTES`]; its numbers are clamped. Owns that reading and
//! the file's reserved name; it must not write anything, nor decide what
//! to do when the file is bad (the caller keeps its last good reading).

use std::io::{self, Read};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::taskfs::{DirHandle, OpenError};

/// The progress file's name in the task dir, passed to the scraper as
/// `--stats-filename=<output dir>/<this>`. Reserved: never uploaded.
pub const STATS_FILE_NAME: &str = ".zimfarm-progress.json";

/// Largest progress file read: a real one is a few dozen bytes.
pub const MAX_STATS_FILE_BYTES: u64 = 64 * 1024;

/// Largest count kept: 2^53, the largest integer a JSON reader holding
/// numbers as doubles (Python's json, JavaScript) keeps exact.
pub const MAX_COUNT: u64 = 1 << 53;

/// What the scraper says of itself: `done` of `total` items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScraperProgress {
    pub done: u64,
    pub total: u64,
}

impl ScraperProgress {
    /// `done / total` between 0 and 1; `None` while `total` is 0.
    pub fn ratio(&self) -> Option<f64> {
        (self.total > 0).then(|| self.done as f64 / self.total as f64)
    }
}

/// Why the progress file gave no reading.
#[derive(Debug, thiserror::Error)]
pub enum StatsFileError {
    #[error("the scraper has not written it (yet)")]
    Missing,
    #[error("it is {0}, not a regular file; it is not opened")]
    NotRegular(&'static str),
    #[error("it is reached through a link; links in the task dir are not followed")]
    Escapes,
    #[error("it holds {0} bytes, over the {MAX_STATS_FILE_BYTES} bytes read; it is not read")]
    TooLarge(u64),
    #[error("it is not JSON of the form {{\"done\": N, \"total\": N}}: {0}")]
    Malformed(String),
    #[error("cannot read it: {0}")]
    Io(#[from] io::Error),
}

impl StatsFileError {
    /// A short name of the kind of problem, to say each kind once; a
    /// file that is not regular is named by what it is, so that a link
    /// that becomes a fifo is said again.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::NotRegular(what) => what,
            Self::Escapes => "link",
            Self::TooLarge(_) => "too_large",
            Self::Malformed(_) => "malformed",
            Self::Io(_) => "io",
        }
    }
}

/// Reads the progress file beneath `dir` (the task dir). Blocking, but
/// never on a fifo or a device.
pub fn read_stats_file(dir: &DirHandle) -> Result<ScraperProgress, StatsFileError> {
    let file = dir.open_file(STATS_FILE_NAME).map_err(|e| match e {
        e if e.is_not_found() => StatsFileError::Missing,
        OpenError::NotRegular(kind) => StatsFileError::NotRegular(kind.described()),
        OpenError::Escapes => StatsFileError::Escapes,
        OpenError::Changed => StatsFileError::NotRegular("a file that changed while opened"),
        OpenError::Io(e) => StatsFileError::Io(e),
    })?;
    let size = file.metadata()?.len();
    if size > MAX_STATS_FILE_BYTES {
        return Err(StatsFileError::TooLarge(size));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(MAX_STATS_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_STATS_FILE_BYTES {
        return Err(StatsFileError::TooLarge(bytes.len() as u64));
    }
    parse(&bytes)
}

/// The reading in `bytes`: `done` and `total`, each a number (an integer
/// or a float, cut down to an integer), negative ones taken as 0, huge
/// ones as [`MAX_COUNT`]; `done` is at most `total` when `total` is set.
/// Other fields are ignored.
pub fn parse(bytes: &[u8]) -> Result<ScraperProgress, StatsFileError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| StatsFileError::Malformed(e.to_string()))?;
    let Value::Object(fields) = value else {
        return Err(StatsFileError::Malformed("not an object".to_owned()));
    };
    let count = |name: &str| -> Result<u64, StatsFileError> {
        let n = fields
            .get(name)
            .ok_or_else(|| StatsFileError::Malformed(format!("no \"{name}\"")))?;
        clamp(n).ok_or_else(|| StatsFileError::Malformed(format!("\"{name}\" is not a number")))
    };
    let (done, total) = (count("done")?, count("total")?);
    let done = if total > 0 { done.min(total) } else { done };
    Ok(ScraperProgress { done, total })
}

fn clamp(n: &Value) -> Option<u64> {
    let Value::Number(n) = n else { return None };
    if let Some(u) = n.as_u64() {
        return Some(u.min(MAX_COUNT));
    }
    if n.as_i64().is_some() {
        // Negative.
        return Some(0);
    }
    let f = n.as_f64()?;
    if f.is_nan() {
        return None;
    }
    Some(if f <= 0.0 {
        0
    } else if f >= MAX_COUNT as f64 {
        MAX_COUNT
    } else {
        f as u64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reading_is_parsed_and_clamped() {
        let read = |text: &str| parse(text.as_bytes());
        assert_eq!(
            read(r#"{"done": 3, "total": 10}"#).unwrap(),
            ScraperProgress { done: 3, total: 10 }
        );
        assert_eq!(
            read(r#"{"done": 12.9, "total": 10.5, "extra": [1]}"#).unwrap(),
            ScraperProgress {
                done: 10,
                total: 10
            }
        );
        assert_eq!(
            read(r#"{"done": -4, "total": 1e300}"#).unwrap(),
            ScraperProgress {
                done: 0,
                total: MAX_COUNT
            }
        );
        assert_eq!(
            read(r#"{"done": 99999999999999999999999, "total": 0}"#).unwrap(),
            ScraperProgress {
                done: MAX_COUNT,
                total: 0
            }
        );
        assert_eq!(read(r#"{"done": 1, "total": 0}"#).unwrap().ratio(), None);
        assert_eq!(
            read(r#"{"done": 1, "total": 4}"#).unwrap().ratio(),
            Some(0.25)
        );
    }

    #[test]
    fn a_half_written_or_odd_file_is_refused_with_why() {
        for (text, why) in [
            (r#"{"done": 3, "tot"#, "EOF"),
            ("", "EOF"),
            ("[1, 2]", "not an object"),
            (r#"{"done": 3}"#, "no \"total\""),
            (r#"{"done": "3", "total": 4}"#, "\"done\" is not a number"),
            (r#"{"done": null, "total": 4}"#, "\"done\" is not a number"),
        ] {
            let error = parse(text.as_bytes()).unwrap_err();
            assert!(
                matches!(error, StatsFileError::Malformed(_)) && error.to_string().contains(why),
                "{text}: {error}"
            );
        }
    }

    #[test]
    fn only_a_small_regular_file_beneath_the_dir_is_read() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DirHandle::open(tmp.path()).unwrap();
        let path = tmp.path().join(STATS_FILE_NAME);
        assert!(matches!(
            read_stats_file(&dir),
            Err(StatsFileError::Missing)
        ));
        std::fs::write(&path, br#"{"done": 5, "total": 6}"#).unwrap();
        assert_eq!(
            read_stats_file(&dir).unwrap(),
            ScraperProgress { done: 5, total: 6 }
        );
        // A link, even to a good file: not followed.
        std::fs::remove_file(&path).unwrap();
        let target = tmp.path().join("real.json");
        std::fs::write(&target, br#"{"done": 5, "total": 6}"#).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let error = read_stats_file(&dir).unwrap_err();
        assert!(error.to_string().contains("link"), "{error}");
        // A fifo: refused without being opened (an open would block).
        std::fs::remove_file(&path).unwrap();
        nix_mkfifo(&path);
        let fifo = read_stats_file(&dir).unwrap_err();
        assert!(matches!(fifo, StatsFileError::NotRegular(_)), "{fifo}");
        assert_ne!(
            fifo.kind(),
            error.kind(),
            "a fifo and a link are said apart"
        );
        // A huge (sparse) file: refused from its size, never read.
        std::fs::remove_file(&path).unwrap();
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(1 << 30).unwrap();
        assert!(matches!(
            read_stats_file(&dir),
            Err(StatsFileError::TooLarge(n)) if n == 1 << 30
        ));
    }

    fn nix_mkfifo(path: &std::path::Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
    }
}
