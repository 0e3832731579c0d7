//! Lengths and characters the worker hands to the OS, Docker, RabbitMQ and
//! the warehouse (SPEC §8: any path the configuration accepts works, the
//! rest is refused at start with one line naming the limit): the stand-in
//! mwoffliner runs end to end under a 200-character ZIM_DIR (its redis
//! socket path far over the 107 bytes of a socket address), and with a
//! 63-character NODE_NAME, a 64-character task id and a DOCKER_HOST path
//! too long for a socket address; what no path can make work is refused at
//! start, naming the variable and the limit.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::sshd::Sshd;
use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(90);

/// A dir exactly `len` bytes long below `root`, made of nested dirs of at
/// most 50 characters.
fn deep_dir(root: &Path, len: usize) -> PathBuf {
    let mut dir = root.to_owned();
    let mut i = 0;
    loop {
        let remaining = len - dir.as_os_str().len();
        if remaining == 0 {
            break;
        }
        // Each part costs its length and a '/'; never leave 1 byte over.
        let take = match remaining {
            r if r <= 51 => r - 1,
            52 => 49,
            _ => 50,
        };
        dir.push(&format!("{i:x}{}", "d".repeat(49))[..take]);
        i += 1;
    }
    std::fs::create_dir_all(&dir).unwrap();
    assert_eq!(dir.as_os_str().len(), len, "{}", dir.display());
    dir
}

fn wait_until(what: &str, done: impl Fn() -> bool) {
    eventually(T, Duration::from_millis(100), done, || what.to_owned());
}

/// Runs the stand-in mwoffliner demo task `id` on a worker named `node`
/// whose WORKING_DIR = ZIM_DIR is `dir`, and checks it went through
/// prepare (redis answered), generate and upload, log included, leaving
/// no container and no task dir.
fn run_demo_task(sshd: &Sshd, dir: &Path, node: &str, id: &str, extra: WorkerEnv) {
    let vh = Vhost::new(node);
    let events = EventsProc::start(&vh, 180);
    let worker = WorkerProc::start(&vh, dir, node, &WorkerEnv::docker(sshd).merge(extra));
    worker.wait_connected();
    let kwargs = json!({
        "flags": {"mwUrl": "https://en.wikipedia.org", "adminEmail": "admin@example.org"},
        "image": {"name": "openzim/mwoffliner", "tag": "test"},
        "warehouse_path": "/wikipedia",
    });
    send_task(&vh, "offliner.mwoffliner", id, &kwargs, &[]);
    let finished = events.wait_task_event("task-container_finished", id, T);
    assert_eq!(
        finished["exit_code"],
        0,
        "{finished}\n{}",
        worker.log_text()
    );
    assert!(
        finished["stdout"]
            .as_str()
            .unwrap()
            .contains("answers PING"),
        "the scraper reached its redis: {finished}"
    );
    let succeeded = events.wait_task_event("task-succeeded", id, T);
    let zim = sshd.chroot().join("zim/wikipedia/wikipedia_en_test.zim");
    let size = std::fs::metadata(&zim)
        .expect("the ZIM is in the warehouse")
        .len();
    assert!(
        succeeded["result"]
            .as_str()
            .unwrap()
            .contains(&format!("'size': {size}")),
        "{succeeded}"
    );
    let log = sshd
        .chroot()
        .join(format!("logs/zimfarm_{node}_{id}_offliner.log.gz"));
    assert!(log.exists(), "no log at {}", log.display());
    wait_until("the task dir is still there", || !dir.join(id).exists());
    wait_until("containers are left", || containers_of(node).is_empty());
    assert!(
        !dir.join(".sockets").join(id).exists(),
        "the sockets dir is left"
    );
}

#[test]
fn mwoffliner_demo_runs_under_a_200_character_zim_dir() {
    let sshd = Sshd::start();
    let root = tempfile::tempdir().unwrap();
    let dir = deep_dir(root.path(), 200);
    // The redis socket's full path is far over what a socket address holds.
    let id = task_id();
    assert!(
        dir.join(".sockets")
            .join(&id)
            .join("redis.sock")
            .as_os_str()
            .len()
            > 107
    );
    run_demo_task(&sshd, &dir, "paths-deep", &id, WorkerEnv::new());
}

#[test]
fn longest_node_name_task_id_and_docker_host_path_work_end_to_end() {
    let sshd = Sshd::start();
    let root = tempfile::tempdir().unwrap();
    let dir = deep_dir(root.path(), 200);
    // DOCKER_HOST through a symlink whose path a socket address cannot hold.
    let socket_dir = deep_dir(root.path(), 150);
    let socket = socket_dir.join("docker.sock");
    std::os::unix::fs::symlink("/var/run/docker.sock", &socket).unwrap();
    let docker_host = format!("unix://{}", socket.display());
    let node = "p".repeat(63);
    let id = format!("paths-{}", "0123456789abcdef".repeat(4))[..64].to_owned();
    run_demo_task(
        &sshd,
        &dir,
        &node,
        &id,
        WorkerEnv::new().set("DOCKER_HOST", docker_host),
    );
}

#[test]
fn check_reaches_docker_through_a_long_docker_host_path_or_names_the_limit() {
    let root = tempfile::tempdir().unwrap();
    let socket_dir = deep_dir(root.path(), 180);
    let socket = socket_dir.join("docker.sock");
    std::os::unix::fs::symlink("/var/run/docker.sock", &socket).unwrap();
    let vh = Vhost::new("paths-check");
    let env = |host: String| {
        worker_env(
            &vh,
            root.path(),
            "paths-check",
            &[
                ("DOCKER_HOST", &host),
                ("WAREHOUSE_HOST", "127.0.0.1"),
                ("WAREHOUSE_PORT", "1"),
            ],
        )
    };
    let docker_line = |out: &std::process::Output| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some("docker"))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no docker line: {}", output_text(out)))
    };
    let out = run_worker(&["check"], &env(format!("unix://{}", socket.display())));
    let line = docker_line(&out);
    assert!(line.starts_with("ok") && line.contains("API"), "{line}");

    // A socket name that even /proc/self/fd/N/<name> cannot hold.
    let long_name = socket_dir.join("s".repeat(120));
    std::os::unix::fs::symlink("/var/run/docker.sock", &long_name).unwrap();
    let out = run_worker(&["check"], &env(format!("unix://{}", long_name.display())));
    let line = docker_line(&out);
    assert!(
        line.starts_with("FAIL") && line.contains("DOCKER_HOST") && line.contains("107 bytes"),
        "{line}"
    );
}

#[test]
fn start_refuses_what_no_path_or_name_can_hold_with_one_line() {
    let vh = Vhost::new("paths-refuse");
    let root = tempfile::tempdir().unwrap();
    let too_long = format!("/{}", "d".repeat(3774));
    let cases: Vec<(&str, String, &str)> = vec![
        ("ZIM_DIR", too_long.clone(), "3774"),
        ("WORKING_DIR", too_long, "3774"),
        ("WORKING_DIR", "/srv/zim:files".to_owned(), "':'"),
        ("USERNAME", "u".repeat(178), "255"),
    ];
    for (var, value, limit) in cases {
        let env = worker_env(&vh, root.path(), &"p".repeat(63), &[(var, value.as_str())]);
        let out = run_worker(&["run"], &env);
        let text = output_text(&out);
        assert_eq!(out.status.code(), Some(2), "{var}: {text}");
        assert_eq!(text.trim().lines().count(), 1, "{var}: {text}");
        assert!(text.contains(var) && text.contains(limit), "{var}: {text}");
    }
}

#[test]
fn remote_control_names_over_255_bytes_are_refused_and_the_worker_keeps_answering() {
    // Celery's rules: any queue name may be added (the default policy
    // refuses all but the Zimfarm queues before their length matters).
    let env = WorkerEnv::new().set("CONTROL_POLICY", "celery");
    let mut s = Stack::start("paths-amqp", env).within(T);
    let node = "tester@paths-amqp";
    let long = "x".repeat(300);
    // A reply_to no AMQP frame can carry: no reply, and nothing breaks.
    let request = json!({
        "method": "ping", "arguments": {}, "destination": null, "ticket": "t-1",
        "reply_to": {"exchange": "", "routing_key": long},
    });
    publish_pidbox(&s.vh, s.dir(), request.to_string());
    s.worker.wait_log("over 255 bytes; no reply sent", T);
    // Queue, exchange and routing key over 255 bytes: an error reply.
    for arguments in [
        json!({"queue": long}),
        json!({"queue": "paths-q", "exchange": long}),
        json!({"queue": "paths-q", "routing_key": long}),
    ] {
        let reply = broadcast(&s.vh, node, "add_consumer", arguments);
        assert!(
            reply["error"].as_str().unwrap_or_default().contains("255"),
            "{reply}"
        );
    }
    // A 250-byte queue: its consumer tag is cut to fit, and it is consumed.
    let queue = "q".repeat(250);
    let reply = broadcast(&s.vh, node, "add_consumer", json!({"queue": queue}));
    assert!(reply["ok"].as_str().is_some(), "{reply}");
    assert_eq!(
        broadcast(&s.vh, node, "ping", json!({})),
        json!({"ok": "pong"})
    );
    assert!(s.worker.is_running(), "{}", s.worker.log_text());
    s.worker.assert_log_lacks("reconnecting");
}
