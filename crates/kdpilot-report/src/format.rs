//! Numbers, sizes, times and durations as people read them, the same in every format.

use std::time::{Duration, SystemTime};

use crate::timeline::unix_seconds;

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `64` → `64 B`, `1536` → `1.5 KiB`, `27684864` → `26.4 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = "KiB";
    for u in UNITS.iter().skip(1) {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = u;
    }
    if value < 10.0 {
        format!("{value:.2} {unit}")
    } else if value < 100.0 {
        format!("{value:.1} {unit}")
    } else {
        format!("{value:.0} {unit}")
    }
}

/// `part` of `whole` as a percentage with one decimal (`41.2%`).
pub fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".into();
    }
    format!("{:.1}%", part as f64 * 100.0 / whole as f64)
}

/// `2026-11-22 01:02:03 UTC` (seconds; the logs keep milliseconds).
pub fn time(t: SystemTime) -> String {
    let secs = unix_seconds(t);
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(dt) => {
            let (date, clock) = (dt.date(), dt.time());
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
                date.year(),
                u8::from(date.month()),
                date.day(),
                clock.hour(),
                clock.minute(),
                clock.second()
            )
        }
        Err(_) => format!("@{secs} UTC"),
    }
}

/// `11-22 01:02` (month, day, hours and minutes in UTC), for table cells.
pub fn short_time(t: SystemTime) -> String {
    clock(unix_seconds(t), true)
}

/// `HH:MM` of a Unix time in UTC, for chart axes; with the date when `with_date`.
pub fn clock(secs: i64, with_date: bool) -> String {
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(dt) if with_date => format!(
            "{:02}-{:02} {:02}:{:02}",
            u8::from(dt.month()),
            dt.day(),
            dt.hour(),
            dt.minute()
        ),
        Ok(dt) => format!("{:02}:{:02}", dt.hour(), dt.minute()),
        Err(_) => format!("@{secs}"),
    }
}

/// `8h 03m 12s`, `3m 05s`, `12s`, `2d 4h 00m`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, minutes, seconds) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    if days > 0 {
        format!("{days}d {hours}h {minutes:02}m")
    } else if hours > 0 {
        format!("{hours}h {minutes:02}m {seconds:02}s")
    } else if minutes > 0 {
        format!("{minutes}m {seconds:02}s")
    } else {
        format!("{seconds}s")
    }
}

/// The time from `a` to `b` (zero when `b` is earlier).
pub fn span(a: SystemTime, b: SystemTime) -> Duration {
    b.duration_since(a).unwrap_or_default()
}

/// `text` cut to `max` characters with `…` in the middle, for one-line cells.
pub fn fit(text: &str, max: usize) -> String {
    let n = text.chars().count();
    if n <= max || max < 5 {
        return text.to_string();
    }
    let head = (max - 1) / 2;
    let tail = max - 1 - head;
    let mut out: String = text.chars().take(head).collect();
    out.push('…');
    out.extend(text.chars().skip(n - tail));
    out
}

/// Text with control characters (from a hostile or broken log) shown as `?`.
pub fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn formats() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(bytes(64), "64 B");
        assert_eq!(bytes(1536), "1.50 KiB");
        assert_eq!(bytes(27_684_864), "26.4 MiB");
        assert_eq!(bytes(3 << 30), "3.00 GiB");
        assert_eq!(percent(1, 3), "33.3%");
        assert_eq!(percent(1, 0), "-");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_309_323_456);
        assert_eq!(time(t), "2026-11-22 01:02:03 UTC");
        assert_eq!(clock(1_795_309_323, false), "01:02");
        assert_eq!(short_time(t), "11-22 01:02");
        assert_eq!(clock(1_795_309_323, true), "11-22 01:02");
        assert_eq!(duration(Duration::from_secs(8 * 3600 + 192)), "8h 03m 12s");
        assert_eq!(duration(Duration::from_secs(185)), "3m 05s");
        assert_eq!(duration(Duration::from_secs(12)), "12s");
        assert_eq!(
            duration(Duration::from_secs(2 * 86400 + 4 * 3600)),
            "2d 4h 00m"
        );
        assert_eq!(fit("abcdefghij", 7), "abc…hij");
        assert_eq!(fit("abc", 7), "abc");
        assert_eq!(clean("a\nb\x1b"), "a?b?");
    }
}
