//! The task's redis helper: its container, started beside the offliner's
//! with no network, no capability, as nobody, with memory and pids
//! limits, and the wait for it to answer on its unix socket (a socket,
//! never reached through a link: the dir is the containers' to write).
//!
//! Owns the socket's paths and the PING wait; it must not touch the
//! offliner's container or the task dir.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::{DockerRunner, Job, TaskDirs, cancellable, confine, docker_failed, failed};
use crate::docker::ContainerSpec;
use crate::runner::RunError;

/// Where the redis helper's socket is, inside both containers.
pub const REDIS_SOCKET_DIR: &str = "/run/redis";
/// The socket's path inside both containers.
pub const REDIS_SOCKET: &str = "/run/redis/redis.sock";
/// How long the redis helper may take to answer PING.
const REDIS_READY_TIMEOUT: Duration = Duration::from_secs(30);

impl DockerRunner {
    /// Pulls the redis image, starts the task's redis helper and waits
    /// until it answers.
    pub(super) async fn start_redis(&self, job: &mut Job<'_>) -> Result<(), RunError> {
        let (task_id, dirs, cancel) = (&job.plan.task_id, job.dirs, job.ctx.cancel.token());
        cancellable(cancel, self.image(&self.settings.redis_image)).await??;
        let name = self.container_name(task_id, "redis");
        job.containers.names.push(name.clone());
        let spec = ContainerSpec {
            name,
            image: self.settings.redis_image.clone(),
            cmd: [
                "--port",
                "0",
                "--unixsocket",
                REDIS_SOCKET,
                "--unixsocketperm",
                "777",
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            .map(str::to_owned)
            .to_vec(),
            labels: self.labels(task_id, "redis"),
            binds: vec![redis_bind(dirs)],
            no_network: true,
            user: Some(confine::REDIS_USER.to_owned()),
            memory: Some(self.settings.redis_memory),
            pids_limit: Some(confine::REDIS_PIDS),
            log_limit: self.settings.container_log_limit,
            ..Default::default()
        };
        cancellable(cancel, self.docker.start(&spec))
            .await?
            .map_err(docker_failed)?;
        cancellable(
            cancel,
            wait_for_redis(&dirs.local_sockets, REDIS_READY_TIMEOUT),
        )
        .await??;
        tracing::info!("redis helper ready");
        Ok(())
    }
}

/// Makes the task's sockets dir afresh: whatever an earlier, interrupted
/// run's containers left in it (a link, a large file) goes first, links
/// removed, never followed.
pub(super) async fn fresh_sockets_dir(dir: &Path) -> std::io::Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    tokio::fs::create_dir_all(dir).await
}

/// The bind mount of the task's sockets dir, in both containers.
pub(super) fn redis_bind(dirs: &TaskDirs) -> String {
    format!("{}:{REDIS_SOCKET_DIR}", dirs.host_sockets.display())
}

/// Waits until the redis helper answers PING on `redis.sock` in `dir`.
///
/// The dir is mounted read-write into the helper and the scraper, so
/// `redis.sock` may be a link planted to make the worker connect (as root)
/// to another socket, the Docker engine's say. Each attempt opens
/// `redis.sock` relative to the dir's descriptor without following a link
/// (`O_PATH | O_NOFOLLOW`), checks that what it holds is a socket, and
/// connects to that very inode through `/proc/self/fd/N`: no name is
/// resolved again between the check and the connect, and the address stays
/// far below the 107 bytes a unix socket address holds, so any ZIM_DIR
/// works. A `redis.sock` that is not a socket fails at once.
/// Errors that waiting cures (no socket yet, refused, no reply yet) are
/// retried until [`REDIS_READY_TIMEOUT`]; any other fails at once. Either
/// way the failure text carries the last OS error.
async fn wait_for_redis(dir: &Path, timeout: Duration) -> Result<(), RunError> {
    let socket_path = dir.join("redis.sock");
    let owned = dir.to_owned();
    let dir_fd = tokio::task::spawn_blocking(move || {
        rustix::fs::open(
            &owned,
            rustix::fs::OFlags::PATH
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
    })
    .await
    .map_err(|e| failed(format!("opening the redis helper's socket dir failed: {e}")))?
    .map_err(|e| {
        failed(format!(
            "cannot open the redis helper's socket dir {}: {}; check ZIM_DIR",
            dir.display(),
            std::io::Error::from(e)
        ))
    })?;
    let dir_fd = std::sync::Arc::new(dir_fd);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let error = match ping_socket_in(&dir_fd).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if !waiting_cures(&error) {
            return Err(failed(format!(
                "cannot reach the redis helper on {}: {error}",
                socket_path.display()
            )));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(failed(format!(
                "the redis helper did not answer on {} within {} s (last error: {error})",
                socket_path.display(),
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One PING on the socket `redis.sock` in the dir `dir_fd`, never through
/// a link (see [`wait_for_redis`]).
async fn ping_socket_in(dir_fd: &std::sync::Arc<rustix::fd::OwnedFd>) -> std::io::Result<()> {
    let dir_fd = std::sync::Arc::clone(dir_fd);
    let socket_fd = tokio::task::spawn_blocking(move || open_socket_beneath(&dir_fd))
        .await
        .map_err(std::io::Error::other)??;
    let address = PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&socket_fd)
    ));
    ping_redis(&address).await
}

/// `redis.sock` in `dir_fd` opened as a path only, without following a
/// link, if it is a socket. `NotFound` while there is none yet.
fn open_socket_beneath(dir_fd: &rustix::fd::OwnedFd) -> std::io::Result<rustix::fd::OwnedFd> {
    use rustix::fs::{FileType, Mode, OFlags};
    let fd = rustix::fs::openat(
        dir_fd,
        "redis.sock",
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let kind = FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode);
    if kind == FileType::Socket {
        Ok(fd)
    } else {
        Err(std::io::Error::other(format!(
            "redis.sock is a {}, not a socket: the worker never connects through a link or to anything else",
            match kind {
                FileType::Symlink => "symbolic link",
                FileType::Directory => "directory",
                FileType::RegularFile => "regular file",
                FileType::Fifo => "fifo",
                FileType::CharacterDevice | FileType::BlockDevice => "device",
                _ => "file of another kind",
            }
        )))
    }
}

/// One PING on the redis socket at `socket`.
async fn ping_redis(socket: &Path) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::UnixStream::connect(socket).await?;
    stream.write_all(b"PING\r\n").await?;
    let mut reply = [0u8; 7];
    tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut reply))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply to PING in 2 s")
        })??;
    if &reply == b"+PONG\r\n" {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "unexpected reply to PING: {:?}",
                String::from_utf8_lossy(&reply)
            ),
        ))
    }
}

/// Whether waiting may cure a failed PING: the helper is still starting
/// (no socket yet, nobody listening, no reply yet). A path too long, a
/// permission denied and the like never get better.
fn waiting_cures(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::NotFound
            | ErrorKind::ConnectionRefused
            | ErrorKind::ConnectionReset
            | ErrorKind::BrokenPipe
            | ErrorKind::UnexpectedEof
            | ErrorKind::TimedOut
            | ErrorKind::InvalidData
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dir `depth` levels of 50-character names below `root`.
    fn deep_dir(root: &Path, depth: usize) -> PathBuf {
        let mut dir = root.to_owned();
        for i in 0..depth {
            dir.push(format!("{i:0>50}"));
        }
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn redis_answers_on_a_socket_path_longer_than_sun_path() {
        let root = tempfile::tempdir().unwrap();
        let dir = deep_dir(root.path(), 4);
        assert!(dir.join("redis.sock").as_os_str().len() > 200);
        // Bound through the dir's descriptor too: the full path cannot be.
        let fd =
            rustix::fs::open(&dir, rustix::fs::OFlags::PATH, rustix::fs::Mode::empty()).unwrap();
        let bind = format!(
            "/proc/self/fd/{}/redis.sock",
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        );
        let listener = tokio::net::UnixListener::bind(bind).unwrap();
        let server = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut ping = [0u8; 6];
            stream.read_exact(&mut ping).await.unwrap();
            assert_eq!(&ping, b"PING\r\n");
            stream.write_all(b"+PONG\r\n").await.unwrap();
        });
        wait_for_redis(&dir, Duration::from_secs(5)).await.unwrap();
        server.await.unwrap();
    }

    /// The failure text of a wait on `dir` that must fail at once, well
    /// before its 30 s timeout.
    async fn redis_wait_failure_at_once(dir: &Path) -> String {
        let started = std::time::Instant::now();
        let Err(RunError::Failed(error)) = wait_for_redis(dir, Duration::from_secs(30)).await
        else {
            panic!("waiting on {} must fail", dir.display());
        };
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "waited {:?}",
            started.elapsed()
        );
        error.message()
    }

    #[tokio::test]
    async fn redis_wait_fails_at_once_when_the_socket_dir_is_missing() {
        let root = tempfile::tempdir().unwrap();
        let missing = root.path().join("gone");
        let message = redis_wait_failure_at_once(&missing).await;
        assert!(
            message.contains(&missing.display().to_string()),
            "{message}"
        );
        assert!(message.contains("No such file or directory"), "{message}");
    }

    #[tokio::test]
    async fn redis_wait_fails_at_once_on_an_error_waiting_cannot_cure() {
        let root = tempfile::tempdir().unwrap();
        // A file where the dir should be: ENOTDIR, now and forever.
        let file = root.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let message = redis_wait_failure_at_once(&file).await;
        assert!(message.contains("Not a directory"), "{message}");
    }

    #[tokio::test]
    async fn redis_wait_never_connects_through_a_planted_link() {
        let root = tempfile::tempdir().unwrap();
        // Another socket outside the dir, answering as redis would: the
        // Docker engine's socket in real life.
        let elsewhere = root.path().join("elsewhere.sock");
        let listener = tokio::net::UnixListener::bind(&elsewhere).unwrap();
        let server = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut ping = [0u8; 6];
            stream.read_exact(&mut ping).await.unwrap();
            stream.write_all(b"+PONG\r\n").await.unwrap();
        });
        let dir = root.path().join("sockets");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.join("redis.sock")).unwrap();
        let message = redis_wait_failure_at_once(&dir).await;
        assert!(
            message.contains("redis.sock is a symbolic link, not a socket"),
            "{message}"
        );
        assert!(
            !server.is_finished(),
            "the worker connected through the link"
        );
        server.abort();
    }

    #[tokio::test]
    async fn redis_wait_refuses_a_sockets_dir_that_is_a_link() {
        let root = tempfile::tempdir().unwrap();
        let real = root.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let message = redis_wait_failure_at_once(&link).await;
        assert!(
            message.contains("cannot open the redis helper's socket dir"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn the_sockets_dir_is_made_afresh_without_following_links() {
        let root = tempfile::tempdir().unwrap();
        let outside = root.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("canary"), b"canary").unwrap();
        let dir = root.path().join(".sockets").join("task1");
        fresh_sockets_dir(&dir).await.unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("redis.sock")).unwrap();
        std::fs::write(dir.join("junk"), vec![0u8; 4096]).unwrap();
        fresh_sockets_dir(&dir).await.unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        assert_eq!(std::fs::read(outside.join("canary")).unwrap(), b"canary");
    }

    #[tokio::test]
    async fn redis_wait_timeout_names_the_last_os_error() {
        let root = tempfile::tempdir().unwrap();
        let dir = deep_dir(root.path(), 3);
        let Err(RunError::Failed(error)) = wait_for_redis(&dir, Duration::from_millis(300)).await
        else {
            panic!("no socket must time out");
        };
        let message = error.message();
        assert!(message.contains("within 0 s"), "{message}");
        assert!(
            message.contains("last error: No such file or directory"),
            "{message}"
        );
    }
}
