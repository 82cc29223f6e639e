//! Reads the gateway's `/metrics` for what only the server knows: how many
//! steps ran and how many sequences and tokens they held, so a run reports
//! its mean batch size.
//!
//! Knows the metric names, not the server.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::BenchError;

/// Running totals of a model's batched steps.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTotals {
    pub steps: f64,
    pub sequences: f64,
    pub tokens: f64,
    pub seconds: f64,
}

/// Means per step over an interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepMeans {
    pub sequences: f64,
    pub tokens: f64,
    pub duration_ms: f64,
}

impl StepTotals {
    /// What happened between `earlier` and `self`, as means per step.
    pub fn means_since(&self, earlier: &StepTotals) -> StepMeans {
        let steps = self.steps - earlier.steps;
        if steps <= 0.0 {
            return StepMeans::default();
        }
        StepMeans {
            sequences: (self.sequences - earlier.sequences) / steps,
            tokens: (self.tokens - earlier.tokens) / steps,
            duration_ms: (self.seconds - earlier.seconds) * 1000.0 / steps,
        }
    }
}

/// GET `/metrics` over HTTP/1.1.
pub async fn fetch(addr: SocketAddr) -> Result<String, BenchError> {
    let failed = |e: std::io::Error| BenchError::Metrics {
        addr,
        message: e.to_string(),
    };
    let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(failed)?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .map_err(failed)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.map_err(failed)?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        _ => Err(BenchError::Metrics {
            addr,
            message: response.lines().next().unwrap_or("no response").to_owned(),
        }),
    }
}

/// The value of the sample `series` (name with its labels), if present.
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// The step totals of `model` in a scrape.
pub fn step_totals(body: &str, model: &str) -> StepTotals {
    let label = format!("{{model=\"{model}\"}}");
    let get = |name: &str| sample(body, &format!("{name}{label}")).unwrap_or(0.0);
    StepTotals {
        steps: get("ascend_gateway_step_sequences_count"),
        sequences: get("ascend_gateway_step_sequences_sum"),
        tokens: get("ascend_gateway_step_tokens_sum"),
        seconds: get("ascend_gateway_step_duration_seconds_sum"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_totals_are_read_for_the_model_asked() {
        let body = "\
ascend_gateway_step_sequences_sum{model=\"a\"} 60.0
ascend_gateway_step_sequences_count{model=\"a\"} 10
ascend_gateway_step_tokens_sum{model=\"a\"} 400.0
ascend_gateway_step_duration_seconds_sum{model=\"a\"} 0.5
ascend_gateway_step_sequences_sum{model=\"b\"} 1.0
";
        let a = step_totals(body, "a");
        assert_eq!(
            a,
            StepTotals {
                steps: 10.0,
                sequences: 60.0,
                tokens: 400.0,
                seconds: 0.5,
            }
        );
        let before = StepTotals {
            steps: 5.0,
            sequences: 20.0,
            tokens: 100.0,
            seconds: 0.25,
        };
        assert_eq!(
            a.means_since(&before),
            StepMeans {
                sequences: 8.0,
                tokens: 60.0,
                duration_ms: 50.0
            }
        );
        assert_eq!(step_totals(body, "c"), StepTotals::default());
    }
}
