//! What a task produced and where it goes: the files at the top of the
//! task dir, the container log (gzipped), the marker of a generate stage
//! that succeeded (so a redelivered task goes straight to upload), the
//! upload journals' names, and the upload of it all to the warehouse.
//!
//! Owns the task dir's contents once the offliner has run; it must not
//! touch containers.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{DockerRunner, FAILED_LOG_UPLOAD_LIMIT, TaskDirs, failed};
use crate::early::EarlyRecord;
use crate::offliner::TaskPlan;
use crate::runner::{RunError, TaskContext, TaskError, TaskFile};
use crate::warehouse::journal::FileId;
use crate::warehouse::{UploadItem, Warehouse, WarehouseError};

/// The marker, in the task dir, of a generate stage that succeeded.
pub const GENERATED_MARKER: &str = ".zimfarm-generated.json";

/// What generate produced, as the marker records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Generated {
    /// The offliner's output files (top level of the task dir).
    pub files: Vec<TaskFile>,
    /// The container log's file name in the task dir, if it was kept.
    pub log: Option<String>,
    /// The files uploaded while the offliner ran, as they were then (not
    /// in the marker: a run that resumes checks the warehouse instead).
    #[serde(skip)]
    pub early: EarlyRecord,
}

impl DockerRunner {
    /// Every output file, then the log, to the warehouse. The files stay
    /// in the task dir whatever happens here: they go only once uploaded.
    pub(super) async fn upload(
        &self,
        warehouse: &Warehouse,
        plan: &TaskPlan,
        dirs: &TaskDirs,
        generated: &Generated,
        ctx: &TaskContext,
    ) -> Result<(), RunError> {
        let mut items = Vec::new();
        for f in &generated.files {
            match generated.early.get(&f.name) {
                None => items.push(output_item(&dirs.local_task, &plan.warehouse_path, &f.name)),
                Some(&then) => {
                    let now = FileId::read(&dirs.local_task.join(&f.name)).await.ok();
                    if now != Some(then) {
                        return Err(failed(format!(
                            "{} was uploaded to the warehouse while the offliner ran ({} bytes), \
                             and the offliner changed it afterwards ({}); the warehouse never \
                             overwrites a file: ask the Zimfarm admins to remove the first one, \
                             or have the offliner write each ZIM once",
                            f.name,
                            then.size,
                            now.map_or("it is gone".to_owned(), |n| format!(
                                "{} bytes now",
                                n.size
                            )),
                        )));
                    }
                }
            }
        }
        if let Some(log) = &generated.log {
            let path = dirs.local_task.join(log);
            if tokio::fs::try_exists(&path).await.unwrap_or(false) {
                items.push(UploadItem::log(path, log));
            }
        }
        let bytes: u64 = generated.files.iter().map(|f| f.size).sum();
        tracing::info!(
            files = items.len(),
            bytes,
            uploaded_early = generated.early.len(),
            "uploading to the warehouse"
        );
        let started = std::time::Instant::now();
        match warehouse.upload(&items, ctx.cancel.token()).await {
            Ok(reports) => {
                let secs = started.elapsed().as_secs_f64();
                tracing::info!(
                    files = reports.len(),
                    skipped = reports.iter().filter(|r| r.skipped).count(),
                    seconds = secs,
                    "upload done"
                );
                Ok(())
            }
            Err(WarehouseError::Cancelled) => {
                tracing::warn!(dir = %dirs.local_task.display(), "upload stopped; the files are kept for the next run of this task");
                Err(RunError::Cancelled)
            }
            Err(error) => {
                tracing::error!(%error, dir = %dirs.local_task.display(), "upload failed; the files are kept");
                Err(RunError::Failed(TaskError::UploadFailed {
                    error: error.to_string(),
                    kept_in: dirs.host_task.clone(),
                }))
            }
        }
    }

    /// Best effort, within [`FAILED_LOG_UPLOAD_LIMIT`]: the offliner's log
    /// of a failed run to `/logs/`, so that the task's page can show it.
    pub(super) async fn upload_failed_log(
        &self,
        warehouse: &Warehouse,
        plan: &TaskPlan,
        dirs: &TaskDirs,
        ctx: &TaskContext,
    ) {
        let container = self.container_name(&plan.task_id, "offliner");
        let mut log = None;
        for name in [format!("{container}.log.gz"), format!("{container}.log")] {
            let path = dirs.local_task.join(&name);
            if tokio::fs::try_exists(&path).await.unwrap_or(false) {
                log = Some(UploadItem::log(path, &name));
                break;
            }
        }
        let Some(item) = log else { return };
        let upload = warehouse.upload(std::slice::from_ref(&item), ctx.cancel.token());
        match tokio::time::timeout(FAILED_LOG_UPLOAD_LIMIT, upload).await {
            Ok(Ok(_)) => tracing::info!(log = %item.remote_path(), "uploaded the failed run's log"),
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not upload the failed run's log")
            }
            Err(_) => tracing::warn!(
                limit_s = FAILED_LOG_UPLOAD_LIMIT.as_secs(),
                "gave up uploading the failed run's log"
            ),
        }
    }
}

/// The marker of an earlier successful generate, if it is there and every
/// file it lists is still there with its size; `None` otherwise (the task
/// then starts afresh).
pub(super) async fn read_marker(task_dir: &Path) -> Option<Generated> {
    let text = tokio::fs::read(task_dir.join(GENERATED_MARKER))
        .await
        .ok()?;
    let generated: Generated = match serde_json::from_slice(&text) {
        Ok(g) => g,
        Err(error) => {
            tracing::warn!(%error, "unreadable generate marker; generating again");
            return None;
        }
    };
    for file in &generated.files {
        let plain_name = !file.name.contains('/') && file.name != "." && file.name != "..";
        let ok = plain_name
            && tokio::fs::metadata(task_dir.join(&file.name))
                .await
                .is_ok_and(|m| m.is_file() && m.len() == file.size);
        if !ok {
            tracing::warn!(file = %file.name, "a file the generate marker lists is missing or changed; generating again");
            return None;
        }
    }
    Some(generated)
}

/// Records a successful generate. Without it a redelivery scrapes again,
/// which is slow but not wrong, so a failure here is only logged.
pub(super) async fn write_marker(task_dir: &Path, generated: &Generated) {
    let path = task_dir.join(GENERATED_MARKER);
    let tmp = task_dir.join(format!("{GENERATED_MARKER}.tmp"));
    let text = serde_json::to_vec(generated).unwrap_or_default();
    let result = async {
        tokio::fs::write(&tmp, &text).await?;
        tokio::fs::rename(&tmp, &path).await
    }
    .await;
    if let Err(error) = result {
        tracing::warn!(%error, path = %path.display(), "could not write the generate marker");
    }
}

/// Gzips the log next to itself and removes the plain one; returns the
/// name of the file kept.
pub(super) async fn compress_log(path: PathBuf) -> String {
    let plain_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let result = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let gz_path = path.with_extension("log.gz");
        let mut input = std::fs::File::open(&path)?;
        let output = std::fs::File::create(&gz_path)?;
        let mut encoder = flate2::write::GzEncoder::new(output, flate2::Compression::default());
        let written =
            std::io::copy(&mut input, &mut encoder).and_then(|_| encoder.finish()?.flush());
        if let Err(error) = written {
            // A full disk: no half-written .gz left beside the plain log.
            let _ = std::fs::remove_file(&gz_path);
            return Err(error);
        }
        std::fs::remove_file(&path)?;
        Ok(gz_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default())
    })
    .await;
    match result {
        Ok(Ok(name)) => name,
        Ok(Err(error)) => {
            tracing::warn!(%error, "could not compress the container log; keeping it plain");
            plain_name
        }
        Err(_) => plain_name,
    }
}

/// Where output `name` of the task dir goes, with its upload journal.
pub(super) fn output_item(task_dir: &Path, warehouse_path: &str, name: &str) -> UploadItem {
    UploadItem::output(task_dir.join(name), warehouse_path, name)
        .with_journal(task_dir.join(journal_name(name)))
}

/// The upload journal of output `name`, in the task dir: hidden from
/// [`produced_files`] by its `.zimfarm-` prefix, and of fixed length
/// whatever the name's.
fn journal_name(name: &str) -> String {
    format!(
        ".zimfarm-upload-{:x}.json",
        <md5::Md5 as md5::Digest>::digest(name.as_bytes())
    )
}

/// The files the offliner produced: regular files at the top of the task
/// dir, the container log excepted.
pub(super) async fn produced_files(dir: &Path, log_file: &str) -> Result<Vec<TaskFile>, RunError> {
    let mut entries = tokio::fs::read_dir(dir)
        .await
        .map_err(|e| failed(format!("cannot list {}: {e}", dir.display())))?;
    let mut files = Vec::new();
    while let Some(entry) = entries
        .next_entry()
        .await
        .map_err(|e| failed(format!("cannot list {}: {e}", dir.display())))?
    {
        let Ok(meta) = entry.metadata().await else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let name = match entry.file_name().into_string() {
            Ok(name) => name,
            Err(raw) => {
                return Err(failed(format!(
                    "the offliner wrote a file whose name is not UTF-8 ({}); the warehouse needs UTF-8 names",
                    raw.to_string_lossy()
                )));
            }
        };
        if name == log_file || name.starts_with(".zimfarm-") {
            continue;
        }
        files.push(TaskFile {
            name,
            size: meta.len(),
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_is_named_by_the_md5_of_its_file_name() {
        // Fixed across versions: a worker restarted on a newer build finds
        // the journals the older one left.
        assert_eq!(
            journal_name("wikipedia_en_all_maxi_2026-11.zim"),
            ".zimfarm-upload-29903e3d1352f1e1fd8f39c6a6b73511.json"
        );
    }
}
