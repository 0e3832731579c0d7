//! The generate stage's progress readings: the offliner's memory and CPU
//! (one one-shot Docker stats call, no stream held), the scraper's own
//! progress file and the disk its task dir uses, taken when the task's
//! reporter asks for them (once per `PROGRESS_INTERVAL`, see
//! [`crate::progress::report`]).
//!
//! Owns those readings and what is said of a bad progress file (each kind
//! of problem once, the last good reading kept). It must not start, stop
//! or change anything: it reads the task dir only through its handle and
//! the helpers of [`crate::progress`], which follow no link.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::docker::DockerClient;
use crate::progress::{
    MAX_WALK_ENTRIES, STATS_FILE_NAME, StatsFileError, TaskProgress, disk_usage, read_stats_file,
};
use crate::taskfs::DirHandle;

/// The readings of one generate stage, taken while this lives.
pub(super) struct Sampling {
    progress: TaskProgress,
}

impl Sampling {
    /// Sets the task's sampler: the offliner `container`, the task dir
    /// and, when the offliner writes one (`progress_file`), its progress
    /// file.
    pub(super) fn start(
        progress: &TaskProgress,
        docker: DockerClient,
        container: &str,
        task_dir: DirHandle,
        progress_file: bool,
    ) -> Self {
        let reader = Arc::new(Reader {
            docker,
            container: container.to_owned(),
            task_dir,
            progress_file,
            progress: progress.clone(),
            said: Mutex::new(None),
        });
        progress.set_sampler(Some(Arc::new(move || {
            let reader = reader.clone();
            Box::pin(async move { reader.read().await })
        })));
        Self {
            progress: progress.clone(),
        }
    }
}

/// The stage is over: nothing more to read (and the sampler's hold on the
/// task's progress goes with it).
impl Drop for Sampling {
    fn drop(&mut self) {
        self.progress.set_sampler(None);
    }
}

struct Reader {
    docker: DockerClient,
    container: String,
    task_dir: DirHandle,
    progress_file: bool,
    progress: TaskProgress,
    /// The kind of the last problem said of the progress file.
    said: Mutex<Option<&'static str>>,
}

impl Reader {
    /// The engine's figures and the task dir's at once: Docker's one-shot
    /// stats take about a second of waiting (no CPU), which must not delay
    /// the file's reading past a short interval.
    async fn read(&self) {
        tokio::join!(self.read_usage(), self.read_dir());
    }

    async fn read_usage(&self) {
        match self.docker.usage(&self.container).await {
            Ok(Some(usage)) => self
                .progress
                .set_usage(usage.memory, usage.cpu_ns, Instant::now()),
            Ok(None) => {}
            Err(error) => tracing::debug!(%error, "could not read the offliner's memory and CPU"),
        }
    }

    async fn read_dir(&self) {
        let (dir, progress_file) = (self.task_dir.clone(), self.progress_file);
        let read = tokio::task::spawn_blocking(move || {
            let file = progress_file.then(|| read_stats_file(&dir));
            (file, disk_usage(&dir, MAX_WALK_ENTRIES))
        })
        .await;
        let Ok((file, disk)) = read else { return };
        match disk {
            Ok(usage) => self.progress.set_disk(usage),
            Err(error) => tracing::debug!(%error, "could not measure the task dir's disk use"),
        }
        match file {
            None => {}
            Some(Ok(reading)) => {
                self.progress.set_scraper(reading);
                self.said(None);
            }
            Some(Err(error)) => self.problem(&error),
        }
    }

    fn said(&self, kind: Option<&'static str>) -> bool {
        let mut said = self.said.lock().unwrap_or_else(|p| p.into_inner());
        let new = *said != kind;
        *said = kind;
        new
    }

    /// Says a problem with the progress file once, until another kind of
    /// problem, or a good reading, comes.
    fn problem(&self, error: &StatsFileError) {
        if !self.said(Some(error.kind())) {
            return;
        }
        match error {
            StatsFileError::Missing => tracing::debug!(
                file = STATS_FILE_NAME,
                "the scraper has not written its progress file yet"
            ),
            error => tracing::warn!(
                file = STATS_FILE_NAME,
                %error,
                "the scraper's progress file is not read; its last good reading stands"
            ),
        }
    }
}
