//! Flower 2 (the venv's, through `celery flower`) as a child process on
//! a free port of 127.0.0.1, its API open, and what a test asks it over
//! HTTP (with curl: its pages are rendered on the server).

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Vhost, eventually, python};

/// How long a page has to show what is waited for.
const WAIT: Duration = Duration::from_secs(60);

/// Flower 2 as a child process, on a free port of 127.0.0.1.
pub struct Flower {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Flower {
    /// Starts it and waits up to `within` for it to answer.
    pub fn start(vh: &Vhost, dir: &std::path::Path, within: Duration) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = dir.join("flower.log");
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(python())
            .args(["-m", "celery", "-b", &vh.url(), "flower"])
            .arg(format!("--port={port}"))
            .arg("--address=127.0.0.1")
            .env("FLOWER_UNAUTHENTICATED_API", "true")
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("flower starts");
        let flower = Self { child, port, log };
        eventually(
            within,
            Duration::from_millis(200),
            || flower.get("/healthcheck").0 == 200,
            || format!("flower never answered: {}", flower.log_text()),
        );
        flower
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET `path`: (HTTP status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        self.request("GET", path)
    }

    /// `method` `path` without a body: (HTTP status, body).
    pub fn request(&self, method: &str, path: &str) -> (u16, String) {
        let out = Command::new("curl")
            .args([
                "-sS",
                "-m",
                "20",
                "-X",
                method,
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
            ])
            .arg(format!("http://127.0.0.1:{}{path}", self.port))
            .output()
            .expect("curl runs");
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = body.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// Polls `path` until `ok` holds for its JSON body.
    pub fn wait_json(&self, path: &str, ok: impl Fn(&Value) -> bool, what: &str) -> Value {
        let start = Instant::now();
        loop {
            let (code, body) = self.get(path);
            if code == 200
                && let Ok(value) = serde_json::from_str::<Value>(&body)
                && ok(&value)
            {
                return value;
            }
            assert!(
                start.elapsed() < WAIT,
                "{what}: GET {path} gave {code} {body}\nflower log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Flower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
