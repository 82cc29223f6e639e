//! Field checks for tenant and key requests. Each failure names the field as
//! the API spells it.

use super::TenancyError;
use super::model::{Budget, Limits, Scope};

pub const MAX_WEIGHT: u32 = 10_000;

pub fn slug(slug: &str) -> Result<(), TenancyError> {
    let ok_chars = slug
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !(3..=63).contains(&slug.len()) || !ok_chars || slug.starts_with('-') || slug.ends_with('-')
    {
        return Err(TenancyError::invalid(
            "slug",
            "3 to 63 characters of a-z, 0-9 and '-', not starting or ending with '-'",
        ));
    }
    // Tenants are looked up by id or slug: a slug shaped like an id could
    // name another tenant.
    if uuid::Uuid::try_parse(slug).is_ok() {
        return Err(TenancyError::invalid(
            "slug",
            "must not have the form of a tenant id (a UUID)",
        ));
    }
    Ok(())
}

/// Characters that reorder the text around them when shown (the Unicode
/// bidirectional embeddings, overrides, isolates and marks): a name with
/// them displays differently from what it is.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

pub fn display_name(field: &'static str, name: &str) -> Result<(), TenancyError> {
    printable_text(field, name, 200)
}

/// Non-blank text of at most `max` characters with no control characters
/// and no bidirectional controls.
pub fn printable_text(field: &'static str, text: &str, max: usize) -> Result<(), TenancyError> {
    if text.trim().is_empty() || text.chars().count() > max || text.chars().any(char::is_control) {
        return Err(TenancyError::invalid(
            field,
            format!("1 to {max} printable characters"),
        ));
    }
    if text.chars().any(is_bidi_control) {
        return Err(TenancyError::invalid(
            field,
            "bidirectional control characters (U+202A..U+202E, U+2066..U+2069, U+200E, U+200F, U+061C) are not allowed",
        ));
    }
    Ok(())
}

pub fn weight(weight: u32) -> Result<(), TenancyError> {
    if weight == 0 || weight > MAX_WEIGHT {
        return Err(TenancyError::invalid(
            "scheduling_weight",
            format!("between 1 and {MAX_WEIGHT}"),
        ));
    }
    Ok(())
}

pub fn limits(limits: &Limits) -> Result<(), TenancyError> {
    if let Some(rps) = limits.requests_per_second
        && !(rps.is_finite()
            && (Limits::MIN_REQUESTS_PER_SECOND..=Limits::MAX_REQUESTS_PER_SECOND).contains(&rps))
    {
        return Err(TenancyError::invalid(
            "limits.requests_per_second",
            format!(
                "a number from {:.8} (one request per day) to {}",
                Limits::MIN_REQUESTS_PER_SECOND,
                Limits::MAX_REQUESTS_PER_SECOND
            ),
        ));
    }
    if let Some(burst) = limits.burst
        && !(1..=Limits::MAX_BURST).contains(&burst)
    {
        return Err(TenancyError::invalid(
            "limits.burst",
            format!("between 1 and {}", Limits::MAX_BURST),
        ));
    }
    if let (Some(rps), Some(burst)) = (limits.requests_per_second, limits.burst)
        && f64::from(burst) / rps > Limits::MAX_RATE_WINDOW_SECS as f64
    {
        return Err(TenancyError::invalid(
            "limits.burst",
            format!(
                "burst / requests_per_second is the time a spent burst takes to refill; at most {} days",
                Limits::MAX_RATE_WINDOW_SECS / 86_400
            ),
        ));
    }
    if limits.burst.is_some() && limits.requests_per_second.is_none() {
        return Err(TenancyError::invalid(
            "limits.burst",
            "needs limits.requests_per_second",
        ));
    }
    if limits.tokens_per_minute == Some(0) {
        return Err(TenancyError::invalid(
            "limits.tokens_per_minute",
            "must be positive",
        ));
    }
    if limits.max_concurrent_requests == Some(0) {
        return Err(TenancyError::invalid(
            "limits.max_concurrent_requests",
            "must be positive",
        ));
    }
    if limits.monthly_token_quota == Some(0) {
        return Err(TenancyError::invalid(
            "limits.monthly_token_quota",
            "must be positive",
        ));
    }
    if let Some(budget) = &limits.monthly_budget {
        if budget.amount_nanos == 0 {
            return Err(TenancyError::invalid(
                "limits.monthly_budget.amount_nanos",
                "must be positive (suspend the tenant to stop all spending)",
            ));
        }
        if budget.amount_nanos > Budget::MAX_NANOS {
            return Err(TenancyError::invalid(
                "limits.monthly_budget.amount_nanos",
                format!("at most {} major units", Budget::MAX_NANOS / 1_000_000_000),
            ));
        }
    }
    let too_big = |v: Option<u64>| v.is_some_and(|v| i64::try_from(v).is_err());
    if too_big(limits.tokens_per_minute) {
        return Err(TenancyError::invalid(
            "limits.tokens_per_minute",
            "too large",
        ));
    }
    if too_big(limits.monthly_token_quota) {
        return Err(TenancyError::invalid(
            "limits.monthly_token_quota",
            "too large",
        ));
    }
    Ok(())
}

/// Gives a budget without a currency the plan's (`plan_currency`), and
/// refuses one in another currency. `plan_changed`: the update moves the
/// tenant to another plan and keeps its budget, which must then already be
/// in the new plan's currency.
pub fn budget_currency(
    limits: &mut Limits,
    plan_currency: &str,
    plan_changed: bool,
) -> Result<(), TenancyError> {
    let Some(budget) = limits.monthly_budget.as_mut() else {
        return Ok(());
    };
    if budget.currency_code.is_empty() {
        budget.currency_code = plan_currency.to_owned();
    }
    if budget.currency_code != plan_currency {
        let (field, reason) = if plan_changed {
            (
                "price_plan",
                format!(
                    "the new plan bills in {plan_currency} but the monthly budget is in {}; set a budget in {plan_currency} in the same update, or clear it",
                    budget.currency_code
                ),
            )
        } else {
            (
                "limits.monthly_budget.currency_code",
                format!(
                    "{:?} is not the currency of the tenant's price plan ({plan_currency})",
                    budget.currency_code
                ),
            )
        };
        return Err(TenancyError::invalid(field, reason));
    }
    Ok(())
}

/// The most alert thresholds a tenant may have.
pub const MAX_BUDGET_ALERTS: usize = 10;

/// Budget alert percentages: 1 to 100, distinct, at most
/// [`MAX_BUDGET_ALERTS`]; returned ascending.
pub fn budget_alerts(percents: &[u32]) -> Result<Vec<u32>, TenancyError> {
    const FIELD: &str = "budget_alerts.percents";
    if percents.len() > MAX_BUDGET_ALERTS {
        return Err(TenancyError::invalid(
            FIELD,
            format!("at most {MAX_BUDGET_ALERTS} thresholds"),
        ));
    }
    let mut sorted = percents.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != percents.len() {
        return Err(TenancyError::invalid(FIELD, "each percentage once"));
    }
    if let Some(bad) = sorted.iter().find(|p| !(1..=100).contains(*p)) {
        return Err(TenancyError::invalid(
            FIELD,
            format!("{bad}: percentages of the budget, from 1 to 100"),
        ));
    }
    Ok(sorted)
}

/// Removes the named limit kinds; unknown names are an error.
pub fn clear_limits(limits: &mut Limits, names: &[String]) -> Result<(), TenancyError> {
    for name in names {
        match name.strip_prefix("limits.").unwrap_or(name) {
            "requests_per_second" => {
                limits.requests_per_second = None;
                limits.burst = None;
            }
            "burst" => limits.burst = None,
            "tokens_per_minute" => limits.tokens_per_minute = None,
            "max_concurrent_requests" => limits.max_concurrent_requests = None,
            "monthly_token_quota" => limits.monthly_token_quota = None,
            "monthly_budget" => limits.monthly_budget = None,
            _ => {
                return Err(TenancyError::invalid(
                    "clear_limits",
                    format!("unknown limit {name:?}; use a TenantLimits field name"),
                ));
            }
        }
    }
    Ok(())
}

pub fn scopes(scopes: &[String]) -> Result<Vec<Scope>, TenancyError> {
    if scopes.is_empty() {
        return Ok(vec![Scope::Inference]);
    }
    let mut parsed = Vec::new();
    for text in scopes {
        let scope = Scope::parse(text).ok_or_else(|| {
            let known: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
            TenancyError::invalid(
                "scopes",
                format!("unknown scope {text:?}; known: {}", known.join(", ")),
            )
        })?;
        if !parsed.contains(&scope) {
            parsed.push(scope);
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        for good in ["acme", "acme-corp", "a1b2", "abc"] {
            assert!(slug(good).is_ok(), "{good}");
        }
        for bad in [
            "ab",
            "Acme",
            "-acme",
            "acme-",
            "ac_me",
            "ácme",
            &"a".repeat(64),
            "0199a8f2-6a4e-7c3b-9d2e-1f0a2b3c4d5e",
            "0199a8f26a4e7c3b9d2e1f0a2b3c4d5e",
        ] {
            assert!(slug(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_refuse_bidi_controls() {
        assert!(display_name("display_name", "Acme Corp").is_ok());
        assert!(
            display_name("display_name", "شركة أكمي").is_ok(),
            "RTL text itself is fine"
        );
        for bad in ["evil\u{202E}gnp.exe", "a\u{2066}b", "x\u{200F}"] {
            let err = display_name("display_name", bad).expect_err(bad);
            assert!(err.to_string().contains("display_name"), "{err}");
        }
    }

    #[test]
    fn limits_must_be_positive_and_name_the_field() {
        let bad = Limits {
            requests_per_second: Some(f64::NAN),
            ..Limits::default()
        };
        let err = limits(&bad).expect_err("NaN rate");
        assert!(err.to_string().contains("limits.requests_per_second"));
        let bad = Limits {
            requests_per_second: Some(5.0),
            burst: Some(0),
            ..Limits::default()
        };
        assert!(
            limits(&bad)
                .expect_err("burst 0")
                .to_string()
                .contains("limits.burst")
        );
        let bad = Limits {
            max_concurrent_requests: Some(0),
            ..Limits::default()
        };
        assert!(limits(&bad).is_err());
        assert!(limits(&Limits::default()).is_ok(), "no limits is valid");
    }

    fn budget(currency_code: &str, amount_nanos: u64) -> Limits {
        Limits {
            monthly_budget: Some(Budget {
                currency_code: currency_code.to_owned(),
                amount_nanos,
            }),
            ..Limits::default()
        }
    }

    #[test]
    fn budgets_are_positive_bounded_and_in_the_plans_currency() {
        let named = |limits: &Limits, field: &str| {
            self::limits(limits)
                .expect_err("refused")
                .to_string()
                .contains(field)
        };
        assert!(named(
            &budget("USD", 0),
            "limits.monthly_budget.amount_nanos"
        ));
        assert!(named(
            &budget("USD", Budget::MAX_NANOS + 1),
            "limits.monthly_budget.amount_nanos"
        ));
        assert!(self::limits(&budget("USD", Budget::MAX_NANOS)).is_ok());

        let mut unset = budget("", 250_000_000_000);
        budget_currency(&mut unset, "EUR", false).expect("the plan's currency is filled in");
        assert_eq!(unset.monthly_budget.expect("kept").currency_code, "EUR");
        let err = budget_currency(&mut budget("USD", 1), "EUR", false).expect_err("mismatch");
        assert!(
            err.to_string()
                .contains("limits.monthly_budget.currency_code"),
            "{err}"
        );
        let err = budget_currency(&mut budget("USD", 1), "EUR", true).expect_err("new plan");
        assert!(err.to_string().contains("price_plan"), "{err}");
        let mut cleared = budget("USD", 1);
        clear_limits(&mut cleared, &["monthly_budget".to_owned()]).expect("a limit name");
        assert_eq!(cleared.monthly_budget, None);
    }

    #[test]
    fn scopes_default_to_inference_and_reject_unknown() {
        assert_eq!(scopes(&[]).expect("default"), vec![Scope::Inference]);
        assert!(scopes(&["admin".to_owned()]).is_err());
        let both = scopes(&["billing:read".to_owned(), "inference".to_owned()]).expect("ok");
        assert_eq!(both.len(), 2);
    }
}
