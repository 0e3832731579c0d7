//! A real OpenSSH `sshd` on 127.0.0.1 as the SFTP warehouse of a test: one
//! instance per test, started and stopped by the fixture, with its own port,
//! host key, authorized keys, chroot and log.
//!
//! The server accepts the user `zimfarm-sftp` by public key only and serves
//! nothing but `internal-sftp`, chrooted into [`Sshd::chroot`], which holds
//! the warehouse's `zim/` and `logs/` (writable by the user). Files the
//! server writes there are owned by `zimfarm-sftp`; the tests (root) read
//! them from the host.
//!
//! Needs root and what `scripts/test-env.sh` makes sure of: the system user
//! `zimfarm-sftp` (not locked), `/run/sshd`, and the root-owned base dir
//! `/srv/zimfarm-test-sftp` of the chroots (`ChrootDirectory` wants every
//! component of the path root-owned and not group/other-writable, which
//! rules out /tmp). The other files of an instance live in a temp dir.
//!
//! User keys are generated once (RSA 3072 takes about a second each) and
//! kept in `CARGO_TARGET_TMPDIR/sshd-fixture-keys/`, shared by every test
//! process and run; each instance gets its own 0600 copy.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

// Included here by path, not by `common`, so that this file stays
// self-contained for the upload bench; `common` re-exports it.
#[path = "support.rs"]
pub mod support;
use support::{eventually, run_ok, wait_log_file};

/// The account the warehouse accepts.
pub const SFTP_USER: &str = "zimfarm-sftp";
/// Where the instances' chroots are made (root-owned, 0755).
pub const CHROOT_BASE: &str = "/srv/zimfarm-test-sftp";
/// The passphrase of [`KeyKind::EncryptedEd25519`].
pub const KEY_PASSPHRASE: &str = "zimfarm test passphrase";

const SSHD: &str = "/usr/sbin/sshd";
const SSH_KEYGEN: &str = "ssh-keygen";
/// Prefix of the instances' temp dirs (and of nothing else), so that those
/// of a test process that died can be recognised and swept.
const INSTANCE_PREFIX: &str = "zimfarm-test-sshd-";
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// The user keys the server can be given, in the formats the worker has to
/// read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// ed25519, OpenSSH format, no passphrase.
    Ed25519,
    /// RSA 3072, OpenSSH format (`-----BEGIN OPENSSH PRIVATE KEY-----`).
    RsaOpenssh,
    /// RSA 3072, PEM PKCS#1 (`-----BEGIN RSA PRIVATE KEY-----`).
    RsaPem,
    /// RSA 3072, PEM PKCS#8 (`-----BEGIN PRIVATE KEY-----`).
    RsaPkcs8,
    /// ed25519, OpenSSH format, encrypted with [`KEY_PASSPHRASE`] (bcrypt
    /// KDF, ssh-keygen's default 16 rounds).
    EncryptedEd25519,
}

impl KeyKind {
    pub const ALL: [KeyKind; 5] = [
        KeyKind::Ed25519,
        KeyKind::RsaOpenssh,
        KeyKind::RsaPem,
        KeyKind::RsaPkcs8,
        KeyKind::EncryptedEd25519,
    ];

    /// A short name, used for the key's file name.
    pub fn name(self) -> &'static str {
        match self {
            KeyKind::Ed25519 => "ed25519",
            KeyKind::RsaOpenssh => "rsa-openssh",
            KeyKind::RsaPem => "rsa-pem",
            KeyKind::RsaPkcs8 => "rsa-pkcs8",
            KeyKind::EncryptedEd25519 => "ed25519-encrypted",
        }
    }

    pub fn passphrase(self) -> Option<&'static str> {
        match self {
            KeyKind::EncryptedEd25519 => Some(KEY_PASSPHRASE),
            _ => None,
        }
    }

    /// The first line of the private key file.
    pub fn pem_header(self) -> &'static str {
        match self {
            KeyKind::RsaPem => "-----BEGIN RSA PRIVATE KEY-----",
            KeyKind::RsaPkcs8 => "-----BEGIN PRIVATE KEY-----",
            _ => "-----BEGIN OPENSSH PRIVATE KEY-----",
        }
    }

    fn keygen_args(self) -> Vec<&'static str> {
        let mut args = match self {
            KeyKind::Ed25519 | KeyKind::EncryptedEd25519 => vec!["-t", "ed25519"],
            KeyKind::RsaOpenssh => vec!["-t", "rsa", "-b", "3072"],
            KeyKind::RsaPem => vec!["-t", "rsa", "-b", "3072", "-m", "PEM"],
            KeyKind::RsaPkcs8 => vec!["-t", "rsa", "-b", "3072", "-m", "PKCS8"],
        };
        args.extend(["-N", self.passphrase().unwrap_or("")]);
        args
    }
}

/// One sshd instance; dropping it kills the server and its sessions and
/// removes its files and chroot.
pub struct Sshd {
    port: u16,
    /// config, host key, pid file, authorized_keys, log, user keys, known_hosts
    dir: tempfile::TempDir,
    chroot: tempfile::TempDir,
    config: PathBuf,
    log: PathBuf,
    authorized_keys: PathBuf,
    host_public_key_line: String,
    host_key_fingerprint: String,
    known_hosts: PathBuf,
    wrong_known_hosts: PathBuf,
    /// The listening sshd; None while stopped.
    child: Mutex<Option<Child>>,
    /// Serialises the writes to authorized_keys and the key copies.
    keys_lock: Mutex<()>,
    /// sshd_config lines added after the fixture's own.
    extra_config: String,
}

/// Why a launch did not give a listening server.
enum LaunchError {
    /// The port was taken (a bind race): worth retrying on another port.
    PortTaken,
    Failed(String),
}

impl Sshd {
    /// Starts a new instance on a free port of 127.0.0.1 and waits until it
    /// answers with its SSH banner.
    pub fn start() -> Sshd {
        Self::start_with("")
    }

    /// A server whose sshd_config also has `extra` (whole lines), as a
    /// warehouse configured otherwise would.
    pub fn start_with(extra: &str) -> Sshd {
        preflight();
        sweep_stale_instances();
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let tag = format!(
            "{}-{}-",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );

        let dir = tempfile::Builder::new()
            .prefix(&format!("{INSTANCE_PREFIX}{tag}"))
            .tempdir()
            .expect("sshd instance temp dir");
        // sshd reads AuthorizedKeysFile with the user's privileges: the
        // user must be able to traverse the dir (the host key stays 0600).
        set_mode(dir.path(), 0o755);
        let chroot = tempfile::Builder::new()
            .prefix(&tag)
            .tempdir_in(CHROOT_BASE)
            .unwrap_or_else(|e| panic!("cannot make a chroot in {CHROOT_BASE}: {e}"));
        set_mode(chroot.path(), 0o755);
        let (uid, gid) = sftp_user_ids();
        for sub in ["zim", "logs"] {
            let p = chroot.path().join(sub);
            fs::create_dir(&p).expect("chroot subdir");
            std::os::unix::fs::chown(&p, Some(uid), Some(gid)).expect("chown chroot subdir");
            set_mode(&p, 0o755);
        }

        let host_key = dir.path().join("ssh_host_ed25519_key");
        keygen(&host_key, &["-t", "ed25519", "-N", ""], "");
        let host_public_key_line = public_key_line(&host_key.with_extension("pub"));
        let host_key_fingerprint = fingerprint(&host_key.with_extension("pub"));

        let authorized_keys = dir.path().join("authorized_keys");
        fs::write(&authorized_keys, "").expect("authorized_keys");
        set_mode(&authorized_keys, 0o644);
        fs::create_dir(dir.path().join("keys")).expect("keys dir");
        let log = dir.path().join("sshd.log");
        let config = dir.path().join("sshd_config");

        let mut sshd = Sshd {
            port: 0,
            config,
            log,
            authorized_keys,
            host_public_key_line,
            host_key_fingerprint,
            known_hosts: dir.path().join("known_hosts"),
            wrong_known_hosts: dir.path().join("wrong_known_hosts"),
            dir,
            chroot,
            child: Mutex::new(None),
            keys_lock: Mutex::new(()),
            extra_config: extra.to_owned(),
        };

        let mut attempt = 0;
        loop {
            attempt += 1;
            sshd.port = free_port();
            sshd.write_config(&host_key);
            match sshd.launch() {
                Ok(()) => break,
                Err(LaunchError::PortTaken) if attempt < 10 => continue,
                Err(LaunchError::PortTaken) => {
                    panic!(
                        "sshd: no free port after {attempt} attempts:\n{}",
                        sshd.log_text()
                    )
                }
                Err(LaunchError::Failed(why)) => panic!("sshd did not start: {why}"),
            }
        }

        let host = format!("[127.0.0.1]:{}", sshd.port);
        fs::write(
            &sshd.known_hosts,
            format!("{host} {}\n", sshd.host_public_key_line),
        )
        .expect("known_hosts");
        let wrong = public_key_line(
            &cached_key("wrong-host-ed25519", &["-t", "ed25519", "-N", ""]).with_extension("pub"),
        );
        fs::write(&sshd.wrong_known_hosts, format!("{host} {wrong}\n")).expect("known_hosts");
        sshd
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn user(&self) -> &'static str {
        SFTP_USER
    }

    /// `SHA256:...`, as `ssh-keygen -lf` prints it.
    pub fn host_key_fingerprint(&self) -> &str {
        &self.host_key_fingerprint
    }

    /// `ssh-ed25519 AAAA...` (no comment).
    pub fn host_public_key_line(&self) -> &str {
        &self.host_public_key_line
    }

    /// A known_hosts file with the line `[127.0.0.1]:<port> ssh-ed25519 AAAA...`.
    pub fn known_hosts_file(&self) -> PathBuf {
        self.known_hosts.clone()
    }

    /// A known_hosts file naming this host with another ed25519 key.
    pub fn wrong_known_hosts_file(&self) -> PathBuf {
        self.wrong_known_hosts.clone()
    }

    /// A known_hosts file naming `[127.0.0.1]:<port>` with this server's
    /// key: for a client that reaches the server through a proxy on `port`.
    pub fn known_hosts_file_for_port(&self, port: u16) -> PathBuf {
        let path = self.dir.path().join(format!("known_hosts-{port}"));
        fs::write(
            &path,
            format!("[127.0.0.1]:{port} {}\n", self.host_public_key_line),
        )
        .expect("known_hosts");
        path
    }

    /// The chroot's path on the host: the warehouse's `/zim/x` is
    /// `chroot().join("zim/x")`.
    pub fn chroot(&self) -> &Path {
        self.chroot.path()
    }

    /// The instance's own files (config, keys, log); not in the chroot.
    pub fn instance_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// sshd's log (`LogLevel VERBOSE`), over all of its starts.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        wait_log_file(&self.log, "sshd", needle, timeout);
    }

    /// The private key of `kind`, authorized on this server: a 0600 copy in
    /// the instance dir (its `.pub` next to it).
    pub fn user_key(&self, kind: KeyKind) -> PathBuf {
        let _guard = self.keys_lock.lock().unwrap();
        let dest = self.dir.path().join("keys").join(kind.name());
        if !dest.exists() {
            let src = cached_key(kind.name(), &kind.keygen_args());
            copy_key(&src, &dest);
            let line = public_key_line(&src.with_extension("pub"));
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(&self.authorized_keys)
                .expect("authorized_keys");
            writeln!(f, "{line} {}", kind.name()).expect("write authorized_keys");
        }
        dest
    }

    /// A valid ed25519 key (0600, no passphrase) the server does not accept.
    pub fn unauthorized_key(&self) -> PathBuf {
        let _guard = self.keys_lock.lock().unwrap();
        let dest = self.dir.path().join("keys").join("unauthorized-ed25519");
        if !dest.exists() {
            copy_key(
                &cached_key("unauthorized-ed25519", &["-t", "ed25519", "-N", ""]),
                &dest,
            );
        }
        dest
    }

    pub fn authorized_keys_file(&self) -> &Path {
        &self.authorized_keys
    }

    /// The pid of the listening sshd, None while stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(|c| c.id())
    }

    /// The pids of the per-connection sshd processes (every descendant of
    /// the listener).
    pub fn session_pids(&self) -> Vec<u32> {
        self.pid().map(descendants).unwrap_or_default()
    }

    /// Waits until at least `n` connections are being served.
    pub fn wait_sessions(&self, n: usize, timeout: Duration) {
        // Each connection is one direct child of the listener.
        let sessions = || {
            self.pid()
                .map(|p| children_map().get(&p).map_or(0, Vec::len))
                .unwrap_or(0)
        };
        eventually(
            timeout,
            Duration::from_millis(20),
            || sessions() >= n,
            || format!("sshd never had {n} session(s); log:\n{}", self.log_text()),
        );
    }

    /// SIGKILLs every per-connection sshd process (the clients see their
    /// connection drop); the listener stays and accepts new connections.
    /// Returns how many processes were killed.
    pub fn kill_sessions(&self) -> usize {
        let child = self.child.lock().unwrap();
        match child.as_ref() {
            Some(c) => kill_tree(c.id(), false),
            None => 0,
        }
    }

    /// Kills the server and all its sessions (SIGKILL): the port refuses
    /// connections until [`Sshd::start_again`].
    pub fn stop(&self) {
        let mut child = self.child.lock().unwrap();
        if let Some(mut c) = child.take() {
            kill_tree(c.id(), true);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again after [`Sshd::stop`]: same port, keys, chroot.
    pub fn start_again(&self) {
        assert!(self.pid().is_none(), "sshd is running; stop() it first");
        let start = Instant::now();
        loop {
            match self.launch() {
                Ok(()) => return,
                Err(LaunchError::PortTaken) if start.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Err(LaunchError::PortTaken) => panic!(
                    "sshd: port {} stayed taken by someone else; log:\n{}",
                    self.port,
                    self.log_text()
                ),
                Err(LaunchError::Failed(why)) => panic!("sshd did not start again: {why}"),
            }
        }
    }

    fn write_config(&self, host_key: &Path) {
        let d = self.dir.path();
        let config = format!(
            "# sshd of one zimfarm-worker test (tests/common/sshd.rs)\n\
             ListenAddress 127.0.0.1:{port}\n\
             HostKey {host_key}\n\
             PidFile {pid}\n\
             AuthorizedKeysFile {ak}\n\
             StrictModes no\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             HostbasedAuthentication no\n\
             GSSAPIAuthentication no\n\
             AuthenticationMethods publickey\n\
             PermitRootLogin no\n\
             UsePAM no\n\
             AllowUsers {user}\n\
             AllowTcpForwarding no\n\
             AllowAgentForwarding no\n\
             X11Forwarding no\n\
             PermitTTY no\n\
             MaxStartups 64\n\
             Subsystem sftp internal-sftp\n\
             ForceCommand internal-sftp\n\
             ChrootDirectory {chroot}\n\
             LogLevel VERBOSE\n\
             {extra}",
            port = self.port,
            host_key = host_key.display(),
            pid = d.join("sshd.pid").display(),
            ak = self.authorized_keys.display(),
            user = SFTP_USER,
            chroot = self.chroot.path().display(),
            extra = self.extra_config,
        );
        fs::write(&self.config, config).expect("sshd_config");
    }

    /// Runs sshd and waits until it listens on `self.port` and answers with
    /// its banner.
    fn launch(&self) -> Result<(), LaunchError> {
        let mut slot = self.child.lock().unwrap();
        assert!(slot.is_none());
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("sshd log");
        let from = log.metadata().map(|m| m.len()).unwrap_or(0) as usize;
        let mut child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("sshd log"))
            .stderr(log)
            .spawn()
            .expect("run /usr/sbin/sshd");
        let listening = format!("Server listening on 127.0.0.1 port {}.", self.port);
        let start = Instant::now();
        loop {
            let text = self.log_text();
            let text = text.get(from..).unwrap_or("");
            if let Some(status) = child.try_wait().expect("try_wait sshd") {
                return Err(
                    if text.contains("Address already in use") || text.contains("Cannot bind") {
                        LaunchError::PortTaken
                    } else {
                        LaunchError::Failed(format!("sshd exited with {status}; log:\n{text}"))
                    },
                );
            }
            if text.contains(&listening)
                && banner(self.port).is_some_and(|b| b.starts_with("SSH-2.0-"))
            {
                *slot = Some(child);
                return Ok(());
            }
            if start.elapsed() > START_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LaunchError::Failed(format!(
                    "no SSH banner on 127.0.0.1:{} within {START_TIMEOUT:?}; log:\n{text}",
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "---- sshd 127.0.0.1:{} log ----\n{}",
                self.port,
                self.log_text()
            );
        }
        // The temp dirs (instance files, chroot) are removed by their own
        // Drop, after this.
    }
}

// ------------------------------------------------------------------ helpers

fn preflight() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        let hint = "run `bash scripts/test-env.sh` as root first";
        let base =
            fs::metadata(CHROOT_BASE).unwrap_or_else(|e| panic!("{CHROOT_BASE}: {e} ({hint})"));
        use std::os::unix::fs::MetadataExt;
        assert!(
            base.uid() == 0 && base.mode() & 0o022 == 0,
            "{CHROOT_BASE} must be root-owned and not group/other-writable ({hint})"
        );
        assert!(Path::new(SSHD).exists(), "{SSHD} missing ({hint})");
        assert!(
            Path::new("/run/sshd").is_dir(),
            "/run/sshd missing ({hint})"
        );
        sftp_user_ids();
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")),
            "the sshd fixture needs root (ChrootDirectory)"
        );
    });
}

/// (uid, gid) of the SFTP user, from /etc/passwd.
fn sftp_user_ids() -> (u32, u32) {
    let passwd = fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == SFTP_USER)
        .map(|f| (f[2].parse().unwrap(), f[3].parse().unwrap()))
        .unwrap_or_else(|| {
            panic!("no user {SFTP_USER}: run `bash scripts/test-env.sh` as root first")
        })
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The identification line the server sends first, if it answers.
fn banner(port: u16) -> Option<String> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\n") && buf.len() < 256 {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => break,
        }
    }
    // Say goodbye properly, so the log reads "Connection closed", not
    // "invalid format".
    let _ = s.write_all(b"SSH-2.0-zimfarm-test-probe\r\n");
    Some(String::from_utf8_lossy(&buf).trim_end().to_owned())
}

/// Runs ssh-keygen to make a key pair at `path` (+ `.pub`).
fn keygen(path: &Path, args: &[&str], comment: &str) {
    run_ok(
        Command::new(SSH_KEYGEN)
            .arg("-q")
            .args(args)
            .args(["-C", comment, "-f"])
            .arg(path)
            .stdin(Stdio::null()),
        &format!("ssh-keygen {args:?}"),
    );
}

/// `type base64` of a .pub file, without its comment.
fn public_key_line(pub_path: &Path) -> String {
    let text =
        fs::read_to_string(pub_path).unwrap_or_else(|e| panic!("{}: {e}", pub_path.display()));
    let mut fields = text.split_whitespace();
    let (Some(kind), Some(blob)) = (fields.next(), fields.next()) else {
        panic!("{}: not a public key: {text:?}", pub_path.display())
    };
    format!("{kind} {blob}")
}

/// `SHA256:...` of a public key, by `ssh-keygen -lf`.
fn fingerprint(pub_path: &Path) -> String {
    let out = Command::new(SSH_KEYGEN)
        .args(["-E", "sha256", "-lf"])
        .arg(pub_path)
        .output()
        .expect("run ssh-keygen -lf");
    assert!(out.status.success(), "ssh-keygen -lf failed");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .expect("ssh-keygen -lf output")
        .to_owned()
}

/// Copies a private key (mode 0600) and its .pub (0644).
fn copy_key(src: &Path, dest: &Path) {
    fs::copy(src, dest).expect("copy key");
    set_mode(dest, 0o600);
    let dest_pub = dest.with_extension("pub");
    fs::copy(src.with_extension("pub"), &dest_pub).expect("copy public key");
    set_mode(&dest_pub, 0o644);
}

/// The path of a cached private key `name`, generated with `args` the first
/// time. The cache is shared by every test process (and run): a key is made
/// in a dir of its own, which is then renamed into place, so a reader never
/// sees half a key pair.
fn cached_key(name: &str, args: &[&str]) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sshd-fixture-keys");
    let dir = cache.join(name);
    let key = dir.join("key");
    let complete = || key.exists() && key.with_extension("pub").exists();
    if complete() {
        return key;
    }
    // A leftover of something that went wrong: start afresh.
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&cache).expect("key cache dir");
    let tmp = tempfile::Builder::new()
        .prefix(".gen-")
        .tempdir_in(&cache)
        .expect("key cache temp dir");
    keygen(
        &tmp.path().join("key"),
        args,
        &format!("zimfarm-test-{name}"),
    );
    // Fails when another process renamed its own key pair into place first:
    // then that one is used, and ours removed with `tmp`.
    let _ = fs::rename(tmp.path(), &dir);
    assert!(complete(), "key cache {}: incomplete", dir.display());
    key
}

// ------------------------------------------------------------- processes

/// ppid -> children, from /proc/<pid>/stat.
fn children_map() -> HashMap<u32, Vec<u32>> {
    let mut map: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return map;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parens.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        if state == Some("Z") || state == Some("X") {
            continue;
        }
        if let Some(ppid) = fields.next().and_then(|p| p.parse::<u32>().ok()) {
            map.entry(ppid).or_default().push(pid);
        }
    }
    map
}

fn descendants_in(map: &HashMap<u32, Vec<u32>>, roots: &[u32]) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo: Vec<u32> = roots.to_vec();
    while let Some(p) = todo.pop() {
        for &c in map.get(&p).into_iter().flatten() {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

fn descendants(root: u32) -> Vec<u32> {
    descendants_in(&children_map(), &[root])
}

fn signal(pids: &[u32], sig: &str) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg("-s")
        .arg(sig)
        .arg("--")
        .args(pids.iter().map(u32::to_string))
        .stderr(Stdio::null())
        .status();
}

/// SIGKILLs every descendant of `root` (and `root` itself if `with_root`),
/// all at once, so that none can react (a session process that saw its
/// child die would close the SSH channel cleanly instead of the connection
/// just dropping). They are SIGSTOPped first, until no new one shows up, so
/// that none can fork a child that would escape. Returns how many
/// descendants there were.
fn kill_tree(root: u32, with_root: bool) -> usize {
    if with_root {
        signal(&[root], "STOP");
    }
    let mut frozen: HashSet<u32> = HashSet::new();
    for _ in 0..50 {
        let mut roots: Vec<u32> = frozen.iter().copied().collect();
        roots.push(root);
        let new: Vec<u32> = descendants_in(&children_map(), &roots)
            .into_iter()
            .filter(|p| !frozen.contains(p))
            .collect();
        if new.is_empty() {
            break;
        }
        signal(&new, "STOP");
        frozen.extend(new);
    }
    let mut pids: Vec<u32> = frozen.into_iter().collect();
    let n = pids.len();
    if with_root {
        pids.push(root);
    }
    signal(&pids, "KILL");
    n
}

/// Removes what test processes that died (SIGKILL, abort) left behind:
/// their sshd listeners, instance dirs and chroots. Once per process.
fn sweep_stale_instances() {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(|| {
        let alive = |pid: &str| Path::new("/proc").join(pid).exists();
        // "<pid>-<seq>-<random>" -> owner pid
        let owner = |name: &str| name.split('-').next().map(str::to_owned);

        let tmp = std::env::temp_dir();
        let mut dead_tags = Vec::new();
        for e in fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(INSTANCE_PREFIX) else {
                continue;
            };
            if owner(rest).is_some_and(|p| !p.is_empty() && !alive(&p)) {
                dead_tags.push(e.path());
            }
        }
        if !dead_tags.is_empty() {
            // Their listeners: `/usr/sbin/sshd -D -e -f <dead dir>/sshd_config`.
            for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline);
                if dead_tags
                    .iter()
                    .any(|d| cmdline.contains(&*d.join("sshd_config").to_string_lossy()))
                {
                    kill_tree(pid, true);
                }
            }
            for d in &dead_tags {
                let _ = fs::remove_dir_all(d);
            }
        }
        for e in fs::read_dir(CHROOT_BASE).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if owner(&name).is_some_and(|p| p.parse::<u32>().is_ok() && !alive(&p)) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    });
}
