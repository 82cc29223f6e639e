//! Why a request was not admitted.

use std::time::Duration;

use crate::error::{Classified, ErrorKind};

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Requests,
    Concurrency,
    TokensPerMinute,
    MonthlyQuota,
    MonthlyBudget,
}

impl LimitKind {
    pub const ALL: [LimitKind; 5] = [
        LimitKind::Requests,
        LimitKind::Concurrency,
        LimitKind::TokensPerMinute,
        LimitKind::MonthlyQuota,
        LimitKind::MonthlyBudget,
    ];

    /// This kind's slot in per-kind arrays of `ALL.len()` entries; a match,
    /// so a new kind cannot silently share a slot.
    pub fn index(self) -> usize {
        match self {
            LimitKind::Requests => 0,
            LimitKind::Concurrency => 1,
            LimitKind::TokensPerMinute => 2,
            LimitKind::MonthlyQuota => 3,
            LimitKind::MonthlyBudget => 4,
        }
    }

    /// The limit's name in the API (a `TenantLimits` field).
    pub fn field(self) -> &'static str {
        match self {
            LimitKind::Requests => "requests_per_second",
            LimitKind::Concurrency => "max_concurrent_requests",
            LimitKind::TokensPerMinute => "tokens_per_minute",
            LimitKind::MonthlyQuota => "monthly_token_quota",
            LimitKind::MonthlyBudget => "monthly_budget",
        }
    }
}

#[cfg(test)]
#[test]
fn every_kind_has_its_own_slot_in_all_order() {
    for (i, kind) in LimitKind::ALL.iter().enumerate() {
        assert_eq!(kind.index(), i);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("{}", self.message_for("tenant"))]
    Exceeded {
        kind: LimitKind,
        retry_after: Duration,
    },
    /// A single request that no amount of waiting would admit.
    #[error("{}", self.message_for("tenant"))]
    TooLarge {
        kind: LimitKind,
        needed: u64,
        limit: u64,
    },
    /// Redis is unreachable and the policy is `fail_closed`.
    #[error("the shared limit store is unavailable: {0}")]
    Unavailable(String),
}

impl LimitError {
    /// The refusal, saying whose limit it was ("tenant", "API key").
    pub fn message_for(&self, owner: &str) -> String {
        match self {
            LimitError::Exceeded { kind, retry_after } => format!(
                "{owner} limit `{}` reached; retry in {}",
                kind.field(),
                humantime::format_duration(*retry_after)
            ),
            LimitError::TooLarge {
                kind,
                needed,
                limit,
            } => format!(
                "the request needs {needed} tokens but the {owner}'s `{}` is {limit}",
                kind.field()
            ),
            LimitError::Unavailable(reason) => {
                format!("the shared limit store is unavailable: {reason}")
            }
        }
    }
}

impl Classified for LimitError {
    fn kind(&self) -> ErrorKind {
        match self {
            LimitError::Exceeded { .. } | LimitError::TooLarge { .. } => {
                ErrorKind::ResourceExhausted
            }
            LimitError::Unavailable(_) => ErrorKind::Unavailable,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            LimitError::Exceeded { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    fn quota_violation(&self) -> Option<(&'static str, String)> {
        match self {
            LimitError::Exceeded { kind, .. } | LimitError::TooLarge { kind, .. } => {
                Some((kind.field(), self.to_string()))
            }
            LimitError::Unavailable(_) => None,
        }
    }
}
