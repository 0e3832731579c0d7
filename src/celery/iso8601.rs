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
//!
//! Owns that parsing and formatting only: no clock, no I/O.

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
mod proptests {
    use super::*;
    use crate::proptest_config::config;
    use chrono::{Duration, NaiveDateTime};
    use proptest::prelude::*;

    /// A valid value in one of the accepted layouts, and the instant it is.
    fn valid() -> impl Strategy<Value = (String, DateTime<Utc>)> {
        (
            (0..=9999_i32, 1..=12_u32, 1..=31_u32),
            (
                0..=23_u32,
                0..=59_u32,
                0..=59_u32,
                0..1_000_000_000_u32,
                1..=12_usize,
            ),
            (
                0..5_u8,
                0..4_u8,
                0..5_u8,
                any::<bool>(),
                0..=23_i64,
                0..=59_i64,
            ),
        )
            .prop_filter_map(
                "a day of that month",
                |((y, mo, d), (h, mi, s, nanos, digits), (time, sep, zone, neg, oh, om))| {
                    let date = NaiveDate::from_ymd_opt(y, mo, d)?;
                    let sep = ["T", "t", " ", "T"][usize::from(sep)];
                    let frac_digits = format!("{nanos:09}{}", "0".repeat(digits.saturating_sub(9)));
                    let frac = &frac_digits[..digits];
                    let kept_nanos: u32 = format!("{:0<9}", &frac[..digits.min(9)]).parse().ok()?;
                    let (text_time, naive_time) = match time {
                        0 => (String::new(), NaiveTime::MIN),
                        1 => (format!("{sep}{h:02}"), NaiveTime::from_hms_opt(h, 0, 0)?),
                        2 => (
                            format!("{sep}{h:02}:{mi:02}"),
                            NaiveTime::from_hms_opt(h, mi, 0)?,
                        ),
                        3 => (
                            format!("{sep}{h:02}:{mi:02}:{s:02}"),
                            NaiveTime::from_hms_opt(h, mi, s)?,
                        ),
                        _ => (
                            format!("{sep}{h:02}:{mi:02}:{s:02}.{frac}"),
                            NaiveTime::from_hms_nano_opt(h, mi, s, kept_nanos)?,
                        ),
                    };
                    let sign = if neg { '-' } else { '+' };
                    let (text_zone, offset) = match zone {
                        0 => (String::new(), 0),
                        1 => ("Z".to_owned(), 0),
                        2 => (format!("{sign}{oh:02}"), oh * 3600),
                        3 => (format!("{sign}{oh:02}{om:02}"), oh * 3600 + om * 60),
                        _ => (format!("{sign}{oh:02}:{om:02}"), oh * 3600 + om * 60),
                    };
                    let offset = if neg { -offset } else { offset };
                    let local = NaiveDateTime::new(date, naive_time);
                    let instant = (local - Duration::seconds(offset)).and_utc();
                    Some((
                        format!(
                            "{date}{text_time}{text_zone}",
                            date = date.format("%Y-%m-%d")
                        ),
                        instant,
                    ))
                },
            )
    }

    /// A valid value with one byte replaced, inserted or removed.
    fn near_valid() -> impl Strategy<Value = String> {
        (
            valid(),
            any::<prop::sample::Index>(),
            0..3_u8,
            any::<char>(),
        )
            .prop_map(|((text, _), at, how, ch)| {
                let mut chars: Vec<char> = text.chars().collect();
                let i = at.index(chars.len() + 1);
                match how {
                    0 if i < chars.len() => chars[i] = ch,
                    1 if i < chars.len() => {
                        chars.remove(i);
                    }
                    _ => chars.insert(i, ch),
                }
                chars.into_iter().collect()
            })
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn every_accepted_layout_parses_to_its_instant((text, instant) in valid()) {
            prop_assert_eq!(parse(&text), Some(instant), "{:?}", text);
        }

        #[test]
        fn formatted_then_parsed_is_the_same_instant(
            secs in -62_135_596_800_i64..253_402_300_799,
            micros in 0..1_000_000_u32,
        ) {
            let instant = Utc.timestamp_opt(secs, micros * 1000).single().expect("in range");
            prop_assert_eq!(parse(&format(&instant)), Some(instant));
        }

        #[test]
        fn near_valid_and_arbitrary_text_never_panics(near in near_valid(), any_text in any::<String>()) {
            // Whatever parses is an instant that formats and parses again.
            for text in [near, any_text] {
                if let Some(instant) = parse(&text) {
                    let micros = instant.timestamp_subsec_micros() * 1000;
                    let truncated = instant.with_nanosecond(micros).expect("valid nanos");
                    prop_assert_eq!(parse(&format(&instant)), Some(truncated));
                }
            }
        }
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
