//! `rpc://` task results and Python-style exceptions, and the one place a
//! task's failure ([`TaskError`]) becomes a Python exception class.
//!
//! Celery 5's RPC backend publishes a task's final state to the sender's
//! `reply_to` queue (default exchange, routing key = `reply_to`) with
//! `correlation_id` = task id, as JSON:
//! `{"status", "result", "traceback", "children", "date_done", "task_id"}`.
//! For `FAILURE` and `REVOKED` the result is the serialized exception
//! `{"exc_type", "exc_message": [args...], "exc_module"}` that the client's
//! `exception_to_python` turns back into an exception: the module must be
//! one the client has imported (`builtins`, `celery.exceptions`) and the
//! type an exception class in it, or the client raises a generic one.
//!
//! Owns the result's JSON and the exception names. It must not publish (the
//! outbox does) nor decide how a task ended (the worker's `conclusion`
//! does).

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::types::ShortString;
use serde_json::{Value, json};

use super::iso8601;
use super::repr::repr_str;
use crate::report::TaskError;

/// A task's final state, as reported to an `rpc://` result backend.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskState {
    /// The return value.
    Success(Value),
    Failure(ExceptionInfo),
    /// Revoked before or while running; `reason` is Celery's wording:
    /// `revoked`, `terminated` or `expired`.
    Revoked {
        reason: String,
    },
}

/// A Python exception: class name, module, message and traceback text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExceptionInfo {
    /// The class name, e.g. `RuntimeError`.
    pub exc_type: String,
    /// The module defining it, e.g. `builtins`.
    pub exc_module: String,
    pub message: String,
    pub traceback: String,
}

impl ExceptionInfo {
    /// A `builtins.RuntimeError` with this message, the usual failure.
    pub fn runtime_error(message: impl Into<String>, traceback: impl Into<String>) -> Self {
        Self {
            exc_type: "RuntimeError".to_owned(),
            exc_module: "builtins".to_owned(),
            message: message.into(),
            traceback: traceback.into(),
        }
    }

    /// Python's `repr()` of the exception, e.g. `RuntimeError('boom')`, for
    /// `task-failed`'s `exception` field.
    pub fn repr(&self) -> String {
        format!("{}({})", self.exc_type, repr_str(&self.message))
    }

    /// The serialized form Celery's `prepare_exception` makes for JSON.
    pub fn to_celery_json(&self) -> Value {
        json!({
            "exc_type": self.exc_type,
            "exc_message": [self.message],
            "exc_module": self.exc_module,
        })
    }
}

/// The one place a task's failure gets its Python exception: the class
/// and module clients see, the message, and the `traceback` text.
impl From<&TaskError> for ExceptionInfo {
    fn from(error: &TaskError) -> Self {
        let (exc_type, exc_module) = python_exception(error);
        Self {
            exc_type: exc_type.to_owned(),
            exc_module: exc_module.to_owned(),
            message: error.message(),
            traceback: error.detail(),
        }
    }
}

/// The Python class (and its module) a failure is reported as: a refusal
/// is a `ValueError`, the hard time limit Celery's own `TimeLimitExceeded`,
/// a full disk what the scrape failed with, and the rest `RuntimeError`.
fn python_exception(error: &TaskError) -> (&'static str, &'static str) {
    match error {
        TaskError::Refused { .. } => ("ValueError", "builtins"),
        TaskError::TimeLimit { .. } => ("TimeLimitExceeded", "celery.exceptions"),
        TaskError::DiskFilled { cause, .. } => python_exception(cause),
        TaskError::Exited { .. }
        | TaskError::KilledForMemory { .. }
        | TaskError::Killed { .. }
        | TaskError::NoOutput { .. }
        | TaskError::UploadFailed { .. }
        | TaskError::Runtime(_) => ("RuntimeError", "builtins"),
    }
}

impl TaskState {
    /// Celery's state name: `SUCCESS`, `FAILURE` or `REVOKED`.
    pub fn status(&self) -> &'static str {
        match self {
            Self::Success(_) => "SUCCESS",
            Self::Failure(_) => "FAILURE",
            Self::Revoked { .. } => "REVOKED",
        }
    }
}

/// The body and properties of the `rpc://` result message for `task_id`.
///
/// The properties carry `correlation_id` = `task_id`; an id longer than an
/// AMQP short string (255 bytes) can't be carried and is left out there (the
/// body still has it).
pub fn encode_rpc_result(
    task_id: &str,
    state: &TaskState,
    date_done: DateTime<Utc>,
) -> (Vec<u8>, BasicProperties) {
    let (result, traceback) = match state {
        TaskState::Success(value) => (value.clone(), Value::Null),
        TaskState::Failure(info) => (info.to_celery_json(), json!(info.traceback)),
        TaskState::Revoked { reason } => (
            json!({
                "exc_type": "TaskRevokedError",
                "exc_message": [reason],
                "exc_module": "celery.exceptions",
            }),
            Value::Null,
        ),
    };
    let body = json!({
        "status": state.status(),
        "result": result,
        "traceback": traceback,
        "children": [],
        "date_done": iso8601::format(&date_done),
        "task_id": task_id,
    });
    let mut properties = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_content_encoding(ShortString::from("utf-8"))
        .with_delivery_mode(1);
    if let Ok(id) = ShortString::try_new(task_id) {
        properties = properties.with_correlation_id(id);
    }
    // Serializing a `Value` can't fail: object keys are strings.
    (serde_json::to_vec(&body).unwrap_or_default(), properties)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Properties every JSON message of this worker carries (results and
    /// events alike).
    pub(in crate::celery) fn assert_json_properties(props: &BasicProperties) {
        assert_eq!(
            props.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(
            props.content_encoding().as_ref().map(|s| s.as_str()),
            Some("utf-8")
        );
        assert_eq!(*props.delivery_mode(), Some(1));
    }

    fn date() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2024-05-01T12:00:00.5Z")
            .expect("valid fixture")
            .with_timezone(&Utc)
    }

    fn decode(body: &[u8]) -> Value {
        serde_json::from_slice(body).expect("result body is JSON")
    }

    #[test]
    fn success() {
        let files = json!([{"name": "x.zim", "size": 123}]);
        let (body, props) = encode_rpc_result("abc", &TaskState::Success(files.clone()), date());
        assert_eq!(
            decode(&body),
            json!({
                "status": "SUCCESS", "result": files, "traceback": null, "children": [],
                "date_done": "2024-05-01T12:00:00.500000+00:00", "task_id": "abc",
            })
        );
        assert_eq!(
            props.correlation_id().as_ref().map(|s| s.as_str()),
            Some("abc")
        );
        assert_json_properties(&props);
    }

    #[test]
    fn failure() {
        let info = ExceptionInfo::runtime_error("container exited with 1", "Traceback: ...");
        let (body, _) = encode_rpc_result("abc", &TaskState::Failure(info), date());
        assert_eq!(
            decode(&body),
            json!({
                "status": "FAILURE",
                "result": {
                    "exc_type": "RuntimeError",
                    "exc_message": ["container exited with 1"],
                    "exc_module": "builtins",
                },
                "traceback": "Traceback: ...", "children": [],
                "date_done": "2024-05-01T12:00:00.500000+00:00", "task_id": "abc",
            })
        );
    }

    #[test]
    fn revoked() {
        let state = TaskState::Revoked {
            reason: "terminated".into(),
        };
        let (body, _) = encode_rpc_result("abc", &state, date());
        assert_eq!(
            decode(&body),
            json!({
                "status": "REVOKED",
                "result": {
                    "exc_type": "TaskRevokedError",
                    "exc_message": ["terminated"],
                    "exc_module": "celery.exceptions",
                },
                "traceback": null, "children": [],
                "date_done": "2024-05-01T12:00:00.500000+00:00", "task_id": "abc",
            })
        );
    }

    #[test]
    fn long_id_is_left_out_of_properties() {
        let id = "x".repeat(300);
        let (body, props) = encode_rpc_result(&id, &TaskState::Success(Value::Null), date());
        assert_eq!(props.correlation_id(), &None);
        assert_eq!(decode(&body)["task_id"], json!(id));
    }

    #[test]
    fn exception_repr() {
        let info = ExceptionInfo::runtime_error("it's \"bad\"\n", "");
        assert_eq!(info.repr(), "RuntimeError('it\\'s \"bad\"\\n')");
        let info = ExceptionInfo::runtime_error("can't", "");
        assert_eq!(info.repr(), "RuntimeError(\"can't\")");
    }

    #[test]
    fn task_errors_as_python_exceptions() {
        let refused = TaskError::Refused {
            reason: "no such task".to_owned(),
        };
        let info = ExceptionInfo::from(&refused);
        assert_eq!(
            (info.exc_type.as_str(), info.exc_module.as_str()),
            ("ValueError", "builtins")
        );
        assert_eq!(info.traceback, "the task was refused before anything ran");
        let info = ExceptionInfo::from(&TaskError::TimeLimit { hard: 2.5 });
        assert_eq!(info.repr(), "TimeLimitExceeded('2.5')");
        assert_eq!(info.exc_module, "celery.exceptions");
        let full = TaskError::DiskFilled {
            free_mib_now: "0".to_owned(),
            free_mib_at_start: 9,
            cause: Box::new(refused),
        };
        assert_eq!(ExceptionInfo::from(&full).exc_type, "ValueError");
        let info = ExceptionInfo::from(&TaskError::runtime("boom"));
        assert_eq!(info, ExceptionInfo::runtime_error("boom", "boom"));
    }
}
