//! A running task's progress (SPEC §10): where it is, what its scraper
//! says of itself, what its container uses and how its upload goes; and
//! the pacing of the `task-progress` events that carry it.
//!
//! Owns the per-task state ([`TaskProgress`]: the runner writes it, the
//! worker reads it for events, `inspect`, `ps` and the metrics), its
//! [`Snapshot`], and [`report`]: one reading at most every interval and
//! one at each stage change. The readings themselves come from the
//! runner: it sets a [`Sampler`] while it has something to read (the
//! offliner's stats, the task dir), and `statsfile` and `disk` here read
//! the task dir safely. It must not touch the broker or Docker, nor
//! decide anything about the task.

mod disk;
mod statsfile;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use disk::{DiskUsage, MAX_WALK_DEPTH, MAX_WALK_ENTRIES, disk_usage};
pub use statsfile::{
    MAX_COUNT, MAX_STATS_FILE_BYTES, STATS_FILE_NAME, ScraperProgress, StatsFileError,
    read_stats_file,
};

/// Default seconds between two `task-progress` events of a task.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

/// How much of a new CPU reading goes into the smoothed figure.
const CPU_SMOOTHING: f64 = 0.5;

/// The upload rate is measured over this much of the recent past.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// The stage a task is in, as events and `ps` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Prepare,
    Generate,
    Upload,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::Prepare, Stage::Generate, Stage::Upload];

    pub fn label(self) -> &'static str {
        match self {
            Self::Prepare => "prepare",
            Self::Generate => "generate",
            Self::Upload => "upload",
        }
    }
}

/// A task's progress at one moment: the fields of its `task-progress`
/// event, of its `progress` in `inspect active`, and of `ps --json`.
/// Fields of another stage than the current one are `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub stage: Option<Stage>,
    /// Seconds since the task started (an adopted task: its first start).
    pub elapsed: f64,
    /// The scraper's own count, from its progress file.
    pub done: Option<u64>,
    pub total: Option<u64>,
    /// `done / total` in generate; bytes sent of the total in upload.
    pub progress: Option<f64>,
    /// Seconds since the scraper's last output line.
    pub last_output: Option<f64>,
    /// Bytes the offliner uses now, and the most seen in this run.
    pub memory: Option<u64>,
    pub memory_peak: Option<u64>,
    /// Percent of one core, smoothed over the last readings.
    pub cpu: Option<f64>,
    /// Bytes under the task dir; `disk_partial`: the walk stopped at its
    /// bound and `disk` is a lower bound.
    pub disk: Option<u64>,
    pub disk_partial: Option<bool>,
    pub upload_sent: Option<u64>,
    pub upload_total: Option<u64>,
    /// Bytes a second, over the last minute.
    pub upload_rate: Option<f64>,
    /// Seconds left at that rate.
    pub upload_eta: Option<f64>,
    /// The offliner container's name, once it exists.
    pub container: Option<String>,
}

/// Reads what the runner can read of its task now (one Docker stats call,
/// the progress file, a bounded disk walk) into its [`TaskProgress`].
pub type Sampler = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// One task's progress, shared by its runner (which writes it) and the
/// worker (which reads it). Cheap to clone; every clone is the same task's.
#[derive(Clone)]
pub struct TaskProgress {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TaskProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TaskProgress")
            .field(&self.snapshot())
            .finish()
    }
}

struct Inner {
    state: Mutex<State>,
    stage: watch::Sender<Option<Stage>>,
}

#[derive(Default)]
struct State {
    started_at: f64,
    stage: Option<Stage>,
    scraper: Option<ScraperProgress>,
    /// Wall-clock ns of the scraper's last output line.
    last_output_ns: Option<i64>,
    container: Option<String>,
    memory: Option<u64>,
    memory_peak: Option<u64>,
    cpu: Option<f64>,
    /// The last CPU reading: when, and the CPU ns used then.
    last_cpu: Option<(Instant, u64)>,
    disk: Option<DiskUsage>,
    upload: Option<Upload>,
    sampler: Option<Sampler>,
}

struct Upload {
    sent: u64,
    total: u64,
    /// (when, bytes sent): one a second at most, over [`RATE_WINDOW`].
    samples: VecDeque<(Instant, u64)>,
}

impl Default for TaskProgress {
    fn default() -> Self {
        Self::new(crate::celery::now_timestamp())
    }
}

impl TaskProgress {
    /// A task that started at `started_at` (epoch seconds), in no stage yet.
    pub fn new(started_at: f64) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    started_at,
                    ..State::default()
                }),
                stage: watch::Sender::new(None),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under this lock leaves figures only: go on with them.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The task moves to `stage`: what was read of the last one is
    /// forgotten, and [`report`] sends an event at once.
    pub fn set_stage(&self, stage: Stage) {
        {
            let mut state = self.lock();
            if state.stage == Some(stage) {
                return;
            }
            state.stage = Some(stage);
            if stage != Stage::Generate {
                state.scraper = None;
                state.last_output_ns = None;
                state.memory = None;
                state.memory_peak = None;
                state.cpu = None;
                state.last_cpu = None;
                state.disk = None;
            }
            if stage != Stage::Upload {
                state.upload = None;
            }
        }
        self.inner.stage.send_replace(Some(stage));
    }

    pub fn stage(&self) -> Option<Stage> {
        self.lock().stage
    }

    /// When the task started (epoch seconds).
    pub fn set_started(&self, started_at: f64) {
        self.lock().started_at = started_at;
    }

    /// What to call for a reading; `None` when there is nothing to read.
    pub fn set_sampler(&self, sampler: Option<Sampler>) {
        self.lock().sampler = sampler;
    }

    /// Takes one reading, if the runner set a sampler.
    pub async fn sample(&self) {
        let sampler = self.lock().sampler.clone();
        if let Some(sampler) = sampler {
            sampler().await;
        }
    }

    pub fn set_container(&self, name: &str) {
        self.lock().container = Some(name.to_owned());
    }

    /// The scraper's progress file said this.
    pub fn set_scraper(&self, reading: ScraperProgress) {
        self.lock().scraper = Some(reading);
    }

    /// The scraper printed a line at `ns` (wall clock, ns since the epoch).
    pub fn output_at(&self, ns: i64) {
        let mut state = self.lock();
        state.last_output_ns = Some(state.last_output_ns.map_or(ns, |last| last.max(ns)));
    }

    /// One reading of the offliner: `memory` bytes, `cpu_ns` of CPU used
    /// since it started, read at `at`.
    pub fn set_usage(&self, memory: u64, cpu_ns: u64, at: Instant) {
        let mut state = self.lock();
        state.memory = Some(memory);
        state.memory_peak = Some(state.memory_peak.unwrap_or(0).max(memory));
        if let Some((then, used)) = state.last_cpu {
            let wall = at.saturating_duration_since(then).as_nanos() as f64;
            if wall > 0.0 && cpu_ns >= used {
                let now = (cpu_ns - used) as f64 * 100.0 / wall;
                state.cpu = Some(match state.cpu {
                    Some(cpu) => CPU_SMOOTHING * now + (1.0 - CPU_SMOOTHING) * cpu,
                    None => now,
                });
            }
        }
        state.last_cpu = Some((at, cpu_ns));
    }

    pub fn set_disk(&self, usage: DiskUsage) {
        self.lock().disk = Some(usage);
    }

    /// The upload has sent `sent` bytes of `total`.
    pub fn set_upload(&self, sent: u64, total: u64) {
        self.upload_at(sent, total, Instant::now());
    }

    fn upload_at(&self, sent: u64, total: u64, now: Instant) {
        let mut state = self.lock();
        let upload = state.upload.get_or_insert_with(|| Upload {
            sent: 0,
            total,
            samples: VecDeque::new(),
        });
        upload.sent = sent.min(total);
        upload.total = total;
        let due = upload
            .samples
            .back()
            .is_none_or(|(at, _)| now.saturating_duration_since(*at) >= Duration::from_secs(1));
        if due {
            upload.samples.push_back((now, upload.sent));
            while upload.samples.len() > 2
                && upload
                    .samples
                    .front()
                    .is_some_and(|(at, _)| now.saturating_duration_since(*at) > RATE_WINDOW)
            {
                upload.samples.pop_front();
            }
        }
    }

    /// The progress now.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot_at(Instant::now(), crate::celery::now_timestamp())
    }

    fn snapshot_at(&self, now: Instant, wall: f64) -> Snapshot {
        let state = self.lock();
        let mut snap = Snapshot {
            stage: state.stage,
            elapsed: round3((wall - state.started_at).max(0.0)),
            container: state.container.clone(),
            ..Snapshot::default()
        };
        match state.stage {
            Some(Stage::Generate) => {
                if let Some(scraper) = state.scraper {
                    snap.done = Some(scraper.done);
                    snap.total = Some(scraper.total);
                    snap.progress = scraper.ratio().map(round3);
                }
                snap.last_output = state
                    .last_output_ns
                    .map(|ns| round3((wall - ns as f64 / 1e9).max(0.0)));
                snap.memory = state.memory;
                snap.memory_peak = state.memory_peak;
                snap.cpu = state.cpu.map(|c| (c * 10.0).round() / 10.0);
                snap.disk = state.disk.map(|d| d.bytes);
                snap.disk_partial = state.disk.map(|d| d.partial);
            }
            Some(Stage::Upload) => {
                if let Some(upload) = &state.upload {
                    snap.upload_sent = Some(upload.sent);
                    snap.upload_total = Some(upload.total);
                    snap.progress = Some(if upload.total > 0 {
                        round3(upload.sent as f64 / upload.total as f64)
                    } else {
                        1.0
                    });
                    if let Some(&(then, sent_then)) = upload.samples.front() {
                        let secs = now.saturating_duration_since(then).as_secs_f64();
                        if secs >= 0.5 {
                            let rate = upload.sent.saturating_sub(sent_then) as f64 / secs;
                            snap.upload_rate = Some(rate.round());
                            let left = upload.total.saturating_sub(upload.sent) as f64;
                            snap.upload_eta = if left == 0.0 {
                                Some(0.0)
                            } else if rate > 0.0 {
                                Some((left / rate).round())
                            } else {
                                None
                            };
                        }
                    }
                }
            }
            Some(Stage::Prepare) | None => {}
        }
        snap
    }

    /// Completes each time the stage changes (see [`report`]).
    fn stage_changes(&self) -> watch::Receiver<Option<Stage>> {
        self.inner.stage.subscribe()
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Hands `emit` a snapshot of `progress` at each stage change and, within
/// a stage, one every `interval` (after a reading): never two of one stage
/// closer than `interval`. Runs until dropped or aborted (the worker does
/// so when the task's run returns). A reading that takes longer than
/// `interval` is given up, and the figures read so far are sent.
pub async fn report(progress: TaskProgress, interval: Duration, mut emit: impl FnMut(Snapshot)) {
    let mut stages = progress.stage_changes();
    // A stage set before this started counts as a change.
    stages.mark_changed();
    let mut last_sent: Option<tokio::time::Instant> = None;
    loop {
        let next = last_sent.map(|at| at + interval);
        tokio::select! {
            changed = stages.changed() => {
                if changed.is_err() {
                    return;
                }
                if stages.borrow_and_update().is_some() {
                    emit(progress.snapshot());
                    last_sent = Some(tokio::time::Instant::now());
                }
            }
            _ = sleep_until(next) => {
                let _ = tokio::time::timeout(interval, progress.sample()).await;
                emit(progress.snapshot());
                last_sent = Some(tokio::time::Instant::now());
            }
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_shows_the_fields_of_its_stage_only() {
        let progress = TaskProgress::new(1000.0);
        let t0 = Instant::now();
        assert_eq!(progress.snapshot_at(t0, 1010.0).stage, None);
        assert_eq!(progress.snapshot_at(t0, 1010.0).elapsed, 10.0);
        progress.set_stage(Stage::Generate);
        progress.set_container("zimfarm_n_t_offliner");
        progress.set_scraper(ScraperProgress { done: 5, total: 20 });
        progress.output_at(1_005_000_000_000);
        progress.set_usage(100 << 20, 0, t0);
        progress.set_usage(50 << 20, 2_000_000_000, t0 + Duration::from_secs(4));
        progress.set_disk(DiskUsage {
            bytes: 4096,
            partial: false,
        });
        let snap = progress.snapshot_at(t0 + Duration::from_secs(4), 1010.0);
        assert_eq!(snap.stage, Some(Stage::Generate));
        assert_eq!(
            (snap.done, snap.total, snap.progress),
            (Some(5), Some(20), Some(0.25))
        );
        assert_eq!(snap.last_output, Some(5.0));
        assert_eq!(
            (snap.memory, snap.memory_peak),
            (Some(50 << 20), Some(100 << 20))
        );
        assert_eq!(snap.cpu, Some(50.0));
        assert_eq!((snap.disk, snap.disk_partial), (Some(4096), Some(false)));
        assert_eq!(snap.upload_sent, None);
        assert_eq!(snap.container.as_deref(), Some("zimfarm_n_t_offliner"));
        // Smoothed: half the new reading (100%), half the last (50%).
        progress.set_usage(50 << 20, 6_000_000_000, t0 + Duration::from_secs(8));
        let snap = progress.snapshot_at(t0 + Duration::from_secs(8), 1014.0);
        assert_eq!(snap.cpu, Some(75.0));

        progress.set_stage(Stage::Upload);
        progress.upload_at(0, 1000, t0);
        progress.upload_at(400, 1000, t0 + Duration::from_secs(4));
        let snap = progress.snapshot_at(t0 + Duration::from_secs(4), 1020.0);
        assert_eq!(
            (snap.done, snap.memory, snap.last_output),
            (None, None, None)
        );
        assert_eq!(
            (snap.upload_sent, snap.upload_total),
            (Some(400), Some(1000))
        );
        assert_eq!(snap.progress, Some(0.4));
        assert_eq!(snap.upload_rate, Some(100.0));
        assert_eq!(snap.upload_eta, Some(6.0));
    }

    #[test]
    fn a_stalled_upload_has_no_eta_and_a_finished_one_none_left() {
        let progress = TaskProgress::new(0.0);
        let t0 = Instant::now();
        progress.set_stage(Stage::Upload);
        progress.upload_at(10, 1000, t0);
        progress.upload_at(10, 1000, t0 + Duration::from_secs(5));
        let snap = progress.snapshot_at(t0 + Duration::from_secs(5), 5.0);
        assert_eq!((snap.upload_rate, snap.upload_eta), (Some(0.0), None));
        progress.upload_at(5000, 1000, t0 + Duration::from_secs(6));
        let snap = progress.snapshot_at(t0 + Duration::from_secs(6), 6.0);
        assert_eq!((snap.upload_sent, snap.upload_eta), (Some(1000), Some(0.0)));
    }

    #[tokio::test(start_paused = true)]
    async fn events_come_at_each_stage_change_and_at_most_every_interval() {
        let progress = TaskProgress::new(0.0);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let reporter = tokio::spawn(report(
            progress.clone(),
            Duration::from_secs(10),
            move |snap| {
                let _ = tx.send((tokio::time::Instant::now(), snap.stage));
            },
        ));
        let start = tokio::time::Instant::now();
        progress.set_stage(Stage::Prepare);
        let (at, stage) = rx.recv().await.unwrap();
        assert_eq!((at - start, stage), (Duration::ZERO, Some(Stage::Prepare)));
        tokio::time::sleep(Duration::from_secs(3)).await;
        progress.set_stage(Stage::Generate);
        let (at, stage) = rx.recv().await.unwrap();
        assert_eq!(
            (at - start, stage),
            (Duration::from_secs(3), Some(Stage::Generate))
        );
        // Within the stage: one every interval, counted from the last.
        let (at, stage) = rx.recv().await.unwrap();
        assert_eq!(
            (at - start, stage),
            (Duration::from_secs(13), Some(Stage::Generate))
        );
        let (at, _) = rx.recv().await.unwrap();
        assert_eq!(at - start, Duration::from_secs(23));
        reporter.abort();
    }
}
