//! The Docker pipeline against the real Docker engine, with the local
//! stand-in images of `tests/images/` (no registry), and a real OpenSSH
//! sshd as the warehouse (`tests/common/sshd.rs`): a Celery-sent task runs
//! the stand-in mwoffliner through prepare, generate and upload; flags
//! reach the container as argv exactly; refusals happen before anything
//! runs; idle timeout, non-zero exit and hard time limit; an orphan after
//! kill -9 that cannot be adopted; SIGQUIT; revoke; a failed upload keeps
//! the files; a task stopped during its upload goes straight to upload
//! when it comes back; a warehouse the worker cannot trust or log in to
//! stops it at start. After every test no container and no task dir is
//! left behind, unless the test keeps one.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::sshd::{KeyKind, Sshd};
use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);

/// Waits until `path` is gone (the task dir goes after the final event).
fn wait_gone(path: &Path) {
    eventually(
        T,
        Duration::from_millis(50),
        || !path.exists(),
        || format!("{} is still there", path.display()),
    );
}

fn wait_no_containers(node: &str) {
    eventually(
        T,
        Duration::from_millis(100),
        || containers_of(node).is_empty(),
        || format!("containers left: {:?}", containers_of(node)),
    );
}

/// A warehouse and a stack whose worker runs the Docker pipeline.
fn docker_stack(node: &str) -> (Sshd, Stack) {
    let sshd = Sshd::start();
    let stack = Stack::start(node, WorkerEnv::docker(&sshd)).within(T);
    (sshd, stack)
}

/// Waits until no container of the stack's node is left and its queue is
/// empty (every message acked).
fn expect_drained(s: &Stack) {
    wait_no_containers(s.node());
    s.expect_queue(0, 0);
}

fn task_dir_gone(dir: &Path, id: &str) -> bool {
    !dir.join(id).exists()
}

#[test]
fn celery_task_runs_the_stand_in_mwoffliner_with_exact_argv() {
    let node = "pipe";
    let (sshd, s) = docker_stack(node);
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
    send_task(&s.vh, "offliner.mwoffliner", &id, &mw_kwargs(flags), &[]);
    let started = s.expect_event("task-container_started", &id);
    assert_eq!(started["image"], "openzim/mwoffliner:test");
    let finished = s.expect_event("task-container_finished", &id);
    assert_eq!(finished["exit_code"], 0, "{finished}");
    assert!(
        finished["stdout"]
            .as_str()
            .unwrap()
            .contains("answers PING"),
        "redis helper reached: {finished}"
    );
    assert!(finished["log"].as_str().unwrap().ends_with(".log.gz"));
    let succeeded = s.expect_event("task-succeeded", &id);
    let result = succeeded["result"].as_str().unwrap();
    let zim_size = std::fs::metadata(sshd.chroot().join("zim/wikipedia/wikipedia_en_test.zim"))
        .expect("the ZIM is in the warehouse")
        .len();
    assert!(zim_size > 1000);
    assert!(
        result.contains(&format!(
            "{{'name': 'wikipedia_en_test.zim', 'size': {zim_size}}}"
        )),
        "{result}"
    );

    // Flags arrived as argv, byte for byte, with no shell in between (the
    // dump is an output file too, so it went to the warehouse).
    let argv = std::fs::read(sshd.chroot().join("zim/wikipedia/argv.bin")).expect("argv dump");
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
    // The container log went to /logs/, and the ZIM is a real one.
    let log = sshd
        .chroot()
        .join(format!("logs/zimfarm_{node}_{id}_offliner.log.gz"));
    assert!(log.exists(), "no log at {}", log.display());
    run_ok(
        Command::new(python())
            .arg("-c")
            .arg("import sys; from libzim.reader import Archive; a = Archive(sys.argv[1]); assert a.check(); print(a.entry_count)")
            .arg(sshd.chroot().join("zim/wikipedia/wikipedia_en_test.zim")),
        "libzim's check of the ZIM",
    );
    // Uploaded and recorded: the task dir is gone, no partial file remains.
    wait_gone(&s.dir().join(&id));
    assert!(
        !sshd
            .chroot()
            .join("zim/wikipedia/wikipedia_en_test.zim.tmp")
            .exists()
    );
    expect_drained(&s);
}

#[test]
fn refused_before_anything_runs() {
    let node = "refuse";
    let (_sshd, s) = docker_stack(node);
    let cases = [
        json!({"flags": {}, "image": {"name": "evil/miner", "tag": "latest"}, "warehouse_path": "/x"}),
        json!({"flags": {}, "image": {"name": "openzim/mwoffliner", "tag": "test"}, "warehouse_path": "/../etc"}),
        json!({"flags": {"bad key": 1}, "image": {"name": "openzim/mwoffliner", "tag": "test"}, "warehouse_path": "/x"}),
        json!({"flags": {"--outputDirectory": "/etc"}, "image": {"name": "openzim/mwoffliner", "tag": "test"}, "warehouse_path": "/x"}),
    ];
    for kwargs in cases {
        let id = s.submit(Task::new("offliner.mwoffliner", kwargs));
        let failed = s.expect_event("task-failed", &id);
        assert!(
            text_of(&failed, "exception").starts_with("ValueError("),
            "{failed}"
        );
        assert_eq!(s.count("task-container_started", &id), 0);
        assert!(task_dir_gone(s.dir(), &id));
    }
    // A task id that would escape the working dir.
    let id = "../../etc";
    send_task(&s.vh, "offliner.mwoffliner", id, &mw_kwargs(json!({})), &[]);
    s.expect_event("task-failed", id);
    assert!(containers_of(node).is_empty());
    s.expect_queue(0, 0);
}

#[test]
fn non_zero_exit_and_idle_timeout_fail_the_task() {
    let sshd = Sshd::start();
    let node = "exit";
    let s = Stack::start(node, WorkerEnv::docker(&sshd).set("IDLE_TIMEOUT", "2")).within(T);
    let failing = s.submit(Task::mw(
        json!({"mwUrl": "x", "exit": 7, "stderr": "fatal: wiki unreachable"}),
    ));
    let failed = s.expect_event("task-failed", &failing);
    assert!(
        text_of(&failed, "exception").contains("exited with code 7"),
        "{failed}"
    );
    assert!(
        text_of(&failed, "traceback").contains("fatal: wiki unreachable"),
        "{failed}"
    );
    let finished = s.expect_event("task-container_finished", &failing);
    assert_eq!(finished["exit_code"], 7);
    // The failed run's log went to the warehouse for its operator.
    let log = sshd
        .chroot()
        .join(format!("logs/zimfarm_{node}_{failing}_offliner.log.gz"));
    let text = Command::new("zcat").arg(&log).output().unwrap();
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("fatal: wiki unreachable"),
        "{}: {text:?}",
        log.display()
    );

    let silent = s.submit(Task::mw(json!({"silent": 60})));
    let killed = s.expect_event("task-container_killed", &silent);
    assert_eq!(killed["timeout"], 2);
    let failed = s.expect_event("task-failed", &silent);
    assert!(
        text_of(&failed, "exception").contains("IDLE_TIMEOUT"),
        "{failed}"
    );
    let log = format!("logs/zimfarm_{node}_{silent}_offliner.log");
    assert!(
        sshd.chroot().join(&log).exists() || sshd.chroot().join(format!("{log}.gz")).exists(),
        "the idle run's log is in the warehouse"
    );
    wait_no_containers(node);
    assert!(task_dir_gone(s.dir(), &failing) && task_dir_gone(s.dir(), &silent));
    s.expect_queue(0, 0);
}

#[test]
fn hard_time_limit_kills_the_offliner() {
    let node = "hard";
    let (_sshd, s) = docker_stack(node);
    let id = s
        .submit(Task::mw(json!({"sleep": 60, "ignoreTerm": true})).options(&["--time-limit", "3"]));
    s.expect_event("task-container_started", &id);
    let failed = s.expect_event("task-failed", &id);
    assert!(
        text_of(&failed, "exception").starts_with("TimeLimitExceeded("),
        "{failed}"
    );
    wait_no_containers(node);
    assert!(task_dir_gone(s.dir(), &id));
}

#[test]
fn large_container_output_keeps_the_worker_small() {
    let node = "spam";
    let (_sshd, s) = docker_stack(node);
    let id = s.submit(Task::new("offliner.youtube", json!({"flags": {"spam": 50, "id": "x"}, "image": {"name": "openzim/youtube", "tag": "test"}, "warehouse_path": "/videos"})));
    let mut peak = 0;
    while s.count("task-succeeded", &id) == 0 && s.count("task-failed", &id) == 0 {
        peak = peak.max(s.worker.rss_kib());
        std::thread::sleep(Duration::from_millis(20));
    }
    s.expect_event("task-succeeded", &id);
    assert!(
        peak < 50 * 1024,
        "peak RSS {peak} KiB with 50 MB of container output"
    );
    let finished = s.expect_event("task-container_finished", &id);
    assert!(finished["stdout"].as_str().unwrap().lines().count() <= 100);
    wait_no_containers(node);
}

/// kill -9 leaves the scrape running and the next start adopts it
/// (tests/restart.rs); one it cannot adopt, here one whose task record is
/// gone, is removed with a line saying why, and its task runs again.
#[test]
fn kill_9_leaves_an_orphan_that_the_next_worker_removes_when_it_cannot_adopt_it() {
    let sshd = Sshd::start();
    let sv = Services::new("orphan");
    let node = "orphan";
    let events = sv.events(120);
    let mut first = sv.spawn(node, &WorkerEnv::docker(&sshd));
    first.wait_connected();
    let id = Task::mw(json!({"sleep": 4})).send(&sv.vh);
    events.wait_task_event("task-container_started", &id, T);
    first.signal("KILL");
    first.wait_exit(T);
    assert!(!containers_of(node).is_empty(), "the orphan is still there");
    let record = own_dir(&sv.dir.path().join(&id)).join("task.json");
    std::fs::remove_file(&record)
        .unwrap_or_else(|e| panic!("the task record {}: {e}", record.display()));
    let second = sv.spawn(node, &WorkerEnv::docker(&sshd));
    second.wait_connected();
    events.wait_task_event("task-succeeded", &id, T);
    let log = second.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains(&id) && l.contains("removed")),
        "one line saying why the orphan of {id} was removed:\n{log}"
    );
    assert_eq!(events.count("task-succeeded", &id), 1);
    assert_eq!(events.count("task-started", &id), 2);
    wait_no_containers(node);
    sv.vh.wait_queue_depth("small", 0, 0, T);
}

#[test]
fn a_second_worker_with_the_same_node_name_leaves_the_first_ones_containers_alone() {
    let node = "samenode";
    let (sshd, s) = docker_stack(node);
    let id = s.submit(Task::mw(json!({"sleep": 3})));
    s.expect_event("task-container_started", &id);
    let running = containers_of(node);
    assert_eq!(running.len(), 2, "offliner and redis: {running:?}");
    // Started by mistake with the same name: it must stop without touching
    // the first worker's containers (they carry this node's label).
    let mut second = WorkerProc::start(&s.vh, s.dir(), node, &WorkerEnv::docker(&sshd));
    let status = second.wait_exit(T);
    assert!(!status.success());
    assert!(
        second.log_text().contains(node),
        "names the node: {}",
        second.log_text()
    );
    assert!(!second.log_text().contains("removed containers"));
    let finished = s.expect_event("task-container_finished", &id);
    assert_eq!(finished["exit_code"], 0, "{finished}");
    s.expect_event("task-succeeded", &id);
    wait_no_containers(node);
}

#[test]
fn an_offliner_that_writes_nothing_fails_the_task() {
    let node = "nofiles";
    let (_sshd, s) = docker_stack(node);
    let id = s.submit(Task::mw(json!({"zims": 0})));
    let failed = s.expect_event("task-failed", &id);
    let exception = failed["exception"].as_str().unwrap();
    assert!(exception.contains("wrote no file"), "{failed}");
    assert!(
        text_of(&failed, "traceback").contains("WORKING_DIR"),
        "{failed}"
    );
    assert!(task_dir_gone(s.dir(), &id));
    wait_no_containers(node);
}

/// SIGQUIT stops for good (SIGTERM leaves the scrape running for the
/// next start: tests/restart.rs).
#[test]
fn sigquit_stops_the_task_containers() {
    let sshd = Sshd::start();
    let node = "quitdockerp";
    let mut s = Stack::start(node, WorkerEnv::docker(&sshd)).within(T);
    let id = s.submit(Task::mw(json!({"sleep": 60, "ignoreTerm": true})));
    s.expect_event("task-container_started", &id);
    s.worker.signal("QUIT");
    assert!(s.worker.wait_exit(Duration::from_secs(15)).success());
    assert!(
        containers_of(node).is_empty(),
        "every container of the task stopped and removed"
    );
    assert!(task_dir_gone(s.dir(), &id));
    s.expect_queue(1, 0);
}

#[test]
fn celery_revoke_with_terminate_stops_the_offliner_and_its_helper() {
    let node = "revokedocker";
    let (_sshd, s) = docker_stack(node);
    let id = s.submit(Task::mw(json!({"sleep": 120, "ignoreTerm": true})));
    s.expect_event("task-container_started", &id);
    assert_eq!(
        containers_of(node).len(),
        2,
        "offliner and redis helper run"
    );
    let started = std::time::Instant::now();
    s.revoke(&id, &["--terminate", "--signal", "SIGKILL"]);
    let revoked = s.expect_event("task-revoked", &id);
    assert_eq!(revoked["terminated"], true, "{revoked}");
    assert_eq!(revoked["signum"], 9, "{revoked}");
    wait_no_containers(node);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "revoke took {:?}",
        started.elapsed()
    );
    assert_eq!(s.count("task-succeeded", &id), 0);
    wait_gone(&s.dir().join(&id));
    s.expect_queue(0, 0);
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
        kept_dir_max_age: None,
        container_memory: None,
        container_nano_cpus: None,
        container_log_limit: None,
        container_pids: 4096,
        redis_memory: 1 << 30,
        scraper_network: None,
        image_allowlist: zimfarm_worker::offliner::AllowList::default(),
        redis_image: "zimfarm/redis:test".to_owned(),
    }
}

fn request(id: &str, flags: Value) -> std::sync::Arc<zimfarm_worker::celery::TaskRequest> {
    let text =
        json!({"task": "offliner.mwoffliner", "id": id, "kwargs": mw_kwargs(flags)}).to_string();
    std::sync::Arc::new(zimfarm_worker::celery::request_from_json(&text).unwrap())
}

#[tokio::test]
async fn revoke_stops_every_container_of_the_task() {
    use zimfarm_worker::runner::{RunError, Runner, TaskContext};
    let dir = tempfile::tempdir().unwrap();
    let node = "revokelib";
    let runner = zimfarm_worker::pipeline::DockerRunner::new(settings(dir.path(), node, 10), None)
        .await
        .expect("docker");
    let cancel = tokio_util::sync::CancellationToken::new();
    let recorder = std::sync::Arc::new(Recorder::default());
    let id = task_id();
    let ctx = TaskContext::new(id.clone(), cancel.clone(), recorder.clone());
    let plan = runner.plan(&request(&id, json!({"sleep": 60, "ignoreTerm": true})));
    let run = tokio::spawn(runner.run(plan.unwrap(), ctx));
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
    assert_no_containers(node);
    assert!(task_dir_gone(dir.path(), &id));
}

/// The Docker runner alone, as the worker drives it across a restart: a
/// task left on a leave (SIGTERM) keeps its containers and its record, a
/// new runner finds it kept and carries the same scraper on to its end,
/// and the log holds each line the scraper printed exactly once, those
/// printed while no runner followed included.
#[tokio::test]
async fn a_scrape_left_on_leave_is_carried_on_by_the_next_runner() {
    leave_then_carry_on(Leave {
        node: "leavelib",
        sleep_s: 6,
        leave_after: Duration::from_millis(1500),
        away: Duration::from_millis(1500),
        until_exit: false,
        log_limit: None,
    })
    .await;
}

/// The same, with a scraper that exits while no runner follows it: it is
/// carried on as exited, its output read to the end.
#[tokio::test]
async fn a_scrape_that_exits_while_no_runner_follows_is_carried_on_as_exited() {
    leave_then_carry_on(Leave {
        node: "leaveexit",
        sleep_s: 2,
        leave_after: Duration::from_millis(500),
        away: Duration::from_millis(1500),
        until_exit: true,
        log_limit: None,
    })
    .await;
}

/// The same, away long enough for Docker's bounded copy of the output
/// (2 files of 1 KiB) to rotate lines away before they are read: the log
/// holds every line up to the leave, one gap line, then every line Docker
/// still had, each once and in order.
#[tokio::test]
async fn output_rotated_away_while_no_runner_follows_is_one_gap_line() {
    leave_then_carry_on(Leave {
        node: "leavegap",
        sleep_s: 20,
        leave_after: Duration::from_millis(1500),
        away: Duration::from_secs(15),
        until_exit: false,
        log_limit: Some(zimfarm_worker::docker::LogLimit::total(2048, 2)),
    })
    .await;
}

/// How [`leave_then_carry_on`] runs its task.
struct Leave {
    node: &'static str,
    /// The scraper prints `sleep_s * 2` numbered lines, one every 0.5 s.
    sleep_s: u32,
    leave_after: Duration,
    /// How long no runner follows it.
    away: Duration,
    /// Then wait for it to exit before carrying it on.
    until_exit: bool,
    /// Docker's bound on its copy of the output; with one, lines are
    /// rotated away while no runner follows and a gap line is expected.
    log_limit: Option<zimfarm_worker::docker::LogLimit>,
}

/// Runs a task, leaves it, and carries it on with a new runner (see
/// [`Leave`]).
async fn leave_then_carry_on(how: Leave) {
    use std::sync::Arc;
    use zimfarm_worker::runner::{CancelReason, Cancellation, RunError, Runner, TaskContext};
    let Leave {
        node,
        sleep_s,
        leave_after,
        away,
        until_exit,
        log_limit,
    } = how;
    let limited = |dir: &Path| zimfarm_worker::config::PipelineSettings {
        container_log_limit: log_limit,
        ..settings(dir, node, 10)
    };
    let dir = tempfile::tempdir().unwrap();
    let runner = zimfarm_worker::pipeline::DockerRunner::new(limited(dir.path()), None)
        .await
        .expect("docker");
    let recorder = Arc::new(Recorder::default());
    let id = task_id();
    let carry = Arc::new(json!({"reply_to": "rpc-q", "id": id}));
    let started_at = zimfarm_worker::celery::now_timestamp();
    let cancel = Cancellation::new();
    let ctx = TaskContext::with_cancellation(id.clone(), cancel.clone(), recorder.clone())
        .carrying(carry.clone(), started_at);
    let plan = || {
        runner
            .plan(&request(&id, json!({ "sleep": sleep_s })))
            .expect("a plan")
    };
    let run = tokio::spawn(runner.run(plan(), ctx));
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
    tokio::time::sleep(leave_after).await;
    cancel.cancel(CancelReason::Leave);
    let left = std::time::Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("leaves in seconds")
        .unwrap();
    assert_eq!(outcome, Err(RunError::Cancelled));
    assert!(
        left.elapsed() < Duration::from_secs(1),
        "{:?}",
        left.elapsed()
    );
    // Everything stays: the helper and the offliner, running; the record.
    let offliner = format!("zimfarm_{node}_{id}_offliner");
    let running = Command::new("docker")
        .args(["inspect", "-f", "{{.State.Running}}", &offliner])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&running.stdout).trim(), "true");
    assert_eq!(containers_of(node).len(), 2, "{:?}", containers_of(node));
    let own = dir.path().join(".zimfarm").join(&id);
    let record: Value =
        serde_json::from_slice(&std::fs::read(own.join("task.json")).unwrap()).unwrap();
    assert_eq!(record["stage"]["name"], "generate", "{record}");
    assert_eq!(record["carry"], *carry);
    // No runner follows for a while: the scraper prints on (and ends).
    tokio::time::sleep(away).await;
    if until_exit {
        eventually(
            T,
            Duration::from_millis(100),
            || {
                let out = Command::new("docker")
                    .args(["inspect", "-f", "{{.State.Running}}", &offliner])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).trim() == "false"
            },
            || format!("{offliner} still runs"),
        );
    }

    let next = zimfarm_worker::pipeline::DockerRunner::new(limited(dir.path()), None)
        .await
        .expect("docker");
    let kept = next.kept().await;
    assert_eq!(kept.tasks.len(), 1, "{kept:?}");
    let task = &kept.tasks[0];
    assert_eq!(task.task_id, id);
    assert_eq!(task.stage, "generate");
    assert_eq!(task.carry, *carry);
    assert_eq!(task.started_at, started_at);
    assert!(task.age >= leave_after, "{:?}", task.age);
    assert!(task.offliner.contains("mwoffliner"), "{}", task.offliner);
    next.claim_node(std::slice::from_ref(&id)).await;
    assert_eq!(
        containers_of(node).len(),
        2,
        "a kept task's containers stay"
    );
    let recorder = Arc::new(Recorder::default());
    let ctx = TaskContext::with_cancellation(id.clone(), Cancellation::new(), recorder.clone())
        .carrying(carry.clone(), task.started_at);
    let files = tokio::time::timeout(T, next.run(plan(), ctx))
        .await
        .expect("ends")
        .expect("succeeds");
    assert!(!files.is_empty());
    assert_no_containers(node);
    // Ended: no later start carries it on again.
    assert!(next.kept().await.tasks.is_empty());
    // The same scraper: no second container start.
    let events = recorder.0.lock().unwrap().clone();
    assert!(
        !events.contains(&"task-container_started".to_owned()),
        "{events:?}"
    );
    assert!(
        events.contains(&"task-container_finished".to_owned()),
        "{events:?}"
    );
    let gz = std::fs::File::open(own.join(format!("{offliner}.log.gz"))).unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(gz), &mut log).unwrap();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("progress ") || l.starts_with("[zimfarm-worker]"))
        .collect();
    let n = sleep_s * 2;
    let want: Vec<String> = (1..=n).map(|i| format!("progress {i}/{n}")).collect();
    if log_limit.is_none() {
        assert_eq!(lines, want, "{log}");
        return;
    }
    let gaps: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with("[zimfarm-worker]"))
        .collect();
    assert_eq!(gaps.len(), 1, "one gap line: {log}");
    assert!(
        lines[gaps[0]].starts_with("[zimfarm-worker] output between ")
            && lines[gaps[0]].ends_with(" was rotated away by Docker before it could be read"),
        "{log}"
    );
    let (before, after) = (&lines[..gaps[0]], &lines[gaps[0] + 1..]);
    assert!(!before.is_empty() && !after.is_empty(), "{log}");
    assert_eq!(before, &want[..before.len()], "{log}");
    assert_eq!(after, &want[want.len() - after.len()..], "{log}");
    assert!(
        before.len() + after.len() < want.len(),
        "lines were lost: {log}"
    );
}

#[tokio::test]
async fn too_little_free_disk_fails_before_anything_runs() {
    use zimfarm_worker::runner::{RunError, Runner, TaskContext};
    let dir = tempfile::tempdir().unwrap();
    let node = "diskfull";
    let runner =
        zimfarm_worker::pipeline::DockerRunner::new(settings(dir.path(), node, 1 << 40), None)
            .await
            .expect("docker");
    let id = task_id();
    let ctx = TaskContext::new(
        id.clone(),
        Default::default(),
        std::sync::Arc::new(Recorder::default()),
    );
    match runner
        .run(runner.plan(&request(&id, json!({}))).unwrap(), ctx)
        .await
    {
        Err(RunError::Failed(e)) => assert!(e.message().contains("MIN_FREE_DISK_MB"), "{e}"),
        other => panic!("expected a disk failure, got {other:?}"),
    }
    assert!(containers_of(node).is_empty());
    assert!(task_dir_gone(dir.path(), &id));
}

#[test]
fn json_logs_and_metrics_follow_a_task_through_its_stages() {
    let sshd = Sshd::start();
    let node = "jsonlogs";
    let addr = free_addr();
    let env = WorkerEnv::docker(&sshd)
        .set("LOG_FORMAT", "json")
        .set("METRICS_ADDR", &addr);
    let s = Stack::start(node, env).within(T);
    let id = Task::mw(json!({})).send(&s.vh);
    s.expect_event("task-succeeded", &id);
    let zim_size = std::fs::metadata(sshd.chroot().join("zim/wikipedia/wikipedia_en_test.zim"))
        .expect("the ZIM is in the warehouse")
        .len();

    // Every line is one JSON object; each line logged for the task carries
    // its id, and each line inside a stage carries the stage too.
    let mut stages_seen = std::collections::BTreeSet::new();
    let mut task_lines = 0;
    for line in s.worker.log_text().lines() {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        assert!(v["message"].is_string(), "{line}");
        let spans = v["spans"].as_array().cloned().unwrap_or_default();
        let task = spans.iter().find(|s| s["name"] == "task");
        let stage = spans.iter().find(|s| s["name"] == "stage");
        if let Some(stage) = stage {
            let task = task.unwrap_or_else(|| panic!("a stage line without its task: {line}"));
            assert_eq!(task["task_id"], id.as_str(), "{line}");
            stages_seen.insert(stage["stage"].as_str().unwrap().to_owned());
        }
        if task.is_some_and(|t| t["task_id"] == id.as_str()) {
            task_lines += 1;
        }
    }
    assert_eq!(
        stages_seen.into_iter().collect::<Vec<_>>(),
        ["generate", "prepare", "upload"]
    );
    assert!(task_lines >= 8, "{task_lines} lines for the task");

    // The stages' durations and the bytes uploaded are in the metrics.
    let m = scrape(&addr);
    assert_eq!(
        m["families"]["zimfarm_worker_stage_duration_seconds"],
        "histogram"
    );
    for stage in ["prepare", "generate", "upload"] {
        let count = "zimfarm_worker_stage_duration_seconds_count";
        assert_eq!(
            sample(&m, count, &[("stage", stage)]),
            Some(1.0),
            "{stage}: {m}"
        );
        let sum = sample(
            &m,
            "zimfarm_worker_stage_duration_seconds_sum",
            &[("stage", stage)],
        );
        assert!(sum.unwrap() > 0.0, "{stage}");
    }
    let uploaded = sample(&m, "zimfarm_worker_uploaded_bytes_total", &[]).unwrap();
    assert!(uploaded >= zim_size as f64, "{uploaded} < {zim_size}");
    assert_eq!(
        sample(
            &m,
            "zimfarm_worker_tasks_total",
            &[("task", "offliner.mwoffliner"), ("outcome", "succeeded")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "zimfarm_worker_docker_errors_total", &[]),
        Some(0.0)
    );
    wait_no_containers(node);
}

#[test]
fn a_failed_upload_fails_the_task_and_keeps_the_files() {
    let sshd = Sshd::start();
    let node = "upfail";
    let s = Stack::start(node, WorkerEnv::docker(&sshd).set("UPLOAD_RETRIES", "1")).within(T);
    s.worker.wait_log("warehouse reachable", T);
    sshd.stop();
    let id = s.submit(Task::mw(json!({})));
    let failed = s.expect_event("task-failed", &id);
    let exception = failed["exception"].as_str().unwrap();
    assert!(
        exception.contains("upload to the warehouse failed")
            && exception.contains("cannot reach the warehouse"),
        "{failed}"
    );
    assert!(text_of(&failed, "traceback").contains("kept"), "{failed}");
    // Two days of scraping are not thrown away.
    let task_dir = s.dir().join(&id);
    assert!(task_dir.join("wikipedia_en_test.zim").exists());
    assert!(own_dir(&task_dir).join("task.json").exists());
    expect_drained(&s);
}

/// The worker's own dir of the task whose dir is `task_dir`: its log,
/// marker and upload journals, out of the scraper's reach.
fn own_dir(task_dir: &Path) -> PathBuf {
    let id = task_dir.file_name().unwrap();
    task_dir.parent().unwrap().join(".zimfarm").join(id)
}

/// Waits until an upload journal of the task of `task_dir` claims some
/// bytes.
fn wait_journal_claims(task_dir: &Path, timeout: Duration) {
    let start = std::time::Instant::now();
    loop {
        let claimed = std::fs::read_dir(own_dir(task_dir))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("upload-")
                    && name.ends_with(".json")
                    && std::fs::read(e.path())
                        .ok()
                        .and_then(|t| serde_json::from_slice::<Value>(&t).ok())
                        .is_some_and(|j| j["confirmed"].as_array().is_some_and(|r| !r.is_empty()))
            });
        if claimed {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "no upload journal in {} claimed anything within {timeout:?}",
            task_dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_task_stopped_during_its_upload_goes_straight_to_upload_when_it_comes_back() {
    let sshd = Sshd::start();
    let proxy = ThrottleProxy::start(&sshd.addr());
    let node = "resumetask";
    let sv = Services::new(node);
    let events = sv.events(180);
    let env = WorkerEnv::docker(&sshd).warehouse(&sshd, proxy.port());
    let mut first = sv.spawn(node, &env);
    first.wait_connected();
    // 4 kB/s from now on: the 36 kB ZIM takes about 9 s to upload.
    proxy.set_rate(4000);
    let id = Task::mw(json!({})).send(&sv.vh);
    events.wait_task_event("task-container_finished", &id, T);
    first.wait_log("uploading to the warehouse", T);
    // Stopped once the warehouse confirmed a first piece, and the journal
    // in the task dir says so.
    let task_dir = sv.dir.path().join(&id);
    wait_journal_claims(&task_dir, T);
    // SIGQUIT: stopped for good, the task is not kept for this node (a
    // SIGTERM'd or killed one is adopted: tests/restart.rs); the files
    // are, and a fresh run of the task here goes straight to upload.
    first.signal("QUIT");
    assert!(first.wait_exit(Duration::from_secs(15)).success());
    assert_eq!(events.count("task-succeeded", &id), 0);
    sv.vh.wait_queue_depth("small", 1, 0, T);
    let local_zim = task_dir.join("wikipedia_en_test.zim");
    let want = std::fs::read(&local_zim).expect("the ZIM is kept for the next run");
    assert!(own_dir(&task_dir).join("task.json").exists());

    proxy.set_rate(0);
    let second = sv.spawn(node, &env);
    second.wait_connected();
    events.wait_task_event("task-succeeded", &id, T);
    second.wait_log("going straight to upload", T);
    // ...and picked up the partial file the first one left.
    second.wait_log("resuming a partial upload", T);
    // The offliner ran once, in the first worker only.
    assert_eq!(events.count("task-container_started", &id), 1);
    assert_eq!(events.count("task-started", &id), 2);
    let got = std::fs::read(sshd.chroot().join("zim/wikipedia/wikipedia_en_test.zim")).unwrap();
    assert!(
        got == want,
        "the uploaded ZIM differs from the generated one"
    );
    wait_gone(&task_dir);
    wait_no_containers(node);
    sv.vh.wait_queue_depth("small", 0, 0, T);
}

#[test]
fn a_warehouse_or_key_the_worker_cannot_use_stops_it_at_start() {
    let sshd = Sshd::start();
    let sv = Services::new("untrusted");
    // Registered at the dispatcher, but not in sshd's authorized_keys: the
    // warehouse itself refuses it.
    register_at_shared_dispatcher(sshd.user(), &sshd.unauthorized_key());
    let unauthorized = sshd.unauthorized_key().display().to_string();
    // Accepted by sshd, but not registered at the dispatcher.
    let unregistered = sshd.user_key(KeyKind::RsaPem).display().to_string();
    let encrypted = sshd
        .user_key(KeyKind::EncryptedEd25519)
        .display()
        .to_string();
    let fingerprint = sshd.host_key_fingerprint().to_owned();
    let cases: [(&str, String, String); 5] = [
        (
            "WAREHOUSE_KNOWN_HOSTS",
            "/nonexistent/known_hosts".to_owned(),
            format!("WAREHOUSE_HOST_KEY={fingerprint}"),
        ),
        (
            "WAREHOUSE_KNOWN_HOSTS",
            sshd.wrong_known_hosts_file().display().to_string(),
            "NOT the key recorded at line 1".to_owned(),
        ),
        ("SSH_KEY", unauthorized, "refused the SSH key".to_owned()),
        ("SSH_KEY", encrypted, "passphrase".to_owned()),
        (
            "SSH_KEY",
            unregistered,
            "is not registered for zimfarm-sftp at the dispatcher".to_owned(),
        ),
    ];
    for (var, value, expected) in cases {
        let mut worker = sv.spawn("untrusted", &WorkerEnv::docker(&sshd).set(var, &value));
        let log = worker.expect_exit_2(T);
        assert!(
            log.contains(&expected),
            "{var}={value}: expected {expected:?} in:\n{log}"
        );
    }
    // Pinning the fingerprint it showed is enough to start.
    let worker = sv.spawn(
        "untrusted",
        &WorkerEnv::docker(&sshd)
            .set("WAREHOUSE_KNOWN_HOSTS", "/nonexistent/known_hosts")
            .set("WAREHOUSE_HOST_KEY", fingerprint),
    );
    worker.wait_connected();
    worker.wait_log("warehouse reachable", T);
}

#[test]
fn a_docker_engine_out_of_reach_stops_the_worker_at_start_with_exit_2() {
    let sshd = Sshd::start();
    let sv = Services::new("nodocker");
    let socket = sv.dir.path().join("no-docker.sock");
    let host = format!("unix://{}", socket.display());
    let mut worker = sv.spawn(
        "nodocker",
        &WorkerEnv::docker(&sshd).set("DOCKER_HOST", host),
    );
    let log = worker.expect_exit_2(T);
    assert!(log.contains("cannot reach the Docker engine"), "{log}");
    assert!(!log.contains("consuming"), "{log}");
}

/// Forwards 127.0.0.1:<port> to the Docker engine's unix socket: the
/// engine as `DOCKER_HOST=tcp://...` (as docker:dind serves it). Returns
/// the port and a count of the connections made.
fn docker_over_tcp() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(engine) = UnixStream::connect("/var/run/docker.sock") else {
                continue;
            };
            seen.fetch_add(1, Ordering::SeqCst);
            let (mut c2, mut e2) = (client.try_clone().unwrap(), engine.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut e2);
                let _ = e2.shutdown(std::net::Shutdown::Write);
            });
            let (mut c, mut e) = (client, engine);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut e, &mut c);
                let _ = c.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (port, count)
}

#[test]
fn docker_host_tcp_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("task.json");
    let id = task_id();
    std::fs::write(
        &file,
        json!({"task": "offliner.gutenberg", "id": id, "kwargs": {"flags": {}, "image": {"name": "openzim/gutenberg", "tag": "test"}, "warehouse_path": "/gutenberg"}}).to_string(),
    )
    .unwrap();
    let (port, connections) = docker_over_tcp();
    let out = Command::new(worker_binary())
        .args(["run-task", "--no-upload"])
        .arg(&file)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DOCKER_HOST", format!("tcp://127.0.0.1:{port}"))
        .env("WORKING_DIR", dir.path())
        .env("ZIM_DIR", dir.path())
        .env("NODE_NAME", "dockertcp")
        .env("PULL_POLICY", "never")
        .env("MIN_FREE_DISK_MB", "10")
        .output()
        .unwrap();
    let last = last_json_line(&out.stdout);
    assert_eq!(
        last["status"],
        "SUCCESS",
        "{last} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        connections.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the engine was reached through DOCKER_HOST"
    );
    assert!(containers_of("dockertcp").is_empty());

    let out = Command::new(worker_binary())
        .args(["run-task", "--no-upload"])
        .arg(&file)
        .env_clear()
        .env("DOCKER_HOST", "ftp://127.0.0.1:1")
        .env("WORKING_DIR", dir.path())
        .env("ZIM_DIR", dir.path())
        .env("NODE_NAME", "dockertcp")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot reach the Docker engine"),
        "{stderr}"
    );
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
    let sshd = Sshd::start();
    let run_with = |file: &Path, extra: &[&str]| {
        Command::new(worker_binary())
            .arg("run-task")
            .arg(file)
            .args(extra)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("WORKING_DIR", dir.path())
            .env("ZIM_DIR", dir.path())
            .env("NODE_NAME", "runtask")
            .env("PULL_POLICY", "never")
            .env("MIN_FREE_DISK_MB", "10")
            .envs(WorkerEnv::new().warehouse(&sshd, sshd.port()).overrides())
            .output()
            .unwrap()
    };
    let run = |file: &Path| run_with(file, &[]);
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
    // Uploaded, then the task dir removed.
    for n in 1..=2 {
        let zim = sshd
            .chroot()
            .join(format!("zim/videos/youtube_test_{n}.zim"));
        assert!(zim.exists(), "{} is not in the warehouse", zim.display());
    }
    assert!(task_dir_gone(dir.path(), &id));

    // --no-upload keeps the files where they are, and needs no USERNAME.
    let kept = task_id();
    std::fs::write(
        &file,
        json!({"task": "offliner.youtube", "id": kept, "kwargs": {"flags": {"id": "x"}, "image": {"name": "openzim/youtube", "tag": "test"}, "warehouse_path": "/videos"}}).to_string(),
    )
    .unwrap();
    let out = Command::new(worker_binary())
        .args(["run-task", "--no-upload"])
        .arg(&file)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("WORKING_DIR", dir.path())
        .env("ZIM_DIR", dir.path())
        .env("NODE_NAME", "runtask")
        .env("PULL_POLICY", "never")
        .env("MIN_FREE_DISK_MB", "10")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join(&kept).read_dir().unwrap().count() >= 1);
    // Without --no-upload, USERNAME is needed: exit 2 naming it.
    let out = Command::new(worker_binary())
        .arg("run-task")
        .arg(&file)
        .env_clear()
        .env("WORKING_DIR", dir.path())
        .env("NODE_NAME", "runtask")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("USERNAME"));

    // A task file that is not a task: exit 2 with a line naming the file.
    std::fs::write(&file, "{\"task\": 1}").unwrap();
    let out = run(&file);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("task.json"));
    // A task the pipeline refuses: exit 1, the reason on the last line.
    std::fs::write(&file, json!({"task": "offliner.youtube", "id": task_id(), "kwargs": {"image": {"name": "someone/else"}, "warehouse_path": "/v"}}).to_string()).unwrap();
    let out = run_with(&file, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        last_json_line(&out.stdout)["error"]
            .as_str()
            .unwrap()
            .contains("IMAGE_ALLOWLIST")
    );
}

/// Whether `path` is an intact ZIM-shaped file: its last 16 bytes are the
/// MD5 of the rest (what the stand-in's `--zimMB` writes).
fn zim_intact(path: &Path) -> bool {
    let bytes = std::fs::read(path).unwrap();
    bytes.len() > 96
        && <md5::Md5 as md5::Digest>::digest(&bytes[..bytes.len() - 16])[..]
            == bytes[bytes.len() - 16..]
}

#[test]
fn finished_zims_go_while_the_scraper_runs_and_unfinished_ones_wait() {
    let node = "early";
    let (sshd, s) = docker_stack(node);
    let id = task_id();
    // _1: a checksum that fails until it is written again at the end; _2:
    // finished 2 s in; _3: grows for 10 s, then the scraper exits.
    let flags = json!({
        "zims": 3, "zimMB": 4, "rewriteFirst": "bad", "zimEvery": 2, "growFor": 10,
    });
    send_task(&s.vh, "offliner.mwoffliner", &id, &mw_kwargs(flags), &[]);
    let warehouse = sshd.chroot().join("zim/wikipedia");
    let second = warehouse.join("wikipedia_en_test_2.zim");
    eventually(
        T,
        Duration::from_millis(100),
        || second.exists(),
        || "the finished ZIM was not uploaded early".to_owned(),
    );
    assert_eq!(
        s.count("task-container_finished", &id),
        0,
        "the scraper had exited before the finished ZIM went"
    );
    assert!(!warehouse.join("wikipedia_en_test_1.zim").exists());
    assert!(!warehouse.join("wikipedia_en_test_3.zim").exists());
    let succeeded = s.expect_event("task-succeeded", &id);
    let result = succeeded["result"].as_str().unwrap();
    for n in 1..=3 {
        let name = format!("wikipedia_en_test_{n}.zim");
        assert_eq!(
            result.matches(&format!("'name': '{name}'")).count(),
            1,
            "{name} in {result}"
        );
        assert!(zim_intact(&warehouse.join(&name)), "{name} is not intact");
    }
    let log = s.worker.log_text();
    assert_eq!(
        log.matches("uploading a finished ZIM while the scraper runs")
            .count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("uploaded early") && log.contains("uploaded_early=1"),
        "{log}"
    );
    expect_drained(&s);
}

#[test]
fn a_zim_the_scraper_rewrites_after_its_early_upload_fails_the_task_clearly() {
    let node = "rewrite";
    let (sshd, s) = docker_stack(node);
    let id = task_id();
    // _1 is finished at once and still for 8 s (uploaded early), then the
    // scraper writes it again with other bytes.
    let flags = json!({"zims": 2, "zimMB": 2, "rewriteFirst": "good", "zimEvery": 8});
    send_task(&s.vh, "offliner.mwoffliner", &id, &mw_kwargs(flags), &[]);
    let failed = s.expect_event("task-failed", &id);
    let exception = failed["exception"].as_str().unwrap();
    assert!(
        exception.contains(
            "wikipedia_en_test_1.zim was uploaded to the warehouse while the offliner ran"
        ) && exception.contains("changed it afterwards")
            && exception.contains("never overwrites"),
        "{failed}"
    );
    // The warehouse keeps what it had; the files here are kept too.
    let early = sshd.chroot().join("zim/wikipedia/wikipedia_en_test_1.zim");
    assert!(zim_intact(&early));
    let task_dir = s.dir().join(&id);
    assert_ne!(
        std::fs::read(&early).unwrap(),
        std::fs::read(task_dir.join("wikipedia_en_test_1.zim")).unwrap()
    );
    expect_drained(&s);
}

/// The bytes each upload journal of the task of `task_dir` claims.
fn journal_claims(task_dir: &Path) -> u64 {
    std::fs::read_dir(own_dir(task_dir))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("upload-"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|t| serde_json::from_slice::<Value>(&t).ok())
        .flat_map(|j| j["confirmed"].as_array().cloned().unwrap_or_default())
        .map(|r| r[1].as_u64().unwrap() - r[0].as_u64().unwrap())
        .sum()
}

#[test]
fn kill_9_mid_upload_then_a_restart_sends_only_what_is_missing() {
    let sshd = Sshd::start();
    // 8 MB/s for every connection together: the 64 MiB ZIM takes 8 s.
    let proxy = ThrottleProxy::start(&sshd.addr());
    let node = "killupload";
    let sv = Services::new(node);
    let events = sv.events(180);
    let env = WorkerEnv::docker(&sshd)
        .set("UPLOAD_STREAMS", 4)
        .warehouse(&sshd, proxy.port());
    let mut first = sv.spawn(node, &env);
    first.wait_connected();
    proxy.set_rate(8_000_000);
    let id = Task::mw(json!({"zimMB": 64})).send(&sv.vh);
    let task_dir = sv.dir.path().join(&id);
    let local = task_dir.join("wikipedia_en_test.zim");
    eventually(
        T,
        Duration::from_millis(20),
        || journal_claims(&task_dir) >= 16 << 20,
        || "the upload did not get going".to_owned(),
    );
    first.signal("KILL");
    first.wait_exit(T);
    let claimed = journal_claims(&task_dir);
    let want = std::fs::read(&local).unwrap();
    // What the warehouse really has, block by block: more than the journal
    // claims, by what was written after its last save.
    let tmp = sshd
        .chroot()
        .join("zim/wikipedia/wikipedia_en_test.zim.tmp");
    let got = std::fs::read(&tmp).expect("the partial upload is there");
    let block = 32 << 10;
    let present: usize = want
        .chunks(block)
        .enumerate()
        .filter(|(i, w)| got.get(i * block..i * block + w.len()) == Some(*w))
        .map(|(_, w)| w.len())
        .sum();
    let missing = (want.len() - present) as u64;
    assert!(missing > 16 << 20, "only {missing} bytes were missing");

    proxy.set_rate(0);
    proxy.reset_bytes();
    let second = sv.spawn(node, &env);
    second.wait_connected();
    events.wait_task_event("task-succeeded", &id, T);
    second.wait_log("going straight to upload", T);
    let sent = proxy.bytes_up();
    eprintln!(
        "kill -9 at {claimed} bytes claimed: {missing} missing, the restart sent {sent} ({:.3}x)",
        sent as f64 / missing as f64
    );
    assert!(
        sent as f64 <= 1.2 * missing as f64,
        "the restart sent {sent} bytes for {missing} missing (the journal claimed {claimed})"
    );
    let uploaded =
        std::fs::read(sshd.chroot().join("zim/wikipedia/wikipedia_en_test.zim")).unwrap();
    assert!(
        uploaded == want,
        "the uploaded ZIM differs from the generated one"
    );
    wait_gone(&task_dir);
    wait_no_containers(node);
    sv.vh.wait_queue_depth("small", 0, 0, T);
}
