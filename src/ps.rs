//! `zimfarm-worker ps`: this host's tasks, one line each (or JSON).
//!
//! While a worker runs, it serves its task list on a unix socket in its
//! own dir, `ZIM_DIR/.zimfarm/worker.sock` ([`Server`]): a connection gets
//! one JSON array of [`PsTask`] and is closed; nothing is read from it.
//! The dir is 0700 (the worker's user only) and the socket is bound
//! through the dir's descriptor, so a long ZIM_DIR fits `sun_path` and no
//! link on the way is followed. When no worker answers, `ps` lists what
//! the task records and Docker say instead ([`left_behind`]): the scrapes
//! kept for the next start, and what that start would remove.
//!
//! Owns the socket, the rows and how they are printed. It must not change
//! any task: it only reads the worker's registry (through the list it is
//! handed), the records and the engine.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::config::PipelineSettings;
use crate::docker::{DockerClient, DockerError, LABEL_ROLE};
use crate::pipeline::kept::{Judged, survey};
use crate::progress::{Snapshot, Stage, read_stats_file};
use crate::taskfs::{DirHandle, OwnDir};

/// The socket's name in `ZIM_DIR/.zimfarm`.
pub const SOCKET_NAME: &str = "worker.sock";

/// Largest reply `ps` reads.
const MAX_REPLY_BYTES: u64 = 16 << 20;

/// How long `ps` waits for the worker's reply, and the worker for the
/// reader to take it.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Connections served at once; more wait.
const MAX_CONNECTIONS: usize = 8;

/// One task on this host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PsTask {
    pub id: String,
    /// The task's name (`offliner.youtube`), or the image a kept scrape
    /// runs.
    pub offliner: String,
    /// `running`, `reserved` (waiting for a slot), `scheduled` (held for
    /// its eta), `ending` (reporting its end), `kept` (left for the next
    /// start of the worker) or `left` (which the next start removes).
    pub state: String,
    pub stage: Option<Stage>,
    /// 0 to 1: the scraper's own count in generate, bytes in upload.
    pub progress: Option<f64>,
    /// Seconds since it started.
    pub age: Option<f64>,
    /// Bytes its offliner uses.
    pub memory: Option<u64>,
    pub container: Option<String>,
    /// Why it is `left`.
    pub note: Option<String>,
    /// Everything its last progress reading says (a running task).
    pub detail: Option<Snapshot>,
}

/// Why `ps` could not list the tasks.
#[derive(Debug, thiserror::Error)]
pub enum PsError {
    #[error("cannot open the worker's own dir in ZIM_DIR ({dir}): {source}")]
    OwnDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the worker at {socket} answered with something that is not a task list ({problem}); \
         is it a zimfarm-worker of the same version?"
    )]
    Reply { socket: PathBuf, problem: String },
    #[error(
        "no worker answers on {socket}, and Docker cannot be asked for the tasks left behind: \
         {source}"
    )]
    Docker {
        socket: PathBuf,
        #[source]
        source: DockerError,
    },
}

/// Where the worker's socket is.
pub fn socket_path(zim_dir: &Path) -> PathBuf {
    zim_dir.join(crate::taskfs::OWN_ROOT).join(SOCKET_NAME)
}

/// The dir's socket, by a path through its descriptor: short whatever
/// ZIM_DIR is, and free of any link a path could hold.
fn through_fd(root: &OwnDir) -> PathBuf {
    PathBuf::from(format!(
        "/proc/self/fd/{}/{SOCKET_NAME}",
        root.handle().as_fd().as_raw_fd()
    ))
}

async fn own_root(zim_dir: &Path) -> io::Result<OwnDir> {
    let zim_dir = zim_dir.to_owned();
    tokio::task::spawn_blocking(move || OwnDir::root(&zim_dir))
        .await
        .map_err(io::Error::other)?
}

/// The worker's side: serves the list `list` makes to each connection,
/// until dropped (the socket is removed then).
pub struct Server {
    handle: tokio::task::JoinHandle<()>,
    root: OwnDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.handle.abort();
        let _ = rustix::fs::unlinkat(
            self.root.handle(),
            SOCKET_NAME,
            rustix::fs::AtFlags::empty(),
        );
    }
}

impl Server {
    /// Binds the socket in `ZIM_DIR/.zimfarm` and serves it. A socket of a
    /// worker that still answers there is left alone: `AddrInUse`.
    pub async fn start(
        zim_dir: &Path,
        list: impl Fn() -> Vec<PsTask> + Send + Sync + 'static,
    ) -> io::Result<Self> {
        let root = own_root(zim_dir).await?;
        let path = through_fd(&root);
        if UnixStream::connect(&path).await.is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another worker answers on it",
            ));
        }
        // A dead worker's socket (or anything else under that name).
        match rustix::fs::unlinkat(root.handle(), SOCKET_NAME, rustix::fs::AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
        let listener = UnixListener::bind(&path)?;
        rustix::fs::chmodat(
            root.handle(),
            SOCKET_NAME,
            rustix::fs::Mode::from_raw_mode(0o600),
            rustix::fs::AtFlags::empty(),
        )?;
        let list = Arc::new(list);
        let handle = tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let reply = serde_json::to_vec(&list()).unwrap_or_else(|_| b"[]".to_vec());
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(TIMEOUT, stream.write_all(&reply)).await;
                    let _ = stream.shutdown().await;
                    drop(slot);
                });
            }
        });
        Ok(Self { handle, root })
    }
}

/// `ps`'s side: the running worker's list, or `None` when no worker
/// answers on the socket of `zim_dir`.
pub async fn ask(zim_dir: &Path) -> Result<Option<Vec<PsTask>>, PsError> {
    let socket = socket_path(zim_dir);
    // Opened, never made: a `ps` run as another user must not leave the
    // worker a dir it cannot write.
    let opened = {
        let zim_dir = zim_dir.to_owned();
        tokio::task::spawn_blocking(move || OwnDir::existing_root(&zim_dir))
            .await
            .map_err(io::Error::other)
            .and_then(|r| r)
    };
    let root = match opened {
        Ok(root) => root,
        // No worker ever ran here: nothing to ask.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(PsError::OwnDir {
                dir: zim_dir.join(crate::taskfs::OWN_ROOT),
                source,
            });
        }
    };
    let Ok(Ok(stream)) =
        tokio::time::timeout(TIMEOUT, UnixStream::connect(through_fd(&root))).await
    else {
        return Ok(None);
    };
    let mut reply = Vec::new();
    let read = tokio::time::timeout(
        TIMEOUT,
        stream.take(MAX_REPLY_BYTES + 1).read_to_end(&mut reply),
    )
    .await;
    let problem = |problem: String| PsError::Reply {
        socket: socket.clone(),
        problem,
    };
    match read {
        Err(_) => return Err(problem(format!("no reply within {}s", TIMEOUT.as_secs()))),
        Ok(Err(e)) => return Err(problem(e.to_string())),
        Ok(Ok(_)) if reply.len() as u64 > MAX_REPLY_BYTES => {
            return Err(problem(format!("over {MAX_REPLY_BYTES} bytes")));
        }
        Ok(Ok(_)) => {}
    }
    serde_json::from_slice(&reply)
        .map(Some)
        .map_err(|e| problem(e.to_string()))
}

/// What an earlier run of this node left (no worker runs): the scrapes
/// its next start carries on (`kept`) and what it would remove (`left`),
/// from the task records and the containers labelled for the node.
pub async fn left_behind(settings: &PipelineSettings) -> Result<Vec<PsTask>, PsError> {
    let socket = socket_path(&settings.zim_dir);
    let docker_error = |source| PsError::Docker {
        socket: socket.clone(),
        source,
    };
    let docker = DockerClient::connect().await.map_err(docker_error)?;
    let found = survey(&docker, &settings.zim_dir, &settings.node_name)
        .await
        .map_err(docker_error)?;
    let now = crate::celery::now_timestamp();
    let mut rows = Vec::new();
    for f in found {
        let offliner = f
            .containers
            .iter()
            .find(|c| c.labels.get(LABEL_ROLE).is_some_and(|r| r == "offliner"));
        let container = offliner.map(|c| c.name.clone());
        let memory = match offliner.filter(|c| c.running) {
            Some(c) => docker.usage(&c.name).await.ok().flatten().map(|u| u.memory),
            None => None,
        };
        let record = f.record.as_ref().ok().and_then(|r| r.as_ref());
        let (state, stage, note) = match f.judge(&settings.node_name) {
            Judged::Ignored => continue,
            Judged::Kept(kept) => ("kept", stage_of(kept.stage), None),
            Judged::Removed { why, .. } => (
                "left",
                record.and_then(|r| stage_of(r.stage.label())),
                Some(why),
            ),
        };
        // A scrape that writes a progress file says how far it is, read
        // as any file of the task dir: beneath its handle, no link.
        let scraper = match stage {
            Some(Stage::Generate) if f.task_dir => {
                let dir = settings.zim_dir.join(&f.task_id);
                tokio::task::spawn_blocking(move || {
                    let dir = DirHandle::open(&dir).ok()?;
                    read_stats_file(&dir).ok()
                })
                .await
                .ok()
                .flatten()
            }
            _ => None,
        };
        rows.push(PsTask {
            id: f.task_id.clone(),
            offliner: record.map(|r| r.image.clone()).unwrap_or_default(),
            state: state.to_owned(),
            stage,
            progress: scraper.and_then(|s| s.ratio()),
            age: record
                .and_then(|r| r.started.as_ref())
                .map(|s| (now - s.wall).max(0.0)),
            memory,
            container,
            note,
            detail: scraper.map(|s| Snapshot {
                stage,
                done: Some(s.done),
                total: Some(s.total),
                progress: s.ratio(),
                ..Snapshot::default()
            }),
        });
    }
    Ok(rows)
}

fn stage_of(label: &str) -> Option<Stage> {
    Stage::ALL.into_iter().find(|s| s.label() == label)
}

/// The rows as a table, one line per task under a header.
pub fn table(rows: &[PsTask]) -> String {
    let header = [
        "ID",
        "OFFLINER",
        "STATE",
        "STAGE",
        "PROGRESS",
        "AGE",
        "MEMORY",
        "CONTAINER",
    ];
    let mut lines: Vec<[String; 8]> = vec![header.map(str::to_owned)];
    for row in rows {
        lines.push([
            row.id.clone(),
            row.offliner
                .strip_prefix("offliner.")
                .unwrap_or(&row.offliner)
                .to_owned(),
            row.state.clone(),
            row.stage.map_or("-", Stage::label).to_owned(),
            progress_text(row),
            row.age.map_or("-".to_owned(), duration_text),
            row.memory.map_or("-".to_owned(), bytes_text),
            row.container.clone().unwrap_or_else(|| "-".to_owned()),
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in &lines {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    for row in rows {
        if let Some(note) = &row.note {
            out.push_str(&format!("{}: {note}\n", row.id));
        }
    }
    out
}

fn progress_text(row: &PsTask) -> String {
    let detail = row.detail.as_ref();
    let percent = row.progress.map(|p| format!("{:.0}%", p * 100.0));
    match (row.stage, detail) {
        (Some(Stage::Generate), Some(d)) => match (percent, d.done, d.total) {
            (Some(p), Some(done), Some(total)) => format!("{p} ({done}/{total})"),
            _ => d.last_output.map_or("-".to_owned(), |s| {
                format!("last line {}", duration_text(s))
            }),
        },
        (Some(Stage::Upload), Some(d)) => {
            let mut text = percent.unwrap_or_else(|| "-".to_owned());
            if let Some(rate) = d.upload_rate {
                text.push_str(&format!(" {}/s", bytes_text(rate as u64)));
            }
            if let Some(eta) = d.upload_eta {
                text.push_str(&format!(" ETA {}", duration_text(eta)));
            }
            text
        }
        _ => percent.unwrap_or_else(|| "-".to_owned()),
    }
}

/// `45s`, `12m05s`, `3h12m`, `2d03h`.
fn duration_text(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// `512B`, `3.2KiB`, `740MiB`, `1.5GiB`.
fn bytes_text(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value < 10.0 {
        format!("{value:.1}{}", UNITS[unit])
    } else {
        format!("{value:.0}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> PsTask {
        PsTask {
            id: id.to_owned(),
            offliner: "offliner.youtube".to_owned(),
            state: "running".to_owned(),
            stage: Some(Stage::Generate),
            progress: Some(0.41),
            age: Some(3.0 * 3600.0 + 120.0),
            memory: Some(740 << 20),
            container: Some(format!("zimfarm_n_{id}_offliner")),
            note: None,
            detail: Some(Snapshot {
                stage: Some(Stage::Generate),
                done: Some(410),
                total: Some(1000),
                progress: Some(0.41),
                ..Snapshot::default()
            }),
        }
    }

    #[test]
    fn the_table_has_a_line_per_task_under_its_header() {
        let mut kept = row("k1");
        kept.state = "kept".to_owned();
        kept.detail = None;
        kept.progress = None;
        kept.memory = None;
        let text = table(&[row("t1"), kept]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("ID  "), "{text}");
        assert!(
            lines[1].contains("youtube")
                && lines[1].contains("running")
                && lines[1].contains("generate")
                && lines[1].contains("41% (410/1000)")
                && lines[1].contains("3h02m")
                && lines[1].contains("740MiB")
                && lines[1].contains("zimfarm_n_t1_offliner"),
            "{text}"
        );
        assert!(
            lines[2].contains("kept") && lines[2].contains(" - "),
            "{text}"
        );
    }

    #[test]
    fn figures_read_as_people_write_them() {
        assert_eq!(duration_text(45.2), "45s");
        assert_eq!(duration_text(725.0), "12m05s");
        assert_eq!(duration_text(2.0 * 86_400.0 + 3.0 * 3600.0), "2d03h");
        assert_eq!(bytes_text(512), "512B");
        assert_eq!(bytes_text(3300), "3.2KiB");
        assert_eq!(bytes_text(1536 << 20), "1.5GiB");
    }

    #[tokio::test]
    async fn the_worker_answers_ps_on_its_socket_even_under_a_long_zim_dir() {
        let tmp = tempfile::tempdir().unwrap();
        // Longer than a unix socket address holds.
        let zim_dir = tmp.path().join("z".repeat(120));
        std::fs::create_dir(&zim_dir).unwrap();
        assert_eq!(ask(&zim_dir).await.unwrap(), None);
        assert!(
            !zim_dir.join(crate::taskfs::OWN_ROOT).exists(),
            "ps makes nothing in ZIM_DIR"
        );
        let server = Server::start(&zim_dir, || vec![row("t1")]).await.unwrap();
        let socket = socket_path(&zim_dir);
        let mode = std::fs::symlink_metadata(&socket).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        assert_eq!(ask(&zim_dir).await.unwrap(), Some(vec![row("t1")]));
        // A second worker on the same dir leaves the first one's socket.
        let second = Server::start(&zim_dir, Vec::new).await;
        assert_eq!(
            second.err().map(|e| e.kind()),
            Some(io::ErrorKind::AddrInUse)
        );
        assert_eq!(ask(&zim_dir).await.unwrap(), Some(vec![row("t1")]));
        drop(server);
        assert!(!socket.exists());
        assert_eq!(ask(&zim_dir).await.unwrap(), None);
        // A dead worker's socket is replaced.
        let stale = std::os::unix::net::UnixListener::bind(tmp.path().join("s")).unwrap();
        drop(stale);
        std::fs::rename(tmp.path().join("s"), &socket).unwrap();
        let _server = Server::start(&zim_dir, Vec::new).await.unwrap();
        assert_eq!(ask(&zim_dir).await.unwrap(), Some(Vec::new()));
    }

    #[tokio::test]
    async fn a_reply_that_is_no_task_list_is_said_as_such() {
        let tmp = tempfile::tempdir().unwrap();
        let root = own_root(tmp.path()).await.unwrap();
        let listener = UnixListener::bind(through_fd(&root)).unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            stream.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        });
        let error = ask(tmp.path()).await.unwrap_err();
        assert!(error.to_string().contains("not a task list"), "{error}");
    }
}
