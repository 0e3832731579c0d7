//! The box, its file side (SPEC §4): a hostile stand-in scraper plants
//! links where the worker used to keep its own files (its log, the log's
//! `.gz`, the generate marker's `.tmp`, an upload journal's `.new`) and
//! among its outputs (a link, a fifo, a device, a `*.tmp` name), and the
//! worker neither writes through them nor reads or publishes what they
//! point at: canaries outside the task dir stay byte for byte, no canary
//! byte and no secret reaches the warehouse or the events, only the real
//! ZIM is published. A task whose only output is a link fails for having
//! no output. A kept task dir of the layout before `ZIM_DIR/.zimfarm` is
//! swept at start, saying why.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::sshd::Sshd;
use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(90);

/// A file outside every task dir, with bytes found nowhere else.
struct Canary {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl Canary {
    fn new(dir: &Path, name: &str) -> Self {
        let bytes = format!("CANARY-{name}-{}", uuid::Uuid::new_v4().simple()).into_bytes();
        let path = dir.join(name);
        std::fs::write(&path, &bytes).unwrap();
        Self { path, bytes }
    }

    fn assert_unchanged(&self) {
        let now = std::fs::read(&self.path).expect("the canary is still there");
        assert_eq!(now, self.bytes, "{} was changed", self.path.display());
    }
}

/// Every file under `root`, `.gz` ones decompressed too, as bytes.
fn all_files(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let bytes = std::fs::read(&path).unwrap();
                if path.extension().is_some_and(|e| e == "gz") {
                    let mut plain = Vec::new();
                    if flate2::read::GzDecoder::new(&bytes[..])
                        .read_to_end(&mut plain)
                        .is_ok()
                    {
                        out.push((path.with_extension("gz.plain"), plain));
                    }
                }
                out.push((path, bytes));
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// No canary byte and no secret in the warehouse nor in the events.
fn assert_nothing_leaked(sshd: &Sshd, events: &[Value], canaries: &[&Canary]) {
    let events = serde_json::to_vec(events).unwrap();
    let files = all_files(sshd.chroot());
    let mut secrets: Vec<(&str, &[u8])> = vec![("PASSWORD", TEST_PASSWORD.as_bytes())];
    secrets.extend(canaries.iter().map(|c| ("canary", &c.bytes[..])));
    for (what, secret) in secrets {
        assert!(!contains(&events, secret), "the events carry the {what}");
        for (path, bytes) in &files {
            assert!(
                !contains(bytes, secret),
                "{} in the warehouse carries the {what}",
                path.display()
            );
        }
    }
}

/// The names of the files (not dirs) in the warehouse's `/zim<dir>`.
fn published(sshd: &Sshd, dir: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(sshd.chroot().join(format!("zim{dir}")))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The old layout's name of the upload journal of `name` (in the task dir).
fn old_journal_name(name: &str) -> String {
    format!(
        ".zimfarm-upload-{:x}.json",
        <md5::Md5 as md5::Digest>::digest(name.as_bytes())
    )
}

fn quoted(path: &Path) -> String {
    format!("'{}'", path.display())
}

#[test]
fn links_planted_where_the_worker_kept_its_files_lead_nowhere() {
    let sshd = Sshd::start();
    let node = "boxlinks";
    let sv = Services::new(node);
    let outside = tempfile::tempdir().unwrap();
    let log_canary = Canary::new(outside.path(), "log");
    let gz_canary = Canary::new(outside.path(), "gz");
    let marker_canary = Canary::new(outside.path(), "marker");
    let journal_canary = Canary::new(outside.path(), "journal");
    let canaries = [&log_canary, &gz_canary, &marker_canary, &journal_canary];

    // A kept task dir of the layout before ZIM_DIR/.zimfarm: its marker
    // and journal lay within a scraper's reach, so it is swept at start.
    let old_id = task_id();
    let old_dir = sv.dir.path().join(&old_id);
    std::fs::create_dir(&old_dir).unwrap();
    std::fs::write(old_dir.join("wikipedia_en_test.zim"), b"old").unwrap();
    std::fs::write(
        old_dir.join(".zimfarm-generated.json"),
        r#"{"files":[{"name":"wikipedia_en_test.zim","size":3}],"log":"x.log"}"#,
    )
    .unwrap();

    let events = sv.events(240);
    let worker = sv.start(node, &WorkerEnv::docker(&sshd));
    worker.wait_log("layout before ZIM_DIR/.zimfarm", T);
    assert!(!old_dir.exists(), "the old-layout dir was swept");

    let id = task_id();
    let log = format!("zimfarm_{node}_{id}_offliner.log");
    let journal = old_journal_name("wikipedia_en_test.zim");
    let plant = [
        format!("ln -s {} \"$OUT/{log}\"", quoted(&log_canary.path)),
        format!("ln -s {} \"$OUT/{log}.gz\"", quoted(&gz_canary.path)),
        format!(
            "ln -s {} \"$OUT/.zimfarm-generated.json.tmp\"",
            quoted(&marker_canary.path)
        ),
        format!(
            "ln -s {} \"$OUT/{journal}.new\"",
            quoted(&journal_canary.path)
        ),
        format!("ln -s /proc/self/environ \"$OUT/{log}.environ\""),
        // And the log again, after the ZIM: a link to the worker's
        // environment, which holds its PASSWORD.
    ]
    .join(" && ");
    let after = format!("rm -f \"$OUT/{log}\" && ln -s /proc/self/environ \"$OUT/{log}\"");
    let id = Task::mw(json!({"sh": plant, "shAfter": after}))
        .with_id(&id)
        .send(&sv.vh);
    let finished = events.wait_task_event("task-container_finished", &id, T);
    events.wait_task_event("task-succeeded", &id, T);

    for canary in canaries {
        canary.assert_unchanged();
    }
    // Only the ZIM is published; the log went to /logs/ from the worker's
    // own dir, and is the container's output.
    assert_eq!(
        published(&sshd, "/wikipedia"),
        ["wikipedia_en_test.zim"],
        "{finished}"
    );
    let gz = sshd.chroot().join(format!("logs/{log}.gz"));
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&gz).expect("the log is published"))
        .read_to_string(&mut text)
        .unwrap();
    assert!(text.contains("mwoffliner stand-in starting"), "{text}");
    assert_nothing_leaked(&sshd, &events.events(), &canaries);
    // Each planted link was skipped with its line.
    let worker_log = worker.log_text();
    for name in [
        log.clone(),
        format!("{log}.gz"),
        ".zimfarm-generated.json.tmp".to_owned(),
        format!("{journal}.new"),
        format!("{log}.environ"),
    ] {
        assert!(
            worker_log.lines().any(|l| l.contains("skipping")
                && l.contains(&name)
                && l.contains("symbolic link")),
            "no skip line for {name}"
        );
    }
    // The worker's own dir went with the task dir.
    let own = sv.dir.path().join(".zimfarm").join(&id);
    eventually(
        T,
        Duration::from_millis(50),
        || !own.exists() && !sv.dir.path().join(&id).exists(),
        || format!("{} or the task dir is still there", own.display()),
    );
}

#[test]
fn only_regular_files_are_published_and_a_link_alone_is_no_output() {
    let sshd = Sshd::start();
    let node = "boxkinds";
    let s = Stack::start(node, WorkerEnv::docker(&sshd)).within(T);
    let outside = tempfile::tempdir().unwrap();
    let canary = Canary::new(outside.path(), "output");

    // A link, a fifo, a device (when the container may make one), a dir
    // and a `.tmp` name next to a valid ZIM: only the ZIM goes.
    let plant = [
        format!("ln -s {} \"$OUT/stolen.zim\"", quoted(&canary.path)),
        "mkfifo \"$OUT/pipe.zim\"".to_owned(),
        "mkdir \"$OUT/sub.zim\"".to_owned(),
        "echo partial > \"$OUT/x.zim.tmp\"".to_owned(),
        // Docker's default capabilities include MKNOD; a box without it
        // refuses, and the device part is then not checked.
        "(mknod \"$OUT/null.zim\" c 1 3 && echo MKNOD-OK || echo MKNOD-REFUSED)".to_owned(),
    ]
    .join("; ");
    let id = s.submit(Task::mw(json!({"sh": plant})));
    let finished = s.expect_event("task-container_finished", &id);
    s.expect_event("task-succeeded", &id);
    assert_eq!(published(&sshd, "/wikipedia"), ["wikipedia_en_test.zim"]);
    let log = s.worker.log_text();
    let skipped = |name: &str, why: &str| {
        assert!(
            log.lines()
                .any(|l| l.contains("skipping") && l.contains(name) && l.contains(why)),
            "no skip line for {name} ({why})"
        )
    };
    skipped("stolen.zim", "symbolic link");
    skipped("pipe.zim", "fifo");
    skipped("sub.zim", "directory");
    skipped("x.zim.tmp", ".tmp");
    let stdout = finished["stdout"].as_str().unwrap_or_default();
    if stdout.contains("MKNOD-OK") {
        skipped("null.zim", "device");
    } else {
        assert!(stdout.contains("MKNOD-REFUSED"), "{finished}");
    }
    canary.assert_unchanged();
    assert_nothing_leaked(&sshd, &s.events.events(), &[&canary]);

    // Its only output a link (and its log a link to the worker's
    // environment): no output, and the failed run's log is the real one.
    let log_name = |id: &str| format!("zimfarm_{node}_{id}_offliner.log");
    let id = task_id();
    let plant = format!(
        "ln -s {} \"$OUT/only.zim\" && ln -s /proc/self/environ \"$OUT/{}\"",
        quoted(&canary.path),
        log_name(&id)
    );
    s.submit(Task::mw(json!({"sh": plant, "zims": 0})).with_id(&id));
    let failed = s.expect_event("task-failed", &id);
    assert!(
        failed["exception"]
            .as_str()
            .is_some_and(|e| e.contains("wrote no file")),
        "{failed}"
    );
    let gz = sshd.chroot().join(format!("logs/{}.gz", log_name(&id)));
    eventually(
        T,
        Duration::from_millis(100),
        || gz.exists(),
        || format!("no failed run's log at {}", gz.display()),
    );
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&gz).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    assert!(text.contains("mwoffliner stand-in starting"), "{text}");
    canary.assert_unchanged();
    assert_nothing_leaked(&sshd, &s.events.events(), &[&canary]);
}
