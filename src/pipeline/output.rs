//! What a task produced and where it goes: the regular files at the top
//! of the task dir (links, fifos, sockets, devices, dirs and `*.tmp` names
//! skipped, each with a line), the container log (gzipped), the check of
//! what a task record at stage upload lists (so a redelivered task goes
//! straight to upload), the upload journals' names, and the upload of it
//! all to the warehouse.
//!
//! The scraper's files are read through the task dir's handle, never by
//! path ([`crate::taskfs`]); the log, the record and the journals are the
//! worker's own, in `ZIM_DIR/.zimfarm/<id>/`. A marker or journal in the
//! task dir itself (the layout before that) is never read.
//!
//! Owns the task dir's contents once the offliner has run; it must not
//! touch containers.

use std::io::Write;
use std::path::Path;

use super::{DockerRunner, FAILED_LOG_UPLOAD_LIMIT, TaskDirs, failed};
use crate::early::EarlyRecord;
use crate::offliner::TaskPlan;
use crate::runner::{RunError, TaskContext, TaskError, TaskFile};
use crate::taskfs::record::Uploading;
use crate::taskfs::{
    DirHandle, FileKind, LocalSource, OLD_LAYOUT_MARKER, OpenError, OwnDir, OwnFile,
};
use crate::warehouse::journal::FileId;
use crate::warehouse::{TMP_SUFFIX, UploadItem, Warehouse, WarehouseError};

/// What generate produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// The offliner's output files (top level of the task dir).
    pub files: Vec<TaskFile>,
    /// The container log's file name in the worker's own dir, if it was
    /// kept.
    pub log: Option<String>,
    /// The files uploaded while the offliner ran, as they were then (not
    /// in the task record: a run that resumes checks the warehouse
    /// instead).
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
        let task_dir = open_dir(&dirs.local_task).await?;
        let own = own_dir(dirs).await?;
        let mut items = Vec::new();
        for f in &generated.files {
            match generated.early.get(&f.name) {
                None => items.push(output_item(&task_dir, &own, &plan.warehouse_path, &f.name)),
                Some(&then) => {
                    let now = file_id_beneath(&task_dir, &f.name).await;
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
            let file = own.file(log);
            if exists(&file).await {
                items.push(UploadItem::log_from(file.source(), log));
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
        match warehouse
            .upload_telling(&items, ctx.cancel.token(), Some(ctx.progress.clone()))
            .await
        {
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
        let Ok(own) = own_dir(dirs).await else { return };
        let mut log = None;
        for name in [format!("{container}.log.gz"), format!("{container}.log")] {
            let file = own.file(&name);
            if exists(&file).await {
                log = Some(UploadItem::log_from(file.source(), &name));
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

/// The task dir, opened as a handle (the worker created it; what is in it
/// is the scraper's).
pub(super) async fn open_dir(path: &Path) -> Result<DirHandle, RunError> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || DirHandle::open(&owned))
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| failed(format!("cannot open {}: {e}", path.display())))
}

/// The worker's own dir of the task, created if need be.
pub(super) async fn own_dir(dirs: &TaskDirs) -> Result<OwnDir, RunError> {
    OwnDir::create_async(&dirs.zim_dir, &dirs.task_id)
        .await
        .map_err(|e| {
            failed(format!(
                "cannot make the worker's own dir of the task in {}: {e}; check ZIM_DIR",
                dirs.zim_dir.display()
            ))
        })
}

/// What file `name` of the task dir is now (opened beneath the dir's
/// handle, a regular file only); `None` when it cannot be opened so.
async fn file_id_beneath(dir: &DirHandle, name: &str) -> Option<FileId> {
    let opened = LocalSource::beneath(dir.clone(), name).open().await.ok()?;
    FileId::of_open(&opened).await.ok()
}

async fn exists(file: &OwnFile) -> bool {
    let file = file.clone();
    tokio::task::spawn_blocking(move || file.exists())
        .await
        .unwrap_or(false)
}

/// What an earlier run's generate produced, as its record says (stage
/// upload), when every file it lists is still in the task dir, a regular
/// file with its size; `None` otherwise (the task then starts afresh).
pub(super) async fn verify_uploading(dirs: &TaskDirs, uploading: Uploading) -> Option<Generated> {
    let task_dir = match open_dir(&dirs.local_task).await {
        Ok(dir) => dir,
        Err(_) => {
            tracing::warn!(dir = %dirs.local_task.display(), "the task dir of an earlier run's output is gone; generating again");
            return None;
        }
    };
    for file in &uploading.files {
        let plain_name = !file.name.contains('/') && file.name != "." && file.name != "..";
        let ok = plain_name
            && file_id_beneath(&task_dir, &file.name)
                .await
                .is_some_and(|id| id.size == file.size);
        if !ok {
            tracing::warn!(file = %file.name, "a file the task record lists is missing or changed; generating again");
            return None;
        }
    }
    Some(Generated {
        files: uploading.files,
        log: uploading.log,
        early: Default::default(),
    })
}

/// Whether the task dir is of the layout before ZIM_DIR/.zimfarm: no own
/// dir, and the old marker in the task dir. Blocking.
pub(super) fn is_old_layout(dirs: &TaskDirs) -> bool {
    let own = crate::taskfs::own_dir_path(&dirs.zim_dir, &dirs.task_id);
    !own.is_dir() && std::fs::symlink_metadata(dirs.local_task.join(OLD_LAYOUT_MARKER)).is_ok()
}

/// Gzips the log (a file of the worker's own) next to itself, created
/// exclusively, and removes the plain one; returns the name of the file
/// kept.
pub(super) async fn compress_log(log: OwnFile) -> String {
    let plain_name = log.name().to_owned();
    let result = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let gz = log.sibling(&format!("{}.gz", log.name()));
        let input = log.open()?;
        let output = gz.create_afresh()?;
        let mut encoder = flate2::write::GzEncoder::new(output, flate2::Compression::default());
        let written =
            std::io::copy(&mut &input, &mut encoder).and_then(|_| encoder.finish()?.flush());
        if let Err(error) = written {
            // A full disk: no half-written .gz left beside the plain log.
            let _ = gz.remove();
            return Err(error);
        }
        log.remove()?;
        Ok(gz.name().to_owned())
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

/// Where output `name` of the task dir goes, read through the task dir's
/// handle, with its upload journal in the worker's own dir.
pub(super) fn output_item(
    task_dir: &DirHandle,
    own: &OwnDir,
    warehouse_path: &str,
    name: &str,
) -> UploadItem {
    UploadItem::output_from(
        LocalSource::beneath(task_dir.clone(), name),
        warehouse_path,
        name,
    )
    .with_journal(own.file(&journal_name(name)))
}

/// The upload journal of output `name`, in the worker's own dir: of fixed
/// length whatever the name's.
fn journal_name(name: &str) -> String {
    format!(
        "upload-{:x}.json",
        <md5::Md5 as md5::Digest>::digest(name.as_bytes())
    )
}

/// An entry of the task dir that is not uploaded, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Skipped {
    pub name: String,
    pub why: String,
}

/// The files the offliner produced: the regular files at the top of the
/// task dir, each opened without following a link. Anything else (a link,
/// fifo, socket, device or dir) and any name ending in `.tmp` (the
/// warehouse's partial uploads) is skipped and said so.
pub(super) async fn produced_files(dir: &DirHandle) -> Result<Vec<TaskFile>, RunError> {
    let listed = dir.clone();
    let (files, skipped) = tokio::task::spawn_blocking(move || list_outputs(&listed))
        .await
        .map_err(|e| failed(e.to_string()))??;
    for s in skipped {
        tracing::warn!(file = %s.name, why = %s.why, "skipping an entry of the task dir; it is not uploaded");
    }
    Ok(files)
}

/// [`produced_files`]' blocking part: the files, then what was skipped.
fn list_outputs(dir: &DirHandle) -> Result<(Vec<TaskFile>, Vec<Skipped>), RunError> {
    let names = dir
        .names()
        .map_err(|e| failed(format!("cannot list {}: {e}", dir.path().display())))?;
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    for raw in names {
        // The scraper's progress file is the worker's to read, never an
        // output, whatever it is (a fifo is said once, by the reader).
        if raw == crate::progress::STATS_FILE_NAME {
            continue;
        }
        let shown = raw.to_string_lossy().into_owned();
        let kind = match dir.kind(&raw) {
            Ok(kind) => kind,
            // Gone meanwhile.
            Err(_) => continue,
        };
        if kind != FileKind::Regular {
            skipped.push(Skipped {
                name: shown,
                why: format!(
                    "it is {}; only regular files are uploaded",
                    kind.described()
                ),
            });
            continue;
        }
        let name = match raw.into_string() {
            Ok(name) => name,
            Err(raw) => {
                return Err(failed(format!(
                    "the offliner wrote a file whose name is not UTF-8 ({}); the warehouse needs UTF-8 names",
                    raw.to_string_lossy()
                )));
            }
        };
        if name.ends_with(TMP_SUFFIX) {
            skipped.push(Skipped {
                name,
                why: format!(
                    "its name ends in {TMP_SUFFIX}, which the warehouse keeps for partial uploads; \
                     the offliner must not produce such names"
                ),
            });
            continue;
        }
        let size = match dir.open_file(&name) {
            Ok(file) => FileId::of_file(&file).map(|id| id.size),
            Err(OpenError::Io(e)) => Err(e),
            Err(e) => {
                skipped.push(Skipped {
                    why: format!("{e}; only regular files are uploaded"),
                    name,
                });
                continue;
            }
        };
        match size {
            Ok(size) => files.push(TaskFile { name, size }),
            Err(e) => skipped.push(Skipped {
                why: format!("it cannot be read: {e}"),
                name,
            }),
        }
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    skipped.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((files, skipped))
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
            "upload-29903e3d1352f1e1fd8f39c6a6b73511.json"
        );
    }

    #[test]
    fn only_regular_files_are_outputs_and_tmp_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let canary = tempfile::NamedTempFile::new().unwrap();
        let p = dir.path();
        std::fs::write(p.join("a.zim"), b"zim").unwrap();
        std::fs::write(p.join("x.zim.tmp"), b"partial").unwrap();
        std::fs::create_dir(p.join("sub")).unwrap();
        std::os::unix::fs::symlink(canary.path(), p.join("link.zim")).unwrap();
        std::os::unix::fs::symlink("/proc/self/environ", p.join("environ")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            p.join("fifo.zim"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let (files, skipped) = list_outputs(&DirHandle::open(p).unwrap()).unwrap();
        assert_eq!(
            files,
            [TaskFile {
                name: "a.zim".into(),
                size: 3
            }]
        );
        let why: Vec<(&str, &str)> = skipped
            .iter()
            .map(|s| (s.name.as_str(), s.why.as_str()))
            .collect();
        assert_eq!(why.len(), 5, "{why:?}");
        for (name, words) in [
            ("environ", "symbolic link"),
            ("fifo.zim", "fifo"),
            ("link.zim", "symbolic link"),
            ("sub", "directory"),
            ("x.zim.tmp", ".tmp"),
        ] {
            assert!(
                why.iter().any(|(n, w)| *n == name && w.contains(words)),
                "{name}: {why:?}"
            );
        }
    }
}
