//! The disk a task dir uses, from a bounded walk: a scraper may create
//! millions of files or nest dirs thousands deep, and a progress reading
//! must stay cheap whatever it did.
//!
//! The walk opens each dir beneath its parent's descriptor without
//! following a link (`O_NOFOLLOW | O_DIRECTORY`), stats entries without
//! following them, counts allocated blocks (a sparse file counts what it
//! takes, not its length) and stops at [`MAX_WALK_ENTRIES`] entries or
//! [`MAX_WALK_DEPTH`] levels, saying so. It holds one descriptor per level.
//! Owns that walk; it must not change anything it walks.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::taskfs::DirHandle;

/// Most entries one walk stats.
pub const MAX_WALK_ENTRIES: usize = 100_000;

/// Deepest level one walk enters (the task dir is level 0).
pub const MAX_WALK_DEPTH: usize = 64;

/// What a walk found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskUsage {
    /// Bytes allocated to what was walked.
    pub bytes: u64,
    /// The walk stopped at a bound: `bytes` is a lower bound.
    pub partial: bool,
}

/// The disk used under `dir`, walking at most `max_entries` entries.
/// Blocking.
pub fn disk_usage(dir: &DirHandle, max_entries: usize) -> io::Result<DiskUsage> {
    let root = rustix::fs::openat(
        dir.as_fd(),
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut walk = Walk {
        left: max_entries,
        usage: DiskUsage::default(),
    };
    walk.dir(root, 0)?;
    Ok(walk.usage)
}

struct Walk {
    left: usize,
    usage: DiskUsage,
}

impl Walk {
    fn dir(&mut self, fd: OwnedFd, depth: usize) -> io::Result<()> {
        let mut subdirs = Vec::new();
        {
            let mut entries = rustix::fs::Dir::read_from(fd.as_fd())?;
            while let Some(entry) = entries.read() {
                let entry = match entry {
                    Ok(entry) => entry,
                    // Changed under the walk: what was read stands.
                    Err(_) => break,
                };
                let name = entry.file_name();
                if name.to_bytes() == b"." || name.to_bytes() == b".." {
                    continue;
                }
                if self.left == 0 {
                    self.usage.partial = true;
                    return Ok(());
                }
                self.left -= 1;
                // Gone meanwhile: not counted.
                let Ok(stat) = rustix::fs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW) else {
                    continue;
                };
                self.usage.bytes = self
                    .usage
                    .bytes
                    .saturating_add((stat.st_blocks as u64).saturating_mul(512));
                if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
                    subdirs.push(name.to_owned());
                }
            }
        }
        for name in subdirs {
            if depth + 1 > MAX_WALK_DEPTH {
                self.usage.partial = true;
                return Ok(());
            }
            // A dir swapped for a link meanwhile fails here: not followed.
            let Ok(sub) = rustix::fs::openat(
                &fd,
                name.as_c_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) else {
                continue;
            };
            self.dir(sub, depth + 1)?;
            if self.usage.partial {
                return Ok(());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_walk_counts_blocks_follows_no_link_and_stops_at_its_bounds() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/data"), vec![7u8; 256 * 1024]).unwrap();
        // A sparse file counts what it takes, not its length.
        std::fs::File::create(root.join("sparse"))
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        // A link to a big dir elsewhere is not followed.
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("big"), vec![1u8; 1 << 20]).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("out")).unwrap();
        let dir = DirHandle::open(root).unwrap();
        let usage = disk_usage(&dir, MAX_WALK_ENTRIES).unwrap();
        assert!(!usage.partial);
        assert!(
            usage.bytes >= 256 * 1024 && usage.bytes < 512 * 1024,
            "{usage:?}"
        );
        for i in 0..50 {
            std::fs::write(root.join(format!("f{i}")), b"x").unwrap();
        }
        let usage = disk_usage(&dir, 10).unwrap();
        assert!(usage.partial, "{usage:?}");
    }

    #[test]
    fn a_deep_tree_stops_at_the_depth_bound() {
        let tmp = tempfile::tempdir().unwrap();
        let mut path = tmp.path().to_owned();
        for _ in 0..MAX_WALK_DEPTH + 5 {
            path.push("d");
        }
        std::fs::create_dir_all(&path).unwrap();
        let dir = DirHandle::open(tmp.path()).unwrap();
        let usage = disk_usage(&dir, MAX_WALK_ENTRIES).unwrap();
        assert!(usage.partial, "{usage:?}");
    }
}
