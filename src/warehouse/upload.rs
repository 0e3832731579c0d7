//! One file to the warehouse: skip when already there, work out what its
//! `<name>.tmp` lacks (from the journal, or the remote size), send that
//! over the streams, keep the journal of what the warehouse confirmed,
//! check the ZIM checksum on the bytes as they are read, then sync, rename
//! and check the remote size. Also how many streams a file gets.
//!
//! Owns the remote file protocol and the journal's use. It must not retry
//! whole attempts or decide which files a task uploads; it connects only to
//! replace the batch's first connection when a stream lost it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::journal::{FileId, Found, Journal, JournalError, Ranges};
use super::session::{Connection, Sftp};
use super::streams::{Event, Extras, ReadEnd, Shared, Start, StreamEnd, run_stream, spawn_reader};
use super::syncer::{SYNC_EVERY, Syncer};
use super::zim::{ZimError, check_file, is_zim_name};
use super::{LOGS_DIR, TMP_SUFFIX, Warehouse, WarehouseError, ZIM_ROOT};
use crate::config::{MAX_UPLOAD_STREAMS, UploadStreams};

/// How often a progress line is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// The link `auto` sizes the streams for: 1 Gbit/s. On a slower link the
/// spare streams cost a handshake each and little else.
const AUTO_LINK_BYTES_PER_SEC: f64 = 125e6;
/// What one session channel to OpenSSH's server carries per round trip:
/// its window is `CHAN_SES_WINDOW_DEFAULT`, 2 MiB, not configurable, and
/// refilled once half of it is used (measured here: about 1.6 MiB).
const CHANNEL_WINDOW: u64 = 3 << 19;
/// Below this much to send per stream, another stream costs more than it
/// brings.
const MIN_BYTES_PER_STREAM: u64 = 8 << 20;
/// The smallest write (OpenSSH's `sftp` writes 32 KiB).
const MIN_PIECE: usize = 32 << 10;
/// The journal is saved after this many newly confirmed bytes (or 1/200
/// of the file, if more) ...
const JOURNAL_EVERY_BYTES: u64 = 4 << 20;
/// ... or this long after its last save, whichever comes first.
const JOURNAL_EVERY: Duration = Duration::from_secs(1);

/// One local file and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadItem {
    pub local: PathBuf,
    /// Absolute remote directory: `/zim<warehouse_path>` or `/logs`.
    pub remote_dir: String,
    /// The remote file name (one path component).
    pub name: String,
    /// Where this file's upload journal is kept; without one the file goes
    /// over one stream, in file order.
    pub journal: Option<PathBuf>,
    /// The file as it was when its ZIM checksum was checked just before
    /// (early upload checks before it sends): while it is still that file,
    /// the upload does not hash it a second time.
    pub checked: Option<FileId>,
}

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UploadReport {
    pub name: String,
    pub remote_path: String,
    pub size: u64,
    /// It was in the warehouse already, with this size: nothing was sent.
    pub skipped: bool,
    /// Where the successful attempt started writing: above 0 when it
    /// resumed a `.tmp` left by an earlier, broken attempt.
    pub resumed_from: u64,
    /// Bytes the successful attempt wrote.
    pub bytes_sent: u64,
    /// Whether the ZIM checksum was verified.
    pub zim_verified: bool,
    /// The streams the last attempt opened (0 when nothing was sent).
    pub streams: usize,
    /// Seconds from the first write to the last status of the last
    /// attempt: the time the bytes were on their way.
    pub sending_secs: f64,
    /// Bytes the warehouse had synced to its disk while the last attempt
    /// went on (large files only), so the sync before the rename had only
    /// the rest to write.
    pub synced_early: u64,
}

impl UploadItem {
    /// A ZIM file (or any offliner output) for `/zim<warehouse_path>/<name>`.
    pub fn output(local: PathBuf, warehouse_path: &str, name: &str) -> Self {
        let dir = format!("{ZIM_ROOT}{}", warehouse_path.trim_end_matches('/'));
        Self {
            local,
            remote_dir: dir,
            name: name.to_owned(),
            journal: None,
            checked: None,
        }
    }

    /// Keeps this file's upload journal at `path` (outside the listing of
    /// what is to be uploaded), so that it may go over several streams
    /// and resume exactly.
    pub fn with_journal(mut self, path: PathBuf) -> Self {
        self.journal = Some(path);
        self
    }

    /// Says its ZIM checksum was checked while it was `file`.
    pub fn checked_as(mut self, file: FileId) -> Self {
        self.checked = Some(file);
        self
    }

    /// A container log for `/logs/<name>`.
    pub fn log(local: PathBuf, name: &str) -> Self {
        Self {
            local,
            remote_dir: LOGS_DIR.to_owned(),
            name: name.to_owned(),
            journal: None,
            checked: None,
        }
    }

    pub fn remote_path(&self) -> String {
        format!("{}/{}", self.remote_dir, self.name)
    }

    /// Refuses names and directories that could escape their place.
    pub(super) fn validate(&self) -> Result<(), WarehouseError> {
        let bad = |what, value: &str, reason| WarehouseError::InvalidPath {
            what,
            value: value.to_owned(),
            reason,
        };
        let name = self.name.as_str();
        if name.is_empty() {
            return Err(bad("file name", name, "it is empty"));
        }
        if name.contains('/') {
            return Err(bad("file name", name, "it contains '/'"));
        }
        if name == "." || name == ".." {
            return Err(bad("file name", name, "it is '.' or '..'"));
        }
        if name.chars().any(char::is_control) {
            return Err(bad("file name", name, "it contains control characters"));
        }
        if name.len() > 255 - TMP_SUFFIX.len() {
            return Err(bad("file name", name, "it is longer than 251 bytes"));
        }
        let dir = self.remote_dir.as_str();
        if !dir.starts_with('/') {
            return Err(bad("remote directory", dir, "it is not absolute"));
        }
        if dir
            .split('/')
            .skip(1)
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(bad(
                "remote directory",
                dir,
                "it has an empty, '.' or '..' component",
            ));
        }
        if dir.chars().any(char::is_control) {
            return Err(bad(
                "remote directory",
                dir,
                "it contains control characters",
            ));
        }
        Ok(())
    }
}

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
        }
    }

    pub(super) fn sent(&self) -> u64 {
        self.sent
    }

    fn set_streams(&mut self, streams: usize) {
        self.streams = streams;
        crate::metrics::global().upload_streams(streams);
    }

    fn start_file(&mut self, offset: u64) {
        self.current = offset;
    }

    fn add(&mut self, name: &str, n: u64) {
        self.current += n;
        self.sent += n;
        crate::metrics::global().uploaded(n);
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

    fn finish_file(&mut self, size: u64) {
        self.finished += size;
        self.current = 0;
    }
}

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

/// Reads a whole local file only for its ZIM checksum.
async fn verify_local_zim(path: &Path) -> Result<(), WarehouseError> {
    let local = |detail: String| WarehouseError::Local {
        path: path.to_owned(),
        detail,
    };
    let owned = path.to_owned();
    match tokio::task::spawn_blocking(move || check_file(&owned)).await {
        Ok(Ok(verdict)) => verdict.map_err(|source| WarehouseError::Corrupt {
            name: path.display().to_string(),
            source,
        }),
        Ok(Err(e)) => Err(local(e.to_string())),
        Err(e) => Err(local(e.to_string())),
    }
}

/// How many streams one file goes over: `setting`, or for `auto` enough
/// to carry [`AUTO_LINK_BYTES_PER_SEC`] at [`CHANNEL_WINDOW`] per round
/// trip (one when one is enough, one spare otherwise); never more than
/// one per [`MIN_BYTES_PER_STREAM`] still to send.
pub(super) fn streams_for(setting: UploadStreams, rtt: Duration, to_send: u64) -> usize {
    let wanted = match setting {
        UploadStreams::Fixed(n) => usize::from(n),
        UploadStreams::Auto => {
            let per_round_trip = AUTO_LINK_BYTES_PER_SEC * rtt.as_secs_f64();
            let needed = (per_round_trip / CHANNEL_WINDOW as f64).ceil() as usize;
            if needed <= 1 { 1 } else { needed + 1 }
        }
    };
    let by_size = usize::try_from(to_send / MIN_BYTES_PER_STREAM).unwrap_or(usize::MAX);
    wanted
        .min(by_size)
        .clamp(1, usize::from(MAX_UPLOAD_STREAMS))
}

/// The bytes of one write: the largest the server takes for a large file,
/// down to [`MIN_PIECE`] for a small one, so that a slow link cut in the
/// middle of a small file still has something confirmed to resume from.
fn piece_len(size: u64, write_len: usize) -> usize {
    let sixty_fourth = usize::try_from(size / 64).unwrap_or(usize::MAX) & !4095;
    sixty_fourth.clamp(MIN_PIECE.min(write_len), write_len)
}

/// The journal of the file being uploaded: where it is kept (`None`: no
/// journal, so one stream writing in file order), and what it says.
struct Record {
    path: Option<PathBuf>,
    journal: Journal,
    unsaved: u64,
    last_save: Instant,
    save_failed: bool,
}

impl Record {
    /// Saves the journal; `Err` only matters before the first write.
    async fn save(&mut self) -> Result<(), JournalError> {
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        let journal = self.journal.clone();
        let target = path.clone();
        let result = tokio::task::spawn_blocking(move || journal.save(&target))
            .await
            .unwrap_or_else(|e| {
                Err(JournalError::Write {
                    path,
                    source: std::io::Error::other(e.to_string()),
                })
            });
        self.unsaved = 0;
        self.last_save = Instant::now();
        result
    }

    /// A range the warehouse confirmed; saved now and then, never ahead.
    async fn confirmed(&mut self, range: std::ops::Range<u64>) {
        self.unsaved += range.end - range.start;
        self.journal.confirmed.insert(range);
        let every = JOURNAL_EVERY_BYTES.max(self.journal.file.size / 200);
        if self.path.is_some()
            && (self.unsaved >= every || self.last_save.elapsed() >= JOURNAL_EVERY)
            && let Err(error) = self.save().await
            && !self.save_failed
        {
            // The journal on disk stays as it was: behind the warehouse,
            // so a resume sends a little more, never less.
            self.save_failed = true;
            tracing::warn!(%error, "could not update the upload journal; going on");
        }
    }

    fn remove(&self) {
        if let Some(path) = &self.path
            && let Err(error) = Journal::remove(path)
        {
            tracing::warn!(path = %path.display(), %error, "could not remove the upload journal");
        }
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
    let file = FileId::read(&item.local).await.map_err(local_err)?;
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
    let mut record = Record {
        path: item.journal.clone(),
        journal: Journal::new(file, tmp_path.clone()),
        unsaved: 0,
        last_save: Instant::now(),
        save_failed: false,
    };
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
            // Uploaded before (a redelivered task). A ZIM still has to be
            // intact here to count as uploaded.
            if zim {
                verify_local_zim(&item.local).await?;
            }
            report.zim_verified = zim || checked;
            tracing::info!(file = %item.name, size, "already in the warehouse with this size; skipped");
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

    // What the warehouse has already, and whether the `.tmp` is to be
    // written from scratch.
    let found = match &item.journal {
        None => Found::Absent,
        Some(path) => {
            let path = path.clone();
            let remote = tmp_path.clone();
            tokio::task::spawn_blocking(move || Journal::load(&path, file, &remote))
                .await
                .unwrap_or_else(|e| Found::Unusable(e.to_string()))
        }
    };
    let (resumable, saved) = match (found, tmp_size) {
        (_, None) => (None, false),
        (Found::Usable(journal), Some(partial)) if partial >= journal.confirmed.end() => {
            (Some(journal.confirmed), true)
        }
        (Found::Usable(_), Some(partial)) => {
            tracing::warn!(file = %item.name, partial, "the partial upload is shorter than its journal says; starting over");
            (None, false)
        }
        (Found::Absent, Some(partial)) if partial <= size => {
            // Never written in ranges: what is there is a prefix.
            let mut prefix = Ranges::new();
            prefix.insert(0..partial);
            (Some(prefix), false)
        }
        (Found::Absent, Some(partial)) => {
            tracing::warn!(file = %item.name, partial, size, "a longer partial upload is there; starting over");
            (None, false)
        }
        (Found::Unusable(why), Some(_)) => {
            tracing::warn!(file = %item.name, why, "the upload journal cannot be trusted; starting over");
            (None, false)
        }
    };
    let start_over = resumable.is_none();
    record.journal.confirmed = resumable.unwrap_or_default();
    if start_over && tmp_size.is_some_and(|s| s > 0) {
        sftp.truncate(&handle)
            .await
            .map_err(remote_error("truncate", &tmp_path))?;
    }
    // Before the first write in ranges, the journal is on disk: without
    // one, a `.tmp` is taken for a prefix.
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
        &tmp_path,
        handle,
        (size, missing, zim, streams),
        &mut record,
        progress,
        &mut report,
    )
    .await;
    let verdict = match sent {
        Ok(verdict) if FileId::read(&item.local).await.ok() != Some(file) => {
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

/// Sends the missing ranges over `streams` streams, the first on `conn`
/// with `handle`; once every range is confirmed, returns the reader's ZIM
/// verdict, `handle`, still open, unless the first stream lost it, and the
/// other streams, closing their handles.
#[allow(clippy::too_many_arguments)]
async fn send(
    warehouse: &Warehouse,
    conn: &Connection,
    extras: &mut Extras,
    item: &UploadItem,
    tmp_path: &str,
    handle: String,
    (size, missing, zim, streams): (u64, Vec<std::ops::Range<u64>>, bool, usize),
    record: &mut Record,
    progress: &mut Progress,
    report: &mut UploadReport,
) -> Result<(Option<Result<(), ZimError>>, Option<String>, Closing), WarehouseError> {
    let local_failed = |detail: String| WarehouseError::Local {
        path: item.local.clone(),
        detail,
    };
    let (fresh, mut read_end) = spawn_reader(
        item.local.clone(),
        missing,
        piece_len(size, conn.sftp().write_len()),
        zim,
    );
    let (again_tx, again_rx) = async_channel::unbounded();
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    // Dropped with this future: a failed or cancelled upload stops its
    // streams, and the reader with them.
    let _stop_guard = stop.clone().drop_guard();
    let shared = Shared {
        warehouse: warehouse.clone(),
        local: item.local.clone(),
        path: tmp_path.to_owned(),
        fresh,
        again_tx,
        again_rx,
        events: events_tx,
        stop: stop.clone(),
    };
    // Stream 0 apart: it keeps its handle for the publish, while the
    // others close theirs meanwhile. Both sets stop their tasks when
    // dropped, as a failed upload drops them.
    let mut main = tokio::task::JoinSet::new();
    main.spawn(run_stream(
        0,
        shared.clone(),
        Start::Main(conn.sftp().clone(), handle),
    ));
    // Large files are synced as they arrive; dropped with this future.
    let syncer = (size.saturating_sub(record.journal.confirmed.covered()) >= 2 * SYNC_EVERY
        && conn.sftp().can_sync())
    .then(|| Syncer::start(conn.side_session(), tmp_path.to_owned()));
    let mut tasks = tokio::task::JoinSet::new();
    for stream in 1..streams {
        tasks.spawn(run_stream(stream, shared.clone(), extras.start()));
    }
    drop(shared);
    if streams > 1 {
        tracing::info!(file = %item.name, streams, rtt_ms = conn.rtt().as_millis() as u64, "uploading over several connections");
    }
    let mut up = vec![false; streams];
    up[0] = true;
    let mut starting = streams - 1;
    let mut refused = 0usize;
    let mut alive = streams;
    let mut verdict = None;
    progress.set_streams(1);
    while verdict.is_none() || record.journal.confirmed.covered() < size {
        tokio::select! {
            end = &mut read_end, if verdict.is_none() => match end {
                Ok(ReadEnd::Done { size: read, zim }) => {
                    if read != size {
                        return Err(local_failed(format!(
                            "it changed size while being uploaded ({size} → {read} bytes)"
                        )));
                    }
                    verdict = Some(zim);
                }
                Ok(ReadEnd::Failed(detail)) => return Err(local_failed(detail)),
                Err(_) => return Err(local_failed("the reader stopped early".to_owned())),
            },
            event = events.recv() => {
                let Some(event) = event else {
                    return Err(local_failed("the upload streams stopped early".to_owned()));
                };
                match event {
                    Event::Confirmed { offset, len } => {
                        record.confirmed(offset..offset + len).await;
                        if let Some(syncer) = &syncer {
                            syncer.confirmed(record.journal.confirmed.covered());
                        }
                        report.bytes_sent += len;
                        progress.add(&item.name, len);
                    }
                    Event::Up { stream, reconnect } => {
                        up[stream] = true;
                        if reconnect {
                            tracing::info!(file = %item.name, stream, "upload stream reconnected");
                        } else {
                            starting -= 1;
                            if starting == 0 && refused > 0 {
                                warn_refused(&item.name, streams, refused);
                            }
                        }
                        progress.set_streams(up.iter().filter(|&&u| u).count());
                    }
                    Event::Down { stream, error, retry_in } => {
                        up[stream] = false;
                        crate::metrics::global().upload_stream_retry();
                        tracing::warn!(file = %item.name, stream, %error, ?retry_in, "upload stream failed; the others go on, it reconnects");
                        progress.set_streams(up.iter().filter(|&&u| u).count());
                    }
                    Event::Refused { stream } => {
                        tracing::debug!(file = %item.name, stream, "no extra connection for this stream");
                        refused += 1;
                        starting -= 1;
                        alive -= 1;
                        if starting == 0 {
                            warn_refused(&item.name, streams, refused);
                        }
                    }
                    Event::Unreadable(detail) => return Err(local_failed(detail)),
                    Event::Gone { stream, error } => {
                        up[stream] = false;
                        progress.set_streams(up.iter().filter(|&&u| u).count());
                        alive -= 1;
                        if alive == 0 {
                            return Err(WarehouseError::GaveUp {
                                attempts: warehouse.settings.upload_retries + 1,
                                last: Box::new(error),
                            });
                        }
                        tracing::warn!(file = %item.name, stream, %error, "upload stream gave up; the others go on");
                    }
                }
            }
        }
    }
    stop.cancel();
    report.synced_early = syncer.map_or(0, |s| s.synced());
    let kept = match main.join_next().await {
        Some(Ok(end)) => {
            end.closed?;
            end.kept
        }
        Some(Err(e)) => return Err(local_failed(format!("an upload stream failed: {e}"))),
        None => None,
    };
    progress.set_streams(0);
    Ok((
        verdict.expect("the loop ends with a verdict"),
        kept,
        Closing(tasks),
    ))
}

/// The other streams of a file whose every write is confirmed, closing
/// their handles: that takes a round trip, which goes beside the publish.
struct Closing(tokio::task::JoinSet<StreamEnd>);

impl Closing {
    /// Waits for them and keeps their connections for the next file. A
    /// handle that does not close loses nothing (its writes were all
    /// confirmed); its connection is not used again.
    async fn finish(mut self, extras: &mut Extras, name: &str) {
        while let Some(joined) = self.0.join_next().await {
            match joined {
                Ok(StreamEnd { closed, conn, .. }) => match closed {
                    Ok(()) => {
                        if let Some(conn) = conn {
                            extras.give_back(conn);
                        }
                    }
                    Err(error) => {
                        tracing::debug!(file = name, %error, "an upload stream could not close its handle");
                    }
                },
                Err(e) => tracing::warn!(file = name, error = %e, "an upload stream failed"),
            }
        }
    }
}

fn warn_refused(name: &str, streams: usize, refused: usize) {
    tracing::warn!(
        file = name,
        "the warehouse took {} of {streams} connections; uploading over {}",
        streams - refused,
        streams - refused
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(dir: &str, name: &str) -> UploadItem {
        UploadItem {
            local: PathBuf::from("/x"),
            remote_dir: dir.to_owned(),
            name: name.to_owned(),
            journal: None,
            checked: None,
        }
    }

    #[test]
    fn auto_streams_cover_what_a_channel_carries_per_round_trip_of_a_gigabit_link() {
        let ms = Duration::from_millis;
        let gib = 1 << 30;
        let auto = |rtt, size| streams_for(UploadStreams::Auto, rtt, size);
        // Loopback and a near warehouse: one is enough.
        assert_eq!(auto(ms(0), gib), 1);
        assert_eq!(auto(ms(10), gib), 1);
        // 50 ms: 6.25 MB per round trip is 4 channels of 1.5 MiB, plus a
        // spare.
        assert_eq!(auto(ms(50), gib), 5);
        // 150 ms: 18.75 MB is 12 channels, plus a spare.
        assert_eq!(auto(ms(150), gib), 13);
        // Far away and very far away: never more than 16.
        assert_eq!(auto(ms(400), gib), 16);
        // A small file gets one stream per 8 MiB to send, at least one.
        assert_eq!(auto(ms(150), 20 << 20), 2);
        assert_eq!(auto(ms(150), 1000), 1);
        assert_eq!(auto(ms(150), 0), 1);
    }

    #[test]
    fn small_files_go_in_smaller_writes() {
        let w = 255 << 10;
        assert_eq!(piece_len(0, w), 32 << 10);
        assert_eq!(piece_len(36_000, w), 32 << 10);
        assert_eq!(piece_len(4 << 20, w), 64 << 10);
        assert_eq!(piece_len(1 << 30, w), w);
        // A server that takes less gets no more than it takes.
        assert_eq!(piece_len(1 << 30, 16 << 10), 16 << 10);
        assert_eq!(piece_len(0, 16 << 10), 16 << 10);
    }

    #[test]
    fn fixed_streams_are_kept_but_not_for_small_files() {
        let rtt = Duration::from_millis(1);
        assert_eq!(streams_for(UploadStreams::Fixed(8), rtt, 1 << 30), 8);
        assert_eq!(streams_for(UploadStreams::Fixed(16), rtt, 1 << 30), 16);
        assert_eq!(streams_for(UploadStreams::Fixed(8), rtt, 24 << 20), 3);
        assert_eq!(streams_for(UploadStreams::Fixed(1), rtt, 1 << 30), 1);
    }

    #[test]
    fn remote_paths() {
        let i = UploadItem::output(PathBuf::from("/w/a.zim"), "/wikipedia", "a.zim");
        assert_eq!(i.remote_path(), "/zim/wikipedia/a.zim");
        let i = UploadItem::output(PathBuf::from("/w/a.zim"), "/other/", "a.zim");
        assert_eq!(i.remote_path(), "/zim/other/a.zim");
        let i = UploadItem::log(PathBuf::from("/w/x.log.gz"), "x.log.gz");
        assert_eq!(i.remote_path(), "/logs/x.log.gz");
    }

    #[test]
    fn names_leave_room_for_the_tmp_suffix() {
        // The warehouse's file names hold 255 bytes, `<name>.tmp` included.
        assert!(item("/zim/w", &"n".repeat(251)).validate().is_ok());
        let err = item("/zim/w", &"n".repeat(252)).validate().unwrap_err();
        assert!(err.to_string().contains("251 bytes"), "{err}");
    }

    #[test]
    fn names_that_could_escape_are_refused() {
        for name in ["", ".", "..", "a/b.zim", "../x.zim", "a\nb", "a\0b"] {
            assert!(
                matches!(
                    item("/zim/w", name).validate(),
                    Err(WarehouseError::InvalidPath { .. })
                ),
                "{name:?}"
            );
        }
        for dir in ["zim/w", "/zim/../etc", "/zim//w", "/zim/./w", "/zim/w/"] {
            assert!(
                matches!(
                    item(dir, "a.zim").validate(),
                    Err(WarehouseError::InvalidPath { .. })
                ),
                "{dir:?}"
            );
        }
        for name in ["a b.zim", "ünïcødé 文字.zim", "a..b.zim", ".hidden"] {
            item("/zim/w x", name).validate().unwrap();
        }
    }
}
