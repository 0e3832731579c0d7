//! Following the offliner's output into the task log, for a fresh task and
//! an adopted one alike: Docker's `logs(follow, timestamps)` from a cursor
//! (the last line's timestamp written, per stream), each line at or
//! before its stream's cursor dropped (Docker repeats lines, at rotations
//! and because `since` is whole seconds), the stream opened again from the
//! cursors when it ends while the container runs, one last pass once it
//! exited, a line in the log where Docker's bounded copy had rotated
//! output away before it could be read, the idle timeout counted from the
//! last line's timestamp, and the cursor saved into the task record every
//! few seconds and when the worker leaves.
//!
//! Owns the log file while the offliner runs and the cursor; it must not
//! start or remove containers (it kills the offliner only for the idle
//! timeout, as the stage it serves says).

use std::time::Duration;

use bollard::container::LogOutput;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::containers::{ContainerRun, Tail};
use super::{DockerRunner, RecordKeeper, docker_failed, failed};
use crate::runner::{CancelReason, ContainerEvent, RunError, TaskContext};
use crate::taskfs::OwnFile;
use crate::taskfs::record::LogCursor;

/// How often the cursor is saved into the task record while output comes.
const SAVE_EVERY: Duration = Duration::from_secs(5);
/// How long to wait before opening the output again when it ended while
/// the container still runs.
const REOPEN_AFTER: Duration = Duration::from_millis(200);
/// How long an opening of the output may take to deliver what Docker kept
/// before the idle timeout can fire: a task carried on after a long
/// absence has its last line far back, and its backlog still to read.
const BACKLOG_GRACE: Duration = Duration::from_secs(5);

/// Which of the container's streams a line is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stream {
    Out,
    Err,
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

/// What to do with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Already in the log.
    Drop,
    /// New: write it, after a gap line for the span `(from, to)` when the
    /// lines between its stream's cursor and it are gone from Docker's copy.
    Write { gap: Option<(i64, i64)> },
}

/// The per-stream cursors, and whether each stream's cursor line has been
/// seen again since the output was last opened.
#[derive(Debug, Clone, Default)]
pub(super) struct Dedup {
    cursor: [Option<i64>; 2],
    /// Since the last [`Dedup::reopen`]: the stream reached its cursor
    /// (met the cursor's own line, or wrote a line).
    checked: [bool; 2],
}

impl Dedup {
    pub(super) fn new(stdout: Option<i64>, stderr: Option<i64>) -> Self {
        Self {
            cursor: [stdout, stderr],
            checked: [false; 2],
        }
    }

    fn at(stream: Stream) -> usize {
        match stream {
            Stream::Out => 0,
            Stream::Err => 1,
        }
    }

    pub(super) fn cursor(&self, stream: Stream) -> Option<i64> {
        self.cursor[Self::at(stream)]
    }

    /// Where to open the output from: the earliest cursor's whole second
    /// (the API takes no finer); 0, from the start, with no cursor.
    pub(super) fn since_secs(&self) -> i64 {
        self.cursor
            .iter()
            .flatten()
            .min()
            .map_or(0, |ns| ns.div_euclid(1_000_000_000))
    }

    /// The output is opened again (from [`Dedup::since_secs`]).
    pub(super) fn reopen(&mut self) {
        self.checked = [false; 2];
    }

    /// A line of `stream` stamped `ns`.
    pub(super) fn observe(&mut self, stream: Stream, ns: i64) -> Verdict {
        let i = Self::at(stream);
        match self.cursor[i] {
            Some(cursor) if ns <= cursor => {
                if ns == cursor {
                    self.checked[i] = true;
                }
                Verdict::Drop
            }
            cursor => {
                // The first line after the cursor, and the cursor's own
                // line was not met: Docker no longer has what lay between.
                let gap = match cursor {
                    Some(from) if !self.checked[i] => Some((from, ns)),
                    _ => None,
                };
                self.cursor[i] = Some(ns);
                self.checked[i] = true;
                Verdict::Write { gap }
            }
        }
    }
}

/// Openings of the output in a row that fail before a line may do so
/// before the task fails (the engine's log driver cannot be read).
const LOST_OPENINGS: u32 = 5;

/// How one reading of the output ended.
enum Read {
    /// The stream ended (the container stopped, or Docker closed it).
    Ended,
    /// Docker's stream failed, after `chunks` chunks.
    Lost { error: String, chunks: u64 },
    /// Nothing printed for the idle timeout.
    Idle,
}

/// The follower's state: the log, the cursors, the tails.
struct Follower<'a> {
    log: tokio::io::BufWriter<tokio::fs::File>,
    log_file: &'a OwnFile,
    dedup: Dedup,
    /// Bytes in the log.
    written: u64,
    last_output_ns: i64,
    stdout: Tail,
    stderr: Tail,
    saved: LogCursor,
}

impl Follower<'_> {
    fn cursor(&self) -> LogCursor {
        LogCursor {
            stdout_ns: self.dedup.cursor(Stream::Out),
            stderr_ns: self.dedup.cursor(Stream::Err),
            log_bytes: self.written,
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

    async fn line(&mut self, chunk: LogOutput) -> Result<(), RunError> {
        let (stream, bytes) = match &chunk {
            LogOutput::StdErr { message } => (Stream::Err, message),
            LogOutput::StdOut { message } | LogOutput::Console { message } => {
                (Stream::Out, message)
            }
            LogOutput::StdIn { .. } => return Ok(()),
        };
        let Some((ns, text)) = split_timestamp(bytes) else {
            // Not stamped (never seen from Docker): kept, never deduped.
            return self.write(bytes).await;
        };
        match self.dedup.observe(stream, ns) {
            Verdict::Drop => Ok(()),
            Verdict::Write { gap } => {
                if let Some((from, to)) = gap {
                    tracing::warn!(
                        from = %rfc3339(from),
                        to = %rfc3339(to),
                        "output of the offliner was rotated away by Docker before it could be read"
                    );
                    self.write(gap_line(from, to).as_bytes()).await?;
                }
                match stream {
                    Stream::Out => self.stdout.push(text),
                    Stream::Err => self.stderr.push(text),
                }
                self.last_output_ns = self.last_output_ns.max(ns);
                self.write(text).await
            }
        }
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

impl DockerRunner {
    /// Follows the offliner `name`'s output into `log_file` from `cursor`
    /// until it exits, keeping the tails; kills it when it is silent for
    /// the idle timeout (counted from its last line's timestamp, else from
    /// its start). On [`CancelReason::Leave`] it saves the cursor and
    /// returns at once, the container left running.
    pub(super) async fn follow(
        &self,
        name: &str,
        log_file: &OwnFile,
        cursor: LogCursor,
        keeper: &mut RecordKeeper,
        ctx: &TaskContext,
    ) -> Result<ContainerRun, RunError> {
        let opening = log_file.clone();
        let log_bytes = cursor.log_bytes;
        let fresh = cursor == LogCursor::default();
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
        let started_ns = match self.docker.state(name).await {
            Ok(Some(state)) => state
                .started_at
                .as_deref()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .and_then(|t| t.timestamp_nanos_opt()),
            Ok(None) => return Err(failed(format!("the offliner container {name} is gone"))),
            Err(e) => return Err(docker_failed(e)),
        };
        let mut f = Follower {
            log: tokio::io::BufWriter::with_capacity(64 * 1024, tokio::fs::File::from_std(file)),
            log_file,
            dedup: Dedup::new(cursor.stdout_ns, cursor.stderr_ns),
            written,
            last_output_ns: cursor.last_output_ns.or(started_ns).unwrap_or_else(wall_ns),
            stdout: Tail::default(),
            stderr: Tail::default(),
            saved: cursor,
        };
        let idle = self.settings.idle_timeout;
        let mut lost = 0;
        let exit = loop {
            match self.read(name, true, &mut f, keeper, ctx).await {
                Err(e) => return Err(self.stopped(e, &mut f, keeper, ctx).await),
                Ok(Read::Idle) => {
                    tracing::warn!(
                        idle_secs = idle.as_secs(),
                        "no output for IDLE_TIMEOUT; killing the offliner"
                    );
                    let _ = self.docker.kill_and_remove(name).await;
                    ctx.emit(ContainerEvent::Killed {
                        timeout_s: idle.as_secs(),
                    });
                    let _ = f.log.flush().await;
                    return Err(failed(format!(
                        "the offliner printed nothing for {} s (IDLE_TIMEOUT) and was killed",
                        idle.as_secs()
                    )));
                }
                Ok(Read::Ended) => lost = 0,
                Ok(Read::Lost { error, chunks }) => {
                    lost = if chunks == 0 { lost + 1 } else { 1 };
                    if lost >= LOST_OPENINGS {
                        return Err(failed(format!(
                            "cannot read the offliner's output from Docker ({error}); the \
                             engine's log driver must be one Docker can read back (json-file, \
                             local or journald)"
                        )));
                    }
                    tracing::warn!(%error, "lost the container's output stream; opening it again");
                }
            }
            match self.docker.state(name).await {
                Ok(Some(state)) if state.running => {
                    tokio::select! {
                        _ = ctx.cancel.cancelled() => {
                            return Err(self.stopped(RunError::Cancelled, &mut f, keeper, ctx).await);
                        }
                        _ = tokio::time::sleep(REOPEN_AFTER) => {}
                    }
                }
                Ok(Some(state)) => break state.exit,
                Ok(None) => {
                    return Err(failed(format!(
                        "the offliner container {name} was removed from outside while it ran"
                    )));
                }
                Err(e) => return Err(docker_failed(e)),
            }
        };
        // It exited: what Docker has of it and the log has not yet.
        match self.read(name, false, &mut f, keeper, ctx).await {
            Err(e) => return Err(self.stopped(e, &mut f, keeper, ctx).await),
            Ok(Read::Lost { error, .. }) => {
                tracing::warn!(%error, "could not read the end of the offliner's output");
            }
            Ok(_) => {}
        }
        f.save(keeper).await?;
        f.stdout.finish();
        f.stderr.finish();
        Ok(ContainerRun {
            exit,
            stdout: f.stdout,
            stderr: f.stderr,
        })
    }

    /// One opening of the output, from the cursors, to its end.
    async fn read(
        &self,
        name: &str,
        follow: bool,
        f: &mut Follower<'_>,
        keeper: &mut RecordKeeper,
        ctx: &TaskContext,
    ) -> Result<Read, RunError> {
        let mut logs = self.docker.logs(name, follow, f.dedup.since_secs());
        f.dedup.reopen();
        let idle_ns = i64::try_from(self.settings.idle_timeout.as_nanos()).unwrap_or(i64::MAX);
        let mut save = tokio::time::interval(SAVE_EVERY);
        save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        save.tick().await;
        let backlog_read = tokio::time::Instant::now() + BACKLOG_GRACE;
        let mut chunks = 0_u64;
        loop {
            let left = f.last_output_ns.saturating_add(idle_ns) - wall_ns();
            let idle_at = (tokio::time::Instant::now()
                + Duration::from_nanos(u64::try_from(left).unwrap_or(0)))
            .max(backlog_read);
            tokio::select! {
                biased;
                _ = ctx.cancel.cancelled() => return Err(RunError::Cancelled),
                _ = save.tick() => f.save(keeper).await?,
                next = logs.next() => match next {
                    None => return Ok(Read::Ended),
                    Some(Err(error)) => {
                        return Ok(Read::Lost { error: error.to_string(), chunks });
                    }
                    Some(Ok(chunk)) => {
                        chunks += 1;
                        f.line(chunk).await?;
                    }
                },
                _ = tokio::time::sleep_until(idle_at), if follow => return Ok(Read::Idle),
            }
        }
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

    #[test]
    fn lines_at_or_before_their_streams_cursor_are_dropped() {
        let mut d = Dedup::new(Some(2_500_000_000), Some(1_200_000_000));
        assert_eq!(d.since_secs(), 1);
        d.reopen();
        // stderr: its cursor line, then new lines.
        assert_eq!(d.observe(Stream::Err, 1_100_000_000), Verdict::Drop);
        assert_eq!(d.observe(Stream::Err, 1_200_000_000), Verdict::Drop);
        assert_eq!(
            d.observe(Stream::Err, 1_300_000_000),
            Verdict::Write { gap: None }
        );
        // stdout: before and at its cursor dropped, across streams.
        assert_eq!(d.observe(Stream::Out, 2_000_000_000), Verdict::Drop);
        assert_eq!(d.observe(Stream::Out, 2_500_000_000), Verdict::Drop);
        assert_eq!(
            d.observe(Stream::Out, 2_600_000_000),
            Verdict::Write { gap: None }
        );
        assert_eq!(d.cursor(Stream::Out), Some(2_600_000_000));
        assert_eq!(d.since_secs(), 1);
    }

    #[test]
    fn a_cursor_line_gone_after_a_reopen_is_a_gap_once() {
        let mut d = Dedup::new(Some(5_000_000_000), None);
        d.reopen();
        assert_eq!(
            d.observe(Stream::Out, 9_000_000_000),
            Verdict::Write {
                gap: Some((5_000_000_000, 9_000_000_000))
            }
        );
        assert_eq!(
            d.observe(Stream::Out, 9_500_000_000),
            Verdict::Write { gap: None }
        );
        // A stream with no cursor never has a gap: nothing was read of it.
        assert_eq!(
            d.observe(Stream::Err, 1_000_000_000),
            Verdict::Write { gap: None }
        );
        // Within one opening, no gap either.
        assert_eq!(Dedup::default().since_secs(), 0);
    }

    mod props {
        use super::*;
        use crate::proptest_config::config;
        use proptest::prelude::*;

        /// Docker's copy of a container's output: lines of two streams,
        /// stamped in order (strictly increasing per stream, ties across).
        fn output() -> impl Strategy<Value = Vec<(Stream, i64)>> {
            proptest::collection::vec((any::<bool>(), 0..3_000_000_000_i64), 0..60).prop_map(
                |lines| {
                    let mut at = [0_i64; 2];
                    let mut t = 0;
                    lines
                        .into_iter()
                        .map(|(err, step)| {
                            t += step;
                            let (s, i) = if err {
                                (Stream::Err, 1)
                            } else {
                                (Stream::Out, 0)
                            };
                            t = t.max(at[i] + 1);
                            at[i] = t;
                            (s, t)
                        })
                        .collect()
                },
            )
        }

        proptest! {
            #![proptest_config(config())]

            /// Read in pieces, each opening from `since` with a prefix of
            /// Docker's copy rotated away: every line is written at most
            /// once and in order per stream; with nothing rotated, each
            /// exactly once and never a gap.
            #[test]
            fn reopening_repeats_nothing_and_loses_nothing_docker_kept(
                lines in output(),
                cuts in proptest::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..5),
                rotate in any::<bool>(),
            ) {
                let mut d = Dedup::default();
                let mut written: Vec<(Stream, i64)> = Vec::new();
                let mut gaps = 0;
                let mut upto = 0;
                let mut pieces: Vec<(usize, usize)> = cuts
                    .iter()
                    .map(|(a, b)| (a.index(lines.len() + 1), b.index(lines.len() + 1)))
                    .collect();
                pieces.push((lines.len(), 0));
                for (end, rot) in pieces {
                    let end = end.max(upto);
                    d.reopen();
                    let since_ns = d.since_secs() * 1_000_000_000;
                    let first_kept = if rotate { rot.min(end) } else { 0 };
                    for &(s, ns) in lines[first_kept..end].iter().filter(|(_, ns)| *ns >= since_ns) {
                        match d.observe(s, ns) {
                            Verdict::Drop => {}
                            Verdict::Write { gap } => {
                                gaps += usize::from(gap.is_some());
                                written.push((s, ns));
                            }
                        }
                    }
                    upto = end;
                }
                for s in [Stream::Out, Stream::Err] {
                    let of: Vec<i64> = written.iter().filter(|(w, _)| *w == s).map(|(_, ns)| *ns).collect();
                    prop_assert!(of.windows(2).all(|w| w[0] < w[1]), "{of:?}");
                }
                if !rotate {
                    prop_assert_eq!(&written, &lines);
                    prop_assert_eq!(gaps, 0);
                }
            }
        }
    }
}
