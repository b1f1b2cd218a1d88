//! Cron schedules read in an IANA time zone, and the decision of which scheduled time (if
//! any) is due. Everything here is pure: the caller passes the clock in, so the rules are
//! tested without sleeping.

use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::errors::CronError;
use croner::parser::{CronParser, Seconds, Year};

/// Why a `schedule` + `timezone` pair cannot be read; the message is for a condition.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// `timezone` is not a name in the IANA database.
    #[error("timezone {name:?} is not an IANA time zone name such as Europe/Berlin")]
    Timezone { name: String },
    /// `schedule` is not a five-field cron expression or a known macro. `expression` is what
    /// was parsed: trimmed, with `@midnight` and `@annually` read as `@daily` and `@yearly`.
    #[error("schedule {expression:?} is not a valid cron expression: {source}")]
    Expression { expression: String, source: CronError },
}

/// A parsed `schedule` + `timezone` pair.
#[derive(Clone, Debug)]
pub struct Schedule {
    cron: Cron,
    tz: Tz,
}

impl Schedule {
    /// Parses a five-field cron expression (or a macro such as `@daily`) in `timezone`
    /// (IANA name, default UTC). The error says what is wrong, for a condition message.
    pub fn parse(expression: &str, timezone: Option<&str>) -> Result<Self, ScheduleError> {
        let tz = match timezone.map(str::trim).filter(|t| !t.is_empty()) {
            None => Tz::UTC,
            Some(name) => Tz::from_str(name).map_err(|_| ScheduleError::Timezone { name: name.into() })?,
        };
        let expression = expression.trim();
        let expression = match expression {
            // croner knows these too, but `@midnight` and `@annually` are cron(8) spellings only.
            "@midnight" => "@daily",
            "@annually" => "@yearly",
            other => other,
        };
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build()
            .parse(expression)
            .map_err(|source| ScheduleError::Expression {
                expression: expression.into(),
                source,
            })?;
        Ok(Self { cron, tz })
    }

    /// The first scheduled time strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = self.tz.from_utc_datetime(&whole_seconds(after).naive_utc());
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| whole_seconds(t.with_timezone(&Utc)))
    }

    /// The latest scheduled time in `(after, now]`, if there is one.
    pub fn latest_in(&self, after: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = self.tz.from_utc_datetime(&whole_seconds(now).naive_utc());
        let latest = whole_seconds(
            self.cron
                .find_previous_occurrence(&local, true)
                .ok()?
                .with_timezone(&Utc),
        );
        (latest > whole_seconds(after)).then_some(latest)
    }
}

/// `t` without its fraction of a second. Scheduled times are whole seconds, and so are the
/// times the API server stores; croner keeps the fraction of the time it is given, which
/// would make one tick look like a later one after a round trip through status.
fn whole_seconds(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t)
}

/// What the schedule asks for at `now`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Due {
    /// Nothing is due; the next scheduled time (if the expression has one).
    Wait(Option<DateTime<Utc>>),
    /// `time` is due and still within the starting deadline: run it (once, even if several
    /// times were missed; the older ones are skipped).
    Run { time: DateTime<Utc>, missed: usize },
    /// The latest due time is older than the deadline: record it as handled and do not run.
    TooLate { time: DateTime<Utc> },
}

/// Decides what is due. `last` is the last scheduled time already handled (or the object's
/// creation time), `deadline` how late a run may still start.
pub fn due(schedule: &Schedule, last: DateTime<Utc>, now: DateTime<Utc>, deadline: chrono::Duration) -> Due {
    let Some(latest) = schedule.latest_in(last, now) else {
        return Due::Wait(schedule.next_after(now));
    };
    if now - latest > deadline {
        return Due::TooLate { time: latest };
    }
    // Count the skipped ones, for the event (bounded: a minutely schedule missed for a year
    // should not make us iterate half a million times).
    let mut missed = 0;
    let mut t = last;
    while let Some(next) = schedule.next_after(t) {
        if next >= latest || missed >= 1000 {
            break;
        }
        missed += 1;
        t = next;
    }
    Due::Run { time: latest, missed }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn hour() -> chrono::Duration {
        chrono::Duration::hours(1)
    }

    #[test]
    fn daily_schedule_in_berlin_runs_at_local_two_am() {
        let s = Schedule::parse("0 2 * * *", Some("Europe/Berlin")).unwrap();
        // Winter: UTC+1.
        assert_eq!(
            s.next_after(t("2024-01-15T12:00:00Z")),
            Some(t("2024-01-16T01:00:00Z"))
        );
        // Summer: UTC+2.
        assert_eq!(
            s.next_after(t("2024-07-15T12:00:00Z")),
            Some(t("2024-07-16T00:00:00Z"))
        );
    }

    #[test]
    fn sunday_is_zero_and_seven_as_in_cron() {
        let zero = Schedule::parse("0 3 * * 0", None).unwrap();
        let seven = Schedule::parse("0 3 * * 7", None).unwrap();
        // 2024-01-14 is a Sunday.
        assert_eq!(
            zero.next_after(t("2024-01-10T00:00:00Z")),
            Some(t("2024-01-14T03:00:00Z"))
        );
        assert_eq!(
            seven.next_after(t("2024-01-10T00:00:00Z")),
            Some(t("2024-01-14T03:00:00Z"))
        );
    }

    #[test]
    fn macros_are_accepted() {
        for m in [
            "@daily",
            "@midnight",
            "@hourly",
            "@weekly",
            "@monthly",
            "@yearly",
            "@annually",
        ] {
            Schedule::parse(m, None).unwrap_or_else(|e| panic!("{m}: {e}"));
        }
        let s = Schedule::parse("@hourly", None).unwrap();
        assert_eq!(
            s.next_after(t("2024-01-15T12:30:00Z")),
            Some(t("2024-01-15T13:00:00Z"))
        );
    }

    #[test]
    fn bad_expressions_and_zones_say_what_is_wrong() {
        let e = Schedule::parse("61 * * * *", None).unwrap_err();
        assert!(matches!(e, ScheduleError::Expression { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("schedule \"61 * * * *\" is not a valid cron expression: "),
            "{e}"
        );
        let e = Schedule::parse("0 2 * * *", Some("Mars/Olympus")).unwrap_err();
        assert!(
            matches!(&e, ScheduleError::Timezone { name } if name == "Mars/Olympus"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "timezone \"Mars/Olympus\" is not an IANA time zone name such as Europe/Berlin"
        );
        // Seconds are not part of the five-field format.
        assert!(Schedule::parse("0 0 2 * * *", None).is_err());
    }

    #[test]
    fn nothing_due_waits_for_the_next_time() {
        let s = Schedule::parse("0 2 * * *", None).unwrap();
        let d = due(&s, t("2024-01-15T02:00:00Z"), t("2024-01-15T10:00:00Z"), hour());
        assert_eq!(d, Due::Wait(Some(t("2024-01-16T02:00:00Z"))));
    }

    #[test]
    fn a_due_time_runs_once() {
        let s = Schedule::parse("0 2 * * *", None).unwrap();
        let d = due(&s, t("2024-01-14T02:00:00Z"), t("2024-01-15T02:00:01Z"), hour());
        assert_eq!(
            d,
            Due::Run {
                time: t("2024-01-15T02:00:00Z"),
                missed: 0
            }
        );
    }

    #[test]
    fn many_missed_times_give_one_run_of_the_latest_never_a_burst() {
        let s = Schedule::parse("*/5 * * * *", None).unwrap();
        // Down from 10:00 to 12:02: 10:05 to 11:55 (23 times) missed, one run for 12:00.
        let d = due(&s, t("2024-01-15T10:00:00Z"), t("2024-01-15T12:02:00Z"), hour());
        assert_eq!(
            d,
            Due::Run {
                time: t("2024-01-15T12:00:00Z"),
                missed: 23
            }
        );
    }

    #[test]
    fn a_run_missed_beyond_the_deadline_is_skipped() {
        let s = Schedule::parse("0 2 * * *", None).unwrap();
        let d = due(&s, t("2024-01-14T02:00:00Z"), t("2024-01-15T05:00:00Z"), hour());
        assert_eq!(
            d,
            Due::TooLate {
                time: t("2024-01-15T02:00:00Z")
            }
        );
    }

    #[test]
    fn times_before_the_base_are_never_due() {
        // A backup created at 02:30 does not run the 02:00 slot of that day.
        let s = Schedule::parse("0 2 * * *", None).unwrap();
        let d = due(&s, t("2024-01-15T02:30:00Z"), t("2024-01-15T02:31:00Z"), hour());
        assert_eq!(d, Due::Wait(Some(t("2024-01-16T02:00:00Z"))));
    }

    #[test]
    fn a_tick_recorded_at_second_precision_is_not_due_again_a_moment_later() {
        let s = Schedule::parse("0 13 * * *", None).unwrap();
        let now: DateTime<Utc> = "2024-01-15T13:00:00.390Z".parse().unwrap();
        let Due::Run { time, .. } = due(&s, t("2024-01-14T13:00:00Z"), now, hour()) else {
            panic!("due");
        };
        assert_eq!(time, t("2024-01-15T13:00:00Z"));
        // The API server stores whole seconds; 1.6 s later nothing is due.
        let later: DateTime<Utc> = "2024-01-15T13:00:01.978Z".parse().unwrap();
        assert!(matches!(due(&s, time, later, hour()), Due::Wait(_)));
    }

    #[test]
    fn dst_gap_does_not_lose_the_day() {
        // 2024-03-31 02:30 does not exist in Berlin; the run still happens that day.
        let s = Schedule::parse("30 2 * * *", Some("Europe/Berlin")).unwrap();
        let next = s.next_after(t("2024-03-30T12:00:00Z")).unwrap();
        assert!(next < t("2024-04-01T00:00:00Z"), "{next}");
    }
}
