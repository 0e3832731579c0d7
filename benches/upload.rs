//! Upload benchmark: the worker's SFTP uploader against OpenSSH's `sftp`
//! `put` of the same file, to a real OpenSSH sshd on 127.0.0.1 (the test
//! fixture, `tests/common/sshd.rs`), in the same run.
//!
//! Scenarios: 1 GiB straight to the loopback sshd, and 256 MiB through a
//! delay proxy (written here: every chunk read in either direction is
//! delivered RTT/2 later, in order, with no bandwidth limit) at 10 ms and
//! 50 ms of round-trip delay, because volunteers upload over the internet.
//! Each client runs 3 times per scenario, alternating; the medians, the
//! ratios (OpenSSH time / worker time: above 1 the worker is faster) and the
//! worker's peak RSS are printed with PASS/MISS against the targets.
//!
//! The file is a well-formed ZIM-shaped file with incompressible filler, so
//! the worker's inline ZIM MD5 check is part of what is measured. The worker
//! side runs in a child process (this binary, re-executed with
//! `BENCH_UPLOAD_CHILD=1`) on a current-thread runtime like the worker
//! binary's, and reports its `VmHWM`.
//!
//! Needs root and `scripts/test-env.sh`; run with
//! `BENCH_ONLY=upload scripts/bench.sh` or `cargo bench --bench upload`.
//! Knobs: `BENCH_UPLOAD_SIZE_MB` (loopback file, MiB, default 1024; 0 skips
//! it), `BENCH_UPLOAD_DELAY_SIZE_MB` (delayed file, MiB, default 256),
//! `BENCH_UPLOAD_RTTS_MS` (default `10,50`; empty skips them), `BENCH_RUNS`
//! (default 3), `BENCH_UPLOAD_NO_CHECK_ROW` (default 1: also time the worker
//! on the same bytes under a non-`.zim` name, without the MD5 check, for
//! information; 0 skips it).
//!
//! Besides the wall times (process spawn to exit, for every client), it
//! prints the CPU seconds of each client's processes (their `cutime`) and of
//! the sshd session processes serving it (sampled from `/proc`): on a small
//! machine the client and the server share the cores, so CPU is time.

#[allow(dead_code)]
#[path = "../tests/common/sshd.rs"]
mod sshd;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sshd::{KeyKind, SFTP_USER, Sshd};
use tokio_util::sync::CancellationToken;
use zimfarm_worker::config::WarehouseSettings;
use zimfarm_worker::warehouse::zim::synthetic_zim;
use zimfarm_worker::warehouse::{UploadItem, Warehouse};

/// The warehouse directory the files go to (`/zim/bench`).
const WAREHOUSE_PATH: &str = "/bench";
const CHILD_ENV: &str = "BENCH_UPLOAD_CHILD";
/// OpenSSH's AES-GCM cipher, measured beside its default.
const AES_GCM: &str = "aes128-gcm@openssh.com";
const TARGET_LOOPBACK: f64 = 1.2;
const TARGET_DELAYED: f64 = 1.0;
const TARGET_RSS_BYTES: u64 = 64_000_000;
/// `getconf CLK_TCK` on Linux.
const CLOCK_TICKS: f64 = 100.0;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn main() {
    if std::env::var(CHILD_ENV).as_deref() == Ok("1") {
        child();
        return;
    }
    let loop_mib: u64 = env_or("BENCH_UPLOAD_SIZE_MB", 1024);
    let delay_mib: u64 = env_or("BENCH_UPLOAD_DELAY_SIZE_MB", 256);
    let runs: usize = env_or::<usize>("BENCH_RUNS", 3).max(1);
    let no_check_row = env_or::<u8>("BENCH_UPLOAD_NO_CHECK_ROW", 1) != 0;
    let rtts: Vec<u64> = std::env::var("BENCH_UPLOAD_RTTS_MS")
        .unwrap_or_else(|_| "10,50".to_owned())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();

    let sshd = Sshd::start();
    let key = sshd.user_key(KeyKind::Ed25519);
    // The remote directory exists beforehand: `sftp put` does not make it.
    let remote_dir = sshd
        .chroot()
        .join("zim")
        .join(WAREHOUSE_PATH.trim_start_matches('/'));
    make_user_dir(sshd.chroot(), &remote_dir);

    let data = tempfile::Builder::new()
        .prefix("bench-upload-")
        .tempdir_in(data_dir())
        .expect("data dir");

    println!();
    println!("upload benchmark: the worker's uploader vs OpenSSH `sftp put`, same sshd, same file");
    println!(
        "  machine  {} cores, load average {} at the start (client and server share the cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
    println!(
        "  server   OpenSSH sshd on 127.0.0.1 (internal-sftp, chroot), {}",
        openssh_version()
    );
    println!(
        "  file     synthetic ZIM, incompressible filler, on disk in {} (page-cached for both clients)",
        data.path().display()
    );
    println!(
        "           the worker checks the ZIM MD5 inline as it reads: that is in its times; sftp does no check"
    );
    println!(
        "  worker   child process, current-thread runtime, ciphers as in src/warehouse/session.rs \
         (AES-GCM first); times are wall clock, spawn → exit, for every client"
    );
    println!(
        "  OpenSSH  sftp with its default cipher ({}) and with -c {AES_GCM};",
        default_cipher()
    );
    println!(
        "           ratios are OpenSSH time / worker time against the FASTER of the two (>1: the worker is faster)"
    );

    let mut scenarios: Vec<Scenario> = Vec::new();
    if loop_mib > 0 {
        scenarios.push(Scenario {
            label: "loopback".to_owned(),
            mib: loop_mib,
            rtt_ms: None,
            target: TARGET_LOOPBACK,
        });
    }
    for &rtt in &rtts {
        scenarios.push(Scenario {
            label: format!("RTT {rtt} ms"),
            mib: delay_mib,
            rtt_ms: Some(rtt),
            target: TARGET_DELAYED,
        });
    }

    let mut files: Vec<(u64, PathBuf)> = Vec::new();
    let mut results = Vec::new();
    let mut max_hwm_kib = 0u64;
    for sc in &scenarios {
        let local = match files.iter().find(|(m, _)| *m == sc.mib) {
            Some((_, p)) => p.clone(),
            None => {
                let p = data.path().join(format!("bench_upload_{}M.zim", sc.mib));
                let t = Instant::now();
                write_zim(&p, sc.mib << 20);
                println!(
                    "  (wrote {} MiB test file in {:.1} s)",
                    sc.mib,
                    t.elapsed().as_secs_f64()
                );
                files.push((sc.mib, p.clone()));
                p
            }
        };
        let size = std::fs::metadata(&local).unwrap().len();
        let name = local.file_name().unwrap().to_str().unwrap().to_owned();

        let proxy = sc.rtt_ms.map(|rtt| {
            let half = Duration::from_millis(rtt) / 2;
            let proxy = DelayProxy::start(sshd.addr(), half);
            let (echo_rtt, bulk) = check_proxy(half);
            println!(
                "  delay proxy {rtt} ms: echo round trip through it median {:.1} ms (min {:.1}, max {:.1}); \
                 one-way bulk through it {:.0} MB/s",
                echo_rtt.0, echo_rtt.1, echo_rtt.2, bulk
            );
            proxy
        });
        let port = proxy.as_ref().map_or(sshd.port(), |p| p.port);
        let known_hosts = sshd.known_hosts_file_for_port(port);

        let mut clients = vec![
            Client::Worker { zim_check: true },
            Client::OpenSsh(None),
            Client::OpenSsh(Some(AES_GCM)),
        ];
        if no_check_row {
            clients.push(Client::Worker { zim_check: false });
        }
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); clients.len()];
        let mut client_cpu: Vec<Vec<f64>> = vec![Vec::new(); clients.len()];
        let mut server_cpu: Vec<Vec<f64>> = vec![Vec::new(); clients.len()];
        let mut inner: Vec<f64> = Vec::new();
        for run in 0..runs {
            // The order rotates: each client goes first in turn.
            for k in 0..clients.len() {
                let i = (k + run) % clients.len();
                let remote_name = match clients[i] {
                    Client::Worker { zim_check: false } => no_check_name(&name),
                    _ => name.clone(),
                };
                let remote = remote_dir.join(&remote_name);
                clear_remote(&remote);
                let cpu0 = children_cpu();
                let ((secs, report), server) = with_session_cpu(&sshd, || {
                    let t = Instant::now();
                    let report = match clients[i] {
                        Client::Worker { .. } => {
                            Some(run_worker(&local, &remote_name, port, &key, &known_hosts))
                        }
                        Client::OpenSsh(cipher) => {
                            run_sftp(&local, &name, port, &key, &known_hosts, cipher, data.path());
                            None
                        }
                    };
                    (t.elapsed().as_secs_f64(), report)
                });
                if let (Client::Worker { zim_check }, Some(out)) = (clients[i], report) {
                    assert!(
                        out["zim_verified"] == zim_check && out["skipped"] == false,
                        "worker report: {out}"
                    );
                    max_hwm_kib = max_hwm_kib.max(out["vmhwm_kib"].as_u64().unwrap());
                    if zim_check {
                        inner.push(out["secs"].as_f64().unwrap());
                    }
                }
                times[i].push(secs);
                client_cpu[i].push(children_cpu() - cpu0);
                server_cpu[i].push(server);
                let got = std::fs::metadata(&remote).map(|m| m.len()).ok();
                assert_eq!(
                    got,
                    Some(size),
                    "{} left no complete {}",
                    clients[i].label(),
                    remote.display()
                );
                clear_remote(&remote);
            }
        }
        drop(proxy);
        results.push(Outcome {
            scenario: sc.label.clone(),
            mib: sc.mib,
            target: sc.target,
            clients: clients.iter().map(Client::label).collect(),
            times,
            client_cpu,
            server_cpu,
            worker_inner: median(&inner),
        });
    }

    println!();
    println!(
        "{:<12} {:>5}  {:<26} {:>20} {:>8} {:>6} {:>8} {:>8}",
        "scenario", "MiB", "client", "runs (s)", "median s", "MB/s", "cli CPU", "sshd CPU"
    );
    for o in &results {
        for (i, label) in o.clients.iter().enumerate() {
            let runs: Vec<String> = o.times[i].iter().map(|t| format!("{t:.2}")).collect();
            let m = median(&o.times[i]);
            println!(
                "{:<12} {:>5}  {:<26} {:>20} {:>8.2} {:>6.0} {:>8.2} {:>8.2}",
                if i == 0 { o.scenario.as_str() } else { "" },
                if i == 0 {
                    o.mib.to_string()
                } else {
                    String::new()
                },
                label,
                runs.join(" "),
                m,
                (o.mib << 20) as f64 / m / 1e6,
                median(&o.client_cpu[i]),
                median(&o.server_cpu[i]),
            );
        }
    }
    println!(
        "  (medians; cli CPU: user + system seconds of the client's processes; sshd CPU: of the \
         session processes serving it, sampled)"
    );
    if no_check_row {
        println!(
            "  * the same file uploaded under a name not ending in .zim, so without the ZIM MD5 \
             check: for information, not in the ratios (BENCH_UPLOAD_NO_CHECK_ROW=0 drops it)"
        );
    }
    println!();
    println!("ratios: OpenSSH (faster cipher) median / worker median; > 1: the worker is faster");
    let mut all_pass = true;
    for o in &results {
        let worker = median(&o.times[0]);
        let (best, which) = (1..=2)
            .map(|i| (median(&o.times[i]), o.clients[i].as_str()))
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .unwrap();
        let ratio = best / worker;
        let pass = ratio >= o.target;
        all_pass &= pass;
        println!(
            "  {:<12} {:>6.3}x  (vs {which}; worker in-process median {:.2} s)  target >= {:.1}x  {}",
            o.scenario,
            ratio,
            o.worker_inner,
            o.target,
            if pass { "PASS" } else { "MISS" }
        );
    }
    let hwm = max_hwm_kib * 1024;
    let pass = hwm <= TARGET_RSS_BYTES;
    all_pass &= pass;
    println!(
        "  worker peak RSS (VmHWM, max over every run): {:.1} MB ({:.1} MiB)  target <= {} MB  {}",
        hwm as f64 / 1e6,
        hwm as f64 / (1 << 20) as f64,
        TARGET_RSS_BYTES / 1_000_000,
        if pass { "PASS" } else { "MISS" }
    );
    println!("  overall: {}", if all_pass { "PASS" } else { "MISS" });
    println!("  (load average {} at the end)", load_average());
    if loop_mib != 1024 || delay_mib != 256 || runs < 3 {
        println!(
            "  (the targets are for 1024 MiB on loopback and 256 MiB delayed, 3 runs: with other \
             sizes or fewer runs this is a quick look, not the benchmark)"
        );
    }
}

struct Scenario {
    label: String,
    mib: u64,
    rtt_ms: Option<u64>,
    target: f64,
}

struct Outcome {
    scenario: String,
    mib: u64,
    target: f64,
    clients: Vec<String>,
    /// Seconds per run, per client (`clients` order).
    times: Vec<Vec<f64>>,
    /// CPU seconds (user + system) of the client's processes, and of the
    /// sshd session processes, per run, per client.
    client_cpu: Vec<Vec<f64>>,
    server_cpu: Vec<Vec<f64>>,
    worker_inner: f64,
}

#[derive(Clone, Copy)]
enum Client {
    /// The worker; without the ZIM check when the remote name does not end
    /// in `.zim` (the same bytes otherwise).
    Worker { zim_check: bool },
    /// `sftp`, with this cipher or its default.
    OpenSsh(Option<&'static str>),
}

impl Client {
    fn label(&self) -> String {
        match self {
            Client::Worker { zim_check: true } => "worker".to_owned(),
            Client::Worker { zim_check: false } => "worker, no ZIM check*".to_owned(),
            Client::OpenSsh(None) => "sftp put (default cipher)".to_owned(),
            Client::OpenSsh(Some(c)) => {
                format!("sftp put -c {}", c.trim_end_matches("@openssh.com"))
            }
        }
    }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

// ------------------------------------------------------------ the worker

/// The worker side, in its own process: one upload, then one JSON line
/// with the elapsed seconds and the peak RSS.
fn child() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} unset"));
    let settings = WarehouseSettings {
        host: "127.0.0.1".to_owned(),
        port: var("BENCH_UPLOAD_PORT").parse().expect("port"),
        username: SFTP_USER.to_owned(),
        ssh_key: var("BENCH_UPLOAD_KEY").into(),
        known_hosts: var("BENCH_UPLOAD_KNOWN_HOSTS").into(),
        host_key_pins: Vec::new(),
        // One attempt: a retry would make the figure meaningless.
        upload_retries: 0,
        upload_streams: zimfarm_worker::config::UploadStreams::Fixed(1),
    };
    let local = PathBuf::from(var("BENCH_UPLOAD_FILE"));
    let name = var("BENCH_UPLOAD_NAME");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let start = Instant::now();
    let reports = rt
        .block_on(async {
            let warehouse = Warehouse::new(settings).await.expect("load the key");
            warehouse
                .upload(
                    &[UploadItem::output(local, WAREHOUSE_PATH, &name)],
                    &CancellationToken::new(),
                )
                .await
        })
        .unwrap_or_else(|e| panic!("upload failed: {e}"));
    let secs = start.elapsed().as_secs_f64();
    let report = &reports[0];
    let line = serde_json::json!({
        "secs": secs,
        "vmhwm_kib": vmhwm_kib(),
        "bytes_sent": report.bytes_sent,
        "skipped": report.skipped,
        "zim_verified": report.zim_verified,
    });
    println!("{line}");
}

/// The remote name of the same file uploaded without the ZIM check.
fn no_check_name(name: &str) -> String {
    format!("{}.bin", name.trim_end_matches(".zim"))
}

/// Two consecutive fields of `/proc/<pid>/stat`, summed, in clock ticks:
/// `first` 14 is utime (+ stime), 16 cutime (+ cstime).
fn stat_ticks(pid: &str, first: usize) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 3 (state) is the first after "(comm)".
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(first - 3);
    Some(f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?)
}

/// CPU seconds (user + system) of this process's reaped children and
/// theirs: a client run is the difference around it.
fn children_cpu() -> f64 {
    stat_ticks("self", 16).unwrap_or(0) as f64 / CLOCK_TICKS
}

/// Runs `client` and returns what it returns with the CPU seconds of the
/// sshd session processes that served it, sampled from `/proc` while they
/// live (the listener does not reap them all, so its `cutime` misses some).
fn with_session_cpu<R>(sshd: &Sshd, client: impl FnOnce() -> R) -> (R, f64) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut seen: std::collections::HashMap<u32, u64> = Default::default();
            let mut next_scan = Instant::now();
            loop {
                let last = stop.load(Ordering::SeqCst);
                if last || Instant::now() >= next_scan {
                    for pid in sshd.session_pids() {
                        seen.entry(pid).or_insert(0);
                    }
                    next_scan = Instant::now() + Duration::from_millis(100);
                }
                for (pid, ticks) in seen.iter_mut() {
                    if let Some(t) = stat_ticks(&pid.to_string(), 14) {
                        *ticks = (*ticks).max(t);
                    }
                }
                if last {
                    return seen.values().sum::<u64>() as f64 / CLOCK_TICKS;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let out = client();
        // The sessions end a moment after the client.
        let waited = Instant::now();
        while !sshd.session_pids().is_empty() && waited.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::SeqCst);
        (out, sampler.join().expect("sampler"))
    })
}

fn vmhwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM in /proc/self/status")
}

fn run_worker(
    local: &Path,
    name: &str,
    port: u16,
    key: &Path,
    known_hosts: &Path,
) -> serde_json::Value {
    let out = Command::new(std::env::current_exe().expect("current exe"))
        .env(CHILD_ENV, "1")
        .env("BENCH_UPLOAD_FILE", local)
        .env("BENCH_UPLOAD_NAME", name)
        .env("BENCH_UPLOAD_PORT", port.to_string())
        .env("BENCH_UPLOAD_KEY", key)
        .env("BENCH_UPLOAD_KNOWN_HOSTS", known_hosts)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run the worker child");
    assert!(
        out.status.success(),
        "the worker child failed: {}",
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().expect("the child's JSON line");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("child said {text:?}: {e}"))
}

// --------------------------------------------------------------- OpenSSH

fn run_sftp(
    local: &Path,
    name: &str,
    port: u16,
    key: &Path,
    known_hosts: &Path,
    cipher: Option<&str>,
    scratch: &Path,
) {
    let batch = scratch.join("sftp-batch");
    std::fs::write(
        &batch,
        format!(
            "put \"{}\" \"/zim{WAREHOUSE_PATH}/{name}\"\n",
            local.display()
        ),
    )
    .expect("batch file");
    let mut cmd = Command::new("sftp");
    cmd.arg("-b")
        .arg(&batch)
        .arg("-P")
        .arg(port.to_string())
        .arg("-i")
        .arg(key)
        .args(["-o", "StrictHostKeyChecking=yes", "-o"])
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args(["-o", "BatchMode=yes"]);
    if let Some(c) = cipher {
        cmd.args(["-c", c]);
    }
    let out = cmd
        .arg(format!("{SFTP_USER}@127.0.0.1"))
        .stdin(Stdio::null())
        .output()
        .expect("run sftp");
    assert!(
        out.status.success(),
        "sftp failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn openssh_version() -> String {
    Command::new("ssh")
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_default()
}

/// The first cipher of the client's default list (`ssh -G`).
fn default_cipher() -> String {
    Command::new("ssh")
        .args(["-G", "127.0.0.1"])
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("ciphers "))
                .and_then(|l| l.split(',').next())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

// ------------------------------------------------------------ the files

/// A temp dir on a real disk: /tmp unless it is a tmpfs, else `target/tmp`.
fn data_dir() -> PathBuf {
    let tmp = std::env::temp_dir();
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let fstype = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && tmp.starts_with(f[1])).then(|| (f[1].len(), f[2].to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, t)| t)
        .unwrap_or_default();
    if fstype == "tmpfs" || fstype == "ramfs" {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
    } else {
        tmp
    }
}

/// Writes a well-formed ZIM-shaped file of `size` bytes with incompressible
/// (xorshift) filler.
fn write_zim(path: &Path, size: u64) {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    for chunk in synthetic_zim(size, |buf| {
        for word in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
        }
    }) {
        f.write_all(&chunk).unwrap();
    }
    f.flush().unwrap();
}

/// The remote directory, owned by the SFTP user like the chroot's `zim/`.
fn make_user_dir(chroot: &Path, dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(chroot.join("zim")).expect("chroot zim/");
    std::fs::create_dir_all(dir).expect("remote dir");
    std::os::unix::fs::chown(dir, Some(owner.uid()), Some(owner.gid())).expect("chown remote dir");
}

/// Removes the uploaded file (and a leftover `.tmp`): the uploader skips a
/// file that is already there with the same size.
fn clear_remote(remote: &Path) {
    let _ = std::fs::remove_file(remote);
    let mut tmp = remote.as_os_str().to_owned();
    tmp.push(".tmp");
    let _ = std::fs::remove_file(tmp);
}

// ------------------------------------------------------- the delay proxy

/// A TCP proxy on 127.0.0.1 that delivers every chunk it reads, in either
/// direction, `one_way` after reading it, in order, without limiting the
/// bandwidth: a reader thread timestamps chunks into an unbounded channel,
/// a writer thread sleeps until each is due and writes it. Round trips
/// through it take 2 × `one_way` more. Plain threads, not tokio: tokio's
/// timer rounds every sleep up to its next millisecond tick, which made a
/// 10 ms proxy measure 12.4 ms; `nanosleep` is good to about 0.1 ms.
/// Stops accepting when dropped.
struct DelayProxy {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the acceptor, which then sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

impl DelayProxy {
    fn start(upstream: String, one_way: Duration) -> DelayProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                delayed_pipe(&client, &server, one_way);
                delayed_pipe(&server, &client, one_way);
            }
        });
        DelayProxy { port, stop }
    }
}

/// One direction of a proxied connection: `from` → `to`, `delay` late.
fn delayed_pipe(from: &TcpStream, to: &TcpStream, delay: Duration) {
    let mut from = from.try_clone().expect("clone socket");
    let mut to = to.try_clone().expect("clone socket");
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        // Dropping `tx` ends the writer once it has delivered the rest.
    });
    std::thread::spawn(move || {
        for (due, chunk) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&chunk).is_err() {
                // The peer is gone: end both directions.
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// Measures the proxy itself: the round trip of small echoes through it
/// (median, min, max in ms) and the one-way throughput of a bulk transfer
/// through it (MB/s, the delay itself subtracted).
fn check_proxy(one_way: Duration) -> ((f64, f64, f64), f64) {
    // An echo server behind a proxy of the same delay.
    let echo = TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        if let Ok((s, _)) = echo.accept() {
            let _ = s.set_nodelay(true);
            let mut r = s.try_clone().unwrap();
            let mut w = s;
            let _ = std::io::copy(&mut r, &mut w);
        }
    });
    let proxy = DelayProxy::start(echo_addr, one_way);
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    s.set_nodelay(true).unwrap();
    let mut rtts = Vec::new();
    let mut buf = [0u8; 64];
    for i in 0..12u8 {
        let t = Instant::now();
        s.write_all(&[i; 64]).unwrap();
        s.read_exact(&mut buf).unwrap();
        if i >= 2 {
            rtts.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    drop(s);
    drop(proxy);
    let min = rtts.iter().copied().fold(f64::INFINITY, f64::min);
    let max = rtts.iter().copied().fold(0.0, f64::max);

    // Bulk: 256 MiB one way into a sink behind the proxy.
    const BULK: usize = 256 << 20;
    let sink = TcpListener::bind("127.0.0.1:0").unwrap();
    let sink_addr = sink.local_addr().unwrap().to_string();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = sink.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < BULK {
            match s.read(&mut buf).unwrap() {
                0 => break,
                n => got += n,
            }
        }
        Instant::now()
    });
    let proxy = DelayProxy::start(sink_addr, one_way);
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    let block = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    for _ in 0..BULK >> 20 {
        s.write_all(&block).unwrap();
    }
    let done = reader.join().unwrap();
    let secs = (done - t).saturating_sub(one_way).as_secs_f64().max(1e-6);
    ((median(&rtts), min, max), BULK as f64 / secs / 1e6)
}
