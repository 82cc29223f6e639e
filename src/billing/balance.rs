//! A tenant's balance for the month: its spend (the invoice draft's total),
//! its monthly budget, what in-flight requests hold of it and what is left.
//!
//! [`balance`] is pure arithmetic over figures others read: the draft total
//! from the invoice, the counters from the limiter; [`Balances`] reads them,
//! for both front ends. Knows nothing of SQL, gRPC or HTTP.

use std::sync::Arc;

use super::{BillingError, BillingService};
use crate::calendar::Month;
use crate::error::{Classified, ErrorKind};
use crate::limits::{BudgetCounters, LimitError, Limiter};

/// Why a balance could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BalanceError {
    #[error(transparent)]
    Billing(#[from] BillingError),
    #[error(transparent)]
    Limit(#[from] LimitError),
}

impl Classified for BalanceError {
    fn kind(&self) -> ErrorKind {
        match self {
            BalanceError::Billing(e) => e.kind(),
            BalanceError::Limit(e) => e.kind(),
        }
    }
}

/// Reads balances: the invoice draft from billing, the budget's counters
/// from the limiter that admits against them. Cheap to clone.
#[derive(Clone)]
pub struct Balances {
    billing: BillingService,
    limiter: Arc<Limiter>,
}

impl Balances {
    pub fn new(billing: BillingService, limiter: Arc<Limiter>) -> Balances {
        Balances { billing, limiter }
    }

    /// This month's balance of `tenant_id`, whose budget is `budget_nanos`.
    pub async fn of(
        &self,
        tenant_id: &str,
        budget_nanos: Option<u64>,
    ) -> Result<Balance, BalanceError> {
        let spend = self.billing.month_spend(tenant_id).await?;
        let counters = match budget_nanos {
            Some(_) => self.limiter.budget_counters(tenant_id).await?,
            None => BudgetCounters::default(),
        };
        Ok(balance(
            tenant_id,
            spend.period,
            &spend.currency_code,
            spend.total_nanos,
            budget_nanos,
            counters,
        ))
    }
}

/// The month's balance, exact in nanos of `currency_code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    pub tenant_id: String,
    pub period: Month,
    pub currency_code: String,
    /// The invoice draft's total (each line rounded to the minor unit).
    pub spent_nanos: i64,
    /// The month's spend as the budget counts it: each request at its
    /// exact cost to the nano.
    pub budget_spent_nanos: i64,
    pub budget_nanos: Option<i64>,
    /// `None` without a budget.
    pub remaining_nanos: Option<i64>,
    pub reserved_nanos: i64,
    /// Whether the budget admits more spend (always true without one).
    pub is_available: bool,
}

/// Balance from the draft's total and the limiter's counters. What is left
/// is what admission sees: the budget less the budget's own count (exact per
/// request, which the invoice's once-per-line rounding may differ from) and
/// the reservations of requests in flight.
pub fn balance(
    tenant_id: &str,
    period: Month,
    currency_code: &str,
    draft_total_nanos: i64,
    budget_nanos: Option<u64>,
    counters: BudgetCounters,
) -> Balance {
    let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let reserved = as_i64(counters.reserved_nanos);
    let budget = budget_nanos.map(as_i64);
    let counted = as_i64(counters.spent_nanos);
    let remaining = budget.map(|budget| {
        budget
            .saturating_sub(counted)
            .saturating_sub(reserved)
            .max(0)
    });
    Balance {
        tenant_id: tenant_id.to_owned(),
        period,
        currency_code: currency_code.to_owned(),
        spent_nanos: draft_total_nanos,
        budget_spent_nanos: counted,
        budget_nanos: budget,
        remaining_nanos: remaining,
        reserved_nanos: reserved,
        is_available: remaining.is_none_or(|left| left > 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn may() -> Month {
        Month::parse("2026-05").expect("a period")
    }

    fn counters(spent: u64, reserved: u64) -> BudgetCounters {
        BudgetCounters {
            spent_nanos: spent,
            reserved_nanos: reserved,
        }
    }

    #[test]
    fn remaining_is_the_budget_less_its_own_count_and_the_reservations() {
        // The draft rounded its lines down to 0.00; the budget counts exactly.
        let b = balance("t", may(), "USD", 0, Some(10_000), counters(3_400, 1_000));
        assert_eq!(b.spent_nanos, 0, "spent is the draft's total as it is");
        assert_eq!(b.budget_spent_nanos, 3_400);
        assert_eq!(b.remaining_nanos, Some(10_000 - 3_400 - 1_000));
        assert!(b.is_available);
    }

    #[test]
    fn an_exhausted_budget_leaves_zero_never_less() {
        let b = balance(
            "t",
            may(),
            "USD",
            12_000,
            Some(10_000),
            counters(9_000, 5_000),
        );
        assert_eq!(b.remaining_nanos, Some(0));
        assert!(!b.is_available);
    }

    #[test]
    fn without_a_budget_nothing_is_left_or_refused() {
        let b = balance("t", may(), "USD", 12_000, None, counters(0, 0));
        assert_eq!((b.budget_nanos, b.remaining_nanos), (None, None));
        assert!(b.is_available);
    }
}
