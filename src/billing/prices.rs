//! Price plans and their prices: what a change must satisfy, and which price
//! is in effect for a model on a device at a moment.
//!
//! A price is written once and never edited (the database refuses updates);
//! a change is a new price with a later `effective_from`. Knows nothing of
//! SQL or gRPC.

use super::BillingError;
use super::money::Currency;

/// Prices per million tokens (and optionally per kWh) of one model on one
/// device class, from `effective_from_us` on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price {
    pub model: String,
    /// A device profile such as "ascend-910b"; empty matches any device.
    pub device_class: String,
    pub prompt_per_million_nanos: i64,
    /// Per million prompt tokens served from the prefix cache; `None`: the prompt price.
    pub cached_prompt_per_million_nanos: Option<i64>,
    pub completion_per_million_nanos: i64,
    pub per_kwh_nanos: Option<i64>,
    pub effective_from_us: i64,
}

impl Price {
    /// What a million cache-hit prompt tokens cost.
    pub fn cache_hit_per_million_nanos(&self) -> i64 {
        self.cached_prompt_per_million_nanos
            .unwrap_or(self.prompt_per_million_nanos)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PricePlan {
    pub name: String,
    pub currency_code: String,
    pub description: String,
    pub prices: Vec<Price>,
}

/// An amount as the API gave it: a currency code (empty means the plan's)
/// and nanos.
#[derive(Debug, Clone, Default)]
pub struct MoneyInput {
    pub currency_code: String,
    pub nanos: i64,
}

/// One price of a `PutPrices` request, before validation.
#[derive(Debug, Clone, Default)]
pub struct PriceInput {
    pub model: String,
    pub device_class: String,
    pub prompt_per_million_tokens: Option<MoneyInput>,
    pub cached_prompt_per_million_tokens: Option<MoneyInput>,
    pub completion_per_million_tokens: Option<MoneyInput>,
    pub per_kwh: Option<MoneyInput>,
    /// `None`: from now on.
    pub effective_from_us: Option<i64>,
}

/// A `PutPrices` request, before validation.
#[derive(Debug, Clone, Default)]
pub struct PutPrices {
    pub plan: String,
    pub currency_code: String,
    pub description: String,
    pub prices: Vec<PriceInput>,
}

/// Plan names: 1 to 64 of a-z, 0-9, '-' and '_'.
pub fn validate_plan_name(name: &str) -> Result<(), BillingError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(BillingError::invalid(
            "plan",
            "1 to 64 characters of a-z, 0-9, '-' and '_'",
        ))
    }
}

/// The ISO 4217 currency named by `field`.
pub fn currency(field: &str, code: &str) -> Result<Currency, BillingError> {
    Currency::find(code).ok_or_else(|| {
        BillingError::invalid(
            field,
            format!("{code:?} is not an ISO 4217 currency code (e.g. \"USD\", \"EUR\", \"JPY\")"),
        )
    })
}

fn amount(
    field: String,
    money: Option<&MoneyInput>,
    plan_currency: Currency,
) -> Result<Option<i64>, BillingError> {
    let Some(money) = money else {
        return Ok(None);
    };
    if !money.currency_code.is_empty() && money.currency_code != plan_currency.code {
        return Err(BillingError::invalid(
            field,
            format!(
                "currency {:?} differs from the plan's {}",
                money.currency_code, plan_currency.code
            ),
        ));
    }
    if money.nanos < 0 {
        return Err(BillingError::invalid(field, "must not be negative"));
    }
    Ok(Some(money.nanos))
}

fn name_like(field: String, value: &str, may_be_empty: bool) -> Result<(), BillingError> {
    if value.is_empty() && !may_be_empty {
        return Err(BillingError::invalid(field, "required"));
    }
    if value.len() > 128 || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(BillingError::invalid(
            field,
            "at most 128 characters, without spaces",
        ));
    }
    Ok(())
}

/// Checks each price of a request against the plan's currency; `now_us`
/// stands in for a missing `effective_from`.
pub fn validate_prices(
    inputs: &[PriceInput],
    plan_currency: Currency,
    now_us: i64,
) -> Result<Vec<Price>, BillingError> {
    if inputs.is_empty() {
        return Err(BillingError::invalid("prices", "at least one price"));
    }
    let mut prices = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.iter().enumerate() {
        let field = |name: &str| format!("prices[{i}].{name}");
        name_like(field("model"), &input.model, false)?;
        name_like(field("device_class"), &input.device_class, true)?;
        let required = |name: &str, money: Option<&MoneyInput>| {
            amount(field(name), money, plan_currency)?
                .ok_or_else(|| BillingError::invalid(field(name), "required"))
        };
        let price = Price {
            model: input.model.clone(),
            device_class: input.device_class.clone(),
            prompt_per_million_nanos: required(
                "prompt_per_million_tokens",
                input.prompt_per_million_tokens.as_ref(),
            )?,
            cached_prompt_per_million_nanos: amount(
                field("cached_prompt_per_million_tokens"),
                input.cached_prompt_per_million_tokens.as_ref(),
                plan_currency,
            )?,
            completion_per_million_nanos: required(
                "completion_per_million_tokens",
                input.completion_per_million_tokens.as_ref(),
            )?,
            per_kwh_nanos: amount(field("per_kwh"), input.per_kwh.as_ref(), plan_currency)?,
            effective_from_us: input.effective_from_us.unwrap_or(now_us),
        };
        if prices.iter().any(|p: &Price| {
            p.model == price.model
                && p.device_class == price.device_class
                && p.effective_from_us == price.effective_from_us
        }) {
            return Err(BillingError::invalid(
                field("effective_from"),
                "repeats another price of the request for the same model and device class",
            ));
        }
        prices.push(price);
    }
    Ok(prices)
}

/// The prices of one plan, for looking up the price in effect.
#[derive(Debug, Clone, Default)]
pub struct PriceBook {
    pub plan: String,
    prices: Vec<Price>,
}

impl PriceBook {
    pub fn new(plan: impl Into<String>, prices: Vec<Price>) -> PriceBook {
        PriceBook {
            plan: plan.into(),
            prices,
        }
    }

    /// The price of `model` on `device` at `at_us`: the latest one in effect
    /// for exactly that device class, else the latest for any device ("").
    pub fn price_at(&self, model: &str, device: &str, at_us: i64) -> Option<&Price> {
        let latest = |class: &str| {
            self.prices
                .iter()
                .filter(|p| p.model == model && p.device_class == class)
                .filter(|p| p.effective_from_us <= at_us)
                .max_by_key(|p| p.effective_from_us)
        };
        latest(device).or_else(|| latest(""))
    }

    /// Every moment at which some price of the plan starts, ascending: between
    /// two of them no price changes.
    pub fn change_points(&self) -> Vec<i64> {
        let mut points: Vec<i64> = self.prices.iter().map(|p| p.effective_from_us).collect();
        points.sort_unstable();
        points.dedup();
        points
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(model: &str, device: &str, from: i64, prompt: i64) -> Price {
        Price {
            model: model.to_owned(),
            device_class: device.to_owned(),
            prompt_per_million_nanos: prompt,
            cached_prompt_per_million_nanos: None,
            completion_per_million_nanos: prompt,
            per_kwh_nanos: None,
            effective_from_us: from,
        }
    }

    #[test]
    fn exact_device_wins_then_any_device_then_nothing() {
        let book = PriceBook::new(
            "p",
            vec![
                price("m", "", 0, 1),
                price("m", "ascend-910b", 100, 2),
                price("m", "ascend-910b", 200, 3),
            ],
        );
        let at = |device: &str, t| {
            book.price_at("m", device, t)
                .map(|p| p.prompt_per_million_nanos)
        };
        assert_eq!(
            at("ascend-910b", 50),
            Some(1),
            "before its own price: any device"
        );
        assert_eq!(
            at("ascend-910b", 100),
            Some(2),
            "effective_from is inclusive"
        );
        assert_eq!(at("ascend-910b", 199), Some(2));
        assert_eq!(at("ascend-910b", 200), Some(3));
        assert_eq!(at("h100-sxm", 500), Some(1));
        assert_eq!(book.price_at("other", "", 500), None);
        assert_eq!(book.change_points(), vec![0, 100, 200]);
    }

    #[test]
    fn bad_prices_name_their_field() {
        let usd = Currency::find("USD").expect("USD");
        let money = |nanos| {
            Some(MoneyInput {
                currency_code: String::new(),
                nanos,
            })
        };
        let input = PriceInput {
            model: "small".to_owned(),
            prompt_per_million_tokens: money(1),
            completion_per_million_tokens: money(-1),
            ..PriceInput::default()
        };
        let mut hits = input.clone();
        hits.completion_per_million_tokens = money(1);
        hits.cached_prompt_per_million_tokens = money(-5);
        let err = validate_prices(&[hits], usd, 0).expect_err("negative hit price");
        assert!(
            err.to_string()
                .contains("prices[0].cached_prompt_per_million_tokens"),
            "{err}"
        );
        let err = validate_prices(std::slice::from_ref(&input), usd, 0).expect_err("negative");
        assert!(
            err.to_string()
                .contains("prices[0].completion_per_million_tokens"),
            "{err}"
        );
        let mut eur = input.clone();
        eur.completion_per_million_tokens = Some(MoneyInput {
            currency_code: "EUR".to_owned(),
            nanos: 1,
        });
        let err = validate_prices(&[eur], usd, 0).expect_err("currency");
        assert!(err.to_string().contains("differs"), "{err}");
        assert!(currency("currency_code", "ABC").is_err());
        assert!(validate_plan_name("Big Plan").is_err());
    }
}
