//! The rule of task ids (SPEC §3), checked as a message is decoded, before
//! any log line, span, event or record gets the id: 1 to
//! [`MAX_TASK_ID_LEN`] characters of `A-Z a-z 0-9 _ -` (the dispatcher
//! sends 24 hex characters, Celery's own ids are 36-character UUIDs). The
//! id names a directory and a container, so nothing else passes.
//!
//! Also how an id that broke the rule may still be shown: in a `task-failed`
//! event only when it is short and printable ([`reportable`]), in a log line
//! always escaped and cut ([`shown`]).
//!
//! Owns these rules only; what becomes of a refused message is the
//! worker's business.

use std::fmt;

/// Longest task id, in characters (all ASCII, so in bytes too).
pub const MAX_TASK_ID_LEN: usize = 64;

/// Longest refused id still sent back in a `task-failed` event, in bytes.
pub const MAX_REPORTED_ID_LEN: usize = 2 * MAX_TASK_ID_LEN;

/// Characters of an untrusted id shown in a log line before it is cut.
const MAX_SHOWN_CHARS: usize = 80;

/// Why a task id is refused. Names no more of the id than its length and
/// its first bad character, escaped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskIdError {
    #[error("a task id must not be empty")]
    Empty,
    #[error("a task id has at most {MAX_TASK_ID_LEN} characters, this one has {0} bytes")]
    TooLong(usize),
    #[error(
        "a task id has only the characters A-Z a-z 0-9 _ -, this one has {found:?} at byte {at}"
    )]
    BadCharacter { at: usize, found: char },
}

/// Checks `id` against the rule of task ids.
pub fn check(id: &str) -> Result<(), TaskIdError> {
    if id.is_empty() {
        return Err(TaskIdError::Empty);
    }
    if id.len() > MAX_TASK_ID_LEN {
        return Err(TaskIdError::TooLong(id.len()));
    }
    match id
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        Some((at, found)) => Err(TaskIdError::BadCharacter { at, found }),
        None => Ok(()),
    }
}

/// Whether a refused id may still be named in its `task-failed` event (so
/// the dispatcher learns what became of it): at most
/// [`MAX_REPORTED_ID_LEN`] bytes of printable ASCII, no space.
pub fn reportable(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_REPORTED_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic())
}

/// An untrusted id as a log line may show it: quoted, escaped (no newline
/// can forge a line), cut after [`MAX_SHOWN_CHARS`] characters with the
/// length of the whole.
pub fn shown(id: &str) -> Shown<'_> {
    Shown(id)
}

/// See [`shown`].
#[derive(Clone, Copy)]
pub struct Shown<'a>(&'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = self.0;
        match id.char_indices().nth(MAX_SHOWN_CHARS) {
            None => write!(f, "{id:?}"),
            Some((cut, _)) => write!(f, "{:?}… ({} bytes)", &id[..cut], id.len()),
        }
    }
}

impl fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_rule() {
        for good in [
            "6f1c9a0b2d3e4f5a6b7c8d9e",
            "0b6c1a0e-6f1d-4a0b-9c57-7d8f1f2b3c4d",
            "a",
            "A_b-9",
            &"x".repeat(64),
        ] {
            assert_eq!(check(good), Ok(()), "{good:?}");
        }
        assert_eq!(check(""), Err(TaskIdError::Empty));
        assert_eq!(check(&"x".repeat(65)), Err(TaskIdError::TooLong(65)));
        assert_eq!(
            check("../etc"),
            Err(TaskIdError::BadCharacter { at: 0, found: '.' })
        );
        assert_eq!(
            check("ab\ncd"),
            Err(TaskIdError::BadCharacter { at: 2, found: '\n' })
        );
        assert_eq!(
            check("tâche"),
            Err(TaskIdError::BadCharacter { at: 1, found: 'â' })
        );
        let text = check("a\nb").unwrap_err().to_string();
        assert!(text.contains("'\\n'"), "{text}");
    }

    #[test]
    fn reportable_ids_are_short_and_printable() {
        assert!(reportable("6f1c9a0b2d3e4f5a6b7c8d9e"));
        assert!(reportable("../etc/passwd"));
        assert!(reportable(&"x".repeat(MAX_REPORTED_ID_LEN)));
        assert!(!reportable(&"x".repeat(MAX_REPORTED_ID_LEN + 1)));
        assert!(!reportable(""));
        assert!(!reportable("a b"));
        assert!(!reportable("a\nb"));
        assert!(!reportable("tâche"));
    }

    #[test]
    fn shown_ids_are_escaped_and_cut() {
        assert_eq!(shown("abc").to_string(), "\"abc\"");
        assert_eq!(shown("a\nb").to_string(), "\"a\\nb\"");
        let long = "é".repeat(100_000);
        let text = shown(&long).to_string();
        assert!(
            text.starts_with(&format!("\"{}\"…", "é".repeat(80))),
            "{text}"
        );
        assert!(text.ends_with("(200000 bytes)"), "{text}");
    }

    proptest! {
        #![proptest_config(crate::proptest_config::config())]

        /// An accepted id is a safe path component and container-name
        /// part: short, ASCII, no separator, no dot, no control.
        #[test]
        fn accepted_ids_are_safe_names(id in prop_oneof![
            crate::proptest_config::text(),
            "[A-Za-z0-9_-]{0,70}",
            ".{0,200}",
        ]) {
            let accepted = check(&id).is_ok();
            let safe = (1..=MAX_TASK_ID_LEN).contains(&id.len())
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            prop_assert_eq!(accepted, safe);
            prop_assert_eq!(
                accepted,
                crate::offliner::validate_task_id(&id).is_ok(),
                "the planner's check and decode's agree"
            );
            if accepted {
                prop_assert!(reportable(&id));
                prop_assert_eq!(shown(&id).to_string(), format!("{id:?}"));
            }
        }

        /// Whatever the id, what a log line shows of it is one line of
        /// bounded length, and a refusal's text is bounded too.
        #[test]
        fn shown_ids_are_one_bounded_line(id in prop_oneof![
            crate::proptest_config::text(),
            ".{0,2000}",
            any::<String>(),
        ]) {
            let text = shown(&id).to_string();
            prop_assert!(!text.contains('\n') && !text.contains('\r'));
            // 80 characters, each escaped to at most 10 (`\u{10ffff}`),
            // quotes, the ellipsis and the length.
            prop_assert!(text.len() <= 80 * 10 + 40, "{} bytes", text.len());
            if let Err(error) = check(&id) {
                let text = error.to_string();
                prop_assert!(text.len() < 200 && !text.contains('\n'), "{}", text);
            }
        }
    }
}
