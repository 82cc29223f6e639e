//! Billing periods: calendar months in UTC written "YYYY-MM", their bounds
//! in microseconds, and their order.
//!
//! Knows nothing of invoices, the database or gRPC.

use std::fmt;

use crate::calendar;

/// One calendar month (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Period {
    year: i64,
    month: u32,
}

impl Period {
    /// Parses "YYYY-MM" exactly (e.g. "2026-11"); `None` otherwise.
    pub fn parse(text: &str) -> Option<Period> {
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
            .then_some(Period { year, month })
    }

    /// The month holding `unix_us`.
    pub fn of_us(unix_us: i64) -> Period {
        let (year, month) = calendar::year_month_of_us(unix_us);
        Period { year, month }
    }

    pub fn start_us(self) -> i64 {
        calendar::month_start_us(self.year, self.month)
    }

    /// The first microsecond after the month.
    pub fn end_us(self) -> i64 {
        self.next().start_us()
    }

    pub fn next(self) -> Period {
        if self.month == 12 {
            Period {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Period {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    /// Periods from `self` to `last`, both included.
    pub fn through(self, last: Period) -> impl Iterator<Item = Period> {
        std::iter::successors(Some(self), |p| Some(p.next())).take_while(move |p| *p <= last)
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_year_dash_month() {
        let p = Period::parse("2026-11").expect("valid");
        assert_eq!(p.to_string(), "2026-11");
        assert_eq!(p.next().to_string(), "2026-12");
        assert_eq!(p.next().next().to_string(), "2027-01");
        for bad in [
            "2026-13",
            "2026-00",
            "2026-1",
            "26-11",
            "2026/11",
            "2026-11-01",
            "",
            "é12-345",
        ] {
            assert!(Period::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn bounds_and_membership() {
        let p = Period::parse("2024-02").expect("valid");
        assert_eq!(Period::of_us(p.start_us()), p);
        assert_eq!(Period::of_us(p.end_us() - 1), p);
        assert_eq!(Period::of_us(p.end_us()).to_string(), "2024-03");
        assert_eq!(
            (p.end_us() - p.start_us()) / 86_400_000_000,
            29,
            "leap February"
        );
        let months: Vec<String> = Period::parse("2025-11")
            .expect("valid")
            .through(Period::parse("2026-02").expect("valid"))
            .map(|p| p.to_string())
            .collect();
        assert_eq!(months, ["2025-11", "2025-12", "2026-01", "2026-02"]);
    }
}
