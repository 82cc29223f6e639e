//! The `echo` engine: answers each request at once with its own prompt
//! (at most `max_tokens` of it), computing nothing. It goes through the same
//! queue, usage records and limits as a real model, so a load test against
//! it measures what the gateway itself costs: authentication, limits,
//! queuing, metering and gRPC.
//!
//! Knows the queue and the job-ending rules, not the model or the device.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::job::{Failure, Job, JobEvent, JobUsage};
use super::worker::{finish_job, micros};
use super::{Shared, UsageSink};
use crate::model::FinishReason;
use crate::model::tokenizer::Tokenizer;

/// The device profile name echo usage is recorded under.
pub const ECHO_DEVICE: &str = "echo";

pub(crate) struct EchoWorker {
    pub tokenizer: Arc<Tokenizer>,
    pub shared: Arc<Shared>,
    pub usage: Arc<dyn UsageSink>,
}

impl EchoWorker {
    pub fn run(self) {
        loop {
            let (job, expired) = self.shared.pop(0, Instant::now());
            for (job, why) in expired {
                self.end_early(job, why);
            }
            match job {
                Some(job) => self.answer(job),
                None if self.shared.stopping() => return,
                None => self.shared.wait_for_work(0, Duration::from_millis(50)),
            }
        }
    }

    fn usage(job: &Job, completion_tokens: usize, now: Instant) -> JobUsage {
        let since_receipt = micros(now.saturating_duration_since(job.received_at));
        JobUsage {
            prompt_tokens: u32::try_from(job.prompt.len()).unwrap_or(u32::MAX),
            cached_prompt_tokens: 0,
            completion_tokens: u32::try_from(completion_tokens).unwrap_or(u32::MAX),
            queue_time_us: since_receipt,
            ttft_us: if completion_tokens > 0 {
                since_receipt
            } else {
                0
            },
            total_time_us: since_receipt,
            device_time_us: 0,
            energy_mj: 0,
            device_profile: ECHO_DEVICE.to_owned(),
        }
    }

    fn end_early(&self, job: Job, failure: Failure) {
        let usage = Self::usage(&job, 0, Instant::now());
        finish_job(&self.shared, self.usage.as_ref(), job, Err(failure), usage);
    }

    fn answer(&self, job: Job) {
        if job.events.is_closed() {
            return self.end_early(job, Failure::Cancelled);
        }
        let stats = &self.shared.stats;
        stats.queue_time.observe(micros(job.received_at.elapsed()));
        let echoed = job.params.max_tokens.min(job.prompt.len());
        let text = match self.tokenizer.decode(&job.prompt[..echoed], true) {
            Ok(text) => text,
            Err(e) => return self.end_early(job, Failure::from(e)),
        };
        let _ = job.events.send(JobEvent::Delta {
            text,
            logprob: None,
        });
        let now = Instant::now();
        stats
            .time_to_first_token
            .observe(micros(now.saturating_duration_since(job.received_at)));
        stats
            .generation_tokens
            .fetch_add(echoed as u64, Ordering::Relaxed);
        let usage = Self::usage(&job, echoed, now);
        finish_job(
            &self.shared,
            self.usage.as_ref(),
            job,
            Ok(FinishReason::Length),
            usage,
        );
    }
}
