//! Calendar months in UTC, the one month type of monthly quotas and budgets,
//! usage partitions and invoices: which month a time is in, where it starts
//! and ends. Civil-from-days arithmetic; no time zone data, because
//! everything here is UTC. Knows nothing of billing, limits or storage.

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

/// Seconds from `unix_secs` to the start of the next month.
pub fn secs_until_month_end(unix_secs: i64) -> i64 {
    Month::of_unix_secs(unix_secs).end_us() / 1_000_000 - unix_secs
}

/// One calendar month (UTC), written "YYYY-MM": the period of monthly quotas
/// and budgets, of usage partitions and of invoices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month {
    year: i64,
    month: u32,
}

impl Month {
    /// Parses "YYYY-MM" exactly (e.g. "2026-11"); `None` otherwise.
    pub fn parse(text: &str) -> Option<Month> {
        let bytes = text.as_bytes();
        if !text.is_ascii() || bytes.len() != 7 || bytes[4] != b'-' {
            return None;
        }
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        let (year, month) = (&text[..4], &text[5..]);
        if !digits(year) || !digits(month) {
            return None;
        }
        let year: i64 = year.parse().ok()?;
        let month: u32 = month.parse().ok()?;
        ((1970..=9999).contains(&year) && (1..=12).contains(&month))
            .then_some(Month { year, month })
    }

    /// The month holding `unix_us` (microseconds since the epoch).
    pub fn of_us(unix_us: i64) -> Month {
        Month::of_unix_secs(unix_us.div_euclid(1_000_000))
    }

    /// The month holding `unix_secs` (seconds since the epoch).
    pub fn of_unix_secs(unix_secs: i64) -> Month {
        let (year, month) = civil_from_days(unix_secs.div_euclid(86_400));
        Month { year, month }
    }

    /// The month's first microsecond since the epoch.
    pub fn start_us(self) -> i64 {
        days_from_civil(self.year, self.month) * 86_400 * 1_000_000
    }

    /// The first microsecond after the month.
    pub fn end_us(self) -> i64 {
        self.next().start_us()
    }

    pub fn next(self) -> Month {
        if self.month == 12 {
            Month {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Month {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    /// Months from `self` to `last`, both included.
    pub fn through(self, last: Month) -> impl Iterator<Item = Month> {
        std::iter::successors(Some(self), |m| Some(m.next())).take_while(move |m| *m <= last)
    }

    /// `YYYY_MM`: the suffix of the month's usage partition.
    pub fn table_suffix(self) -> String {
        format!("{:04}_{:02}", self.year, self.month)
    }
}

/// A text that is not a month written "YYYY-MM".
#[derive(Debug, thiserror::Error)]
#[error("not a month (YYYY-MM): {0:?}")]
pub struct NotAMonth(String);

/// For columns that hold a month: parsed when the row is read.
impl TryFrom<String> for Month {
    type Error = NotAMonth;

    fn try_from(text: String) -> Result<Month, NotAMonth> {
        Month::parse(&text).ok_or(NotAMonth(text))
    }
}

impl std::fmt::Display for Month {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(unix_secs: i64) -> String {
        Month::of_unix_secs(unix_secs).to_string()
    }

    #[test]
    fn months_and_their_ends() {
        // 2026-11-28T22:00:00Z
        let t = 1_795_903_200;
        assert_eq!(key(t), "2026-11");
        assert_eq!(secs_until_month_end(t), 2 * 86_400 + 2 * 3600);
        assert_eq!(key(0), "1970-01");
        // 2024-02-29 (leap day) is still February; 2024-03-01 is March.
        assert_eq!(key(1_709_164_800), "2024-02");
        assert_eq!(key(1_709_251_200), "2024-03");
        assert_eq!(key(1_735_689_599), "2024-12");
        assert_eq!(key(1_735_689_600), "2025-01");
        let month = Month::of_us(t * 1_000_000);
        assert_eq!(month.table_suffix(), "2026_11");
        let (start, end) = (month.start_us() / 1_000_000, month.end_us() / 1_000_000);
        assert_eq!(key(start), "2026-11");
        assert_eq!(key(start - 1), "2026-10");
        assert_eq!(key(end), "2026-12");
        assert_eq!(key(end - 1), "2026-11");
    }

    #[test]
    fn parses_only_year_dash_month() {
        let m = Month::parse("2026-11").expect("valid");
        assert_eq!(m.to_string(), "2026-11");
        assert_eq!(m.next().to_string(), "2026-12");
        assert_eq!(m.next().next().to_string(), "2027-01");
        for bad in [
            "2026-13",
            "2026-00",
            "2026-1",
            "26-11",
            "2026/11",
            "2026-11-01",
            "",
            "é12-345",
            "+026-11",
        ] {
            assert!(Month::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn bounds_and_membership() {
        let m = Month::parse("2024-02").expect("valid");
        assert_eq!(Month::of_us(m.start_us()), m);
        assert_eq!(Month::of_us(m.end_us() - 1), m);
        assert_eq!(Month::of_us(m.end_us()).to_string(), "2024-03");
        assert_eq!(
            (m.end_us() - m.start_us()) / 86_400_000_000,
            29,
            "leap February"
        );
        let months: Vec<String> = Month::parse("2025-11")
            .expect("valid")
            .through(Month::parse("2026-02").expect("valid"))
            .map(|m| m.to_string())
            .collect();
        assert_eq!(months, ["2025-11", "2025-12", "2026-01", "2026-02"]);
    }
}
