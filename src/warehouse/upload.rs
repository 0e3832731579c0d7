//! One file to the warehouse over an open SFTP session: skip when already
//! there, write `<name>.tmp` (resumed from its remote size), check the ZIM
//! checksum on the bytes as they are read, rename, check the remote size.
//!
//! Owns the remote file protocol and the local reading. It must not
//! connect, retry or decide which files a task uploads.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use russh_sftp::client::SftpSession;
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::protocol::{OpenFlags, StatusCode};
use serde::Serialize;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::zim::{ZimChecksum, ZimError, is_zim_name};
use super::{LOGS_DIR, TMP_SUFFIX, WarehouseError, ZIM_ROOT};

/// Bytes read from disk and handed to SFTP at a time.
const CHUNK: usize = 1 << 20;
/// Chunks read ahead of the network (the reader thread hashes meanwhile).
const READ_AHEAD: usize = 8;
/// How often a progress line is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// One local file and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadItem {
    pub local: PathBuf,
    /// Absolute remote directory: `/zim<warehouse_path>` or `/logs`.
    pub remote_dir: String,
    /// The remote file name (one path component).
    pub name: String,
}

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
}

impl UploadItem {
    /// A ZIM file (or any offliner output) for `/zim<warehouse_path>/<name>`.
    pub fn output(local: PathBuf, warehouse_path: &str, name: &str) -> Self {
        let dir = format!("{ZIM_ROOT}{}", warehouse_path.trim_end_matches('/'));
        Self {
            local,
            remote_dir: dir,
            name: name.to_owned(),
        }
    }

    /// A container log for `/logs/<name>`.
    pub fn log(local: PathBuf, name: &str) -> Self {
        Self {
            local,
            remote_dir: LOGS_DIR.to_owned(),
            name: name.to_owned(),
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
    /// Bytes written to the network, over every attempt.
    sent: u64,
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
            started: now,
            last_log: now,
        }
    }

    pub(super) fn sent(&self) -> u64 {
        self.sent
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
            let eta = if rate > 0.0 {
                format!("{:.0} s", self.total.saturating_sub(done) as f64 / rate)
            } else {
                "unknown".to_owned()
            };
            tracing::info!(
                file = name,
                "uploading: {} / {} MiB ({:.0}%), {:.1} MB/s, ETA {eta}",
                done >> 20,
                self.total >> 20,
                if self.total > 0 {
                    done as f64 * 100.0 / self.total as f64
                } else {
                    100.0
                },
                rate / 1e6,
            );
        }
    }

    fn finish_file(&mut self, size: u64) {
        self.finished += size;
        self.current = 0;
    }
}

/// Maps an SFTP failure (a status from the server, or the file handle's
/// I/O error) of `operation` on `path` to a [`WarehouseError`].
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

/// The remote size of `path`, or `None` when it does not exist.
async fn remote_size(sftp: &SftpSession, path: &str) -> Result<Option<u64>, WarehouseError> {
    match sftp.metadata(path).await {
        Ok(meta) => Ok(Some(meta.size.unwrap_or(0))),
        Err(SftpError::Status(s)) if s.status_code == StatusCode::NoSuchFile => Ok(None),
        Err(e) => Err(remote_error("stat", path)(e)),
    }
}

/// `mkdir -p`: one round trip when the directory exists (the usual case),
/// else one component at a time.
async fn ensure_dir(sftp: &SftpSession, dir: &str) -> Result<(), WarehouseError> {
    if sftp.metadata(dir).await.is_ok_and(|m| m.is_dir()) {
        return Ok(());
    }
    let mut path = String::new();
    for component in dir.split('/').filter(|c| !c.is_empty()) {
        path.push('/');
        path.push_str(component);
        match sftp.metadata(path.as_str()).await {
            Ok(meta) if meta.is_dir() => continue,
            Ok(_) => {
                return Err(WarehouseError::Sftp {
                    operation: "mkdir",
                    path: path.clone(),
                    detail: "a file of that name is in the way".to_owned(),
                });
            }
            Err(_) => {}
        }
        if let Err(e) = sftp.create_dir(path.as_str()).await {
            // Someone else may have made it meanwhile.
            if !sftp.metadata(path.as_str()).await.is_ok_and(|m| m.is_dir()) {
                return Err(remote_error("mkdir", &path)(e));
            }
        }
    }
    Ok(())
}

/// What the reader thread hands over.
enum Piece {
    Data(Vec<u8>),
    /// End of file: how many bytes there were, and the ZIM verdict.
    End {
        size: u64,
        zim: Option<Result<(), ZimError>>,
    },
    Failed(String),
}

/// Reads `path` on a blocking thread, hashing ZIM files from byte 0, and
/// sends the bytes from `send_from` on. Stops when the receiver is gone.
fn spawn_reader(path: PathBuf, send_from: u64, zim: bool) -> mpsc::Receiver<Piece> {
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    tokio::task::spawn_blocking(move || {
        let last = match read_file(&path, send_from, zim, &tx) {
            Ok(Some(end)) => end,
            Ok(None) => return,
            Err(e) => Piece::Failed(e.to_string()),
        };
        let _ = tx.blocking_send(last);
    });
    rx
}

/// The reader thread's loop; returns the [`Piece::End`] to send last, or
/// `None` when the receiver went away.
fn read_file(
    path: &Path,
    send_from: u64,
    zim: bool,
    tx: &mpsc::Sender<Piece>,
) -> std::io::Result<Option<Piece>> {
    let mut file = std::fs::File::open(path)?;
    let mut checksum = zim.then(ZimChecksum::new);
    let mut pos = if checksum.is_some() { 0 } else { send_from };
    file.seek(SeekFrom::Start(pos))?;
    loop {
        let mut buf = vec![0u8; CHUNK];
        let mut filled = 0;
        while filled < CHUNK {
            match file.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            break;
        }
        buf.truncate(filled);
        if let Some(c) = checksum.as_mut() {
            c.update(&buf);
        }
        let end = pos + filled as u64;
        if end > send_from {
            let skip = send_from.saturating_sub(pos) as usize;
            if skip > 0 {
                buf.drain(..skip);
            }
            if tx.blocking_send(Piece::Data(buf)).is_err() {
                return Ok(None);
            }
        }
        pos = end;
    }
    Ok(Some(Piece::End {
        size: pos,
        zim: checksum.map(ZimChecksum::finish),
    }))
}

/// Reads a whole local file only for its ZIM checksum.
async fn verify_local_zim(path: &Path) -> Result<(), WarehouseError> {
    let mut rx = spawn_reader(path.to_owned(), u64::MAX, true);
    while let Some(piece) = rx.recv().await {
        match piece {
            Piece::Data(_) => {}
            Piece::End { zim, .. } => {
                return zim
                    .unwrap_or(Ok(()))
                    .map_err(|source| WarehouseError::Corrupt {
                        name: path.display().to_string(),
                        source,
                    });
            }
            Piece::Failed(detail) => {
                return Err(WarehouseError::Local {
                    path: path.to_owned(),
                    detail,
                });
            }
        }
    }
    Err(WarehouseError::Local {
        path: path.to_owned(),
        detail: "the reader stopped early".to_owned(),
    })
}

/// Uploads one file over `sftp`. See the module doc for the steps.
pub(super) async fn upload_one(
    sftp: &SftpSession,
    item: &UploadItem,
    progress: &mut Progress,
) -> Result<UploadReport, WarehouseError> {
    let local_err = |e: std::io::Error| WarehouseError::Local {
        path: item.local.clone(),
        detail: e.to_string(),
    };
    let size = tokio::fs::metadata(&item.local)
        .await
        .map_err(local_err)?
        .len();
    let zim = is_zim_name(&item.name);
    let final_path = item.remote_path();
    let tmp_path = format!("{final_path}{TMP_SUFFIX}");
    let mut report = UploadReport {
        name: item.name.clone(),
        remote_path: final_path.clone(),
        size,
        skipped: false,
        resumed_from: 0,
        bytes_sent: 0,
        zim_verified: false,
    };

    ensure_dir(sftp, &item.remote_dir).await?;
    // Both asked at once: over the internet every round trip counts.
    let (final_size, tmp_size) =
        tokio::join!(remote_size(sftp, &final_path), remote_size(sftp, &tmp_path));
    match final_size? {
        Some(remote) if remote == size => {
            // Uploaded before (a redelivered task). A ZIM still has to be
            // intact here to count as uploaded.
            if zim {
                verify_local_zim(&item.local).await?;
                report.zim_verified = true;
            }
            tracing::info!(file = %item.name, size, "already in the warehouse with this size; skipped");
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

    let offset = match tmp_size? {
        Some(partial) if partial <= size => partial,
        Some(partial) => {
            tracing::warn!(file = %item.name, partial, size, "a longer partial upload is there; starting over");
            0
        }
        None => 0,
    };
    let flags = if offset > 0 {
        OpenFlags::WRITE
    } else {
        OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::TRUNCATE
    };
    let mut file = sftp
        .open_with_flags(tmp_path.as_str(), flags)
        .await
        .map_err(remote_error("open", &tmp_path))?;
    if offset > 0 {
        file.seek(SeekFrom::Start(offset))
            .await
            .map_err(remote_error("seek", &tmp_path))?;
        tracing::info!(file = %item.name, offset, size, "resuming a partial upload");
    }
    report.resumed_from = offset;
    progress.start_file(offset);

    let mut rx = spawn_reader(item.local.clone(), offset, zim);
    let mut verdict = None;
    while let Some(piece) = rx.recv().await {
        match piece {
            Piece::Data(buf) => {
                file.write_all(&buf)
                    .await
                    .map_err(remote_error("write", &tmp_path))?;
                report.bytes_sent += buf.len() as u64;
                progress.add(&item.name, buf.len() as u64);
            }
            Piece::End { size: read, zim } => {
                if read != size {
                    return Err(WarehouseError::Local {
                        path: item.local.clone(),
                        detail: format!(
                            "it changed size while being uploaded ({size} → {read} bytes)"
                        ),
                    });
                }
                verdict = Some(zim);
                break;
            }
            Piece::Failed(detail) => {
                return Err(WarehouseError::Local {
                    path: item.local.clone(),
                    detail,
                });
            }
        }
    }
    let Some(zim_verdict) = verdict else {
        return Err(WarehouseError::Local {
            path: item.local.clone(),
            detail: "the reader stopped early".to_owned(),
        });
    };
    // Every write acknowledged, then the handle closed: a write error
    // surfaces here, not silently in a drop.
    file.shutdown()
        .await
        .map_err(remote_error("write", &tmp_path))?;

    if let Some(Err(source)) = zim_verdict {
        tracing::error!(file = %item.name, %source, "corrupt ZIM; removing its partial upload");
        if let Err(e) = sftp.remove_file(tmp_path.as_str()).await {
            tracing::warn!(path = %tmp_path, error = %e, "could not remove the corrupt upload");
        }
        return Err(WarehouseError::Corrupt {
            name: item.name.clone(),
            source,
        });
    }
    report.zim_verified = zim_verdict.is_some();

    sftp.rename(tmp_path.as_str(), final_path.as_str())
        .await
        .map_err(remote_error("rename", &tmp_path))?;
    let remote = remote_size(sftp, &final_path).await?;
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
        resumed_from = offset,
        zim_verified = report.zim_verified,
        "uploaded"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(dir: &str, name: &str) -> UploadItem {
        UploadItem {
            local: PathBuf::from("/x"),
            remote_dir: dir.to_owned(),
            name: name.to_owned(),
        }
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
