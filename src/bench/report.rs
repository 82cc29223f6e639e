//! A run's results: throughput, latency summaries, batch size and each
//! tenant's share, as JSON for machines and a Markdown row for people.
//!
//! Knows samples and summaries, not how they were produced.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::load::{Arrival, Sample};
use super::percentile::Summary;

/// One tenant's part of a run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TenantShare {
    pub tenant: usize,
    pub requests: usize,
    pub output_tokens: u64,
    /// Of all output tokens in the run.
    pub token_share: f64,
    /// Refused or failed requests by gRPC status code.
    pub errors: BTreeMap<String, usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub label: String,
    pub arrival: Arrival,
    pub seconds: f64,
    pub requests_ok: usize,
    /// Failed requests by gRPC status code.
    pub errors: BTreeMap<String, usize>,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub ttft_ms: Summary,
    pub inter_token_ms: Summary,
    /// Per request: (end to end - TTFT) / (tokens - 1).
    pub time_per_output_token_ms: Summary,
    pub e2e_ms: Summary,
    /// Sequences and tokens per batched step, from the server's metrics.
    pub mean_batch_sequences: Option<f64>,
    pub mean_batch_tokens: Option<f64>,
    /// Wall time per step (with `pace = "device"`, the emulated step time).
    pub mean_step_ms: Option<f64>,
    /// Emulated device time and energy of the completed requests.
    pub device_time_us: u64,
    pub energy_mj: u64,
    pub tenants: Vec<TenantShare>,
}

/// `value` rounded to `places` decimals, for reports people read.
pub(crate) fn round(value: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (value * scale).round() / scale
}

impl RunReport {
    pub fn new(label: &str, arrival: Arrival, samples: &[Sample], elapsed: Duration) -> RunReport {
        let ok: Vec<&Sample> = samples.iter().filter(|s| s.outcome.is_ok()).collect();
        let mut errors = BTreeMap::new();
        for s in samples {
            if let Err(code) = &s.outcome {
                *errors.entry(code.clone()).or_insert(0) += 1;
            }
        }
        let seconds = elapsed.as_secs_f64().max(1e-9);
        let output_tokens: u64 = ok.iter().map(|s| u64::from(s.completion_tokens)).sum();
        let mut tenants: BTreeMap<usize, TenantShare> = BTreeMap::new();
        for s in samples {
            let share = tenants.entry(s.tenant).or_insert(TenantShare {
                tenant: s.tenant,
                requests: 0,
                output_tokens: 0,
                token_share: 0.0,
                errors: BTreeMap::new(),
            });
            match &s.outcome {
                Ok(()) => {
                    share.requests += 1;
                    share.output_tokens += u64::from(s.completion_tokens);
                }
                Err(code) => *share.errors.entry(code.clone()).or_insert(0) += 1,
            }
        }
        let tenants = tenants
            .into_values()
            .map(|mut t| {
                t.token_share = round(t.output_tokens as f64 / output_tokens.max(1) as f64, 4);
                t
            })
            .collect();
        RunReport {
            label: label.to_owned(),
            arrival,
            seconds: round(seconds, 3),
            requests_ok: ok.len(),
            errors,
            prompt_tokens: ok.iter().map(|s| u64::from(s.prompt_tokens)).sum(),
            output_tokens,
            requests_per_s: round(ok.len() as f64 / seconds, 2),
            output_tokens_per_s: round(output_tokens as f64 / seconds, 1),
            ttft_ms: Summary::of_micros(ok.iter().filter_map(|s| s.ttft_us)),
            inter_token_ms: Summary::of_micros(
                ok.iter().flat_map(|s| s.inter_token_us.iter().copied()),
            ),
            time_per_output_token_ms: Summary::of_micros(ok.iter().filter_map(|s| {
                let ttft = s.ttft_us?;
                let gaps = u64::from(s.completion_tokens.checked_sub(1)?);
                (gaps > 0).then(|| s.e2e_us.saturating_sub(ttft) / gaps)
            })),
            e2e_ms: Summary::of_micros(ok.iter().map(|s| s.e2e_us)),
            mean_batch_sequences: None,
            mean_batch_tokens: None,
            mean_step_ms: None,
            device_time_us: ok.iter().map(|s| s.device_time_us).sum(),
            energy_mj: ok.iter().map(|s| s.energy_mj).sum(),
            tenants,
        }
    }

    /// The header of [`RunReport::markdown_row`]'s table.
    pub fn markdown_header() -> &'static str {
        "| run | load | ok | errors | output tok/s | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | e2e p50 / p90 / p99 ms | mean batch |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    }

    pub fn markdown_row(&self) -> String {
        let load = match self.arrival {
            Arrival::Closed { clients } => format!("{clients} clients"),
            Arrival::Open { rate } => format!("{rate} req/s"),
        };
        let errors: usize = self.errors.values().sum();
        let batch = self
            .mean_batch_sequences
            .map_or("-".to_owned(), |b| format!("{b:.1}"));
        format!(
            "| {} | {load} | {} | {errors} | {:.1} | {:.2} | {:.1} / {:.1} | {:.2} / {:.2} | {:.0} / {:.0} / {:.0} | {batch} |",
            self.label,
            self.requests_ok,
            self.output_tokens_per_s,
            self.requests_per_s,
            self.ttft_ms.p50,
            self.ttft_ms.p99,
            self.inter_token_ms.p50,
            self.inter_token_ms.p99,
            self.e2e_ms.p50,
            self.e2e_ms.p90,
            self.e2e_ms.p99,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(tenant: usize, ttft_ms: u64, gaps_ms: &[u64], tokens: u32) -> Sample {
        let e2e = ttft_ms + gaps_ms.iter().sum::<u64>();
        Sample {
            tenant,
            sent_at: Duration::ZERO,
            ttft_us: Some(ttft_ms * 1000),
            inter_token_us: gaps_ms.iter().map(|g| g * 1000).collect(),
            e2e_us: e2e * 1000,
            prompt_tokens: 5,
            cached_prompt_tokens: 0,
            completion_tokens: tokens,
            text: String::new(),
            device_time_us: 0,
            energy_mj: 0,
            outcome: Ok(()),
        }
    }

    #[test]
    fn a_report_accounts_for_every_sample() {
        let mut failed = sample(1, 0, &[], 0);
        failed.outcome = Err("ResourceExhausted".to_owned());
        let samples = vec![
            sample(0, 10, &[2, 2, 2], 4),
            sample(1, 20, &[4], 2),
            sample(0, 30, &[], 1),
            failed,
        ];
        let report = RunReport::new(
            "t",
            Arrival::Closed { clients: 2 },
            &samples,
            Duration::from_secs(2),
        );
        assert_eq!(report.requests_ok, 3);
        assert_eq!(report.errors.get("ResourceExhausted"), Some(&1));
        assert_eq!(report.output_tokens, 7);
        assert_eq!(report.prompt_tokens, 15);
        assert_eq!(report.output_tokens_per_s, 3.5);
        assert_eq!(report.requests_per_s, 1.5);
        assert_eq!(report.ttft_ms.p50, 20.0);
        assert_eq!(report.inter_token_ms.count, 4);
        assert_eq!(report.inter_token_ms.max, 4.0);
        // (16 - 10) / 3 = 2 and (24 - 20) / 1 = 4; one token has no gap.
        assert_eq!(report.time_per_output_token_ms.count, 2);
        assert_eq!(report.time_per_output_token_ms.mean, 3.0);
        assert_eq!(report.e2e_ms.max, 30.0);
        assert_eq!(report.tenants.len(), 2);
        assert_eq!(report.tenants[0].output_tokens, 5);
        assert_eq!(report.tenants[0].token_share, 0.7143);
        assert_eq!(report.tenants[1].errors.get("ResourceExhausted"), Some(&1));
        assert!(
            report
                .markdown_row()
                .starts_with("| t | 2 clients | 3 | 1 |")
        );
    }
}
