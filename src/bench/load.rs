//! Drives load over real gRPC or real HTTP: a closed loop (N clients, each
//! sending its next request when the previous one ends) or an open loop
//! (Poisson arrivals at a target rate, whatever the server's pace). Each
//! request is a `GenerateStream` (or a streamed `/v1/completions`), timed
//! at the client: time to first token, the gap before every later token
//! message, end to end.
//!
//! Knows the Inference client and the workload, not the report.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use super::BenchError;
use super::http_load::{self, HttpConnection};
use super::workload::{RequestSource, WorkloadSpec};
use crate::api::pb::v1::GenerateRequest;
use crate::api::pb::v1::generate_stream_response::Event;
use crate::api::pb::v1::inference_client::InferenceClient;

/// How requests arrive.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum Arrival {
    /// `clients` loops, each with one request in flight.
    Closed { clients: usize },
    /// Poisson arrivals at `rate` requests per second.
    Open { rate: f64 },
}

/// One connection of the load: a gRPC channel or an HTTP/2 client.
#[derive(Clone)]
pub enum Connection {
    Grpc(Channel),
    Http(Box<HttpConnection>),
}

/// Where the load goes: connections (requests spread over them) and one
/// API key per tenant; requests take keys round robin.
#[derive(Clone)]
pub struct Target {
    pub connections: Vec<Connection>,
    pub keys: Vec<String>,
}

impl Target {
    /// Load over these gRPC channels.
    pub fn grpc(channels: Vec<Channel>, keys: Vec<String>) -> Target {
        Target {
            connections: channels.into_iter().map(Connection::Grpc).collect(),
            keys,
        }
    }

    /// Load over `count` HTTP/2 connections to the HTTP API at `base`.
    pub fn http(base: &str, count: usize, keys: Vec<String>) -> Result<Target, BenchError> {
        let connections = (0..count.max(1))
            .map(|_| HttpConnection::new(base).map(|c| Connection::Http(Box::new(c))))
            .collect::<Result<_, _>>()?;
        Ok(Target { connections, keys })
    }

    fn connection(&self, n: usize) -> Connection {
        self.connections[n % self.connections.len()].clone()
    }
}

/// One request as the client saw it.
#[derive(Debug, Clone)]
pub struct Sample {
    pub tenant: usize,
    /// Since the run started.
    pub sent_at: Duration,
    pub ttft_us: Option<u64>,
    /// Gaps between consecutive token messages after the first.
    pub inter_token_us: Vec<u64>,
    pub e2e_us: u64,
    pub prompt_tokens: u32,
    /// Of `prompt_tokens`, those served from the prefix cache.
    pub cached_prompt_tokens: u32,
    pub completion_tokens: u32,
    /// The answer's text (the chat workload resends it next turn).
    pub text: String,
    /// Emulated device time and energy charged to the request.
    pub device_time_us: u64,
    pub energy_mj: u64,
    /// `Ok` for a completed stream, else the status code's name.
    pub outcome: Result<(), String>,
}

/// How long a closed-loop client waits after a failed request.
pub const REFUSAL_BACKOFF: Duration = Duration::from_millis(50);

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

pub(super) async fn one_request(
    connection: Connection,
    key: &str,
    tenant: usize,
    request: GenerateRequest,
    run_start: Instant,
) -> Sample {
    let sent = Instant::now();
    let mut sample = Sample {
        tenant,
        sent_at: sent.duration_since(run_start),
        ttft_us: None,
        inter_token_us: Vec::new(),
        e2e_us: 0,
        prompt_tokens: 0,
        cached_prompt_tokens: 0,
        completion_tokens: 0,
        text: String::new(),
        device_time_us: 0,
        energy_mj: 0,
        outcome: Err("no answer".to_owned()),
    };
    let result = match connection {
        Connection::Grpc(channel) => grpc_send(channel, key, request, sent, &mut sample).await,
        Connection::Http(http) => http_load::send(&http, key, &request, sent, &mut sample).await,
    };
    sample.e2e_us = micros(sent.elapsed());
    sample.outcome = result;
    sample
}

impl Sample {
    /// A message with text arrived at `now`: the time to the first one, or
    /// the gap since `last`, which it then becomes.
    pub(super) fn token_at(&mut self, sent: Instant, last: &mut Option<Instant>, now: Instant) {
        match *last {
            None => self.ttft_us = Some(micros(now - sent)),
            Some(previous) => self.inter_token_us.push(micros(now - previous)),
        }
        *last = Some(now);
    }

    /// The usage the answer reported.
    pub(super) fn set_usage(&mut self, usage: ReportedUsage) {
        self.prompt_tokens = usage.prompt_tokens;
        self.cached_prompt_tokens = usage.cached_prompt_tokens;
        self.completion_tokens = usage.completion_tokens;
        self.device_time_us = usage.device_time_us;
        self.energy_mj = usage.energy_mj;
    }
}

/// The usage an answer reported, in either front end's fields.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ReportedUsage {
    pub prompt_tokens: u32,
    pub cached_prompt_tokens: u32,
    pub completion_tokens: u32,
    pub device_time_us: u64,
    pub energy_mj: u64,
}

/// Sends `request` as a `GenerateStream` and fills `sample`'s timings and
/// usage; the error is the status code's name.
async fn grpc_send(
    channel: Channel,
    key: &str,
    request: GenerateRequest,
    sent: Instant,
    sample: &mut Sample,
) -> Result<(), String> {
    let mut message = tonic::Request::new(request);
    let value = format!("Bearer {key}")
        .parse()
        .map_err(|_| "bad key".to_owned())?;
    message.metadata_mut().insert("authorization", value);
    let mut client = InferenceClient::new(channel);
    let result = async {
        let mut stream = client.generate_stream(message).await?.into_inner();
        let mut last = None;
        while let Some(message) = stream.next().await {
            let now = Instant::now();
            match message?.event {
                Some(Event::Delta(delta)) => {
                    sample.token_at(sent, &mut last, now);
                    sample.text.push_str(&delta.text);
                }
                Some(Event::Complete(done)) => {
                    if let Some(usage) = done.usage {
                        sample.set_usage(ReportedUsage {
                            prompt_tokens: usage.prompt_tokens,
                            cached_prompt_tokens: usage.cached_prompt_tokens,
                            completion_tokens: usage.completion_tokens,
                            device_time_us: usage.device_time_us,
                            energy_mj: usage.energy_mj,
                        });
                    }
                    // Read the stream to its end (the trailers): a stream
                    // dropped before them is reset by this client's HTTP/2
                    // layer, and after 1,024 such resets on a connection h2
                    // closes it with ENHANCE_YOUR_CALM, failing every call
                    // on it with RESOURCE_EXHAUSTED. That was the source of
                    // the refusals no gateway metric counted.
                    while let Some(rest) = stream.next().await {
                        rest?;
                    }
                    return Ok(());
                }
                None => {}
            }
        }
        Err(tonic::Status::unknown(
            "the stream ended without its last message",
        ))
    }
    .await;
    result.map_err(|status: tonic::Status| format!("{:?}", status.code()))
}

/// Runs `arrival` for `duration` (no new request after it; those in flight
/// finish) and returns every request's sample and the wall time until the
/// last one ended.
pub async fn run(
    target: &Target,
    workload: &WorkloadSpec,
    arrival: Arrival,
    duration: Duration,
) -> (Vec<Sample>, Duration) {
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    let target = Arc::new(target.clone());
    match arrival {
        Arrival::Closed { clients } => {
            for client in 0..clients.max(1) {
                let target = target.clone();
                let mut source = RequestSource::new(workload, client as u64);
                tasks.spawn(async move {
                    let mut samples = Vec::new();
                    let tenant = client % target.keys.len().max(1);
                    let connection = target.connection(client);
                    while start.elapsed() < duration {
                        let request = source.next_request();
                        let key = target.keys.get(tenant).map_or("", String::as_str);
                        let sample =
                            one_request(connection.clone(), key, tenant, request, start).await;
                        let refused = sample.outcome.is_err();
                        samples.push(sample);
                        if refused {
                            // As a real client would: no retry storm after a refusal.
                            tokio::time::sleep(REFUSAL_BACKOFF).await;
                        }
                    }
                    samples
                });
            }
        }
        Arrival::Open { rate } => {
            let mut source = RequestSource::new(workload, 0);
            let mut gaps = RequestSource::new(workload, u64::MAX);
            let mut next = start;
            let mut n = 0usize;
            while next.duration_since(start) < duration {
                tokio::time::sleep_until(next.into()).await;
                let tenant = n % target.keys.len().max(1);
                let connection = target.connection(n);
                let key = target.keys.get(tenant).cloned().unwrap_or_default();
                let request = source.next_request();
                tasks.spawn(async move {
                    vec![one_request(connection, &key, tenant, request, start).await]
                });
                n += 1;
                // Exponential gaps: a Poisson process of the given rate.
                let gap = -(1.0 - gaps.unit()).ln() / rate.max(1e-9);
                next += Duration::from_secs_f64(gap);
            }
        }
    }
    let mut samples = Vec::new();
    while let Some(done) = tasks.join_next().await {
        if let Ok(batch) = done {
            samples.extend(batch);
        }
    }
    let elapsed = start.elapsed();
    samples.sort_by_key(|s| s.sent_at);
    (samples, elapsed)
}
