//! Exact money: ISO 4217 currencies with their minor units, the one rounding
//! rule, and decimal text for people.
//!
//! Amounts are `i64` nanos (billionths of the major unit, as `Money` in
//! common.proto); products are taken in `i128`, so no intermediate value can
//! overflow, and a result that does not fit `i64` is an error, never a wrap.
//! Floats never appear.
//!
//! **The rounding rule**, applied once per invoice line and nowhere else:
//! `amount = quantity x unit_price / per`, rounded half to even to the
//! currency's minor unit (cents for USD, whole yen for JPY, thousandths for
//! KWD), where `per` is 1,000,000 for per-million-token prices and 1,000 for
//! energy billed in watt-hours at a per-kWh price.
//!
//! Knows nothing of invoices, the database or gRPC.

/// Nanos in one major unit (1 USD = 1_000_000_000 nanos).
pub const NANOS_PER_UNIT: i64 = 1_000_000_000;

/// An ISO 4217 currency and the digits of its minor unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Currency {
    pub code: &'static str,
    pub minor_units: u8,
}

/// Active ISO 4217 codes with their minor units (the standard's list one,
/// without funds codes and precious metals, which are not billed in).
#[rustfmt::skip]
const CURRENCIES: &[(&str, u8)] = &[
    ("AED", 2), ("AFN", 2), ("ALL", 2), ("AMD", 2), ("ANG", 2), ("AOA", 2), ("ARS", 2),
    ("AUD", 2), ("AWG", 2), ("AZN", 2), ("BAM", 2), ("BBD", 2), ("BDT", 2), ("BGN", 2),
    ("BHD", 3), ("BIF", 0), ("BMD", 2), ("BND", 2), ("BOB", 2), ("BRL", 2), ("BSD", 2),
    ("BTN", 2), ("BWP", 2), ("BYN", 2), ("BZD", 2), ("CAD", 2), ("CDF", 2), ("CHF", 2),
    ("CLF", 4), ("CLP", 0), ("CNY", 2), ("COP", 2), ("CRC", 2), ("CUP", 2), ("CVE", 2),
    ("CZK", 2), ("DJF", 0), ("DKK", 2), ("DOP", 2), ("DZD", 2), ("EGP", 2), ("ERN", 2),
    ("ETB", 2), ("EUR", 2), ("FJD", 2), ("FKP", 2), ("GBP", 2), ("GEL", 2), ("GHS", 2),
    ("GIP", 2), ("GMD", 2), ("GNF", 0), ("GTQ", 2), ("GYD", 2), ("HKD", 2), ("HNL", 2),
    ("HTG", 2), ("HUF", 2), ("IDR", 2), ("ILS", 2), ("INR", 2), ("IQD", 3), ("IRR", 2),
    ("ISK", 0), ("JMD", 2), ("JOD", 3), ("JPY", 0), ("KES", 2), ("KGS", 2), ("KHR", 2),
    ("KMF", 0), ("KPW", 2), ("KRW", 0), ("KWD", 3), ("KYD", 2), ("KZT", 2), ("LAK", 2),
    ("LBP", 2), ("LKR", 2), ("LRD", 2), ("LSL", 2), ("LYD", 3), ("MAD", 2), ("MDL", 2),
    ("MGA", 2), ("MKD", 2), ("MMK", 2), ("MNT", 2), ("MOP", 2), ("MRU", 2), ("MUR", 2),
    ("MVR", 2), ("MWK", 2), ("MXN", 2), ("MYR", 2), ("MZN", 2), ("NAD", 2), ("NGN", 2),
    ("NIO", 2), ("NOK", 2), ("NPR", 2), ("NZD", 2), ("OMR", 3), ("PAB", 2), ("PEN", 2),
    ("PGK", 2), ("PHP", 2), ("PKR", 2), ("PLN", 2), ("PYG", 0), ("QAR", 2), ("RON", 2),
    ("RSD", 2), ("RUB", 2), ("RWF", 0), ("SAR", 2), ("SBD", 2), ("SCR", 2), ("SDG", 2),
    ("SEK", 2), ("SGD", 2), ("SHP", 2), ("SLE", 2), ("SOS", 2), ("SRD", 2), ("SSP", 2),
    ("STN", 2), ("SVC", 2), ("SYP", 2), ("SZL", 2), ("THB", 2), ("TJS", 2), ("TMT", 2),
    ("TND", 3), ("TOP", 2), ("TRY", 2), ("TTD", 2), ("TWD", 2), ("TZS", 2), ("UAH", 2),
    ("UGX", 0), ("USD", 2), ("UYU", 2), ("UYW", 4), ("UZS", 2), ("VES", 2), ("VND", 0),
    ("VUV", 0), ("WST", 2), ("XAF", 0), ("XCD", 2), ("XOF", 0), ("XPF", 0), ("YER", 2),
    ("ZAR", 2), ("ZMW", 2), ("ZWG", 2),
];

impl Currency {
    /// The currency with this ISO 4217 code (upper case), if it is one.
    pub fn find(code: &str) -> Option<Currency> {
        CURRENCIES
            .iter()
            .find(|(c, _)| *c == code)
            .map(|&(code, minor_units)| Currency { code, minor_units })
    }

    /// Nanos in one minor unit: 10_000_000 for cents, 1_000_000_000 for yen.
    pub fn minor_unit_nanos(self) -> i64 {
        10_i64.pow(9 - u32::from(self.minor_units.min(9)))
    }
}

/// `numerator / denominator` rounded half to even; `denominator` > 0.
/// Euclidean division keeps the rule right for negative numerators.
pub fn div_round_half_even(numerator: i128, denominator: i128) -> i128 {
    let quotient = numerator.div_euclid(denominator);
    let remainder = numerator.rem_euclid(denominator);
    match (2 * remainder).cmp(&denominator) {
        std::cmp::Ordering::Less => quotient,
        std::cmp::Ordering::Greater => quotient + 1,
        std::cmp::Ordering::Equal if quotient % 2 == 0 => quotient,
        std::cmp::Ordering::Equal => quotient + 1,
    }
}

/// The amount of one invoice line: `quantity x unit_price_nanos / per`,
/// rounded half to even to `currency`'s minor unit, in nanos. `None` if the
/// result does not fit an `i64`.
pub fn line_amount(
    quantity: i64,
    unit_price_nanos: i64,
    per: i64,
    currency: Currency,
) -> Option<i64> {
    let step = i128::from(currency.minor_unit_nanos());
    let exact = i128::from(quantity) * i128::from(unit_price_nanos);
    let minor_units = div_round_half_even(exact, i128::from(per) * step);
    i64::try_from(minor_units * step).ok()
}

/// Nanos as a decimal string with at least `min_decimals` decimals and no
/// trailing zeros beyond them: `format_decimal(1_230_000_000, 2)` is "1.23",
/// `format_decimal(80_000_000, 2)` is "0.08", `format_decimal(5, 2)` is
/// "0.000000005".
pub fn format_decimal(nanos: i64, min_decimals: u8) -> String {
    let negative = nanos < 0;
    let magnitude = nanos.unsigned_abs();
    let units = magnitude / NANOS_PER_UNIT.unsigned_abs();
    let fraction = format!("{:09}", magnitude % NANOS_PER_UNIT.unsigned_abs());
    let keep = fraction
        .trim_end_matches('0')
        .len()
        .max(usize::from(min_decimals.min(9)));
    let sign = if negative { "-" } else { "" };
    if keep == 0 {
        format!("{sign}{units}")
    } else {
        format!("{sign}{units}.{}", &fraction[..keep])
    }
}

/// A decimal amount such as "0.08" or "12" to nanos. At most 9 decimals;
/// `None` if it is not a plain decimal or does not fit.
pub fn parse_decimal(text: &str) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (units, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if units.is_empty() || !all_digits(units) || !all_digits(fraction) || fraction.len() > 9 {
        return None;
    }
    if digits.contains('.') && fraction.is_empty() {
        return None;
    }
    let units: i64 = units.parse().ok()?;
    let fraction_nanos: i64 = format!("{fraction:0<9}").parse().ok()?;
    let nanos = units
        .checked_mul(NANOS_PER_UNIT)?
        .checked_add(fraction_nanos)?;
    Some(if negative { -nanos } else { nanos })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd() -> Currency {
        Currency::find("USD").expect("USD")
    }

    #[test]
    fn currencies_know_their_minor_units() {
        assert_eq!(usd().minor_unit_nanos(), 10_000_000);
        assert_eq!(Currency::find("JPY").expect("JPY").minor_units, 0);
        assert_eq!(Currency::find("KWD").expect("KWD").minor_units, 3);
        assert!(Currency::find("XYZ").is_none());
        assert!(Currency::find("usd").is_none(), "codes are upper case");
    }

    #[test]
    fn half_even_at_the_exact_half() {
        assert_eq!(div_round_half_even(5, 10), 0);
        assert_eq!(div_round_half_even(15, 10), 2);
        assert_eq!(div_round_half_even(25, 10), 2);
        assert_eq!(div_round_half_even(26, 10), 3);
        assert_eq!(div_round_half_even(24, 10), 2);
        // Negative amounts (credits) round symmetrically.
        assert_eq!(div_round_half_even(-5, 10), 0);
        assert_eq!(div_round_half_even(-15, 10), -2);
        assert_eq!(div_round_half_even(-25, 10), -2);
        assert_eq!(div_round_half_even(-26, 10), -3);
        assert_eq!(div_round_half_even(-24, 10), -2);
    }

    #[test]
    fn line_amounts_round_once_to_the_minor_unit() {
        // 1,000,000 tokens at $0.08 per million: exactly 8 cents.
        assert_eq!(
            line_amount(1_000_000, 80_000_000, 1_000_000, usd()),
            Some(80_000_000)
        );
        // 62,500 tokens at $0.08/M = $0.005 exactly: half a cent, to even (0).
        assert_eq!(line_amount(62_500, 80_000_000, 1_000_000, usd()), Some(0));
        // 187,500 tokens = $0.015: half, to even (2 cents).
        assert_eq!(
            line_amount(187_500, 80_000_000, 1_000_000, usd()),
            Some(20_000_000)
        );
        // Just above the half rounds up.
        assert_eq!(
            line_amount(62_501, 80_000_000, 1_000_000, usd()),
            Some(10_000_000)
        );
        // A credit (negative price) rounds half-even too.
        assert_eq!(
            line_amount(187_500, -80_000_000, 1_000_000, usd()),
            Some(-20_000_000)
        );
        // JPY has no minor unit: 1,500,000 tokens at 15 yen/M = 22.5 -> 22.
        let jpy = Currency::find("JPY").expect("JPY");
        assert_eq!(
            line_amount(1_500_000, 15_000_000_000, 1_000_000, jpy),
            Some(22_000_000_000)
        );
        // Energy: 1,500 Wh at $0.25 per kWh = $0.375 -> $0.38 (8 is even).
        assert_eq!(
            line_amount(1_500, 250_000_000, 1_000, usd()),
            Some(380_000_000)
        );
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        assert_eq!(line_amount(i64::MAX, i64::MAX, 1_000_000, usd()), None);
        // Large but representable: 10^15 tokens at $1/M = $1e9.
        assert_eq!(
            line_amount(1_000_000_000_000_000, NANOS_PER_UNIT, 1_000_000, usd()),
            Some(1_000_000_000 * NANOS_PER_UNIT)
        );
    }

    #[test]
    fn decimals_round_trip() {
        assert_eq!(format_decimal(1_230_000_000, 2), "1.23");
        assert_eq!(format_decimal(80_000_000, 2), "0.08");
        assert_eq!(format_decimal(75_000_000, 2), "0.075");
        assert_eq!(format_decimal(22_000_000_000, 0), "22");
        assert_eq!(format_decimal(-20_000_000, 2), "-0.02");
        assert_eq!(format_decimal(0, 2), "0.00");
        assert_eq!(parse_decimal("0.08"), Some(80_000_000));
        assert_eq!(parse_decimal("12"), Some(12 * NANOS_PER_UNIT));
        assert_eq!(parse_decimal("-1.5"), Some(-1_500_000_000));
        assert_eq!(parse_decimal("0.0000000001"), None, "finer than nanos");
        assert_eq!(parse_decimal("1e3"), None);
        assert_eq!(parse_decimal("1."), None);
        assert_eq!(parse_decimal(""), None);
        assert_eq!(parse_decimal("99999999999"), None, "does not fit");
    }
}
