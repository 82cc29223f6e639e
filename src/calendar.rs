//! Calendar months in UTC, for monthly quotas, usage partitions and invoices:
//! which month a time is in, where it starts and ends. Civil-from-days
//! arithmetic; no time zone data, because everything here is UTC.

/// (year, month 1..=12) of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, u32::try_from(month).unwrap_or(1))
}

/// Days since 1970-01-01 of the first day of (year, month).
fn days_from_civil(year: i64, month: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM` of a Unix time in seconds.
pub fn month_key(unix_secs: i64) -> String {
    let (year, month) = civil_from_days(unix_secs.div_euclid(86_400));
    format!("{year:04}-{month:02}")
}

/// Seconds from `unix_secs` to the start of the next month.
pub fn secs_until_month_end(unix_secs: i64) -> i64 {
    let (year, month) = civil_from_days(unix_secs.div_euclid(86_400));
    let (next_year, next_month) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    days_from_civil(next_year, next_month) * 86_400 - unix_secs
}

/// Start of (year, month 1..=12) in microseconds since the epoch.
pub fn month_start_us(year: i64, month: u32) -> i64 {
    days_from_civil(year, month) * 86_400 * 1_000_000
}

/// (year, month 1..=12) of a Unix time in microseconds.
pub fn year_month_of_us(unix_us: i64) -> (i64, u32) {
    civil_from_days(unix_us.div_euclid(1_000_000).div_euclid(86_400))
}

/// Start and end (exclusive) of the month holding `unix_us`, in
/// microseconds, with its `YYYY-MM` key and a `YYYY_MM` table suffix.
pub fn month_bounds_us(unix_us: i64) -> (i64, i64, String) {
    let secs = unix_us.div_euclid(1_000_000);
    let (year, month) = civil_from_days(secs.div_euclid(86_400));
    let (next_year, next_month) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    let start = days_from_civil(year, month) * 86_400 * 1_000_000;
    let end = days_from_civil(next_year, next_month) * 86_400 * 1_000_000;
    (start, end, format!("{year:04}_{month:02}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_and_their_ends() {
        // 2026-11-28T22:00:00Z
        let t = 1_795_903_200;
        assert_eq!(month_key(t), "2026-11");
        assert_eq!(secs_until_month_end(t), 2 * 86_400 + 2 * 3600);
        assert_eq!(month_key(0), "1970-01");
        // 2024-02-29 (leap day) is still February; 2024-03-01 is March.
        assert_eq!(month_key(1_709_164_800), "2024-02");
        assert_eq!(month_key(1_709_251_200), "2024-03");
        assert_eq!(month_key(1_735_689_599), "2024-12");
        assert_eq!(month_key(1_735_689_600), "2025-01");
        let (start, end, suffix) = month_bounds_us(t * 1_000_000);
        assert_eq!(suffix, "2026_11");
        assert_eq!(month_key(start / 1_000_000), "2026-11");
        assert_eq!(month_key(start / 1_000_000 - 1), "2026-10");
        assert_eq!(month_key(end / 1_000_000), "2026-12");
        assert_eq!(month_key(end / 1_000_000 - 1), "2026-11");
    }
}
