//! The worker's own dir of a task, `ZIM_DIR/.zimfarm/<id>`: created 0700
//! under a 0700 root, opened without following links, its files created
//! exclusively and replaced atomically.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use super::beneath::{DirHandle, LocalSource, OpenError};

/// The root of the worker's own dirs, in ZIM_DIR. Never a task id (those
/// have no `.`), never mounted into a container.
pub const OWN_ROOT: &str = ".zimfarm";

/// Where the layout before the own dirs kept the generate marker: in the
/// task dir, within the scraper's reach. Only a hint that a task dir is of
/// that layout; never read.
pub const OLD_LAYOUT_MARKER: &str = ".zimfarm-generated.json";
/// The prefix of that layout's upload journals, in the task dir.
pub const OLD_LAYOUT_JOURNAL_PREFIX: &str = ".zimfarm-upload-";

/// Owner only: no container user, no other local user.
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// Temporary files of atomic replacements get a fresh name each.
static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

fn os(e: Errno) -> io::Error {
    io::Error::from(e)
}

/// Where task `task_id`'s own dir is.
pub fn own_dir_path(zim_dir: &Path, task_id: &str) -> PathBuf {
    zim_dir.join(OWN_ROOT).join(task_id)
}

/// Removes task `task_id`'s own dir and everything in it (no link
/// followed); a missing one is fine. Blocking.
pub fn remove_own_dir(zim_dir: &Path, task_id: &str) -> io::Result<()> {
    crate::offliner::validate_task_id(task_id)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    match std::fs::remove_dir_all(own_dir_path(zim_dir, task_id)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Makes `name` a 0700 directory beneath `parent` (created if missing; an
/// existing one must be a directory, not a link) and opens it.
fn own_subdir(parent: &DirHandle, name: &str) -> io::Result<DirHandle> {
    match rustix::fs::mkdirat(parent.fd(), name, Mode::from_raw_mode(DIR_MODE)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(os(e)),
    }
    let fd = rustix::fs::openat(
        parent.fd(),
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::NOTDIR | Errno::LOOP => io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is not a directory (a link?); remove it",
                parent.path().join(name).display()
            ),
        ),
        e => os(e),
    })?;
    // umask, or an older dir: owner only, whatever it was.
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(DIR_MODE)).map_err(os)?;
    Ok(DirHandle::from_fd(fd, &parent.path().join(name)))
}

/// The worker's own dir of one task. Cheap to clone.
#[derive(Clone, Debug)]
pub struct OwnDir {
    dir: DirHandle,
}

impl OwnDir {
    /// Creates (or opens) `ZIM_DIR/.zimfarm/<task_id>`, and the root, 0700
    /// both. Blocking.
    pub fn create(zim_dir: &Path, task_id: &str) -> io::Result<Self> {
        crate::offliner::validate_task_id(task_id)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        // ZIM_DIR is the operator's: it may be a link.
        let zim = DirHandle::open_trusted(zim_dir)?;
        let root = own_subdir(&zim, OWN_ROOT)?;
        Ok(Self {
            dir: own_subdir(&root, task_id)?,
        })
    }

    /// Creates (or opens) the root of the own dirs, `ZIM_DIR/.zimfarm`,
    /// 0700: for the node's own files (not a task's). Blocking.
    pub fn root(zim_dir: &Path) -> io::Result<Self> {
        let zim = DirHandle::open_trusted(zim_dir)?;
        Ok(Self {
            dir: own_subdir(&zim, OWN_ROOT)?,
        })
    }

    /// Opens the root of the own dirs, `ZIM_DIR/.zimfarm`, only if it is
    /// there (a directory, not a link): for a reader that must not make
    /// it (`ps` may run as another user than the worker). Blocking.
    pub fn existing_root(zim_dir: &Path) -> io::Result<Self> {
        let zim = DirHandle::open_trusted(zim_dir)?;
        let fd = rustix::fs::openat(
            zim.fd(),
            OWN_ROOT,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(os)?;
        Ok(Self {
            dir: DirHandle::from_fd(fd, &zim_dir.join(OWN_ROOT)),
        })
    }

    /// [`OwnDir::create`], off the async runtime.
    pub async fn create_async(zim_dir: &Path, task_id: &str) -> io::Result<Self> {
        let (zim_dir, task_id) = (zim_dir.to_owned(), task_id.to_owned());
        tokio::task::spawn_blocking(move || Self::create(&zim_dir, &task_id))
            .await
            .map_err(|e| io::Error::other(e.to_string()))?
    }

    /// An existing own dir at `path` (its last component not a link).
    pub fn at(path: &Path) -> io::Result<Self> {
        Ok(Self {
            dir: DirHandle::open(path)?,
        })
    }

    /// Its handle, to reach what is beneath it without a path.
    pub fn handle(&self) -> &DirHandle {
        &self.dir
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// File `name` (one component) of this dir.
    pub fn file(&self, name: &str) -> OwnFile {
        OwnFile {
            dir: self.dir.clone(),
            name: name.to_owned(),
        }
    }
}

/// One file of the worker's own: where it is (a dir handle and a name),
/// never a path opened as such. Cheap to clone.
#[derive(Clone, Debug)]
pub struct OwnFile {
    dir: DirHandle,
    name: String,
}

impl OwnFile {
    /// The file at `path`, in a dir the caller trusts (tests, tools): the
    /// dir is opened now. Blocking.
    pub fn at(path: &Path) -> io::Result<Self> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} names no file", path.display()),
            ));
        };
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        Ok(Self {
            dir: DirHandle::open_trusted(parent)?,
            name: name.to_string_lossy().into_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it is: for messages only.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join(&self.name)
    }

    /// Another file of the same dir.
    pub fn sibling(&self, name: &str) -> OwnFile {
        OwnFile {
            dir: self.dir.clone(),
            name: name.to_owned(),
        }
    }

    /// Creates it, write-only; fails if anything, a link included, is
    /// there already. Blocking.
    pub fn create(&self) -> io::Result<File> {
        create_exclusive(&self.dir, &self.name)
    }

    /// Creates it afresh: whatever was there is removed first (never
    /// followed), then created exclusively. Blocking.
    pub fn create_afresh(&self) -> io::Result<File> {
        self.remove()?;
        self.create()
    }

    /// Replaces its content with `bytes` atomically: a fresh temporary
    /// file, created exclusively, written, synced when `sync`, then
    /// renamed over it. Blocking.
    pub fn replace(&self, bytes: &[u8], sync: bool) -> io::Result<()> {
        let tmp = format!(
            "{}.{}.{}.new",
            self.name,
            std::process::id(),
            NEXT_TMP.fetch_add(1, Ordering::Relaxed)
        );
        let written = (|| {
            let mut f = create_exclusive(&self.dir, &tmp)?;
            f.write_all(bytes)?;
            if sync {
                f.sync_all()?;
            }
            drop(f);
            rustix::fs::renameat(
                self.dir.fd(),
                tmp.as_str(),
                self.dir.fd(),
                self.name.as_str(),
            )
            .map_err(os)
        })();
        if written.is_err() {
            let _ = rustix::fs::unlinkat(self.dir.fd(), tmp.as_str(), AtFlags::empty());
        }
        written
    }

    /// Opens it, an existing regular file (not a link), for writing at
    /// its end after cutting it to at most `len` bytes (a shorter one is
    /// not lengthened). Blocking.
    pub fn reopen_at(&self, len: u64) -> io::Result<File> {
        use std::io::Seek;
        let fd = rustix::fs::openat(
            self.dir.fd().as_fd(),
            self.name.as_str(),
            OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("cannot open {}: {e}", self.path().display()),
            )
        })?;
        let mut file = File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", self.path().display()),
            ));
        }
        if file.metadata()?.len() > len {
            file.set_len(len)?;
        }
        file.seek(io::SeekFrom::End(0))?;
        Ok(file)
    }

    /// Opens it for reading: a regular file, not a link. Blocking.
    pub fn open(&self) -> Result<File, OpenError> {
        self.dir.open_file(&self.name)
    }

    /// Its whole content, `None` when it is not there; refused above
    /// `max` bytes. Blocking.
    pub fn read(&self, max: u64) -> io::Result<Option<Vec<u8>>> {
        use std::io::Read;
        let file = match self.open() {
            Ok(f) => f,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        (&file).take(max + 1).read_to_end(&mut out)?;
        if out.len() as u64 > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is larger than {max} bytes", self.path().display()),
            ));
        }
        Ok(Some(out))
    }

    /// Whether it is there (as anything). Blocking.
    pub fn exists(&self) -> bool {
        self.dir.kind(&self.name).is_ok()
    }

    /// Removes it (a link is removed, not followed); a missing one is
    /// fine. Blocking.
    pub fn remove(&self) -> io::Result<()> {
        match rustix::fs::unlinkat(self.dir.fd(), self.name.as_str(), AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(os(e)),
        }
    }

    /// What an upload reads it through.
    pub fn source(&self) -> LocalSource {
        LocalSource::beneath(self.dir.clone(), &self.name)
    }
}

/// `O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0600, in `dir`.
fn create_exclusive(dir: &DirHandle, name: &str) -> io::Result<File> {
    let fd = rustix::fs::openat(
        dir.fd().as_fd(),
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(FILE_MODE),
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot create {}: {e}", dir.path().join(name).display()),
        )
    })?;
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    #[test]
    fn the_own_dir_is_0700_and_its_root_too() {
        let zim = tempfile::tempdir().unwrap();
        let own = OwnDir::create(zim.path(), "abc123").unwrap();
        assert_eq!(own.path(), own_dir_path(zim.path(), "abc123"));
        for dir in [zim.path().join(OWN_ROOT), own.path().to_owned()] {
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{}", dir.display());
        }
        // Again: the same dir.
        OwnDir::create(zim.path(), "abc123").unwrap();
        // No task id reaches outside, nor names the root.
        for id in ["..", ".zimfarm", "a/b", ""] {
            assert!(OwnDir::create(zim.path(), id).is_err(), "{id}");
            assert!(crate::offliner::validate_task_id(id).is_err(), "{id}");
        }
        remove_own_dir(zim.path(), "abc123").unwrap();
        remove_own_dir(zim.path(), "abc123").unwrap();
        assert!(!own_dir_path(zim.path(), "abc123").exists());
    }

    #[test]
    fn a_link_as_the_root_is_refused() {
        let zim = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        symlink(elsewhere.path(), zim.path().join(OWN_ROOT)).unwrap();
        let e = OwnDir::create(zim.path(), "abc").unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        assert!(
            std::fs::read_dir(elsewhere.path())
                .unwrap()
                .next()
                .is_none()
        );
    }

    #[test]
    fn files_are_created_exclusively_and_never_through_a_link() {
        let zim = tempfile::tempdir().unwrap();
        let canary = zim.path().join("canary");
        std::fs::write(&canary, b"keep me").unwrap();
        let own = OwnDir::create(zim.path(), "t1").unwrap();
        let f = own.file("x.log");
        symlink(&canary, f.path()).unwrap();
        assert!(f.create().is_err());
        assert!(f.open().is_err());
        assert!(f.read(100).is_err());
        // Afresh: the link goes, the file is new.
        f.create_afresh().unwrap().write_all(b"log").unwrap();
        assert_eq!(f.read(100).unwrap().unwrap(), b"log");
        // Atomic replacement over a link: the link is replaced, not
        // followed.
        let m = own.file("marker.json");
        symlink(&canary, m.path()).unwrap();
        m.replace(b"{}", true).unwrap();
        assert_eq!(m.read(100).unwrap().unwrap(), b"{}");
        assert_eq!(std::fs::read(&canary).unwrap(), b"keep me");
        let mode = std::fs::metadata(m.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // No temporary file left.
        let mut names: Vec<_> = std::fs::read_dir(own.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["marker.json", "x.log"]);
        assert!(m.read(1).is_err(), "bounded read");
        assert_eq!(own.file("none").read(10).unwrap(), None);
        own.file("none").remove().unwrap();
    }
}
