//! The disk of ZIM_DIR stays bounded (SPEC §8), against the real Docker
//! engine, the stand-in images and an sshd warehouse: kept task dirs are
//! swept by age at start and under disk pressure before a task would be
//! refused, `check` lists them with their sizes, and a scrape that fills a
//! small tmpfs fails saying so, leaves its dir removed and the record of
//! ended tasks readable, and the next task (and the next worker) runs; a
//! record cut by a full disk does not swallow the next one.
//!
//! The tmpfs tests mount one (they run as root); the worker's own log is
//! kept outside it, in a temp dir, so only the working dir fills up.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::sshd::Sshd;
use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

/// A tmpfs of `mib` MiB mounted on a temp dir, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(status.success(), "mounting a tmpfs needs root");
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn free_mib(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-m"])
            .arg(self.path())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("--lazy")
            .arg(self.dir.path())
            .status();
    }
}

/// A Docker-runner worker whose working dir is `work` (its log elsewhere).
fn docker_worker(
    vh: &Vhost,
    logs: &Path,
    work: &Path,
    node: &str,
    sshd: &Sshd,
    extra: WorkerEnv,
) -> WorkerProc {
    let work = work.display();
    let env = WorkerEnv::docker(sshd)
        .set("WORKING_DIR", &work)
        .set("ZIM_DIR", &work);
    let worker = WorkerProc::start(vh, logs, node, &env.merge(extra));
    worker.wait_connected();
    worker
}

/// The metrics `m` count one kept dir swept for `reason`.
fn assert_swept_once(m: &Value, reason: &str) {
    let swept = sample(
        m,
        "zimfarm_worker_kept_dirs_swept_total",
        &[("reason", reason)],
    );
    assert_eq!(swept, Some(1.0), "{m}");
}

/// A task dir as a failed upload leaves it: a ZIM of `mib` MiB, and the
/// generate marker in the worker's own dir, both last changed `age` ago.
fn kept_dir(work: &Path, id: &str, mib: usize, age: Duration) -> PathBuf {
    let dir = work.join(id);
    std::fs::create_dir(&dir).unwrap();
    let zim = dir.join("wikipedia_en_test.zim");
    std::fs::write(&zim, vec![7u8; mib << 20]).unwrap();
    let marker =
        json!({"files": [{"name": "wikipedia_en_test.zim", "size": mib << 20}], "log": null});
    // The marker is in the worker's own dir of the task.
    let own = work.join(".zimfarm").join(id);
    std::fs::create_dir_all(&own).unwrap();
    std::fs::write(own.join("generated.json"), marker.to_string()).unwrap();
    for d in [&dir, &own] {
        std::fs::File::open(d)
            .unwrap()
            .set_modified(SystemTime::now() - age)
            .unwrap();
    }
    dir
}

/// `check`'s disk line for a worker whose ZIM_DIR is `work` (the other
/// checks may fail: nothing else is set up).
fn check_disk_line(vh: &Vhost, work: &Path, min_free_mb: &str) -> String {
    let env = WorkerEnv::new()
        .set("TASK_RUNNER", "docker")
        .set("MIN_FREE_DISK_MB", min_free_mb)
        .set("WAREHOUSE_HOST", "127.0.0.1")
        .set("WAREHOUSE_PORT", 1)
        .vars(vh, work, "disk-check");
    let out = run_worker(&["check"], &env);
    let report = output_text(&out);
    report
        .lines()
        .find(|l| l.contains(" disk "))
        .unwrap_or_else(|| panic!("no disk line in:\n{report}"))
        .to_owned()
}

fn wait_gone(path: &Path) {
    eventually(
        T,
        Duration::from_millis(50),
        || !path.exists(),
        || format!("{} is still there", path.display()),
    );
}

#[test]
fn kept_dirs_are_listed_by_check_and_swept_by_age_at_start() {
    let sshd = Sshd::start();
    let Services { vh, dir: logs } = Services::new("disk-age");
    let work = tempfile::tempdir().unwrap();
    let old = task_id();
    let fresh = task_id();
    let old_dir = kept_dir(work.path(), &old, 2, 10 * DAY);
    let fresh_dir = kept_dir(work.path(), &fresh, 3, Duration::ZERO);
    std::fs::create_dir(work.path().join("not a task id")).unwrap();

    // `check` lists both, oldest first, with their sizes.
    let line = check_disk_line(&vh, work.path(), "1");
    assert!(line.starts_with("ok"), "{line}");
    assert!(line.contains("2 task dir(s) kept (5 MiB"), "{line}");
    let at = |needle: String| {
        line.find(&needle)
            .unwrap_or_else(|| panic!("{needle:?} missing from {line}"))
    };
    let old_at = at(format!("{old} 2 MiB 240 h old"));
    let fresh_at = at(format!("{fresh} 3 MiB 0 h old"));
    assert!(old_at < fresh_at, "oldest first: {line}");
    assert!(!line.contains("not a task id"), "{line}");

    // A worker sweeps the old one as it starts, and keeps the fresh one.
    let addr = free_addr();
    let worker = docker_worker(
        &vh,
        logs.path(),
        work.path(),
        "disk-age",
        &sshd,
        WorkerEnv::new()
            .set("KEPT_DIR_MAX_AGE", 168)
            .set("METRICS_ADDR", &addr),
    );
    worker.wait_log("swept a kept task dir", T);
    assert!(!old_dir.exists());
    assert!(fresh_dir.join("wikipedia_en_test.zim").exists());
    assert!(work.path().join("not a task id").exists());
    let log = worker.log_text();
    let swept = log
        .lines()
        .find(|l| l.contains("swept a kept task dir"))
        .unwrap();
    assert!(
        swept.contains(&old) && swept.contains("age_hours=240") && swept.contains("bytes_freed="),
        "{swept}"
    );
    assert_eq!(log.matches("swept a kept task dir").count(), 1, "{log}");
    let m = scrape(&addr);
    assert_swept_once(&m, "age");
    let bytes = sample(
        &m,
        "zimfarm_worker_kept_dirs_swept_bytes_total",
        &[("reason", "age")],
    )
    .unwrap();
    assert!(bytes >= (2 << 20) as f64, "{bytes}");

    // Its next task runs beside the fresh kept dir, which stays.
    let events = EventsProc::start(&vh, 120);
    let id = Task::mw(json!({})).send(&vh);
    events.wait_task_event("task-succeeded", &id, T);
    assert!(fresh_dir.join("wikipedia_en_test.zim").exists());
}

#[test]
fn under_disk_pressure_a_kept_dir_is_swept_instead_of_refusing_the_task() {
    let sshd = Sshd::start();
    let Services { vh, dir: logs } = Services::new("disk-pressure");
    let fs = Tmpfs::mount(48);
    // Young (no age sweep would take it), but taking most of the disk.
    let kept = task_id();
    let kept_path = kept_dir(fs.path(), &kept, 36, Duration::from_secs(3600));
    assert!(fs.free_mib() < 20, "{} MiB free", fs.free_mib());

    let line = check_disk_line(&vh, fs.path(), "20");
    assert!(
        line.starts_with("FAIL") && line.contains(&format!("{kept} 36 MiB 1 h old")),
        "{line}"
    );

    let addr = free_addr();
    let events = EventsProc::start(&vh, 120);
    let worker = docker_worker(
        &vh,
        logs.path(),
        fs.path(),
        "disk-pressure",
        &sshd,
        WorkerEnv::new()
            .set("MIN_FREE_DISK_MB", 20)
            .set("METRICS_ADDR", &addr),
    );
    assert!(kept_path.exists(), "swept before any task needed the space");
    let id = Task::mw(json!({})).send(&vh);
    events.wait_task_event("task-succeeded", &id, T);
    assert!(!kept_path.exists());
    let log = worker.log_text();
    let swept = log
        .lines()
        .find(|l| l.contains("swept a kept task dir"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        swept.contains(&kept) && swept.contains("pressure"),
        "{swept}"
    );
    let m = scrape(&addr);
    assert_swept_once(&m, "pressure");

    // With nothing left to sweep, a task is refused, saying so.
    let hog = fs.path().join("not-a-task-dir.bin");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=40"])
        .arg(format!("of={}", hog.display()))
        .stderr(std::process::Stdio::null())
        .status();
    let refused = Task::mw(json!({})).send(&vh);
    let failed = events.wait_task_event("task-failed", &refused, T);
    let exception = failed["exception"].as_str().unwrap();
    assert!(
        exception.contains("MIN_FREE_DISK_MB=20") && exception.contains("no kept task dir"),
        "{failed}"
    );
    assert!(hog.exists(), "only task dirs are swept");
}

#[test]
fn a_scrape_that_fills_the_disk_fails_saying_so_and_the_next_task_runs() {
    let sshd = Sshd::start();
    let Services { vh, dir: logs } = Services::new("disk-full");
    let fs = Tmpfs::mount(48);
    let events = EventsProc::start(&vh, 180);
    let start_worker = || {
        let env = WorkerEnv::new().set("MIN_FREE_DISK_MB", 5);
        docker_worker(&vh, logs.path(), fs.path(), "disk-full", &sshd, env)
    };
    let mut worker = start_worker();

    let full = Task::mw(json!({"fill": 100})).send(&vh);
    let failed = events.wait_task_event("task-failed", &full, T);
    let exception = failed["exception"].as_str().unwrap();
    assert!(
        exception.contains("the disk of ZIM_DIR filled up during the scrape (0 MiB free now")
            && exception.contains("MiB at the start"),
        "{failed}"
    );
    wait_gone(&fs.path().join(&full));
    assert!(fs.free_mib() > 40, "{} MiB free", fs.free_mib());

    // The next task runs on the same worker.
    let next = Task::mw(json!({})).send(&vh);
    events.wait_task_event("task-succeeded", &next, T);

    // Every line of the record of ended tasks is whole, and both are there.
    let record = std::fs::read_to_string(fs.path().join(".zimfarm-ended.jsonl")).unwrap();
    let ids: Vec<String> = record
        .lines()
        .map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("a broken line ({e}): {l:?}"));
            v["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids, [full.clone(), next.clone()], "{record}");

    // A restarted worker starts fine on that working dir, and knows both.
    worker.signal("TERM");
    assert!(worker.wait_exit(T).success());
    let _worker = start_worker();
    let third = Task::mw(json!({})).send(&vh);
    events.wait_task_event("task-succeeded", &third, T);
    Task::mw(json!({"fill": 100})).with_id(&full).send(&vh);
    eventually(
        T,
        Duration::from_millis(100),
        || events.count("task-failed", &full) >= 2,
        || "the failure was not re-sent from the record".to_owned(),
    );
    assert!(!fs.path().join(&full).exists(), "it did not run again");
}

/// A record of an ended task cut by a full disk does not swallow the next
/// one: after the space is back, the next record starts on a line of its
/// own, and a reopen reads every whole record.
#[tokio::test]
async fn a_record_cut_by_a_full_disk_leaves_the_next_one_whole() {
    use zimfarm_worker::celery::EventKind;
    use zimfarm_worker::ended::{EndedLog, FILE_NAME};
    let fs = Tmpfs::mount(1);
    let failed = |id: &str| EventKind::TaskFailed {
        uuid: id.to_owned(),
        exception: "RuntimeError('x')".to_owned(),
        traceback: "t".repeat(3000),
    };
    let log = EndedLog::open(fs.path()).await.unwrap();
    log.record("first", &failed("first")).await.unwrap();
    // Fill the disk: only the rest of the record's first page is left.
    let hog = fs.path().join("hog");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k"])
        .arg(format!("of={}", hog.display()))
        .stderr(std::process::Stdio::null())
        .status();
    let error = log.record("cut", &failed("cut")).await.unwrap_err();
    assert!(error.to_string().contains("free space"), "{error}");
    let text = std::fs::read(fs.path().join(FILE_NAME)).unwrap();
    assert!(!text.ends_with(b"\n"), "the disk did not cut the line");
    std::fs::remove_file(&hog).unwrap();
    log.record("third", &failed("third")).await.unwrap();
    drop(log);

    let text = std::fs::read_to_string(fs.path().join(FILE_NAME)).unwrap();
    let whole: Vec<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(whole, ["first", "third"], "{} lines", text.lines().count());
    let reopened = EndedLog::open(fs.path()).await.unwrap();
    assert!(reopened.get("first").is_some() && reopened.get("third").is_some());
    assert!(reopened.get("cut").is_none());
}
