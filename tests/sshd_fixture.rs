//! Proves the SFTP warehouse fixture (tests/common/sshd.rs) and the
//! throttling proxy with OpenSSH's own `sftp` client.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::ThrottleProxy;
use common::sshd::{KeyKind, Sshd};

/// Runs `sftp -b` with `commands` against 127.0.0.1:`port`.
fn sftp(port: u16, key: &Path, known_hosts: &Path, commands: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("batch");
    std::fs::write(&batch, commands).unwrap();
    sftp_command(port, key, known_hosts, &batch)
        .output()
        .expect("sftp runs")
}

fn sftp_command(port: u16, key: &Path, known_hosts: &Path, batch: &Path) -> Command {
    let mut cmd = Command::new("sftp");
    cmd.args(["-F", "/dev/null", "-b"])
        .arg(batch)
        .args(["-P", &port.to_string(), "-i"])
        .arg(key)
        .args(["-o", "StrictHostKeyChecking=yes", "-o"])
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args([
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-o",
            "ConnectTimeout=5",
            "zimfarm-sftp@127.0.0.1",
        ])
        .stdin(Stdio::null());
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A file of `len` bytes that is not all zeros.
fn payload(dir: &Path, name: &str, len: usize) -> (std::path::PathBuf, Vec<u8>) {
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
    let path = dir.join(name);
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

/// Checks the key file of `kind`, then (unless it is the encrypted one)
/// puts a file into /zim/ with it.
fn put_with_key(sshd: &Sshd, kind: KeyKind, local: &Path) {
    let key = sshd.user_key(kind);
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{kind:?}");
    let pem = std::fs::read_to_string(&key).unwrap();
    assert!(pem.starts_with(kind.pem_header()), "{kind:?}: {pem:.40}");
    if kind == KeyKind::EncryptedEd25519 {
        // Encrypted: readable with the passphrase only.
        let y = |pass: &str| {
            Command::new("ssh-keygen")
                .args(["-y", "-P", pass, "-f"])
                .arg(&key)
                .output()
                .unwrap()
                .status
                .success()
        };
        assert!(y(kind.passphrase().unwrap()));
        assert!(!y(""));
        return;
    }
    let name = format!("{}.zim", kind.name());
    let (src, data) = payload(local, &name, 100_000 + kind as usize);
    let out = sftp(
        sshd.port(),
        &key,
        &sshd.known_hosts_file(),
        &format!("put {} /zim/{name}\n", src.display()),
    );
    assert!(out.status.success(), "{kind:?}: {}", text(&out));
    let landed = sshd.chroot().join("zim").join(&name);
    assert_eq!(std::fs::read(&landed).unwrap(), data, "{kind:?}");
}

#[test]
fn every_key_kind_logs_in_and_puts_into_zim() {
    let sshd = Sshd::start();
    assert_eq!(sshd.user(), "zimfarm-sftp");
    assert!(sshd.host_key_fingerprint().starts_with("SHA256:"));
    assert!(sshd.host_public_key_line().starts_with("ssh-ed25519 AAAA"));
    let kh = std::fs::read_to_string(sshd.known_hosts_file()).unwrap();
    assert_eq!(
        kh.trim_end(),
        format!(
            "[127.0.0.1]:{} {}",
            sshd.port(),
            sshd.host_public_key_line()
        )
    );
    // The fingerprint is the one of the key in known_hosts.
    let lf = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(sshd.known_hosts_file())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&lf.stdout).contains(sshd.host_key_fingerprint()));

    let local = tempfile::tempdir().unwrap();
    // One sftp client per kind, all at once (each takes a few tenths of a
    // second).
    std::thread::scope(|scope| {
        for kind in KeyKind::ALL {
            let (sshd, local) = (&sshd, local.path());
            scope.spawn(move || put_with_key(sshd, kind, local));
        }
    });
    // /logs/ is writable too, and the chroot root is not ("-put": the batch
    // goes on after a failure).
    let (src, _) = payload(local.path(), "task.log", 10);
    let out = sftp(
        sshd.port(),
        &sshd.user_key(KeyKind::Ed25519),
        &sshd.known_hosts_file(),
        &format!("put {0} /logs/task.log\n-put {0} /top.log\n", src.display()),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(sshd.chroot().join("logs/task.log").exists());
    assert!(!sshd.chroot().join("top.log").exists());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out)
    );

    let (chroot, dir) = (sshd.chroot().to_owned(), sshd.instance_dir().to_owned());
    let log = sshd.log_text();
    assert!(log.contains("Accepted publickey for zimfarm-sftp"), "{log}");
    drop(sshd);
    assert!(!chroot.exists() && !dir.exists(), "instance left behind");
}

#[test]
fn unauthorized_key_and_wrong_host_key_are_refused() {
    let sshd = Sshd::start();
    let out = sftp(
        sshd.port(),
        &sshd.unauthorized_key(),
        &sshd.known_hosts_file(),
        "ls /zim\n",
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied (publickey)"),
        "{}",
        text(&out)
    );

    let out = sftp(
        sshd.port(),
        &sshd.user_key(KeyKind::Ed25519),
        &sshd.wrong_known_hosts_file(),
        "ls /zim\n",
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Host key verification failed"),
        "{}",
        text(&out)
    );
}

#[test]
fn kill_sessions_stop_and_start_again() {
    let sshd = Sshd::start();
    let key = sshd.user_key(KeyKind::Ed25519);
    let local = tempfile::tempdir().unwrap();
    // A session held open by a throttled upload (4 MB at 2 MB/s).
    let proxy = ThrottleProxy::with_rate(&sshd.addr(), 2_000_000);
    let proxy_kh = sshd.known_hosts_file_for_port(proxy.port());
    let (src, data) = payload(local.path(), "big.zim", 4_000_000);
    let batch = local.path().join("batch");
    std::fs::write(&batch, format!("put {} /zim/big.zim\n", src.display())).unwrap();
    let mut slow = sftp_command(proxy.port(), &key, &proxy_kh, &batch)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    sshd.wait_sessions(1, Duration::from_secs(5));
    proxy.wait_bytes_up(500_000, Duration::from_secs(5));
    assert!(sshd.kill_sessions() >= 1);
    let status = slow.wait().unwrap();
    assert!(!status.success(), "the upload survived kill_sessions");
    let partial = std::fs::metadata(sshd.chroot().join("zim/big.zim"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(partial < data.len() as u64, "partial {partial}");

    // The listener is still there.
    proxy.set_rate(0);
    let out = sftp(
        proxy.port(),
        &key,
        &proxy_kh,
        &format!("put {} /zim/big.zim\n", src.display()),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read(sshd.chroot().join("zim/big.zim")).unwrap(),
        data
    );

    // Stopped: refused; started again: same port, host key, chroot.
    let pid = sshd.pid().unwrap();
    sshd.stop();
    assert!(sshd.pid().is_none());
    assert!(std::net::TcpStream::connect(sshd.addr()).is_err());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists() || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.contains(") Z ")
        }
    );
    let out = sftp(sshd.port(), &key, &sshd.known_hosts_file(), "ls /zim\n");
    assert!(!out.status.success());
    sshd.start_again();
    let out = sftp(sshd.port(), &key, &sshd.known_hosts_file(), "ls -l /zim\n");
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("big.zim"));
}

#[test]
fn throttle_proxy_paces_counts_and_cuts() {
    let sshd = Sshd::start();
    let key = sshd.user_key(KeyKind::Ed25519);
    let local = tempfile::tempdir().unwrap();
    let proxy = ThrottleProxy::with_rate(&sshd.addr(), 6_000_000);
    let kh = sshd.known_hosts_file_for_port(proxy.port());

    // 3 MB at 6 MB/s: half a second (plus the handshake).
    let (src, data) = payload(local.path(), "paced.zim", 3_000_000);
    let started = Instant::now();
    let out = sftp(
        proxy.port(),
        &key,
        &kh,
        &format!("put {} /zim/paced.zim\n", src.display()),
    );
    let took = started.elapsed();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read(sshd.chroot().join("zim/paced.zim")).unwrap(),
        data
    );
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(4),
        "3 MB at 6 MB/s took {took:?}"
    );
    // The payload plus SSH framing, handshake and SFTP requests.
    let up = proxy.bytes_up();
    assert!(
        up >= data.len() as u64 && up < data.len() as u64 * 11 / 10,
        "bytes up: {up}"
    );
    assert!(proxy.bytes_down() > 0);
    assert_eq!(proxy.connections(), 1);
    assert_eq!(proxy.reset_bytes(), up);
    assert_eq!(proxy.bytes_up(), 0);

    // Cut in the middle: the client fails, the file is partial, the counter
    // stops; a new connection is accepted right after.
    let batch = local.path().join("batch");
    std::fs::write(&batch, format!("put {} /zim/cut.zim\n", src.display())).unwrap();
    let mut child = sftp_command(proxy.port(), &key, &kh, &batch)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    proxy.wait_bytes_up(1_000_000, Duration::from_secs(5));
    assert_eq!(proxy.active_connections(), 1);
    proxy.cut();
    let at_cut = proxy.bytes_up();
    assert!(
        !child.wait().unwrap().success(),
        "the upload survived the cut"
    );
    assert_eq!(proxy.active_connections(), 0);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        proxy.bytes_up() <= at_cut + 128 * 1024,
        "bytes kept flowing"
    );
    let partial = std::fs::metadata(sshd.chroot().join("zim/cut.zim"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(partial < data.len() as u64, "partial {partial}");

    // Blocked: refused; restored: through again.
    proxy.block();
    let out = sftp(proxy.port(), &key, &kh, "ls /zim\n");
    assert!(!out.status.success(), "{}", text(&out));
    proxy.restore();
    let out = sftp(proxy.port(), &key, &kh, "ls /zim\n");
    assert!(out.status.success(), "{}", text(&out));
}
