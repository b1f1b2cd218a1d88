//! Small pure helpers: the rule cron schedules must follow, and Go-style durations and
//! human-readable sizes as the status writes them.

use std::time::Duration;

/// Cron schedules: five fields (minute hour day-of-month month day-of-week) or a macro.
pub(crate) const SCHEDULE_RULE: &str =
    "self.matches('^ *(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|[^ ]+( +[^ ]+){4}) *$')";
pub(crate) const SCHEDULE_MESSAGE: &str = "schedule must be a cron expression with five fields \
     (minute hour day-of-month month day-of-week), such as \"0 2 * * *\", or a macro such as @daily";

/// Parses a Go-style duration (`300ms`, `60s`, `5m`, `1h30m`, `1.5h`); `None` when malformed.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if number_len == 0 {
            return None;
        }
        let value: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * seconds_per_unit;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// Formats a duration the way the status writes it: `5m30s`, `2h0m5s`, `45s` (whole seconds).
pub fn format_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

/// Formats a byte count the way the status writes sizes: `2.3 GiB`, `512 B`, `125.6 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse_like_kubernetes_writes_them() {
        assert_eq!(parse_duration("60s"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("60"), None);
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("5 minutes"), None);
    }

    #[test]
    fn durations_format_like_the_specification_status() {
        assert_eq!(format_duration(Duration::from_secs(330)), "5m30s");
        assert_eq!(format_duration(Duration::from_secs(930)), "15m30s");
        assert_eq!(format_duration(Duration::from_secs(45)), "45s");
        assert_eq!(format_duration(Duration::from_secs(7205)), "2h0m5s");
    }

    #[test]
    fn sizes_format_like_the_specification_status() {
        assert_eq!(format_bytes(2_469_606_195), "2.3 GiB");
        assert_eq!(format_bytes(134_839_066_624), "125.6 GiB");
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
    }
}
