//! Progress-reading benchmark: what one `task-progress` reading of a task
//! costs the host (issue 28 says it must not slow the scrape). Prints, per
//! reading part:
//!
//! - the bounded disk walk of a task dir of 1,000 files, and of one of
//!   200,000 files (the walk stops at 100,000 entries: its cost is bounded
//!   whatever the scraper made);
//! - reading the scraper's progress file;
//! - one one-shot Docker stats call on a running container (when Docker
//!   and the stand-in image `openzim/youtube:test` are there).
//!
//! Each is CPU and wall time per reading. Needs no service but Docker for
//! the last part: `cargo bench --bench progress`.

use std::path::Path;
use std::time::{Duration, Instant};

use zimfarm_worker::progress::{MAX_WALK_ENTRIES, STATS_FILE_NAME, disk_usage, read_stats_file};
use zimfarm_worker::taskfs::DirHandle;

/// CPU time of this process so far (user + system).
fn cpu() -> Duration {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    tv(usage.user_time()) + tv(usage.system_time())
}

fn measure(what: &str, rounds: u32, mut f: impl FnMut()) {
    f();
    let (wall, cpu0) = (Instant::now(), cpu());
    for _ in 0..rounds {
        f();
    }
    let (wall, cpu) = (wall.elapsed() / rounds, (cpu() - cpu0) / rounds);
    println!(
        "{what:<52} {:>9.3} ms wall  {:>9.3} ms CPU per reading",
        wall.as_secs_f64() * 1e3,
        cpu.as_secs_f64() * 1e3
    );
}

fn files(dir: &Path, n: usize) {
    for i in 0..n {
        let sub = dir.join(format!("d{}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&sub).expect("mkdir");
        }
        std::fs::write(sub.join(format!("f{i}")), b"x").expect("write");
    }
}

fn main() {
    let small = tempfile::tempdir().expect("tempdir");
    files(small.path(), 1_000);
    std::fs::write(
        small.path().join(STATS_FILE_NAME),
        br#"{"done": 410, "total": 1000}"#,
    )
    .expect("write");
    let dir = DirHandle::open(small.path()).expect("open");
    measure("disk walk, task dir of 1,000 files", 50, || {
        let usage = disk_usage(&dir, MAX_WALK_ENTRIES).expect("walk");
        assert!(!usage.partial);
    });
    measure("progress file read", 2_000, || {
        read_stats_file(&dir).expect("read");
    });

    let big = tempfile::tempdir().expect("tempdir");
    files(big.path(), 200_000);
    let dir = DirHandle::open(big.path()).expect("open");
    measure("disk walk, task dir of 200,000 files (bounded)", 5, || {
        let usage = disk_usage(&dir, MAX_WALK_ENTRIES).expect("walk");
        assert!(usage.partial);
    });

    docker_stats();
}

/// One-shot stats of a running stand-in container, when Docker is there.
fn docker_stats() {
    let name = format!("zimfarm-bench-progress-{}", std::process::id());
    let started = std::process::Command::new("docker")
        .args([
            "run",
            "-d",
            "--rm",
            "--network",
            "none",
            "--name",
            &name,
            "openzim/youtube:test",
            "sleep",
            "60",
        ])
        .output();
    match started {
        Ok(out) if out.status.success() => {}
        _ => {
            println!("docker stats: skipped (no Docker or no openzim/youtube:test image)");
            return;
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let docker = zimfarm_worker::docker::DockerClient::connect()
            .await
            .expect("docker");
        // The first call after a start may wait for the engine's first
        // figures: not measured.
        let _ = docker.usage(&name).await;
        let rounds = 20;
        let (wall, cpu0) = (Instant::now(), cpu());
        for _ in 0..rounds {
            let usage = docker.usage(&name).await.expect("stats");
            assert!(usage.is_some());
        }
        let (wall, cpu) = (wall.elapsed() / rounds, (cpu() - cpu0) / rounds);
        println!(
            "{:<52} {:>9.3} ms wall  {:>9.3} ms CPU per reading",
            "docker stats, one shot",
            wall.as_secs_f64() * 1e3,
            cpu.as_secs_f64() * 1e3
        );
    });
    let _ = std::process::Command::new("docker")
        .args(["rm", "-f", &name])
        .output();
}
