//! Strings a message supplied (task names, node names, pidbox methods and
//! destinations, queue names), made safe for a log field: a newline or
//! another control character in them would otherwise start a forged log
//! line in the text format, and a long one would fill every line.
//!
//! [`log_text`] escapes what Python's `str.isprintable()` rejects (the
//! same table as [`super::repr`]) and the backslash, and cuts the text at
//! [`MAX_LOG_CHARS`] characters, saying how many bytes were left out.
//!
//! Owns that rendering only; the JSON log format escapes by itself, this
//! keeps the text format one line per event too.

use std::fmt::{self, Write as _};

use super::repr::is_printable;

/// Characters of a message-supplied string shown in a log field.
pub const MAX_LOG_CHARS: usize = 200;

/// `s`, escaped and cut for a log field (`%log_text(&name)`).
pub fn log_text(s: &str) -> LogText<'_> {
    LogText(s)
}

/// See [`log_text`].
#[derive(Debug, Clone, Copy)]
pub struct LogText<'a>(&'a str);

impl fmt::Display for LogText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shown, (index, c)) in self.0.char_indices().enumerate() {
            if shown == MAX_LOG_CHARS {
                return write!(f, "…(+{} bytes)", self.0.len() - index);
            }
            match c {
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if is_printable(c) => f.write_char(c)?,
                c => match u32::from(c) {
                    cp @ 0..=0xff => write!(f, "\\x{cp:02x}")?,
                    cp @ 0..=0xffff => write!(f, "\\u{cp:04x}")?,
                    cp => write!(f, "\\U{cp:08x}")?,
                },
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proptest_config::config;
    use proptest::prelude::*;

    #[test]
    fn plain_text_is_kept() {
        assert_eq!(
            log_text("offliner.mwoffliner").to_string(),
            "offliner.mwoffliner"
        );
        assert_eq!(log_text("élan — 日本").to_string(), "élan — 日本");
    }

    #[test]
    fn controls_and_backslashes_are_escaped() {
        let forged = "x\n2026-01-01T00:00:00Z  INFO task succeeded\r\t\u{1b}[31m\u{2028}\\";
        assert_eq!(
            log_text(forged).to_string(),
            "x\\n2026-01-01T00:00:00Z  INFO task succeeded\\r\\t\\x1b[31m\\u2028\\\\"
        );
    }

    #[test]
    fn long_text_is_cut_with_its_remaining_size() {
        let long = format!("{}{}", "a".repeat(MAX_LOG_CHARS), "é".repeat(10));
        assert_eq!(
            log_text(&long).to_string(),
            format!("{}…(+20 bytes)", "a".repeat(MAX_LOG_CHARS))
        );
        let exact = "b".repeat(MAX_LOG_CHARS);
        assert_eq!(log_text(&exact).to_string(), exact);
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn any_text_is_one_bounded_printable_line(s in any::<String>()) {
            let shown = log_text(&s).to_string();
            prop_assert!(shown.chars().all(is_printable), "{shown:?}");
            // Each character is at most 10 escaped (`\U0010ffff`), plus the tail.
            prop_assert!(shown.chars().count() <= MAX_LOG_CHARS * 10 + 32);
            if s.chars().count() <= MAX_LOG_CHARS && !s.contains('\\') && s.chars().all(is_printable) {
                prop_assert_eq!(shown, s);
            }
        }
    }
}
