//! The Celery wire format: decoding task messages (protocol v1 and v2),
//! encoding events, `rpc://` results and Python `repr` strings.
//!
//! Owns bytes-in, bytes-out conversions only; it never opens a connection.
//!
//! - [`task`]: task messages (protocol v1 and v2), and `run-task`'s JSON,
//!   → [`TaskRequest`];
//! - [`task_id`]: the rule of task ids, checked at decode, and how a
//!   refused one may be shown;
//! - [`event`]: worker and task events for the `celeryev` exchange;
//! - [`result`]: `rpc://` results and Python-style exceptions;
//! - [`control`]: pidbox requests and replies;
//! - [`repr`]: Python `repr` of JSON values, as `ast.literal_eval` reads it
//!   (`printable`: the characters it escapes, generated from Python);
//! - [`iso8601`]: the date-time strings Celery reads and writes;
//! - `log_text`: message-supplied strings escaped and cut for log fields.

pub mod control;
pub mod event;
pub mod iso8601;
mod log_text;
mod printable;
pub mod repr;
pub mod result;
pub mod task;
pub mod task_id;

pub use control::{
    ControlDecodeError, ControlRequest, ReplyTo, decode_control, encode_control_reply,
};
pub use event::{
    EncodedEvent, EventKind, Identity, LamportClock, MAX_LISTED_TASKS, WorkerStats, encode_event,
    event_properties, now_timestamp, utcoffset_now,
};
pub use log_text::{LogText, MAX_LOG_CHARS, log_text};
pub use repr::{repr_str, to_repr};
pub use result::{ExceptionInfo, TaskState, encode_rpc_result};
pub use task::{
    DecodeError, DecodeErrorKind, Peek, Protocol, TaskRequest, TimeLimit, decode, headers_only,
    peek, request_from_json,
};
