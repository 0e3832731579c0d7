//! A running task seen live (SPEC §10): `task-progress` events with the
//! scraper's own progress file (the stand-in youtube2zim's
//! `--stats-filename`), paced by `PROGRESS_INTERVAL`, in `inspect active`,
//! in the per-task metrics while the task runs, and read by Celery's
//! `EventReceiver` and `State` (the dispatcher's monitor) with the task's
//! result unchanged; a progress file that is a fifo, a link or 1 GB
//! changes nothing but a log line; an upload over a throttled link reports
//! its bytes and ETA; Flower 2 shows the running task as PROGRESS;
//! `zimfarm-worker ps` shows a scrape's own progress from the running
//! worker and, once it left, from the kept scrape's file.

mod common;

use std::process::Command;
use std::time::Duration;

use common::flower::Flower;
use common::sshd::Sshd;
use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);

/// The progress file's reserved name in the task dir.
const STATS_FILE: &str = ".zimfarm-progress.json";

/// An `offliner.youtube` task of the stand-in image, with `flags`.
fn youtube(flags: Value) -> Task {
    let mut all = json!({"id": "x"});
    all.as_object_mut()
        .unwrap()
        .extend(flags.as_object().cloned().unwrap_or_default());
    Task::new(
        "offliner.youtube",
        json!({
            "flags": all,
            "image": {"name": "openzim/youtube", "tag": "test"},
            "warehouse_path": "/videos",
        }),
    )
}

/// The `task-progress` events of task `id` so far, in arrival order.
fn progress_of(events: &EventsProc, id: &str) -> Vec<Value> {
    events
        .events()
        .into_iter()
        .filter(|e| e["type"] == "task-progress" && e["uuid"] == id)
        .collect()
}

/// Those of stage `stage`.
fn of_stage<'a>(progress: &'a [Value], stage: &str) -> Vec<&'a Value> {
    progress.iter().filter(|e| e["stage"] == stage).collect()
}

/// No two events of one stage closer than `interval` seconds (by the
/// worker's own timestamps; 5 ms for their rounding).
fn assert_paced(progress: &[Value], interval: f64) {
    for stage in ["prepare", "generate", "upload"] {
        let times: Vec<f64> = of_stage(progress, stage)
            .iter()
            .map(|e| e["timestamp"].as_f64().expect("a timestamp"))
            .collect();
        for pair in times.windows(2) {
            assert!(
                pair[1] - pair[0] >= interval - 0.005,
                "two {stage} events {:.3} s apart, under the {interval} s interval: {progress:#?}",
                pair[1] - pair[0]
            );
        }
    }
}

/// Every file under `root`, relative to it.
fn files_under(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(path);
            } else {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// Python's `ast.literal_eval` of a repr string, as JSON.
fn literal_eval(repr: &str) -> Value {
    let out = run_ok(
        Command::new(python()).args([
            "-c",
            "import ast, json, sys; print(json.dumps(ast.literal_eval(sys.argv[1])))",
            repr,
        ]),
        &format!("literal_eval({repr:?})"),
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// The per-task gauges of task `id` in one scrape of `addr`: (progress
/// ratio, the stage whose gauge is 1, uploaded bytes).
fn task_gauges(addr: &str, id: &str) -> (Option<f64>, Vec<String>, Option<f64>) {
    let m = scrape(addr);
    let stages = m["samples"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == "zimfarm_worker_task_stage" && s["labels"]["task_id"] == id)
        .map(|s| {
            assert_eq!(s["value"], 1.0, "{s}");
            s["labels"]["stage"].as_str().unwrap().to_owned()
        })
        .collect();
    let id = [("task_id", id)];
    (
        sample(&m, "zimfarm_worker_task_progress_ratio", &id),
        stages,
        sample(&m, "zimfarm_worker_task_uploaded_bytes", &id),
    )
}

#[test]
fn a_youtube_task_reports_its_scrapers_progress_every_interval() {
    let sshd = Sshd::start();
    let addr = free_addr();
    let node = "progress";
    let sv = Services::new(node);
    let events = sv.events(120);
    let env = WorkerEnv::docker(&sshd)
        .set("PROGRESS_INTERVAL", 2)
        .set("METRICS_ADDR", &addr);
    let worker = sv.start(node, &env);
    let id = youtube(json!({"sleep": 8})).send(&sv.vh);
    let hostname = events.wait_task_event("task-started", &id, T)["hostname"]
        .as_str()
        .unwrap()
        .to_owned();

    // While it generates: a reading of its file, in inspect and metrics.
    events.wait_for(
        |e| e["type"] == "task-progress" && e["uuid"] == id && e["done"].is_u64(),
        T,
        "a task-progress event with the file's done",
    );
    let active = broadcast(&sv.vh, &hostname, "active", json!({}));
    let entry = active
        .as_array()
        .and_then(|a| a.iter().find(|t| t["id"] == id.as_str()))
        .unwrap_or_else(|| panic!("{id} in inspect active: {active}"));
    assert_eq!(entry["progress"]["stage"], "generate", "{entry}");
    assert_eq!(entry["progress"]["total"], 16, "{entry}");
    let (ratio, stages, _) = task_gauges(&addr, &id);
    assert_eq!(stages, ["generate"]);
    assert!(ratio.is_some_and(|r| (0.0..=1.0).contains(&r)), "{ratio:?}");

    let succeeded = events.wait_task_event("task-succeeded", &id, T);
    // Its series went with it (the run is over before its final event).
    assert_eq!(task_gauges(&addr, &id), (None, vec![], None));

    let progress = progress_of(&events, &id);
    assert_paced(&progress, 2.0);
    let generate = of_stage(&progress, "generate");
    let read: Vec<(u64, u64)> = generate
        .iter()
        .filter_map(|e| Some((e["done"].as_u64()?, e["total"].as_u64()?)))
        .collect();
    assert!(read.len() >= 3, "3 readings of the file: {generate:#?}");
    assert!(
        read.windows(2).all(|w| w[0].0 < w[1].0) && read.iter().all(|r| r.1 == 16),
        "done rises, of the file's total 16: {read:?}"
    );
    // Each reading (not the event at the stage's start) has the rest too.
    for e in generate.iter().filter(|e| e["done"].is_u64()) {
        for field in ["memory", "disk", "last_output", "container"] {
            assert!(!e[field].is_null(), "{field} in {e}");
        }
    }
    assert!(
        of_stage(&progress, "upload")
            .iter()
            .all(|e| e["done"].is_null()),
        "{progress:#?}"
    );

    // The warehouse has the ZIM, not the progress file.
    let stored = files_under(sshd.chroot());
    assert!(
        stored.iter().any(|f| f == "zim/videos/youtube_test.zim"),
        "{stored:?}"
    );
    assert!(!stored.iter().any(|f| f.contains(STATS_FILE)), "{stored:?}");

    // The dispatcher's monitor (Celery's State over the same stream, the
    // result read with ast.literal_eval) sees the task as before.
    drop(worker);
    let summary = events.finish();
    let task = &summary["summary"]["tasks"][&id];
    assert_eq!(task["state"], "SUCCESS", "{summary}");
    assert_eq!(task["result"], succeeded["result"], "{summary}");
    let files = literal_eval(task["result"].as_str().unwrap());
    assert!(
        files.as_array().is_some_and(|f| !f.is_empty()
            && f.iter()
                .all(|f| !f.to_string().contains(STATS_FILE))),
        "{files}"
    );
}

#[test]
fn a_progress_file_that_is_a_fifo_a_link_or_huge_changes_nothing_but_a_log_line() {
    let sshd = Sshd::start();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("progress.json");
    std::fs::write(&target, r#"{"done": 7, "total": 9}"#).unwrap();
    // In turn, 3 s each (3 readings at 1 s): 1 GB (sparse) that starts as
    // JSON, a link to a good file outside the task dir, then a fifo, left
    // there through the upload.
    let sh = format!(
        "cd \"$OUT\" && f={STATS_FILE} && printf '{{\"done\": 3, \"total\": 4}}' >$f \
         && truncate -s 1G $f && sleep 3 && rm -f $f && ln -s {} $f && sleep 3 \
         && rm -f $f && mkfifo $f && sleep 3",
        target.display()
    );
    let node = "hostile";
    let sv = Services::new(node);
    let events = sv.events(120);
    let worker = sv.start(node, &WorkerEnv::docker(&sshd).set("PROGRESS_INTERVAL", 1));
    let id = youtube(json!({"sh": sh})).send(&sv.vh);
    let succeeded = events.wait_task_event("task-succeeded", &id, T);

    let progress = progress_of(&events, &id);
    assert!(
        of_stage(&progress, "generate").len() >= 8,
        "readings all along: {progress:#?}"
    );
    assert!(
        progress
            .iter()
            .all(|e| e["done"].is_null() && e["total"].is_null() && e["progress"] != 0.75),
        "nothing read: {progress:#?}"
    );
    // One line for each kind; the fifo's proves the read did not block.
    // The fifo, left there, is not listed among the outputs either: the
    // reserved name is skipped before its type is looked at.
    let log = worker.log_text();
    assert!(
        !log.lines()
            .any(|l| l.contains("skipping an entry") && l.contains(STATS_FILE)),
        "{log}"
    );
    let log: String = log
        .lines()
        .filter(|l| l.contains("progress file is not read"))
        .collect::<Vec<_>>()
        .join("\n");
    for why in [
        "over the 65536 bytes read",
        "it is a symbolic link, not a regular file",
        "it is a fifo, not a regular file",
    ] {
        let lines = log.lines().filter(|l| l.contains(why)).count();
        assert_eq!(lines, 1, "one line with {why:?}:\n{log}");
    }
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        r#"{"done": 7, "total": 9}"#
    );
    let stored = files_under(sshd.chroot());
    assert!(
        stored.iter().any(|f| f == "zim/videos/youtube_test.zim"),
        "{stored:?}"
    );
    assert!(!stored.iter().any(|f| f.contains(STATS_FILE)), "{stored:?}");
    let files = literal_eval(succeeded["result"].as_str().unwrap());
    assert!(
        !files.to_string().contains(STATS_FILE),
        "the result names only outputs: {files}"
    );
}

#[test]
fn a_throttled_upload_reports_rising_bytes_and_an_eta() {
    let sshd = Sshd::start();
    let proxy = ThrottleProxy::start(&sshd.addr());
    let addr = free_addr();
    let node = "upprogress";
    let sv = Services::new(node);
    let events = sv.events(120);
    let env = WorkerEnv::docker(&sshd)
        .warehouse(&sshd, proxy.port())
        .set("PROGRESS_INTERVAL", 1)
        .set("METRICS_ADDR", &addr);
    let _worker = sv.start(node, &env);
    // 200 kB/s from now on: a 1 MiB ZIM takes about 5 s (the bytes
    // sent count in 32 KiB writes the warehouse confirmed).
    proxy.set_rate(200_000);
    let id = youtube(json!({"zimMB": 1})).send(&sv.vh);
    events.wait_for(
        |e| e["type"] == "task-progress" && e["uuid"] == id && e["upload_sent"].as_u64() > Some(0),
        T,
        "an upload under way",
    );
    let (_, stages, sent) = task_gauges(&addr, &id);
    assert_eq!(stages, ["upload"]);
    assert!(sent.is_some_and(|s| s > 0.0), "{sent:?}");
    events.wait_task_event("task-succeeded", &id, T);
    assert_eq!(task_gauges(&addr, &id), (None, vec![], None));

    let progress = progress_of(&events, &id);
    assert_paced(&progress, 1.0);
    let upload = of_stage(&progress, "upload");
    let sent: Vec<u64> = upload
        .iter()
        .filter_map(|e| e["upload_sent"].as_u64())
        .collect();
    assert!(
        upload.len() >= 3 && sent.windows(2).all(|w| w[0] <= w[1]),
        "sent bytes never go back: {upload:#?}"
    );
    let mut distinct = sent.clone();
    distinct.dedup();
    assert!(distinct.len() >= 3, "sent bytes rise: {upload:#?}");
    let total = upload
        .iter()
        .find_map(|e| e["upload_total"].as_u64())
        .unwrap();
    assert!(total > 1 << 20, "the ZIM and the log: {total}");
    assert!(
        upload
            .iter()
            .any(|e| e["upload_eta"].as_f64().is_some_and(|eta| eta > 0.0)
                && e["upload_rate"].as_f64().is_some_and(|r| r > 0.0)),
        "an ETA while bytes were left: {upload:#?}"
    );
}

#[test]
fn flower_shows_a_running_task_as_progress_until_its_end() {
    let s = Stack::start("flowerprog", WorkerEnv::new().set("PROGRESS_INTERVAL", 1)).within(T);
    let flower = Flower::start(&s.vh, s.dir(), T);
    flower.wait_json(
        "/api/workers?status=true",
        |v| v["tester@flowerprog"] == true,
        "worker online",
    );
    let id = s.submit(Task::simulated(6.0));
    flower.wait_json(
        "/api/tasks",
        |v| v[&id]["state"] == "PROGRESS",
        "the running task in state PROGRESS",
    );
    let (code, page) = flower.get(&format!("/task/{id}"));
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("PROGRESS"), "{page}");
    s.expect_event("task-succeeded", &id);
    flower.wait_json(
        "/api/tasks",
        |v| v[&id]["state"] == "SUCCESS",
        "the task succeeded in flower",
    );
    assert!(s.count("task-progress", &id) > 0);
}

/// `zimfarm-worker ps --json` with a worker's environment: its rows.
fn ps_json(env: &[(String, String)]) -> Vec<Value> {
    let out = run_worker(&["ps", "--json"], env);
    assert!(out.status.success(), "{}", output_text(&out));
    match serde_json::from_slice(&out.stdout) {
        Ok(Value::Array(rows)) => rows,
        other => panic!("ps --json: {other:?}\n{}", output_text(&out)),
    }
}

#[test]
fn ps_shows_a_scrapes_own_progress_while_it_runs_and_once_it_is_kept() {
    let sshd = Sshd::start();
    let node = "progressps";
    let sv = Services::new(node);
    let events = sv.events(120);
    let env = WorkerEnv::docker(&sshd).set("PROGRESS_INTERVAL", 1);
    let vars = env.vars(&sv.vh, sv.dir.path(), node);
    let mut worker = sv.start(node, &env);
    let id = youtube(json!({"sleep": 30})).send(&sv.vh);
    events.wait_for(
        |e| e["type"] == "task-progress" && e["uuid"] == id && e["done"].as_u64() >= Some(2),
        T,
        "a task-progress event with the file's done",
    );
    // From the running worker, over its socket.
    let rows = ps_json(&vars);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(
        (&row["id"], &row["state"]),
        (&json!(id), &json!("running")),
        "{row}"
    );
    assert_eq!(row["stage"], "generate", "{row}");
    assert!(row["progress"].as_f64().is_some_and(|p| p > 0.0), "{row}");
    assert_eq!(row["detail"]["total"], 60, "{row}");

    // No worker: the kept scrape, with what its own file says now.
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(20)).success());
    std::thread::sleep(Duration::from_secs(1));
    let rows = ps_json(&vars);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(
        (&row["id"], &row["state"]),
        (&json!(id), &json!("kept")),
        "{row}"
    );
    assert_eq!(row["stage"], "generate", "{row}");
    assert!(
        row["detail"]["done"].as_u64() >= Some(2) && row["detail"]["total"] == 60,
        "{row}"
    );
    let out = run_worker(&["ps"], &vars);
    let table = output_text(&out);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(id.as_str()) && l.contains("kept") && l.contains("/60)")),
        "{table}"
    );
    assert_contains(&table, "no worker runs");
    // The scrape is not carried on here: its containers go.
    let _ = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=org.openzim.zimfarm.node={node}"),
        ])
        .output()
        .map(|out| {
            for c in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["rm", "-f", c]).output();
            }
        });
}
