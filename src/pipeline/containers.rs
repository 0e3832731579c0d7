//! The offliner's container as it ends: the bounded tails of its output,
//! how it ended (a kill for memory or by SIGKILL is said as such), and the
//! task's containers removed on every path, panics included, unless the
//! worker leaves them for its next start.
//!
//! Owns the containers' lifetime; it must not touch the task dir (its
//! output is followed by `follow.rs`).

use std::collections::VecDeque;

use crate::docker::{ContainerExit, DockerClient};
use crate::metrics;
use crate::runner::TaskError;

/// Lines of stdout and stderr kept for `task-container_finished`.
const TAIL_LINES: usize = 100;
/// Longest line kept in a tail (longer ones are cut).
const TAIL_LINE_MAX: usize = 2000;

/// Why an ended offliner failed the task, in words an operator can act on;
/// `None` when it succeeded. `memory_limit` is CONTAINER_MEMORY_MB's bytes.
pub(super) fn exit_failure(run: &ContainerRun, memory_limit: Option<i64>) -> Option<TaskError> {
    let tail = || {
        let tail: Vec<&str> = run
            .stderr
            .lines
            .iter()
            .chain(run.stdout.lines.iter())
            .rev()
            .take(20)
            .map(String::as_str)
            .collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    };
    match run.exit {
        ContainerExit { code: 0, .. } => None,
        ContainerExit {
            code,
            oom_killed: true,
        } => Some(TaskError::KilledForMemory {
            code,
            limit_mib: memory_limit.map(|bytes| bytes >> 20),
            tail: tail(),
        }),
        ContainerExit { code: 137, .. } => Some(TaskError::Killed { tail: tail() }),
        ContainerExit { code, .. } => Some(TaskError::Exited { code, tail: tail() }),
    }
}

/// The task's containers; removed on every path. If the task's future is
/// dropped (a panic), `Drop` still removes them in the background.
pub(super) struct Containers {
    docker: DockerClient,
    pub(super) names: Vec<String>,
}

impl Containers {
    pub(super) fn new(docker: DockerClient) -> Self {
        Self {
            docker,
            names: Vec::new(),
        }
    }

    /// Lets go of them, running: the worker leaves them for its next
    /// start ([`crate::runner::CancelReason::Leave`]).
    pub(super) fn forget(&mut self) {
        self.names.clear();
    }

    pub(super) async fn remove_all(&mut self) {
        for name in std::mem::take(&mut self.names).iter().rev() {
            if let Err(error) = self.docker.kill_and_remove(name).await {
                metrics::global().docker_error();
                tracing::error!(%error, "could not remove a task container");
            }
        }
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        if self.names.is_empty() {
            return;
        }
        let docker = self.docker.clone();
        let names = std::mem::take(&mut self.names);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                for name in names.iter().rev() {
                    let _ = docker.kill_and_remove(name).await;
                }
            });
        }
    }
}

pub(super) struct ContainerRun {
    pub(super) exit: ContainerExit,
    pub(super) stdout: Tail,
    pub(super) stderr: Tail,
}

/// The last lines of a stream, bounded in count and length. Invalid UTF-8
/// becomes U+FFFD; a character split between two chunks is kept whole.
#[derive(Default)]
pub(super) struct Tail {
    lines: VecDeque<String>,
    partial: String,
    /// The start of a UTF-8 character the last chunk cut (at most 3 bytes).
    split_char: Vec<u8>,
}

impl Tail {
    pub(super) fn push(&mut self, bytes: &[u8]) {
        let mut joined = std::mem::take(&mut self.split_char);
        joined.extend_from_slice(bytes);
        let cut = complete_utf8_len(&joined);
        self.split_char = joined[cut..].to_vec();
        self.push_text(&String::from_utf8_lossy(&joined[..cut]));
    }

    fn push_text(&mut self, text: &str) {
        let mut parts = text.split('\n').peekable();
        while let Some(part) = parts.next() {
            if self.partial.len() < TAIL_LINE_MAX {
                let room = TAIL_LINE_MAX - self.partial.len();
                let cut = floor_char_boundary(part, room);
                self.partial.push_str(&part[..cut]);
            }
            if parts.peek().is_some() {
                self.end_line();
            }
        }
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.partial);
        self.lines.push_back(line.trim_end_matches('\r').to_owned());
        if self.lines.len() > TAIL_LINES {
            self.lines.pop_front();
        }
    }

    pub(super) fn finish(&mut self) {
        let rest = std::mem::take(&mut self.split_char);
        self.push_text(&String::from_utf8_lossy(&rest));
        if !self.partial.is_empty() {
            self.end_line();
        }
    }

    pub(super) fn joined(&self) -> String {
        self.lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// `bytes` without the unfinished UTF-8 character at its end, if any.
fn complete_utf8_len(bytes: &[u8]) -> usize {
    let tail_start = bytes.len().saturating_sub(3);
    for start in (tail_start..bytes.len()).rev() {
        if bytes[start] & 0xc0 != 0x80 {
            // The last character's first byte: cut only if it is incomplete.
            return match std::str::from_utf8(&bytes[start..]) {
                Err(e) if e.error_len().is_none() => start,
                _ => bytes.len(),
            };
        }
    }
    bytes.len()
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    if max >= s.len() {
        return s.len();
    }
    let mut i = max;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod proptests {
    use super::*;
    use crate::proptest_config::config;
    use proptest::prelude::*;

    /// Log chunks: random bytes (invalid UTF-8 too), ASCII with `\n` and
    /// `\r`, multi-byte text, and runs long enough to pass the line limit.
    fn chunk() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            ascii_chunk(),
            "[a-zé€🎉\n\r]{0,40}".prop_map(String::into_bytes),
            (any::<u8>(), 0..5000_usize).prop_map(|(b, n)| vec![b; n]),
        ]
    }

    fn ascii_chunk() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'\r'), b'a'..=b'z'], 0..64),
            (b'a'..=b'z', 0..5000_usize).prop_map(|(b, n)| vec![b; n]),
            (0..300_usize).prop_map(|n| b"l\n".repeat(n)),
        ]
    }

    /// What the tail of ASCII `input` must be.
    fn model(input: &[u8]) -> Vec<String> {
        let text = String::from_utf8(input.to_vec()).expect("ASCII");
        let mut parts: Vec<&str> = text.split('\n').collect();
        if parts.last() == Some(&"") {
            parts.pop();
        }
        let lines: Vec<String> = parts
            .iter()
            .map(|p| {
                p[..p.len().min(TAIL_LINE_MAX)]
                    .trim_end_matches('\r')
                    .to_owned()
            })
            .collect();
        lines[lines.len().saturating_sub(TAIL_LINES)..].to_vec()
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn tail_stays_bounded(chunks in proptest::collection::vec(chunk(), 0..12)) {
            let mut tail = Tail::default();
            for chunk in &chunks {
                tail.push(chunk);
                prop_assert!(tail.lines.len() <= TAIL_LINES);
                prop_assert!(tail.partial.len() <= TAIL_LINE_MAX);
            }
            tail.finish();
            prop_assert!(tail.lines.len() <= TAIL_LINES);
            for line in &tail.lines {
                prop_assert!(line.len() <= TAIL_LINE_MAX);
                prop_assert!(!line.contains('\n'));
            }
        }

        #[test]
        fn text_cut_anywhere_gives_the_same_tail(
            text in "[a-zé€🎉\n\r]{0,200}",
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let bytes = text.as_bytes();
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            at.sort_unstable();
            let (mut whole, mut pieces) = (Tail::default(), Tail::default());
            whole.push(bytes);
            whole.finish();
            let mut from = 0;
            for to in at.into_iter().chain([bytes.len()]) {
                pieces.push(&bytes[from..to]);
                from = to;
            }
            pieces.finish();
            prop_assert_eq!(&pieces.lines, &whole.lines);
            let clean = !pieces.joined().contains(char::REPLACEMENT_CHARACTER);
            prop_assert!(clean);
        }

        #[test]
        fn tail_of_ascii_is_its_last_lines(chunks in proptest::collection::vec(ascii_chunk(), 0..12)) {
            let mut tail = Tail::default();
            for chunk in &chunks {
                tail.push(chunk);
            }
            tail.finish();
            let lines: Vec<String> = tail.lines.iter().cloned().collect();
            prop_assert_eq!(lines, model(&chunks.concat()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_split_between_chunks_is_kept_whole() {
        let mut t = Tail::default();
        t.push("é€".as_bytes().split_at(1).0);
        t.push(&"é€".as_bytes()[1..4]);
        t.push(&"é€".as_bytes()[4..]);
        t.push(b"\xff\n\xe2\x82");
        t.finish();
        assert_eq!(t.joined(), "é€\u{fffd}\n\u{fffd}");
    }

    #[test]
    fn exit_failure_names_memory_and_sigkill() {
        let run = |code, oom_killed| ContainerRun {
            exit: ContainerExit { code, oom_killed },
            stdout: Tail::default(),
            stderr: Tail::default(),
        };
        let exit = |code, oom_killed, limit| {
            exit_failure(&run(code, oom_killed), limit).map(|e| e.message())
        };
        assert_eq!(exit(0, false, Some(16 << 20)), None);
        assert_eq!(exit(0, true, Some(16 << 20)), None);
        let oom = exit(137, true, Some(16 << 20)).unwrap();
        assert!(
            oom.contains("memory limit (CONTAINER_MEMORY_MB=16;"),
            "{oom}"
        );
        assert!(oom.contains("OOMKilled"), "{oom}");
        let oom_no_limit = exit(1, true, None).unwrap();
        assert!(
            oom_no_limit.contains("CONTAINER_MEMORY_MB is not set"),
            "{oom_no_limit}"
        );
        let killed = exit(137, false, Some(16 << 20)).unwrap();
        assert!(
            killed.contains("SIGKILL (exit code 137) from outside"),
            "{killed}"
        );
        assert_eq!(
            exit(3, false, None).unwrap(),
            "the offliner exited with code 3"
        );
    }

    #[test]
    fn exit_failure_carries_the_output_tails() {
        let mut run = ContainerRun {
            exit: ContainerExit {
                code: 2,
                oom_killed: false,
            },
            stdout: Tail::default(),
            stderr: Tail::default(),
        };
        run.stdout.push(b"out 1\nout 2\n");
        run.stderr.push(b"err 1\n");
        let error = exit_failure(&run, None).unwrap();
        // stderr first, then stdout: the end of each.
        assert_eq!(error.detail(), "err 1\nout 1\nout 2");
    }

    #[test]
    fn tail_keeps_last_lines_bounded() {
        let mut t = Tail::default();
        for i in 0..250 {
            t.push(format!("line {i}\n").as_bytes());
        }
        t.push(b"partial");
        t.push(b" end");
        t.finish();
        assert_eq!(t.lines.len(), TAIL_LINES);
        assert_eq!(t.lines.back().unwrap(), "partial end");
        assert_eq!(t.lines.front().unwrap(), "line 151");
        let mut t = Tail::default();
        t.push(&vec![b'x'; 10 * TAIL_LINE_MAX]);
        t.push(b"\n");
        assert_eq!(t.lines[0].len(), TAIL_LINE_MAX);
    }
}
