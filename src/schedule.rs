//! A mandate's recurring time window: on which days, between which local times, in which
//! time zone a session may run.
//!
//! Local times are read in the window's zone from the system's time zone database
//! (`/usr/share/zoneinfo`, Debian's `tzdata`), so daylight saving is the zone's and not the
//! host's. A window whose `end` is not after its `start` runs over midnight into the next day;
//! `days` names the day it starts on. A local time that does not exist (in the hour skipped when
//! clocks go forward) is moved forward by the length of the gap (01:30 becomes 02:30), one
//! that exists twice is read as the earlier of the two (jiff's "compatible" rule, as RFC 5545
//! calendars do).

use jiff::civil::{Date, Time, Weekday};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// A recurring window as a mandate writes it:
/// `{ days = ["mon","tue"], start = "08:00", end = "16:30", tz = "Europe/London" }`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Days the window opens on: `mon` … `sun` (full English names work too).
    pub days: Vec<String>,
    /// Local opening time, `HH:MM` or `HH:MM:SS`.
    pub start: String,
    /// Local closing time, `HH:MM` or `HH:MM:SS`; `24:00` is the end of the day.
    pub end: String,
    /// IANA time zone name, e.g. `Europe/London` or `UTC`.
    pub tz: String,
}

/// A [`Window`] that passed validation.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// Indexed by [`Weekday::to_monday_zero_offset`].
    days: [bool; 7],
    start: Time,
    /// `None` is `24:00`.
    end: Option<Time>,
    tz: TimeZone,
    tz_name: String,
}

/// Why a window was refused: the field (relative to the window) and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct WindowError {
    /// `days[2]`, `start`, `end` or `tz`.
    pub field: String,
    /// What is wrong and what to write instead.
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> WindowError {
    WindowError {
        field: field.into(),
        message: message.into(),
    }
}

impl Window {
    /// Checks the window and looks its zone up in the system's time zone database.
    pub fn validate(&self) -> Result<Schedule, WindowError> {
        if self.days.is_empty() {
            return Err(err(
                "days",
                "name at least one day, e.g. [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\"]",
            ));
        }
        let mut days = [false; 7];
        for (i, d) in self.days.iter().enumerate() {
            let day = weekday(d).ok_or_else(|| {
                err(
                    format!("days[{i}]"),
                    format!("`{d}` is not a day; use mon, tue, wed, thu, fri, sat or sun"),
                )
            })?;
            let slot = &mut days[day.to_monday_zero_offset() as usize];
            if *slot {
                return Err(err(format!("days[{i}]"), format!("`{d}` is listed twice")));
            }
            *slot = true;
        }
        let start = clock(&self.start, false).map_err(|m| err("start", m))?;
        let start = start.ok_or_else(|| err("start", "`24:00` is only allowed as the end"))?;
        let end = clock(&self.end, true).map_err(|m| err("end", m))?;
        if end == Some(start) {
            return Err(err(
                "end",
                "equals start; for a whole day write start = \"00:00\", end = \"24:00\"",
            ));
        }
        let tz = jiff::tz::db().get(&self.tz).map_err(|e| {
            err(
                "tz",
                format!(
                    "`{}` is not in the system's time zone database ({e}); use an IANA name \
                     such as Europe/London or UTC (Debian: apt-get install tzdata)",
                    self.tz
                ),
            )
        })?;
        Ok(Schedule {
            days,
            start,
            end,
            tz,
            tz_name: self.tz.clone(),
        })
    }
}

fn weekday(s: &str) -> Option<Weekday> {
    let s = s.trim().to_ascii_lowercase();
    let all = [
        ("mon", "monday", Weekday::Monday),
        ("tue", "tuesday", Weekday::Tuesday),
        ("wed", "wednesday", Weekday::Wednesday),
        ("thu", "thursday", Weekday::Thursday),
        ("fri", "friday", Weekday::Friday),
        ("sat", "saturday", Weekday::Saturday),
        ("sun", "sunday", Weekday::Sunday),
    ];
    all.iter()
        .find(|(short, long, _)| s == *short || s == *long)
        .map(|(_, _, d)| *d)
}

/// `HH:MM` or `HH:MM:SS`; `Ok(None)` is `24:00` (allowed when `end_of_day`).
fn clock(s: &str, end_of_day: bool) -> Result<Option<Time>, String> {
    let bad = || format!("`{s}` is not a time of day; write HH:MM or HH:MM:SS, e.g. \"16:30\"");
    let parts: Vec<&str> = s.split(':').collect();
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.len() != 2) {
        return Err(bad());
    }
    let num = |p: &str| -> Result<i8, String> {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            p.parse().map_err(|_| bad())
        } else {
            Err(bad())
        }
    };
    let (h, m) = (num(parts[0])?, num(parts[1])?);
    let sec = match parts.get(2) {
        Some(p) => num(p)?,
        None => 0,
    };
    if (h, m, sec) == (24, 0, 0) {
        return if end_of_day { Ok(None) } else { Err(bad()) };
    }
    Time::new(h, m, sec, 0).map(Some).map_err(|_| bad())
}

fn to_jiff(t: OffsetDateTime) -> Timestamp {
    Timestamp::new(t.unix_timestamp(), t.nanosecond() as i32).unwrap_or(Timestamp::MAX)
}

fn from_jiff(t: Timestamp) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(t.as_nanosecond())
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

impl Schedule {
    /// The window's zone as written.
    pub fn tz_name(&self) -> &str {
        &self.tz_name
    }

    /// The occurrence that opens on `day`, as instants, when the window opens that day.
    fn occurrence(&self, day: Date) -> Option<(Timestamp, Timestamp)> {
        if !self.days[day.weekday().to_monday_zero_offset() as usize] {
            return None;
        }
        let open = day.to_datetime(self.start).to_zoned(self.tz.clone()).ok()?;
        let close_day = match self.end {
            Some(end) if end > self.start => day.to_datetime(end),
            Some(end) => day.tomorrow().ok()?.to_datetime(end),
            None => day.tomorrow().ok()?.to_datetime(Time::midnight()),
        };
        let close = close_day.to_zoned(self.tz.clone()).ok()?;
        Some((open.timestamp(), close.timestamp()))
    }

    /// When the occurrence that `now` falls in closes, or `None` when the window is shut.
    pub fn open_until(&self, now: OffsetDateTime) -> Option<OffsetDateTime> {
        let now = to_jiff(now);
        let today = now.to_zoned(self.tz.clone()).date();
        // An occurrence that opened yesterday may still run (over midnight).
        [today.yesterday().ok(), Some(today)]
            .into_iter()
            .flatten()
            .filter_map(|d| self.occurrence(d))
            .filter(|(open, close)| *open <= now && now < *close)
            .map(|(_, close)| close)
            .max()
            .map(from_jiff)
    }

    /// When the window next opens after `now` (within the next eight days), for error
    /// messages and the session view.
    pub fn next_open(&self, now: OffsetDateTime) -> Option<OffsetDateTime> {
        let now = to_jiff(now);
        let mut day = now.to_zoned(self.tz.clone()).date();
        for _ in 0..9 {
            if let Some((open, _)) = self.occurrence(day) {
                if open > now {
                    return Some(from_jiff(open));
                }
            }
            day = day.tomorrow().ok()?;
        }
        None
    }

    /// Whether every instant this schedule is open, `wider` is open too (same zone, days a
    /// subset, each occurrence inside the other's). Used to tell a narrowing change from a
    /// widening one; anything it cannot prove is treated as widening.
    pub fn within(&self, wider: &Schedule) -> bool {
        if self.tz_name != wider.tz_name {
            return false;
        }
        let inside = |s: &Schedule, w: &Schedule| {
            let span = |x: &Schedule| {
                let start = x.start;
                let end = x.end;
                (start, end, end.is_some_and(|e| e <= start))
            };
            let (s0, s1, s_over) = span(s);
            let (w0, w1, w_over) = span(w);
            // Compare on a line of "seconds since the opening day's midnight".
            let secs = |t: Time| {
                i64::from(t.hour()) * 3600 + i64::from(t.minute()) * 60 + i64::from(t.second())
            };
            let end_secs = |e: Option<Time>, over: bool| match e {
                None => 86_400,
                Some(t) => secs(t) + if over { 86_400 } else { 0 },
            };
            secs(s0) >= secs(w0) && end_secs(s1, s_over) <= end_secs(w1, w_over)
        };
        (0..7).all(|d| !self.days[d] || wider.days[d]) && inside(self, wider)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn window(days: &[&str], start: &str, end: &str, tz: &str) -> Window {
        Window {
            days: days.iter().map(|d| d.to_string()).collect(),
            start: start.into(),
            end: end.into(),
            tz: tz.into(),
        }
    }

    fn weekdays_london() -> Schedule {
        window(
            &["mon", "tue", "wed", "thu", "fri"],
            "08:00",
            "16:30",
            "Europe/London",
        )
        .validate()
        .expect("valid")
    }

    #[test]
    fn open_during_the_day_in_the_zone_not_the_host() {
        let s = weekdays_london();
        // Monday 2026-07-06: London is on BST (UTC+1), so 08:00 local is 07:00 UTC.
        assert_eq!(s.open_until(datetime!(2026-07-06 06:59:59 UTC)), None);
        assert_eq!(
            s.open_until(datetime!(2026-07-06 07:00:00 UTC)),
            Some(datetime!(2026-07-06 15:30:00 UTC))
        );
        assert_eq!(s.open_until(datetime!(2026-07-06 15:30:00 UTC)), None);
        // In winter (GMT) the same local times are an hour later in UTC.
        assert_eq!(
            s.open_until(datetime!(2026-01-05 08:00:00 UTC)),
            Some(datetime!(2026-01-05 16:30:00 UTC))
        );
        // Saturday: shut all day.
        assert_eq!(s.open_until(datetime!(2026-07-04 12:00:00 UTC)), None);
        assert_eq!(
            s.next_open(datetime!(2026-07-04 12:00:00 UTC)),
            Some(datetime!(2026-07-06 07:00:00 UTC))
        );
    }

    #[test]
    fn a_window_over_midnight_belongs_to_its_opening_day() {
        let s = window(&["fri"], "22:00", "02:00", "UTC")
            .validate()
            .expect("valid");
        // Friday 2026-07-03 22:00 → Saturday 02:00.
        assert_eq!(
            s.open_until(datetime!(2026-07-04 01:00:00 UTC)),
            Some(datetime!(2026-07-04 02:00:00 UTC))
        );
        assert_eq!(s.open_until(datetime!(2026-07-03 21:59:00 UTC)), None);
        // Saturday night does not open: only Friday is listed.
        assert_eq!(s.open_until(datetime!(2026-07-04 23:00:00 UTC)), None);
    }

    #[test]
    fn end_of_day_and_seconds() {
        let s = window(&["sun"], "00:00", "24:00", "UTC")
            .validate()
            .expect("valid");
        assert_eq!(
            s.open_until(datetime!(2026-07-05 23:59:59 UTC)),
            Some(datetime!(2026-07-06 00:00:00 UTC))
        );
        let s = window(&["sun"], "10:00:05", "10:00:10", "UTC")
            .validate()
            .expect("valid");
        assert_eq!(s.open_until(datetime!(2026-07-05 10:00:04 UTC)), None);
        assert!(s.open_until(datetime!(2026-07-05 10:00:05 UTC)).is_some());
    }

    #[test]
    fn a_time_in_the_skipped_hour_moves_forward_by_the_gap() {
        // London, 2026-03-29: 01:00 GMT jumps to 02:00 BST; 01:30 local does not exist and
        // reads as 02:30 BST (01:30 UTC). 03:00 BST is 02:00 UTC.
        let s = window(&["sun"], "01:30", "03:00", "Europe/London")
            .validate()
            .expect("valid");
        assert_eq!(s.open_until(datetime!(2026-03-29 01:29:59 UTC)), None);
        assert_eq!(
            s.open_until(datetime!(2026-03-29 01:30:00 UTC)),
            Some(datetime!(2026-03-29 02:00:00 UTC))
        );
    }

    #[test]
    fn bad_windows_name_their_field() {
        let cases = [
            (window(&[], "08:00", "09:00", "UTC"), "days"),
            (
                window(&["mon", "funday"], "08:00", "09:00", "UTC"),
                "days[1]",
            ),
            (
                window(&["mon", "monday"], "08:00", "09:00", "UTC"),
                "days[1]",
            ),
            (window(&["mon"], "8:00", "09:00", "UTC"), "start"),
            (window(&["mon"], "24:00", "09:00", "UTC"), "start"),
            (window(&["mon"], "08:00", "25:00", "UTC"), "end"),
            (window(&["mon"], "08:00", "08:00", "UTC"), "end"),
            (window(&["mon"], "08:00", "09:00", "Mars/Olympus"), "tz"),
        ];
        for (w, field) in cases {
            let e = w.validate().expect_err("refused");
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn within_tells_narrowing_from_widening() {
        let wide = weekdays_london();
        let narrow = window(&["mon", "fri"], "09:00", "12:00", "Europe/London")
            .validate()
            .expect("valid");
        assert!(narrow.within(&wide));
        assert!(!wide.within(&narrow));
        let weekend = window(&["sat"], "09:00", "12:00", "Europe/London")
            .validate()
            .expect("valid");
        assert!(!weekend.within(&wide));
        let later = window(&["mon"], "09:00", "17:00", "Europe/London")
            .validate()
            .expect("valid");
        assert!(!later.within(&wide));
        let other_zone = window(&["mon"], "09:00", "12:00", "UTC")
            .validate()
            .expect("valid");
        assert!(!other_zone.within(&wide));
    }
}
