//! The scrapers' box, against the real Docker engine and the host's
//! iptables (as root), with the stand-in images and `run-task --no-upload`:
//! the offliner's and the redis helper's HostConfig (no capability but the
//! named ones, pids limits, no-new-privileges, the scrapers' network or
//! none); a stand-in that probes the bridge gateway, cloud metadata, a
//! private address, another container and the worker's metrics port gets
//! nowhere, and still reaches a documentation-range server; a stand-in
//! running as root writes into the task dir of a worker running as uid
//! 1000; `check` says whether the filter is in place and prints its
//! commands.
//!
//! No packet leaves the machine: every probed address is either the host's
//! own, the scrapers' bridge, or routed into a network namespace the test
//! makes, which `ip route get` confirms before the probe. Namespaces,
//! routes, rules, networks and containers made here are removed on every
//! path (guards with `Drop`).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// The scrapers' network the worker makes, and its bridge.
const NETWORK: &str = "zimfarm-scrapers";
const BRIDGE: &str = "zimfarm0";
/// The documentation-range server a scraper may reach (TEST-NET-2).
const ALLOWED: &str = "198.51.100.10";
/// The host's end of the veth into the test's namespace.
const HOST_END: &str = "198.51.100.1";
/// Cloud metadata, and an RFC 1918 address: both routed into the test's
/// namespace, where the same server answers.
const METADATA: &str = "169.254.169.254";
const PRIVATE: &str = "10.213.47.9";
/// The port the namespace's server listens on.
const NS_PORT: u16 = 80;

/// Runs a command that must succeed; its stdout.
fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a clean-up command; failures only printed.
fn quietly(program: &str, args: &[&str]) {
    match Command::new(program).args(args).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!("clean-up {program} {args:?}: {}", output_text(&out)),
        Err(e) => eprintln!("clean-up {program} {args:?}: {e}"),
    }
}

/// A network namespace holding [`ALLOWED`], [`METADATA`] and [`PRIVATE`]
/// behind a veth pair, routed there from the host, with a TCP server on
/// [`NS_PORT`] that answers `REACHED <its address>`. Dropping it kills the
/// server and removes the routes and the namespace (and with it the veth
/// pair).
struct NetLab {
    ns: String,
    host_if: String,
    routes: Vec<String>,
    server: Option<Child>,
}

impl NetLab {
    fn new() -> Self {
        let tag = std::process::id() % 100_000;
        let mut lab = Self {
            ns: format!("zfbox-{tag}"),
            host_if: format!("zfb{tag}h"),
            routes: Vec::new(),
            server: None,
        };
        let peer = format!("zfb{tag}n");
        let ns = lab.ns.clone();
        sh("ip", &["netns", "add", &ns]);
        sh(
            "ip",
            &[
                "link",
                "add",
                &lab.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
            ],
        );
        sh("ip", &["link", "set", &peer, "netns", &ns]);
        sh(
            "ip",
            &[
                "addr",
                "add",
                &format!("{HOST_END}/24"),
                "dev",
                &lab.host_if,
            ],
        );
        sh("ip", &["link", "set", &lab.host_if, "up"]);
        let in_ns = |args: &[&str]| {
            let mut all = vec!["-n", ns.as_str()];
            all.extend_from_slice(args);
            sh("ip", &all);
        };
        in_ns(&["link", "set", "lo", "up"]);
        in_ns(&["addr", "add", &format!("{ALLOWED}/24"), "dev", &peer]);
        in_ns(&["link", "set", &peer, "up"]);
        in_ns(&["route", "add", "default", "via", HOST_END]);
        for addr in [METADATA, PRIVATE] {
            in_ns(&["addr", "add", &format!("{addr}/32"), "dev", "lo"]);
            let route = format!("{addr}/32");
            sh(
                "ip",
                &["route", "add", &route, "via", ALLOWED, "dev", &lab.host_if],
            );
            lab.routes.push(route);
        }
        let server = format!(
            "import socket\n\
             s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('0.0.0.0', {NS_PORT})); s.listen(16)\n\
             while True:\n\
             \x20   c, _ = s.accept()\n\
             \x20   c.sendall(b'REACHED ' + c.getsockname()[0].encode() + b'\\n'); c.close()\n"
        );
        lab.server = Some(
            Command::new("ip")
                .args(["netns", "exec", &ns, &python(), "-c", &server])
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        for addr in [ALLOWED, METADATA, PRIVATE] {
            eventually(
                Duration::from_secs(10),
                Duration::from_millis(100),
                || banner(addr, NS_PORT).is_some_and(|b| b.starts_with("REACHED")),
                || format!("the namespace's server answers at {addr}"),
            );
        }
        lab
    }

    /// Fails unless `addr` is routed into this namespace.
    fn assert_routed_here(&self, addr: &str) {
        let route = sh("ip", &["route", "get", addr]);
        assert!(
            route.contains(&format!("dev {} ", self.host_if)),
            "{addr} is not routed into the test's namespace: {route}"
        );
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        for route in &self.routes {
            quietly("ip", &["route", "del", route]);
        }
        quietly("ip", &["netns", "del", &self.ns]);
        quietly("ip", &["link", "del", &self.host_if]);
    }
}

/// What a TCP server at `addr:port` sends first, read from the host.
fn banner(addr: &str, port: u16) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(
        &format!("{addr}:{port}").parse().ok()?,
        Duration::from_secs(2),
    )
    .ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let _ = stream.write_all(b"GET /healthz HTTP/1.0\r\n\r\n");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    Some(text)
}

/// A container removed on drop.
struct ContainerGuard(String);

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        quietly("docker", &["rm", "-f", &self.0]);
    }
}

fn inspect(name: &str) -> Option<Value> {
    let out = Command::new("docker")
        .args(["inspect", name])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice::<Value>(&out.stdout)
        .ok()?
        .get(0)
        .cloned()
}

/// The scrapers' bridge gateway, from Docker.
fn gateway() -> String {
    sh(
        "docker",
        &[
            "network",
            "inspect",
            NETWORK,
            "--format",
            "{{(index .IPAM.Config 0).Gateway}}",
        ],
    )
    .trim()
    .to_owned()
}

/// `run-task --no-upload` of `task` with ZIM_DIR `dir`, started (not
/// waited for), its output piped.
fn spawn_run_task(dir: &Path, node: &str, task: &Value, setpriv: Option<&[String]>) -> Child {
    let file = dir.join("task.json");
    std::fs::write(&file, task.to_string()).unwrap();
    let mut command = match setpriv {
        Some(args) => {
            let mut c = Command::new("setpriv");
            c.args(args).arg(worker_binary());
            c
        }
        None => Command::new(worker_binary()),
    };
    command
        .args(["run-task", "--no-upload", file.to_str().unwrap()])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs([
            ("WORKING_DIR", dir.to_str().unwrap()),
            ("ZIM_DIR", dir.to_str().unwrap()),
            ("NODE_NAME", node),
            ("PULL_POLICY", "never"),
            ("REDIS_IMAGE", "zimfarm/redis:test"),
            ("MIN_FREE_DISK_MB", "10"),
            ("LOG_LEVEL", "info"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a spawned `run-task`, at most `limit`.
fn finish(child: Child, limit: Duration) -> Output {
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(limit);
        let _ = Command::new("kill").arg(pid.to_string()).status();
    });
    let out = child.wait_with_output().unwrap();
    drop(watchdog);
    out
}

fn succeeded(out: &Output) -> bool {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .any(|l| l["status"] == "SUCCESS")
}

fn mw_task(id: &str, sh_commands: &str) -> Value {
    json!({
        "task": "offliner.mwoffliner",
        "id": id,
        "kwargs": {
            "flags": {"mwUrl": "https://en.wikipedia.org", "adminEmail": "a@b.c", "sh": sh_commands},
            "image": {"name": "openzim/mwoffliner", "tag": "test"},
            "warehouse_path": "/wikipedia",
        },
    })
}

/// A host listener on every address that answers `REACHED host` to each
/// connection, for as long as the test runs.
fn host_listener() -> u16 {
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(b"REACHED host\n");
        }
    });
    port
}

#[test]
fn a_scraper_reaches_the_internet_but_not_the_host_its_lan_metadata_or_other_containers() {
    let lab = NetLab::new();
    // The worker's metrics port on every address, as the image sets it.
    let metrics = {
        let l = TcpListener::bind("0.0.0.0:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let stack = Stack::start(
        "boxnet",
        WorkerEnv::new().set("METRICS_ADDR", format!("0.0.0.0:{metrics}")),
    );
    let host_port = host_listener();

    // The worker makes the network at start; run a first task for that if
    // no earlier test did, so that the gateway and a peer can be set up.
    let dir = tempfile::tempdir().unwrap();
    let warm = spawn_run_task(dir.path(), "boxnetwarm", &mw_task(&task_id(), "true"), None);
    let warm = finish(warm, Duration::from_secs(120));
    assert!(succeeded(&warm), "{}", output_text(&warm));
    let gw = gateway();

    // Another container on the scrapers' network, listening.
    let peer = ContainerGuard(format!("zfbox-peer-{}", std::process::id()));
    sh(
        "docker",
        &[
            "run",
            "-d",
            "--name",
            &peer.0,
            "--network",
            NETWORK,
            "openzim/youtube:test",
            "sh",
            "-c",
            "while true; do echo REACHED peer | nc -l -p 8000; done",
        ],
    );
    let peer_ip = sh(
        "docker",
        &[
            "inspect",
            &peer.0,
            "--format",
            "{{(index .NetworkSettings.Networks \"zimfarm-scrapers\").IPAddress}}",
        ],
    )
    .trim()
    .to_owned();

    // Controls: every target answers the host itself.
    eventually(
        Duration::from_secs(10),
        Duration::from_millis(200),
        || banner(&peer_ip, 8000).is_some_and(|b| b.contains("REACHED peer")),
        || format!("the peer container answers at {peer_ip}"),
    );
    assert!(banner(&gw, host_port).is_some_and(|b| b.contains("REACHED host")));
    assert!(banner(&gw, metrics).is_some_and(|b| b.contains("HTTP/1.")));

    // Nothing probed leaves the machine.
    for addr in [ALLOWED, METADATA, PRIVATE] {
        lab.assert_routed_here(addr);
    }
    let local = sh("ip", &["route", "get", &gw]);
    assert!(local.starts_with("local "), "{local}");
    let bridged = sh("ip", &["route", "get", &peer_ip]);
    assert!(bridged.contains(&format!("dev {BRIDGE} ")), "{bridged}");

    let probes = [
        ("allowed", ALLOWED.to_owned(), NS_PORT),
        ("metadata", METADATA.to_owned(), NS_PORT),
        ("private", PRIVATE.to_owned(), NS_PORT),
        ("gateway", gw.clone(), host_port),
        ("metrics", gw.clone(), metrics),
        ("peer", peer_ip.clone(), 8000),
    ];
    let mut script = String::from(
        "p() { printf '%s: %s\\n' \"$1\" \"$(printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' | nc -w 3 \"$2\" \"$3\" 2>&1 | head -n 1)\" >>\"$OUT/probes.txt\"; }; ",
    );
    // What the kernel holds the scraper to (cgroup v1 or v2).
    script.push_str(
        "grep CapEff /proc/self/status >\"$OUT/box.txt\"; \
         cat /sys/fs/cgroup/pids.max /sys/fs/cgroup/pids/pids.max 2>/dev/null >>\"$OUT/box.txt\"; \
         ls /proc/sys/net/ipv6 >/dev/null 2>&1 && cat /proc/sys/net/ipv6/conf/all/disable_ipv6 >>\"$OUT/box.txt\"; ",
    );
    for (name, addr, port) in &probes {
        script.push_str(&format!("p {name} {addr} {port}; "));
    }
    // Wait for the test to look at the containers (at most a minute).
    script.push_str(
        "i=0; while [ ! -e \"$OUT/go\" ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done",
    );
    let id = task_id();
    let child = spawn_run_task(dir.path(), "boxnet", &mw_task(&id, &script), None);
    let task_dir = dir.path().join(&id);
    let offliner = format!("zimfarm_boxnet_{id}_offliner");
    let redis = format!("zimfarm_boxnet_{id}_redis");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !task_dir.join("probes.txt").exists()
        || std::fs::read_to_string(task_dir.join("probes.txt"))
            .unwrap_or_default()
            .lines()
            .count()
            < probes.len()
    {
        assert!(Instant::now() < deadline, "the probes did not finish");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The containers, while they run.
    let offliner_host = inspect(&offliner).expect("the offliner runs")["HostConfig"].clone();
    let redis_config = inspect(&redis).expect("the redis helper runs");
    std::fs::write(task_dir.join("go"), b"").unwrap();
    let out = finish(child, Duration::from_secs(60));
    assert!(succeeded(&out), "{}", output_text(&out));

    assert_eq!(offliner_host["CapDrop"], json!(["ALL"]), "{offliner_host}");
    assert_eq!(
        offliner_host["CapAdd"],
        json!(["CHOWN", "SETUID", "SETGID"]),
        "{offliner_host}"
    );
    assert_eq!(offliner_host["PidsLimit"], json!(4096), "{offliner_host}");
    assert_eq!(
        offliner_host["SecurityOpt"],
        json!(["no-new-privileges"]),
        "{offliner_host}"
    );
    assert_eq!(
        offliner_host["NetworkMode"],
        json!(NETWORK),
        "{offliner_host}"
    );
    assert_eq!(offliner_host["Privileged"], json!(false), "{offliner_host}");
    let redis_host = &redis_config["HostConfig"];
    assert_eq!(redis_host["CapDrop"], json!(["ALL"]), "{redis_host}");
    assert!(
        redis_host["CapAdd"].as_array().is_none_or(Vec::is_empty),
        "{redis_host}"
    );
    assert_eq!(redis_host["PidsLimit"], json!(128), "{redis_host}");
    assert_eq!(redis_host["Memory"], json!(4096_i64 << 20), "{redis_host}");
    assert_eq!(
        redis_host["SecurityOpt"],
        json!(["no-new-privileges"]),
        "{redis_host}"
    );
    assert_eq!(redis_host["NetworkMode"], json!("none"), "{redis_host}");
    assert_eq!(
        redis_config["Config"]["User"],
        json!("65534:65534"),
        "{redis_config}"
    );

    // CHOWN (0), SETGID (6), SETUID (7) and nothing else; 4096 pids;
    // IPv6 off where the kernel has it.
    let held = std::fs::read_to_string(task_dir.join("box.txt")).unwrap();
    let mut lines = held.lines();
    assert_eq!(lines.next(), Some("CapEff:\t00000000000000c1"), "{held}");
    assert_eq!(lines.next(), Some("4096"), "{held}");
    if Path::new("/proc/sys/net/ipv6").exists() {
        assert_eq!(lines.next(), Some("1"), "{held}");
    }
    let results = std::fs::read_to_string(task_dir.join("probes.txt")).unwrap();
    eprintln!("probes:\n{results}");
    for (name, addr, port) in &probes {
        let line = results
            .lines()
            .find(|l| l.starts_with(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} probe in {results}"));
        let reached = line.contains("REACHED") || line.contains("HTTP/1.");
        if *name == "allowed" {
            assert!(
                reached,
                "{name} ({addr}:{port}) must be reachable: {results}"
            );
        } else {
            assert!(
                !reached,
                "{name} ({addr}:{port}) must not be reachable: {results}"
            );
        }
    }
    drop(stack);
}

/// A network made by the test, with the jumps the test's `check` run may
/// add for its bridge; removed on drop.
struct OperatorNetwork {
    name: String,
    bridge: String,
}

impl Drop for OperatorNetwork {
    fn drop(&mut self) {
        for (bin, chain, target) in [
            ("iptables", "DOCKER-USER", "ZIMFARM-SCRAPERS"),
            ("iptables", "INPUT", "ZIMFARM-SCRAPERS-INPUT"),
            ("ip6tables", "FORWARD", "ZIMFARM-SCRAPERS"),
            ("ip6tables", "INPUT", "ZIMFARM-SCRAPERS-INPUT"),
        ] {
            // Only the rules this test added, each as often as it is there.
            while Command::new(bin)
                .args(["-w", "-C", chain, "-i", &self.bridge, "-j", target])
                .output()
                .is_ok_and(|o| o.status.success())
            {
                quietly(bin, &["-w", "-D", chain, "-i", &self.bridge, "-j", target]);
            }
        }
        quietly("docker", &["network", "rm", &self.name]);
    }
}

/// The `scraper network` line of `check`, with its indented commands.
fn check_report(env: &[(String, String)]) -> String {
    let out = run_worker(&["check"], env);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = stdout
        .lines()
        .skip_while(|l| !l.contains("scraper network"));
    let mut report: Vec<&str> = lines.next().into_iter().collect();
    report.extend(lines.take_while(|l| l.starts_with(' ')));
    assert!(!report.is_empty(), "{}", output_text(&out));
    report.join("\n")
}

#[test]
fn check_says_whether_the_filter_is_in_place_and_prints_the_commands_that_install_it() {
    let tag = std::process::id() % 100_000;
    let net = OperatorNetwork {
        name: format!("zfbox-op-{tag}"),
        bridge: format!("zfop{tag}"),
    };
    sh(
        "docker",
        &[
            "network",
            "create",
            "-o",
            &format!("com.docker.network.bridge.name={}", net.bridge),
            "-o",
            "com.docker.network.bridge.enable_icc=false",
            &net.name,
        ],
    );
    let services = Services::new("boxcheck");
    let env = WorkerEnv::new().set("SCRAPER_NETWORK", &net.name);
    let env = env.vars(&services.vh, services.dir.path(), "boxcheck");

    let missing = check_report(&env);
    assert!(missing.starts_with("FAIL"), "{missing}");
    assert!(missing.contains("packet filter missing"), "{missing}");
    let jump = format!(
        "iptables -w -I DOCKER-USER 1 -i {} -j ZIMFARM-SCRAPERS",
        net.bridge
    );
    assert!(missing.contains(&jump), "{missing}");

    // The operator runs the printed commands: the filter is in place.
    let commands: String = missing
        .lines()
        .skip(1)
        .map(|l| format!("{}\n", l.trim_start()))
        .collect();
    let out = Command::new("sh")
        .args(["-e", "-c", &commands])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let in_place = check_report(&env);
    assert!(
        in_place.starts_with("ok") && in_place.contains("packet filter in place"),
        "{in_place}"
    );
    assert!(in_place.contains(&net.bridge), "{in_place}");

    // An iptables of the other backend than Docker's (legacy here) is
    // named as such, and nothing is claimed about the filter.
    let legacy = tempfile::tempdir().unwrap();
    for (name, target) in [
        ("iptables", "iptables-legacy"),
        ("ip6tables", "ip6tables-legacy"),
    ] {
        let found = sh("sh", &["-c", &format!("command -v {target}")]);
        std::os::unix::fs::symlink(found.trim(), legacy.path().join(name)).unwrap();
    }
    let mut other = env.clone();
    other.push((
        "PATH".into(),
        format!(
            "{}:{}",
            legacy.path().display(),
            std::env::var("PATH").unwrap()
        ),
    ));
    let report = check_report(&other);
    assert!(
        report.starts_with("skip") && report.contains("legacy) has no DOCKER-USER chain"),
        "{report}"
    );

    // A network that does not exist is named.
    let mut gone = env.clone();
    gone.retain(|(k, _)| k != "SCRAPER_NETWORK");
    gone.push(("SCRAPER_NETWORK".into(), format!("zfbox-none-{tag}")));
    let report = check_report(&gone);
    assert!(
        report.starts_with("FAIL") && report.contains("no such Docker network"),
        "{report}"
    );
}

/// A dir for a worker running as uid 1000: owned by it, removed on drop
/// (as root: the scraper's files are root's).
struct UserDir(tempfile::TempDir);

impl UserDir {
    fn path(&self) -> PathBuf {
        self.0.path().to_owned()
    }
}

#[test]
fn a_scraper_running_as_root_writes_into_the_task_dir_of_a_worker_running_as_uid_1000() {
    use std::os::unix::fs::MetadataExt;
    let dir = UserDir(tempfile::tempdir().unwrap());
    sh("chown", &["1000:1000", dir.path().to_str().unwrap()]);
    let socket_gid = std::fs::metadata("/var/run/docker.sock").unwrap().gid();
    let setpriv = [
        "--reuid=1000".to_owned(),
        "--regid=1000".to_owned(),
        format!("--groups={socket_gid}"),
        "--inh-caps=-all".to_owned(),
        "--".to_owned(),
    ];
    let id = task_id();
    let task = mw_task(&id, "id -u >\"$OUT/uid.txt\"");
    let child = spawn_run_task(&dir.path(), "boxuid", &task, Some(&setpriv));
    let out = finish(child, Duration::from_secs(120));
    let text = output_text(&out);
    assert!(succeeded(&out), "{text}");
    let task_dir = dir.path().join(&id);
    assert_eq!(std::fs::metadata(&task_dir).unwrap().uid(), 1000);
    let zim = task_dir.join("wikipedia_en_test.zim");
    assert!(zim.is_file(), "{text}");
    assert_eq!(
        std::fs::metadata(&zim).unwrap().uid(),
        0,
        "written by the scraper's root"
    );
    assert_eq!(
        std::fs::read_to_string(task_dir.join("uid.txt"))
            .unwrap()
            .trim(),
        "0"
    );
    // A worker that cannot install the filter says so once.
    assert!(
        text.contains("install the packet filter on the host"),
        "{text}"
    );
}

/// A network removed on drop.
struct NetworkGuard(String);

impl Drop for NetworkGuard {
    fn drop(&mut self) {
        quietly("docker", &["network", "rm", &self.0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_making_the_network_at_once_all_get_the_one_network() {
    use zimfarm_worker::docker::{BridgeNetwork, DockerClient};
    let tag = std::process::id() % 100_000;
    let guard = NetworkGuard(format!("zfbox-race-{tag}"));
    let spec = BridgeNetwork {
        name: guard.0.clone(),
        options: [
            ("com.docker.network.bridge.name", format!("zfr{tag}")),
            ("com.docker.network.bridge.enable_icc", "false".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
        labels: Default::default(),
    };
    let mut makers = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let spec = spec.clone();
        makers.spawn(async move {
            let docker = DockerClient::connect().await.unwrap();
            docker.ensure_bridge_network(&spec).await
        });
    }
    let mut ids = Vec::new();
    while let Some(made) = makers.join_next().await {
        ids.push(made.unwrap().expect("each maker gets the network").id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one network for all: {ids:?}");
    let listed = sh(
        "docker",
        &[
            "network",
            "ls",
            "-q",
            "--filter",
            &format!("name=^{}$", guard.0),
        ],
    );
    assert_eq!(listed.lines().count(), 1, "{listed}");
}
