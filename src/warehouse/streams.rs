//! The streams of one file's upload: one reader in file order that hashes
//! the ZIM and hands out the pieces still missing in the warehouse, and up
//! to UPLOAD_STREAMS SSH connections, each with its own SFTP handle on the
//! same `<name>.tmp`, writing those pieces at their offsets.
//!
//! Owns a piece's way from the local disk to its OK status: the read-ahead,
//! the writes in flight per stream, handing back what a cut stream had in
//! flight (in offset order, so that one stream alone still writes in file
//! order), reconnecting a stream on its own with backoff, and the staggered
//! start of the extra connections. It must not decide what is missing,
//! write the journal, rename or judge the ZIM: it reports events and the
//! reader's verdict to the caller, which does.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::session::{Connection, Sftp};
use super::zim::{ZimChecksum, ZimError};
use super::{Warehouse, WarehouseError};

/// Bytes one stream keeps in flight: OpenSSH's server takes 2 MiB per
/// session channel per round trip, and twice that keeps the channel full
/// while statuses travel back.
const STREAM_IN_FLIGHT: usize = 4 << 20;
/// Pieces read ahead of the streams, shared by all of them.
const READ_AHEAD_BYTES: usize = 4 << 20;
/// Extra connections in their handshake at once: sshd's `MaxStartups`
/// starts refusing at 10 unauthenticated connections by default.
const MAX_PENDING: usize = 8;

/// A range of the file and its bytes: one SFTP write.
#[derive(Debug)]
pub(super) struct Piece {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// What the streams tell the upload.
#[derive(Debug)]
pub(super) enum Event {
    /// The warehouse said OK to the write of this range.
    Confirmed { offset: u64, len: u64 },
    /// A stream is writing (again, after `reconnect`).
    Up { stream: usize, reconnect: bool },
    /// A stream broke; what it had in flight is handed to the others, and
    /// it tries again after `retry_in`.
    Down {
        stream: usize,
        error: WarehouseError,
        retry_in: Duration,
    },
    /// An extra connection the warehouse did not take: not an error, the
    /// upload goes on with fewer streams.
    Refused { stream: usize },
    /// A stream gave up after UPLOAD_RETRIES failures without progress.
    Gone {
        stream: usize,
        error: WarehouseError,
    },
    /// What a broken stream had in flight could not be read again.
    Unreadable(String),
}

/// How the reader ended.
#[derive(Debug)]
pub(super) enum ReadEnd {
    /// The whole file was read (or, without a ZIM to hash, the part that
    /// was to be sent): its size then, and the ZIM verdict.
    Done {
        size: u64,
        zim: Option<Result<(), ZimError>>,
    },
    Failed(String),
}

/// Reads `file` (by offset: its position is never used) on a blocking
/// thread, from byte 0 when it hashes a ZIM
/// (else from the first missing byte), in blocks of `piece_len` aligned on
/// the file, and sends the parts of each block that lie in `missing`.
/// Stops early when every receiver is gone.
pub(super) fn spawn_reader(
    file: Arc<File>,
    missing: Vec<Range<u64>>,
    piece_len: usize,
    zim: bool,
) -> (async_channel::Receiver<Piece>, oneshot::Receiver<ReadEnd>) {
    let (tx, rx) = async_channel::bounded((READ_AHEAD_BYTES / piece_len.max(1)).max(2));
    let (end_tx, end_rx) = oneshot::channel();
    tokio::task::spawn_blocking(move || {
        let end = match read_file(&file, &missing, piece_len.max(1), zim, &tx) {
            Ok(Some(end)) => end,
            Ok(None) => return,
            Err(e) => ReadEnd::Failed(e.to_string()),
        };
        let _ = end_tx.send(end);
    });
    (rx, end_rx)
}

/// The reader thread's loop; `None` when the receivers went away.
fn read_file(
    file: &File,
    missing: &[Range<u64>],
    piece_len: usize,
    zim: bool,
    tx: &async_channel::Sender<Piece>,
) -> std::io::Result<Option<ReadEnd>> {
    let mut checksum = zim.then(ZimChecksum::new);
    let first = if zim {
        0
    } else {
        match missing.first() {
            Some(r) => r.start - r.start % piece_len as u64,
            None => {
                let size = file.metadata()?.len();
                return Ok(Some(ReadEnd::Done { size, zim: None }));
            }
        }
    };
    let mut pos = first;
    let mut next = 0; // the first range of `missing` that may lie ahead
    let mut buf = Vec::with_capacity(piece_len);
    loop {
        // Read into the spare capacity: no zeroing of every byte first.
        buf.clear();
        ReadAt { file, pos }
            .take(piece_len as u64)
            .read_to_end(&mut buf)?;
        let filled = buf.len();
        if filled == 0 {
            break;
        }
        if let Some(c) = checksum.as_mut() {
            c.update(&buf[..filled]);
        }
        let block = pos..pos + filled as u64;
        while next < missing.len() && missing[next].end <= block.start {
            next += 1;
        }
        let mut i = next;
        while i < missing.len() && missing[i].start < block.end {
            let start = missing[i].start.max(block.start);
            let end = missing[i].end.min(block.end);
            let data = if start == block.start && end == block.end {
                // The whole block, the usual case: handed over, not copied.
                std::mem::replace(&mut buf, Vec::with_capacity(piece_len))
            } else {
                buf[(start - pos) as usize..(end - pos) as usize].to_vec()
            };
            if tx
                .send_blocking(Piece {
                    offset: start,
                    data,
                })
                .is_err()
            {
                return Ok(None);
            }
            i += 1;
        }
        pos = block.end;
        if checksum.is_none() && missing.last().is_none_or(|r| r.end <= pos) {
            // Nothing more to send and nothing to hash: the size is the
            // file's, as it is now.
            let size = file.metadata()?.len();
            return Ok(Some(ReadEnd::Done { size, zim: None }));
        }
    }
    Ok(Some(ReadEnd::Done {
        size: pos,
        zim: checksum.map(ZimChecksum::finish),
    }))
}

/// `Read` over a file from `pos` on, by offset (`pread`): the one
/// descriptor of an upload is shared by the reader and the hand-back.
struct ReadAt<'a> {
    file: &'a File,
    pos: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// What every stream of one upload shares.
#[derive(Clone)]
pub(super) struct Shared {
    pub warehouse: Warehouse,
    /// The local file (the upload's one descriptor), read again for what
    /// a broken stream had in flight.
    pub local: Arc<File>,
    /// The remote `<name>.tmp`.
    pub path: String,
    pub fresh: async_channel::Receiver<Piece>,
    pub again_tx: async_channel::Sender<Piece>,
    pub again_rx: async_channel::Receiver<Piece>,
    pub events: mpsc::UnboundedSender<Event>,
    /// Set once every piece is confirmed: the streams close their handles.
    pub stop: CancellationToken,
}

impl Shared {
    fn tell(&self, event: Event) {
        let _ = self.events.send(event);
    }
}

fn remote_error(path: &str) -> impl Fn(russh_sftp::client::error::Error) -> WarehouseError {
    let path = path.to_owned();
    move |e| WarehouseError::Sftp {
        operation: "write",
        path: path.clone(),
        detail: e.to_string(),
    }
}

/// How a stream gets its first connection.
pub(super) enum Start {
    /// The upload's own connection, with the file's handle open on it.
    Main(Sftp, String),
    /// An extra connection of the batch, idle since its last file.
    Idle(Connection),
    /// The next extra connection the pool opens; none left: refused.
    Pool(async_channel::Receiver<Connection>),
}

/// How a stream ended: closing its handle, its own connection, still
/// good, for the next file, and the upload's own handle, left open for the
/// caller to sync and publish the file with (stream 0, when it never broke).
pub(super) struct StreamEnd {
    pub closed: Result<(), WarehouseError>,
    pub conn: Option<Connection>,
    pub kept: Option<String>,
}

impl StreamEnd {
    fn quiet() -> Self {
        Self {
            closed: Ok(()),
            conn: None,
            kept: None,
        }
    }
}

/// One stream: writes pieces until `stop`, reconnecting after a failure.
pub(super) async fn run_stream(stream: usize, shared: Shared, start: Start) -> StreamEnd {
    let mut link: Option<(Sftp, String)> = None;
    let mut owned: Option<Connection> = None;
    let mut waiting: Option<Connection> = None;
    // Still on the upload's own connection and handle.
    let mut on_main = false;
    match start {
        Start::Main(sftp, handle) => {
            link = Some((sftp, handle));
            on_main = true;
        }
        Start::Idle(conn) => waiting = Some(conn),
        Start::Pool(pool) => {
            tokio::select! {
                conn = pool.recv() => match conn {
                    Ok(conn) => waiting = Some(conn),
                    Err(_) => {
                        shared.tell(Event::Refused { stream });
                        return StreamEnd::quiet();
                    }
                },
                _ = shared.stop.cancelled() => return StreamEnd::quiet(),
            }
        }
    }
    let mut retry = shared.warehouse.retry();
    let mut fresh_open = true;
    let mut reconnect = false;
    loop {
        let mut progressed = false;
        let failure = match link.take() {
            Some((sftp, handle)) => {
                match pump(&sftp, &handle, &shared, &mut fresh_open, &mut progressed).await {
                    Ok(()) if on_main => {
                        return StreamEnd {
                            kept: Some(handle),
                            ..StreamEnd::quiet()
                        };
                    }
                    Ok(()) => {
                        // Every write of it is confirmed; the caller syncs
                        // the file through its own handle.
                        let closed = sftp
                            .close(&handle)
                            .await
                            .map_err(remote_error(&shared.path));
                        let conn = owned.take().filter(|_| closed.is_ok());
                        return StreamEnd {
                            closed,
                            conn,
                            kept: None,
                        };
                    }
                    Err((error, back)) => {
                        owned = None;
                        on_main = false;
                        if let Err(e) = hand_back(&shared, back).await {
                            // Those ranges cannot be sent: the upload fails,
                            // and says why.
                            shared.tell(Event::Unreadable(e));
                            return StreamEnd::quiet();
                        }
                        error
                    }
                }
            }
            None => {
                let opened = tokio::select! {
                    r = open_handle(&shared, waiting.take()) => r,
                    _ = shared.stop.cancelled() => return StreamEnd::quiet(),
                };
                match opened {
                    Ok((conn, handle)) => {
                        shared.tell(Event::Up { stream, reconnect });
                        link = Some((conn.sftp().clone(), handle));
                        owned = Some(conn);
                        continue;
                    }
                    Err(error) => error,
                }
            }
        };
        reconnect = true;
        if progressed {
            retry.reset();
        }
        let delay = match retry.failed() {
            Some(delay) if !failure.is_permanent() => delay,
            _ => {
                shared.tell(Event::Gone {
                    stream,
                    error: failure,
                });
                return StreamEnd::quiet();
            }
        };
        shared.tell(Event::Down {
            stream,
            error: failure,
            retry_in: delay,
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shared.stop.cancelled() => return StreamEnd::quiet(),
        }
    }
}

/// Opens the file on `conn`, or on a new connection.
async fn open_handle(
    shared: &Shared,
    conn: Option<Connection>,
) -> Result<(Connection, String), WarehouseError> {
    let conn = match conn {
        Some(conn) => conn,
        None => shared.warehouse.connect_extra().await?,
    };
    let handle = conn
        .sftp()
        .open_for_write(&shared.path, false, false)
        .await
        .map_err(|e| WarehouseError::Sftp {
            operation: "open",
            path: shared.path.clone(),
            detail: e.to_string(),
        })?;
    Ok((conn, handle))
}

/// The extra connections of one batch of uploads: opened in the
/// background, at most [`MAX_PENDING`] handshakes at a time (sshd's
/// `MaxStartups` refuses bursts), kept between files, closed at the end.
pub(super) struct Extras {
    pool: async_channel::Receiver<Connection>,
    opener: Option<tokio::task::JoinHandle<()>>,
    idle: Vec<Connection>,
}

impl Extras {
    pub(super) fn none() -> Self {
        let (_, pool) = async_channel::unbounded();
        Self {
            pool,
            opener: None,
            idle: Vec::new(),
        }
    }

    /// Whether connections were asked for already.
    pub(super) fn started(&self) -> bool {
        self.opener.is_some()
    }

    /// Starts opening `n` connections; those the warehouse refuses are not
    /// tried again (the upload goes on with fewer).
    pub(super) fn open(&mut self, warehouse: &Warehouse, n: usize) {
        let (tx, pool) = async_channel::unbounded();
        let warehouse = warehouse.clone();
        self.pool = pool;
        self.opener = Some(tokio::spawn(async move {
            let mut opening = tokio::task::JoinSet::new();
            let mut asked = 0;
            while asked < n || !opening.is_empty() {
                while asked < n && opening.len() < MAX_PENDING {
                    let warehouse = warehouse.clone();
                    opening.spawn(async move { warehouse.connect_extra().await });
                    asked += 1;
                }
                let Some(Ok(opened)) = opening.join_next().await else {
                    continue;
                };
                match opened {
                    Ok(conn) => {
                        if tx.send(conn).await.is_err() {
                            return;
                        }
                    }
                    Err(error) => {
                        tracing::debug!(%error, "the warehouse did not take another connection");
                    }
                }
            }
        }));
    }

    /// Where extra stream `k` gets its connection.
    pub(super) fn start(&mut self) -> Start {
        match self.idle.pop() {
            Some(conn) => Start::Idle(conn),
            None => Start::Pool(self.pool.clone()),
        }
    }

    pub(super) fn give_back(&mut self, conn: Connection) {
        self.idle.push(conn);
    }

    /// Closes every extra connection, idle or not taken yet.
    pub(super) async fn close(mut self) {
        if let Some(opener) = self.opener.take() {
            opener.abort();
        }
        let idle = std::mem::take(&mut self.idle);
        for conn in idle {
            conn.close().await;
        }
        while let Ok(conn) = self.pool.try_recv() {
            conn.close().await;
        }
    }
}

impl Drop for Extras {
    fn drop(&mut self) {
        if let Some(opener) = self.opener.take() {
            opener.abort();
        }
    }
}

/// The ranges a broken stream had in flight go back, read again from the
/// local file (its page cache, usually), lowest offset first: the bytes in
/// flight are not kept twice meanwhile.
async fn hand_back(shared: &Shared, mut back: Vec<(u64, usize)>) -> Result<(), String> {
    back.sort_unstable();
    let local = shared.local.clone();
    let pieces = tokio::task::spawn_blocking(move || {
        back.into_iter()
            .map(|(offset, len)| {
                let mut data = vec![0u8; len];
                local.read_exact_at(&mut data, offset)?;
                Ok(Piece { offset, data })
            })
            .collect::<std::io::Result<Vec<Piece>>>()
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("cannot read it again: {e}"))?;
    for piece in pieces {
        // Unbounded, and this stream holds a receiver: it cannot fail.
        let _ = shared.again_tx.try_send(piece);
    }
    Ok(())
}

/// Writes pieces over one handle until `stop` with nothing in flight (Ok),
/// or the first failure: then the error and every range not confirmed.
async fn pump(
    sftp: &Sftp,
    handle: &str,
    shared: &Shared,
    fresh_open: &mut bool,
    progressed: &mut bool,
) -> Result<(), (WarehouseError, Vec<(u64, usize)>)> {
    // offset -> length of each write in flight: the bytes themselves are
    // only in the write on its way.
    let mut pending: HashMap<u64, usize> = HashMap::new();
    let mut in_flight = FuturesUnordered::new();
    let mut bytes = 0usize;
    let handle: std::sync::Arc<str> = handle.into();
    loop {
        let room = bytes < STREAM_IN_FLIGHT;
        let piece = tokio::select! {
            biased;
            Some((offset, result)) = in_flight.next(), if !in_flight.is_empty() => {
                let len = pending.remove(&offset).expect("a piece in flight");
                bytes -= len;
                match result {
                    Ok(()) => {
                        *progressed = true;
                        shared.tell(Event::Confirmed { offset, len: len as u64 });
                        continue;
                    }
                    Err(e) => {
                        let mut back: Vec<(u64, usize)> = pending.into_iter().collect();
                        back.push((offset, len));
                        return Err((remote_error(&shared.path)(e), back));
                    }
                }
            }
            _ = shared.stop.cancelled(), if in_flight.is_empty() => return Ok(()),
            Ok(piece) = shared.again_rx.recv(), if room => piece,
            r = shared.fresh.recv(), if room && *fresh_open => match r {
                Ok(piece) => piece,
                Err(_) => {
                    *fresh_open = false;
                    continue;
                }
            },
        };
        let Piece { offset, data } = piece;
        bytes += data.len();
        pending.insert(offset, data.len());
        let (sftp, handle) = (sftp.clone(), handle.clone());
        in_flight.push(async move { (offset, sftp.write(&handle, offset, data).await) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&data).unwrap();
        (f, data)
    }

    async fn read_all(
        path: std::path::PathBuf,
        missing: Vec<Range<u64>>,
        piece_len: usize,
        zim: bool,
    ) -> (Vec<Piece>, ReadEnd) {
        let file = Arc::new(File::open(path).unwrap());
        let (rx, end) = spawn_reader(file, missing, piece_len, zim);
        let mut pieces = Vec::new();
        while let Ok(p) = rx.recv().await {
            pieces.push(p);
        }
        (pieces, end.await.unwrap())
    }

    #[tokio::test]
    async fn the_reader_sends_exactly_the_missing_bytes() {
        let (f, data) = file_of(10_000);
        let missing = vec![5..17, 1000..1003, 4090..6000, 9999..10_000];
        let (pieces, end) = read_all(f.path().to_owned(), missing.clone(), 1024, false).await;
        let mut sent = Vec::new();
        for p in &pieces {
            assert!(p.data.len() <= 1024);
            assert_eq!(
                &data[p.offset as usize..p.offset as usize + p.data.len()],
                &p.data[..]
            );
            sent.push(p.offset..p.offset + p.data.len() as u64);
        }
        let mut covered = super::super::journal::Ranges::new();
        for r in &sent {
            covered.insert(r.clone());
        }
        assert_eq!(covered.missing(10_000), {
            let mut all = super::super::journal::Ranges::new();
            for r in missing {
                all.insert(r);
            }
            all.missing(10_000)
        });
        assert!(matches!(
            end,
            ReadEnd::Done {
                size: 10_000,
                zim: None
            }
        ));
    }

    #[tokio::test]
    async fn nothing_missing_sends_nothing_and_still_tells_the_size() {
        let (f, _) = file_of(3000);
        let (pieces, end) = read_all(f.path().to_owned(), vec![], 1024, false).await;
        assert!(pieces.is_empty());
        assert!(matches!(
            end,
            ReadEnd::Done {
                size: 3000,
                zim: None
            }
        ));
    }

    #[tokio::test]
    async fn a_zim_is_read_whole_for_its_checksum_even_when_little_is_sent() {
        let (f, _) = file_of(5000);
        let (pieces, end) = read_all(
            f.path().to_owned(),
            std::iter::once(4000..4100).collect(),
            1024,
            true,
        )
        .await;
        // The range straddles two blocks of the file: two pieces.
        let sent: Vec<_> = pieces.iter().map(|p| (p.offset, p.data.len())).collect();
        assert_eq!(sent, [(4000, 96), (4096, 4)]);
        // Not a ZIM: the verdict is an error, but it is there, after the
        // whole file.
        assert!(matches!(
            end,
            ReadEnd::Done {
                size: 5000,
                zim: Some(Err(_))
            }
        ));
    }

    #[tokio::test]
    async fn an_unreadable_file_is_a_read_failure() {
        // Open for writing only: every read fails.
        let (f, _) = file_of(3000);
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .write(true)
                .open(f.path())
                .unwrap(),
        );
        let (rx, end) = spawn_reader(file, std::iter::once(0..10).collect(), 1024, false);
        while rx.recv().await.is_ok() {}
        assert!(matches!(end.await.unwrap(), ReadEnd::Failed(_)));
    }
}
