//! One authenticated SSH connection to the warehouse with its SFTP session
//! (and, on request, side sessions on further channels of it).
//!
//! Owns the russh client configuration (ciphers, keepalives, host-key
//! check, public-key login), the SFTP client's tuning and the round trip
//! measured while starting it. It must not decide what to upload.

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use russh::client::{self, AuthResult};
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{Disconnect, Preferred, cipher};
use russh_sftp::client::RawSftpSession;
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::client::rawsession::Limits;
use russh_sftp::extensions;
use russh_sftp::protocol::{FileAttributes, OpenFlags, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::WarehouseError;
use super::keys::{ClientKey, HostKeyError, HostKeyTrust};
use crate::config::WarehouseSettings;

/// Ciphers, fastest first: AES-GCM runs on the CPU's AES instructions and
/// needs no separate MAC (measured: 1 GiB in 2.7 s against 3.8 s with
/// chacha20-poly1305, russh's first choice).
const CIPHERS: &[cipher::Name] = &[
    cipher::AES_256_GCM,
    cipher::AES_128_GCM,
    cipher::CHACHA20_POLY1305,
    cipher::AES_256_CTR,
    cipher::AES_192_CTR,
    cipher::AES_128_CTR,
];
/// How long connecting, the key exchange and the login may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection that answers nothing for 3 × this is dead.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// How long one SFTP request may wait for its answer.
const SFTP_REQUEST_TIMEOUT_SECS: u64 = 60;
/// Largest SFTP write asked for; OpenSSH's server takes up to 255 KiB and
/// says so (`limits@openssh.com`), and a server that announces less gets
/// what it announces.
const SFTP_WRITE_LEN: usize = 255 * 1024;
/// Largest SFTP read asked for: OpenSSH's server sends up to 255 KiB per
/// read, and a server that announces less gets what it announces.
const SFTP_READ_LEN: u32 = 255 * 1024;

/// The russh handler: checks the host key, remembers why it refused one.
struct Handler {
    trust: Arc<HostKeyTrust>,
    refused: Arc<Mutex<Option<HostKeyError>>>,
}

impl client::Handler for Handler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // Host certificates are never asked for (`host_key_certificates`
        // stays empty), so a plain key is all a server can show.
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return Ok(false);
        };
        let trust = self.trust.clone();
        let key = key.clone();
        let verdict = tokio::task::spawn_blocking(move || trust.check(&key))
            .await
            .map_err(|_| russh::Error::Inconsistent)?;
        match verdict {
            Ok(()) => Ok(true),
            Err(e) => {
                *self.refused.lock().expect("refusal lock") = Some(e);
                Ok(false)
            }
        }
    }
}

/// A logged-in connection with SFTP ready.
pub(super) struct Connection {
    /// Shared with the side sessions opened in the background.
    handle: Arc<client::Handle<Handler>>,
    sftp: Sftp,
    /// The shorter of the channel open's and the SFTP version exchange's
    /// round trips: the link's delay.
    rtt: Duration,
    /// `host:port`, for error messages.
    addr: String,
}

/// Starts SFTP on a new session channel of `handle`; `ask_limits`: also
/// asks the server's limits, for the session that decides the writes' size.
/// Returns the session and the round trip it measured.
async fn start_sftp(
    handle: &client::Handle<Handler>,
    addr: &str,
    ask_limits: bool,
) -> Result<(Sftp, Duration), WarehouseError> {
    let opened = Instant::now();
    let channel = handle
        .channel_open_session()
        .await
        .map_err(ssh("opening a session channel"))?;
    // The server only allocates a channel: the link's round trip.
    let open_rtt = opened.elapsed();
    // No reply waited for: the version exchange right behind it says
    // whether the server started SFTP.
    channel
        .request_subsystem(false, "sftp")
        .await
        .map_err(ssh("starting the sftp subsystem"))?;
    let sftp_config = russh_sftp::client::Config {
        request_timeout_secs: SFTP_REQUEST_TIMEOUT_SECS,
        ..Default::default()
    };
    let start_failed = |e: SftpError| WarehouseError::Sftp {
        operation: "start",
        path: addr.to_owned(),
        detail: e.to_string(),
    };
    let stream = EndsWithTheConnection::new(channel.into_stream());
    let mut raw = RawSftpSession::new_with_config(stream, sftp_config);
    let asked = Instant::now();
    // The limits are asked right behind the version exchange, not after
    // its answer: a round trip less (OpenSSH's server answers in order).
    // A server without the extension says so, and that is ignored.
    let (version, limits) = if ask_limits {
        let (version, limits) = futures_util::future::join(raw.init(), raw.limits()).await;
        (version, Some(limits))
    } else {
        (raw.init().await, None)
    };
    let version = version.map_err(start_failed)?;
    // The version exchange also waited for the server to start SFTP.
    let rtt = asked.elapsed().min(open_rtt);
    let has = |name: &str| version.extensions.get(name).is_some_and(|v| v == "1");
    let mut write_len = SFTP_WRITE_LEN;
    let mut read_len = SFTP_READ_LEN;
    if let Some(limits) = limits.filter(|_| has(extensions::LIMITS)) {
        let limits = Limits::from(limits.map_err(start_failed)?);
        if let Some(len) = limits.write_len {
            write_len = write_len.min(usize::try_from(len).unwrap_or(usize::MAX));
        }
        if let Some(len) = limits.read_len {
            read_len = read_len.min(u32::try_from(len).unwrap_or(u32::MAX));
        }
        raw.set_limits(limits);
    }
    let sftp = Sftp {
        raw: Arc::new(raw),
        write_len: write_len.max(1),
        read_len: read_len.max(1),
        fsync: has(extensions::FSYNC),
    };
    Ok((sftp, rtt))
}

/// The SFTP session of a connection, cheap to clone: the requests the
/// upload makes, each answered by its own status.
#[derive(Clone)]
pub(super) struct Sftp {
    raw: Arc<RawSftpSession>,
    /// The largest write the server takes.
    write_len: usize,
    /// The largest read the server serves.
    read_len: u32,
    /// Whether the server has `fsync@openssh.com`.
    fsync: bool,
}

fn ssh(context: &'static str) -> impl Fn(russh::Error) -> WarehouseError {
    move |e| WarehouseError::Ssh {
        context,
        detail: e.to_string(),
    }
}

impl Connection {
    /// Opens a connection; `ask_limits`: also ask the server's limits, for
    /// the connection that decides the writes' size.
    pub(super) async fn open(
        settings: &WarehouseSettings,
        key: &ClientKey,
        trust: &Arc<HostKeyTrust>,
        ask_limits: bool,
    ) -> Result<Self, WarehouseError> {
        let addr = format!("{}:{}", settings.host, settings.port);
        let opening = async {
            let algorithms = {
                let trust = trust.clone();
                tokio::task::spawn_blocking(move || trust.preferred_algorithms())
                    .await
                    .unwrap_or_default()
            };
            let config = client::Config {
                preferred: Preferred {
                    cipher: Cow::Borrowed(CIPHERS),
                    key: Cow::Owned(algorithms),
                    ..Preferred::DEFAULT
                },
                keepalive_interval: Some(KEEPALIVE),
                keepalive_max: 3,
                nodelay: true,
                ..Default::default()
            };
            let refused = Arc::new(Mutex::new(None));
            let handler = Handler {
                trust: trust.clone(),
                refused: refused.clone(),
            };
            let socket = tokio::net::TcpStream::connect((settings.host.as_str(), settings.port))
                .await
                .map_err(|e| WarehouseError::Connect {
                    addr: addr.clone(),
                    detail: e.to_string(),
                })?;
            let _ = socket.set_nodelay(true);
            let mut handle = match client::connect_stream(Arc::new(config), socket, handler).await {
                Ok(handle) => handle,
                Err(e) => {
                    if let Some(refusal) = refused.lock().expect("refusal lock").take() {
                        return Err(refusal.into());
                    }
                    return Err(WarehouseError::Connect {
                        addr: addr.clone(),
                        detail: format!("SSH handshake failed: {e}"),
                    });
                }
            };

            let hash = if key.is_rsa() {
                handle
                    .best_supported_rsa_hash()
                    .await
                    .map_err(ssh("asking which RSA signatures the server takes"))?
                    .flatten()
            } else {
                None
            };
            let auth = handle
                .authenticate_publickey(
                    settings.username.clone(),
                    PrivateKeyWithHashAlg::new(key.private(), hash),
                )
                .await
                .map_err(ssh("logging in"))?;
            if !matches!(auth, AuthResult::Success) {
                return Err(WarehouseError::AuthRejected {
                    user: settings.username.clone(),
                    key_path: key.path().display().to_string(),
                    algorithm: key.algorithm(),
                    fingerprint: key.sha256_fingerprint(),
                });
            }
            let (sftp, rtt) = start_sftp(&handle, &addr, ask_limits).await?;
            tracing::debug!(%addr, user = %settings.username, rtt_ms = rtt.as_secs_f64() * 1e3, "connected to the warehouse");
            Ok(Self {
                handle: Arc::new(handle),
                sftp,
                rtt,
                addr: addr.clone(),
            })
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, opening).await {
            Ok(result) => result,
            Err(_) => Err(WarehouseError::Connect {
                addr,
                detail: format!("no SSH session within {} s", CONNECT_TIMEOUT.as_secs()),
            }),
        }
    }

    /// Opens, when awaited, a second SFTP session on this connection: its
    /// own channel, served by its own server process, so what it asks
    /// does not wait behind the writes of the first.
    pub(super) fn side_session(
        &self,
    ) -> impl Future<Output = Result<Sftp, WarehouseError>> + Send + 'static {
        let (handle, addr) = (self.handle.clone(), self.addr.clone());
        async move { Ok(start_sftp(&handle, &addr, false).await?.0) }
    }

    pub(super) fn sftp(&self) -> &Sftp {
        &self.sftp
    }

    /// The round trip measured while starting SFTP.
    pub(super) fn rtt(&self) -> Duration {
        self.rtt
    }

    /// Whether the SSH connection has ended.
    pub(super) fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Ends the SFTP session and the connection politely.
    pub(super) async fn close(self) {
        let _ = self.sftp.raw.close_session();
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "upload done", "en")
            .await;
    }
}

impl Sftp {
    /// The largest write the server takes.
    pub(super) fn write_len(&self) -> usize {
        self.write_len
    }

    /// The largest read the server serves.
    pub(super) fn read_len(&self) -> u32 {
        self.read_len
    }

    /// The size of `path`, or `None` when it does not exist.
    pub(super) async fn size(&self, path: &str) -> Result<Option<u64>, SftpError> {
        match self.raw.stat(path).await {
            Ok(attrs) => Ok(Some(attrs.attrs.size.unwrap_or(0))),
            Err(SftpError::Status(s)) if s.status_code == StatusCode::NoSuchFile => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether `path` is there and a directory; `None` when it is absent.
    pub(super) async fn is_dir(&self, path: &str) -> Result<Option<bool>, SftpError> {
        match self.raw.stat(path).await {
            Ok(attrs) => Ok(Some(attrs.attrs.is_dir())),
            Err(SftpError::Status(s)) if s.status_code == StatusCode::NoSuchFile => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(super) async fn mkdir(&self, path: &str) -> Result<(), SftpError> {
        self.raw.mkdir(path, FileAttributes::default()).await?;
        Ok(())
    }

    pub(super) async fn rename(&self, from: &str, to: &str) -> Result<(), SftpError> {
        self.raw.rename(from, to).await?;
        Ok(())
    }

    pub(super) async fn remove(&self, path: &str) -> Result<(), SftpError> {
        self.raw.remove(path).await?;
        Ok(())
    }

    /// Opens `path` for writing: created when absent, emptied when
    /// `truncate`, else left as it is (other streams write other ranges).
    pub(super) async fn open_for_write(
        &self,
        path: &str,
        create: bool,
        truncate: bool,
    ) -> Result<String, SftpError> {
        let mut flags = OpenFlags::WRITE;
        if create {
            flags |= OpenFlags::CREATE;
        }
        if truncate {
            flags |= OpenFlags::TRUNCATE;
        }
        let handle = self
            .raw
            .open(path, flags, FileAttributes::default())
            .await?;
        Ok(handle.handle)
    }

    /// Opens `path` for reading only.
    pub(super) async fn open_for_read(&self, path: &str) -> Result<String, SftpError> {
        let handle = self
            .raw
            .open(path, OpenFlags::READ, FileAttributes::default())
            .await?;
        Ok(handle.handle)
    }

    /// Reads up to `len` bytes at `offset` (the server may send fewer);
    /// empty at the end of the file.
    pub(super) async fn read(
        &self,
        handle: &str,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, SftpError> {
        match self.raw.read(handle, offset, len.min(self.read_len)).await {
            Ok(data) => Ok(data.data),
            Err(SftpError::Status(s)) if s.status_code == StatusCode::Eof => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Writes `data` at `offset`; returns once the server's status says
    /// it is written.
    pub(super) async fn write(
        &self,
        handle: &str,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<(), SftpError> {
        self.raw.write(handle, offset, data).await?;
        Ok(())
    }

    pub(super) async fn close(&self, handle: &str) -> Result<(), SftpError> {
        self.raw.close(handle).await?;
        Ok(())
    }

    /// Whether the server can sync a file to its disk (`fsync@openssh.com`).
    pub(super) fn can_sync(&self) -> bool {
        self.fsync
    }

    /// Asks the server to write what it has of the file to its disk.
    pub(super) async fn sync(&self, handle: &str) -> Result<(), SftpError> {
        self.raw.fsync(handle).await?;
        Ok(())
    }

    /// Cuts an open file to `len` bytes (0: empties it).
    pub(super) async fn truncate(&self, handle: &str, len: u64) -> Result<(), SftpError> {
        let attrs = FileAttributes {
            size: Some(len),
            ..FileAttributes::empty()
        };
        self.raw.fsetstat(handle, attrs).await?;
        Ok(())
    }

    /// Syncs the file to the server's disk where the server can, closes
    /// it, renames `from` to `to` and asks `to`'s size: asked together, in
    /// one round trip, as the server answers in order. The size is that of
    /// the renamed file when the rename worked.
    pub(super) async fn publish(
        &self,
        handle: &str,
        from: &str,
        to: &str,
    ) -> (Result<(), SftpError>, Result<Option<u64>, SftpError>) {
        let sync = async {
            if self.fsync {
                self.sync(handle).await
            } else {
                Ok(())
            }
        };
        let (synced, closed, renamed, size) = tokio::join!(
            sync,
            self.raw.close(handle),
            self.rename(from, to),
            self.size(to)
        );
        let done = synced.and(closed.map(drop)).and(renamed);
        (done, size)
    }
}

/// The SFTP byte stream over the session channel, made to fail writes once
/// the connection is gone.
///
/// russh's channel writer (0.65) waits for window space without watching
/// the connection: when the connection dies while the window is spent,
/// which is the usual state in the middle of an upload, it waits forever,
/// and russh-sftp's writer task with it, holding every write queued behind
/// it (then up to 16 MiB with 64 writes of 256 KiB in flight) for the life
/// of the process: the soak measured about 11 MiB more RSS after each cut
/// upload. The read side does see the end (EOF or an error), so from then
/// on writes fail with `BrokenPipe`, and a write already waiting is woken.
///
/// The two halves russh-sftp splits it into (`tokio::io::split`) poll it
/// one at a time under split's lock, so plain fields are enough.
struct EndsWithTheConnection<S> {
    inner: S,
    /// Set by the read side at EOF or on a read error.
    gone: bool,
    /// The writer's waker, woken when `gone` is set.
    waiting_writer: Option<Waker>,
}

fn connection_gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the SSH connection to the warehouse is gone",
    )
}

impl<S> EndsWithTheConnection<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            gone: false,
            waiting_writer: None,
        }
    }

    fn set_gone(&mut self) {
        self.gone = true;
        if let Some(waker) = self.waiting_writer.take() {
            waker.wake();
        }
    }

    /// Remembers the writer's waker; reports whether the stream is gone.
    fn watch(&mut self, cx: &Context<'_>) -> bool {
        self.waiting_writer = Some(cx.waker().clone());
        self.gone
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for EndsWithTheConnection<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let asked = buf.remaining() > 0;
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        match &polled {
            Poll::Ready(Err(_)) => self.set_gone(),
            Poll::Ready(Ok(())) if asked && buf.filled().len() == before => self.set_gone(),
            _ => {}
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for EndsWithTheConnection<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.watch(cx) {
            return Poll::Ready(Err(connection_gone()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.watch(cx) {
            return Poll::Ready(Err(connection_gone()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.watch(cx) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A channel whose window is spent for good (writes never proceed)
    /// and whose read side ends when `closed` is set: what russh's channel
    /// stream looks like once its connection died mid-upload.
    struct Spent {
        closed: Arc<AtomicBool>,
        reader: Arc<Mutex<Option<Waker>>>,
    }

    impl AsyncRead for Spent {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            _buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.closed.load(Ordering::Acquire) {
                return Poll::Ready(Ok(()));
            }
            *self.reader.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    impl AsyncWrite for Spent {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            _buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Pending
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn a_write_waiting_for_window_fails_once_the_connection_ends() {
        let closed = Arc::new(AtomicBool::new(false));
        let reader = Arc::new(Mutex::new(None::<Waker>));
        let stream = EndsWithTheConnection::new(Spent {
            closed: closed.clone(),
            reader: reader.clone(),
        });
        // As russh-sftp uses it: one task reads, one writes.
        let (mut rd, mut wr) = tokio::io::split(stream);
        let writer = tokio::spawn(async move { wr.write_all(&[7u8; 1024]).await });
        let reading = tokio::spawn(async move {
            let mut byte = [0u8; 1];
            rd.read(&mut byte).await
        });

        // While the connection lives, the write waits, as it should.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!writer.is_finished(), "the write did not wait for window");

        closed.store(true, Ordering::Release);
        if let Some(w) = reader.lock().unwrap().take() {
            w.wake();
        }
        assert_eq!(reading.await.unwrap().unwrap(), 0, "the read side ends");
        let written = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the waiting write was never woken")
            .unwrap();
        let error = written.expect_err("a write after the end succeeded");
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);
        assert!(error.to_string().contains("warehouse is gone"), "{error}");
    }

    #[tokio::test]
    async fn bytes_pass_through_unchanged_both_ways() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut stream = EndsWithTheConnection::new(near);
        stream.write_all(b"sftp packet").await.unwrap();
        let mut got = [0u8; 11];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"sftp packet");
        far.write_all(b"reply").await.unwrap();
        let mut back = [0u8; 5];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"reply");
        // An empty read buffer is not the end of the stream.
        let mut none = [0u8; 0];
        assert_eq!(stream.read(&mut none).await.unwrap(), 0);
        stream.write_all(b"more").await.unwrap();
    }
}
