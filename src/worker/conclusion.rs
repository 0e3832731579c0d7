//! How a run's outcome becomes the task's end, decided apart from acting on
//! it: a pure function of the outcome, of why the task was cancelled (when
//! it was) and of its runtime, so that every case is one line of a table
//! test. [`super::task`] records, reports and acks what it says.
//!
//! Owns the mapping of outcomes to Celery's final events and `rpc://`
//! states only; it touches nothing.

use serde_json::Value;

use crate::celery::{EventKind, ExceptionInfo, TaskState, to_repr};
use crate::metrics::Outcome;
use crate::runner::{CancelReason, RunError, TaskError, TaskFile};

/// How a task ended: the final event and `rpc://` state reported, and
/// the outcome counted.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Ending {
    pub event: EventKind,
    pub state: TaskState,
    pub outcome: Outcome,
}

/// Concludes task `id` from how its run ended (`outcome`), why it was
/// cancelled (`reason`, when it was) and how long it ran (`runtime`, s).
/// `None`: stopped by shutdown, or dropped when its message went back with
/// its session before it started, so nothing is reported and a node runs
/// it again; or taken over by another node (it runs there).
pub(super) fn conclude(
    id: &str,
    outcome: &Result<Vec<TaskFile>, RunError>,
    reason: Option<CancelReason>,
    runtime: f64,
) -> Option<Ending> {
    let (event, state) = match outcome {
        Ok(files) => {
            let value = serde_json::to_value(files).unwrap_or(Value::Null);
            (
                EventKind::TaskSucceeded {
                    uuid: id.to_owned(),
                    result: to_repr(&value),
                    runtime,
                },
                TaskState::Success(value),
            )
        }
        Err(RunError::Failed(error)) => failure(id, error.clone()),
        Err(RunError::Cancelled) => match reason {
            Some(CancelReason::Revoked { terminated, signum }) => (
                EventKind::TaskRevoked {
                    uuid: id.to_owned(),
                    terminated,
                    signum,
                    expired: false,
                },
                TaskState::Revoked {
                    reason: "revoked".to_owned(),
                },
            ),
            Some(CancelReason::TimeLimit { hard }) => failure(id, TaskError::TimeLimit { hard }),
            Some(
                CancelReason::Shutdown
                | CancelReason::Leave
                | CancelReason::MessageReturned
                | CancelReason::TakenOver,
            )
            | None => return None,
        },
    };
    let outcome = match event {
        EventKind::TaskSucceeded { .. } => Outcome::Succeeded,
        EventKind::TaskRevoked { .. } => Outcome::Revoked,
        _ => Outcome::Failed,
    };
    Some(Ending {
        event,
        state,
        outcome,
    })
}

/// A failed task's final event and `rpc://` state.
fn failure(id: &str, error: TaskError) -> (EventKind, TaskState) {
    let info = ExceptionInfo::from(&error);
    (
        EventKind::TaskFailed {
            uuid: id.to_owned(),
            exception: info.repr(),
            traceback: info.traceback.clone(),
        },
        TaskState::Failure(info),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ID: &str = "6f1c9a0b2d3e4f5a6b7c8d9e";

    fn exited() -> TaskError {
        TaskError::Exited {
            code: 1,
            tail: "the log's tail".to_owned(),
        }
    }

    /// One line of the table: a case, the run's outcome, the cancel
    /// reason, and the ending expected.
    type Case = (
        &'static str,
        Result<Vec<TaskFile>, RunError>,
        Option<CancelReason>,
        Option<Ending>,
    );

    fn failed(kind: &str, module: &str, message: &str, detail: &str) -> Option<Ending> {
        let info = ExceptionInfo {
            exc_type: kind.to_owned(),
            exc_module: module.to_owned(),
            message: message.to_owned(),
            traceback: detail.to_owned(),
        };
        Some(Ending {
            event: EventKind::TaskFailed {
                uuid: ID.to_owned(),
                exception: info.repr(),
                traceback: detail.to_owned(),
            },
            state: TaskState::Failure(info),
            outcome: Outcome::Failed,
        })
    }

    fn revoked(terminated: bool, signum: Option<i32>) -> Option<Ending> {
        Some(Ending {
            event: EventKind::TaskRevoked {
                uuid: ID.to_owned(),
                terminated,
                signum,
                expired: false,
            },
            state: TaskState::Revoked {
                reason: "revoked".to_owned(),
            },
            outcome: Outcome::Revoked,
        })
    }

    #[test]
    fn each_outcome_and_reason() {
        let files = vec![TaskFile {
            name: "wikipedia_en_all.zim".to_owned(),
            size: 7,
        }];
        let value = json!([{"name": "wikipedia_en_all.zim", "size": 7}]);
        let succeeded = Some(Ending {
            event: EventKind::TaskSucceeded {
                uuid: ID.to_owned(),
                result: to_repr(&value),
                runtime: 12.5,
            },
            state: TaskState::Success(value),
            outcome: Outcome::Succeeded,
        });
        let revoke = |terminated, signum| Some(CancelReason::Revoked { terminated, signum });
        let limit = Some(CancelReason::TimeLimit { hard: 60.0 });
        #[rustfmt::skip]
        let table: Vec<Case> = vec![
            ("success, its files as the result", Ok(files.clone()), None, succeeded.clone()),
            ("a success outlives a late cancel", Ok(files), revoke(true, Some(9)), succeeded),
            ("a failure, as the runner said it", Err(RunError::Failed(exited())), None,
                failed("RuntimeError", "builtins", "the offliner exited with code 1", "the log's tail")),
            ("a failure outlives a late cancel", Err(RunError::Failed(TaskError::Refused { reason: "it broke".to_owned() })), limit,
                failed("ValueError", "builtins", "it broke", "the task was refused before anything ran")),
            ("revoked while held", Err(RunError::Cancelled), revoke(false, None), revoked(false, None)),
            ("terminated while running", Err(RunError::Cancelled), revoke(true, Some(15)), revoked(true, Some(15))),
            ("past its hard time limit", Err(RunError::Cancelled), limit,
                failed("TimeLimitExceeded", "celery.exceptions", "60", "the task ran past its hard time limit of 60 s")),
            ("stopped by shutdown", Err(RunError::Cancelled), Some(CancelReason::Shutdown), None),
            ("dropped, its message gone with its session", Err(RunError::Cancelled), Some(CancelReason::MessageReturned), None),
            ("taken over by another node", Err(RunError::Cancelled), Some(CancelReason::TakenOver), None),
            ("cancelled for no known reason", Err(RunError::Cancelled), None, None),
        ];
        for (case, outcome, reason, expected) in table {
            assert_eq!(conclude(ID, &outcome, reason, 12.5), expected, "{case}");
        }
    }
}
