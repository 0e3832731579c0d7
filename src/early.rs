//! Early upload: while the scraper runs, each `.zim` in its task dir that
//! has stopped growing and whose own checksum verifies goes to the
//! warehouse, one file at a time, so that when the scraper exits only what
//! is left is sent. A gutenberg or youtube run that writes many ZIMs over
//! days publishes each one as it is done.
//!
//! Owns the watching (a scan every [`SCAN_EVERY`]), the judgement
//! "finished" (size and modification time unchanged for [`QUIET`], then
//! the ZIM MD5 over the whole file: a name alone proves nothing, and a ZIM
//! being written has no valid checksum yet) and the record of what went
//! early, with the identity (size, mtime) it had then. The scraper is still
//! running: the dir is read through its handle, a link, fifo or device is
//! never a candidate, and a candidate is opened once (without following a
//! link) and checked, hashed and sent through that descriptor
//! ([`crate::taskfs`]). It must not touch containers or events, and it
//! never fails a task: a file it could not send waits for the upload stage,
//! which reports what is wrong.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::taskfs::{DirHandle, LocalSource};
use crate::warehouse::journal::FileId;
use crate::warehouse::zim::{check_file, is_zim_name};
use crate::warehouse::{UploadItem, Warehouse};

/// How often the task dir is looked at.
pub const SCAN_EVERY: Duration = Duration::from_secs(1);
/// How long a ZIM must stay the same before it is checked.
pub const QUIET: Duration = Duration::from_secs(3);

/// The files that went early, by name, with the identity they had when
/// their checksum verified.
pub type EarlyRecord = BTreeMap<String, FileId>;

/// The watcher of one task dir; [`EarlyUploads::finish`] ends it.
pub struct EarlyUploads {
    stop: CancellationToken,
    task: JoinHandle<EarlyRecord>,
}

impl EarlyUploads {
    /// Starts watching `dir`; `item_for(name)` says where a file goes.
    /// `cancel` (the task's) stops an upload under way; `finish` lets it
    /// end first.
    pub fn start(
        warehouse: Warehouse,
        dir: DirHandle,
        item_for: impl Fn(&str) -> UploadItem + Send + Sync + 'static,
        cancel: CancellationToken,
    ) -> Self {
        let stop = CancellationToken::new();
        let watch = Watch {
            warehouse,
            dir,
            item_for: Box::new(item_for),
            cancel,
            stop: stop.clone(),
        };
        let task = tokio::spawn(watch.run().in_current_span());
        Self { stop, task }
    }

    /// Stops watching (the scraper exited), waits for an upload under way
    /// to end, and says what went early.
    pub async fn finish(mut self) -> EarlyRecord {
        self.stop.cancel();
        (&mut self.task).await.unwrap_or_default()
    }
}

impl Drop for EarlyUploads {
    fn drop(&mut self) {
        // Dropped without `finish` (the run failed or was cancelled):
        // the watcher and an upload under way stop here.
        self.stop.cancel();
        self.task.abort();
    }
}

struct Watch {
    warehouse: Warehouse,
    dir: DirHandle,
    item_for: Box<dyn Fn(&str) -> UploadItem + Send + Sync>,
    cancel: CancellationToken,
    stop: CancellationToken,
}

impl Watch {
    async fn run(self) -> EarlyRecord {
        let mut sent = EarlyRecord::new();
        // name -> (identity, since when it has not changed)
        let mut still: HashMap<String, (FileId, Instant)> = HashMap::new();
        // name -> the identity that failed its checksum or its upload
        let mut passed_over: HashMap<String, FileId> = HashMap::new();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SCAN_EVERY) => {}
                _ = self.stop.cancelled() => return sent,
            }
            let Some(name) = self.candidate(&sent, &mut still, &passed_over).await else {
                continue;
            };
            let id = still[&name].0;
            let Ok(opened) = open(&self.dir, &name).await else {
                continue;
            };
            let verdict = tokio::select! {
                v = verify(opened.clone()) => v,
                // The upload stage checks it again.
                _ = self.stop.cancelled() => return sent,
            };
            if let Err(why) = verdict {
                tracing::debug!(file = %name, %why, "a ZIM that is not complete yet; not uploaded early");
                passed_over.insert(name, id);
                continue;
            }
            if FileId::of_open(&opened).await.ok() != Some(id) {
                continue;
            }
            tracing::info!(file = %name, size = id.size, "uploading a finished ZIM while the scraper runs");
            let started = Instant::now();
            match self
                .warehouse
                .upload(
                    &[(self.item_for)(&name)
                        .with_source(LocalSource::opened(opened, self.dir.path().join(&name)))
                        .checked_as(id)],
                    &self.cancel,
                )
                .await
            {
                Ok(_) => {
                    let seconds = started.elapsed().as_secs_f64();
                    crate::metrics::global().early_upload(seconds);
                    tracing::info!(file = %name, seconds, "uploaded early");
                    sent.insert(name, id);
                }
                Err(error) => {
                    tracing::warn!(file = %name, %error, "early upload failed; the file waits for the scraper's exit");
                    passed_over.insert(name, id);
                }
            }
        }
    }

    /// The first `.zim` (by name) not sent yet that has been still for
    /// [`QUIET`] and not passed over as it is now.
    async fn candidate(
        &self,
        sent: &EarlyRecord,
        still: &mut HashMap<String, (FileId, Instant)>,
        passed_over: &HashMap<String, FileId>,
    ) -> Option<String> {
        let dir = self.dir.clone();
        let files = tokio::task::spawn_blocking(move || regular_zims(&dir))
            .await
            .ok()?;
        let mut ready = Vec::new();
        for (name, id) in files {
            if sent.contains_key(&name) {
                continue;
            }
            let now = Instant::now();
            match still.get(&name) {
                Some(&(was, since)) if was == id => {
                    if now.duration_since(since) >= QUIET && passed_over.get(&name) != Some(&id) {
                        ready.push(name);
                    }
                }
                _ => {
                    still.insert(name, (id, now));
                }
            }
        }
        ready.sort();
        ready.into_iter().next()
    }
}

/// The `.zim` regular files at the top of `dir` (links, fifos and the
/// like left out by `open_file`, never followed) and their identities.
/// Blocking.
fn regular_zims(dir: &DirHandle) -> Vec<(String, FileId)> {
    let Ok(names) = dir.names() else {
        return Vec::new();
    };
    names
        .into_iter()
        .filter_map(|name| name.into_string().ok())
        .filter(|name| is_zim_name(name))
        .filter_map(|name| {
            let file = dir.open_file(&name).ok()?;
            Some((name, FileId::of_file(&file).ok()?))
        })
        .collect()
}

/// Opens `name` beneath `dir` once: a regular file, no link followed.
async fn open(dir: &DirHandle, name: &str) -> std::io::Result<Arc<File>> {
    LocalSource::beneath(dir.clone(), name).open().await
}

/// Checks a whole ZIM's own MD5 on a blocking thread.
async fn verify(file: Arc<File>) -> Result<(), String> {
    match tokio::task::spawn_blocking(move || check_file(&file)).await {
        Ok(Ok(verdict)) => verdict.map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::warehouse::zim::synthetic_zim;
    use std::io::Write;

    use std::path::Path;

    fn write_zim(path: &Path, size: u64, good: bool) {
        let mut f = std::fs::File::create(path).unwrap();
        let mut chunks: Vec<Vec<u8>> = synthetic_zim(size, |b| b.fill(7)).collect();
        if !good {
            let last = chunks.last_mut().unwrap();
            last[0] ^= 1;
        }
        for c in chunks {
            f.write_all(&c).unwrap();
        }
    }

    #[tokio::test]
    async fn only_an_intact_zim_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.zim");
        let bad = dir.path().join("bad.zim");
        write_zim(&good, 100_000, true);
        write_zim(&bad, 100_000, false);
        let opened = |p: &Path| Arc::new(File::open(p).unwrap());
        verify(opened(&good)).await.unwrap();
        assert!(verify(opened(&bad)).await.unwrap_err().contains("MD5"));
        // Cut short, as a ZIM being written is.
        let f = std::fs::OpenOptions::new().write(true).open(&good).unwrap();
        f.set_len(50_000).unwrap();
        assert!(verify(opened(&good)).await.is_err());
    }

    #[test]
    fn only_regular_zims_are_candidates() {
        let dir = tempfile::tempdir().unwrap();
        let canary = tempfile::NamedTempFile::new().unwrap();
        write_zim(&dir.path().join("good.zim"), 10_000, true);
        std::os::unix::fs::symlink(canary.path(), dir.path().join("link.zim")).unwrap();
        std::fs::create_dir(dir.path().join("dir.zim")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        let found = regular_zims(&DirHandle::open(dir.path()).unwrap());
        let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["good.zim"]);
        assert_eq!(found[0].1.size, 10_000);
    }
}
