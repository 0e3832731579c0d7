//! ISO-8601 date-times as Celery writes and reads them.
//!
//! Celery puts `eta`/`expires` in task messages as Python's
//! `datetime.isoformat()` (`2024-05-01T12:00:00.123456+00:00`, or naive
//! without the offset) and reads them with `dateutil.parser.isoparse`.
//! [`parse`] accepts that family: a date, optionally a time (`T`, `t` or
//! space separated, minutes, seconds and a fraction optional) and optionally
//! an offset (`Z`, `+HH`, `+HHMM`, `+HH:MM`). A value without an offset is
//! taken as UTC. [`format()`] writes what Python's `isoformat()` writes for an
//! aware UTC datetime, for events and results.
//!
//! Hand-written because chrono's parsers each accept only one layout and
//! the accepted set here must be exactly the one documented above.

use chrono::{
    DateTime, Datelike as _, FixedOffset, NaiveDate, NaiveTime, TimeZone as _, Timelike as _, Utc,
};

/// Parses an ISO-8601 date-time; `None` when `s` is not one.
pub fn parse(s: &str) -> Option<DateTime<Utc>> {
    let mut cur = Cursor { rest: s.as_bytes() };
    let year = cur.digits(4)?;
    cur.expect(b'-')?;
    let month = cur.digits(2)?;
    cur.expect(b'-')?;
    let day = cur.digits(2)?;
    let date = NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, month, day)?;

    let mut time = NaiveTime::MIN;
    if matches!(cur.peek(), Some(b'T' | b't' | b' ')) {
        cur.bump();
        let hour = cur.digits(2)?;
        let (mut minute, mut second, mut nano) = (0, 0, 0);
        if cur.eat(b':') {
            minute = cur.digits(2)?;
            if cur.eat(b':') {
                second = cur.digits(2)?;
                if cur.eat(b'.') || cur.eat(b',') {
                    nano = cur.fraction()?;
                }
            }
        }
        time = NaiveTime::from_hms_nano_opt(hour, minute, second, nano)?;
    }

    let offset_seconds = match cur.peek() {
        None => 0,
        Some(b'Z' | b'z') => {
            cur.bump();
            0
        }
        Some(sign @ (b'+' | b'-')) => {
            cur.bump();
            let hours = cur.digits(2)?;
            let minutes = if cur.is_empty() {
                0
            } else {
                cur.eat(b':');
                cur.digits(2)?
            };
            if hours > 23 || minutes > 59 {
                return None;
            }
            let seconds = i32::try_from(hours * 3600 + minutes * 60).ok()?;
            if sign == b'-' { -seconds } else { seconds }
        }
        Some(_) => return None,
    };
    if !cur.is_empty() {
        return None;
    }
    let offset = FixedOffset::east_opt(offset_seconds)?;
    let local = date.and_time(time);
    let aware = offset.from_local_datetime(&local).single()?;
    Some(aware.with_timezone(&Utc))
}

/// What Python's `datetime.isoformat()` gives for this aware UTC datetime:
/// `2024-05-01T12:00:00+00:00`, with `.ffffff` only when there are
/// microseconds.
pub fn format(dt: &DateTime<Utc>) -> String {
    let micros = dt.nanosecond() % 1_000_000_000 / 1_000;
    let fraction = if micros == 0 {
        String::new()
    } else {
        format!(".{micros:06}")
    };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{fraction}+00:00",
        dt.year(),
        dt.month(),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
    )
}

/// A tiny byte cursor over the ASCII layout above.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    fn bump(&mut self) {
        self.rest = self.rest.get(1..).unwrap_or_default();
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn eat(&mut self, byte: u8) -> bool {
        if self.peek() == Some(byte) {
            self.bump();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        self.eat(byte).then_some(())
    }

    /// Exactly `n` ASCII digits.
    fn digits(&mut self, n: usize) -> Option<u32> {
        let (head, tail) = self.rest.split_at_checked(n)?;
        let mut value = 0u32;
        for &b in head {
            if !b.is_ascii_digit() {
                return None;
            }
            value = value * 10 + u32::from(b - b'0');
        }
        self.rest = tail;
        Some(value)
    }

    /// One or more digits of a fraction of a second, as nanoseconds
    /// (digits past the ninth are ignored).
    fn fraction(&mut self) -> Option<u32> {
        let len = self.rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if len == 0 {
            return None;
        }
        let (head, tail) = self.rest.split_at(len);
        let mut nanos = 0u32;
        for i in 0..9 {
            let digit = head.get(i).map_or(0, |b| u32::from(b - b'0'));
            nanos = nanos * 10 + digit;
        }
        self.rest = tail;
        Some(nanos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("test fixture is RFC 3339")
            .with_timezone(&Utc)
    }

    #[test]
    fn parses_python_isoformat() {
        let cases = [
            ("2024-05-01T12:00:00+00:00", "2024-05-01T12:00:00Z"),
            (
                "2024-05-01T12:00:00.123456+00:00",
                "2024-05-01T12:00:00.123456Z",
            ),
            ("2024-05-01T12:00:00.123456", "2024-05-01T12:00:00.123456Z"),
            ("2024-05-01T14:00:00+02:00", "2024-05-01T12:00:00Z"),
            ("2024-05-01T07:30:00-0430", "2024-05-01T12:00:00Z"),
            ("2024-05-01T13:00:00+01", "2024-05-01T12:00:00Z"),
            ("2024-05-01 12:00:00Z", "2024-05-01T12:00:00Z"),
            ("2024-05-01t12:00z", "2024-05-01T12:00:00Z"),
            ("2024-05-01T12", "2024-05-01T12:00:00Z"),
            ("2024-05-01", "2024-05-01T00:00:00Z"),
            ("2024-05-01T12:00:00,5", "2024-05-01T12:00:00.5Z"),
            (
                "2024-05-01T12:00:00.1234567891234",
                "2024-05-01T12:00:00.123456789Z",
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(parse(input), Some(utc(expected)), "{input}");
        }
    }

    #[test]
    fn rejects_garbage() {
        for input in [
            "",
            "now",
            "2024",
            "2024-5-1",
            "2024-13-01",
            "2024-02-30",
            "2024-05-01T25:00",
            "2024-05-01T12:00:00.",
            "2024-05-01T12:00:00+",
            "2024-05-01T12:00:00+24:00",
            "2024-05-01T12:00:00 UTC",
            "2024-05-01T12:00:00+00:00x",
            "१९९९-05-01",
        ] {
            assert_eq!(parse(input), None, "{input:?}");
        }
    }

    #[test]
    fn formats_like_python() {
        assert_eq!(
            format(&utc("2024-05-01T12:00:00Z")),
            "2024-05-01T12:00:00+00:00"
        );
        assert_eq!(
            format(&utc("2024-05-01T12:00:00.000250Z")),
            "2024-05-01T12:00:00.000250+00:00"
        );
    }
}
