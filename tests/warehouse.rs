//! The warehouse uploader against a real OpenSSH sshd on 127.0.0.1 (one per
//! test, chrooted, pubkey only; see `tests/common/sshd.rs`): key formats,
//! host-key trust, content identity, resume after a cut, ZIM integrity,
//! skips, conflicts and refusals, and files planted in the warehouse by
//! someone else (never trusted: only a journal or a read-back vouches).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::ThrottleProxy;
use common::sshd::{KeyKind, Sshd};
use tokio_util::sync::CancellationToken;
use zimfarm_worker::config::WarehouseSettings;
use zimfarm_worker::taskfs::OwnFile;
use zimfarm_worker::warehouse::{
    HostKeyError, KeyError, UploadItem, UploadReport, Warehouse, WarehouseError,
};

fn settings(sshd: &Sshd, key: PathBuf, port: u16, known_hosts: PathBuf) -> WarehouseSettings {
    WarehouseSettings {
        host: "127.0.0.1".to_owned(),
        port,
        username: sshd.user().to_owned(),
        ssh_key: key,
        known_hosts,
        host_key_pins: Vec::new(),
        upload_retries: 3,
        upload_streams: zimfarm_worker::config::UploadStreams::Auto,
    }
}

/// A warehouse client for `sshd` (through `port`, which may be a proxy's)
/// that trusts the server's real host key.
async fn client(sshd: &Sshd, port: u16) -> Warehouse {
    let mut s = settings(
        sshd,
        sshd.user_key(KeyKind::Ed25519),
        port,
        sshd.known_hosts_file_for_port(port),
    );
    // 0.2 + 0.4 + ... + 6.4 s: rides out a restart of a few seconds.
    s.upload_retries = 6;
    Warehouse::new(s)
        .await
        .unwrap()
        .with_first_backoff(Duration::from_millis(200))
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// A file of `size` bytes that does not compress (an xorshift stream).
fn write_noise(path: &Path, size: u64, seed: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = seed | 1;
    let mut left = size;
    let mut buf = [0u8; 8];
    while left > 0 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf.copy_from_slice(&x.to_le_bytes());
        let n = left.min(8) as usize;
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
}

/// A real ZIM file made by libzim (the venv's), with its MD5 checksum.
fn make_zim(path: &Path) {
    let script = common::repo_root().join("tests/images/make_zim.py");
    common::run_ok(
        Command::new(common::python()).arg(&script).arg(path),
        "make_zim.py",
    );
}

/// Writes `from` to `to` with its middle byte flipped: a ZIM that fails
/// its checksum.
fn write_flipped(from: &Path, to: &Path) {
    let mut bytes = std::fs::read(from).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(to, &bytes).unwrap();
}

/// Every file under the chroot whose name ends with `.tmp`.
fn tmp_files(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.to_string_lossy().ends_with(".tmp") {
                found.push(path);
            }
        }
    }
    found
}

async fn upload(w: &Warehouse, items: &[UploadItem]) -> Result<Vec<UploadReport>, WarehouseError> {
    w.upload(items, &CancellationToken::new()).await
}

#[tokio::test]
async fn every_supported_key_format_logs_in() {
    let sshd = Sshd::start();
    for kind in [
        KeyKind::Ed25519,
        KeyKind::RsaOpenssh,
        KeyKind::RsaPem,
        KeyKind::RsaPkcs8,
    ] {
        let s = settings(
            &sshd,
            sshd.user_key(kind),
            sshd.port(),
            sshd.known_hosts_file(),
        );
        let w = Warehouse::new(s)
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        w.probe().await.unwrap_or_else(|e| panic!("{kind:?}: {e}"));
    }
    // The RSA logins were signed with SHA-2, which OpenSSH 8.8+ requires.
    let log = sshd.log_text();
    assert!(
        log.contains("RSA SHA256:") || log.contains("rsa-sha2-"),
        "{log}"
    );
}

#[tokio::test]
async fn encrypted_and_missing_keys_fail_at_load() {
    let sshd = Sshd::start();
    let s = settings(
        &sshd,
        sshd.user_key(KeyKind::EncryptedEd25519),
        sshd.port(),
        sshd.known_hosts_file(),
    );
    let e = Warehouse::new(s).await.unwrap_err();
    assert!(matches!(e, KeyError::Encrypted { .. }), "{e}");
    assert!(e.to_string().contains("passphrase"), "{e}");

    let s = settings(
        &sshd,
        PathBuf::from("/nonexistent/id_rsa"),
        sshd.port(),
        sshd.known_hosts_file(),
    );
    let e = Warehouse::new(s).await.unwrap_err();
    assert!(matches!(e, KeyError::Missing { .. }), "{e}");
}

#[tokio::test]
async fn unknown_changed_and_pinned_host_keys() {
    let sshd = Sshd::start();
    let key = sshd.user_key(KeyKind::Ed25519);
    let fp = sshd.host_key_fingerprint().to_owned();

    // No known_hosts at all: refused, showing the fingerprint and the fix.
    let s = settings(
        &sshd,
        key.clone(),
        sshd.port(),
        PathBuf::from("/nonexistent/kh"),
    );
    let e = Warehouse::new(s).await.unwrap().probe().await.unwrap_err();
    assert!(e.is_permanent());
    match &e {
        WarehouseError::HostKey(HostKeyError::Unknown { fingerprint, .. }) => {
            assert_eq!(*fingerprint, fp)
        }
        other => panic!("expected an unknown host key, got {other}"),
    }
    assert!(
        e.to_string().contains(&format!("WAREHOUSE_HOST_KEY={fp}")),
        "{e}"
    );

    // known_hosts records another key for this host: refused as changed.
    let s = settings(
        &sshd,
        key.clone(),
        sshd.port(),
        sshd.wrong_known_hosts_file(),
    );
    let e = Warehouse::new(s).await.unwrap().probe().await.unwrap_err();
    assert!(
        matches!(
            e,
            WarehouseError::HostKey(HostKeyError::Changed { line: 1, .. })
        ),
        "{e}"
    );

    // Pinned by fingerprint: accepted without any known_hosts.
    let mut s = settings(
        &sshd,
        key.clone(),
        sshd.port(),
        PathBuf::from("/nonexistent/kh"),
    );
    s.host_key_pins = vec![fp.clone()];
    Warehouse::new(s).await.unwrap().probe().await.unwrap();

    // A wrong pin does not help.
    let mut s = settings(&sshd, key, sshd.port(), PathBuf::from("/nonexistent/kh"));
    s.host_key_pins = vec![format!("SHA256:{}", "A".repeat(43))];
    let e = Warehouse::new(s).await.unwrap().probe().await.unwrap_err();
    assert!(matches!(e, WarehouseError::HostKey(_)), "{e}");
}

#[tokio::test]
async fn a_key_the_server_does_not_accept_is_a_clear_error() {
    let sshd = Sshd::start();
    let s = settings(
        &sshd,
        sshd.unauthorized_key(),
        sshd.port(),
        sshd.known_hosts_file(),
    );
    let w = Warehouse::new(s).await.unwrap();
    let e = w.probe().await.unwrap_err();
    assert!(e.is_permanent());
    let text = e.to_string();
    assert!(
        matches!(e, WarehouseError::AuthRejected { .. })
            && text.contains("zimfarm-sftp")
            && text.contains(&w.key().sha256_fingerprint()),
        "{text}"
    );
    // An upload gives up at once on it, without retrying.
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("a.bin");
    write_noise(&local, 10, 1);
    let started = Instant::now();
    let e = upload(&w, &[UploadItem::output(local, "/t", "a.bin")])
        .await
        .unwrap_err();
    assert!(matches!(e, WarehouseError::AuthRejected { .. }), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn content_arrives_identical_empty_large_and_unicode_names() {
    let sshd = Sshd::start();
    let w = client(&sshd, sshd.port()).await;
    let dir = tempfile::tempdir().unwrap();
    let files = [
        ("empty.zimfarm", 0u64),
        ("big file with spaces.bin", 200 * 1000 * 1000),
        ("ünïcødé 文字 ☃.txt", 123_457),
    ];
    let mut items = Vec::new();
    for (i, (name, size)) in files.iter().enumerate() {
        let local = dir.path().join(name);
        write_noise(&local, *size, i as u64 + 7);
        items.push(UploadItem::output(local, "/deep/er path", name));
    }
    let reports = upload(&w, &items).await.unwrap();
    assert_eq!(reports.len(), 3);
    for (item, report) in items.iter().zip(&reports) {
        let remote = sshd.chroot().join("zim/deep/er path").join(&item.name);
        assert_eq!(sha256(&remote), sha256(&item.local), "{}", item.name);
        assert!(!report.skipped);
        assert_eq!(report.resumed_from, 0);
        assert_eq!(report.bytes_sent, report.size);
        assert_eq!(
            report.remote_path,
            format!("/zim/deep/er path/{}", item.name)
        );
    }
    assert!(tmp_files(sshd.chroot()).is_empty());
}

#[tokio::test]
async fn same_size_is_skipped_other_size_is_a_conflict() {
    let sshd = Sshd::start();
    let w = client(&sshd, sshd.port()).await;
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("a.bin");
    write_noise(&local, 100_000, 3);
    let item = UploadItem::output(local.clone(), "/w", "a.bin");
    let first = upload(&w, std::slice::from_ref(&item)).await.unwrap();
    assert!(!first[0].skipped);
    let again = upload(&w, std::slice::from_ref(&item)).await.unwrap();
    assert!(again[0].skipped, "{again:?}");
    assert_eq!(again[0].bytes_sent, 0);

    write_noise(&local, 99_999, 4);
    let e = upload(&w, &[item]).await.unwrap_err();
    assert!(matches!(e, WarehouseError::Conflict { .. }), "{e}");
    assert!(e.is_permanent());
    assert!(e.to_string().contains("never overwrites"), "{e}");
    // The warehouse copy is untouched.
    let remote = sshd.chroot().join("zim/w/a.bin");
    assert_eq!(std::fs::metadata(remote).unwrap().len(), 100_000);
}

#[tokio::test]
async fn real_zims_pass_and_a_flipped_byte_never_lands() {
    let sshd = Sshd::start();
    let w = client(&sshd, sshd.port()).await;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.zim");
    make_zim(&good);
    let reports = upload(&w, &[UploadItem::output(good.clone(), "/zims", "good.zim")])
        .await
        .unwrap();
    assert!(reports[0].zim_verified);
    assert_eq!(
        sha256(&sshd.chroot().join("zim/zims/good.zim")),
        sha256(&good)
    );

    let bad = dir.path().join("bad.zim");
    write_flipped(&good, &bad);
    let e = upload(&w, &[UploadItem::output(bad, "/zims", "bad.zim")])
        .await
        .unwrap_err();
    assert!(matches!(e, WarehouseError::Corrupt { .. }), "{e}");
    assert!(e.is_permanent());
    assert!(e.to_string().contains("checksum"), "{e}");
    assert!(!sshd.chroot().join("zim/zims/bad.zim").exists());
    assert!(
        tmp_files(sshd.chroot()).is_empty(),
        "the partial upload stays"
    );
}

#[tokio::test]
async fn a_zim_checked_just_before_is_not_hashed_again_unless_it_changed() {
    use zimfarm_worker::warehouse::journal::FileId;
    let sshd = Sshd::start();
    let w = client(&sshd, sshd.port()).await;
    let dir = tempfile::tempdir().unwrap();
    let zim = dir.path().join("a.zim");
    make_zim(&zim);
    let checked = FileId::of(&zim).unwrap();
    // Changed since its check (a flipped byte, a new modification time):
    // hashed as it is read, and refused.
    std::thread::sleep(Duration::from_millis(20));
    write_flipped(&zim, &zim);
    assert_ne!(FileId::of(&zim).unwrap(), checked);
    let item = UploadItem::output(zim.clone(), "/checked", "a.zim").checked_as(checked);
    let e = upload(&w, &[item]).await.unwrap_err();
    assert!(matches!(e, WarehouseError::Corrupt { .. }), "{e}");
    assert!(!sshd.chroot().join("zim/checked/a.zim").exists());
    // Still the file the caller vouches for: sent without a second hash
    // (this one would fail it), and said to be verified.
    let vouched = FileId::of(&zim).unwrap();
    let item = UploadItem::output(zim.clone(), "/checked", "a.zim").checked_as(vouched);
    let reports = upload(&w, &[item]).await.unwrap();
    assert!(reports[0].zim_verified);
    assert_eq!(
        sha256(&sshd.chroot().join("zim/checked/a.zim")),
        sha256(&zim)
    );
}

/// Uploads a 200 MB file through a proxy limited to 40 MB/s, breaks the
/// connection with `cut` once 60 MB went through, and checks the upload
/// resumed (not restarted) and the file is identical.
async fn resume_after(cut: impl FnOnce(&Sshd, &ThrottleProxy) + Send + 'static) {
    let sshd = Sshd::start();
    let proxy = ThrottleProxy::with_rate(&sshd.addr(), 40_000_000);
    let w = client(&sshd, proxy.port()).await;
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("resume me.bin");
    let size = 200 * 1000 * 1000;
    write_noise(&local, size, 11);
    let item = UploadItem::output(local.clone(), "/resume", "resume me.bin");
    let alive_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let task = tokio::spawn(async move { w.upload(&[item], &CancellationToken::new()).await });

    // The fixtures block: run them off the runtime.
    let (sshd, proxy) = tokio::task::spawn_blocking(move || {
        proxy.wait_bytes_up(60_000_000, Duration::from_secs(30));
        let before = proxy.reset_bytes();
        assert!(before < size, "the upload finished before the cut");
        cut(&sshd, &proxy);
        (sshd, proxy)
    })
    .await
    .unwrap();

    let reports = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the upload did not finish")
        .unwrap()
        .unwrap();
    let report = &reports[0];
    // Nothing was there at the start, and every byte was confirmed once.
    assert_eq!(report.resumed_from, 0, "{report:?}");
    assert_eq!(report.bytes_sent, size, "{report:?}");
    let after = proxy.bytes_up();
    assert!(
        after < size - 40_000_000,
        "{after} bytes went up after the cut: the upload started over"
    );
    let remote = sshd.chroot().join("zim/resume/resume me.bin");
    assert_eq!(sha256(&remote), sha256(&local));
    assert!(tmp_files(sshd.chroot()).is_empty());
    // The cut connection's tasks (russh's session, russh-sftp's reader and
    // writer) end with it; a writer left waiting for window space would
    // hold every write queued behind it for the life of the worker.
    let alive = wait_alive_tasks(alive_before, Duration::from_secs(10)).await;
    assert!(
        alive <= alive_before,
        "{alive} tasks alive 10 s after the upload ended, {alive_before} before it: \
         the cut connection left tasks behind"
    );
}

/// Waits until at most `target` tasks are alive on this runtime, or
/// `timeout`; returns how many are.
async fn wait_alive_tasks(target: usize, timeout: Duration) -> usize {
    let metrics = tokio::runtime::Handle::current().metrics();
    let deadline = Instant::now() + timeout;
    loop {
        let alive = metrics.num_alive_tasks();
        if alive <= target || Instant::now() >= deadline {
            return alive;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn resumes_after_the_sshd_session_is_killed() {
    resume_after(|sshd, _| {
        assert!(sshd.kill_sessions() > 0, "no session to kill");
    })
    .await;
}

#[tokio::test]
async fn resumes_after_sshd_restarts() {
    resume_after(|sshd, _| {
        sshd.stop();
        std::thread::sleep(Duration::from_millis(1500));
        sshd.start_again();
    })
    .await;
}

#[tokio::test]
async fn resumes_after_the_network_drops() {
    resume_after(|_, proxy| proxy.cut()).await;
}

#[tokio::test]
async fn names_that_could_escape_are_refused_before_connecting() {
    let sshd = Sshd::start();
    // A port nobody listens on: a refusal must come before any connection.
    let mut s = settings(
        &sshd,
        sshd.user_key(KeyKind::Ed25519),
        1,
        sshd.known_hosts_file(),
    );
    s.upload_retries = 0;
    let w = Warehouse::new(s).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("x.zim");
    write_noise(&local, 10, 1);
    // `x.zim.tmp` would be another upload's partial file.
    for name in ["a/b.zim", "..", "../x.zim", ".", "x.zim.tmp"] {
        let e = upload(&w, &[UploadItem::output(local.clone(), "/w", name)])
            .await
            .unwrap_err();
        assert!(
            matches!(e, WarehouseError::InvalidPath { .. }),
            "{name}: {e}"
        );
    }
    let e = upload(&w, &[UploadItem::output(local, "/../etc", "x.zim")])
        .await
        .unwrap_err();
    assert!(matches!(e, WarehouseError::InvalidPath { .. }), "{e}");
}

#[tokio::test]
async fn an_unreachable_warehouse_is_retried_then_given_up() {
    let sshd = Sshd::start();
    let port = sshd.port();
    sshd.stop();
    let mut s = settings(
        &sshd,
        sshd.user_key(KeyKind::Ed25519),
        port,
        sshd.known_hosts_file(),
    );
    s.upload_retries = 2;
    let w = Warehouse::new(s)
        .await
        .unwrap()
        .with_first_backoff(Duration::from_millis(100));
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("x.bin");
    write_noise(&local, 10, 1);
    let started = Instant::now();
    let e = upload(&w, &[UploadItem::output(local, "/w", "x.bin")])
        .await
        .unwrap_err();
    match &e {
        WarehouseError::GaveUp { attempts: 3, last } => {
            assert!(matches!(**last, WarehouseError::Connect { .. }), "{last}")
        }
        other => panic!("expected GaveUp after 3 attempts, got {other}"),
    }
    assert!(e.to_string().contains("WAREHOUSE_HOST"), "{e}");
    // 100 ms + 200 ms of backoff between the three attempts.
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn a_cancelled_upload_stops_and_keeps_the_partial_file() {
    let sshd = Sshd::start();
    let proxy = ThrottleProxy::with_rate(&sshd.addr(), 20_000_000);
    let w = client(&sshd, proxy.port()).await;
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("c.bin");
    write_noise(&local, 100_000_000, 5);
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        let item = UploadItem::output(local, "/c", "c.bin");
        async move { w.upload(&[item], &cancel).await }
    });
    let proxy = tokio::task::spawn_blocking(move || {
        proxy.wait_bytes_up(10_000_000, Duration::from_secs(30));
        proxy
    })
    .await
    .unwrap();
    let started = Instant::now();
    cancel.cancel();
    let e = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("cancel was not prompt")
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, WarehouseError::Cancelled), "{e}");
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(proxy);
    assert!(!sshd.chroot().join("zim/c/c.bin").exists());
}

/// A client of `sshd` through `proxy` writing over `streams` connections.
async fn streams_client(sshd: &Sshd, proxy: &ThrottleProxy, streams: u8) -> Warehouse {
    let mut s = settings(
        sshd,
        sshd.user_key(KeyKind::Ed25519),
        proxy.port(),
        sshd.known_hosts_file_for_port(proxy.port()),
    );
    s.upload_retries = 6;
    s.upload_streams = zimfarm_worker::config::UploadStreams::Fixed(streams);
    Warehouse::new(s)
        .await
        .unwrap()
        .with_first_backoff(Duration::from_millis(50))
}

/// The ranges an upload journal claims, as `(start, end)` pairs.
fn journal_ranges(path: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read(path).expect("the journal is there");
    let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
    v["confirmed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
        .collect()
}

/// Log lines written while `f` runs on this (current-thread) runtime.
struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || LogCapture(writer.clone()))
        .finish();
    (buf, tracing::subscriber::set_default(subscriber))
}

#[tokio::test]
async fn four_streams_cut_at_random_points_still_deliver_every_byte() {
    let sshd = Sshd::start();
    // 8 MB/s in all: 64 MiB takes about 8 s, long enough for 20 cuts.
    let proxy = Arc::new(ThrottleProxy::with_rate(&sshd.addr(), 8_000_000));
    let w = streams_client(&sshd, &proxy, 4).await;
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("striped.bin");
    let size = 64 << 20;
    write_noise(&local, size, 23);
    let journal = dir.path().join(".journal.json");
    let item = UploadItem::output(local.clone(), "/striped", "striped.bin")
        .with_journal(OwnFile::at(&journal).unwrap());
    let task = tokio::spawn(async move { w.upload(&[item], &CancellationToken::new()).await });

    let cutter = {
        let proxy = proxy.clone();
        tokio::task::spawn_blocking(move || {
            // A fixed seed: the same cuts each run.
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut cuts = 0;
            proxy.wait_bytes_up(1 << 20, Duration::from_secs(30));
            while cuts < 24 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                std::thread::sleep(Duration::from_millis(100 + x % 200));
                if proxy.active_connections() >= 2 && proxy.cut_one(x as usize) {
                    cuts += 1;
                }
                if proxy.bytes_up() > size {
                    break;
                }
            }
            cuts
        })
    };
    let reports = tokio::time::timeout(Duration::from_secs(120), task)
        .await
        .expect("the upload did not finish")
        .unwrap()
        .expect("the upload failed");
    let cuts = cutter.await.unwrap();
    assert!(cuts >= 20, "only {cuts} cuts landed before the end");
    assert_eq!(reports[0].bytes_sent, size, "{:?}", reports[0]);
    assert!(
        proxy.connections() >= 4 + cuts / 2,
        "{} connections for {cuts} cuts: the streams did not reconnect",
        proxy.connections()
    );
    let remote = sshd.chroot().join("zim/striped/striped.bin");
    assert_eq!(sha256(&remote), sha256(&local));
    assert!(tmp_files(sshd.chroot()).is_empty());
    assert!(!journal.exists(), "the journal outlived the upload");
}

#[tokio::test]
async fn a_large_file_is_synced_to_the_warehouse_disk_while_it_arrives() {
    let sshd = Sshd::start();
    // 80 MB/s: 160 MiB takes about 2 s, the syncs in a second session
    // meanwhile; a small file is not synced before its end.
    let proxy = ThrottleProxy::with_rate(&sshd.addr(), 80_000_000);
    let w = streams_client(&sshd, &proxy, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let (large, small) = (dir.path().join("large.bin"), dir.path().join("small.bin"));
    write_noise(&large, 160 << 20, 31);
    write_noise(&small, 20 << 20, 32);
    let items = [
        UploadItem::output(large.clone(), "/synced", "large.bin"),
        UploadItem::output(small.clone(), "/synced", "small.bin"),
    ];
    let reports = upload(&w, &items).await.unwrap();
    assert!(
        reports[0].synced_early >= 64 << 20 && reports[0].synced_early < 160 << 20,
        "{:?}",
        reports[0]
    );
    assert_eq!(reports[1].synced_early, 0, "{:?}", reports[1]);
    for (local, name) in [(&large, "large.bin"), (&small, "small.bin")] {
        let remote = sshd.chroot().join("zim/synced").join(name);
        assert_eq!(sha256(&remote), sha256(local), "{name}");
    }
    assert!(tmp_files(sshd.chroot()).is_empty());
}

#[tokio::test]
async fn a_warehouse_with_one_session_per_connection_gets_a_large_file_unsynced_until_its_end() {
    // No second session for the syncs: the upload does not notice, and the
    // sync before the rename still happens.
    let sshd = Sshd::start_with("MaxSessions 1\n");
    let w = client(&sshd, sshd.port()).await;
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("large.bin");
    write_noise(&local, 160 << 20, 33);
    let item = UploadItem::output(local.clone(), "/one-session", "large.bin");
    let reports = upload(&w, &[item]).await.unwrap();
    assert_eq!(reports[0].synced_early, 0, "{:?}", reports[0]);
    assert_eq!(reports[0].bytes_sent, 160 << 20);
    let remote = sshd.chroot().join("zim/one-session/large.bin");
    assert_eq!(sha256(&remote), sha256(&local));
    assert!(tmp_files(sshd.chroot()).is_empty());
}

#[tokio::test]
async fn a_warehouse_that_takes_two_connections_gets_the_file_over_two() {
    let (logs, _guard) = capture_logs();
    let sshd = Sshd::start();
    let proxy = ThrottleProxy::with_rate(&sshd.addr(), 40_000_000);
    proxy.set_max_active(2);
    let w = streams_client(&sshd, &proxy, 4).await;
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("two.bin");
    let size = 64 << 20;
    write_noise(&local, size, 29);
    let item = UploadItem::output(local.clone(), "/two", "two.bin")
        .with_journal(OwnFile::at(&dir.path().join(".journal.json")).unwrap());
    let reports = w.upload(&[item], &CancellationToken::new()).await.unwrap();
    assert_eq!(reports[0].bytes_sent, size);
    assert_eq!(
        proxy.refused(),
        2,
        "the two extra connections were not refused"
    );
    assert_eq!(
        sha256(&sshd.chroot().join("zim/two/two.bin")),
        sha256(&local)
    );
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains(" WARN ")).collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(
        warnings[0].contains("took 2 of 4 connections; uploading over 2"),
        "{text}"
    );
}

#[tokio::test]
async fn the_journal_never_claims_a_write_whose_status_did_not_come_back() {
    let sshd = Sshd::start();
    let proxy = Arc::new(ThrottleProxy::with_rate(&sshd.addr(), 8_000_000));
    let mut s = settings(
        &sshd,
        sshd.user_key(KeyKind::Ed25519),
        proxy.port(),
        sshd.known_hosts_file_for_port(proxy.port()),
    );
    // One failure ends the stream: what is on disk afterwards is what the
    // journal said at the cut.
    s.upload_retries = 0;
    s.upload_streams = zimfarm_worker::config::UploadStreams::Fixed(2);
    let w = Warehouse::new(s).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("stall.bin");
    let size = 64 << 20;
    write_noise(&local, size, 31);
    let journal = dir.path().join(".journal.json");
    let item = UploadItem::output(local.clone(), "/stall", "stall.bin")
        .with_journal(OwnFile::at(&journal).unwrap());
    let task = tokio::spawn(async move { w.upload(&[item], &CancellationToken::new()).await });
    {
        let proxy = proxy.clone();
        tokio::task::spawn_blocking(move || {
            proxy.wait_bytes_up(20 << 20, Duration::from_secs(30));
            // Writes are sent, none reaches the server; the statuses of
            // those that did still come back. Long enough for the journal's
            // time-based save, then the link is cut.
            proxy.hold();
            std::thread::sleep(Duration::from_millis(2500));
            proxy.cut();
            proxy.block();
            proxy.release();
        })
        .await
        .unwrap();
    }
    let result = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the upload did not end")
        .unwrap();
    assert!(result.is_err(), "the upload finished through a dead link");
    let claimed = journal_ranges(&journal);
    let covered: u64 = claimed.iter().map(|(s, e)| e - s).sum();
    assert!(covered > 0, "nothing claimed: the test did not get going");
    assert!(covered < size);
    let want = std::fs::read(&local).unwrap();
    let got = std::fs::read(sshd.chroot().join("zim/stall/stall.bin.tmp")).unwrap();
    for (start, end) in claimed {
        let (start, end) = (start as usize, end as usize);
        assert!(
            end <= got.len(),
            "claims {start}..{end}, the server has {} bytes",
            got.len()
        );
        assert!(
            got[start..end] == want[start..end],
            "the journal claims {start}..{end}, which the server does not have"
        );
    }
}

/// Puts `bytes` at `rel` under the chroot as another account of the
/// warehouse would: directories made as needed, all owned by the SFTP user.
fn plant(sshd: &Sshd, rel: &str, bytes: &[u8]) {
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(sshd.chroot().join("zim")).unwrap();
    let (uid, gid) = (owner.uid(), owner.gid());
    let path = sshd.chroot().join(rel);
    let mut dir = path.parent().unwrap().to_owned();
    let mut made = Vec::new();
    while !dir.exists() {
        made.push(dir.clone());
        dir = dir.parent().unwrap().to_owned();
    }
    for dir in made.iter().rev() {
        std::fs::create_dir(dir).unwrap();
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).unwrap();
    }
    std::fs::write(&path, bytes).unwrap();
    std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
}

fn noise(size: u64, seed: u64) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("noise");
    write_noise(&path, size, seed);
    std::fs::read(path).unwrap()
}

#[tokio::test]
async fn a_planted_tmp_without_journal_never_reaches_the_published_file() {
    const SIZE: usize = 12 << 20;
    let sshd = Sshd::start();
    let proxy = ThrottleProxy::start(&sshd.addr());
    let w = client(&sshd, proxy.port()).await;
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("p.bin");
    write_noise(&local, SIZE as u64, 21);
    let mine = std::fs::read(&local).unwrap();
    let other = noise(2 * SIZE as u64, 22);
    // A forged ZIM header over this very file's bytes: only its first 80
    // bytes differ.
    let mut forged = mine.clone();
    forged[..4].copy_from_slice(&0x044D_495Au32.to_le_bytes());
    forged[4..80].copy_from_slice(&other[..76]);
    // (what, planted .tmp, where the upload may resume from)
    let genuine_then_other = [&mine[..6 << 20], &other[..2 << 20]].concat();
    let cases: [(&str, &[u8], u64); 7] = [
        ("same size, other bytes", &other[..SIZE], 0),
        ("shorter, other bytes", &other[..5 << 20], 0),
        ("longer, other bytes", &other[..], 0),
        ("a forged ZIM header", &forged, 0),
        (
            "this file, then a longer tail",
            &[&mine[..], &other[..99]].concat(),
            SIZE as u64,
        ),
        // What matches is kept, exactly, and nothing after it.
        (
            "this file's first 6 MiB, then other bytes",
            &genuine_then_other,
            6 << 20,
        ),
        // Too short to be worth reading back: sent again.
        ("this file's first MiB", &mine[..1 << 20], 0),
    ];
    for (i, (what, planted, resumable)) in cases.into_iter().enumerate() {
        let name = format!("p{i}.bin");
        plant(&sshd, &format!("zim/planted/{name}.tmp"), planted);
        let item = UploadItem::output(local.clone(), "/planted", &name);
        proxy.reset_bytes();
        let report = upload(&w, &[item]).await.unwrap().remove(0);
        let published = std::fs::read(sshd.chroot().join("zim/planted").join(&name)).unwrap();
        assert!(
            published == mine,
            "{what}: the published file is not the local one"
        );
        assert_eq!(report.resumed_from, resumable, "{what}: {report:?}");
        assert_eq!(
            report.bytes_sent,
            SIZE as u64 - resumable,
            "{what}: {report:?}"
        );
        assert!(!report.skipped, "{what}");
        // Reading back a foreign .tmp stops at its first difference: a
        // few pieces, not its size.
        let read_back = proxy.bytes_down();
        if resumable == 0 {
            assert!(read_back < 8 << 20, "{what}: {read_back} bytes came down");
        }
    }
    assert!(tmp_files(sshd.chroot()).is_empty());
}

#[tokio::test]
async fn a_journal_vouches_for_its_ranges_but_not_for_another_file() {
    use zimfarm_worker::warehouse::journal::{FileId, Journal};
    const SIZE: u64 = 12 << 20;
    let sshd = Sshd::start();
    let w = client(&sshd, sshd.port()).await;
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("j.bin");
    write_noise(&local, SIZE, 31);
    let mine = std::fs::read(&local).unwrap();
    let journal = dir.path().join("j.bin.journal");
    let remote_tmp = "/zim/journaled/j.bin.tmp";

    // An earlier upload of this very file confirmed 0..3 MiB and
    // 5..7 MiB (ranges written over several streams), and left the .tmp
    // at 7 MiB: resumed exactly from its journal, even below the size a
    // read-back is worth.
    let mut partial = mine[..7 << 20].to_vec();
    partial[3 << 20..5 << 20].fill(0);
    plant(&sshd, "zim/journaled/j.bin.tmp", &partial);
    let mut j = Journal::new(FileId::of(&local).unwrap(), remote_tmp.to_owned());
    j.confirmed.insert(0..3 << 20);
    j.confirmed.insert(5 << 20..7 << 20);
    j.save(&OwnFile::at(&journal).unwrap()).unwrap();
    let item = UploadItem::output(local.clone(), "/journaled", "j.bin")
        .with_journal(OwnFile::at(&journal).unwrap());
    let report = upload(&w, &[item]).await.unwrap().remove(0);
    assert_eq!(report.resumed_from, 5 << 20, "{report:?}");
    assert_eq!(report.bytes_sent, SIZE - (5 << 20), "{report:?}");
    assert!(std::fs::read(sshd.chroot().join("zim/journaled/j.bin")).unwrap() == mine);
    assert!(!journal.exists(), "the journal outlived its upload");

    // A journal written for another version of the file (its size or
    // modification time differ) says nothing about this one: the planted
    // .tmp, same size as the file, is written again from the start.
    plant(&sshd, "zim/journaled/k.bin.tmp", &noise(SIZE, 32));
    let stale = FileId {
        size: SIZE,
        mtime_ns: FileId::of(&local).unwrap().mtime_ns - 1,
    };
    let mut j = Journal::new(stale, "/zim/journaled/k.bin.tmp".to_owned());
    j.confirmed.insert(0..SIZE);
    j.save(&OwnFile::at(&journal).unwrap()).unwrap();
    let item = UploadItem::output(local.clone(), "/journaled", "k.bin")
        .with_journal(OwnFile::at(&journal).unwrap());
    let report = upload(&w, &[item]).await.unwrap().remove(0);
    assert_eq!(
        (report.resumed_from, report.bytes_sent),
        (0, SIZE),
        "{report:?}"
    );
    assert!(std::fs::read(sshd.chroot().join("zim/journaled/k.bin")).unwrap() == mine);
}

#[tokio::test]
async fn a_genuine_partial_upload_resumes_with_or_without_its_journal() {
    const SIZE: u64 = 60_000_000;
    let sshd = Sshd::start();
    let proxy = ThrottleProxy::with_rate(&sshd.addr(), 20_000_000);
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("g.bin");
    write_noise(&local, SIZE, 41);
    for journal in [None, Some(dir.path().join("g.bin.journal"))] {
        let name = format!("g{}.bin", journal.is_some());
        let mut item = UploadItem::output(local.clone(), "/genuine", &name);
        if let Some(path) = &journal {
            item = item.with_journal(OwnFile::at(path).unwrap());
        }
        // Cut by a cancel once 20 MB went up.
        let w = client(&sshd, proxy.port()).await;
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let (cancel, item) = (cancel.clone(), item.clone());
            async move { w.upload(&[item], &cancel).await }
        });
        proxy.reset_bytes();
        let deadline = Instant::now() + Duration::from_secs(30);
        while proxy.bytes_up() < 20_000_000 {
            assert!(Instant::now() < deadline, "the upload did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cancel.cancel();
        let e = task.await.unwrap().unwrap_err();
        assert!(matches!(e, WarehouseError::Cancelled), "{e}");

        let w = client(&sshd, sshd.port()).await;
        let report = upload(&w, &[item]).await.unwrap().remove(0);
        assert!(
            report.resumed_from >= 4 << 20 && report.resumed_from < SIZE,
            "{journal:?}: {report:?}"
        );
        assert_eq!(report.bytes_sent, SIZE - report.resumed_from, "{report:?}");
        let remote = sshd.chroot().join("zim/genuine").join(&name);
        assert_eq!(sha256(&remote), sha256(&local), "{journal:?}");
    }
}

#[tokio::test]
async fn a_file_already_there_is_skipped_only_when_its_bytes_are_this_files() {
    let sshd = Sshd::start();
    let proxy = ThrottleProxy::start(&sshd.addr());
    let w = client(&sshd, proxy.port()).await;
    let dir = tempfile::tempdir().unwrap();

    // Uploaded before: read back whole, then skipped.
    let local = dir.path().join("s.bin");
    write_noise(&local, 10_000_000, 51);
    let item = UploadItem::output(local.clone(), "/there", "s.bin");
    proxy.reset_bytes();
    upload(&w, std::slice::from_ref(&item)).await.unwrap();
    // Nothing there: nothing read back (a normal upload costs what it did).
    let down = proxy.bytes_down();
    assert!(down < 200_000, "{down} bytes came down for a fresh upload");
    proxy.reset_bytes();
    let again = upload(&w, std::slice::from_ref(&item)).await.unwrap();
    assert!(again[0].skipped, "{again:?}");
    assert_eq!(again[0].bytes_sent, 0);
    let down = proxy.bytes_down();
    assert!(down >= 10_000_000, "only {down} bytes read back");

    // A real ZIM too, its checksum checked beside the read-back.
    let zim = dir.path().join("z.zim");
    make_zim(&zim);
    let item = UploadItem::output(zim.clone(), "/there", "z.zim");
    upload(&w, std::slice::from_ref(&item)).await.unwrap();
    let again = upload(&w, &[item]).await.unwrap();
    assert!(again[0].skipped && again[0].zim_verified, "{again:?}");

    // Another file of that name and size (here its last byte differs, or
    // only its first): an error that says so, and nothing is overwritten.
    let mine = std::fs::read(&local).unwrap();
    for at in [mine.len() - 1, 0] {
        let mut other = mine.clone();
        other[at] ^= 0x01;
        let name = format!("d{at}.bin");
        plant(&sshd, &format!("zim/there/{name}"), &other);
        let item = UploadItem::output(local.clone(), "/there", &name);
        let e = upload(&w, &[item]).await.unwrap_err();
        assert!(matches!(e, WarehouseError::Differs { .. }), "{e}");
        assert!(e.is_permanent());
        let text = e.to_string();
        assert!(
            text.contains("same size")
                && text.contains(&format!("from byte {at}"))
                && text.contains("never overwrites")
                && text.contains("Zimfarm admins"),
            "{text}"
        );
        let remote = sshd.chroot().join("zim/there").join(&name);
        assert!(std::fs::read(&remote).unwrap() == other, "overwritten");
    }
    assert!(tmp_files(sshd.chroot()).is_empty());
}
