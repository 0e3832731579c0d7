//! One file to the warehouse, step by step: skip it when it is there
//! already and its bytes, read back, are this file's (a ZIM checked
//! first), open its `<name>.tmp` and keep what the worker can vouch for
//! of it (see `resume` and `readback`), send the rest (see `send`), then
//! drop a corrupt ZIM, or sync, rename and check the remote size.
//!
//! Owns the remote file protocol (directories, `.tmp`, rename, sizes). It
//! must not retry whole attempts or decide which files a task uploads; it
//! connects only to replace the batch's first connection when a stream
//! lost it.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::journal::{FileId, Journal, Ranges};
use super::progress::Progress;
use super::readback::matching_prefix;
use super::resume::{Plan, Record, cut_to, load_journal, plan};
use super::send::{send, streams_for};
use super::session::{Connection, Sftp};
use super::streams::Extras;
use super::zim::{check_file, is_zim_name};
use super::{TMP_SUFFIX, UploadItem, UploadReport, Warehouse, WarehouseError};

/// Maps an SFTP failure of `operation` on `path` to a [`WarehouseError`].
fn remote_error<E: std::fmt::Display>(
    operation: &'static str,
    path: &str,
) -> impl Fn(E) -> WarehouseError {
    let path = path.to_owned();
    move |e| WarehouseError::Sftp {
        operation,
        path: path.clone(),
        detail: e.to_string(),
    }
}

async fn remote_size(sftp: &Sftp, path: &str) -> Result<Option<u64>, WarehouseError> {
    sftp.size(path).await.map_err(remote_error("stat", path))
}

/// `mkdir -p`: one round trip when the directory exists (the usual case),
/// else one component at a time.
async fn ensure_dir(sftp: &Sftp, dir: &str) -> Result<(), WarehouseError> {
    if sftp.is_dir(dir).await.ok().flatten() == Some(true) {
        return Ok(());
    }
    let mut path = String::new();
    for component in dir.split('/').filter(|c| !c.is_empty()) {
        path.push('/');
        path.push_str(component);
        match sftp.is_dir(&path).await {
            Ok(Some(true)) => continue,
            Ok(Some(false)) => {
                return Err(WarehouseError::Sftp {
                    operation: "mkdir",
                    path: path.clone(),
                    detail: "a file of that name is in the way".to_owned(),
                });
            }
            _ => {}
        }
        if let Err(e) = sftp.mkdir(&path).await {
            // Someone else may have made it meanwhile.
            if sftp.is_dir(&path).await.ok().flatten() != Some(true) {
                return Err(remote_error("mkdir", &path)(e));
            }
        }
    }
    Ok(())
}

/// Reads a whole local file (`path` names it in messages) only for its
/// ZIM checksum.
async fn verify_local_zim(path: &Path, source: &Arc<File>) -> Result<(), WarehouseError> {
    let local = |detail: String| WarehouseError::Local {
        path: path.to_owned(),
        detail,
    };
    let source = source.clone();
    match tokio::task::spawn_blocking(move || check_file(&source)).await {
        Ok(Ok(verdict)) => verdict.map_err(|source| WarehouseError::Corrupt {
            name: path.display().to_string(),
            source,
        }),
        Ok(Err(e)) => Err(local(e.to_string())),
        Err(e) => Err(local(e.to_string())),
    }
}

/// Uploads one file over `conn` and the extra streams it opens. See the
/// module doc for the steps.
pub(super) async fn upload_one(
    warehouse: &Warehouse,
    conn: &mut Connection,
    extras: &mut Extras,
    item: &UploadItem,
    progress: &mut Progress,
) -> Result<UploadReport, WarehouseError> {
    let local_err = |e: std::io::Error| WarehouseError::Local {
        path: item.local.clone(),
        detail: e.to_string(),
    };
    // One descriptor for this attempt: sized, hashed and sent through it.
    let source = item.source.open().await.map_err(local_err)?;
    let file = FileId::of_open(&source).await.map_err(local_err)?;
    let size = file.size;
    // A ZIM is hashed as it is read, unless it was checked just before and
    // is still the file that was checked.
    let is_zim = is_zim_name(&item.name);
    let checked = is_zim && item.checked == Some(file);
    let zim = is_zim && !checked;
    let final_path = item.remote_path();
    let tmp_path = format!("{final_path}{TMP_SUFFIX}");
    let sftp = conn.sftp().clone();
    let sftp = &sftp;
    let mut report = UploadReport {
        name: item.name.clone(),
        remote_path: final_path.clone(),
        size,
        skipped: false,
        resumed_from: 0,
        bytes_sent: 0,
        zim_verified: false,
        streams: 0,
        sending_secs: 0.0,
        synced_early: 0,
    };

    // All asked at once, the `.tmp` opened (created, not emptied) with
    // them: over the internet every round trip counts. When the directory
    // is missing, so are the files, and the open failed.
    let (dir, final_size, tmp_size, opened) = tokio::join!(
        sftp.is_dir(&item.remote_dir),
        remote_size(sftp, &final_path),
        remote_size(sftp, &tmp_path),
        sftp.open_for_write(&tmp_path, true, false)
    );
    let opened = match opened {
        Err(_) if dir.ok().flatten() != Some(true) => {
            ensure_dir(sftp, &item.remote_dir).await?;
            sftp.open_for_write(&tmp_path, true, false).await
        }
        other => other,
    };
    let handle = opened.map_err(remote_error("open", &tmp_path))?;
    let tmp_size = tmp_size?;
    // Leaves the warehouse as it found it: no `.tmp` made for nothing.
    let discard = async |handle: String| {
        let _ = sftp.close(&handle).await;
        if tmp_size.is_none() {
            let _ = sftp.remove(&tmp_path).await;
        }
    };
    let mut record = Record::new(item.journal.clone(), Journal::new(file, tmp_path.clone()));
    let final_size = match final_size {
        Ok(s) => s,
        Err(e) => {
            discard(handle).await;
            return Err(e);
        }
    };
    if final_size.is_some() {
        discard(handle.clone()).await;
    }
    match final_size {
        Some(remote) if remote == size => {
            // Uploaded before (a redelivered task), or another file of
            // that name: only its bytes, read back, tell. A ZIM still has
            // to be intact here to count as uploaded.
            tracing::info!(file = %item.name, size, "already in the warehouse with this size; reading it back to compare");
            let reading = Instant::now();
            let (same, intact) = tokio::join!(
                matching_prefix(sftp, &final_path, item, &source, size),
                async {
                    if zim {
                        verify_local_zim(&item.local, &source).await
                    } else {
                        Ok(())
                    }
                }
            );
            let same = same?;
            intact?;
            if same < size {
                return Err(WarehouseError::Differs {
                    path: final_path,
                    size,
                    first_difference: same,
                });
            }
            report.zim_verified = zim || checked;
            tracing::info!(
                file = %item.name,
                size,
                read_back_secs = reading.elapsed().as_secs_f64(),
                "already in the warehouse, the same bytes; skipped"
            );
            record.remove();
            report.skipped = true;
            progress.finish_file(size);
            return Ok(report);
        }
        Some(remote) => {
            return Err(WarehouseError::Conflict {
                path: final_path,
                remote_size: remote,
                local_size: size,
            });
        }
        None => {}
    }

    // What of the `.tmp` the worker can vouch for; the rest is written
    // again, and nothing unvouched stays behind it.
    let plan = plan(load_journal(item, file, &tmp_path).await, tmp_size, size);
    // The journal on disk says so already.
    let saved = matches!(plan, Plan::Journal(_));
    let kept = match plan {
        Plan::Fresh => Ranges::new(),
        Plan::Journal(ranges) => ranges,
        Plan::ReadBack(len) => {
            tracing::info!(file = %item.name, len, "a partial upload without a journal; reading it back to compare");
            let reading = Instant::now();
            let same = matching_prefix(sftp, &tmp_path, item, &source, len).await?;
            let read_back_secs = reading.elapsed().as_secs_f64();
            if same < len {
                tracing::warn!(file = %item.name, same, len, read_back_secs, "the partial upload differs from this file; keeping only what matches");
            } else {
                tracing::info!(file = %item.name, same, read_back_secs, "the partial upload is this file's");
            }
            let mut prefix = Ranges::new();
            prefix.insert(0..same);
            prefix
        }
        Plan::StartOver(why) => {
            tracing::warn!(file = %item.name, why, "starting the partial upload over");
            Ranges::new()
        }
    };
    if let Some(len) = cut_to(tmp_size, &kept) {
        sftp.truncate(&handle, len)
            .await
            .map_err(remote_error("truncate", &tmp_path))?;
    }
    record.journal.confirmed = kept;
    // Before the first write in ranges, the journal is on disk: without
    // one, a `.tmp` is read back as a prefix.
    if !saved && let Err(error) = record.save().await {
        tracing::warn!(%error, "cannot keep an upload journal; uploading over one stream, in file order");
        record.remove();
        record.path = None;
    }
    let already = record.journal.confirmed.covered();
    if already > 0 {
        tracing::info!(file = %item.name, already, size, "resuming a partial upload");
    }
    report.resumed_from = already;
    progress.start_file(already);

    let missing = record.journal.confirmed.missing(size);
    let to_send: u64 = missing.iter().map(|r| r.end - r.start).sum();
    let streams = if record.path.is_some() {
        streams_for(warehouse.settings.upload_streams, conn.rtt(), to_send)
    } else {
        1
    };
    report.streams = streams;
    let sending = Instant::now();
    let sent = send(
        warehouse,
        conn,
        extras,
        item,
        &source,
        &tmp_path,
        handle,
        (size, missing, zim, streams),
        &mut record,
        progress,
        &mut report,
    )
    .await;
    let verdict = match sent {
        Ok(verdict) if FileId::of_open(&source).await.ok() != Some(file) => {
            // Read again after a cut, a changed file may have sent some of
            // its new bytes: none of it is kept.
            let _ = verdict;
            record.remove();
            if let Err(e) = sftp.remove(&tmp_path).await {
                tracing::warn!(path = %tmp_path, error = %e, "could not remove the partial upload");
            }
            return Err(WarehouseError::Local {
                path: item.local.clone(),
                detail: "it changed while being uploaded".to_owned(),
            });
        }
        Ok(verdict) => {
            report.sending_secs = sending.elapsed().as_secs_f64();
            verdict
        }
        Err(error) => {
            // What was confirmed since the last save is kept for the next
            // attempt, or the next run.
            if record.unsaved > 0
                && let Err(e) = record.save().await
            {
                tracing::warn!(error = %e, "could not update the upload journal");
            }
            return Err(error);
        }
    };
    let (verdict, kept, closing) = verdict;
    let main_lost = conn.is_closed();
    if main_lost {
        // The first stream lost this connection and went on over another.
        *conn = warehouse.connect().await?;
    }
    let sftp = &conn.sftp().clone();
    let handle = match kept.filter(|_| !main_lost) {
        Some(handle) => handle,
        None => sftp
            .open_for_write(&tmp_path, false, false)
            .await
            .map_err(remote_error("open", &tmp_path))?,
    };

    if let Some(Err(source)) = verdict {
        tracing::error!(file = %item.name, %source, "corrupt ZIM; removing its partial upload");
        let _ = sftp.close(&handle).await;
        if let Err(e) = sftp.remove(&tmp_path).await {
            tracing::warn!(path = %tmp_path, error = %e, "could not remove the corrupt upload");
        }
        record.remove();
        return Err(WarehouseError::Corrupt {
            name: item.name.clone(),
            source,
        });
    }
    report.zim_verified = verdict.is_some() || checked;

    let ((published, remote), ()) = tokio::join!(
        sftp.publish(&handle, &tmp_path, &final_path),
        closing.finish(extras, &item.name)
    );
    published.map_err(remote_error("rename", &tmp_path))?;
    record.remove();
    let remote = remote.map_err(remote_error("stat", &final_path))?;
    if remote != Some(size) {
        return Err(WarehouseError::SizeMismatch {
            path: final_path,
            remote_size: remote.unwrap_or(0),
            local_size: size,
        });
    }
    progress.finish_file(size);
    tracing::info!(
        file = %item.name,
        size,
        resumed_from = already,
        streams,
        zim_verified = report.zim_verified,
        synced_early = report.synced_early,
        "uploaded"
    );
    Ok(report)
}
