//! Following the offliner's output into the task log, for a fresh task and
//! an adopted one alike, with one live mechanism: attaching to the
//! container (a fresh one before it starts), which reads its output pipe
//! itself, every byte and in order; and, for a task carried on after a
//! restart, what it printed while no worker read it, from Docker's own
//! bounded copy (`logs(timestamps)`), up to where the attach takes over.
//!
//! The log's place in the output is kept in the task record as a
//! [`LogCursor`]: the log's length, and per stream the hashes of its last
//! few lines and when the last one was read (Docker stamped it at or
//! before that). Attach carries no timestamps, so a later run finds that
//! place again in Docker's copy by those lines: the last place where they
//! stand in a row, stamped no later than their reading. Where Docker no
//! longer holds them (rotated away), one line in the log says which span
//! of time is missing. The container is paused while its copy is read and
//! the attach is made, so that nothing it prints falls between the two.
//!
//! Lines are written whole (split as Docker splits them: at each newline,
//! and a longer line in parts of 16 KiB), so that the log always ends at a
//! line's end and the cursor never points inside one. The idle timeout
//! counts from the last output; the cursor is saved every few seconds and
//! when the worker leaves.
//!
//! Owns the log file while the offliner runs and the cursor; it must not
//! start or remove containers (it kills the offliner only for the idle
//! timeout, as the stage it serves says).

use std::collections::VecDeque;
use std::time::Duration;

use bollard::container::LogOutput;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::containers::{ContainerRun, Tail};
use super::{DockerRunner, RecordKeeper, cancellable, docker_failed, failed};
use crate::docker::OutputStream;
use crate::runner::{CancelReason, ContainerEvent, RunError, TaskContext};
use crate::taskfs::OwnFile;
use crate::taskfs::record::{LogCursor, StreamCursor};

/// How often the cursor is saved into the task record while output comes.
const SAVE_EVERY: Duration = Duration::from_secs(5);
/// Lines of each stream remembered (as hashes) to find the log's place
/// again in Docker's copy.
pub(super) const CURSOR_LINES: usize = 4;
/// Docker's copier hands a line longer than this to the log driver in
/// parts of this size.
const DOCKER_LINE_MAX: usize = 16 * 1024;
/// Most lines of each stream looked for again at the live output's start.
const MAX_OVERLAP: usize = 1024;
/// How long a paused container's output pipe is given to drain into
/// Docker's copy before that copy is read.
const DRAIN: Duration = Duration::from_millis(250);

/// Which of the container's streams a line is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stream {
    Out,
    Err,
}

impl Stream {
    fn at(self) -> usize {
        match self {
            Self::Out => 0,
            Self::Err => 1,
        }
    }
}

/// A chunk of `logs(timestamps)`: its timestamp (epoch ns) and its bytes
/// (the line, with its newline). `None` when it does not start with a
/// timestamp.
pub(super) fn split_timestamp(chunk: &[u8]) -> Option<(i64, &[u8])> {
    let space = chunk.iter().position(|&b| b == b' ')?;
    let stamp = std::str::from_utf8(&chunk[..space]).ok()?;
    let ns = chrono::DateTime::parse_from_rfc3339(stamp)
        .ok()?
        .timestamp_nanos_opt()?;
    Some((ns, &chunk[space + 1..]))
}

/// Epoch nanoseconds as RFC 3339 (UTC, nanoseconds).
pub(super) fn rfc3339(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// The line written into the log where output was lost.
pub(super) fn gap_line(from_ns: i64, to_ns: i64) -> String {
    format!(
        "[zimfarm-worker] output between {} and {} was rotated away by Docker before it could be read\n",
        rfc3339(from_ns),
        rfc3339(to_ns)
    )
}

/// A line's hash, as the cursor keeps it: the first 8 bytes of its MD5.
pub(super) fn line_hash(line: &[u8]) -> u64 {
    use md5::Digest;
    let digest = md5::Md5::digest(line);
    u64::from_be_bytes(digest[..8].try_into().unwrap_or([0; 8]))
}

fn hash_text(hash: u64) -> String {
    format!("{hash:016x}")
}

fn hash_of_text(text: &str) -> Option<u64> {
    u64::from_str_radix(text, 16).ok()
}

/// One stream's bytes cut into lines as Docker cuts them: at each newline,
/// and a line longer than [`DOCKER_LINE_MAX`] in parts of that size.
#[derive(Debug, Default)]
pub(super) struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    /// Takes `bytes`; returns the complete lines they end (with their
    /// newlines), in one piece, or nothing.
    pub(super) fn push(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.partial.extend_from_slice(bytes);
        let mut cut = match self.partial.iter().rposition(|&b| b == b'\n') {
            Some(last) => last + 1,
            None => 0,
        };
        // A line longer than Docker's buffer is handed on in parts.
        while self.partial.len() - cut >= DOCKER_LINE_MAX {
            cut += DOCKER_LINE_MAX;
        }
        let rest = self.partial.split_off(cut);
        std::mem::replace(&mut self.partial, rest)
    }

    /// What is left at the end of the output (a last line without its
    /// newline).
    pub(super) fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.partial)
    }
}

/// The lines of `complete` (as [`Lines::push`] gives them), each at most
/// [`DOCKER_LINE_MAX`] bytes.
fn each_line(complete: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    complete
        .split_inclusive(|&b| b == b'\n')
        .flat_map(|line| line.chunks(DOCKER_LINE_MAX))
}

/// Where to go on in one stream of Docker's copy, and the span of time
/// lost before it, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Resume {
    /// The first line (of this stream, in Docker's copy) not in the log.
    pub from: usize,
    pub gap: Option<(i64, i64)>,
}

/// Finds the log's place in one stream of Docker's copy (`lines`: each
/// line's timestamp and hash, in order): just after the last place where
/// the cursor's `last` lines stand in a row, the last of them stamped no
/// later than `read_ns`; or, when Docker kept only the end of them, after
/// that end at the start of its copy. Not found: Docker rotated them away;
/// the log goes on with the lines stamped after `read_ns`, after a gap
/// when Docker's oldest line is later than that.
pub(super) fn resume_point(lines: &[(i64, u64)], last: &[u64], read_ns: Option<i64>) -> Resume {
    if last.is_empty() {
        // Nothing of this stream is in the log.
        return Resume { from: 0, gap: None };
    }
    let k = last.len();
    let in_time = |i: usize| read_ns.is_none_or(|read| lines[i].0 <= read);
    let whole = (k..=lines.len()).rev().find(|&end| {
        in_time(end - 1)
            && lines[end - k..end]
                .iter()
                .map(|l| l.1)
                .eq(last.iter().copied())
    });
    if let Some(end) = whole {
        return Resume {
            from: end,
            gap: None,
        };
    }
    // Only the end of them is left, at the start of Docker's copy.
    let part = (1..k.min(lines.len() + 1)).rev().find(|&j| {
        in_time(j - 1)
            && lines[..j]
                .iter()
                .map(|l| l.1)
                .eq(last[k - j..].iter().copied())
    });
    if let Some(j) = part {
        return Resume { from: j, gap: None };
    }
    let Some(read) = read_ns else {
        return Resume {
            from: lines.len(),
            gap: None,
        };
    };
    let from = lines.partition_point(|l| l.0 <= read);
    let gap = match lines.first() {
        Some(&(oldest, _)) if oldest > read => Some((read, oldest)),
        _ => None,
    };
    Resume { from, gap }
}

/// What is known of one stream while it is followed.
#[derive(Debug, Default)]
struct StreamState {
    lines: Lines,
    /// Hashes of its last lines written, oldest first.
    last: VecDeque<u64>,
    read_ns: Option<i64>,
}

impl StreamState {
    fn from_cursor(cursor: &StreamCursor) -> Self {
        Self {
            lines: Lines::default(),
            last: cursor
                .last_lines
                .iter()
                .filter_map(|t| hash_of_text(t))
                .collect(),
            read_ns: cursor.read_ns,
        }
    }

    /// `complete` lines were written, read at `read_ns`.
    fn wrote(&mut self, complete: &[u8], read_ns: i64) {
        let newest: Vec<u64> = each_line(complete)
            .rev()
            .take(CURSOR_LINES)
            .map(line_hash)
            .collect();
        for hash in newest.into_iter().rev() {
            self.last.push_back(hash);
        }
        while self.last.len() > CURSOR_LINES {
            self.last.pop_front();
        }
        self.read_ns = Some(self.read_ns.map_or(read_ns, |r| r.max(read_ns)));
    }

    fn cursor(&self) -> StreamCursor {
        StreamCursor {
            last_lines: self.last.iter().map(|h| hash_text(*h)).collect(),
            read_ns: self.read_ns,
        }
    }
}

/// How one reading of the live output ended.
enum Read {
    /// The stream ended (the container stopped, or Docker closed it).
    Ended,
    /// Nothing printed for the idle timeout.
    Idle,
}

/// The follower's state: the log, the cursor, the tails.
struct Follower<'a> {
    log: tokio::io::BufWriter<tokio::fs::File>,
    log_file: &'a OwnFile,
    /// Bytes in the log.
    written: u64,
    streams: [StreamState; 2],
    last_output_ns: i64,
    /// The task's progress, told of each line's time.
    progress: crate::progress::TaskProgress,
    stdout: Tail,
    stderr: Tail,
    saved: LogCursor,
    /// Per stream, the lines written from Docker's copy that the attach may
    /// deliver again (printed between the attach and the pause), oldest
    /// first; the live output's first lines are dropped while they are
    /// these.
    overlap: [Vec<u64>; 2],
}

/// How many of `first` (the live output's first lines) repeat lines of
/// `overlap` (the last lines written from Docker's copy, those the attach
/// may have caught too), and which of `overlap` are still to come when
/// `first` ends before them. The attach began at some line of `overlap`
/// and delivers the rest of it first: the first place in `overlap` from
/// which it reads as `first` does.
pub(super) fn repeated(overlap: &[u64], first: &[u64]) -> (usize, Vec<u64>) {
    let Some(&head) = first.first() else {
        return (0, overlap.to_vec());
    };
    overlap
        .iter()
        .enumerate()
        .filter(|&(_, &h)| h == head)
        .map(|(j, _)| &overlap[j..])
        .find_map(|rest| {
            let n = rest.len().min(first.len());
            (rest[..n] == first[..n]).then(|| (n, rest[n..].to_vec()))
        })
        .unwrap_or((0, Vec::new()))
}

impl Follower<'_> {
    fn cursor(&self) -> LogCursor {
        LogCursor {
            log_bytes: self.written,
            stdout: self.streams[0].cursor(),
            stderr: self.streams[1].cursor(),
            last_output_ns: Some(self.last_output_ns).filter(|&ns| ns > 0),
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), RunError> {
        self.log.write_all(bytes).await.map_err(|e| {
            failed(format!(
                "cannot write the log {}: {e}",
                self.log_file.path().display()
            ))
        })?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn tail(&mut self, stream: Stream) -> &mut Tail {
        match stream {
            Stream::Out => &mut self.stdout,
            Stream::Err => &mut self.stderr,
        }
    }

    /// A chunk of the live output.
    async fn chunk(&mut self, chunk: LogOutput) -> Result<(), RunError> {
        let (stream, bytes) = match &chunk {
            LogOutput::StdErr { message } => (Stream::Err, message),
            LogOutput::StdOut { message } | LogOutput::Console { message } => {
                (Stream::Out, message)
            }
            LogOutput::StdIn { .. } => return Ok(()),
        };
        let now = wall_ns();
        self.last_output_ns = now;
        self.progress.output_at(now);
        self.tail(stream).push(bytes);
        let mut complete = self.streams[stream.at()].lines.push(bytes);
        let overlap = std::mem::take(&mut self.overlap[stream.at()]);
        if !overlap.is_empty() && !complete.is_empty() {
            let first: Vec<u64> = each_line(&complete)
                .take(overlap.len())
                .map(line_hash)
                .collect();
            let (skip, still) = repeated(&overlap, &first);
            let bytes: usize = each_line(&complete).take(skip).map(<[u8]>::len).sum();
            complete.drain(..bytes);
            self.overlap[stream.at()] = still;
        } else if !overlap.is_empty() {
            // No complete line yet: the overlap still waits for one.
            self.overlap[stream.at()] = overlap;
        }
        if !complete.is_empty() {
            self.write(&complete).await?;
            self.streams[stream.at()].wrote(&complete, now);
        }
        Ok(())
    }

    /// A line of Docker's copy, stamped `ns`, not yet in the log.
    async fn backlog_line(&mut self, stream: Stream, ns: i64, line: &[u8]) -> Result<(), RunError> {
        self.tail(stream).push(line);
        self.write(line).await?;
        self.streams[stream.at()].wrote(line, ns);
        self.last_output_ns = self.last_output_ns.max(ns);
        self.progress.output_at(ns);
        Ok(())
    }

    /// The end of the output: what is left of each stream's last line.
    async fn finish(&mut self) -> Result<(), RunError> {
        for stream in [Stream::Out, Stream::Err] {
            let rest = self.streams[stream.at()].lines.finish();
            if !rest.is_empty() {
                self.write(&rest).await?;
                self.streams[stream.at()].wrote(&rest, wall_ns());
            }
        }
        self.log
            .flush()
            .await
            .map_err(|e| failed(format!("cannot write the log: {e}")))?;
        self.stdout.finish();
        self.stderr.finish();
        Ok(())
    }

    /// Flushes the log and saves the cursor, when it moved since the last
    /// save.
    async fn save(&mut self, keeper: &mut RecordKeeper) -> Result<(), RunError> {
        self.log
            .flush()
            .await
            .map_err(|e| failed(format!("cannot write the log: {e}")))?;
        let cursor = self.cursor();
        if cursor != self.saved {
            keeper.save_cursor(cursor.clone()).await;
            self.saved = cursor;
        }
        Ok(())
    }
}

fn wall_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// Docker's copy of the output could not be read (either of the two
/// readings of [`DockerRunner::backlog`]).
fn copy_unreadable(error: bollard::errors::Error) -> RunError {
    failed(format!(
        "cannot read the offliner's output from Docker: {error}"
    ))
}

/// One line of Docker's copy: its stream, timestamp and bytes.
fn docker_line(chunk: &LogOutput) -> Option<(Stream, i64, &[u8])> {
    let (stream, bytes) = match chunk {
        LogOutput::StdErr { message } => (Stream::Err, message),
        LogOutput::StdOut { message } | LogOutput::Console { message } => (Stream::Out, message),
        LogOutput::StdIn { .. } => return None,
    };
    let (ns, text) = split_timestamp(bytes)?;
    Some((stream, ns, text))
}

impl DockerRunner {
    /// Follows the offliner `name`'s output into `log_file` until it
    /// exits, keeping the tails; kills it when it is silent for the idle
    /// timeout. `live`: its output, attached before it started (a fresh
    /// task); `None` for a task carried on from `cursor`, whose missing
    /// output is read from Docker's copy first. On
    /// [`CancelReason::Leave`] it saves the cursor and returns at once,
    /// the container left running.
    pub(super) async fn follow(
        &self,
        name: &str,
        log_file: &OwnFile,
        cursor: LogCursor,
        live: Option<OutputStream>,
        keeper: &mut RecordKeeper,
        ctx: &TaskContext,
    ) -> Result<ContainerRun, RunError> {
        let opening = log_file.clone();
        let log_bytes = cursor.log_bytes;
        let fresh = live.is_some();
        let log_path = log_file.path();
        let file = tokio::task::spawn_blocking(move || {
            if fresh {
                return opening.create_afresh();
            }
            match opening.reopen_at(log_bytes) {
                // Gone (compressed by a run that died before it recorded
                // its upload): the lines after the cursor go in a new one.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => opening.create(),
                other => other,
            }
        })
        .await
        .map_err(|e| failed(format!("cannot write the log {}: {e}", log_path.display())))?
        .map_err(|e| failed(format!("cannot write the log {}: {e}", log_path.display())))?;
        let written = if fresh {
            0
        } else {
            file.metadata().map_or(0, |m| m.len())
        };
        if let Some(ns) = cursor.last_output_ns {
            ctx.progress.output_at(ns);
        }
        let mut f = Follower {
            log: tokio::io::BufWriter::with_capacity(64 * 1024, tokio::fs::File::from_std(file)),
            log_file,
            written,
            streams: [
                StreamState::from_cursor(&cursor.stdout),
                StreamState::from_cursor(&cursor.stderr),
            ],
            last_output_ns: cursor.last_output_ns.unwrap_or_else(wall_ns),
            progress: ctx.progress.clone(),
            stdout: Tail::default(),
            stderr: Tail::default(),
            saved: cursor,
            overlap: [Vec::new(), Vec::new()],
        };
        let live = match live {
            Some(live) => Some(live),
            None => match self.catch_up(name, &mut f, ctx).await {
                Ok(live) => live,
                Err(e) => return Err(self.stopped(e, &mut f, keeper, ctx).await),
            },
        };
        if let Some(live) = live {
            match self.read_live(live, &mut f, keeper, ctx).await {
                Err(e) => return Err(self.stopped(e, &mut f, keeper, ctx).await),
                Ok(Read::Idle) => {
                    let idle = self.settings.idle_timeout;
                    tracing::warn!(
                        idle_secs = idle.as_secs(),
                        "no output for IDLE_TIMEOUT; killing the offliner"
                    );
                    let _ = self.docker.kill_and_remove(name).await;
                    ctx.emit(ContainerEvent::Killed {
                        timeout_s: idle.as_secs(),
                    });
                    let _ = f.finish().await;
                    return Err(failed(format!(
                        "the offliner printed nothing for {} s (IDLE_TIMEOUT) and was killed",
                        idle.as_secs()
                    )));
                }
                Ok(Read::Ended) => {}
            }
        }
        f.finish().await?;
        let exit = match cancellable(ctx.cancel.token(), self.docker.wait(name)).await {
            Ok(exit) => exit.map_err(docker_failed)?,
            Err(e) => return Err(self.stopped(e, &mut f, keeper, ctx).await),
        };
        f.save(keeper).await?;
        Ok(ContainerRun {
            exit,
            stdout: f.stdout,
            stderr: f.stderr,
        })
    }

    /// The live output to its end, saving the cursor as it goes.
    async fn read_live(
        &self,
        mut live: OutputStream,
        f: &mut Follower<'_>,
        keeper: &mut RecordKeeper,
        ctx: &TaskContext,
    ) -> Result<Read, RunError> {
        let idle_ns = i64::try_from(self.settings.idle_timeout.as_nanos()).unwrap_or(i64::MAX);
        let mut save = tokio::time::interval(SAVE_EVERY);
        save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        save.tick().await;
        loop {
            let left = f.last_output_ns.saturating_add(idle_ns) - wall_ns();
            let idle_at = tokio::time::Instant::now()
                + Duration::from_nanos(u64::try_from(left).unwrap_or(0));
            tokio::select! {
                biased;
                _ = ctx.cancel.cancelled() => return Err(RunError::Cancelled),
                _ = save.tick() => f.save(keeper).await?,
                next = live.next() => match next {
                    None => return Ok(Read::Ended),
                    Some(Err(error)) => {
                        tracing::warn!(%error, "lost the container's output stream; waiting for it to exit");
                        return Ok(Read::Ended);
                    }
                    Some(Ok(chunk)) => f.chunk(chunk).await?,
                },
                _ = tokio::time::sleep_until(idle_at) => return Ok(Read::Idle),
            }
        }
    }

    /// For a task carried on: what the offliner printed while no worker
    /// read it, from Docker's copy, into the log; then, if it still runs,
    /// its live output from there on. It is paused meanwhile, so that
    /// nothing it prints falls between Docker's copy and the attach.
    async fn catch_up(
        &self,
        name: &str,
        f: &mut Follower<'_>,
        ctx: &TaskContext,
    ) -> Result<Option<OutputStream>, RunError> {
        let running = match self.docker.state(name).await {
            Ok(Some(state)) => state.running,
            Ok(None) => return Err(failed(format!("the offliner container {name} is gone"))),
            Err(e) => return Err(docker_failed(e)),
        };
        // Attached first (Docker attaches to no paused container), then
        // paused: what it prints in between is on both, and dropped from
        // the live output (see `repeated`).
        let attached_at = wall_ns();
        let live = if running {
            Some(self.docker.attach(name).await.map_err(docker_failed)?)
        } else {
            None
        };
        let paused = running
            && {
                match self.docker.set_paused(name, true).await {
                    Ok(()) => true,
                    Err(error) => {
                        tracing::warn!(%error, "cannot pause the offliner while reading what it printed; lines printed meanwhile may be repeated");
                        false
                    }
                }
            };
        if paused {
            tokio::time::sleep(DRAIN).await;
        }
        let caught = cancellable(ctx.cancel.token(), self.backlog(name, f, attached_at)).await;
        if paused && let Err(error) = self.docker.set_paused(name, false).await {
            tracing::error!(%error, "cannot unpause the offliner");
        }
        caught??;
        Ok(live)
    }

    /// Writes the lines of Docker's copy that are not in the log yet, after
    /// a gap line per stream where Docker no longer held the log's place.
    /// Docker's copy is read twice: to find that place, then to write.
    async fn backlog(
        &self,
        name: &str,
        f: &mut Follower<'_>,
        attached_at: i64,
    ) -> Result<(), RunError> {
        let mut seen: [Vec<(i64, u64)>; 2] = [Vec::new(), Vec::new()];
        let mut copy = self.docker.logs(name, false, 0);
        while let Some(chunk) = copy.next().await {
            let chunk = chunk.map_err(copy_unreadable)?;
            if let Some((stream, ns, line)) = docker_line(&chunk) {
                seen[stream.at()].push((ns, line_hash(line)));
            }
        }
        let resume = [Stream::Out, Stream::Err].map(|s| {
            let state = &f.streams[s.at()];
            let last: Vec<u64> = state.last.iter().copied().collect();
            resume_point(&seen[s.at()], &last, state.read_ns)
        });
        let total: [usize; 2] = [seen[0].len(), seen[1].len()];
        drop(seen);
        for r in &resume {
            if let Some((from, to)) = r.gap {
                tracing::warn!(
                    from = %rfc3339(from),
                    to = %rfc3339(to),
                    "output of the offliner was rotated away by Docker before it could be read"
                );
                f.write(gap_line(from, to).as_bytes()).await?;
            }
        }
        let mut index = [0_usize; 2];
        let mut copied = 0_u64;
        let mut copy = self.docker.logs(name, false, 0);
        while let Some(chunk) = copy.next().await {
            let chunk = chunk.map_err(copy_unreadable)?;
            let Some((stream, ns, line)) = docker_line(&chunk) else {
                continue;
            };
            let i = stream.at();
            // Only lines counted in the first reading: the container is
            // paused or has exited, so the copy is the same.
            if index[i] >= resume[i].from && index[i] < total[i] {
                f.backlog_line(stream, ns, line).await?;
                if ns >= attached_at && f.overlap[i].len() < MAX_OVERLAP {
                    f.overlap[i].push(line_hash(line));
                }
                copied += 1;
            }
            index[i] += 1;
        }
        tracing::info!(
            lines = copied,
            "read what the offliner printed while no worker followed it from Docker's copy"
        );
        Ok(())
    }

    /// The follow stopped with `error`: on a leave, the log flushed and
    /// the cursor saved first, so the next start goes on from there.
    async fn stopped(
        &self,
        error: RunError,
        f: &mut Follower<'_>,
        keeper: &mut RecordKeeper,
        ctx: &TaskContext,
    ) -> RunError {
        if ctx.cancel.reason() == Some(CancelReason::Leave) {
            if let Err(e) = f.save(keeper).await {
                tracing::warn!(error = %e, "could not save how far the log is; the next start may repeat some of it");
            }
        } else {
            let _ = f.log.flush().await;
        }
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_timestamps_are_read_to_the_nanosecond() {
        let (ns, text) = split_timestamp(b"2026-12-06T07:12:50.123456789Z hello\n").unwrap();
        assert_eq!(ns, 1_796_541_170_123_456_789);
        assert_eq!(text, b"hello\n");
        // RFC3339Nano drops trailing zeros.
        let (short, _) = split_timestamp(b"2026-12-06T07:12:50.1Z x").unwrap();
        assert_eq!(short, 1_796_541_170_100_000_000);
        let (whole, empty) = split_timestamp(b"2026-12-06T07:12:50Z ").unwrap();
        assert_eq!(whole, 1_796_541_170_000_000_000);
        assert_eq!(empty, b"");
        assert_eq!(split_timestamp(b"hello world"), None);
        assert_eq!(split_timestamp(b"nospace"), None);
        assert_eq!(rfc3339(ns), "2026-12-06T07:12:50.123456789Z");
        assert_eq!(
            gap_line(whole, short),
            "[zimfarm-worker] output between 2026-12-06T07:12:50Z and 2026-12-06T07:12:50.100Z \
             was rotated away by Docker before it could be read\n"
        );
    }

    fn lines_of(text: &str) -> Vec<(i64, u64)> {
        text.split_inclusive('\n')
            .enumerate()
            .map(|(i, l)| (i as i64 * 10, line_hash(l.as_bytes())))
            .collect()
    }

    fn hashes(lines: &[&str]) -> Vec<u64> {
        lines.iter().map(|l| line_hash(l.as_bytes())).collect()
    }

    #[test]
    fn lines_are_cut_as_docker_cuts_them() {
        let mut l = Lines::default();
        assert_eq!(l.push(b"a\nb"), b"a\n");
        assert_eq!(l.push(b"c\nd\ne"), b"bc\nd\n");
        assert_eq!(l.finish(), b"e");
        let long = vec![b'x'; DOCKER_LINE_MAX + 10];
        assert_eq!(l.push(&long).len(), DOCKER_LINE_MAX);
        assert_eq!(l.push(b"\n").len(), 11);
        assert_eq!(each_line(b"a\nbb\n").count(), 2);
    }

    #[test]
    fn the_log_goes_on_after_the_last_place_its_lines_stand_in_a_row() {
        let copy = lines_of("a\nb\nc\nb\nc\nd\n");
        // "b c" twice: the last place stamped no later than the reading.
        assert_eq!(
            resume_point(&copy, &hashes(&["b\n", "c\n"]), Some(40)),
            Resume { from: 5, gap: None }
        );
        assert_eq!(
            resume_point(&copy, &hashes(&["b\n", "c\n"]), Some(39)),
            Resume { from: 3, gap: None }
        );
        // Nothing of the stream in the log: all of it.
        assert_eq!(
            resume_point(&copy, &[], None),
            Resume { from: 0, gap: None }
        );
        // Only the end of the log's lines left at the start of the copy.
        let rotated = lines_of("c\nd\ne\n");
        assert_eq!(
            resume_point(&rotated, &hashes(&["a\n", "b\n", "c\n"]), Some(0)),
            Resume { from: 1, gap: None }
        );
    }

    #[test]
    fn lines_rotated_away_leave_a_gap_from_the_reading_to_the_oldest_line_kept() {
        let copy: Vec<(i64, u64)> = lines_of("x\ny\n")
            .into_iter()
            .map(|(t, h)| (t + 100, h))
            .collect();
        assert_eq!(
            resume_point(&copy, &hashes(&["a\n"]), Some(50)),
            Resume {
                from: 0,
                gap: Some((50, 100))
            }
        );
        // Docker holds lines from before the reading, but not the log's
        // own: go on after the reading, no gap to tell.
        assert_eq!(
            resume_point(&copy, &hashes(&["a\n"]), Some(105)),
            Resume { from: 1, gap: None }
        );
        assert_eq!(
            resume_point(&[], &hashes(&["a\n"]), Some(5)),
            Resume { from: 0, gap: None }
        );
    }

    #[test]
    fn lines_caught_by_both_the_copy_and_the_attach_are_written_once() {
        let h = |l: &[&str]| hashes(l);
        // The attach began at "c": it delivers "c d" again, then new lines.
        assert_eq!(
            repeated(&h(&["b", "c", "d"]), &h(&["c", "d", "e"])),
            (2, vec![])
        );
        assert_eq!(
            repeated(&h(&["b", "c", "d"]), &h(&["b", "c", "d", "e"])),
            (3, vec![])
        );
        // It began after them all.
        assert_eq!(repeated(&h(&["b", "c"]), &h(&["e", "f"])), (0, vec![]));
        // Nothing complete yet: still waiting for all of them.
        assert_eq!(repeated(&h(&["b", "c"]), &[]), (0, h(&["b", "c"])));
        // The first chunk ends inside them: the rest is still to come.
        assert_eq!(repeated(&h(&["b", "c", "d"]), &h(&["c"])), (1, h(&["d"])));
        // A line equal to one of them, not followed by the rest: new.
        assert_eq!(
            repeated(&h(&["b", "c", "d"]), &h(&["c", "x", "d"])),
            (0, vec![])
        );
        // Repeated lines: the first place that reads as the live output.
        assert_eq!(
            repeated(&h(&["c", "c", "c"]), &h(&["c", "c", "x"])),
            (2, vec![])
        );
    }

    #[test]
    fn the_cursor_keeps_the_last_lines_of_each_stream() {
        let mut s = StreamState::default();
        s.wrote(b"1\n2\n3\n", 10);
        s.wrote(b"4\n5\n", 20);
        assert_eq!(s.last, hashes(&["2\n", "3\n", "4\n", "5\n"]));
        assert_eq!(s.read_ns, Some(20));
        let back = StreamState::from_cursor(&s.cursor());
        assert_eq!(back.last, s.last);
        assert_eq!(back.read_ns, Some(20));
    }

    mod props {
        use super::*;
        use crate::proptest_config::config;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(config())]

            /// A stream of lines (few distinct ones, so that they repeat),
            /// written up to some point, then Docker's copy of it with a
            /// prefix rotated away: the log goes on exactly where it
            /// stopped whenever Docker still holds its last line, and
            /// never repeats a line stamped before its reading otherwise.
            #[test]
            fn the_log_goes_on_where_it_stopped(
                words in proptest::collection::vec(0..4_u8, 1..80),
                stop in any::<prop::sample::Index>(),
                rotated in any::<prop::sample::Index>(),
            ) {
                let lines: Vec<(i64, u64)> = words
                    .iter()
                    .enumerate()
                    .map(|(i, w)| (i as i64, line_hash(format!("w{w}\n").as_bytes())))
                    .collect();
                let stop = stop.index(lines.len() + 1);
                let rotated = rotated.index(lines.len() + 1);
                let last: Vec<u64> = lines[stop.saturating_sub(CURSOR_LINES)..stop].iter().map(|l| l.1).collect();
                let read_ns = stop.checked_sub(1).map(|i| i as i64);
                let copy = &lines[rotated..];
                let r = resume_point(copy, &last, read_ns);
                if rotated < stop {
                    prop_assert_eq!(rotated + r.from, stop);
                    prop_assert_eq!(r.gap, None);
                } else {
                    // The log's last line is gone: everything Docker kept is
                    // new, after a gap (maybe empty: it cannot tell).
                    prop_assert_eq!(r.from, 0);
                    prop_assert_eq!(r.gap.is_some(), stop > 0 && !copy.is_empty());
                }
            }
        }
    }
}
