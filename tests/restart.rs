//! A scrape outlives its worker (issue 26), against the real Docker engine,
//! RabbitMQ and an OpenSSH warehouse: SIGTERM or kill -9 mid-scrape, then a
//! new worker with the same environment carries the same scraper container
//! on (one `create` of the offliner in Docker's events, one `task-started`,
//! one final event, the ZIM once, every numbered line of the stand-in in the
//! uploaded log once and in order); kill -9 mid-upload resumes the upload;
//! a scraper that exits while no worker runs is adopted as exited; lines
//! Docker rotated away while no worker ran leave one gap marker; a node away
//! longer than RESTART_GRACE lets another node run the task and removes its
//! stale scrape without a word; SIGQUIT and remote `shutdown` still stop
//! everything for good.
//!
//! The stand-in prints `line 1` .. `line N` (`--count`, see
//! tests/images/README.md); the worker's upload of its log to the
//! warehouse's `/logs/` is what is judged.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::sshd::Sshd;
use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(90);
/// Docker's `docker stop` waits 10 s before SIGKILL: a worker leaving on
/// SIGTERM must be gone well within it.
const LEAVE_WITHIN: Duration = Duration::from_secs(10);
/// The start of the gap marker the worker writes into a task log where
/// Docker's bounded copy of the output lost lines before it read them.
const GAP_MARKER: &str = "[zimfarm-worker] output between ";

/// A warehouse, services of the test's own, an event receiver and the
/// environment of a Docker-runner worker named `node`.
struct Farm {
    sshd: Sshd,
    sv: Services,
    events: EventsProc,
    env: WorkerEnv,
    node: String,
    /// Docker's `create` events of the node's containers.
    creates: ContainerCreates,
}

impl Farm {
    fn new(node: &str) -> Self {
        Self::with(node, |env| env)
    }

    fn with(node: &str, env: impl FnOnce(WorkerEnv) -> WorkerEnv) -> Self {
        let sshd = Sshd::start();
        let env = env(WorkerEnv::docker(&sshd));
        Self::on(node, sshd, env)
    }

    /// With `sshd` as the warehouse and `env` as the workers' environment.
    fn on(node: &str, sshd: Sshd, env: WorkerEnv) -> Self {
        let creates = ContainerCreates::watch(node);
        let sv = Services::new(node);
        let events = sv.events(300);
        Self {
            sshd,
            sv,
            events,
            env,
            node: node.to_owned(),
            creates,
        }
    }

    /// The Celery hostname of its workers (USERNAME@NODE_NAME).
    fn hostname(&self) -> String {
        format!("{}@{}", self.sshd.user(), self.node)
    }

    /// `zimfarm-worker ps --json` with the workers' environment: its rows.
    fn ps_json(&self) -> Vec<Value> {
        let out = run_worker(&["ps", "--json"], &self.vars());
        assert!(out.status.success(), "{}", output_text(&out));
        match serde_json::from_slice(&out.stdout) {
            Ok(Value::Array(rows)) => rows,
            other => panic!("ps --json: {other:?}\n{}", output_text(&out)),
        }
    }

    /// `zimfarm-worker ps` with the workers' environment: its table.
    fn ps(&self) -> String {
        let out = run_worker(&["ps"], &self.vars());
        assert!(out.status.success(), "{}", output_text(&out));
        output_text(&out)
    }

    fn vars(&self) -> Vec<(String, String)> {
        self.env.vars(&self.sv.vh, self.dir(), &self.node)
    }

    /// A worker of this node, connected.
    fn worker(&self) -> WorkerProc {
        self.sv.start(&self.node, &self.env)
    }

    fn dir(&self) -> &Path {
        self.sv.dir.path()
    }

    /// Sends an mwoffliner task of the stand-in with `flags`; its id.
    fn send(&self, flags: Value) -> String {
        Task::mw(flags).send(&self.sv.vh)
    }

    fn count(&self, kind: &str, id: &str) -> usize {
        self.events.count(kind, id)
    }

    /// The `worker-offline` of the worker life `pid` of this node.
    fn offline_of(&self, pid: u32) -> Value {
        let host = self.hostname();
        self.events.wait_for(
            |v| v["type"] == "worker-offline" && v["hostname"] == host.as_str() && v["pid"] == pid,
            T,
            &format!("worker-offline of {host} pid {pid}"),
        )
    }

    /// The uploaded container log of task `id`, unzipped.
    fn uploaded_log(&self, id: &str) -> String {
        let path = self
            .sshd
            .chroot()
            .join(format!("logs/zimfarm_{}_{id}_offliner.log.gz", self.node));
        gunzip(&path)
    }

    /// The task ended once, in success, as a scrape carried on: one
    /// `task-started`, one `task-succeeded`, one offliner container
    /// created, the ZIM in the warehouse once, no container and no task
    /// dir left, the queue drained.
    fn expect_carried_on(&self, id: &str) {
        self.events.wait_task_event("task-succeeded", id, T);
        // Anything sent late (a second final event) has had time to come.
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(self.count("task-succeeded", id), 1, "one success");
        assert_eq!(self.count("task-failed", id), 0);
        assert_eq!(
            self.count("task-started", id),
            1,
            "no second task-started for an adopted task"
        );
        assert_eq!(
            self.creates.offliners_of(id),
            1,
            "the offliner container of {id} was created once"
        );
        let warehouse = self.sshd.chroot().join("zim/wikipedia");
        let names: Vec<String> = std::fs::read_dir(&warehouse)
            .unwrap_or_else(|e| panic!("{}: {e}", warehouse.display()))
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["wikipedia_en_test.zim"], "the ZIM, once");
        wait_no_containers(&self.node);
        eventually(
            T,
            Duration::from_millis(100),
            || !self.dir().join(id).exists(),
            || format!("the task dir of {id} is still there"),
        );
        self.sv.vh.wait_queue_depth("small", 0, 0, T);
    }
}

fn wait_no_containers(node: &str) {
    eventually(
        T,
        Duration::from_millis(100),
        || containers_of(node).is_empty(),
        || format!("containers left: {:?}", containers_of(node)),
    );
}

fn gunzip(path: &Path) -> String {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text
}

/// What a task log holds of the stand-in's numbered lines: their numbers
/// in the order of the log, and for each gap marker, how many numbers came
/// before it.
#[derive(Debug)]
struct Numbered {
    numbers: Vec<u64>,
    markers: Vec<usize>,
}

impl Numbered {
    fn of(log: &str) -> Self {
        let mut numbers = Vec::new();
        let mut markers = Vec::new();
        for line in log.lines() {
            if let Some(n) = line.strip_prefix("line ") {
                numbers.push(n.parse().unwrap_or_else(|_| panic!("a bad line {line:?}")));
            } else if line.starts_with(GAP_MARKER) {
                assert!(
                    line.contains(" was rotated away by Docker"),
                    "a gap marker that does not say what happened: {line:?}"
                );
                markers.push(numbers.len());
            }
        }
        Self { numbers, markers }
    }

    /// Each of `1..=n` once; in order within each stream (`by_parity`: odd
    /// ones on stdout, even ones on stderr, `--countStderr`), or in order
    /// overall; and no gap marker.
    fn assert_complete(&self, n: u64, by_parity: bool, log: &str) {
        assert!(
            self.markers.is_empty(),
            "a gap marker, with nothing lost:\n{log}"
        );
        let mut sorted = self.numbers.clone();
        sorted.sort_unstable();
        let want: Vec<u64> = (1..=n).collect();
        if sorted != want {
            let mut seen = std::collections::BTreeMap::<u64, usize>::new();
            for x in &self.numbers {
                *seen.entry(*x).or_default() += 1;
            }
            let twice: Vec<u64> = seen
                .iter()
                .filter(|(_, c)| **c > 1)
                .map(|(x, _)| *x)
                .collect();
            let missing: Vec<u64> = want
                .iter()
                .filter(|x| !seen.contains_key(x))
                .copied()
                .collect();
            panic!(
                "numbered lines: {} missing (first {:?}), {} twice (first {:?})",
                missing.len(),
                &missing[..missing.len().min(10)],
                twice.len(),
                &twice[..twice.len().min(10)]
            );
        }
        let streams: Vec<Vec<u64>> = if by_parity {
            vec![
                self.numbers
                    .iter()
                    .copied()
                    .filter(|x| x % 2 == 1)
                    .collect(),
                self.numbers
                    .iter()
                    .copied()
                    .filter(|x| x % 2 == 0)
                    .collect(),
            ]
        } else {
            vec![self.numbers.clone()]
        };
        for stream in streams {
            if let Some(w) = stream.windows(2).find(|w| w[0] >= w[1]) {
                panic!("numbered lines out of order: {} before {}", w[0], w[1]);
            }
        }
    }
}

/// The container of task `id` is still running while no worker runs.
fn assert_offliner_running(id: &str) {
    assert_eq!(
        offliner_state(id).as_deref(),
        Some("running"),
        "the scraper of {id} runs on while no worker runs"
    );
}

/// Waits for a worker process to exit 0 within Docker's 10 s; how long
/// it took.
fn expect_left(worker: &mut WorkerProc) -> Duration {
    let start = Instant::now();
    let status = worker.wait_exit(Duration::from_secs(20));
    let took = start.elapsed();
    assert!(status.success(), "exit 0 when it leaves, got {status}");
    assert!(
        took < LEAVE_WITHIN,
        "left in {took:?}, over {LEAVE_WITHIN:?}"
    );
    took
}

/// Whether some line of `log` names `id` and says it is adopted (the
/// worker's start-up line for it; its module's name has "adopt" too).
fn says_adopted(log: &str, id: &str) -> bool {
    log.lines()
        .any(|l| l.contains(id) && l.contains("adopting a task"))
}

// ------------------------------------------------------------------ tests

#[test]
fn sigterm_mid_scrape_then_a_new_worker_carries_the_same_scraper_on() {
    let farm = Farm::new("termkeep");
    let mut first = farm.worker();
    // 300 lines at 20 a second, odd ones on stdout, even ones on stderr.
    let id = farm.send(json!({"count": "300:20", "countStderr": true}));
    wait_offliner_line(&id, "line 60", T);
    // `ps` asks the running worker: the task runs, generating.
    let rows = farm.ps_json();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (&rows[0]["id"], &rows[0]["state"], &rows[0]["stage"]),
        (&json!(id), &json!("running"), &json!("generate")),
        "{rows:?}"
    );
    assert_eq!(
        rows[0]["container"],
        json!(format!("zimfarm_{}_{id}_offliner", farm.node))
    );
    let table = farm.ps();
    assert_contains(&table, "STAGE");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(id.as_str()) && l.contains("generate")),
        "{table}"
    );
    first.signal("TERM");
    let took = expect_left(&mut first);
    eprintln!("SIGTERM to exit: {took:?}");
    assert_offliner_running(&id);
    let offline = farm.offline_of(first.pid());
    assert_eq!(offline["kept"], json!([id]), "{offline}");
    assert_eq!(farm.count("task-succeeded", &id), 0);
    assert_eq!(farm.count("task-failed", &id), 0);
    assert!(farm.dir().join(&id).exists(), "the task dir is left");
    // No worker runs: `ps` lists the scrape kept for the next start, from
    // its record and Docker.
    let rows = farm.ps_json();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (&rows[0]["id"], &rows[0]["state"], &rows[0]["stage"]),
        (&json!(id), &json!("kept"), &json!("generate")),
        "{rows:?}"
    );
    assert!(
        rows[0]["memory"].as_u64().is_some_and(|m| m > 0),
        "{rows:?}"
    );
    let table = farm.ps();
    assert_contains(&table, "no worker runs");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(id.as_str()) && l.contains("kept")),
        "{table}"
    );

    // Lines printed while no worker runs reach the log too.
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let second = farm.worker();
    eventually(
        T,
        Duration::from_millis(50),
        || says_adopted(&second.log_text(), &id),
        || format!("no start-up line adopting {id}:\n{}", second.log_text()),
    );
    eprintln!("start to adopted: {:?}", started.elapsed());
    // While it runs, it is one of the node's active tasks.
    let active = broadcast(&farm.sv.vh, &farm.hostname(), "active", json!({}));
    assert!(active.to_string().contains(&id), "{active}");
    farm.expect_carried_on(&id);
    let succeeded = farm.events.wait_task_event("task-succeeded", &id, T);
    assert_eq!(succeeded["pid"], second.pid(), "ended by the new worker");
    let log = farm.uploaded_log(&id);
    Numbered::of(&log).assert_complete(300, true, &log);
}

#[test]
fn kill_9_mid_scrape_then_a_new_worker_carries_the_same_scraper_on() {
    let farm = Farm::new("killkeep");
    let mut first = farm.worker();
    let id = farm.send(json!({"count": "300:20"}));
    wait_offliner_line(&id, "line 60", T);
    first.signal("KILL");
    first.wait_exit(T);
    assert_offliner_running(&id);
    std::thread::sleep(Duration::from_secs(2));
    let second = farm.worker();
    eventually(
        T,
        Duration::from_millis(50),
        || says_adopted(&second.log_text(), &id),
        || format!("no start-up line adopting {id}:\n{}", second.log_text()),
    );
    second.assert_log_lacks("removed containers left by an earlier run");
    farm.expect_carried_on(&id);
    let log = farm.uploaded_log(&id);
    Numbered::of(&log).assert_complete(300, false, &log);
}

/// The bytes each upload journal of task `id` claims.
fn journal_claims(zim_dir: &Path, id: &str) -> u64 {
    std::fs::read_dir(zim_dir.join(".zimfarm").join(id))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("upload-"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|t| serde_json::from_slice::<Value>(&t).ok())
        .flat_map(|j| j["confirmed"].as_array().cloned().unwrap_or_default())
        .map(|r| r[1].as_u64().unwrap_or(0) - r[0].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn kill_9_mid_upload_then_a_new_worker_resumes_the_upload_from_its_journal() {
    let sshd = Sshd::start();
    let proxy = ThrottleProxy::start(&sshd.addr());
    let env = WorkerEnv::docker(&sshd).warehouse(&sshd, proxy.port());
    let farm = Farm::on("killupkeep", sshd, env);
    let mut first = farm.worker();
    // 4 kB/s: the 36 kB demo ZIM takes about 9 s to upload.
    proxy.set_rate(4000);
    let id = farm.send(json!({"count": "40:0"}));
    farm.events
        .wait_task_event("task-container_finished", &id, T);
    eventually(
        T,
        Duration::from_millis(20),
        || journal_claims(farm.dir(), &id) > 0,
        || "the upload did not get going".to_owned(),
    );
    first.signal("KILL");
    first.wait_exit(T);
    assert_eq!(farm.count("task-succeeded", &id), 0);
    let want = std::fs::read(farm.dir().join(&id).join("wikipedia_en_test.zim"))
        .expect("the ZIM is kept for the next run");

    proxy.set_rate(0);
    let second = farm.worker();
    farm.events.wait_task_event("task-succeeded", &id, T);
    second.wait_log("resuming a partial upload", T);
    assert!(
        says_adopted(&second.log_text(), &id),
        "{}",
        second.log_text()
    );
    let got = std::fs::read(
        farm.sshd
            .chroot()
            .join("zim/wikipedia/wikipedia_en_test.zim"),
    )
    .unwrap();
    assert!(
        got == want,
        "the uploaded ZIM differs from the generated one"
    );
    farm.expect_carried_on(&id);
    let log = farm.uploaded_log(&id);
    Numbered::of(&log).assert_complete(40, false, &log);
}

#[test]
fn a_scraper_that_exits_while_no_worker_runs_is_adopted_as_exited() {
    let farm = Farm::new("exitaway");
    let mut first = farm.worker();
    // 3 s of lines.
    let id = farm.send(json!({"count": "60:20"}));
    wait_offliner_line(&id, "line 10", T);
    first.signal("TERM");
    expect_left(&mut first);
    wait_offliner_state(&id, "exited", T);
    let second = farm.worker();
    farm.expect_carried_on(&id);
    assert!(
        says_adopted(&second.log_text(), &id),
        "{}",
        second.log_text()
    );
    let finished = farm
        .events
        .wait_task_event("task-container_finished", &id, T);
    assert_eq!(finished["exit_code"], 0, "{finished}");
    let log = farm.uploaded_log(&id);
    Numbered::of(&log).assert_complete(60, false, &log);
}

/// The largest number among the last lines Docker kept of task `id`'s
/// offliner output.
fn last_number(id: &str) -> u64 {
    offliner_output(id, 5)
        .lines()
        .filter_map(|l| l.strip_prefix("line "))
        .filter_map(|n| n.parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn lines_docker_rotated_away_while_no_worker_ran_leave_one_gap_marker() {
    // Docker keeps 1 MB of the output (5 files of 200 kB); the burst of
    // 50,000 lines while no worker runs is about 4 MB of it.
    let farm = Farm::with("gapmark", |env| env.set("CONTAINER_LOG_MAX_MB", 1));
    let mut first = farm.worker();
    const BURST: u64 = 50_000;
    const TOTAL: u64 = BURST + 300;
    let id =
        farm.send(json!({"count": format!("{TOTAL}:20"), "burst": format!("{BURST}:burst-now")}));
    wait_offliner_line(&id, "line 40", T);
    first.signal("TERM");
    expect_left(&mut first);
    assert_offliner_running(&id);
    // The scraper sees its task dir as its output dir.
    std::fs::write(farm.dir().join(&id).join("burst-now"), b"").unwrap();
    eventually(
        T,
        Duration::from_millis(100),
        || last_number(&id) > BURST + 40,
        || format!("the burst did not happen (last line {})", last_number(&id)),
    );
    let _second = farm.worker();
    farm.expect_carried_on(&id);
    let log = farm.uploaded_log(&id);
    let numbered = Numbered::of(&log);
    assert_eq!(
        numbered.markers.len(),
        1,
        "one gap marker: {:?}",
        log.lines()
            .filter(|l| l.starts_with(GAP_MARKER))
            .collect::<Vec<_>>()
    );
    let at = numbered.markers[0];
    let (before, after) = numbered.numbers.split_at(at);
    // Before the gap: 1.. without a hole; after it: on to the end without
    // a hole; none twice, all in order.
    assert!(
        before.iter().copied().eq(1..=before.len() as u64),
        "the lines before the gap are 1..{} in order",
        before.len()
    );
    let first_after = *after.first().expect("lines after the gap");
    assert!(
        after.iter().copied().eq(first_after..=TOTAL),
        "the lines after the gap are {first_after}..{TOTAL} in order"
    );
    assert!(
        before.len() as u64 >= 40 && first_after > before.len() as u64 + 1,
        "lines were lost at the gap: {} then {first_after}",
        before.len()
    );
}

#[test]
fn a_node_away_longer_than_restart_grace_lets_another_run_the_task_and_removes_its_stale_scrape() {
    let creates = ContainerCreates::watch("grace-a");
    let creates_b = ContainerCreates::watch("grace-b");
    let sshd = Sshd::start();
    let sv = Services::new("grace");
    let events = sv.events(400);
    let env = WorkerEnv::docker(&sshd).set("RESTART_GRACE", 15);
    let dir_of = |node: &str| -> PathBuf {
        let dir = sv.dir.path().join(node);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    };
    let (dir_a, dir_b) = (dir_of("grace-a"), dir_of("grace-b"));
    let mut a = WorkerProc::start(&sv.vh, &dir_a, "grace-a", &env);
    a.wait_connected();
    // 20 s of lines.
    let id = Task::mw(json!({"count": "400:20"})).send(&sv.vh);
    wait_offliner_line(&id, "line 20", T);
    let b = WorkerProc::start(&sv.vh, &dir_b, "grace-b", &env);
    b.wait_connected();
    a.signal("KILL");
    a.wait_exit(T);
    let killed = Instant::now();

    // B gets the message back, finds A silent and runs the task.
    let succeeded = events.wait_task_event("task-succeeded", &id, Duration::from_secs(150));
    assert_eq!(
        succeeded["hostname"],
        format!("{}@grace-b", sshd.user()),
        "{succeeded}"
    );
    // A comes back after more than RESTART_GRACE away.
    if let Some(left) = Duration::from_secs(17).checked_sub(killed.elapsed()) {
        std::thread::sleep(left);
    }
    let metrics = free_addr();
    let a2 = WorkerProc::start(
        &sv.vh,
        &dir_a,
        "grace-a",
        &env.clone().set("METRICS_ADDR", &metrics),
    );
    a2.wait_connected();
    // It removes its stale scrape once the message did not come back to
    // it (STALE_WAIT, 60 s after it connected).
    eventually(
        Duration::from_secs(120),
        Duration::from_millis(200),
        || containers_of("grace-a").is_empty(),
        || {
            format!(
                "A's stale scrape is still there: {:?}",
                containers_of("grace-a")
            )
        },
    );
    eventually(
        T,
        Duration::from_millis(100),
        || !dir_a.join(&id).exists() && !dir_a.join(".zimfarm").join(&id).exists(),
        || "A's task dir or state of the stale scrape is still there".to_owned(),
    );
    assert_eq!(
        sample(
            &scrape(&metrics),
            "zimfarm_worker_kept_tasks_removed_total",
            &[("reason", "away_too_long")]
        ),
        Some(1.0)
    );
    assert!(!says_adopted(&a2.log_text(), &id), "{}", a2.log_text());
    std::thread::sleep(Duration::from_secs(2));
    // One run in the end, B's; nothing from A's new life about the task.
    assert_eq!(events.count("task-succeeded", &id), 1);
    assert_eq!(events.count("task-failed", &id), 0);
    let from_a2: Vec<Value> = events
        .events()
        .into_iter()
        .filter(|e| e["uuid"] == id.as_str() && e["pid"] == a2.pid())
        .collect();
    assert!(
        from_a2.is_empty(),
        "A's new life spoke of the task: {from_a2:?}"
    );
    assert_eq!(
        (creates.offliners_of(&id), creates_b.offliners_of(&id)),
        (1, 1),
        "A's scrape and B's, no other"
    );
    wait_no_containers("grace-b");
    sv.vh.wait_queue_depth("small", 0, 0, T);
}

#[test]
fn sigquit_mid_scrape_stops_it_for_good_and_the_next_worker_starts_afresh() {
    let farm = Farm::new("quitdocker");
    let mut first = farm.worker();
    let id = farm.send(json!({"count": "100:20", "ignoreTerm": true}));
    wait_offliner_line(&id, "line 10", T);
    first.signal("QUIT");
    assert!(first.wait_exit(Duration::from_secs(15)).success());
    assert!(
        containers_of(&farm.node).is_empty(),
        "every container of the task stopped and removed"
    );
    assert!(!farm.dir().join(&id).exists(), "the task dir is removed");
    farm.sv.vh.wait_queue_depth("small", 1, 0, T);
    let offline = farm.offline_of(first.pid());
    assert_eq!(offline["kept"], json!([]), "{offline}");

    // Nothing is adopted: the next worker runs the task from the start.
    let second = farm.worker();
    farm.events.wait_task_event("task-succeeded", &id, T);
    assert!(
        !says_adopted(&second.log_text(), &id),
        "{}",
        second.log_text()
    );
    assert_eq!(farm.count("task-started", &id), 2);
    assert_eq!(farm.creates.offliners_of(&id), 2);
    wait_no_containers(&farm.node);
    farm.sv.vh.wait_queue_depth("small", 0, 0, T);
}

#[test]
fn remote_shutdown_mid_scrape_stops_it_for_good() {
    let farm = Farm::new("remotequit");
    let mut worker = farm.worker();
    let id = farm.send(json!({"count": "200:20"}));
    wait_offliner_line(&id, "line 10", T);
    // Its reply is not waited for: the worker leaving is the answer.
    std::process::Command::new(python())
        .args(["-m", "celery", "-b", &farm.sv.vh.url()])
        .args(["control", "shutdown", "-t", "5", "-d", &farm.hostname()])
        .output()
        .expect("python runs");
    assert!(worker.wait_exit(Duration::from_secs(15)).success());
    assert!(
        containers_of(&farm.node).is_empty(),
        "every container stopped and removed"
    );
    assert!(!farm.dir().join(&id).exists(), "the task dir is removed");
    farm.sv.vh.wait_queue_depth("small", 1, 0, T);
    let offline = farm.offline_of(worker.pid());
    assert_eq!(offline["kept"], json!([]), "{offline}");
}
