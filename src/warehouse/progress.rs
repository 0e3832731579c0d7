//! Progress over a whole upload batch: bytes finished, sent and still to
//! go, the streams writing right now, the metrics they feed and the
//! progress line logged every few seconds.
//!
//! Owns the counting and that log line. It must not send anything nor
//! decide when a file is finished: the upload tells it.

use std::time::{Duration, Instant};

/// How often a progress line is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Progress over a whole batch, logged every few seconds.
pub(super) struct Progress {
    total: u64,
    /// Bytes of the files finished (uploaded or skipped).
    finished: u64,
    /// How far the current file is.
    current: u64,
    /// Bytes the warehouse confirmed, over every attempt.
    sent: u64,
    /// Streams writing right now.
    streams: usize,
    started: Instant,
    last_log: Instant,
    /// The task's progress, told of every step (see [`crate::progress`]).
    task: Option<crate::progress::TaskProgress>,
}

impl Progress {
    pub(super) fn new(total: u64) -> Self {
        let now = Instant::now();
        Self {
            total,
            finished: 0,
            current: 0,
            sent: 0,
            streams: 0,
            started: now,
            last_log: now,
            task: None,
        }
    }

    /// This batch's progress, told to the task's too.
    pub(super) fn telling(mut self, task: Option<crate::progress::TaskProgress>) -> Self {
        if let Some(task) = &task {
            task.set_upload(0, self.total);
        }
        self.task = task;
        self
    }

    fn tell(&self) {
        if let Some(task) = &self.task {
            task.set_upload(self.finished + self.current, self.total);
        }
    }

    pub(super) fn sent(&self) -> u64 {
        self.sent
    }

    pub(super) fn set_streams(&mut self, streams: usize) {
        self.streams = streams;
        crate::metrics::global().upload_streams(streams);
    }

    pub(super) fn start_file(&mut self, offset: u64) {
        self.current = offset;
        self.tell();
    }

    pub(super) fn add(&mut self, name: &str, n: u64) {
        self.current += n;
        self.sent += n;
        crate::metrics::global().uploaded(n);
        self.tell();
        if self.last_log.elapsed() >= PROGRESS_EVERY {
            self.last_log = Instant::now();
            let done = self.finished + self.current;
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            let rate = self.sent as f64 / secs;
            let left = self.total.saturating_sub(done);
            let eta = if rate > 0.0 {
                format!("{:.0} s", left as f64 / rate)
            } else {
                "unknown".to_owned()
            };
            tracing::info!(
                file = name,
                streams = self.streams,
                "uploading: {} / {} MiB ({:.0}%), {:.1} MB/s over {} stream(s), {} MiB left, ETA {eta}",
                done >> 20,
                self.total >> 20,
                if self.total > 0 {
                    done as f64 * 100.0 / self.total as f64
                } else {
                    100.0
                },
                rate / 1e6,
                self.streams,
                left >> 20,
            );
        }
    }

    pub(super) fn finish_file(&mut self, size: u64) {
        self.finished += size;
        self.current = 0;
        self.tell();
    }
}
