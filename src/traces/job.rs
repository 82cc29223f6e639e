//! A job's part of its request's trace, carried through serving: the
//! `queue` span (from the hand-off to a worker's admission), the `generate`
//! span (from admission to the end) with one event per run of batch steps,
//! and the `metering.record` span (from the end until the usage is durable).
//!
//! Steps are events, not spans: a decode step is one token, and a span per
//! token would bury the trace. Consecutive decode steps in batches of the
//! same size are one `decode` event (first and last step, count, the
//! request's device time); each prefill chunk is one `prefill` event. So a
//! request gets about as many events as its batch changed size, bounded by
//! the SDK's per-span limit.
//!
//! Serving calls it, but knows nothing of OpenTelemetry; with traces off or
//! the request not sampled, every call is a check of an empty option.

use std::time::SystemTime;

use opentelemetry::KeyValue;
use opentelemetry::trace::TraceContextExt as _;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::TARGET;

/// One batch step as one of its sequences saw it.
#[derive(Debug, Clone, Copy)]
pub struct StepRecord {
    /// The worker's step number.
    pub step: u64,
    /// Sequences in the step.
    pub sequences: usize,
    /// Tokens the step computed, all sequences together.
    pub batch_tokens: usize,
    /// This sequence's tokens in the step (1 for a decode).
    pub tokens: usize,
    /// A prefill chunk (the prompt, or a preempted sequence's recompute),
    /// even of one token (all a cached prefix leaves to compute).
    pub prefill: bool,
    /// This sequence's share of the step's device time.
    pub device_us: f64,
}

/// How a job ended, for its spans.
#[derive(Debug, Clone, Copy)]
pub struct JobEnd<'a> {
    pub outcome: &'a str,
    pub prompt_tokens: u32,
    pub cached_prompt_tokens: u32,
    pub completion_tokens: u32,
    pub device_time_us: u64,
    pub energy_mj: u64,
}

/// The trace of one job; empty when its request is not traced.
#[derive(Default)]
pub struct JobTrace {
    live: Option<Box<Live>>,
}

struct Live {
    request: Span,
    queue: Option<Span>,
    generate: Option<Span>,
    run: Option<DecodeRun>,
    steps: u64,
}

/// Consecutive decode steps in batches of one size.
struct DecodeRun {
    first_step: u64,
    last_step: u64,
    steps: u64,
    sequences: usize,
    device_us: f64,
    started: SystemTime,
}

impl JobTrace {
    /// A trace under the current span (the request's), with its `queue`
    /// span open; empty unless that span is sampled.
    pub fn in_current_span() -> JobTrace {
        let request = Span::current();
        if !sampled(&request) {
            return JobTrace::default();
        }
        let queue = tracing::debug_span!(target: TARGET, parent: &request, "queue");
        JobTrace {
            live: Some(Box::new(Live {
                request,
                queue: Some(queue),
                generate: None,
                run: None,
                steps: 0,
            })),
        }
    }

    /// A worker took the job: the queue wait ends, generation starts (or
    /// resumes, after a preemption).
    pub fn admitted(&mut self, worker: usize, cached_prompt_tokens: usize) {
        let Some(live) = self.live.as_deref_mut() else {
            return;
        };
        live.queue = None;
        match &live.generate {
            Some(generate) => generate.add_event(
                "resumed",
                vec![KeyValue::new(
                    "ascend.prompt.cached_tokens",
                    cached_prompt_tokens as i64,
                )],
            ),
            None => {
                let generate =
                    tracing::debug_span!(target: TARGET, parent: &live.request, "generate");
                generate.set_attribute("ascend.worker", worker as i64);
                generate.set_attribute("ascend.prompt.cached_tokens", cached_prompt_tokens as i64);
                live.generate = Some(generate);
            }
        }
    }

    /// The job lost its KV blocks and waits to be prefilled again.
    pub fn preempted(&mut self) {
        let Some(live) = self.live.as_deref_mut() else {
            return;
        };
        live.flush_run();
        if let Some(generate) = &live.generate {
            generate.add_event("preempted", Vec::new());
        }
    }

    /// The job took part in a batch step.
    pub fn step(&mut self, step: StepRecord) {
        let Some(live) = self.live.as_deref_mut() else {
            return;
        };
        live.steps += 1;
        if step.prefill {
            live.flush_run();
            if let Some(generate) = &live.generate {
                generate.add_event(
                    "prefill",
                    vec![
                        KeyValue::new("ascend.step", step.step as i64),
                        KeyValue::new("ascend.batch.sequences", step.sequences as i64),
                        KeyValue::new("ascend.batch.tokens", step.batch_tokens as i64),
                        KeyValue::new("ascend.step.tokens", step.tokens as i64),
                        KeyValue::new("ascend.device_time_us", step.device_us.round() as i64),
                    ],
                );
            }
            return;
        }
        match &mut live.run {
            Some(run) if run.sequences == step.sequences => {
                run.last_step = step.step;
                run.steps += 1;
                run.device_us += step.device_us;
            }
            _ => {
                live.flush_run();
                live.run = Some(DecodeRun {
                    first_step: step.step,
                    last_step: step.step,
                    steps: 1,
                    sequences: step.sequences,
                    device_us: step.device_us,
                    started: SystemTime::now(),
                });
            }
        }
    }

    /// The job ended: its spans get its usage, the `generate` span closes,
    /// and the returned `metering.record` span stays open until the caller
    /// drops it, once the usage is durable.
    pub fn finish(&mut self, end: JobEnd<'_>) -> Option<Span> {
        let mut live = self.live.take()?;
        live.queue = None;
        live.flush_run();
        let usage = [
            KeyValue::new("gen_ai.usage.input_tokens", i64::from(end.prompt_tokens)),
            KeyValue::new(
                "gen_ai.usage.output_tokens",
                i64::from(end.completion_tokens),
            ),
            KeyValue::new(
                "ascend.prompt.cached_tokens",
                i64::from(end.cached_prompt_tokens),
            ),
            KeyValue::new("ascend.device_time_us", end.device_time_us as i64),
            KeyValue::new("ascend.energy_mj", end.energy_mj as i64),
            KeyValue::new("ascend.finish", end.outcome.to_owned()),
        ];
        for kv in &usage {
            live.request.set_attribute(kv.key.clone(), kv.value.clone());
        }
        if let Some(generate) = live.generate.take() {
            generate.set_attribute("ascend.steps", live.steps as i64);
            generate.set_attribute("ascend.finish", end.outcome.to_owned());
        }
        Some(tracing::debug_span!(target: TARGET, parent: &live.request, "metering.record"))
    }
}

impl Live {
    fn flush_run(&mut self) {
        let (Some(run), Some(generate)) = (self.run.take(), &self.generate) else {
            return;
        };
        generate.add_event_with_timestamp(
            "decode",
            run.started,
            vec![
                KeyValue::new("ascend.step.first", run.first_step as i64),
                KeyValue::new("ascend.step.last", run.last_step as i64),
                KeyValue::new("ascend.step.count", run.steps as i64),
                KeyValue::new("ascend.batch.sequences", run.sequences as i64),
                KeyValue::new("ascend.device_time_us", run.device_us.round() as i64),
            ],
        );
    }
}

/// Whether `span` goes to an exporter.
fn sampled(span: &Span) -> bool {
    !span.is_disabled() && span.context().span().span_context().is_sampled()
}
