//! The sweep of kept task dirs, so that the disk of ZIM_DIR stays bounded
//! (SPEC §8).
//!
//! A task dir outlives its task when its upload failed (a redelivery then
//! resumes at upload) or when `run-task --no-upload` left its files. This
//! module removes such dirs once they are older than `KEPT_DIR_MAX_AGE`, and,
//! under disk pressure, the oldest ones first until `MIN_FREE_DISK_MB` is
//! free again, so that a task is refused only when nothing is left to sweep.
//! Each removal is one log line (task id, age, bytes freed) and is counted
//! in the metrics.
//!
//! A task's dir goes with the worker's own dir of the task
//! (`ZIM_DIR/.zimfarm/<id>`, see [`crate::taskfs`]): both are swept
//! together, and an own dir whose task dir is gone is swept alone. At
//! start, kept task dirs of the layout before `.zimfarm` (a generate marker
//! or upload journals in the task dir itself, within the scraper's reach)
//! are swept, with a line saying why: nothing in them can be trusted.
//!
//! Owns the set of task dirs in use: the pipeline claims its task's dir for
//! the task's whole run ([`Sweeper::claim`]), and the sweeper never removes
//! a claimed dir, nor one whose task record says a scrape is under way in
//! it (a kept scrape, between a restart and its adoption: see
//! [`crate::taskfs::record`]). It looks only at ZIM_DIR's and `ZIM_DIR/.zimfarm`'s
//! direct subdirectories whose name is a valid task id (never `.sockets`
//! nor the record of ended tasks) and judges their age by the dirs' mtime
//! (the last file created or removed in them; the newer of the two). It
//! measures them through descriptors, never following a link a scraper
//! put in its output. It must not touch anything else in ZIM_DIR.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use crate::metrics::{self, SweepReason};

/// How often a running worker sweeps by age (it also does at start and
/// before every task).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(3600);

/// A task dir in ZIM_DIR that no task here is using, with the worker's
/// own dir of the task (either may be missing, not both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptDir {
    pub task_id: String,
    pub path: PathBuf,
    /// `ZIM_DIR/.zimfarm/<id>`.
    pub own: PathBuf,
    /// Space their files take on disk (allocated blocks, as `du` counts).
    pub bytes: u64,
    /// Since either dir last changed.
    pub age: Duration,
}

/// The task ids of `dir`'s subdirectories (links are not dirs), each
/// with the dir's age.
fn task_dirs_in(dir: &Path, now: SystemTime) -> io::Result<Vec<(String, Duration)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(task_id) = entry.file_name().into_string() else {
            continue;
        };
        if crate::offliner::validate_task_id(&task_id).is_err() {
            continue;
        }
        // `symlink_metadata`: a link is not a task dir, and is never followed.
        let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        let age = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .unwrap_or_default();
        found.push((task_id, age));
    }
    Ok(found)
}

/// The kept task dirs of `zim_dir`, oldest first, their sizes measured.
/// Blocking: call it off the async runtime.
pub fn kept_dirs(zim_dir: &Path, in_use: &HashSet<String>) -> io::Result<Vec<KeptDir>> {
    let now = SystemTime::now();
    let mut ages = std::collections::BTreeMap::new();
    let own_root = zim_dir.join(crate::taskfs::OWN_ROOT);
    let own = match task_dirs_in(&own_root, now) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        other => other?,
    };
    for (task_id, age) in task_dirs_in(zim_dir, now)?.into_iter().chain(own) {
        let newest = ages.entry(task_id).or_insert(age);
        *newest = (*newest).min(age);
    }
    let dirs = ages
        .into_iter()
        .filter(|(task_id, _)| !in_use.contains(task_id) && !scrape_under_way(zim_dir, task_id))
        .map(|(task_id, age)| {
            let (path, own) = (zim_dir.join(&task_id), own_root.join(&task_id));
            KeptDir {
                bytes: disk_usage(&path) + disk_usage(&own),
                path,
                own,
                task_id,
                age,
            }
        });
    let mut dirs: Vec<KeptDir> = dirs.collect();
    dirs.sort_by(|a, b| b.age.cmp(&a.age).then_with(|| a.task_id.cmp(&b.task_id)));
    Ok(dirs)
}

/// Whether task `task_id`'s record says a scrape is under way in its dir
/// (stage prepare or generate): a kept scrape that a later start of the
/// worker carries on, whose containers still write there. Its dir goes
/// with the task (or when `claim_node` or `forsake` remove it), never by
/// sweep. Blocking.
fn scrape_under_way(zim_dir: &Path, task_id: &str) -> bool {
    use crate::taskfs::record::{Stage, TaskRecord};
    matches!(
        TaskRecord::load_from(zim_dir, task_id),
        Ok(Some(TaskRecord {
            stage: Stage::Prepare | Stage::Generate(_),
            ..
        }))
    )
}

/// Whether `dir` (a kept task dir) is of the layout before the worker's own
/// dirs: its own dir is missing and the task dir holds the old marker or an
/// old upload journal.
fn is_old_layout(dir: &KeptDir) -> bool {
    if std::fs::symlink_metadata(&dir.own).is_ok() {
        return false;
    }
    let Ok(entries) = std::fs::read_dir(&dir.path) else {
        return false;
    };
    entries.flatten().any(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        name == crate::taskfs::OLD_LAYOUT_MARKER
            || name.starts_with(crate::taskfs::OLD_LAYOUT_JOURNAL_PREFIX)
    })
}

/// Removes a dir and all in it, links not followed; a missing one is fine.
fn remove_all(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Deepest level below a kept dir that [`disk_usage`] descends to (it
/// holds one descriptor per level); anything deeper is not counted.
const MAX_WALK_DEPTH: usize = 128;

/// Bytes allocated to the files under `path`, links not followed;
/// what cannot be read counts as nothing.
///
/// A task dir's insides are the scraper's, which may swap a dir for a link
/// while the worker walks it: each dir is opened relative to its parent's
/// descriptor with `O_NOFOLLOW | O_DIRECTORY` and each entry measured with
/// `fstatat(AT_SYMLINK_NOFOLLOW)`, so no name is resolved through a link
/// and the walk never leaves `path`.
fn disk_usage(path: &Path) -> u64 {
    use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let Some(top) = rustix::fs::open(path, flags, Mode::empty())
        .ok()
        .and_then(|fd| Dir::new(fd).ok())
    else {
        return 0;
    };
    let mut total = 0u64;
    let mut stack = vec![top];
    loop {
        let depth = stack.len();
        let Some(dir) = stack.last_mut() else {
            break;
        };
        let (Some(Ok(entry)), Ok(fd)) = (dir.read(), dir.fd()) else {
            stack.pop();
            continue;
        };
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        let Ok(stat) = rustix::fs::statat(fd, name, AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        let blocks = u64::try_from(stat.st_blocks).unwrap_or(0);
        total = total.saturating_add(blocks.saturating_mul(512));
        let is_dir = FileType::from_raw_mode(stat.st_mode) == FileType::Directory;
        if !is_dir || depth >= MAX_WALK_DEPTH {
            continue;
        }
        // A dir swapped for a link since the stat: ELOOP, not followed.
        let child = rustix::fs::openat(fd, name, flags, Mode::empty())
            .ok()
            .and_then(|fd| Dir::new(fd).ok());
        stack.extend(child);
    }
    total
}

/// Free space for an unprivileged writer in `dir`, in bytes. Blocking.
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    rustix::fs::statvfs(dir)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .map_err(io::Error::from)
}

/// Sweeps ZIM_DIR's kept task dirs. Cheap to clone (shares the set of dirs
/// in use).
#[derive(Clone)]
pub struct Sweeper {
    zim_dir: PathBuf,
    /// `None`: never by age, only under disk pressure.
    max_age: Option<Duration>,
    in_use: Arc<Mutex<HashSet<String>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A task's claim on its dir; dropped when the task's run ends.
pub struct Claim {
    in_use: Arc<Mutex<HashSet<String>>>,
    task_id: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        lock(&self.in_use).remove(&self.task_id);
    }
}

impl Sweeper {
    pub fn new(zim_dir: PathBuf, max_age: Option<Duration>) -> Self {
        Self {
            zim_dir,
            max_age,
            in_use: Arc::default(),
        }
    }

    /// Marks `task_id`'s dir in use until the returned claim is dropped.
    /// Waits while the sweeper is removing that dir (a redelivery of a task
    /// whose kept dir is being swept: it then starts afresh).
    pub async fn claim(&self, task_id: &str) -> Claim {
        loop {
            if lock(&self.in_use).insert(task_id.to_owned()) {
                return Claim {
                    in_use: self.in_use.clone(),
                    task_id: task_id.to_owned(),
                };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Removes the kept dirs older than the maximum age; returns the bytes
    /// freed.
    pub async fn sweep_old(&self) -> u64 {
        let Some(max_age) = self.max_age else {
            return 0;
        };
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            this.sweep_blocking(SweepReason::Age, |dir, _| dir.age > max_age)
        })
        .await
        .unwrap_or(0)
    }

    /// Removes the kept dirs of the layout before `ZIM_DIR/.zimfarm` (see
    /// the module doc); returns the bytes freed.
    pub async fn sweep_old_layout(&self) -> u64 {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            this.sweep_blocking(SweepReason::OldLayout, |dir, _| is_old_layout(dir))
        })
        .await
        .unwrap_or(0)
    }

    /// Removes kept dirs, oldest first, until `wanted` bytes are free in
    /// ZIM_DIR or none is left; returns the bytes free then.
    pub async fn make_room(&self, wanted: u64) -> io::Result<u64> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let zim_dir = this.zim_dir.clone();
            this.sweep_blocking(SweepReason::Pressure, |_, zim_dir| {
                free_bytes(zim_dir).is_ok_and(|free| free < wanted)
            });
            free_bytes(&zim_dir)
        })
        .await
        .unwrap_or_else(|join| Err(io::Error::other(join.to_string())))
    }

    /// Removes, oldest first, each kept dir for which `sweep` says so.
    fn sweep_blocking(&self, reason: SweepReason, sweep: impl Fn(&KeptDir, &Path) -> bool) -> u64 {
        let in_use = lock(&self.in_use).clone();
        let dirs = match kept_dirs(&self.zim_dir, &in_use) {
            Ok(dirs) => dirs,
            Err(error) => {
                tracing::warn!(
                    dir = %self.zim_dir.display(),
                    %error,
                    "cannot list ZIM_DIR to sweep its kept task dirs"
                );
                return 0;
            }
        };
        let mut freed = 0;
        for dir in dirs {
            if !sweep(&dir, &self.zim_dir) {
                continue;
            }
            // Claimed while it is removed: a task with this id waits.
            if !lock(&self.in_use).insert(dir.task_id.clone()) {
                continue;
            }
            let result = remove_all(&dir.path).and_then(|()| remove_all(&dir.own));
            lock(&self.in_use).remove(&dir.task_id);
            match result {
                Ok(()) => {
                    freed += dir.bytes;
                    metrics::global().kept_dir_swept(reason, dir.bytes);
                    let age_hours = dir.age.as_secs() / 3600;
                    if reason == SweepReason::OldLayout {
                        tracing::warn!(
                            task_id = %dir.task_id,
                            age_hours,
                            bytes_freed = dir.bytes,
                            reason = reason.label(),
                            "swept a kept task dir of the layout before ZIM_DIR/.zimfarm: its \
                             generate marker and upload journals lay within the scraper's reach, \
                             so nothing in it can be trusted; the task, if it comes back, runs \
                             again"
                        );
                    } else {
                        tracing::info!(
                            task_id = %dir.task_id,
                            age_hours,
                            bytes_freed = dir.bytes,
                            reason = reason.label(),
                            "swept a kept task dir"
                        );
                    }
                }
                Err(error) => tracing::warn!(
                    dir = %dir.path.display(),
                    %error,
                    "could not sweep a kept task dir; remove it by hand"
                ),
            }
        }
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aged(path: &Path, age: Duration) {
        let when = SystemTime::now() - age;
        std::fs::File::open(path)
            .unwrap()
            .set_modified(when)
            .unwrap();
    }

    #[tokio::test]
    async fn only_old_unclaimed_task_dirs_are_swept_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let day = Duration::from_secs(86_400);
        for name in ["old1", "old2", "fresh", "claimed", ".sockets", "not a task"] {
            let path = dir.path().join(name);
            std::fs::create_dir(&path).unwrap();
            std::fs::write(path.join("x.zim"), vec![1u8; 10_000]).unwrap();
            if name != "fresh" {
                aged(&path, 10 * day);
            }
        }
        std::fs::write(dir.path().join("old-file"), b"x").unwrap();
        let sweeper = Sweeper::new(dir.path().to_owned(), Some(7 * day));
        let claim = sweeper.claim("claimed").await;
        let freed = sweeper.sweep_old().await;
        assert!(freed >= 20_000, "freed {freed}");
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [".sockets", "claimed", "fresh", "not a task", "old-file"]
        );
        let claimed_bytes = disk_usage(&dir.path().join("claimed"));
        assert!(claimed_bytes >= 10_000);
        drop(claim);
        assert_eq!(sweeper.sweep_old().await, claimed_bytes);
        assert!(!dir.path().join("claimed").exists());
        assert!(dir.path().join("fresh").exists());
    }

    #[tokio::test]
    async fn own_dirs_go_with_their_task_dirs_and_the_old_layout_is_swept() {
        let zim = tempfile::tempdir().unwrap();
        let day = Duration::from_secs(86_400);
        let own_root = zim.path().join(crate::taskfs::OWN_ROOT);
        let make = |path: &Path, file: &str, age: Duration| {
            std::fs::create_dir_all(path).unwrap();
            std::fs::write(path.join(file), vec![1u8; 5000]).unwrap();
            aged(path, age);
        };
        // The old layout: a marker in the task dir, no own dir.
        make(&zim.path().join("old"), ".zimfarm-generated.json", day);
        make(
            &zim.path().join("oldjournal"),
            ".zimfarm-upload-ab.json",
            day,
        );
        // The new layout, aged, its own dir recent: kept by age.
        make(&zim.path().join("recent"), "x.zim", 10 * day);
        make(&own_root.join("recent"), "generated.json", Duration::ZERO);
        // Both aged: swept together.
        make(&zim.path().join("aged"), "x.zim", 10 * day);
        make(&own_root.join("aged"), "generated.json", 10 * day);
        // An own dir alone, aged.
        make(&own_root.join("orphan"), "x.log.gz", 10 * day);
        // A task dir of the new layout with the old marker's name among its
        // outputs is not of the old layout: its own dir is there.
        make(&zim.path().join("new"), ".zimfarm-generated.json", day);
        make(&own_root.join("new"), "generated.json", day);

        let sweeper = Sweeper::new(zim.path().to_owned(), Some(7 * day));
        assert!(sweeper.sweep_old_layout().await >= 10_000);
        let left = |dir: &Path| {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        };
        assert_eq!(left(zim.path()), [".zimfarm", "aged", "new", "recent"]);
        let kept = kept_dirs(zim.path(), &HashSet::new()).unwrap();
        let aged_dir = kept.iter().find(|d| d.task_id == "aged").unwrap();
        assert!(aged_dir.bytes >= 10_000, "both dirs counted: {aged_dir:?}");
        assert!(sweeper.sweep_old().await >= 15_000);
        assert_eq!(left(zim.path()), [".zimfarm", "new", "recent"]);
        assert_eq!(left(&own_root), ["new", "recent"]);
    }

    #[tokio::test]
    async fn a_dir_whose_record_says_a_scrape_is_under_way_is_never_swept() {
        use crate::taskfs::record::{Stage, TaskRecord, Uploading};
        let zim = tempfile::tempdir().unwrap();
        let day = Duration::from_secs(86_400);
        let record = |id: &str, stage| TaskRecord {
            version: 1,
            node: Some("n".to_owned()),
            task_id: id.to_owned(),
            carry: None,
            started: None,
            image: String::new(),
            stage,
        };
        for (id, stage) in [
            ("scraping", Stage::Prepare),
            (
                "uploaded",
                Stage::Upload(Uploading {
                    files: Vec::new(),
                    log: None,
                }),
            ),
        ] {
            std::fs::create_dir(zim.path().join(id)).unwrap();
            let own = crate::taskfs::OwnDir::create(zim.path(), id).unwrap();
            record(id, stage).save(&own).unwrap();
            aged(&zim.path().join(id), 10 * day);
            aged(own.path(), 10 * day);
        }
        let sweeper = Sweeper::new(zim.path().to_owned(), Some(day));
        assert!(sweeper.sweep_old().await > 0);
        assert!(zim.path().join("scraping").exists());
        assert!(!zim.path().join("uploaded").exists());
        assert!(sweeper.make_room(u64::MAX).await.is_ok());
        assert!(zim.path().join("scraping").exists());
        assert!(crate::taskfs::own_dir_path(zim.path(), "scraping").exists());
    }

    #[tokio::test]
    async fn no_age_sweeps_nothing_and_listing_is_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        for (name, hours) in [("b", 5), ("a", 50), ("c", 1)] {
            let path = dir.path().join(name);
            std::fs::create_dir(&path).unwrap();
            aged(&path, hours * hour);
        }
        let sweeper = Sweeper::new(dir.path().to_owned(), None);
        assert_eq!(sweeper.sweep_old().await, 0);
        let listed: Vec<String> = kept_dirs(dir.path(), &HashSet::new())
            .unwrap()
            .into_iter()
            .map(|d| d.task_id)
            .collect();
        assert_eq!(listed, ["a", "b", "c"]);
    }

    /// A scraper that swaps a dir of its output with a link to a dir
    /// outside, again and again, while the worker measures the kept dir:
    /// the walk never counts what lies outside.
    #[test]
    fn disk_usage_never_descends_into_a_link_even_racing() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let root = tempfile::tempdir().unwrap();
        let outside = root.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("big"), vec![7u8; 4 << 20]).unwrap();
        let task = root.path().join("task");
        std::fs::create_dir_all(task.join("d")).unwrap();
        std::fs::write(task.join("d").join("small"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, task.join("alt")).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let swapper = {
            let (stop, d, alt) = (stop.clone(), task.join("d"), task.join("alt"));
            std::thread::spawn(move || {
                let mut swaps = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    rustix::fs::renameat_with(
                        rustix::fs::CWD,
                        &d,
                        rustix::fs::CWD,
                        &alt,
                        rustix::fs::RenameFlags::EXCHANGE,
                    )
                    .unwrap();
                    swaps += 1;
                }
                swaps
            })
        };
        let mut most = 0;
        for _ in 0..3000 {
            most = most.max(disk_usage(&task));
        }
        stop.store(true, Ordering::Relaxed);
        let swaps = swapper.join().unwrap();
        assert!(swaps > 100, "only {swaps} swaps");
        assert!(
            most < 1 << 20,
            "counted {most} bytes: the walk followed the link"
        );
    }

    #[test]
    fn disk_usage_counts_nested_files_and_no_link() {
        let root = tempfile::tempdir().unwrap();
        let outside = root.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("big"), vec![7u8; 4 << 20]).unwrap();
        let task = root.path().join("task");
        let deep = task.join("a").join("b").join("c");
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("f"), vec![1u8; 256 << 10]).unwrap();
        std::os::unix::fs::symlink(&outside, deep.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("big"), task.join("big")).unwrap();
        let bytes = disk_usage(&task);
        assert!((256 << 10..1 << 20).contains(&bytes), "{bytes} bytes");
        // The kept dir itself a link: nothing counted.
        std::os::unix::fs::symlink(&outside, root.path().join("linked")).unwrap();
        assert_eq!(disk_usage(&root.path().join("linked")), 0);
    }
}
