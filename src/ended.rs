//! The on-disk record of the tasks that ended here (SPEC §8), so that a
//! message redelivered after its ack was lost (connection cut, worker
//! restart, `kill -9`) is answered with the task's final event instead of
//! running the task again.
//!
//! Owns one append-only JSON-lines file, `ZIM_DIR/.zimfarm-ended.jsonl`,
//! written by one thread of its own (appends and compactions, in turn), and
//! the in-memory index of its newest records, the only lock. It must not
//! touch anything else in the working dir (task dirs belong to the runner),
//! nor talk to the broker or emit events: the worker decides what to do
//! with a record.
//!
//! One line per ended task, e.g.
//! `{"id":"6a1f…","event":"task-succeeded","result":"[{'name': …}]","runtime":12.5}`,
//! `{"id":"…","event":"task-failed","exception":"RuntimeError('…')","traceback":"…"}`,
//! `{"id":"…","event":"task-revoked","terminated":false,"signum":null,"expired":true}`.
//! A line that does not parse (cut by a crash, edited by hand, written by a
//! newer version) is skipped with a warning. Once the file holds more than
//! twice [`KEEP`] lines it is rewritten with the newest [`KEEP`] (a temp file
//! renamed over it). One worker per working dir: two processes sharing it
//! would each compact away the other's records.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::celery::EventKind;

/// Name of the record file in ZIM_DIR.
pub const FILE_NAME: &str = ".zimfarm-ended.jsonl";
/// Ended tasks remembered; the file is compacted to this many once it holds
/// twice as many lines.
pub const KEEP: usize = 10_000;
/// Longest traceback kept in a record (its end is kept): a failed
/// container's log tail can reach 200 KB, and [`KEEP`] records live in
/// memory. The full traceback went out with the first `task-failed`.
const TRACEBACK_KEEP: usize = 4096;

/// Why the record could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum EndedError {
    #[error(
        "cannot open {path} (the record of tasks ended here): {source}; the directory must exist and be writable by the worker"
    )]
    Open { path: PathBuf, source: io::Error },
    #[error(
        "cannot append to {path} (the record of tasks ended here): {source}; check free space and permissions in its directory"
    )]
    Write { path: PathBuf, source: io::Error },
    #[error(
        "{event_type} is not a final task event; only task-succeeded, task-failed and task-revoked are recorded in {path}"
    )]
    NotFinal { path: PathBuf, event_type: String },
}

/// How a task ended: enough to rebuild its final event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event")]
enum Outcome {
    #[serde(rename = "task-succeeded")]
    Succeeded { result: String, runtime: f64 },
    #[serde(rename = "task-failed")]
    Failed {
        exception: String,
        traceback: String,
    },
    #[serde(rename = "task-revoked")]
    Revoked {
        terminated: bool,
        signum: Option<i32>,
        expired: bool,
    },
}

impl Outcome {
    fn from_event(event: &EventKind) -> Option<Self> {
        Some(match event {
            EventKind::TaskSucceeded {
                result, runtime, ..
            } => Self::Succeeded {
                result: result.clone(),
                // A non-finite number would be written as `null` and then
                // not read back.
                runtime: if runtime.is_finite() { *runtime } else { 0.0 },
            },
            EventKind::TaskFailed {
                exception,
                traceback,
                ..
            } => Self::Failed {
                exception: exception.clone(),
                traceback: keep_end(traceback, TRACEBACK_KEEP),
            },
            EventKind::TaskRevoked {
                terminated,
                signum,
                expired,
                ..
            } => Self::Revoked {
                terminated: *terminated,
                signum: *signum,
                expired: *expired,
            },
            _ => return None,
        })
    }

    fn to_event(&self, id: &str) -> EventKind {
        let uuid = id.to_owned();
        match self.clone() {
            Self::Succeeded { result, runtime } => EventKind::TaskSucceeded {
                uuid,
                result,
                runtime,
            },
            Self::Failed {
                exception,
                traceback,
            } => EventKind::TaskFailed {
                uuid,
                exception,
                traceback,
            },
            Self::Revoked {
                terminated,
                signum,
                expired,
            } => EventKind::TaskRevoked {
                uuid,
                terminated,
                signum,
                expired,
            },
        }
    }
}

/// The last `max` bytes of `text` (on a char boundary), marked as cut.
fn keep_end(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("[cut]…{}", &text[start..])
}

/// One line of the file.
#[derive(Debug, Deserialize)]
struct Record {
    id: String,
    #[serde(flatten)]
    outcome: Outcome,
}

impl Record {
    fn line(id: &str, outcome: &Outcome) -> String {
        #[derive(Serialize)]
        struct Borrowed<'a> {
            id: &'a str,
            #[serde(flatten)]
            outcome: &'a Outcome,
        }
        let mut line = serde_json::to_string(&Borrowed { id, outcome })
            .expect("a record of strings, numbers and booleans serializes");
        line.push('\n');
        line
    }
}

/// The newest records, oldest first, at most `keep`.
struct Index {
    keep: usize,
    order: VecDeque<String>,
    outcomes: HashMap<String, Outcome>,
    /// Of those, the tasks whose final event the broker confirmed to this
    /// process (not on disk: another process cannot know it).
    confirmed: std::collections::HashSet<String>,
}

impl Index {
    fn new(keep: usize) -> Self {
        Self {
            keep,
            order: VecDeque::new(),
            outcomes: HashMap::new(),
            confirmed: std::collections::HashSet::new(),
        }
    }

    /// A task id seen again keeps its place and takes the newer outcome.
    fn insert(&mut self, id: String, outcome: Outcome) {
        if self.outcomes.insert(id.clone(), outcome).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > self.keep {
            if let Some(old) = self.order.pop_front() {
                self.outcomes.remove(&old);
                self.confirmed.remove(&old);
            }
        }
    }

    /// The file's content for these records.
    fn lines(&self) -> String {
        self.order
            .iter()
            .filter_map(|id| self.outcomes.get(id).map(|o| Record::line(id, o)))
            .collect()
    }
}

/// The append handle and what is known of the file's content.
struct Writer {
    file: File,
    /// Lines in the file, good or not.
    lines: usize,
    /// Compact once `lines` exceeds this.
    compact_above: usize,
    /// The last write may have stopped mid-line: start the next one on a
    /// fresh line.
    broken: bool,
}

/// The record of ended tasks. Lookups are in memory; [`EndedLog::record`]
/// hands the line to the file's writer thread, off the async runtime.
pub struct EndedLog {
    path: PathBuf,
    index: Arc<Mutex<Index>>,
    /// To the writer thread, which alone holds the file: lines are written
    /// one at a time without a lock, and lookups never wait for the disk.
    appends: mpsc::Sender<Append>,
}

/// One line for the writer thread, and where to say it is written.
struct Append {
    line: String,
    written: oneshot::Sender<io::Result<()>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl EndedLog {
    /// Opens (or creates) `dir/.zimfarm-ended.jsonl` and loads its newest
    /// [`KEEP`] records. Lines that do not parse are skipped with a warning.
    pub async fn open(dir: &Path) -> Result<Self, EndedError> {
        Self::open_keeping(dir, KEEP).await
    }

    async fn open_keeping(dir: &Path, keep: usize) -> Result<Self, EndedError> {
        let path = dir.join(FILE_NAME);
        let load_path = path.clone();
        let (index, writer) = tokio::task::spawn_blocking(move || load(&load_path, keep))
            .await
            .unwrap_or_else(|join| Err(io::Error::other(join.to_string())))
            .map_err(|source| EndedError::Open {
                path: path.clone(),
                source,
            })?;
        let records = index.order.len();
        let index = Arc::new(Mutex::new(index));
        let appends =
            spawn_writer(path.clone(), keep, index.clone(), writer).map_err(|source| {
                EndedError::Open {
                    path: path.clone(),
                    source,
                }
            })?;
        tracing::debug!(
            path = %path.display(),
            records,
            "record of ended tasks loaded"
        );
        Ok(Self {
            path,
            index,
            appends,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The final event of task `id`, if it ended here (among the newest
    /// [`KEEP`]). A failure's traceback may be cut to its last 4 KiB.
    pub fn get(&self, id: &str) -> Option<EventKind> {
        lock(&self.index).outcomes.get(id).map(|o| o.to_event(id))
    }

    /// The broker confirmed task `id`'s final event to this process: a
    /// redelivery of its message (its ack lost with a channel the broker
    /// closed) is then acked without sending that event again. Only for a
    /// task on record.
    pub fn confirmed(&self, id: &str) {
        let mut index = lock(&self.index);
        if index.outcomes.contains_key(id) {
            index.confirmed.insert(id.to_owned());
        }
    }

    /// Whether the broker confirmed task `id`'s final event to this
    /// process ([`EndedLog::confirmed`]).
    pub fn is_confirmed(&self, id: &str) -> bool {
        lock(&self.index).confirmed.contains(id)
    }

    /// Records that task `id` ended with `event` (`task-succeeded`,
    /// `task-failed` or `task-revoked`). [`EndedLog::get`] sees it as soon as
    /// this returns; the returned future has the line appended to the file
    /// (by the writer thread) and resolves once it is written.
    ///
    /// No fsync: the line is durable once `write()` returned, against a
    /// crash or `kill -9` of the worker (the kernel's page cache keeps it).
    /// Only a power loss or kernel crash could lose the newest lines, and
    /// then the task merely runs again; an fsync per task is not worth it.
    pub fn record(
        &self,
        id: &str,
        event: &EventKind,
    ) -> impl Future<Output = Result<(), EndedError>> + Send + 'static {
        let prepared = match Outcome::from_event(event) {
            Some(outcome) => {
                let line = Record::line(id, &outcome);
                lock(&self.index).insert(id.to_owned(), outcome);
                Ok(line)
            }
            None => Err(EndedError::NotFinal {
                path: self.path.clone(),
                event_type: event.event_type().to_owned(),
            }),
        };
        let path = self.path.clone();
        let appends = self.appends.clone();
        async move {
            let line = prepared?;
            let (written, done) = oneshot::channel();
            let stopped = || io::Error::other("the writer of the record stopped");
            let result = match appends.send(Append { line, written }) {
                Ok(()) => done.await.unwrap_or_else(|_| Err(stopped())),
                Err(_) => Err(stopped()),
            };
            result.map_err(|source| EndedError::Write { path, source })
        }
    }
}

/// Reads the file (creating it if missing) into an index of the newest
/// `keep` records, compacting it when it is too long.
fn load(path: &Path, keep: usize) -> io::Result<(Index, Writer)> {
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)?;
    let mut index = Index::new(keep);
    let mut lines = 0;
    let mut ends_with_newline = true;
    {
        let mut reader = BufReader::new(&mut file);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            if reader.read_until(b'\n', &mut buf)? == 0 {
                break;
            }
            lines += 1;
            ends_with_newline = buf.last() == Some(&b'\n');
            let text = buf.strip_suffix(b"\n").unwrap_or(&buf);
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Record>(text) {
                Ok(record) => index.insert(record.id, record.outcome),
                Err(error) => tracing::warn!(
                    path = %path.display(),
                    line = lines,
                    %error,
                    "skipping an unreadable line in the record of ended tasks"
                ),
            }
        }
    }
    let mut writer = Writer {
        file,
        lines,
        compact_above: 2 * keep,
        broken: !ends_with_newline,
    };
    if lines > writer.compact_above {
        compact(path, index.lines(), index.order.len(), keep, &mut writer)?;
    }
    Ok((index, writer))
}

/// Starts the thread that owns the file: it appends the lines it is sent,
/// in turn, and ends once every [`EndedLog`] and record future is gone.
fn spawn_writer(
    path: PathBuf,
    keep: usize,
    index: Arc<Mutex<Index>>,
    mut writer: Writer,
) -> io::Result<mpsc::Sender<Append>> {
    let (appends, lines) = mpsc::channel::<Append>();
    std::thread::Builder::new()
        .name("ended-record".to_owned())
        .spawn(move || {
            for Append { line, written } in lines {
                let _ = written.send(append(&path, keep, &index, &mut writer, &line));
            }
        })?;
    Ok(appends)
}

/// Appends one line, then compacts the file if it grew too long.
fn append(
    path: &Path,
    keep: usize,
    index: &Mutex<Index>,
    w: &mut Writer,
    line: &str,
) -> io::Result<()> {
    if w.broken {
        // The previous line was cut (a crash, a full disk): end it, or this
        // one would be glued to it and lost at the next load.
        w.file.write_all(b"\n")?;
        w.broken = false;
        w.lines += 1;
    }
    if let Err(error) = w.file.write_all(line.as_bytes()) {
        w.broken = true;
        return Err(error);
    }
    w.lines += 1;
    if w.lines > w.compact_above {
        // Serialized under the index lock (CPU only), written without it:
        // lookups on the runtime never wait for the disk.
        let (text, count) = {
            let index = lock(index);
            (index.lines(), index.order.len())
        };
        if let Err(error) = compact(path, text, count, keep, w) {
            // The line itself is written; try again after a while.
            w.compact_above = w.lines + keep.div_ceil(10).max(1);
            tracing::warn!(
                path = %path.display(),
                %error,
                "could not compact the record of ended tasks; it keeps growing until this works"
            );
        }
    }
    Ok(())
}

/// Rewrites the file with `text` (the newest `count` records): a temp file
/// beside it, renamed over it, so that a crash leaves one or the other.
fn compact(path: &Path, text: String, count: usize, keep: usize, w: &mut Writer) -> io::Result<()> {
    let tmp = path.with_extension("jsonl.tmp");
    let result = std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| OpenOptions::new().append(true).open(path));
    match result {
        Ok(file) => {
            tracing::info!(
                path = %path.display(),
                before = w.lines,
                after = count,
                "compacted the record of ended tasks"
            );
            w.file = file;
            w.lines = count;
            w.compact_above = 2 * keep;
            w.broken = false;
            Ok(())
        }
        Err(error) => {
            let _ = std::fs::remove_file(&tmp);
            Err(error)
        }
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use crate::proptest_config::{config, json, text};
    use proptest::prelude::*;

    const KEYS: &[&str] = &[
        "id",
        "event",
        "result",
        "runtime",
        "exception",
        "traceback",
        "terminated",
        "signum",
        "expired",
    ];

    fn outcome() -> impl Strategy<Value = Outcome> {
        prop_oneof![
            (
                text(),
                any::<f64>().prop_filter("finite", |f| f.is_finite())
            )
                .prop_map(|(result, runtime)| Outcome::Succeeded { result, runtime }),
            (text(), text()).prop_map(|(exception, traceback)| Outcome::Failed {
                exception,
                traceback
            }),
            (
                any::<bool>(),
                proptest::option::of(any::<i32>()),
                any::<bool>()
            )
                .prop_map(|(terminated, signum, expired)| Outcome::Revoked {
                    terminated,
                    signum,
                    expired
                }),
        ]
    }

    /// A line of the file: a good record, a cut one, a record-shaped object
    /// with fields of any type, any JSON, random bytes, or blank.
    fn line() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            3 => ("[0-9a-f]{1,4}", outcome()).prop_map(|(id, o)| Record::line(&id, &o).into_bytes()),
            1 => ("[0-9a-f]{1,4}", outcome(), any::<prop::sample::Index>()).prop_map(|(id, o, at)| {
                let line = Record::line(&id, &o).into_bytes();
                line[..at.index(line.len())].to_vec()
            }),
            1 => proptest::collection::vec((proptest::sample::select(KEYS), json(KEYS)), 0..6)
                .prop_map(|fields| {
                    let map: serde_json::Map<String, serde_json::Value> =
                        fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
                    format!("{}\n", serde_json::Value::Object(map)).into_bytes()
                }),
            1 => proptest::collection::vec(any::<u8>(), 0..40),
            1 => Just(b" \t\n".to_vec()),
        ]
    }

    fn index_of(index: &Index) -> Vec<(String, Outcome)> {
        index
            .order
            .iter()
            .map(|id| (id.clone(), index.outcomes[id].clone()))
            .collect()
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn any_record_file_loads_bounded_and_keeps_the_newest(
            lines in proptest::collection::vec(line(), 0..30),
            keep in 1..20_usize,
        ) {
            // One dir for every case: a temp dir per case doubled the time.
            static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
            let path = DIR.get_or_init(|| tempfile::tempdir().expect("temp dir")).path().join(FILE_NAME);
            let content = lines.concat();
            std::fs::write(&path, &content).expect("write the record file");
            let (index, _writer) = load(&path, keep).expect("load");
            prop_assert!(index.order.len() <= keep);
            prop_assert_eq!(index.order.len(), index.outcomes.len());
            let newest = content
                .split(|b| *b == b'\n')
                .filter_map(|l| serde_json::from_slice::<Record>(l).ok())
                .next_back();
            if let Some(record) = newest {
                prop_assert_eq!(index.outcomes.get(&record.id), Some(&record.outcome));
            }
            // Loading again (after a compaction, maybe) gives the same records.
            let (again, _writer) = load(&path, keep).expect("load again");
            prop_assert_eq!(index_of(&again), index_of(&index));
        }

        #[test]
        fn a_record_line_reads_back(id in text(), outcome in outcome()) {
            let line = Record::line(&id, &outcome);
            prop_assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
            let record: Record = serde_json::from_str(&line).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(record.id, id);
            prop_assert_eq!(record.outcome, outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines of the file.
    fn read_lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .expect("read the record file")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn succeeded(id: &str, n: u64) -> EventKind {
        EventKind::TaskSucceeded {
            uuid: id.to_owned(),
            result: format!("[{{'name': 'file_{n}.zim', 'size': {n}}}]"),
            runtime: 0.1 + n as f64 / 3.0,
        }
    }

    fn failed(id: &str) -> EventKind {
        EventKind::TaskFailed {
            uuid: id.to_owned(),
            exception: "RuntimeError(\"exit code 1: 'boom' \\u00e9\")".to_owned(),
            traceback: "line 1\nline 2 é\n".to_owned(),
        }
    }

    fn revoked(id: &str) -> EventKind {
        EventKind::TaskRevoked {
            uuid: id.to_owned(),
            terminated: true,
            signum: Some(15),
            expired: false,
        }
    }

    #[tokio::test]
    async fn roundtrip_of_every_final_event() {
        let dir = tempfile::tempdir().unwrap();
        let log = EndedLog::open(dir.path()).await.unwrap();
        assert_eq!(log.get("a"), None);
        for (id, event) in [
            ("a", succeeded("a", 7)),
            ("b", failed("b")),
            ("c", revoked("c")),
        ] {
            log.record(id, &event).await.unwrap();
            assert_eq!(log.get(id), Some(event));
        }
        assert_eq!(read_lines(log.path()).len(), 3);
        let first: serde_json::Value = serde_json::from_str(&read_lines(log.path())[0]).unwrap();
        assert_eq!(first["id"], "a");
        assert_eq!(first["event"], "task-succeeded");
    }

    #[tokio::test]
    async fn a_confirmed_end_is_known_to_this_process_only() {
        let dir = tempfile::tempdir().unwrap();
        let log = EndedLog::open(dir.path()).await.unwrap();
        // Not on record: nothing to confirm.
        log.confirmed("a");
        assert!(!log.is_confirmed("a"));
        log.record("a", &succeeded("a", 7)).await.unwrap();
        assert!(!log.is_confirmed("a"));
        log.confirmed("a");
        assert!(log.is_confirmed("a"));
        drop(log);
        // Another life of the worker cannot know the broker has it.
        let again = EndedLog::open(dir.path()).await.unwrap();
        assert!(again.get("a").is_some());
        assert!(!again.is_confirmed("a"));
    }

    #[tokio::test]
    async fn records_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log = EndedLog::open(dir.path()).await.unwrap();
        log.record("a", &succeeded("a", 1)).await.unwrap();
        log.record("b", &failed("b")).await.unwrap();
        drop(log);
        let log = EndedLog::open(dir.path()).await.unwrap();
        assert_eq!(log.get("a"), Some(succeeded("a", 1)));
        assert_eq!(log.get("b"), Some(failed("b")));
        log.record("c", &revoked("c")).await.unwrap();
        drop(log);
        let log = EndedLog::open(dir.path()).await.unwrap();
        assert_eq!(log.get("c"), Some(revoked("c")));
        assert_eq!(read_lines(log.path()).len(), 3);
    }

    #[tokio::test]
    async fn corrupt_unknown_and_truncated_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let good = Record::line("good", &Outcome::from_event(&succeeded("good", 1)).unwrap());
        let mut content = good.into_bytes();
        content.extend_from_slice(b"{not json\n");
        content.extend_from_slice(b"\xff\xfe\x00 binary\n");
        content.extend_from_slice(b"\n");
        content.extend_from_slice(br#"{"id":"started","event":"task-started"}"#);
        content.push(b'\n');
        content.extend_from_slice(br#"{"event":"task-revoked","terminated":false}"#);
        content.push(b'\n');
        // The last line, cut by a crash in the middle of its write.
        content.extend_from_slice(br#"{"id":"cut","event":"task-succ"#);
        std::fs::write(dir.path().join(FILE_NAME), &content).unwrap();

        let log = EndedLog::open(dir.path()).await.unwrap();
        assert_eq!(log.get("good"), Some(succeeded("good", 1)));
        assert_eq!(log.get("started"), None);
        assert_eq!(log.get("cut"), None);
        // A record after the cut line starts on a line of its own.
        log.record("next", &failed("next")).await.unwrap();
        drop(log);
        let log = EndedLog::open(dir.path()).await.unwrap();
        assert_eq!(log.get("good"), Some(succeeded("good", 1)));
        assert_eq!(log.get("next"), Some(failed("next")));
    }

    #[tokio::test]
    async fn compaction_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let log = EndedLog::open_keeping(dir.path(), 10).await.unwrap();
        for n in 0..25 {
            let id = format!("t{n}");
            log.record(&id, &succeeded(&id, n)).await.unwrap();
        }
        // Compacted to 10 when the 21st line was written, then 4 more.
        let lines = read_lines(log.path());
        assert_eq!(lines.len(), 14, "{lines:#?}");
        assert!(!dir.path().join(".zimfarm-ended.jsonl.tmp").exists());
        drop(log);
        let log = EndedLog::open_keeping(dir.path(), 10).await.unwrap();
        for n in 0..15 {
            assert_eq!(log.get(&format!("t{n}")), None, "t{n} forgotten");
        }
        for n in 15..25 {
            let id = format!("t{n}");
            assert_eq!(log.get(&id), Some(succeeded(&id, n)), "{id} kept");
        }
    }

    #[tokio::test]
    async fn a_long_file_is_compacted_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let text: String = (0..50)
            .map(|n| {
                let id = format!("t{n}");
                Record::line(&id, &Outcome::from_event(&revoked(&id)).unwrap())
            })
            .collect();
        std::fs::write(dir.path().join(FILE_NAME), text).unwrap();
        let log = EndedLog::open_keeping(dir.path(), 10).await.unwrap();
        let lines = read_lines(log.path());
        assert_eq!(lines.len(), 10);
        assert!(lines[0].contains("\"t40\""), "{}", lines[0]);
        assert_eq!(log.get("t39"), None);
        assert_eq!(log.get("t49"), Some(revoked("t49")));
        // And it is still appended to.
        log.record("new", &failed("new")).await.unwrap();
        assert_eq!(read_lines(log.path()).len(), 11);
    }

    #[tokio::test]
    async fn only_final_events_are_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let log = EndedLog::open(dir.path()).await.unwrap();
        let started = EventKind::TaskStarted { uuid: "s".into() };
        let error = log.record("s", &started).await.unwrap_err();
        assert!(matches!(error, EndedError::NotFinal { .. }), "{error}");
        assert_eq!(log.get("s"), None);
    }

    #[tokio::test]
    async fn a_missing_dir_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let Err(error) = EndedLog::open(&missing).await else {
            panic!("opened a record in a missing dir");
        };
        let text = error.to_string();
        assert!(
            text.contains(&missing.join(FILE_NAME).display().to_string()),
            "{text}"
        );
        assert!(text.contains("must exist and be writable"), "{text}");
    }

    #[tokio::test]
    async fn long_tracebacks_keep_their_end() {
        let dir = tempfile::tempdir().unwrap();
        let log = EndedLog::open(dir.path()).await.unwrap();
        let traceback = format!("{}THE END é", "x".repeat(100_000));
        let event = EventKind::TaskFailed {
            uuid: "f".into(),
            exception: "RuntimeError('exit code 2')".into(),
            traceback,
        };
        log.record("f", &event).await.unwrap();
        let Some(EventKind::TaskFailed { traceback, .. }) = log.get("f") else {
            panic!("recorded as a failure");
        };
        assert!(
            traceback.len() <= TRACEBACK_KEEP + 16,
            "{}",
            traceback.len()
        );
        assert!(traceback.ends_with("THE END é"));
        assert!(traceback.starts_with("[cut]"));
    }

    #[test]
    fn keep_end_cuts_on_a_char_boundary() {
        assert_eq!(keep_end("abc", 3), "abc");
        assert_eq!(keep_end("ééé", 3), "[cut]…é");
    }
}
