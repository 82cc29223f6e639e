//! A request as serving sees it, and what serving says back while running it.

use std::time::Instant;

use tokio::sync::mpsc;

use super::queue::Priority;
use crate::limits::Permit;
use crate::model::FinishReason;
use crate::model::sampling::{SamplingParams, TokenLogprob};

/// Who asked, for the usage record. Serving carries it, never reads it.
#[derive(Debug, Clone)]
pub struct Requester {
    pub request_id: String,
    pub tenant_id: String,
    pub key_id: String,
    pub model: String,
    pub weight: u32,
}

/// One generation request, tokenized and validated.
pub struct Job {
    pub requester: Requester,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub priority: Priority,
    pub deadline: Option<Instant>,
    pub received_at: Instant,
    pub started_at_us: i64,
    /// The tenant limits' reservation, settled with the tokens used when the
    /// job ends, whatever its end.
    pub permit: Option<Permit>,
    pub events: mpsc::UnboundedSender<JobEvent>,
}

/// Why a job ended without finishing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    DeadlineExceeded,
    Cancelled,
    Internal(String),
}

/// What the job consumed, timed on the gateway and priced by the cost model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobUsage {
    pub prompt_tokens: u32,
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
