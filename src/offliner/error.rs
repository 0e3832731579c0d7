//! [`PlanError`]: why a task can't be turned into a [`super::TaskPlan`].
//!
//! Owns the error's variants and their texts (untrusted values quoted
//! short). It must not decide which check runs first (`plan` does).

use serde_json::Value;

/// Longest untrusted value quoted back in an error message, in characters.
const MAX_SHOWN_CHARS: usize = 80;

/// Why a task, an image reference or an allow-list was refused.
///
/// Every message names the offending value and the rule it breaks. Values
/// quoted from the task are cut to 80 characters (an ellipsis marks the
/// cut) so a hostile message can't flood the logs; strings are shown with
/// Rust's `{:?}` escaping, JSON values as compact JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "task id {id:?} is not valid: a task id must be 1 to 64 characters of \
         A-Z, a-z, 0-9, '_' and '-', because it names the task's directory and \
         containers; the dispatcher must send such an id"
    )]
    InvalidTaskId { id: String },

    #[error(
        "task {name:?} is not registered on this worker: expected one of \
         offliner.mwoffliner, offliner.youtube, offliner.gutenberg, offliner.phet"
    )]
    UnknownTask { name: String },

    #[error(
        "the task has {count} positional arguments but takes at most 3 \
         (flags, image, warehouse_path): pass parameters by name in kwargs instead"
    )]
    TooManyArgs { count: usize },

    #[error(
        "parameter `{name}` is given both by name in kwargs and as positional \
         argument {position}: pass it only once"
    )]
    GivenTwice { name: &'static str, position: usize },

    #[error(
        "the task mixes the older `offliner` = {{\"image_tag\", \"flags\"}} parameter \
         with the newer `{newer}` parameter: send one form or the other"
    )]
    MixedForms { newer: &'static str },

    #[error("parameter `{parameter}` must be {expected}, but it is {found}: {value}")]
    WrongType {
        /// Where the value is, e.g. `image.tag` or `offliner.flags`.
        parameter: &'static str,
        expected: &'static str,
        found: &'static str,
        /// The value as compact JSON, possibly cut.
        value: String,
    },

    #[error(
        "the task has no `warehouse_path` parameter: pass the warehouse directory \
         (e.g. \"/wikipedia\") by name in kwargs or as the third positional argument"
    )]
    MissingWarehousePath,

    #[error("warehouse_path {path:?} is not valid: {reason}")]
    InvalidWarehousePath { path: String, reason: String },

    #[error("image name {name:?} is not valid: {reason}")]
    InvalidImageName { name: String, reason: String },

    #[error("image tag {tag:?} is not valid: {reason}")]
    InvalidImageTag { tag: String, reason: String },

    #[error(
        "image {image:?} is pinned by digest ('@'), which this worker does not \
         support: pin it by tag instead, e.g. \"openzim/mwoffliner:1.9\""
    )]
    ImageDigest { image: String },

    #[error(
        "image {image:?} is not {task}'s own image ({own}) and this worker's \
         IMAGE_ALLOWLIST {allow_list:?} does not allow it for {task}: to run it, \
         add \"{task}=PATTERN\" (this task) or \"PATTERN\" (every task) to the \
         comma-separated IMAGE_ALLOWLIST, PATTERN matching its name (e.g. \
         \"{task}=myorg/*\"; '*' matches within one path segment, '**' across \
         segments)"
    )]
    ImageNotAllowed {
        image: String,
        task: &'static str,
        own: &'static str,
        allow_list: String,
    },

    #[error(
        "image allow-list {spec:?} has no entry: set IMAGE_ALLOWLIST to \
         comma-separated entries TASK=PATTERN or PATTERN, e.g. \
         \"offliner.youtube=myorg/*\", or unset it (each task runs its own image)"
    )]
    EmptyAllowList { spec: String },

    #[error("image allow-list pattern {pattern:?} is not valid: {reason}; fix IMAGE_ALLOWLIST")]
    InvalidAllowPattern { pattern: String, reason: String },

    #[error(
        "flag name {key:?} is not valid: a flag name must be 1 to 64 characters of \
         A-Z, a-z, 0-9, '_' and '-', starting with a letter or digit; fix the \
         task's flags at the dispatcher"
    )]
    InvalidFlagName { key: String },

    #[error(
        "flag {key:?} has {found} as value ({value}), which can't be a \
         command-line argument: use true, false, null, a string, a number or a \
         list of strings, numbers and booleans"
    )]
    UnsupportedFlagValue {
        key: String,
        found: &'static str,
        /// The value as compact JSON, possibly cut.
        value: String,
    },

    #[error(
        "flag {key:?} has a value containing a NUL character ({value:?}), which \
         can't be passed as a command-line argument: remove it from the flag"
    )]
    FlagValueHasNul { key: String, value: String },

    #[error(
        "flag {key:?} is set by the worker itself for {task} and can't be given \
         in the task's flags: remove it from the task's flags"
    )]
    ReservedFlag { key: String, task: &'static str },

    #[error(
        "redis URL {url:?} is not valid: it must be non-empty and free of control \
         characters (this is the worker's own value, not the task's)"
    )]
    InvalidRedisUrl { url: String },
}

/// `s`, cut to [`MAX_SHOWN_CHARS`] characters with an ellipsis, for quoting
/// an untrusted string in an error.
pub(crate) fn shown(s: &str) -> String {
    let mut chars = s.chars();
    let mut head: String = chars.by_ref().take(MAX_SHOWN_CHARS).collect();
    if chars.next().is_some() {
        head.push('…');
    }
    head
}

/// A JSON value as compact JSON, cut like [`shown`].
pub(crate) fn shown_json(value: &Value) -> String {
    shown(&value.to_string())
}

/// What kind of JSON value this is, for "but it is ..." in messages.
pub(crate) fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_keeps_short_values_and_cuts_long_ones() {
        assert_eq!(shown("abc"), "abc");
        let exact = "é".repeat(MAX_SHOWN_CHARS);
        assert_eq!(shown(&exact), exact);
        let long = "x".repeat(MAX_SHOWN_CHARS + 1);
        assert_eq!(shown(&long), format!("{}…", "x".repeat(MAX_SHOWN_CHARS)));
    }

    #[test]
    fn messages_escape_the_offending_value() {
        let err = PlanError::InvalidTaskId {
            id: "a\nb\"c".into(),
        };
        let text = err.to_string();
        assert!(text.contains(r#""a\nb\"c""#), "{text}");
        assert!(!text.contains('\n'));
    }
}
