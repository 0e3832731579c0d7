//! The dispatcher client (`zimfarm_worker::dispatcher`) against the
//! dispatcher stand-in (`tests/common/dispatcher.rs`): login, token refresh
//! with single-use refresh tokens, a dispatcher that is down, one re-login
//! on a 401, the keys API with real `ssh-keygen` fingerprints, and no secret
//! in any log line.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use zimfarm_worker::config::Secret;
use zimfarm_worker::dispatcher::{Dispatcher, DispatcherError};
use zimfarm_worker::warehouse::ClientKey;

use common::dispatcher::{DispatcherStandin, LIST_KEYS_ROUTE, TOKEN_ROUTE};

/// Every log line of this test binary, at TRACE level, as text.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || LogWriter(writer.clone()))
            .init();
        buffer
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

/// A password nobody else uses, so that finding it in the logs means a leak.
fn password() -> String {
    format!("pw-{}", uuid::Uuid::new_v4().simple())
}

/// A stand-in with one user; the client for it, and its password.
fn farm(user: &str) -> (DispatcherStandin, String) {
    logs();
    let standin = DispatcherStandin::spawn();
    let pw = password();
    standin.add_user(user, &pw);
    (standin, pw)
}

fn client(standin: &DispatcherStandin, user: &str, pw: &str) -> Dispatcher {
    Dispatcher::new(&standin.url(), user, Secret::new(pw)).expect("a valid URL")
}

/// No token the stand-in handed out and none of `secrets` is in any log
/// line, nor in `texts` (error messages, Debug output).
fn assert_no_secrets(standin: &DispatcherStandin, secrets: &[&str], texts: &[String]) {
    let logs = log_text();
    let tokens = standin.issued_tokens();
    assert!(!tokens.is_empty() || secrets.is_empty() || !logs.is_empty());
    for secret in tokens
        .iter()
        .map(String::as_str)
        .chain(secrets.iter().copied())
    {
        assert!(!logs.contains(secret), "a secret is in the logs:\n{logs}");
        for text in texts {
            assert!(!text.contains(secret), "a secret is in {text:?}");
        }
    }
}

/// `user` at a stand-in whose tokens last `expires_in` s, logged in, with
/// its token keeper running until the returned token is cancelled.
async fn logged_in_keeper(
    user: &str,
    expires_in: u64,
) -> (
    DispatcherStandin,
    String,
    Dispatcher,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let (standin, pw) = farm(user);
    standin.set_expires_in(expires_in);
    let dispatcher = client(&standin, user, &pw);
    dispatcher.login().await.unwrap();
    let cancel = CancellationToken::new();
    let keeper = dispatcher.spawn_keeper(cancel.clone());
    (standin, pw, dispatcher, cancel, keeper)
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "no {what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn login_with_good_and_wrong_credentials() {
    let (standin, pw) = farm("alice");
    let good = client(&standin, "alice", &pw);
    good.login().await.expect("good credentials log in");
    assert!(good.is_logged_in());
    assert_eq!(good.keys().await.expect("keys"), vec![]);
    let c = standin.counters();
    assert_eq!((c.password_grants, c.unauthorized), (1, 0), "{c:?}");

    let wrong = client(&standin, "alice", "not-the-password");
    let e = wrong.login().await.unwrap_err();
    assert!(
        matches!(&e, DispatcherError::BadCredentials { username } if username == "alice"),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "the dispatcher refused USERNAME/PASSWORD for alice: check them \
         (they are your Zimfarm account's)"
    );
    assert!(!wrong.is_logged_in());
    // keys() logs in first, and says the same.
    let e2 = wrong.keys().await.unwrap_err();
    assert!(
        matches!(e2, DispatcherError::BadCredentials { .. }),
        "{e2:?}"
    );

    let unknown = client(&standin, "mallory", &pw);
    let e3 = unknown.login().await.unwrap_err();
    assert!(
        matches!(e3, DispatcherError::BadCredentials { .. }),
        "{e3:?}"
    );
    let c = standin.counters();
    assert_eq!((c.password_grants, c.refused_passwords), (1, 3), "{c:?}");

    let texts = [&e, &e2, &e3]
        .iter()
        .flat_map(|e| [e.to_string(), format!("{e:?}")])
        .chain([format!("{good:?}"), format!("{wrong:?}")])
        .collect::<Vec<_>>();
    assert_no_secrets(&standin, &[&pw, "not-the-password"], &texts);
    assert!(
        log_text().contains("the dispatcher refused the password login"),
        "the refusal is logged"
    );
}

#[tokio::test]
async fn keeper_refreshes_before_expiry_with_single_use_refresh_tokens() {
    let (standin, pw) = farm("bob");
    standin.set_expires_in(5);
    let dispatcher = client(&standin, "bob", &pw);
    let cancel = CancellationToken::new();
    let keeper = dispatcher.spawn_keeper(cancel.clone());

    // 20 s of calls, one a second: every one must find a valid token.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        dispatcher.keys().await.expect("keys with a fresh token");
    }
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(2), keeper)
        .await
        .expect("the keeper stops when cancelled")
        .expect("the keeper does not panic");

    let c = standin.counters();
    eprintln!("{c:?}");
    assert_eq!(c.password_grants, 1, "{c:?}");
    assert!((4..=5).contains(&c.refresh_grants), "{c:?}");
    // Each refresh token was presented once: the stand-in refuses reuse,
    // and refused none.
    assert_eq!(c.refused_refreshes, 0, "{c:?}");
    // The token never expired in use.
    assert_eq!(c.unauthorized, 0, "{c:?}");
    assert!(c.requests_to(LIST_KEYS_ROUTE) >= 19, "{c:?}");
    assert_eq!(
        c.requests_to(TOKEN_ROUTE),
        c.password_grants + c.refresh_grants,
        "{c:?}"
    );
    assert_no_secrets(&standin, &[&pw], &[format!("{dispatcher:?}")]);
}

#[tokio::test]
async fn standin_refuses_reused_unknown_and_expired_tokens() {
    let (standin, pw) = farm("carol");
    standin.set_expires_in(1);
    let http = reqwest::Client::new();
    let token_url = format!("{}/auth/oauth2", standin.url());
    let grant = |form: Vec<(&'static str, String)>| {
        let request = http.post(&token_url).form(&form);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, first) = grant(vec![
        ("grant_type", "password".into()),
        ("username", "carol".into()),
        ("password", pw.clone()),
    ])
    .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["token_type"], "bearer");
    assert_eq!(first["expires_in"], 1);
    let refresh = first["refresh_token"].as_str().unwrap().to_owned();
    let refresh_form = || {
        vec![
            ("grant_type", "refresh_token".into()),
            ("refresh_token", refresh.clone()),
        ]
    };
    let (status, second) = grant(refresh_form()).await;
    assert_eq!(status, 200, "{second}");
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    let (status, reused) = grant(refresh_form()).await;
    assert_eq!(
        (status, reused["error"].as_str()),
        (401, Some("invalid_grant"))
    );
    let (status, _) = grant(vec![
        ("grant_type", "refresh_token".into()),
        ("refresh_token", "unknown".into()),
    ])
    .await;
    assert_eq!(status, 401);
    let (status, wrong) = grant(vec![("grant_type", "client_credentials".into())]).await;
    assert_eq!(
        (status, wrong["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );

    let keys_url = format!("{}/users/carol/keys", standin.url());
    let access = second["access_token"].as_str().unwrap();
    let get = |token: &str| http.get(&keys_url).bearer_auth(token).send();
    assert_eq!(get(access).await.unwrap().status(), 200);
    assert_eq!(get("nonsense").await.unwrap().status(), 401);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(access).await.unwrap().status(), 401, "expired");

    let c = standin.counters();
    assert_eq!(
        (
            c.password_grants,
            c.refresh_grants,
            c.refused_refreshes,
            c.unauthorized
        ),
        (1, 1, 2, 4),
        "{c:?}"
    );
}

#[tokio::test]
async fn keeper_waits_for_a_dispatcher_that_is_down_at_start() {
    logs();
    let standin = DispatcherStandin::new();
    let pw = password();
    standin.add_user("dave", &pw);
    let dispatcher = client(&standin, "dave", &pw);
    let cancel = CancellationToken::new();
    let keeper = dispatcher.spawn_keeper(cancel.clone());

    // Tries at 0 s, 1 s and 3 s fail (connection refused)...
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(!dispatcher.is_logged_in());
    assert!(!keeper.is_finished());
    let e = dispatcher.keys().await.unwrap_err();
    assert!(matches!(e, DispatcherError::Unreachable { .. }), "{e:?}");
    assert!(e.to_string().contains(&standin.url()), "{e}");
    // ...then the dispatcher comes up, and the try at 7 s logs in.
    standin.start();
    wait_until("login", Duration::from_secs(8), || {
        dispatcher.is_logged_in()
    })
    .await;
    assert_eq!(standin.counters().password_grants, 1);
    assert!(
        log_text().contains("logging in to the dispatcher failed; will retry"),
        "the retries are logged"
    );

    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(2), keeper)
        .await
        .expect("the keeper stops when cancelled")
        .unwrap();
    assert_no_secrets(&standin, &[&pw], &[e.to_string()]);
}

#[tokio::test]
async fn keys_fail_while_the_dispatcher_is_down_and_work_after() {
    let (standin, pw, dispatcher, cancel, keeper) = logged_in_keeper("erin", 3).await;
    dispatcher.keys().await.expect("keys while up");

    standin.stop();
    let mut errors = Vec::new();
    // Down for 5 s: longer than a token lives, so the keeper's refreshes
    // fail and back off.
    for _ in 0..5 {
        let e = dispatcher.keys().await.unwrap_err();
        assert!(matches!(e, DispatcherError::Unreachable { .. }), "{e:?}");
        assert!(
            e.to_string().starts_with("cannot reach the dispatcher at "),
            "{e}"
        );
        errors.push(e.to_string());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(!keeper.is_finished(), "the keeper lives on");

    standin.start();
    dispatcher.keys().await.expect("keys once it is back");
    // The keeper gets back to refreshing on its own.
    let before = standin.counters();
    wait_until("a refresh by the keeper", Duration::from_secs(10), || {
        standin.counters().refresh_grants > before.refresh_grants
    })
    .await;
    dispatcher.keys().await.expect("keys");
    assert!(!keeper.is_finished());
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(2), keeper)
        .await
        .expect("the keeper stops when cancelled")
        .unwrap();
    let c = standin.counters();
    // The old session's refresh token still worked after the outage: no
    // second password login was needed.
    assert_eq!(c.password_grants, 1, "{c:?}");
    assert_no_secrets(&standin, &[&pw], &errors);
}

#[tokio::test]
async fn a_401_triggers_exactly_one_new_login() {
    let (standin, pw) = farm("frank");
    let dispatcher = client(&standin, "frank", &pw);
    dispatcher.login().await.unwrap();
    dispatcher.keys().await.unwrap();

    standin.revoke_tokens();
    standin.reset_counters();
    dispatcher.keys().await.expect("keys after one re-login");
    let c = standin.counters();
    assert_eq!(
        (c.password_grants, c.refresh_grants, c.unauthorized),
        (1, 0, 1),
        "{c:?}"
    );
    assert_eq!(c.requests_to(LIST_KEYS_ROUTE), 2, "{c:?}");

    // add_key follows the same rule.
    standin.revoke_tokens();
    standin.reset_counters();
    let mut blob = Vec::new();
    blob.extend(11u32.to_be_bytes());
    blob.extend(b"ssh-ed25519");
    blob.extend(32u32.to_be_bytes());
    blob.extend([7u8; 32]);
    let key = data_encoding::BASE64.encode(&blob);
    dispatcher
        .add_key("after-401", &key)
        .await
        .expect("add_key after one re-login");
    let c = standin.counters();
    assert_eq!((c.password_grants, c.unauthorized), (1, 1), "{c:?}");

    // A password changed at the dispatcher: one try, then BadCredentials
    // (no loop).
    standin.add_user("frank", "changed-elsewhere");
    standin.revoke_tokens();
    standin.reset_counters();
    let e = dispatcher.keys().await.unwrap_err();
    assert!(matches!(e, DispatcherError::BadCredentials { .. }), "{e:?}");
    let c = standin.counters();
    assert_eq!(
        (c.refused_passwords, c.requests_to(LIST_KEYS_ROUTE)),
        (1, 1),
        "{c:?}"
    );
    assert_no_secrets(&standin, &[&pw, "changed-elsewhere"], &[e.to_string()]);
}

/// `ssh-keygen -l -E md5 -f <pub>`'s fingerprint, without `MD5:` and colons.
fn ssh_keygen_md5(public: &Path) -> String {
    let out = common::run_ok(
        Command::new("ssh-keygen")
            .args(["-l", "-E", "md5", "-f"])
            .arg(public),
        "ssh-keygen -l",
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let fp = text.split_whitespace().nth(1).expect("a fingerprint");
    fp.strip_prefix("MD5:").expect("MD5:").replace(':', "")
}

#[tokio::test]
async fn add_key_then_keys_lists_it_with_the_ssh_keygen_md5() {
    let (standin, pw) = farm("grace");
    let dispatcher = client(&standin, "grace", &pw);
    let dir = tempfile::tempdir().unwrap();

    for (kind, bits, name) in [("rsa", "2048", "rsa-key"), ("ed25519", "256", "ed-key")] {
        let private = dir.path().join(kind);
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", kind, "-b", bits, "-N", "", "-C", name, "-f"])
            .arg(&private)
            .status()
            .expect("ssh-keygen runs");
        assert!(status.success());
        let public = dir.path().join(format!("{kind}.pub"));
        let expected = ssh_keygen_md5(&public);

        let key = ClientKey::load(&private).await.expect("the key loads");
        assert_eq!(key.md5_fingerprint(), expected, "{kind}");
        let line = std::fs::read_to_string(&public).unwrap();
        assert_eq!(
            line.split_whitespace().nth(1),
            Some(key.public_key_base64().as_str())
        );

        dispatcher
            .add_key(name, &key.public_key_base64())
            .await
            .expect("add_key");
        let keys = dispatcher.keys().await.expect("keys");
        let listed = keys
            .iter()
            .find(|k| k.name == name)
            .expect("the key is listed");
        assert_eq!(listed.fingerprint, expected, "{kind}");
        assert!(listed.matches_fingerprint(&key.md5_fingerprint()));
        assert_eq!(listed.key, key.public_key_base64());
        let expected_type = if kind == "rsa" { "RSA" } else { "ED25519" };
        assert_eq!(listed.key_type.as_deref(), Some(expected_type));
        assert!(
            listed.added.is_some() && listed.last_used.is_none(),
            "{listed:?}"
        );

        // The same key again is refused, as the dispatcher does.
        let e = dispatcher
            .add_key("again", &key.public_key_base64())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, DispatcherError::Http { status: 400, body, .. } if body.contains("already exists")),
            "{e:?}"
        );
    }
    assert_eq!(dispatcher.keys().await.unwrap().len(), 2);
    assert_eq!(standin.keys("grace").len(), 2);
    assert_no_secrets(&standin, &[&pw], &[]);
}

#[tokio::test]
async fn logs_are_captured_and_name_no_secret() {
    let (standin, pw, dispatcher, cancel, keeper) = logged_in_keeper("heidi", 1).await;
    wait_until("two refreshes", Duration::from_secs(5), || {
        standin.counters().refresh_grants >= 2
    })
    .await;
    // A refused refresh falls back to the password.
    standin.revoke_tokens();
    wait_until(
        "a password login after a refused refresh",
        Duration::from_secs(5),
        || standin.counters().password_grants >= 2,
    )
    .await;
    cancel.cancel();
    keeper.await.unwrap();
    assert!(standin.counters().refused_refreshes >= 1);

    let logs = log_text();
    for line in [
        "logged in to the dispatcher",
        "refreshed the dispatcher access token",
        "the dispatcher refused the refresh token; logging in with the password",
    ] {
        assert!(logs.contains(line), "no {line:?} in the logs:\n{logs}");
    }
    assert_no_secrets(&standin, &[&pw], &[format!("{dispatcher:?}")]);
}
