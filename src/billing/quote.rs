//! What one request costs, for the `Usage.cost` a client sees with its
//! answer: the tenant's plan's price in effect, applied to the request's
//! own tokens and energy, exact to the nano (half to even). The invoice
//! stays authoritative: it rounds once per line, to the currency's minor
//! unit, so a month of quotes may differ from it by those roundings.
//!
//! Plans are cached per name for `billing.price_cache_ttl`, so answering
//! costs no database round trip; a plan that cannot be read gives no quote
//! (never a failed request).
//!
//! Knows plans and prices; nothing of gRPC or of how requests are served.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::invoice::{MJ_PER_WH, TOKENS_PER_PRICE_UNIT, WH_PER_PRICE_UNIT};
use super::money::{Currency, div_round_half_even};
use super::prices::PriceBook;
use super::repo;
use crate::store::Db;

/// A plan's prices and currency, as read at one moment.
#[derive(Debug, Clone)]
pub struct PlanPrices {
    pub book: PriceBook,
    pub currency: Currency,
}

/// What a request used, in the units prices are per.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Consumption {
    pub prompt_tokens: u64,
    /// Of `prompt_tokens`, those served from the prefix cache.
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
    pub energy_mj: u64,
}

/// A quoted amount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    pub currency_code: &'static str,
    pub amount_nanos: i64,
}

impl PlanPrices {
    /// The cost of `used` on `model` and `device` under the price in effect
    /// at `at_us`; `None` when no price applies (or on overflow).
    pub fn quote(&self, model: &str, device: &str, at_us: i64, used: Consumption) -> Option<Quote> {
        let price = self.book.price_at(model, device, at_us)?;
        // Over a common denominator, per million tokens and per kWh:
        // tokens x price / 1e6 and mJ x price / (1e3 Wh x 3.6e3 mJ per Wh).
        let energy_per = i128::from(WH_PER_PRICE_UNIT) * i128::from(MJ_PER_WH);
        let tokens_per = i128::from(TOKENS_PER_PRICE_UNIT);
        let denominator = tokens_per * energy_per;
        let cached = used.cached_prompt_tokens.min(used.prompt_tokens);
        let computed = used.prompt_tokens - cached;
        let tokens = (i128::from(computed) * i128::from(price.prompt_per_million_nanos))
            .checked_add(i128::from(cached) * i128::from(price.cache_hit_per_million_nanos()))?
            .checked_add(
                i128::from(used.completion_tokens) * i128::from(price.completion_per_million_nanos),
            )?;
        let energy = price.per_kwh_nanos.map_or(0, |per_kwh| {
            i128::from(used.energy_mj) * i128::from(per_kwh)
        });
        let numerator = tokens
            .checked_mul(energy_per)?
            .checked_add(energy.checked_mul(tokens_per)?)?;
        Some(Quote {
            currency_code: self.currency.code,
            amount_nanos: i64::try_from(div_round_half_even(numerator, denominator)).ok()?,
        })
    }
}

/// How long an answer waits for a plan it has not cached: past this it goes
/// without a quote (a database outage must not slow every answer).
const READ_TIMEOUT: Duration = Duration::from_millis(500);

/// A plan as last read (`None`: it has no prices or could not be read).
type CachedPlan = (Instant, Option<Arc<PlanPrices>>);

/// Plans by name, each read at most once per `ttl`.
pub struct PriceCache {
    db: Db,
    ttl: Duration,
    plans: Mutex<HashMap<String, CachedPlan>>,
}

impl PriceCache {
    pub fn new(db: Db, ttl: Duration) -> PriceCache {
        PriceCache {
            db,
            ttl,
            plans: Mutex::new(HashMap::new()),
        }
    }

    /// The plan's prices (`None` if it has none or cannot be read now).
    pub async fn plan(&self, name: &str) -> Option<Arc<PlanPrices>> {
        if let Some((read_at, plan)) = self
            .plans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            && read_at.elapsed() < self.ttl
        {
            return plan.clone();
        }
        let read = tokio::time::timeout(READ_TIMEOUT, self.read(name));
        let plan = match read.await.unwrap_or_else(|_| {
            Err(super::BillingError::Precondition(
                "timed out reading the plan".to_owned(),
            ))
        }) {
            Ok(plan) => plan.map(Arc::new),
            Err(e) => {
                // A quote is a courtesy; the request goes on without one
                // and the invoice prices it later. Retried after the TTL.
                tracing::debug!(error = %e, plan = name, "price plan not readable for quotes");
                None
            }
        };
        self.plans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), (Instant::now(), plan.clone()));
        plan
    }

    async fn read(&self, name: &str) -> Result<Option<PlanPrices>, super::BillingError> {
        let mut conn = self.db.pool().acquire().await?;
        Ok(repo::fetch_book(&mut conn, name)
            .await?
            .map(|(book, currency)| PlanPrices { book, currency }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::Price;

    fn plan(per_kwh: Option<i64>) -> PlanPrices {
        PlanPrices {
            book: PriceBook::new(
                "p",
                vec![Price {
                    model: "m".to_owned(),
                    device_class: String::new(),
                    // $0.08 and $0.24 per million tokens.
                    prompt_per_million_nanos: 80_000_000,
                    cached_prompt_per_million_nanos: None,
                    completion_per_million_nanos: 240_000_000,
                    per_kwh_nanos: per_kwh,
                    effective_from_us: 100,
                }],
            ),
            currency: Currency::find("USD").expect("USD"),
        }
    }

    #[test]
    fn a_quote_is_exact_to_the_nano_on_known_inputs() {
        let used = Consumption {
            prompt_tokens: 1000,
            cached_prompt_tokens: 0,
            completion_tokens: 500,
            energy_mj: 7_200_000,
        };
        // 1000 x 0.08 / 1e6 + 500 x 0.24 / 1e6 USD = 80,000 + 120,000 nanos.
        let q = plan(None)
            .quote("m", "ascend-910b", 200, used)
            .expect("priced");
        assert_eq!(q.amount_nanos, 200_000);
        assert_eq!(q.currency_code, "USD");
        // 7.2e6 mJ is 2 Wh = 0.002 kWh; at $0.10/kWh that is $0.0002.
        let with_energy = plan(Some(100_000_000))
            .quote("m", "x", 200, used)
            .expect("priced");
        assert_eq!(with_energy.amount_nanos, 200_000 + 200_000);
        // One prompt token at $0.08/M is 80 nanos; one millijoule at
        // $0.10/kWh is 1e8 / 3.6e9 = 0.028 nanos, which rounds away.
        let one = Consumption {
            prompt_tokens: 1,
            cached_prompt_tokens: 0,
            completion_tokens: 0,
            energy_mj: 1,
        };
        let quoted = plan(Some(100_000_000)).quote("m", "x", 200, one);
        assert_eq!(quoted.expect("priced").amount_nanos, 80);
    }

    #[test]
    fn cache_hits_are_quoted_at_their_price_or_the_prompt_price() {
        let used = Consumption {
            prompt_tokens: 1000,
            cached_prompt_tokens: 600,
            completion_tokens: 0,
            energy_mj: 0,
        };
        // Without a cache-hit price every prompt token costs $0.08/M.
        let plain = plan(None).quote("m", "x", 200, used).expect("priced");
        assert_eq!(plain.amount_nanos, 80_000);
        // At $0.02/M for hits: 400 x 80 + 600 x 20 nanos.
        let mut cheaper = plan(None);
        let mut prices = vec![cheaper.book.price_at("m", "x", 200).expect("price").clone()];
        prices[0].cached_prompt_per_million_nanos = Some(20_000_000);
        cheaper.book = PriceBook::new("p", prices);
        let quoted = cheaper.quote("m", "x", 200, used).expect("priced");
        assert_eq!(quoted.amount_nanos, 400 * 80 + 600 * 20);
        // More hits than prompt tokens cannot happen; if it did, hits are capped.
        let odd = Consumption {
            cached_prompt_tokens: 5000,
            ..used
        };
        assert_eq!(
            cheaper
                .quote("m", "x", 200, odd)
                .expect("priced")
                .amount_nanos,
            1000 * 20
        );
    }

    #[test]
    fn no_price_in_effect_gives_no_quote() {
        let used = Consumption {
            prompt_tokens: 1,
            cached_prompt_tokens: 0,
            completion_tokens: 1,
            energy_mj: 1,
        };
        assert_eq!(
            plan(None).quote("m", "x", 99, used),
            None,
            "before it starts"
        );
        assert_eq!(
            plan(None).quote("other", "x", 200, used),
            None,
            "another model"
        );
    }
}
