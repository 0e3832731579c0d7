//! The Docker pipeline against the real Docker engine, with the local
//! stand-in images of `tests/images/` (no registry): a Celery-sent task runs
//! the stand-in mwoffliner through prepare and generate; flags reach the
//! container as argv exactly; refusals happen before anything runs; idle
//! timeout, non-zero exit and hard time limit; orphans after kill -9;
//! revoke. After every test no container and no task dir is left behind.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);

fn docker_env(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut env = vec![
        ("TASK_RUNNER", "docker"),
        ("PULL_POLICY", "never"),
        ("REDIS_IMAGE", "zimfarm/redis:test"),
        ("MIN_FREE_DISK_MB", "10"),
    ];
    env.extend_from_slice(extra);
    env
}

fn mw_kwargs(flags: Value) -> Value {
    json!({
        "flags": flags,
        "image": {"name": "openzim/mwoffliner", "tag": "test"},
        "warehouse_path": "/wikipedia",
    })
}

/// Names of the containers labelled for `node`, running or not.
fn containers_of(node: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-a", "--format", "{{.Names}}", "--filter"])
        .arg(format!("label=org.openzim.zimfarm.node={node}"))
        .output()
        .expect("docker runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn wait_no_containers(node: &str) {
    let start = std::time::Instant::now();
    while !containers_of(node).is_empty() {
        assert!(
            start.elapsed() < T,
            "containers left: {:?}",
            containers_of(node)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn task_dir_gone(dir: &Path, id: &str) -> bool {
    !dir.join(id).exists()
}

#[test]
fn celery_task_runs_the_stand_in_mwoffliner_with_exact_argv() {
    let node = "pipe";
    let (vh, dir, events, _worker) = stack(node, &docker_env(&[]));
    let id = task_id();
    let tricky =
        "a b ; $(touch /tmp/pwned) `id` 'single' \"double\"\nnewline \u{e9}\u{1F389} --not-a-flag";
    let flags = json!({
        "mwUrl": "https://en.wikipedia.org",
        "adminEmail": "admin@example.org",
        "argvDump": true,
        "customZimTitle": tricky,
        "format": ["nopic", "novid"],
        "verbose": false,
        "speed": 1.5,
    });
    send_task(&vh, "offliner.mwoffliner", &id, &mw_kwargs(flags), &[]);
    let started = events.wait_task_event("task-container_started", &id, T);
    assert_eq!(started["image"], "openzim/mwoffliner:test");
    let finished = events.wait_task_event("task-container_finished", &id, T);
    assert_eq!(finished["exit_code"], 0, "{finished}");
    assert!(
        finished["stdout"]
            .as_str()
            .unwrap()
            .contains("answers PING"),
        "redis helper reached: {finished}"
    );
    assert!(finished["log"].as_str().unwrap().ends_with(".log.gz"));
    let succeeded = events.wait_task_event("task-succeeded", &id, T);
    let result = succeeded["result"].as_str().unwrap();
    assert!(
        result.contains("'name': 'wikipedia_en_test.zim'"),
        "{result}"
    );

    // Flags arrived as argv, byte for byte, with no shell in between.
    let argv = std::fs::read(dir.path().join(&id).join("argv.bin")).expect("argv dump");
    let argv: Vec<String> = argv
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8(a.to_vec()).unwrap())
        .collect();
    assert!(
        argv.contains(&format!("--customZimTitle={tricky}")),
        "{argv:?}"
    );
    assert!(
        argv.contains(&"--format=nopic".to_owned()) && argv.contains(&"--format=novid".to_owned())
    );
    assert!(argv.contains(&"--argvDump".to_owned()));
    assert!(!argv.iter().any(|a| a.starts_with("--verbose")));
    assert!(argv.contains(&"--speed=1.5".to_owned()), "{argv:?}");
    assert!(argv.contains(&"--outputDirectory=/output".to_owned()));
    assert!(argv.iter().any(|a| a.starts_with("--redis=")));
    assert!(!Path::new("/tmp/pwned").exists());
    let zim = std::fs::metadata(dir.path().join(&id).join("wikipedia_en_test.zim")).unwrap();
    assert!(zim.len() > 1000);
    wait_no_containers(node);
    vh.wait_queue_depth("small", 0, 0, T);
}

#[test]
fn refused_before_anything_runs() {
    let node = "refuse";
    let (vh, dir, events, _worker) = stack(node, &docker_env(&[]));
    let cases = [
        json!({"flags": {}, "image": {"name": "evil/miner", "tag": "latest"}, "warehouse_path": "/x"}),
        json!({"flags": {}, "image": {"name": "openzim/mwoffliner", "tag": "test"}, "warehouse_path": "/../etc"}),
        json!({"flags": {"bad key": 1}, "image": {"name": "openzim/mwoffliner", "tag": "test"}, "warehouse_path": "/x"}),
        json!({"flags": {"--outputDirectory": "/etc"}, "image": {"name": "openzim/mwoffliner", "tag": "test"}, "warehouse_path": "/x"}),
    ];
    for kwargs in cases {
        let id = task_id();
        send_task(&vh, "offliner.mwoffliner", &id, &kwargs, &[]);
        let failed = events.wait_task_event("task-failed", &id, T);
        assert!(
            failed["exception"]
                .as_str()
                .unwrap()
                .starts_with("ValueError("),
            "{failed}"
        );
        assert_eq!(events.count("task-container_started", &id), 0);
        assert!(task_dir_gone(dir.path(), &id));
    }
    // A task id that would escape the working dir.
    let id = "../../etc";
    send_task(&vh, "offliner.mwoffliner", id, &mw_kwargs(json!({})), &[]);
    events.wait_task_event("task-failed", id, T);
    assert!(containers_of(node).is_empty());
    vh.wait_queue_depth("small", 0, 0, T);
}

#[test]
fn non_zero_exit_and_idle_timeout_fail_the_task() {
    let node = "exit";
    let (vh, dir, events, _worker) = stack(node, &docker_env(&[("IDLE_TIMEOUT", "2")]));
    let failing = task_id();
    send_task(
        &vh,
        "offliner.mwoffliner",
        &failing,
        &mw_kwargs(json!({"mwUrl": "x", "exit": 7, "stderr": "fatal: wiki unreachable"})),
        &[],
    );
    let failed = events.wait_task_event("task-failed", &failing, T);
    assert!(
        failed["exception"]
            .as_str()
            .unwrap()
            .contains("exited with code 7"),
        "{failed}"
    );
    assert!(
        failed["traceback"]
            .as_str()
            .unwrap()
            .contains("fatal: wiki unreachable"),
        "{failed}"
    );
    let finished = events.wait_task_event("task-container_finished", &failing, T);
    assert_eq!(finished["exit_code"], 7);

    let silent = task_id();
    send_task(
        &vh,
        "offliner.mwoffliner",
        &silent,
        &mw_kwargs(json!({"silent": 60})),
        &[],
    );
    let killed = events.wait_task_event("task-container_killed", &silent, T);
    assert_eq!(killed["timeout"], 2);
    let failed = events.wait_task_event("task-failed", &silent, T);
    assert!(
        failed["exception"]
            .as_str()
            .unwrap()
            .contains("IDLE_TIMEOUT"),
        "{failed}"
    );
    wait_no_containers(node);
    assert!(task_dir_gone(dir.path(), &failing) && task_dir_gone(dir.path(), &silent));
    vh.wait_queue_depth("small", 0, 0, T);
}

#[test]
fn hard_time_limit_kills_the_offliner() {
    let node = "hard";
    let (vh, dir, events, _worker) = stack(node, &docker_env(&[]));
    let id = task_id();
    send_task(
        &vh,
        "offliner.mwoffliner",
        &id,
        &mw_kwargs(json!({"sleep": 60, "ignoreTerm": true})),
        &["--time-limit", "3"],
    );
    events.wait_task_event("task-container_started", &id, T);
    let failed = events.wait_task_event("task-failed", &id, T);
    assert!(
        failed["exception"]
            .as_str()
            .unwrap()
            .starts_with("TimeLimitExceeded("),
        "{failed}"
    );
    wait_no_containers(node);
    assert!(task_dir_gone(dir.path(), &id));
}

#[test]
fn large_container_output_keeps_the_worker_small() {
    let node = "spam";
    let (vh, _dir, events, worker) = stack(node, &docker_env(&[]));
    let id = task_id();
    send_task(
        &vh,
        "offliner.youtube",
        &id,
        &json!({"flags": {"spam": 50, "id": "x"}, "image": {"name": "openzim/youtube", "tag": "test"}, "warehouse_path": "/videos"}),
        &[],
    );
    let mut peak = 0;
    while events.count("task-succeeded", &id) == 0 && events.count("task-failed", &id) == 0 {
        peak = peak.max(worker.rss_kib());
        std::thread::sleep(Duration::from_millis(20));
    }
    events.wait_task_event("task-succeeded", &id, T);
    assert!(
        peak < 50 * 1024,
        "peak RSS {peak} KiB with 50 MB of container output"
    );
    let finished = events.wait_task_event("task-container_finished", &id, T);
    assert!(finished["stdout"].as_str().unwrap().lines().count() <= 100);
    wait_no_containers(node);
}

#[test]
fn kill_9_leaves_an_orphan_that_the_next_worker_removes() {
    let (vh, dir) = (Vhost::new("orphan"), tempfile::tempdir().unwrap());
    let node = "orphan";
    let events = EventsProc::start(&vh, 120);
    let mut first = WorkerProc::start(&vh, dir.path(), node, &docker_env(&[]));
    first.wait_connected();
    let id = task_id();
    send_task(
        &vh,
        "offliner.mwoffliner",
        &id,
        &mw_kwargs(json!({"sleep": 4})),
        &[],
    );
    events.wait_task_event("task-container_started", &id, T);
    first.signal("KILL");
    first.wait_exit(T);
    assert!(!containers_of(node).is_empty(), "the orphan is still there");
    let second = WorkerProc::start(&vh, dir.path(), node, &docker_env(&[]));
    second.wait_connected();
    second.wait_log("removed containers left by an earlier run", T);
    events.wait_task_event("task-succeeded", &id, T);
    assert_eq!(events.count("task-succeeded", &id), 1);
    assert_eq!(events.count("task-started", &id), 2);
    wait_no_containers(node);
    vh.wait_queue_depth("small", 0, 0, T);
}

#[test]
fn sigterm_stops_the_task_containers() {
    let node = "termdocker";
    let (vh, dir, events, mut worker) = stack(node, &docker_env(&[]));
    let id = task_id();
    send_task(
        &vh,
        "offliner.mwoffliner",
        &id,
        &mw_kwargs(json!({"sleep": 60, "ignoreTerm": true})),
        &[],
    );
    events.wait_task_event("task-container_started", &id, T);
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(15)).success());
    assert!(
        containers_of(node).is_empty(),
        "every container of the task stopped and removed"
    );
    assert!(task_dir_gone(dir.path(), &id));
    vh.wait_queue_depth("small", 1, 0, T);
}

/// Records a runner's task events (the library-level tests' sink).
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<String>>);

impl zimfarm_worker::runner::TaskEvents for Recorder {
    fn emit(&self, event: zimfarm_worker::celery::EventKind) {
        self.0.lock().unwrap().push(event.event_type().to_owned());
    }
}

fn settings(dir: &Path, node: &str, min_free_mb: u64) -> zimfarm_worker::config::PipelineSettings {
    zimfarm_worker::config::PipelineSettings {
        working_dir: dir.to_owned(),
        zim_dir: dir.to_owned(),
        node_name: node.to_owned(),
        pull_policy: zimfarm_worker::docker::PullPolicy::Never,
        idle_timeout: Duration::from_secs(60),
        min_free_disk: min_free_mb << 20,
        container_memory: None,
        container_nano_cpus: None,
        image_allowlist: zimfarm_worker::offliner::AllowList::default_openzim(),
        redis_image: "zimfarm/redis:test".to_owned(),
    }
}

fn request(id: &str, flags: Value) -> std::sync::Arc<zimfarm_worker::celery::TaskRequest> {
    let text =
        json!({"task": "offliner.mwoffliner", "id": id, "kwargs": mw_kwargs(flags)}).to_string();
    std::sync::Arc::new(zimfarm_worker::pipeline::request_from_json(&text).unwrap())
}

#[tokio::test]
async fn revoke_stops_every_container_of_the_task() {
    use zimfarm_worker::runner::{RunError, Runner, TaskContext};
    let dir = tempfile::tempdir().unwrap();
    let node = "revokelib";
    let runner = zimfarm_worker::pipeline::DockerRunner::new(settings(dir.path(), node, 10))
        .await
        .expect("docker");
    let cancel = tokio_util::sync::CancellationToken::new();
    let recorder = std::sync::Arc::new(Recorder::default());
    let id = task_id();
    let ctx = TaskContext::new(id.clone(), cancel.clone(), recorder.clone());
    let run = tokio::spawn(runner.run(request(&id, json!({"sleep": 60, "ignoreTerm": true})), ctx));
    // Both the redis helper and the offliner are up, then the revoke comes.
    let start = std::time::Instant::now();
    while !recorder
        .0
        .lock()
        .unwrap()
        .contains(&"task-container_started".to_owned())
    {
        assert!(start.elapsed() < T, "offliner never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(containers_of(node).len(), 2, "redis helper and offliner");
    cancel.cancel();
    let outcome = tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .expect("stops in seconds")
        .unwrap();
    assert_eq!(outcome, Err(RunError::Cancelled));
    assert!(containers_of(node).is_empty(), "{:?}", containers_of(node));
    assert!(task_dir_gone(dir.path(), &id));
}

#[tokio::test]
async fn too_little_free_disk_fails_before_anything_runs() {
    use zimfarm_worker::runner::{RunError, Runner, TaskContext};
    let dir = tempfile::tempdir().unwrap();
    let node = "diskfull";
    let runner = zimfarm_worker::pipeline::DockerRunner::new(settings(dir.path(), node, 1 << 40))
        .await
        .expect("docker");
    let id = task_id();
    let ctx = TaskContext::new(
        id.clone(),
        Default::default(),
        std::sync::Arc::new(Recorder::default()),
    );
    match runner.run(request(&id, json!({})), ctx).await {
        Err(RunError::Failed(e)) => assert!(e.message.contains("MIN_FREE_DISK_MB"), "{e}"),
        other => panic!("expected a disk failure, got {other:?}"),
    }
    assert!(containers_of(node).is_empty());
    assert!(task_dir_gone(dir.path(), &id));
}

#[test]
fn run_task_runs_one_task_from_a_file_without_a_broker() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("task.json");
    let id = task_id();
    std::fs::write(
        &file,
        json!({"task": "offliner.youtube", "id": id, "kwargs": {"flags": {"id": "x", "zims": 2}, "image": {"name": "openzim/youtube", "tag": "test"}, "warehouse_path": "/videos"}}).to_string(),
    )
    .unwrap();
    let run = |file: &Path| {
        Command::new(worker_binary())
            .arg("run-task")
            .arg(file)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("WORKING_DIR", dir.path())
            .env("ZIM_DIR", dir.path())
            .env("NODE_NAME", "runtask")
            .env("PULL_POLICY", "never")
            .env("MIN_FREE_DISK_MB", "10")
            .output()
            .unwrap()
    };
    let out = run(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = last_json_line(&out.stdout);
    assert_eq!(last["status"], "SUCCESS", "{last}");
    assert_eq!(last["files"].as_array().unwrap().len(), 2, "{last}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("task-container_started") && stdout.contains("task-container_finished")
    );
    assert!(containers_of("runtask").is_empty());

    // A task file that is not a task: exit 2 with a line naming the file.
    std::fs::write(&file, "{\"task\": 1}").unwrap();
    let out = run(&file);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("task.json"));
    // A task the pipeline refuses: exit 1, the reason on the last line.
    std::fs::write(&file, json!({"task": "offliner.youtube", "id": task_id(), "kwargs": {"image": {"name": "someone/else"}, "warehouse_path": "/v"}}).to_string()).unwrap();
    let out = run(&file);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        last_json_line(&out.stdout)["error"]
            .as_str()
            .unwrap()
            .contains("IMAGE_ALLOWLIST")
    );
}
