//! Opening a file beneath a directory handle without following any link,
//! as a regular file only; and [`LocalSource`], the file an upload reads
//! through one descriptor.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;
use thiserror::Error;

/// Whether `openat2` works here; cleared for good at its first ENOSYS or
/// EPERM (an old kernel, a seccomp filter).
static OPENAT2: AtomicBool = AtomicBool::new(true);

/// `openat2` may say EAGAIN when a rename raced its resolution.
const OPENAT2_TRIES: usize = 8;

/// What a directory entry is, as `lstat` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
    Fifo,
    Socket,
    Device,
    Unknown,
}

impl FileKind {
    fn of(stat: &Stat) -> Self {
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::RegularFile => Self::Regular,
            FileType::Directory => Self::Directory,
            FileType::Symlink => Self::Symlink,
            FileType::Fifo => Self::Fifo,
            FileType::Socket => Self::Socket,
            FileType::CharacterDevice | FileType::BlockDevice => Self::Device,
            _ => Self::Unknown,
        }
    }

    /// "a symbolic link", ...: for the line that says why a file is skipped.
    pub fn described(self) -> &'static str {
        match self {
            Self::Regular => "a regular file",
            Self::Directory => "a directory",
            Self::Symlink => "a symbolic link",
            Self::Fifo => "a fifo",
            Self::Socket => "a socket",
            Self::Device => "a device",
            Self::Unknown => "of an unknown kind",
        }
    }
}

/// Why a file was not opened.
#[derive(Debug, Error)]
pub enum OpenError {
    #[error("it is {}, not a regular file", .0.described())]
    NotRegular(FileKind),
    #[error("its path leaves its directory or goes through a symbolic link")]
    Escapes,
    #[error("it was replaced while it was being opened")]
    Changed,
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl OpenError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io(e) if e.kind() == io::ErrorKind::NotFound)
    }
}

impl From<OpenError> for io::Error {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidInput, other.to_string()),
        }
    }
}

fn os(e: Errno) -> io::Error {
    io::Error::from(e)
}

/// A directory opened without following a link to it (`O_NOFOLLOW |
/// O_DIRECTORY`): what is opened beneath it stays beneath it, whatever
/// happens to its path meanwhile. Cheap to clone.
#[derive(Clone)]
pub struct DirHandle {
    fd: Arc<OwnedFd>,
    path: Arc<Path>,
}

impl std::fmt::Debug for DirHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DirHandle({})", self.path.display())
    }
}

/// Its descriptor, for a walk beneath it (see [`crate::progress`]).
impl AsFd for DirHandle {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl DirHandle {
    /// Opens the directory at `path`; its last component must not be a
    /// link (the ones above it are the operator's). Blocking.
    pub fn open(path: &Path) -> io::Result<Self> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(os)?;
        Ok(Self::from_fd(fd, path))
    }

    /// Opens the directory at `path`, a path the operator gave (ZIM_DIR)
    /// or a caller trusts: links on it are followed. Blocking.
    pub fn open_trusted(path: &Path) -> io::Result<Self> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(os)?;
        Ok(Self::from_fd(fd, path))
    }

    pub(super) fn from_fd(fd: OwnedFd, path: &Path) -> Self {
        Self {
            fd: Arc::new(fd),
            path: path.into(),
        }
    }

    /// The path it was opened at: for messages only.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The names in the directory (`.` and `..` left out). Blocking.
    pub fn names(&self) -> io::Result<Vec<OsString>> {
        let mut dir = rustix::fs::Dir::read_from(self.fd.as_fd()).map_err(os)?;
        let mut names = Vec::new();
        while let Some(entry) = dir.read() {
            let name = entry.map_err(os)?.file_name().to_bytes().to_vec();
            if name != b"." && name != b".." {
                names.push(OsString::from_vec(name));
            }
        }
        Ok(names)
    }

    /// What entry `name` is, the entry itself (a link is a link). Blocking.
    pub fn kind(&self, name: impl AsRef<Path>) -> io::Result<FileKind> {
        let stat = rustix::fs::statat(self.fd.as_fd(), name.as_ref(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(os)?;
        Ok(FileKind::of(&stat))
    }

    /// Opens the regular file at `rel` beneath this directory for
    /// reading, following no link at any step and never leaving the
    /// directory; a fifo, socket or device is refused without being
    /// opened. Blocking (but never on a fifo).
    pub fn open_file(&self, rel: impl AsRef<Path>) -> Result<File, OpenError> {
        let rel = rel.as_ref();
        // Pinned first as a path only (opening nothing), then checked...
        let pinned = resolve(&self.fd, rel, OFlags::PATH)?;
        let stat = rustix::fs::fstat(&pinned).map_err(os)?;
        match FileKind::of(&stat) {
            FileKind::Regular => {}
            other => return Err(OpenError::NotRegular(other)),
        }
        // ... then that very inode opened for reading, through its magic
        // link in /proc (followed on purpose: it is our own descriptor).
        let flags = OFlags::RDONLY | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let proc_path = format!("/proc/self/fd/{}", pinned.as_raw_fd());
        let fd = match rustix::fs::open(proc_path.as_str(), flags, Mode::empty()) {
            Ok(fd) => fd,
            // No /proc: by name again, and it must be the same inode.
            Err(_) => resolve(&self.fd, rel, flags)?,
        };
        let opened = rustix::fs::fstat(&fd).map_err(os)?;
        if (opened.st_dev, opened.st_ino) != (stat.st_dev, stat.st_ino)
            || FileKind::of(&opened) != FileKind::Regular
        {
            return Err(OpenError::Changed);
        }
        Ok(File::from(fd))
    }
}

/// Opens `rel` beneath `dir` with `flags` (plus `O_NOFOLLOW |
/// O_CLOEXEC`): `openat2` confined to the dir with no link resolved, or,
/// where `openat2` is not allowed, one component at a time with
/// `O_NOFOLLOW`, refusing `..` and absolute paths.
fn resolve(dir: &OwnedFd, rel: &Path, flags: OFlags) -> Result<OwnedFd, OpenError> {
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    if rel.as_os_str().is_empty() {
        return Err(OpenError::Io(io::Error::from(io::ErrorKind::NotFound)));
    }
    if OPENAT2.load(Ordering::Relaxed) {
        match openat2(dir, rel, flags) {
            Err(Errno::NOSYS) | Err(Errno::PERM) => OPENAT2.store(false, Ordering::Relaxed),
            other => return other.map_err(from_resolve_errno),
        }
    }
    resolve_stepwise(dir, rel, flags)
}

fn openat2(dir: &OwnedFd, rel: &Path, flags: OFlags) -> Result<OwnedFd, Errno> {
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(dir, rel, flags, Mode::empty(), resolve) {
            Err(Errno::AGAIN) if tries < OPENAT2_TRIES => tries += 1,
            other => return other,
        }
    }
}

/// ELOOP: a link on the way; EXDEV: the way leaves the dir.
fn from_resolve_errno(e: Errno) -> OpenError {
    match e {
        Errno::LOOP | Errno::XDEV => OpenError::Escapes,
        e => OpenError::Io(os(e)),
    }
}

/// The fallback: each directory on the way opened `O_PATH | O_DIRECTORY |
/// O_NOFOLLOW` (a link there fails), the last component with `flags`.
fn resolve_stepwise(dir: &OwnedFd, rel: &Path, flags: OFlags) -> Result<OwnedFd, OpenError> {
    let mut parts = Vec::new();
    for component in rel.components() {
        match component {
            Component::Normal(part) => parts.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(OpenError::Escapes);
            }
        }
    }
    let Some((last, ways)) = parts.split_last() else {
        return Err(OpenError::Io(io::Error::from(io::ErrorKind::NotFound)));
    };
    let mut held: Option<OwnedFd> = None;
    for way in ways {
        let at = held.as_ref().unwrap_or(dir);
        let next = rustix::fs::openat(
            at,
            *way,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            // A link where a directory should be.
            Errno::NOTDIR | Errno::LOOP => OpenError::Escapes,
            e => OpenError::Io(os(e)),
        })?;
        held = Some(next);
    }
    let at = held.as_ref().unwrap_or(dir);
    rustix::fs::openat(at, *last, flags, Mode::empty()).map_err(from_resolve_errno)
}

/// Forces the stepwise fallback (tests).
#[cfg(test)]
pub(super) fn disable_openat2() {
    OPENAT2.store(false, Ordering::Relaxed);
}

/// The local file an upload reads: found beneath a directory handle
/// (opened afresh, safely, for each attempt) or already opened. Whatever
/// it is, it is sized, hashed and sent through one descriptor, never
/// opened again by path. Cheap to clone.
#[derive(Clone)]
pub struct LocalSource(Source);

#[derive(Clone)]
enum Source {
    Beneath {
        dir: DirHandle,
        name: PathBuf,
    },
    /// A path whose parent the caller trusts: the parent is opened by
    /// path, the file beneath it as above (tests, benchmarks, tools).
    At(PathBuf),
    Opened {
        file: Arc<File>,
        shown: PathBuf,
    },
}

impl std::fmt::Debug for LocalSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalSource({})", self.shown().display())
    }
}

impl LocalSource {
    /// `name` beneath `dir`.
    pub fn beneath(dir: DirHandle, name: impl Into<PathBuf>) -> Self {
        Self(Source::Beneath {
            dir,
            name: name.into(),
        })
    }

    /// The file at `path`: its parent directory opened by path, the file
    /// itself beneath it without following a link.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self(Source::At(path.into()))
    }

    /// A file opened already (and checked by whoever opened it).
    pub fn opened(file: Arc<File>, shown: impl Into<PathBuf>) -> Self {
        Self(Source::Opened {
            file,
            shown: shown.into(),
        })
    }

    /// Where it is: for messages only.
    pub fn shown(&self) -> PathBuf {
        match &self.0 {
            Source::Beneath { dir, name } => dir.path().join(name),
            Source::At(path) => path.clone(),
            Source::Opened { shown, .. } => shown.clone(),
        }
    }

    /// The file, opened for reading (a regular file, no link followed).
    /// Blocking.
    pub fn open_blocking(&self) -> Result<Arc<File>, OpenError> {
        match &self.0 {
            Source::Beneath { dir, name } => dir.open_file(name).map(Arc::new),
            Source::At(path) => {
                let (parent, name) = match (path.parent(), path.file_name()) {
                    (Some(parent), Some(name)) => (parent, name),
                    _ => return Err(OpenError::Escapes),
                };
                let parent = if parent.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    parent
                };
                DirHandle::open_trusted(parent)?
                    .open_file(name)
                    .map(Arc::new)
            }
            Source::Opened { file, .. } => Ok(file.clone()),
        }
    }

    /// [`LocalSource::open_blocking`], off the async runtime.
    pub async fn open(&self) -> io::Result<Arc<File>> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.open_blocking())
            .await
            .map_err(|e| io::Error::other(e.to_string()))?
            .map_err(io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proptest_config::config;
    use proptest::prelude::*;
    use std::io::Read;
    use std::os::unix::fs::symlink;

    fn read(f: File) -> Vec<u8> {
        let mut out = Vec::new();
        (&f).read_to_end(&mut out).unwrap();
        out
    }

    /// A box with a file, a subdir, and links out of it at each level;
    /// a canary outside.
    struct Fixture {
        _root: tempfile::TempDir,
        boxed: PathBuf,
        canary: PathBuf,
    }

    fn fixture() -> Fixture {
        let root = tempfile::tempdir().unwrap();
        let canary = root.path().join("canary");
        std::fs::write(&canary, b"SECRET").unwrap();
        let boxed = root.path().join("box");
        std::fs::create_dir_all(boxed.join("sub/deeper")).unwrap();
        std::fs::write(boxed.join("a.zim"), b"inside").unwrap();
        std::fs::write(boxed.join("sub/b.zim"), b"inside too").unwrap();
        symlink(&canary, boxed.join("abs-link")).unwrap();
        symlink("../canary", boxed.join("rel-link")).unwrap();
        symlink("a.zim", boxed.join("inner-link")).unwrap();
        symlink("..", boxed.join("sub/up")).unwrap();
        symlink(root.path(), boxed.join("sub/out")).unwrap();
        symlink("/proc/self/environ", boxed.join("environ")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            boxed.join("fifo"),
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        Fixture {
            _root: root,
            boxed,
            canary,
        }
    }

    fn check_fixture(dir: &DirHandle) {
        assert_eq!(read(dir.open_file("a.zim").unwrap()), b"inside");
        assert_eq!(read(dir.open_file("sub/b.zim").unwrap()), b"inside too");
        assert_eq!(read(dir.open_file("./sub/./b.zim").unwrap()), b"inside too");
        for link in ["abs-link", "rel-link", "inner-link", "environ"] {
            let e = dir.open_file(link).unwrap_err();
            assert!(
                matches!(
                    e,
                    OpenError::NotRegular(FileKind::Symlink) | OpenError::Escapes
                ),
                "{link}: {e:?}"
            );
        }
        for way in [
            "sub/up/a.zim",
            "sub/out/canary",
            "../canary",
            "/etc/passwd",
            "sub/../../canary",
        ] {
            assert!(
                matches!(dir.open_file(way), Err(OpenError::Escapes)),
                "{way}"
            );
        }
        // A fifo is refused without blocking; a dir is refused.
        assert!(matches!(
            dir.open_file("fifo"),
            Err(OpenError::NotRegular(FileKind::Fifo))
        ));
        assert!(matches!(
            dir.open_file("sub"),
            Err(OpenError::NotRegular(FileKind::Directory))
        ));
        assert!(dir.open_file("missing").unwrap_err().is_not_found());
        assert_eq!(dir.kind("abs-link").unwrap(), FileKind::Symlink);
        assert_eq!(dir.kind("fifo").unwrap(), FileKind::Fifo);
        let mut names = dir.names().unwrap();
        names.sort();
        assert_eq!(names.len(), 7, "{names:?}");
    }

    #[test]
    fn links_fifos_and_ways_out_are_refused() {
        let f = fixture();
        check_fixture(&DirHandle::open(&f.boxed).unwrap());
        assert!(DirHandle::open(&f.boxed.join("abs-link")).is_err());
        assert_eq!(std::fs::read(&f.canary).unwrap(), b"SECRET");
    }

    #[test]
    fn the_stepwise_fallback_refuses_the_same() {
        let f = fixture();
        let dir = DirHandle::open(&f.boxed).unwrap();
        let flags = OFlags::RDONLY | OFlags::NONBLOCK;
        for link in [
            "abs-link",
            "rel-link",
            "sub/out/canary",
            "sub/up/a.zim",
            "../canary",
        ] {
            assert!(
                resolve_stepwise(dir.fd(), Path::new(link), flags | OFlags::NOFOLLOW).is_err(),
                "{link}"
            );
        }
        assert!(resolve_stepwise(dir.fd(), Path::new("sub/b.zim"), flags).is_ok());
    }

    #[test]
    fn a_source_at_a_path_refuses_a_link() {
        let f = fixture();
        let source = LocalSource::at(f.boxed.join("abs-link"));
        assert!(source.open_blocking().is_err());
        let source = LocalSource::at(f.boxed.join("a.zim"));
        let file = source.open_blocking().unwrap();
        assert_eq!(file.metadata().unwrap().len(), 6);
    }

    /// A name made of these parts, joined with `/`.
    fn parts() -> impl Strategy<Value = Vec<&'static str>> {
        proptest::collection::vec(
            prop_oneof![
                Just(".."),
                Just("."),
                Just(""),
                Just("sub"),
                Just("deeper"),
                Just("up"),
                Just("out"),
                Just("a.zim"),
                Just("b.zim"),
                Just("canary"),
                Just("abs-link"),
                Just("rel-link"),
                Just("inner-link"),
                Just("environ"),
                Just("fifo"),
            ],
            1..6,
        )
    }

    /// Whatever the name, with either way of resolving it: what opens is
    /// one of the box's own regular files, never the canary nor anything
    /// outside. One box for every case.
    #[test]
    fn nothing_outside_the_dir_ever_opens() {
        let f = fixture();
        let dir = DirHandle::open(&f.boxed).unwrap();
        let inside: Vec<(u64, u64)> = ["a.zim", "sub/b.zim"]
            .iter()
            .map(|p| {
                let s = rustix::fs::stat(f.boxed.join(p)).unwrap();
                (s.st_dev, s.st_ino)
            })
            .collect();
        let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW;
        let mut runner = proptest::test_runner::TestRunner::new(config());
        runner
            .run(
                &(parts(), any::<bool>(), any::<bool>()),
                |(parts, absolute, stepwise)| {
                    let mut name = parts.join("/");
                    if absolute {
                        name.insert(0, '/');
                    }
                    let opened = if stepwise {
                        resolve_stepwise(dir.fd(), Path::new(&name), flags)
                            .ok()
                            .map(File::from)
                            .filter(|f| f.metadata().is_ok_and(|m| m.is_file()))
                    } else {
                        dir.open_file(&name).ok()
                    };
                    if let Some(file) = opened {
                        let s = rustix::fs::fstat(&file).unwrap();
                        prop_assert!(
                            inside.contains(&(s.st_dev, s.st_ino)),
                            "{} opened something outside",
                            name
                        );
                    }
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(std::fs::read(&f.canary).unwrap(), b"SECRET");
    }

    #[test]
    fn without_openat2_the_same_holds() {
        let f = fixture();
        disable_openat2();
        check_fixture(&DirHandle::open(&f.boxed).unwrap());
        OPENAT2.store(true, Ordering::Relaxed);
    }
}
