//! Limits on the offliner containers, against the real Docker engine with
//! the stand-in images (`tests/images/`), through `run-task --no-upload`:
//! Docker's own copy of the output is bounded (rotated `json-file`) while
//! the worker's log of the task still holds every byte of 50 MiB printed at
//! once; a scraper killed at CONTAINER_MEMORY_MB fails with a message that
//! names the memory limit; a `docker kill` from outside is named as such.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// Lines the stand-in's `--spam` repeats (tests/images/standin/offliner.sh).
const SPAM_LINE: &str = "mwoffliner stand-in log spam: lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod\n";

/// Runs one task with `run-task --no-upload` (the task dir is kept) and
/// returns the command's output.
fn run_task(dir: &Path, node: &str, task: &Value, extra: &[(&'static str, &str)]) -> Output {
    let file = dir.join("task.json");
    std::fs::write(&file, task.to_string()).unwrap();
    let env = WorkerEnv::new()
        .set("WORKING_DIR", dir.display())
        .set("ZIM_DIR", dir.display())
        .set("NODE_NAME", node)
        .set("PULL_POLICY", "never")
        .set("REDIS_IMAGE", "zimfarm/redis:test")
        .set("MIN_FREE_DISK_MB", 10)
        .set_all(extra)
        .set("LOG_LEVEL", "info");
    let env: Vec<(String, String)> = env
        .overrides()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    run_worker(&["run-task", "--no-upload", file.to_str().unwrap()], &env)
}

/// The JSON lines `run-task` printed: its events, then its status.
fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn event<'a>(lines: &'a [Value], name: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["event"] == name)
        .unwrap_or_else(|| panic!("no {name} event in {lines:?}"))
}

fn docker_inspect(name: &str) -> Option<Value> {
    let out = Command::new("docker")
        .args(["inspect", name])
        .output()
        .expect("docker runs");
    if !out.status.success() {
        return None;
    }
    let list: Value = serde_json::from_slice(&out.stdout).ok()?;
    list.get(0).cloned()
}

fn task(name: &str, id: &str, flags: Value) -> Value {
    let (image, path) = match name {
        "mwoffliner" => ("openzim/mwoffliner", "/wikipedia"),
        _ => ("openzim/youtube", "/videos"),
    };
    json!({
        "task": format!("offliner.{name}"),
        "id": id,
        "kwargs": {"flags": flags, "image": {"name": image, "tag": "test"}, "warehouse_path": path},
    })
}

/// What a watcher saw of a running container: its HostConfig.LogConfig,
/// and the most bytes Docker's own log files of it held at once.
#[derive(Default, Debug)]
struct Seen {
    log_config: Option<Value>,
    docker_log_max_bytes: u64,
}

/// Watches container `name` until `stop`: records its log config and the
/// size of its json-file log and rotated copies (`<LogPath>*`).
fn watch(name: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Seen> {
    std::thread::spawn(move || {
        let mut seen = Seen::default();
        while !stop.load(Ordering::SeqCst) {
            if let Some(info) = docker_inspect(&name) {
                seen.log_config = Some(info["HostConfig"]["LogConfig"].clone());
                if let Some(log_path) = info["LogPath"].as_str().filter(|p| !p.is_empty()) {
                    let log_path = Path::new(log_path);
                    let prefix = log_path.file_name().unwrap().to_string_lossy().into_owned();
                    let total: u64 = std::fs::read_dir(log_path.parent().unwrap())
                        .map(|entries| {
                            entries
                                .flatten()
                                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                                .filter_map(|e| e.metadata().ok())
                                .map(|m| m.len())
                                .sum()
                        })
                        .unwrap_or(0);
                    seen.docker_log_max_bytes = seen.docker_log_max_bytes.max(total);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        seen
    })
}

#[test]
fn fifty_mib_of_output_arrives_whole_while_dockers_copy_stays_at_one_mb() {
    let (dir, node, id) = (tempfile::tempdir().unwrap(), "ctr-spam", task_id());
    let offliner = format!("zimfarm_{node}_{id}_offliner");
    let redis = format!("zimfarm_{node}_{id}_redis");
    let stop = Arc::new(AtomicBool::new(false));
    let watchers = [
        watch(offliner.clone(), stop.clone()),
        watch(redis, stop.clone()),
    ];
    let started = Instant::now();
    let out = run_task(
        dir.path(),
        node,
        &task("mwoffliner", &id, json!({"spam": 50, "sleep": 2})),
        &[("CONTAINER_LOG_MAX_MB", "1")],
    );
    let elapsed = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let seen: Vec<Seen> = watchers.into_iter().map(|w| w.join().unwrap()).collect();
    let lines = json_lines(&out);
    let last = lines.last().cloned().unwrap_or_default();
    assert_eq!(last["status"], "SUCCESS", "{}", output_text(&out));
    eprintln!("50 MiB task took {elapsed:?}; Docker's copy peaked at {seen:?}");

    // Every container the worker made had the bounded log driver.
    let expected_config =
        json!({"Type": "json-file", "Config": {"max-file": "5", "max-size": "204k"}});
    for (what, s) in ["offliner", "redis"].iter().zip(&seen) {
        assert_eq!(
            s.log_config.as_ref(),
            Some(&expected_config),
            "{what}'s LogConfig"
        );
    }
    // Docker's own copy stayed near its bound (5 files of 204 KiB; json-file
    // wraps each line in JSON, and rotation is checked per write).
    assert!(
        seen[0].docker_log_max_bytes > 0 && seen[0].docker_log_max_bytes < (5 << 20) / 4,
        "Docker's log files of the offliner held {} bytes at most",
        seen[0].docker_log_max_bytes
    );

    // The worker's own log of the task holds every byte, in order.
    // In the worker's own dir of the task, out of the scraper's reach.
    let gz = dir
        .path()
        .join(".zimfarm")
        .join(&id)
        .join(format!("{offliner}.log.gz"));
    let mut log = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&gz).expect("the task's log is kept"))
        .read_to_end(&mut log)
        .unwrap();
    let spam_bytes = 50usize << 20;
    let spammed = format!("\nspammed {spam_bytes} bytes\n");
    let head = "mwoffliner stand-in starting\n";
    assert!(
        log.starts_with(head.as_bytes()),
        "log starts with {:?}",
        String::from_utf8_lossy(&log[..200.min(log.len())])
    );
    let spam_start = log
        .windows(SPAM_LINE.len())
        .position(|w| w == SPAM_LINE.as_bytes())
        .expect("spam in the log");
    let expected_spam: Vec<u8> = SPAM_LINE
        .as_bytes()
        .iter()
        .copied()
        .cycle()
        .take(spam_bytes)
        .collect();
    assert!(
        log.len() >= spam_start + spam_bytes,
        "the task's log holds {} bytes, less than the {spam_bytes} bytes of spam printed",
        log.len()
    );
    let spam = &log[spam_start..spam_start + spam_bytes];
    if spam != expected_spam.as_slice() {
        let at = spam.iter().zip(&expected_spam).position(|(a, b)| a != b);
        panic!(
            "the spam differs from what the stand-in printed at byte {at:?} of {spam_bytes}; log is {} bytes",
            log.len()
        );
    }
    let rest = String::from_utf8_lossy(&log[spam_start + spam_bytes..]).into_owned();
    assert!(rest.starts_with(&spammed), "after the spam: {rest:?}");
    assert!(rest.ends_with("\ndone\n"), "the log ends with: {rest:?}");
    assert!(log.len() > spam_bytes);

    // The stdout tail ends with the last lines.
    let finished = event(&lines, "task-container_finished");
    let stdout = finished["fields"]["stdout"].as_str().unwrap();
    assert!(
        stdout.ends_with("\ndone"),
        "stdout tail ends with {stdout:?}"
    );
    assert!(stdout.contains(spammed.trim()), "stdout tail: {stdout:?}");
    assert_eq!(finished["fields"]["exit_code"], 0);
    assert_no_containers(node);
}

#[test]
fn a_scraper_over_its_memory_limit_fails_naming_container_memory_mb() {
    let (dir, node, id) = (tempfile::tempdir().unwrap(), "ctr-oom", task_id());
    let out = run_task(
        dir.path(),
        node,
        &task("youtube", &id, json!({"id": "x", "eatMemory": 64})),
        &[("CONTAINER_MEMORY_MB", "16")],
    );
    let lines = json_lines(&out);
    let last = lines.last().cloned().unwrap_or_default();
    assert_eq!(last["status"], "FAILURE", "{}", output_text(&out));
    let error = last["error"].as_str().unwrap();
    assert!(
        error.contains("killed for using more than its memory limit (CONTAINER_MEMORY_MB=16;")
            && error.contains("OOMKilled")
            && error.contains("raise CONTAINER_MEMORY_MB"),
        "{error}"
    );
    let finished = event(&lines, "task-container_finished");
    assert_eq!(finished["fields"]["exit_code"], 137);
    assert!(
        text_of(&last, "detail").contains("eating 64 MiB of memory"),
        "the tail is the detail: {last}"
    );
    assert_no_containers(node);
}

#[test]
fn a_docker_kill_from_outside_is_named_sigkill_not_memory() {
    let (dir, node, id) = (tempfile::tempdir().unwrap(), "ctr-kill", task_id());
    let offliner = format!("zimfarm_{node}_{id}_offliner");
    let killed = Arc::new(Mutex::new(false));
    let killer = {
        let killed = killed.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(60) {
                let running =
                    docker_inspect(&offliner).is_some_and(|i| i["State"]["Running"] == true);
                if running {
                    std::thread::sleep(Duration::from_millis(500));
                    let status = Command::new("docker")
                        .args(["kill", &offliner])
                        .output()
                        .unwrap()
                        .status;
                    *killed.lock().unwrap() = status.success();
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let out = run_task(
        dir.path(),
        node,
        &task("youtube", &id, json!({"id": "x", "sleep": 30})),
        // A memory limit is set but not reached: exit 137 alone must not
        // be blamed on it.
        &[("CONTAINER_MEMORY_MB", "256")],
    );
    killer.join().unwrap();
    assert!(*killed.lock().unwrap(), "docker kill worked");
    let lines = json_lines(&out);
    let last = lines.last().cloned().unwrap_or_default();
    assert_eq!(last["status"], "FAILURE", "{}", output_text(&out));
    let error = last["error"].as_str().unwrap();
    assert!(
        error.contains("killed by SIGKILL (exit code 137) from outside the worker"),
        "{error}"
    );
    assert!(!error.contains("memory limit"), "{error}");
    assert_eq!(
        event(&lines, "task-container_finished")["fields"]["exit_code"],
        137
    );
    assert_no_containers(node);
}
