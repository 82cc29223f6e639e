//! One worker: an emulated device running the model with continuous
//! (iteration-level) batching, on a dedicated OS thread.
//!
//! Each iteration: drop sequences whose client went away or whose deadline
//! passed; admit new requests from the model's fair queue while the sequence
//! cap allows; build a step within the token budget, running decodes first,
//! then prefill chunks; run it; feed each finished chunk's logits to its
//! generation; send text deltas; end finished sequences. When the KV pool is
//! short, the newest sequence of the lowest priority is preempted by
//! recompute: its blocks are freed and it waits, ahead of the queue, to be
//! prefilled again with its prompt and the tokens it already produced.
//! With prefix caching, a sequence starts on the cached blocks of its prompt's prefix, and
//! a job whose prefix a running sequence is still prefilling waits (beside the batch, in
//! the order taken) until those blocks are cached, instead of computing them twice.
//! A job's usage is handed to the spool without waiting; the spool's thread
//! settles the job's limits and sends its last event once the usage is
//! durable, so the worker never blocks on the disk.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::job::{Failure, InternalFailure, Job, JobEvent, JobUsage};
use super::stats::Outcome;
use super::{Batching, Pace, Shared, UsageSink};
use crate::model::generation::Generation;
use crate::model::kv_cache::{KvPool, SeqId};
use crate::model::served_as::StepShape;
use crate::model::tokenizer::Tokenizer;
use crate::model::transformer::{Model, SeqChunk, StepOutput};
use crate::model::{FinishReason, ModelError};
use crate::npu::Device;

pub(crate) struct WorkerConfig {
    /// This worker's place among its model's workers.
    pub index: usize,
    pub max_batch_size: usize,
    pub max_batch_tokens: usize,
    pub pace: Pace,
    pub batching: Batching,
    pub served_as: Option<crate::model::served_as::ServedAs>,
}

struct Running {
    job: Job,
    seq: SeqId,
    generation: Generation,
    /// Tokens still to feed: the prompt (or its rest), then the last sampled token.
    pending: Vec<u32>,
    /// Prompt tokens taken from the prefix cache at first admission.
    cached_prompt_tokens: usize,
    admitted_at: Instant,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    device_us: f64,
    energy_j: f64,
}

pub(crate) struct Worker {
    pub model: Arc<Model>,
    pub tokenizer: Arc<Tokenizer>,
    pub device: Device,
    pub kv: KvPool,
    pub config: WorkerConfig,
    pub shared: Arc<Shared>,
    pub usage: Arc<dyn UsageSink>,
    /// The last step ran out of KV blocks: admit nothing until a step
    /// succeeds, so preemption makes progress instead of thrashing.
    pub stalled: bool,
    /// Evictions of the pool already added to the model's counter.
    pub evictions_counted: u64,
    /// Steps this worker ran, numbering them in traces.
    pub steps: u64,
    /// Jobs taken from the queue that wait for a running sequence to finish computing the
    /// prompt prefix they share (counted against the batch's sequence cap).
    pub deferred: VecDeque<Job>,
    /// How often steps outran the emulated device under `pace = "device"`.
    pub pacing: super::pacing::PaceWatch,
    /// The served model's id, for logs.
    pub model_id: String,
}

impl Worker {
    pub fn run(mut self) {
        let mut running: Vec<Running> = Vec::new();
        let mut preempted: VecDeque<Running> = VecDeque::new();
        let mut next_seq: SeqId = 0;
        loop {
            self.drop_gone(&mut running);
            self.admit(&mut running, &mut preempted, &mut next_seq);
            if running.is_empty() {
                self.report(0);
                if self.shared.stopping() {
                    return;
                }
                self.shared
                    .wait_for_work(self.config.index, Duration::from_millis(50));
                continue;
            }
            self.report(running.len());
            self.step(&mut running, &mut preempted);
            self.share_cache_changes();
            self.report(running.len());
        }
    }

    /// Tells the model's gauges (and the router) what this worker holds.
    fn report(&self, running: usize) {
        self.shared.report(
            self.config.index,
            super::WorkerReport {
                running,
                deferred: self.deferred.len(),
                kv_free: self.kv.free_blocks(),
                cached_blocks: self.kv.cached_blocks(),
            },
        );
    }

    /// Starts sequence `seq` of `job` on the cached blocks of the longest prefix of `tokens`
    /// (whose full blocks have the addresses `hashes`), always leaving the last token to
    /// compute, since its logits are needed; returns the tokens reused.
    fn attach_prefix(
        &mut self,
        seq: SeqId,
        job: &Job,
        hashes: &[crate::model::prefix::BlockHash],
        tokens: &[u32],
    ) -> usize {
        if !self.kv.prefix_caching() {
            return 0;
        }
        let root = self.shared.prefix.root(job.isolation.as_str());
        self.kv
            .attach_prefix(seq, root, hashes, tokens.len().saturating_sub(1))
    }

    /// Publishes the blocks of `r` that its last step filled, so later prompts can reuse
    /// them (its generated tokens included: a chat's next turn resends them).
    fn publish_full_blocks(&mut self, r: &Running) {
        let (blocks, from) = self.kv.unpublished(r.seq);
        if blocks == 0 {
            return;
        }
        let tokens: Vec<u32> = r
            .job
            .prompt
            .iter()
            .chain(r.generation.tokens())
            .skip(from)
            .take(blocks * self.kv.block_size())
            .copied()
            .collect();
        self.kv.publish(r.seq, &self.shared.prefix, &tokens);
    }

    /// Hands the addresses this worker's pool gained and lost to the router, and counts
    /// evictions.
    fn share_cache_changes(&mut self) {
        let evictions = self.kv.prefix_stats().evictions;
        let new = evictions - self.evictions_counted;
        if new > 0 {
            self.shared
                .stats
                .prefix_cache_evictions
                .fetch_add(new, Ordering::Relaxed);
            self.evictions_counted = evictions;
        }
        if let Some(affinity) = &self.shared.affinity {
            let changes = self.kv.take_cache_changes();
            affinity.record(self.config.index, &changes.added, &changes.removed);
        }
    }

    /// Ends sequences whose client disconnected or whose deadline passed.
    fn drop_gone(&mut self, running: &mut Vec<Running>) {
        let now = Instant::now();
        let mut i = 0;
        while i < running.len() {
            let r = &running[i];
            // Deadline first: a unary handler that gave up at its deadline
            // has also closed the channel, and the usage should say why.
            let failure = if r.job.deadline.is_some_and(|d| d <= now) {
                Some(Failure::DeadlineExceeded)
            } else if r.job.events.is_closed() || self.shared.abandoning() {
                // The client left, or the grace period of a shutdown ran
                // out: the sequence ends here, its usage recorded.
                Some(Failure::Cancelled)
            } else {
                None
            };
            match failure {
                Some(failure) => {
                    let r = running.swap_remove(i);
                    self.kv.free(r.seq);
                    self.end(r, Err(failure));
                }
                None => i += 1,
            }
        }
    }

    /// Whether a sequence of `tokens` can start now: its blocks plus one
    /// block of decode headroom per running sequence must be free, so that
    /// admitting it does not force an immediate preemption.
    fn fits(&self, tokens: usize, running: usize) -> bool {
        let block = self.kv.block_size().max(1);
        tokens.div_ceil(block) + running < self.kv.free_blocks()
    }

    fn admit(
        &mut self,
        running: &mut Vec<Running>,
        preempted: &mut VecDeque<Running>,
        next_seq: &mut SeqId,
    ) {
        if self.stalled && !running.is_empty() {
            return;
        }
        if self.config.batching == Batching::Static && !running.is_empty() {
            // Static batching: a batch is formed once and runs to completion.
            return;
        }
        // Preempted sequences first: nothing new starts ahead of them.
        if preempted.is_empty() {
            self.start_deferred(running, next_seq);
        }
        while running.len() + self.deferred.len() < self.config.max_batch_size {
            if let Some(front) = preempted.front() {
                // Preempted sequences go first, when their blocks are free
                // again; nothing new starts ahead of them.
                if !(running.is_empty() || self.fits(front.pending.len(), running.len())) {
                    break;
                }
                if let Some(mut r) = preempted.pop_front() {
                    // Newest again: if blocks run short, it yields first.
                    r.admitted_at = Instant::now();
                    // Its own blocks may still be cached: recompute only the rest.
                    let hashes = self.shared.prefix.chain(
                        r.job.isolation.as_str(),
                        &r.pending,
                        self.kv.block_size(),
                    );
                    let reused = self.attach_prefix(r.seq, &r.job, &hashes, &r.pending);
                    r.pending.drain(..reused);
                    r.job.trace.admitted(self.config.index, reused);
                    running.push(r);
                }
                continue;
            }
            if !running.is_empty() && !self.fits(1, running.len()) {
                break;
            }
            let (job, expired) = self.shared.pop(self.config.index, Instant::now());
            for (job, why) in expired {
                self.fail_unstarted(job, why);
            }
            let Some(job) = job else { break };
            if job.events.is_closed() {
                self.fail_unstarted(job, Failure::Cancelled);
                continue;
            }
            if self.awaits_shared_prefix(&job, running) {
                self.deferred.push_back(job);
                continue;
            }
            self.start(job, running, next_seq);
        }
    }

    /// Jobs set aside because a running sequence is computing the prefix they share start
    /// once it is cached (or that sequence left), in the order they were taken; those whose
    /// client left or whose deadline passed end here.
    fn start_deferred(&mut self, running: &mut Vec<Running>, next_seq: &mut SeqId) {
        let now = Instant::now();
        for _ in 0..self.deferred.len() {
            let Some(job) = self.deferred.pop_front() else {
                break;
            };
            if job.events.is_closed() {
                self.fail_unstarted(job, Failure::Cancelled);
            } else if job.deadline.is_some_and(|d| d <= now) {
                self.fail_unstarted(job, Failure::DeadlineExceeded);
            } else if self.awaits_shared_prefix(&job, running)
                || running.len() >= self.config.max_batch_size
                || !(running.is_empty() || self.fits(1, running.len()))
            {
                self.deferred.push_back(job);
            } else {
                self.start(job, running, next_seq);
            }
        }
    }

    /// Whether a running sequence is still prefilling blocks of `job`'s prompt that the
    /// cache does not hold yet: started now, `job` would compute them a second time in
    /// the same steps (a burst of chats with one system prompt); started after, it finds
    /// them cached.
    fn awaits_shared_prefix(&self, job: &Job, running: &[Running]) -> bool {
        // A static batch runs to its end: waiting would mean waiting for the whole batch.
        if self.config.batching == Batching::Static
            || !self.kv.prefix_caching()
            || job.prefix_hashes.is_empty()
        {
            return false;
        }
        let ready = self.kv.cached_prefix_blocks(&job.prefix_hashes);
        // Never the last token: at most these blocks can be reused.
        let usable = job.prompt.len().saturating_sub(1) / self.kv.block_size();
        running.iter().any(|r| {
            r.pending.len() > 1 && {
                let shared = job
                    .prefix_hashes
                    .iter()
                    .zip(&r.job.prefix_hashes)
                    .take_while(|(a, b)| a == b)
                    .count();
                shared.min(usable) > ready
            }
        })
    }

    /// Starts `job` as a new sequence, on the cached blocks of its prompt's prefix.
    fn start(&mut self, mut job: Job, running: &mut Vec<Running>, next_seq: &mut SeqId) {
        let generation = match Generation::new(job.params.clone(), self.tokenizer.eos_id()) {
            Ok(g) => g,
            Err(e) => {
                self.fail_unstarted(job, Failure::from(e));
                return;
            }
        };
        *next_seq += 1;
        let admitted_at = Instant::now();
        let cached = self.attach_prefix(*next_seq, &job, &job.prefix_hashes, &job.prompt);
        job.trace.admitted(self.config.index, cached);
        let stats = &self.shared.stats;
        stats.queue_time.observe(micros(
            admitted_at.saturating_duration_since(job.received_at),
        ));
        stats
            .prompt_cache_hit_tokens
            .fetch_add(cached as u64, Ordering::Relaxed);
        stats
            .prompt_cache_miss_tokens
            .fetch_add((job.prompt.len() - cached) as u64, Ordering::Relaxed);
        running.push(Running {
            pending: job.prompt[cached..].to_vec(),
            cached_prompt_tokens: cached,
            seq: *next_seq,
            generation,
            admitted_at,
            first_token_at: None,
            last_token_at: None,
            device_us: 0.0,
            energy_j: 0.0,
            job,
        });
    }

    /// One batch step: choose the chunks, run the model, account the step,
    /// advance each sequence, end the finished ones.
    fn step(&mut self, running: &mut Vec<Running>, preempted: &mut VecDeque<Running>) {
        let chosen = self.choose_chunks(running);
        let batch: Vec<SeqChunk<'_>> = chosen
            .iter()
            .map(|&(i, take)| SeqChunk {
                seq: running[i].seq,
                tokens: &running[i].pending[..take],
            })
            .collect();
        let started = Instant::now();
        let result = self.model.step(&mut self.device, &mut self.kv, &batch);
        drop(batch);
        let mut output = match result {
            Ok(output) => output,
            Err(ModelError::OutOfBlocks { needed, free, .. }) => {
                tracing::debug!(
                    needed,
                    free,
                    running = running.len(),
                    "KV pool short: preempting"
                );
                self.stalled = true;
                self.preempt(running, preempted);
                return;
            }
            Err(e) => {
                self.fail_batch(running, &chosen, e);
                return;
            }
        };
        self.stalled = false;
        self.steps += 1;
        for &(i, _) in &chosen {
            self.publish_full_blocks(&running[i]);
        }
        self.account_step(running, &chosen, &mut output, started);
        let mut finished = self.advance(running, &chosen, &output);
        finished.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, outcome) in finished {
            let r = running.swap_remove(i);
            self.kv.free(r.seq);
            self.end(r, outcome);
        }
    }

    /// (index in `running`, tokens to feed) of this step: decodes first (one
    /// token each), then prefill chunks, within `max_batch_tokens`.
    fn choose_chunks(&self, running: &[Running]) -> Vec<(usize, usize)> {
        let mut order: Vec<usize> = (0..running.len()).collect();
        order.sort_by_key(|&i| (running[i].pending.len() > 1, running[i].admitted_at));
        let mut budget = self.config.max_batch_tokens;
        let mut chosen = Vec::new();
        for i in order {
            if budget == 0 {
                break;
            }
            let take = running[i].pending.len().min(budget);
            budget -= take;
            chosen.push((i, take));
        }
        chosen
    }

    /// Ends every sequence of a batch whose step failed, with one shared
    /// cause.
    fn fail_batch(&mut self, running: &mut Vec<Running>, chosen: &[(usize, usize)], e: ModelError) {
        tracing::error!(error = %e, "model step failed; failing its batch");
        let failure = Failure::from(e);
        let mut failed: Vec<usize> = chosen.iter().map(|&(i, _)| i).collect();
        // Highest index first, so each swap_remove leaves the rest in place.
        failed.sort_unstable_by(|a, b| b.cmp(a));
        for i in failed {
            let r = running.swap_remove(i);
            self.kv.free(r.seq);
            self.end(r, Err(failure.clone()));
        }
    }

    /// The step's device time at the served-as shape, the device pace, and
    /// the step metrics.
    fn account_step(
        &mut self,
        running: &[Running],
        chosen: &[(usize, usize)],
        output: &mut StepOutput,
        started: Instant,
    ) {
        if let Some(served_as) = &self.config.served_as {
            let shape = StepShape {
                tokens: chosen.iter().map(|&(_, take)| take).sum(),
                contexts: chosen
                    .iter()
                    .map(|&(i, take)| {
                        let r = &running[i];
                        // Tokens already in the KV cache, plus this step's.
                        (r.job.prompt.len() + r.generation.tokens().len())
                            .saturating_sub(r.pending.len())
                            + take
                    })
                    .collect(),
            };
            served_as.scale_step(self.model.config(), &self.device, &shape, output);
        }
        if self.config.pace == Pace::Device {
            let device = Duration::from_secs_f64(output.device_us / 1e6);
            self.pacing.pace(
                &self.model_id,
                &self.shared.stats,
                chosen.len(),
                started.elapsed(),
                device,
            );
        }
        let stats = &self.shared.stats;
        stats.step_duration.observe(micros(started.elapsed()));
        stats.step_sequences.observe(chosen.len() as u64);
        stats
            .step_tokens
            .observe(chosen.iter().map(|&(_, take)| take as u64).sum());
    }

    /// Charges each chosen sequence its share of the step and, where its
    /// chunk was its last pending token, samples the next token and streams
    /// it. Returns the sequences that finished, with their outcome.
    fn advance(
        &self,
        running: &mut [Running],
        chosen: &[(usize, usize)],
        output: &StepOutput,
    ) -> Vec<(usize, Result<FinishReason, Failure>)> {
        let stats = &self.shared.stats;
        let mut finished = Vec::new();
        let batch_tokens = chosen.iter().map(|&(_, take)| take).sum();
        for ((&(i, take), logits), share) in chosen.iter().zip(&output.logits).zip(&output.per_seq)
        {
            let r = &mut running[i];
            r.job.trace.step(crate::traces::StepRecord {
                step: self.steps,
                sequences: chosen.len(),
                batch_tokens,
                tokens: take,
                prefill: take > 1 || r.first_token_at.is_none(),
                device_us: share.device_us,
            });
            r.device_us += share.device_us;
            r.energy_j += share.energy_j;
            r.pending.drain(..take);
            if !r.pending.is_empty() {
                continue; // a prefill chunk; its logits are not needed yet
            }
            match r.generation.push_logits(&self.tokenizer, logits) {
                Ok(event) => {
                    let now = Instant::now();
                    match r.last_token_at {
                        None => stats
                            .time_to_first_token
                            .observe(micros(now.saturating_duration_since(r.job.received_at))),
                        Some(last) => stats
                            .inter_token_latency
                            .observe(micros(now.saturating_duration_since(last))),
                    }
                    stats.generation_tokens.fetch_add(1, Ordering::Relaxed);
                    r.first_token_at.get_or_insert(now);
                    r.last_token_at = Some(now);
                    let logprob = event.logprob.map(|lp| (event.token, lp));
                    let _ = r.job.events.send(JobEvent::Delta {
                        text: event.delta,
                        logprob,
                    });
                    match event.finish {
                        Some(reason) => finished.push((i, Ok(reason))),
                        None => r.pending.push(event.token),
                    }
                }
                Err(e) => finished.push((i, Err(Failure::from(e)))),
            }
        }
        finished
    }

    /// Frees the newest sequence of the lowest priority and parks it to be
    /// prefilled again (prompt + its tokens so far) when blocks allow.
    fn preempt(&mut self, running: &mut Vec<Running>, preempted: &mut VecDeque<Running>) {
        let victim = (0..running.len()).min_by_key(|&i| {
            let r = &running[i];
            (r.job.priority, std::cmp::Reverse(r.admitted_at))
        });
        let Some(victim) = victim else { return };
        let mut r = running.swap_remove(victim);
        self.kv.free(r.seq);
        self.shared.count_preemption();
        r.job.trace.preempted();
        if running.is_empty() {
            // Alone and still too big for the whole pool: it can never run.
            self.end(r, Err(Failure::Internal(InternalFailure::DoesNotFit)));
            return;
        }
        let mut replay = r.job.prompt.clone();
        replay.extend_from_slice(r.generation.tokens());
        r.pending = replay;
        preempted.push_back(r);
    }

    fn usage_of(&self, r: &Running, now: Instant) -> JobUsage {
        let received = r.job.received_at;
        JobUsage {
            prompt_tokens: u32::try_from(r.job.prompt.len()).unwrap_or(u32::MAX),
            cached_prompt_tokens: u32::try_from(r.cached_prompt_tokens).unwrap_or(u32::MAX),
            completion_tokens: u32::try_from(r.generation.tokens().len()).unwrap_or(u32::MAX),
            queue_time_us: micros(r.admitted_at.saturating_duration_since(received)),
            ttft_us: r
                .first_token_at
                .map_or(0, |t| micros(t.saturating_duration_since(received))),
            total_time_us: micros(now.saturating_duration_since(received)),
            device_time_us: r.device_us.round() as u64,
            energy_mj: (r.energy_j * 1000.0).round() as u64,
            device_profile: self.device.profile().name.clone(),
        }
    }

    /// Records usage durably, settles limits, then sends the last event.
    fn end(&self, r: Running, outcome: Result<FinishReason, Failure>) {
        let usage = self.usage_of(&r, Instant::now());
        finish_job(&self.shared, self.usage.as_ref(), r.job, outcome, usage);
    }

    /// A job that never ran: nothing was computed, but it was admitted, so
    /// it still gets its (zero) usage record.
    fn fail_unstarted(&self, job: Job, failure: Failure) {
        let r = Running {
            pending: Vec::new(),
            cached_prompt_tokens: 0,
            seq: 0,
            generation: match Generation::new(job.params.clone(), None) {
                Ok(g) => g,
                Err(_) => {
                    let _ = job.events.send(JobEvent::Failed {
                        failure,
                        usage: JobUsage::default(),
                    });
                    return;
                }
            },
            admitted_at: Instant::now(),
            first_token_at: None,
            last_token_at: None,
            device_us: 0.0,
            energy_j: 0.0,
            job,
        };
        self.end(r, Err(failure));
    }
}

/// Ends a job, whatever engine ran it: counts it and hands its usage to the
/// sink; once the usage is durable, settles its limits permit and sends its
/// last event, in that order, so a client that saw the end can rely on the
/// usage being kept. The worker moves on at once.
pub(crate) fn finish_job(
    shared: &Shared,
    sink: &dyn UsageSink,
    mut job: Job,
    outcome: Result<FinishReason, Failure>,
    usage: JobUsage,
) {
    let reason = match &outcome {
        Ok(FinishReason::Eos) => Outcome::Eos,
        Ok(FinishReason::Stop) => Outcome::Stop,
        Ok(FinishReason::Length) => Outcome::Length,
        Err(Failure::Cancelled) => Outcome::Cancelled,
        Err(Failure::DeadlineExceeded) => Outcome::DeadlineExceeded,
        Err(Failure::Internal(_)) => Outcome::Error,
    };
    let stats = &shared.stats;
    stats.count_finished(reason);
    stats.end_to_end.observe(usage.total_time_us);
    stats
        .prompt_tokens
        .fetch_add(u64::from(usage.prompt_tokens), Ordering::Relaxed);
    let metering_span = job.trace.finish(crate::traces::JobEnd {
        outcome: reason.as_str(),
        prompt_tokens: usage.prompt_tokens,
        cached_prompt_tokens: usage.cached_prompt_tokens,
        completion_tokens: usage.completion_tokens,
        device_time_us: usage.device_time_us,
        energy_mj: usage.energy_mj,
    });
    let permit = job.permit;
    let events = job.events;
    let request_id = job.requester.request_id.clone();
    let used = crate::limits::Used {
        tokens: u64::from(usage.prompt_tokens) + u64::from(usage.completion_tokens),
        spend_nanos: job.spend.as_ref().map_or(0, |price| price(&usage)),
    };
    let event = match outcome {
        Ok(reason) => JobEvent::Finished {
            reason,
            usage: usage.clone(),
        },
        Err(failure) => JobEvent::Failed {
            failure,
            usage: usage.clone(),
        },
    };
    sink.record(
        &job.requester,
        job.started_at_us,
        &usage,
        reason,
        Box::new(move |recorded| {
            if let Err(e) = &recorded {
                tracing::error!(error = %e, %request_id, "usage not recorded");
            }
            if let Some(span) = metering_span {
                crate::traces::set(&span, "ascend.metering.durable", recorded.is_ok());
            }
            if let Some(permit) = permit {
                permit.settle_detached(used);
            }
            let _ = events.send(event);
        }),
    );
}

pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
