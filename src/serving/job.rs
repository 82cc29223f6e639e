//! A request as serving sees it, and what serving says back while running it.

use std::time::Instant;

use tokio::sync::mpsc;

use super::queue::Priority;
use crate::limits::Permit;
use crate::model::FinishReason;
use crate::model::prefix::BlockHash;
use crate::model::sampling::{SamplingParams, TokenLogprob};

/// Which requests may reuse each other's cached prompt prefixes: the isolation key of the
/// prefix cache. A shared cache tells a tenant, through time to first token, whether anyone
/// in its scope sent the same prefix recently, so the default scope is the tenant alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IsolationKey(String);

impl IsolationKey {
    /// Only this tenant's own requests (the default).
    pub fn tenant(tenant_id: &str) -> Self {
        Self(format!("tenant/{tenant_id}"))
    }

    /// The pool every tenant that opted in shares, for public prefixes.
    pub fn shared() -> Self {
        Self("shared".to_owned())
    }

    /// The key that goes into every block address.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Who asked, for the usage record. Serving carries it, never reads it.
#[derive(Debug, Clone)]
pub struct Requester {
    pub request_id: String,
    pub tenant_id: String,
    /// For the per-tenant metrics' label.
    pub tenant_slug: String,
    pub key_id: String,
    pub model: String,
    pub weight: u32,
}

/// The exact cost in nanos of what a job consumed, for a permit whose
/// tenant has a monthly budget. Given by whoever knows the prices; serving
/// only calls it when the job ends.
pub type SpendMeter = std::sync::Arc<dyn Fn(&JobUsage) -> u64 + Send + Sync>;

/// One generation request, tokenized and validated.
pub struct Job {
    pub requester: Requester,
    pub prompt: Vec<u32>,
    /// Whose cached prefixes the prompt may reuse.
    pub isolation: IsolationKey,
    /// Addresses of the prompt's full KV blocks under `isolation` (set when it is queued).
    pub prefix_hashes: Vec<BlockHash>,
    /// The worker holding the longest cached run of `prefix_hashes` (set when it is queued,
    /// only with more than one worker): others leave the job to it while the load allows.
    pub preferred_worker: Option<usize>,
    pub params: SamplingParams,
    pub priority: Priority,
    pub deadline: Option<Instant>,
    pub received_at: Instant,
    pub started_at_us: i64,
    /// The tenant limits' reservation, settled with the tokens used when the
    /// job ends, whatever its end.
    pub permit: Option<Permit>,
    /// Prices the job's usage for the permit's settlement (budgets only).
    pub spend: Option<SpendMeter>,
    pub events: mpsc::UnboundedSender<JobEvent>,
    /// Its part of the request's trace (empty when not traced).
    pub trace: crate::traces::JobTrace,
}

impl Job {
    /// Why a job that has not started should leave the queue unserved: its
    /// deadline (`deadline`, the queue's own bound) passed, or its client
    /// went away. Deadline first: a unary handler that gave up at its
    /// deadline has also closed the channel, and the usage should say why.
    pub fn gone(&self, deadline: Option<Instant>, now: Instant) -> Option<Failure> {
        if deadline.is_some_and(|d| d <= now) {
            Some(Failure::DeadlineExceeded)
        } else if self.events.is_closed() {
            Some(Failure::Cancelled)
        } else {
            None
        }
    }
}

/// Why a job ended without finishing.
#[derive(Debug, Clone)]
pub enum Failure {
    DeadlineExceeded,
    Cancelled,
    Internal(InternalFailure),
}

/// A job the gateway could not run; the client sees an opaque error, the
/// log the cause.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InternalFailure {
    #[error("the model failed")]
    Model(#[source] std::sync::Arc<crate::model::ModelError>),
    #[error("the request does not fit in this device's KV cache")]
    DoesNotFit,
}

impl From<crate::model::ModelError> for Failure {
    fn from(error: crate::model::ModelError) -> Failure {
        Failure::Internal(InternalFailure::Model(std::sync::Arc::new(error)))
    }
}

/// What the job consumed, timed on the gateway and priced by the cost model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobUsage {
    pub prompt_tokens: u32,
    /// Prompt tokens whose KV came from the prefix cache (a subset of `prompt_tokens`).
    pub cached_prompt_tokens: u32,
    pub completion_tokens: u32,
    pub queue_time_us: u64,
    pub ttft_us: u64,
    pub total_time_us: u64,
    pub device_time_us: u64,
    pub energy_mj: u64,
    pub device_profile: String,
}

#[derive(Debug, Clone)]
pub enum JobEvent {
    /// New text (possibly empty when a token completes no character).
    Delta {
        text: String,
        logprob: Option<(u32, TokenLogprob)>,
    },
    /// The last event of a finished job; its usage is already durable.
    Finished {
        reason: FinishReason,
        usage: JobUsage,
    },
    /// The last event of a job that ended early; its usage is already durable.
    Failed { failure: Failure, usage: JobUsage },
}
