//! What a run of a task reports, in the domain's words: why it failed
//! ([`TaskError`]) and what its containers did ([`ContainerEvent`]).
//!
//! These types sit below both the runner seam ([`crate::runner`]) and
//! Celery's encoding ([`crate::celery`]): a runner builds them, and celery
//! alone says how they look on the wire (Python exception names in
//! `celery::result`, event fields in `celery::event`). This module must not
//! know that wire: no Python names, no JSON.

use std::path::PathBuf;

/// Why a task failed.
///
/// [`TaskError::message`] is the exception's message (its `Display`) and
/// [`TaskError::detail`] what the `traceback` field carries (a log tail,
/// where the files were kept...).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TaskError {
    /// The task's parameters make no plan (unregistered name, image not
    /// allowed, bad flags...): refused before anything ran.
    #[error("{reason}")]
    Refused { reason: String },
    /// The offliner exited with a code other than 0; `tail` is the end of
    /// its stderr then stdout.
    #[error("the offliner exited with code {code}")]
    Exited { code: i64, tail: String },
    /// Docker reports the offliner OOMKilled. `limit_mib`: the
    /// CONTAINER_MEMORY_MB it ran under, when set.
    #[error("{}", memory_message(*.code, *.limit_mib))]
    KilledForMemory {
        code: i64,
        limit_mib: Option<i64>,
        tail: String,
    },
    /// Exit code 137 without OOMKilled: a SIGKILL from outside the worker.
    #[error(
        "the offliner was killed by SIGKILL (exit code 137) from outside the worker \
         (docker kill, or the host's OOM killer: see dmesg); Docker does not report \
         OOMKilled, so it was not CONTAINER_MEMORY_MB"
    )]
    Killed { tail: String },
    /// The offliner exited with code 0 but nothing is in the task dir
    /// (`dir` here, `host_dir` on the host).
    #[error("the offliner exited with code 0 but wrote no file")]
    NoOutput { dir: PathBuf, host_dir: PathBuf },
    /// The upload to the warehouse failed for good; the files are kept in
    /// `kept_in` (the host's path of the task dir).
    #[error("upload to the warehouse failed: {error}")]
    UploadFailed { error: String, kept_in: PathBuf },
    /// The task ran past its hard time limit (seconds).
    #[error("{hard}")]
    TimeLimit { hard: f64 },
    /// ZIM_DIR's disk filled up during the scrape, which failed with
    /// `cause`. Free space in MiB now (`unknown` when unreadable) and at
    /// the start.
    #[error(
        "the disk of ZIM_DIR filled up during the scrape ({free_mib_now} MiB free now, \
         {free_mib_at_start} MiB at the start); give ZIM_DIR more space or run fewer \
         tasks at once ({cause})"
    )]
    DiskFilled {
        free_mib_now: String,
        free_mib_at_start: u64,
        cause: Box<TaskError>,
    },
    /// Any other failure, said in words.
    #[error("{0}")]
    Runtime(String),
}

impl TaskError {
    /// A plain failure.
    pub fn runtime(message: impl Into<String>) -> Self {
        Self::Runtime(message.into())
    }

    /// The exception's message.
    pub fn message(&self) -> String {
        self.to_string()
    }

    /// What the `traceback` field carries.
    pub fn detail(&self) -> String {
        match self {
            Self::Refused { .. } => "the task was refused before anything ran".to_owned(),
            Self::Exited { tail, .. }
            | Self::KilledForMemory { tail, .. }
            | Self::Killed { tail } => tail.clone(),
            Self::NoOutput { dir, host_dir } => format!(
                "nothing in {} (the host's {}); if WORKING_DIR is not the host path of the \
                 directory mounted at ZIM_DIR, the offliner's files went to another place \
                 on the host",
                dir.display(),
                host_dir.display()
            ),
            Self::UploadFailed { kept_in, .. } => format!(
                "the generated files are kept in {} on the worker host",
                kept_in.display()
            ),
            Self::TimeLimit { hard } => {
                format!("the task ran past its hard time limit of {hard} s")
            }
            Self::DiskFilled { cause, .. } => cause.detail(),
            Self::Runtime(message) => message.clone(),
        }
    }
}

/// The message of [`TaskError::KilledForMemory`].
fn memory_message(code: i64, limit_mib: Option<i64>) -> String {
    match limit_mib {
        Some(mib) => format!(
            "the offliner was killed for using more than its memory limit \
             (CONTAINER_MEMORY_MB={mib}; Docker reports OOMKilled, exit code {code}) \
             — raise CONTAINER_MEMORY_MB or give the task less to do"
        ),
        None => format!(
            "the offliner was killed for memory (Docker reports OOMKilled, exit code \
             {code}) although CONTAINER_MEMORY_MB is not set: the host (or the cgroup \
             Docker runs in) ran out of memory — run fewer tasks at once (CONCURRENCY) \
             or give the host more memory"
        ),
    }
}

/// What a task's offliner container did, as its own task events report it.
#[derive(Debug, Clone, PartialEq)]
pub enum ContainerEvent {
    /// The offliner started: its image and command line.
    Started { image: String, command: String },
    /// The offliner exited: its code, the tails of its output and the
    /// name of its log file in the task dir.
    Finished {
        exit_code: i64,
        stdout: String,
        stderr: String,
        log: String,
    },
    /// The offliner printed nothing for `timeout_s` (IDLE_TIMEOUT) and was
    /// killed.
    Killed { timeout_s: u64 },
}
