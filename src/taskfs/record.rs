//! The task record: what a worker needs to carry a task on after another
//! process of this node started it (SPEC §8), in one file of the worker's
//! own dir of the task, `ZIM_DIR/.zimfarm/<id>/task.json`, replaced
//! atomically; and the node's alive file, `ZIM_DIR/.zimfarm/alive.json`,
//! from which the next start measures how long the node was away.
//!
//! The format is versioned: a later version reads every earlier one, and
//! `tests/fixtures/records/` holds a sample of each.
//!
//! - version 0: the generate marker `generated.json` (`{files, log}`) of
//!   the worker before records; read as stage upload without a carry.
//! - version 1: `{version, node, task_id, carry, started, stage}`, stage
//!   one of `prepare`, `generate` (containers, image, log cursor) and
//!   `upload` (files, log).
//!
//! Owns that format and the [`Clock`] it stamps times with. It must not
//! decide what a stage does: the pipeline reads and writes records.

use std::io;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{OWN_ROOT, OwnDir, OwnFile};
use crate::runner::TaskFile;

/// The record's file, in the worker's own dir of the task.
pub const RECORD_FILE: &str = "task.json";
/// The generate marker of format version 0, in the same dir.
pub const V0_MARKER: &str = "generated.json";
/// The node's alive file, in `ZIM_DIR/.zimfarm` (not a task id: it has a
/// `.`).
pub const ALIVE_FILE: &str = "alive.json";
/// The version this worker writes.
pub const VERSION: u32 = 1;
/// A record (or alive file) larger than this is not read: no worker
/// writes one anywhere near it.
pub const MAX_RECORD_BYTES: u64 = 1 << 20;

/// Why a record cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a task record this worker can read ({reason})")]
    Unreadable { path: String, reason: String },
    #[error(
        "{path} was written by a newer worker (format version {version}, this one reads up to \
         {VERSION}); run that version or remove the task's dirs"
    )]
    Newer { path: String, version: u64 },
    #[error("cannot write {path}: {source}; check ZIM_DIR")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// A moment, as the wall clock and as the boot clock of the boot it was
/// taken in (`CLOCK_BOOTTIME`: counts suspend, never jumps).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Clock {
    /// Epoch seconds.
    pub wall: f64,
    /// `/proc/sys/kernel/random/boot_id`; empty when unknown.
    pub boot_id: String,
    pub boottime_ns: u64,
}

impl Clock {
    /// Now.
    pub fn now() -> Self {
        let boot = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        Self {
            wall: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            boot_id: boot_id().to_owned(),
            boottime_ns: u64::try_from(boot.tv_sec).unwrap_or(0) * 1_000_000_000
                + u64::try_from(boot.tv_nsec).unwrap_or(0),
        }
    }

    /// A moment known only by the wall clock (another boot's, or a start
    /// the worker gave as epoch seconds).
    pub fn wall_only(wall: f64) -> Self {
        Self {
            wall,
            boot_id: String::new(),
            boottime_ns: 0,
        }
    }

    /// How long from `self` to `now`: by the boot clock when both are of
    /// the same (known) boot, else by the wall clock; never negative.
    pub fn elapsed_until(&self, now: &Clock) -> Duration {
        if !self.boot_id.is_empty() && self.boot_id == now.boot_id {
            return Duration::from_nanos(now.boottime_ns.saturating_sub(self.boottime_ns));
        }
        let secs = now.wall - self.wall;
        if secs.is_finite() && secs > 0.0 {
            Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
        } else {
            Duration::ZERO
        }
    }

    /// How long since `self`.
    pub fn elapsed(&self) -> Duration {
        self.elapsed_until(&Clock::now())
    }

    /// The moment `elapsed` before now, by both clocks: a task started by
    /// this boot keeps its boot clock reading.
    pub fn before_now(wall: f64) -> Self {
        let now = Clock::now();
        let ago = now.wall - wall;
        if !(ago.is_finite() && ago >= 0.0) {
            return Clock::wall_only(wall);
        }
        let ago_ns = (ago * 1e9) as u64;
        match now.boottime_ns.checked_sub(ago_ns) {
            Some(boottime_ns) => Clock {
                wall,
                boot_id: now.boot_id,
                boottime_ns,
            },
            // Before this boot: only the wall clock knows it.
            None => Clock::wall_only(wall),
        }
    }
}

fn boot_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    })
}

/// How far the container's output is in the task log: the log's length,
/// and per stream the last lines written to it (as hashes) and when the
/// last of them was read, from which a later run finds its place in
/// Docker's copy of the output; when the last output came.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogCursor {
    /// The log's length in bytes when the cursor was taken (the log is cut
    /// back to it when the task is carried on).
    pub log_bytes: u64,
    #[serde(default)]
    pub stdout: StreamCursor,
    #[serde(default)]
    pub stderr: StreamCursor,
    /// When the last output came (epoch ns, wall clock), of either stream:
    /// the idle timeout counts from it.
    pub last_output_ns: Option<i64>,
}

/// Where the log is in one of the container's streams.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamCursor {
    /// Hashes of the last lines of the stream written to the log, oldest
    /// first (a few; see the pipeline's `follow.rs`).
    #[serde(default)]
    pub last_lines: Vec<String>,
    /// When the last of them was read (epoch ns, wall clock): Docker
    /// stamped it at or before this.
    pub read_ns: Option<i64>,
}

/// Where generate is: its containers, its image, its log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generating {
    /// The offliner container's name.
    pub offliner: String,
    /// The helper containers' names (redis).
    #[serde(default)]
    pub helpers: Vec<String>,
    #[serde(default)]
    pub cursor: LogCursor,
}

/// What generate produced, to be uploaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uploading {
    /// The offliner's output files (top level of the task dir).
    pub files: Vec<TaskFile>,
    /// The container log's file name in the worker's own dir, if kept.
    pub log: Option<String>,
}

/// The stage a task is in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum Stage {
    /// Dirs, images, helpers: nothing of it needs carrying on (prepare
    /// starts again).
    Prepare,
    Generate(Generating),
    Upload(Uploading),
}

impl Stage {
    pub fn label(&self) -> &'static str {
        match self {
            Stage::Prepare => "prepare",
            Stage::Generate(_) => "generate",
            Stage::Upload(_) => "upload",
        }
    }
}

/// A task's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The format version it was read from ([`VERSION`] when written).
    pub version: u32,
    /// The node (NODE_NAME) whose worker runs it; `None` in version 0.
    pub node: Option<String>,
    pub task_id: String,
    /// What the worker stored to carry the task on (opaque here); `None`
    /// for `run-task` and version 0.
    pub carry: Option<Value>,
    /// When the task started running; `None` in version 0.
    pub started: Option<Clock>,
    /// The offliner's image; empty in version 0.
    #[serde(default)]
    pub image: String,
    pub stage: Stage,
}

impl TaskRecord {
    /// Decodes a record file's bytes (of file `path`, for messages), of
    /// any version this worker reads. `v0` says the bytes are a version 0
    /// marker.
    pub fn decode(bytes: &[u8], task_id: &str, v0: bool, path: &str) -> Result<Self, RecordError> {
        let unreadable = |reason: String| RecordError::Unreadable {
            path: path.to_owned(),
            reason,
        };
        if v0 {
            let marker: Uploading =
                serde_json::from_slice(bytes).map_err(|e| unreadable(e.to_string()))?;
            return Ok(Self {
                version: 0,
                node: None,
                task_id: task_id.to_owned(),
                carry: None,
                started: None,
                image: String::new(),
                stage: Stage::Upload(marker),
            });
        }
        let value: Value = serde_json::from_slice(bytes).map_err(|e| unreadable(e.to_string()))?;
        match value.get("version").and_then(Value::as_u64) {
            Some(1) => {
                let record: Self =
                    serde_json::from_value(value).map_err(|e| unreadable(e.to_string()))?;
                if record.task_id != task_id {
                    return Err(unreadable(format!(
                        "it is task {}'s record, in task {task_id}'s dir",
                        record.task_id
                    )));
                }
                Ok(record)
            }
            Some(version) if version > u64::from(VERSION) => Err(RecordError::Newer {
                path: path.to_owned(),
                version,
            }),
            _ => Err(unreadable("no known format version".to_owned())),
        }
    }

    /// The record of task `task_id` in `own` (the task's own dir): its
    /// `task.json`, else a version 0 marker; `None` when neither is there.
    /// Blocking.
    pub fn load(own: &OwnDir, task_id: &str) -> Result<Option<Self>, RecordError> {
        for (name, v0) in [(RECORD_FILE, false), (V0_MARKER, true)] {
            let file = own.file(name);
            let path = file.path().display().to_string();
            let bytes = match file.read(MAX_RECORD_BYTES) {
                Ok(Some(bytes)) => bytes,
                Ok(None) => continue,
                Err(source) if source.kind() == io::ErrorKind::InvalidData => {
                    return Err(RecordError::Unreadable {
                        path,
                        reason: source.to_string(),
                    });
                }
                Err(source) => return Err(RecordError::Read { path, source }),
            };
            return Self::decode(&bytes, task_id, v0, &path).map(Some);
        }
        Ok(None)
    }

    /// [`TaskRecord::load`] from `ZIM_DIR`, when the task's own dir is
    /// there (it is not created). Blocking.
    pub fn load_from(zim_dir: &Path, task_id: &str) -> Result<Option<Self>, RecordError> {
        let path = super::own_dir_path(zim_dir, task_id);
        let own = match OwnDir::at(&path) {
            Ok(own) => own,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(RecordError::Read {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        Self::load(&own, task_id)
    }

    /// Writes it (as version [`VERSION`]) over the task's record,
    /// atomically and synced; a version 0 marker beside it goes. Blocking.
    pub fn save(&self, own: &OwnDir) -> Result<(), RecordError> {
        let file = own.file(RECORD_FILE);
        let written = Self {
            version: VERSION,
            ..self.clone()
        };
        let bytes = serde_json::to_vec_pretty(&written).map_err(|e| RecordError::Write {
            path: file.path().display().to_string(),
            source: io::Error::other(e),
        })?;
        file.replace(&bytes, true)
            .and_then(|()| own.file(V0_MARKER).remove())
            .map_err(|source| RecordError::Write {
                path: file.path().display().to_string(),
                source,
            })
    }

    /// [`TaskRecord::save`], off the async runtime.
    pub async fn save_async(&self, own: &OwnDir) -> Result<(), RecordError> {
        let (record, own) = (self.clone(), own.clone());
        tokio::task::spawn_blocking(move || record.save(&own))
            .await
            .map_err(|e| RecordError::Write {
                path: RECORD_FILE.to_owned(),
                source: io::Error::other(e.to_string()),
            })?
    }

    /// How long the task has run.
    pub fn age(&self) -> Duration {
        self.started.as_ref().map_or(Duration::ZERO, Clock::elapsed)
    }
}

/// The node's alive file in `ZIM_DIR/.zimfarm`.
fn alive_file(zim_dir: &Path) -> io::Result<OwnFile> {
    Ok(OwnDir::root(zim_dir)?.file(ALIVE_FILE))
}

/// Writes now into the node's alive file (atomically, not synced: a lost
/// one only makes the node look away longer). Blocking.
pub fn write_alive(zim_dir: &Path) -> io::Result<()> {
    let bytes = serde_json::to_vec(&Clock::now()).map_err(io::Error::other)?;
    alive_file(zim_dir)?.replace(&bytes, false)
}

/// The last alive-time on disk; `None` when there is none (or none
/// readable). Blocking.
pub fn read_alive(zim_dir: &Path) -> Option<Clock> {
    let root = zim_dir.join(OWN_ROOT);
    let file = OwnDir::at(&root).ok()?.file(ALIVE_FILE);
    let bytes = file.read(MAX_RECORD_BYTES).ok()??;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generating() -> Stage {
        Stage::Generate(Generating {
            offliner: "zimfarm_n_abc_offliner".to_owned(),
            helpers: vec!["zimfarm_n_abc_redis".to_owned()],
            cursor: LogCursor {
                log_bytes: 42,
                stdout: StreamCursor {
                    last_lines: vec!["0123456789abcdef".to_owned()],
                    read_ns: Some(1_700_000_000_123_456_789),
                },
                stderr: StreamCursor::default(),
                last_output_ns: Some(1_700_000_000_123_456_789),
            },
        })
    }

    fn record(stage: Stage) -> TaskRecord {
        TaskRecord {
            version: VERSION,
            node: Some("n".to_owned()),
            task_id: "abc".to_owned(),
            carry: Some(serde_json::json!({"request": {"id": "abc"}, "n": 1.5})),
            started: Some(Clock::now()),
            image: "openzim/mwoffliner:1.2".to_owned(),
            stage,
        }
    }

    #[test]
    fn every_stage_round_trips_through_the_own_dir() {
        let zim = tempfile::tempdir().unwrap();
        let own = OwnDir::create(zim.path(), "abc").unwrap();
        assert!(TaskRecord::load(&own, "abc").unwrap().is_none());
        for stage in [
            Stage::Prepare,
            generating(),
            Stage::Upload(Uploading {
                files: vec![TaskFile {
                    name: "a.zim".to_owned(),
                    size: 3,
                }],
                log: Some("x.log.gz".to_owned()),
            }),
        ] {
            let written = record(stage);
            written.save(&own).unwrap();
            let read = TaskRecord::load(&own, "abc").unwrap().unwrap();
            assert_eq!(read, written);
            assert_eq!(
                TaskRecord::load_from(zim.path(), "abc").unwrap().unwrap(),
                written
            );
        }
        // Only the record is there: no temporary file.
        let names: Vec<_> = std::fs::read_dir(own.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [RECORD_FILE]);
    }

    #[test]
    fn a_v0_marker_reads_as_upload_without_carry_and_a_save_replaces_it() {
        let zim = tempfile::tempdir().unwrap();
        let own = OwnDir::create(zim.path(), "abc").unwrap();
        own.file(V0_MARKER)
            .replace(
                br#"{"files":[{"name":"a.zim","size":3}],"log":null}"#,
                false,
            )
            .unwrap();
        let read = TaskRecord::load(&own, "abc").unwrap().unwrap();
        assert_eq!(read.version, 0);
        assert_eq!(read.carry, None);
        assert_eq!(read.stage.label(), "upload");
        record(Stage::Prepare).save(&own).unwrap();
        assert!(!own.file(V0_MARKER).exists());
    }

    #[test]
    fn unreadable_newer_oversized_and_misplaced_records_are_refused() {
        let zim = tempfile::tempdir().unwrap();
        let own = OwnDir::create(zim.path(), "abc").unwrap();
        let file = own.file(RECORD_FILE);
        let refused = |bytes: &[u8]| {
            file.replace(bytes, false).unwrap();
            TaskRecord::load(&own, "abc").unwrap_err()
        };
        assert!(matches!(
            refused(b"{not json"),
            RecordError::Unreadable { .. }
        ));
        assert!(matches!(refused(b"{}"), RecordError::Unreadable { .. }));
        let e = refused(br#"{"version": 7}"#);
        assert!(matches!(e, RecordError::Newer { version: 7, .. }), "{e}");
        let mut other = record(Stage::Prepare);
        other.task_id = "def".to_owned();
        let e = refused(&serde_json::to_vec(&other).unwrap());
        assert!(e.to_string().contains("task def's record"), "{e}");
        let big = vec![b' '; MAX_RECORD_BYTES as usize + 1];
        assert!(matches!(refused(&big), RecordError::Unreadable { .. }));
    }

    /// Every format version ever written, as stored samples.
    #[test]
    fn stored_samples_of_every_version_are_read() {
        let v0 = TaskRecord::decode(
            include_str!("../../tests/fixtures/records/v0-generated.json").as_bytes(),
            "0a1b2c3d",
            true,
            "v0",
        )
        .unwrap();
        assert_eq!(
            v0.stage,
            Stage::Upload(Uploading {
                files: vec![TaskFile {
                    name: "wikipedia_en_test_2026-12.zim".to_owned(),
                    size: 123_456
                }],
                log: Some("zimfarm_node1_0a1b2c3d_offliner.log.gz".to_owned()),
            })
        );
        let samples = [
            (
                include_str!("../../tests/fixtures/records/v1-prepare.json"),
                "prepare",
            ),
            (
                include_str!("../../tests/fixtures/records/v1-generate.json"),
                "generate",
            ),
            (
                include_str!("../../tests/fixtures/records/v1-upload.json"),
                "upload",
            ),
        ];
        for (text, stage) in samples {
            let r = TaskRecord::decode(text.as_bytes(), "0a1b2c3d", false, stage).unwrap();
            assert_eq!(r.version, 1);
            assert_eq!(r.stage.label(), stage);
            assert_eq!(r.node.as_deref(), Some("node1"));
            let started = r.started.as_ref().unwrap();
            assert_eq!(started.wall, 1_796_000_000.25);
            assert_eq!(started.boot_id, "5b1c3a2e-8a6f-4f4e-9d1c-2a7f0c9e1b3d");
            assert_eq!(r.carry.as_ref().unwrap()["reply_to"], "rpc-q");
            assert_eq!(r.image, "openzim/mwoffliner:1.14");
            // What it reads, it writes back the same.
            let again: Value = serde_json::to_value(&r).unwrap();
            let stored: Value = serde_json::from_str(text).unwrap();
            assert_eq!(again, stored, "{stage}");
        }
        let generate =
            TaskRecord::decode(samples[1].0.as_bytes(), "0a1b2c3d", false, "generate").unwrap();
        let Stage::Generate(g) = generate.stage else {
            panic!("generate")
        };
        assert_eq!(g.cursor.stdout.read_ns, Some(1_796_000_100_000_000_001));
        assert_eq!(g.cursor.stdout.last_lines.len(), 2);
        assert_eq!(g.cursor.stderr, StreamCursor::default());
        assert_eq!(g.cursor.log_bytes, 5120);
        assert_eq!(g.helpers, ["zimfarm_node1_0a1b2c3d_redis"]);
    }

    #[test]
    fn elapsed_uses_the_boot_clock_within_a_boot_and_is_never_negative() {
        let now = Clock::now();
        assert!(!now.boot_id.is_empty(), "Linux has a boot id");
        // The same boot: a wall clock jump changes nothing.
        let then = Clock {
            wall: now.wall + 3600.0,
            boot_id: now.boot_id.clone(),
            boottime_ns: now.boottime_ns - 5_000_000_000,
        };
        assert_eq!(then.elapsed_until(&now), Duration::from_secs(5));
        // Another boot: the wall clock, never negative.
        let other = Clock {
            boot_id: "other".to_owned(),
            ..then.clone()
        };
        assert_eq!(other.elapsed_until(&now), Duration::ZERO);
        let older = Clock::wall_only(now.wall - 10.0);
        let e = older.elapsed_until(&now).as_secs_f64();
        assert!((e - 10.0).abs() < 0.01, "{e}");
        // A start given as epoch seconds of this boot keeps the boot clock.
        let before = Clock::before_now(now.wall - 2.0);
        assert_eq!(before.boot_id, now.boot_id);
        let e = before.elapsed().as_secs_f64();
        assert!((2.0..3.0).contains(&e), "{e}");
    }

    #[test]
    fn the_alive_file_is_written_and_read_back() {
        let zim = tempfile::tempdir().unwrap();
        assert!(read_alive(zim.path()).is_none());
        write_alive(zim.path()).unwrap();
        let alive = read_alive(zim.path()).unwrap();
        assert!(alive.elapsed() < Duration::from_secs(5));
        // Not a task dir: the sweeper and kept() skip it.
        assert!(crate::offliner::validate_task_id(ALIVE_FILE).is_err());
    }
}
