//! The operator's side: `--version`, `check`, `register-key`, and how the
//! worker starts against the dispatcher (a stand-in that follows SPEC §7):
//! refused credentials, an unregistered key, a dispatcher down at start or
//! later, and the token kept fresh with refresh grants.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::dispatcher::DispatcherStandin;
use common::sshd::{KeyKind, Sshd};
use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(60);

fn public_key(private: &Path) -> String {
    std::fs::read_to_string(private.with_extension("pub")).unwrap()
}

/// `ssh-keygen -l -E md5` of a public key file, as the dispatcher lists it.
fn md5_of(private: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .args(["-l", "-E", "md5", "-f"])
        .arg(private.with_extension("pub"))
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .trim_start_matches("MD5:")
        .replace(':', "")
}

/// A whole healthy stack for `check`: a dispatcher stand-in that knows the
/// user and the key, a broker vhost (through a cuttable proxy), Docker, an
/// sshd warehouse, a working dir.
struct Healthy {
    _vhost: Vhost,
    proxy: FaultProxy,
    dispatcher: DispatcherStandin,
    _sshd: Sshd,
    _dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

fn healthy_stack(label: &str) -> Healthy {
    let vhost = Vhost::new(label);
    let proxy = FaultProxy::start("127.0.0.1:5672");
    let dir = tempfile::tempdir().unwrap();
    let sshd = Sshd::start();
    let key = sshd.user_key(KeyKind::RsaOpenssh);
    let dispatcher = DispatcherStandin::spawn();
    dispatcher.add_user(sshd.user(), "s3cret");
    dispatcher
        .register_key(sshd.user(), "worker", public_key(&key).trim())
        .unwrap();
    let env = WorkerEnv::new()
        .set("USERNAME", sshd.user())
        .set("PASSWORD", "s3cret")
        .set("BROKER_URL", proxy.url(&vhost))
        .set("DISPATCHER_URL", dispatcher.url())
        .set("TASK_RUNNER", "docker")
        .set("MIN_FREE_DISK_MB", 10)
        .set("WAREHOUSE_HOST", "127.0.0.1")
        .set("WAREHOUSE_PORT", sshd.port())
        .set("SSH_KEY", key.display())
        .set("WAREHOUSE_KNOWN_HOSTS", sshd.known_hosts_file().display())
        .vars(&vhost, dir.path(), label);
    Healthy {
        _vhost: vhost,
        proxy,
        dispatcher,
        _sshd: sshd,
        _dir: dir,
        env,
    }
}

#[test]
fn version_flag() {
    let out = run_worker(&["--version"], &[]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("zimfarm-worker {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_passes_on_a_healthy_stack_and_names_the_one_thing_that_breaks() {
    let stack = healthy_stack("check");
    let out = run_worker(&["check"], &stack.env);
    let report = output_text(&out);
    assert_eq!(out.status.code(), Some(0), "{report}");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // One line per check; the scraper network's commands, when it shows
    // them, are indented under it.
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.starts_with(' ')).collect();
    assert_eq!(lines.len(), 9, "{report}");
    for (line, name) in lines.iter().zip([
        "config",
        "dispatcher login",
        "key registered",
        "broker",
        "docker",
        "scraper network",
        "warehouse",
        "disk",
        "kept scrapes",
    ]) {
        // The filter cannot be verified where the network is not made yet
        // (tests/box_net.rs checks what it says).
        let fine =
            line.starts_with("ok") || (name == "scraper network" && line.starts_with("skip"));
        assert!(fine && line.contains(name), "{report}");
    }
    assert!(
        report.contains("API"),
        "docker line shows the API version: {report}"
    );
    assert!(!report.contains("s3cret"), "{report}");

    // The broker stops: that one line fails, and the exit code is 1.
    stack.proxy.cut();
    let out = run_worker(&["check"], &stack.env);
    let report = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    let failed: Vec<&str> = report.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(failed.len(), 1, "{report}");
    assert!(failed[0].contains("broker"), "{report}");
    stack.proxy.restore();

    // The dispatcher refuses the password: the login fails, the key check
    // is skipped (it needs the login), the rest still pass.
    let mut env = stack.env.clone();
    env.retain(|(k, _)| k != "PASSWORD");
    env.push(("PASSWORD".into(), "wrong".into()));
    let out = run_worker(&["check"], &env);
    let report = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains("USERNAME/PASSWORD")),
        "{report}"
    );
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("skip") && l.contains("key registered")),
        "{report}"
    );

    // A broken configuration: one failure, the rest skipped.
    let out = run_worker(&["check"], &[("NODE_NAME".into(), "x".into())]);
    let report = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.starts_with("FAIL  config"), "{report}");
    drop(stack.dispatcher);
}

#[test]
fn register_key_uploads_the_public_key_and_confirms_it() {
    let dispatcher = DispatcherStandin::spawn();
    dispatcher.add_user("alice", "pw");
    let sshd = Sshd::start();
    let key = sshd.user_key(KeyKind::RsaPem);
    let env = vec![
        ("USERNAME".to_owned(), "alice".to_owned()),
        ("PASSWORD".to_owned(), "pw".to_owned()),
        ("DISPATCHER_URL".to_owned(), dispatcher.url()),
        ("SSH_KEY".to_owned(), key.display().to_string()),
        ("NODE_NAME".to_owned(), "node7".to_owned()),
    ];
    let out = run_worker(&["register-key"], &env);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_contains(&output_text(&out), "registered");
    let keys = dispatcher.keys("alice");
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].name, "node7");
    assert_eq!(keys[0].fingerprint, md5_of(&key));
    let blob = public_key(&key)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();
    assert_eq!(keys[0].key, blob, "only the base64 blob is sent");

    // Again: nothing to do.
    let out = run_worker(&["register-key", "--name", "other"], &env);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_contains(&output_text(&out), "already");
    assert_eq!(dispatcher.keys("alice").len(), 1);

    // Refused credentials: exit 2, and the line says so.
    register_key_refused(&env, "PASSWORD", "nope", "USERNAME/PASSWORD");
    // A missing key file: exit 2 naming SSH_KEY.
    register_key_refused(&env, "SSH_KEY", "/nonexistent/id_rsa", "SSH_KEY");
}

/// `register-key` with `env` but `name` set to `value`: exit 2, with a
/// line naming `expect`.
fn register_key_refused(env: &[(String, String)], name: &str, value: &str, expect: &str) {
    let mut bad = env.to_vec();
    bad.iter_mut().find(|(k, _)| k == name).expect("set").1 = value.to_owned();
    let out = run_worker(&["register-key"], &bad);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert_contains(&output_text(&out), expect);
}

#[test]
fn refused_credentials_stop_the_worker_with_a_line_naming_them() {
    let sv = Services::new("badpass");
    let mut worker = sv.spawn("badpass", &WorkerEnv::new().set("PASSWORD", "wrong"));
    let log = worker.expect_exit_2(T);
    assert!(log.contains("USERNAME/PASSWORD"), "{log}");
    assert!(
        !log.contains("wrong"),
        "the password is never printed: {log}"
    );
}

#[test]
fn a_dispatcher_down_at_start_and_later_does_not_stop_the_work() {
    let dispatcher = DispatcherStandin::new(); // not serving yet
    dispatcher.add_user("tester", TEST_PASSWORD);
    let url = dispatcher.url();
    let mut s = Stack::start("nodispatcher", WorkerEnv::new().set("DISPATCHER_URL", url)).within(T);
    s.worker.wait_log("dispatcher not reachable now", T);
    // Tasks are served meanwhile.
    let id = s.submit(Task::new("offliner.mwoffliner", json!({"simulate": {}})));
    s.expect_event("task-succeeded", &id);

    // It comes up: the worker logs in by itself.
    dispatcher.start();
    eventually(
        T,
        Duration::from_millis(100),
        || dispatcher.counters().password_grants != 0,
        || format!("never logged in: {}", s.worker.log_text()),
    );

    // It goes down again: still no crash, tasks still served.
    dispatcher.stop();
    let id = s.submit(Task::new("offliner.mwoffliner", json!({"simulate": {}})));
    s.expect_event("task-succeeded", &id);
    std::thread::sleep(Duration::from_secs(1));
    assert!(s.worker.is_running(), "{}", s.worker.log_text());
}

#[test]
fn the_token_is_kept_fresh_with_refresh_grants_not_new_logins() {
    let dispatcher = DispatcherStandin::spawn();
    dispatcher.add_user("tester", TEST_PASSWORD);
    dispatcher.set_expires_in(5);
    let url = dispatcher.url();
    let s = Stack::start("refresh", WorkerEnv::new().set("DISPATCHER_URL", url)).within(T);
    std::thread::sleep(Duration::from_secs(20));
    let c = dispatcher.counters();
    assert_eq!(c.password_grants, 1, "{c:?}\n{}", s.worker.log_text());
    assert!(
        (3..=6).contains(&c.refresh_grants),
        "{c:?}\n{}",
        s.worker.log_text()
    );
    assert_eq!(c.refused_refreshes, 0, "{c:?}");
    let log = s.worker.log_text();
    for token in dispatcher.issued_tokens() {
        assert!(!log.contains(&token), "a token reached the log");
    }
}

#[test]
fn a_broker_that_refuses_the_login_or_the_vhost_stops_the_worker_with_exit_2() {
    let sv = Services::new("brokerrefuses");
    let wrong_password = sv.vh.url().replace("zimfarm-test@", "wrong-password@");
    assert_ne!(wrong_password, sv.vh.url());
    let no_vhost = format!("{}-does-not-exist", sv.vh.url());
    for (url, reason) in [
        (wrong_password.as_str(), "ACCESS_REFUSED"),
        (no_vhost.as_str(), "NOT_ALLOWED"),
    ] {
        let mut worker = sv.spawn("brokerrefuses", &WorkerEnv::new().set("BROKER_URL", url));
        let log = worker.expect_exit_2(T);
        assert!(
            log.contains("refused this worker") && log.contains(reason),
            "{url}: {log}"
        );
        assert!(log.contains("USERNAME and PASSWORD"), "{log}");
        assert!(
            !log.contains("wrong-password"),
            "no password in the log: {log}"
        );
    }
}
