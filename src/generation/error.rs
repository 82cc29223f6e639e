//! Why a generation request was refused or did not finish, whichever
//! component said so; each front end maps it once (`api::status`,
//! `http::error`).

use std::time::Duration;

use crate::error::{Classified, ErrorKind};
use crate::idempotency::ClaimError;
use crate::limits::LimitError;
use crate::metering::MeteringError;
use crate::serving::ServingError;
use crate::serving::tokenize::TokenizeError;

#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    /// A request field is wrong; the message names it.
    #[error("invalid `{field}`: {problem}")]
    Invalid { field: String, problem: String },
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// The API key's own limit, inside the tenant's.
    #[error("{}", .0.message_for("API key"))]
    KeyLimit(LimitError),
    #[error(transparent)]
    Claim(#[from] ClaimError),
    #[error(transparent)]
    Serving(#[from] ServingError),
    #[error(transparent)]
    Metering(#[from] MeteringError),
    #[error(transparent)]
    Tokenize(#[from] TokenizeError),
    #[error("the request's deadline passed before it finished")]
    DeadlineExceeded,
    #[error("the request was cancelled")]
    Cancelled,
    #[error("generation failed")]
    Failed(#[source] crate::serving::InternalFailure),
    #[error("the stored answer of this request_id is unreadable")]
    StoredAnswerUnreadable,
    #[error("the worker ended the request without an answer")]
    NoAnswer,
    /// The tenant has a monthly budget and its plan's prices cannot be read,
    /// so the request's cost cannot be reserved.
    #[error(
        "the price plan cannot be read to reserve the request's cost against the monthly budget; retry shortly"
    )]
    BudgetUnpriced,
    /// A budget counts money, and the plan has no price for the model.
    #[error(
        "the tenant's price plan has no price for model `{0}` now, so a monthly budget cannot count it; add a price with PutPrices"
    )]
    NoPrice(String),
}

impl GenerationError {
    pub fn invalid(field: impl Into<String>, problem: impl std::fmt::Display) -> GenerationError {
        GenerationError::Invalid {
            field: field.into(),
            problem: problem.to_string(),
        }
    }

    fn inner(&self) -> Option<&dyn Classified> {
        match self {
            GenerationError::Limit(e) | GenerationError::KeyLimit(e) => Some(e),
            GenerationError::Claim(e) => Some(e),
            GenerationError::Serving(e) => Some(e),
            GenerationError::Metering(e) => Some(e),
            GenerationError::Tokenize(e) => Some(e),
            _ => None,
        }
    }
}

impl Classified for GenerationError {
    fn kind(&self) -> ErrorKind {
        if let Some(inner) = self.inner() {
            return inner.kind();
        }
        match self {
            GenerationError::Invalid { .. } => ErrorKind::InvalidArgument,
            GenerationError::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            GenerationError::Cancelled => ErrorKind::Cancelled,
            GenerationError::BudgetUnpriced => ErrorKind::Unavailable,
            GenerationError::NoPrice(_) => ErrorKind::FailedPrecondition,
            _ => ErrorKind::Internal,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        self.inner().and_then(Classified::retry_after)
    }

    fn quota_violation(&self) -> Option<(&'static str, String)> {
        match self {
            GenerationError::KeyLimit(e) => e
                .quota_violation()
                .map(|(subject, _)| (subject, e.message_for("API key"))),
            _ => self.inner().and_then(Classified::quota_violation),
        }
    }

    fn field(&self) -> Option<&str> {
        match self {
            GenerationError::Invalid { field, .. } => Some(field),
            GenerationError::Claim(ClaimError::Mismatch(_)) => Some("request_id"),
            GenerationError::Serving(ServingError::UnknownModel(_)) => Some("model"),
            _ => self.inner().and_then(Classified::field),
        }
    }
}
