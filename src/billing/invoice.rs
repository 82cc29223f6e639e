//! Invoices and their lines, and the one function that prices usage into
//! lines: per model x device class x kind (prompt tokens computed, prompt
//! tokens served from the prefix cache, completion tokens, energy) x price in
//! effect, each line rounded once (see `money`).
//!
//! Pure: it gets usage already totalled per bucket (a stretch of time in
//! which no price changes) and a price book, and knows nothing of SQL, time
//! windows or gRPC.

use std::collections::BTreeMap;

use super::BillingError;
use super::money::{Currency, div_round_half_even, line_amount};
use super::prices::PriceBook;
use crate::calendar::Month;

/// Millijoules in a watt-hour: energy lines bill whole Wh.
pub(crate) const MJ_PER_WH: i64 = 3_600_000;
/// Token prices are per million tokens.
pub(crate) const TOKENS_PER_PRICE_UNIT: i64 = 1_000_000;
/// Energy prices are per kWh; energy quantities are Wh.
pub(crate) const WH_PER_PRICE_UNIT: i64 = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LineKind {
    /// Prompt tokens computed (cache misses), at the prompt price.
    PromptTokens,
    /// Prompt tokens served from the prefix cache, at the cache-hit price.
    CachedPromptTokens,
    CompletionTokens,
    Energy,
}

impl LineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LineKind::PromptTokens => "prompt_tokens",
            LineKind::CachedPromptTokens => "cached_prompt_tokens",
            LineKind::CompletionTokens => "completion_tokens",
            LineKind::Energy => "energy",
        }
    }

    pub fn parse(text: &str) -> Option<LineKind> {
        match text {
            "prompt_tokens" => Some(LineKind::PromptTokens),
            "cached_prompt_tokens" => Some(LineKind::CachedPromptTokens),
            "completion_tokens" => Some(LineKind::CompletionTokens),
            "energy" => Some(LineKind::Energy),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvoiceStatus {
    /// The month is open or in its grace period; computed from usage on read.
    Draft,
    /// Stored and immutable (database triggers).
    Finalized,
}

impl InvoiceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            InvoiceStatus::Draft => "draft",
            InvoiceStatus::Finalized => "finalized",
        }
    }

    pub fn parse(text: &str) -> Option<InvoiceStatus> {
        match text {
            "draft" => Some(InvoiceStatus::Draft),
            "finalized" => Some(InvoiceStatus::Finalized),
            _ => None,
        }
    }
}

/// A stored invoice status that is neither `draft` nor `finalized`.
#[derive(Debug, thiserror::Error)]
#[error("unknown invoice status {0:?}")]
pub struct UnknownStatus(String);

/// For the `status` column: parsed when the row is read.
impl TryFrom<String> for InvoiceStatus {
    type Error = UnknownStatus;

    fn try_from(text: String) -> Result<InvoiceStatus, UnknownStatus> {
        InvoiceStatus::parse(&text).ok_or(UnknownStatus(text))
    }
}

/// One line of an invoice, with the invoice fields an export row needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceLine {
    pub invoice_id: String,
    pub line_number: u32,
    pub model: String,
    /// The device profile the usage ran on.
    pub device_class: String,
    pub kind: LineKind,
    /// Tokens, or watt-hours for energy lines.
    pub quantity: i64,
    /// Per million tokens, or per kWh.
    pub unit_price_nanos: i64,
    pub amount_nanos: i64,
    /// "" for the invoice's own period; else the period whose late usage
    /// this line bills.
    pub adjusts_period: String,
    pub price_effective_from_us: i64,
    pub tenant_id: String,
    pub tenant_slug: String,
    pub period: String,
    pub currency_code: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invoice {
    pub id: String,
    pub tenant_id: String,
    pub tenant_slug: String,
    pub period: Month,
    pub status: InvoiceStatus,
    pub currency_code: String,
    pub total_nanos: i64,
    pub lines: Vec<InvoiceLine>,
    pub created_at_us: i64,
    pub finalized_at_us: Option<i64>,
    pub grace_ends_at_us: i64,
}

/// Usage of one model on one device in one bucket: a stretch of time that
/// starts at `bucket_start_us` and inside which no price changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageGroup {
    pub model: String,
    pub device: String,
    pub bucket_start_us: i64,
    pub prompt_tokens: i64,
    /// Of `prompt_tokens`, those served from the prefix cache.
    pub cached_prompt_tokens: i64,
    pub completion_tokens: i64,
    pub energy_mj: i64,
}

/// What makes two quantities one line. Ordered so that lines come out by
/// adjusted period ("" first), model, device, price and kind.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct LineKey {
    adjusts_period: String,
    model: String,
    device: String,
    effective_from_us: i64,
    price_device_class: String,
    kind: LineKind,
}

/// Prices `groups` with `book` into numbered lines (header fields left
/// empty for the caller). `adjustment`: the usage is late usage of earlier
/// periods, and each line names the period it adjusts. Lines with nothing
/// to bill are left out.
pub fn price_lines(
    groups: &[UsageGroup],
    adjustment: bool,
    book: &PriceBook,
    currency: Currency,
    first_line_number: u32,
) -> Result<Vec<InvoiceLine>, BillingError> {
    let mut totals: BTreeMap<LineKey, (i64, i64)> = BTreeMap::new();
    for group in groups {
        let price = book
            .price_at(&group.model, &group.device, group.bucket_start_us)
            .ok_or_else(|| {
                BillingError::Precondition(format!(
                    "plan `{}` has no price for model `{}` on device `{}` in effect at {} \
                     (microseconds since the epoch): add one with PutPrices",
                    book.plan, group.model, group.device, group.bucket_start_us
                ))
            })?;
        let adjusts_period = if adjustment {
            Month::of_us(group.bucket_start_us).to_string()
        } else {
            String::new()
        };
        let mut add =
            |kind: LineKind, quantity: i64, unit_price: i64| -> Result<(), BillingError> {
                let key = LineKey {
                    adjusts_period: adjusts_period.clone(),
                    model: group.model.clone(),
                    device: group.device.clone(),
                    effective_from_us: price.effective_from_us,
                    price_device_class: price.device_class.clone(),
                    kind,
                };
                let entry = totals.entry(key).or_insert((0, unit_price));
                entry.0 = entry.0.checked_add(quantity).ok_or_else(|| {
                    BillingError::Overflow(format!(
                        "{} quantity of model `{}`",
                        kind.as_str(),
                        group.model
                    ))
                })?;
                Ok(())
            };
        let cached = group
            .cached_prompt_tokens
            .clamp(0, group.prompt_tokens.max(0));
        add(
            LineKind::PromptTokens,
            group.prompt_tokens - cached,
            price.prompt_per_million_nanos,
        )?;
        add(
            LineKind::CachedPromptTokens,
            cached,
            price.cache_hit_per_million_nanos(),
        )?;
        add(
            LineKind::CompletionTokens,
            group.completion_tokens,
            price.completion_per_million_nanos,
        )?;
        if let Some(per_kwh) = price.per_kwh_nanos {
            add(LineKind::Energy, group.energy_mj, per_kwh)?;
        }
    }
    let mut lines = Vec::with_capacity(totals.len());
    let mut number = first_line_number;
    for (key, (raw_quantity, unit_price)) in totals {
        let (quantity, per) = match key.kind {
            LineKind::Energy => (
                // Whole watt-hours, half-even: the quantity the line shows is
                // the one it charges.
                i64::try_from(div_round_half_even(
                    i128::from(raw_quantity),
                    i128::from(MJ_PER_WH),
                ))
                .unwrap_or(i64::MAX),
                WH_PER_PRICE_UNIT,
            ),
            _ => (raw_quantity, TOKENS_PER_PRICE_UNIT),
        };
        if quantity == 0 {
            continue;
        }
        let amount = line_amount(quantity, unit_price, per, currency).ok_or_else(|| {
            BillingError::Overflow(format!(
                "{} x {} nanos per unit of model `{}`",
                quantity, unit_price, key.model
            ))
        })?;
        lines.push(InvoiceLine {
            invoice_id: String::new(),
            line_number: number,
            model: key.model,
            device_class: key.device,
            kind: key.kind,
            quantity,
            unit_price_nanos: unit_price,
            amount_nanos: amount,
            adjusts_period: key.adjusts_period,
            price_effective_from_us: key.effective_from_us,
            tenant_id: String::new(),
            tenant_slug: String::new(),
            period: String::new(),
            currency_code: String::new(),
        });
        number += 1;
    }
    Ok(lines)
}

/// What the lines cost before the invoice's rounding to the minor unit:
/// each line's `quantity x unit price / per` rounded half to even to the
/// nano, summed. This is what a month of per-request quotes adds up to
/// (within a nano per request), and what spend budgets count.
pub fn exact_total(lines: &[InvoiceLine]) -> Result<i64, BillingError> {
    let nano = Currency {
        code: "",
        minor_units: 9,
    };
    lines.iter().try_fold(0_i64, |sum, line| {
        let per = match line.kind {
            LineKind::Energy => WH_PER_PRICE_UNIT,
            _ => TOKENS_PER_PRICE_UNIT,
        };
        line_amount(line.quantity, line.unit_price_nanos, per, nano)
            .and_then(|amount| sum.checked_add(amount))
            .ok_or_else(|| BillingError::Overflow("exact invoice total".to_owned()))
    })
}

/// The sum of the lines' amounts, or an error if it does not fit.
pub fn total(lines: &[InvoiceLine]) -> Result<i64, BillingError> {
    lines.iter().try_fold(0_i64, |sum, line| {
        sum.checked_add(line.amount_nanos)
            .ok_or_else(|| BillingError::Overflow("invoice total".to_owned()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::prices::Price;

    fn price(model: &str, from: i64, prompt: i64, per_kwh: Option<i64>) -> Price {
        Price {
            model: model.to_owned(),
            device_class: String::new(),
            prompt_per_million_nanos: prompt,
            cached_prompt_per_million_nanos: None,
            completion_per_million_nanos: 2 * prompt,
            per_kwh_nanos: per_kwh,
            effective_from_us: from,
        }
    }

    fn group(model: &str, start: i64, prompt: i64, completion: i64, mj: i64) -> UsageGroup {
        UsageGroup {
            model: model.to_owned(),
            device: "ascend-910b".to_owned(),
            bucket_start_us: start,
            prompt_tokens: prompt,
            cached_prompt_tokens: 0,
            completion_tokens: completion,
            energy_mj: mj,
        }
    }

    #[test]
    fn cache_hits_get_lines_of_their_own_at_their_price() {
        let usd = Currency::find("USD").expect("USD");
        let mut with_hits = price("m", 0, 80_000_000, None);
        with_hits.cached_prompt_per_million_nanos = Some(20_000_000);
        let book = PriceBook::new("p", vec![with_hits]);
        let mut g = group("m", 0, 1_000_000, 0, 0);
        g.cached_prompt_tokens = 600_000;
        let lines = price_lines(&[g.clone()], false, &book, usd, 1).expect("priced");
        let of = |kind| {
            lines
                .iter()
                .find(|l| l.kind == kind)
                .map(|l| (l.quantity, l.unit_price_nanos, l.amount_nanos))
        };
        // 400,000 computed at $0.08/M = $0.032; 600,000 hits at $0.02/M = $0.012.
        assert_eq!(
            of(LineKind::PromptTokens),
            Some((400_000, 80_000_000, 30_000_000))
        );
        assert_eq!(
            of(LineKind::CachedPromptTokens),
            Some((600_000, 20_000_000, 10_000_000))
        );
        // No cache-hit price: hits are billed at the prompt price, still apart.
        let book = PriceBook::new("p", vec![price("m", 0, 80_000_000, None)]);
        let lines = price_lines(&[g], false, &book, usd, 1).expect("priced");
        let hits = lines
            .iter()
            .find(|l| l.kind == LineKind::CachedPromptTokens)
            .expect("hit line");
        assert_eq!(
            (hits.quantity, hits.unit_price_nanos),
            (600_000, 80_000_000)
        );
    }

    #[test]
    fn buckets_under_one_price_make_one_line_rounded_once() {
        let usd = Currency::find("USD").expect("USD");
        let book = PriceBook::new("p", vec![price("m", 0, 80_000_000, None)]);
        // Two buckets of 31,250 tokens: each alone is a quarter cent, together
        // half a cent, which rounds once, to even: 0.
        let groups = [group("m", 0, 31_250, 0, 0), group("m", 10, 31_250, 0, 0)];
        let lines = price_lines(&groups, false, &book, usd, 1).expect("priced");
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0].quantity, 62_500);
        assert_eq!(lines[0].amount_nanos, 0);
    }

    #[test]
    fn a_price_change_splits_lines_and_energy_bills_whole_wh() {
        let usd = Currency::find("USD").expect("USD");
        let book = PriceBook::new(
            "p",
            vec![
                price("m", 0, 80_000_000, Some(250_000_000)),
                price("m", 100, 100_000_000, Some(250_000_000)),
            ],
        );
        let groups = [
            group("m", 0, 1_000_000, 500_000, 5_400_000),
            group("m", 100, 2_000_000, 0, 0),
        ];
        let lines = price_lines(&groups, false, &book, usd, 1).expect("priced");
        let summary: Vec<(i64, LineKind, i64, i64)> = lines
            .iter()
            .map(|l| {
                (
                    l.price_effective_from_us,
                    l.kind,
                    l.quantity,
                    l.amount_nanos,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (0, LineKind::PromptTokens, 1_000_000, 80_000_000),
                (0, LineKind::CompletionTokens, 500_000, 80_000_000),
                // 5.4 MJ... 5,400,000 mJ = 1.5 Wh -> 2 Wh; 2 Wh x $0.25/kWh = $0.0005 -> $0.00.
                (0, LineKind::Energy, 2, 0),
                (100, LineKind::PromptTokens, 2_000_000, 200_000_000),
            ]
        );
        assert_eq!(
            lines.iter().map(|l| l.line_number).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(total(&lines).expect("total"), 360_000_000);
    }

    #[test]
    fn usage_without_a_price_is_refused_by_name() {
        let usd = Currency::find("USD").expect("USD");
        let book = PriceBook::new("p", vec![price("m", 100, 1, None)]);
        let err = price_lines(&[group("m", 0, 1, 1, 0)], false, &book, usd, 1)
            .expect_err("no price before 100");
        assert!(err.to_string().contains("model `m`"), "{err}");
        let err = price_lines(&[group("other", 200, 1, 1, 0)], false, &book, usd, 1)
            .expect_err("unknown model");
        assert!(err.to_string().contains("`other`"), "{err}");
    }

    #[test]
    fn adjustments_name_the_period_they_adjust() {
        let usd = Currency::find("USD").expect("USD");
        let book = PriceBook::new("p", vec![price("m", 0, 1_000_000_000, None)]);
        let october = Month::parse("2026-10").expect("period");
        let lines = price_lines(
            &[group("m", october.start_us(), 1_000_000, 0, 0)],
            true,
            &book,
            usd,
            7,
        )
        .expect("priced");
        assert_eq!(lines[0].adjusts_period, "2026-10");
        assert_eq!(lines[0].line_number, 7);
        assert_eq!(lines[0].amount_nanos, 1_000_000_000);
    }
}
