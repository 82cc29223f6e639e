//! The load generator's HTTP client: one workload request as a streamed
//! `POST /v1/completions` (Server-Sent Events, `include_usage`) over
//! cleartext HTTP/2, timed as the gRPC client times a `GenerateStream`:
//! the first chunk with text, the gap before every later one, the end.
//!
//! Knows the OpenAI wire shape a client sees, not the gateway's code: it
//! reads the bytes as any SDK would.

use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use super::BenchError;
use super::load::{ReportedUsage, Sample};
use crate::api::pb::v1::GenerateRequest;

/// One HTTP/2 connection (the client's pool holds one per host when it
/// speaks HTTP/2 only) and the endpoint's URI.
#[derive(Clone)]
pub struct HttpConnection {
    client: Client<HttpConnector, Full<Bytes>>,
    completions: hyper::Uri,
}

impl HttpConnection {
    /// A connection to the HTTP API at `base` (`http://host:port`); it
    /// connects on its first request.
    pub fn new(base: &str) -> Result<HttpConnection, BenchError> {
        let url = format!("{}/v1/completions", base.trim_end_matches('/'));
        let completions = url
            .parse::<hyper::Uri>()
            .map_err(|e| BenchError::Endpoint {
                endpoint: base.to_owned(),
                message: e.to_string(),
            })?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        Ok(HttpConnection {
            client,
            completions,
        })
    }
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    usage: Option<ChunkUsage>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    text: String,
}

#[derive(Deserialize)]
struct ChunkUsage {
    prompt_tokens: u32,
    #[serde(default)]
    prompt_cache_hit_tokens: u32,
    completion_tokens: u32,
    #[serde(default)]
    device_time_us: u64,
    #[serde(default)]
    energy_mj: u64,
}

fn body(request: &GenerateRequest) -> Vec<u8> {
    serde_json::json!({
        "model": request.model,
        "prompt": request.prompt,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "seed": request.seed,
        "ignore_eos": request.ignore_eos,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string()
    .into_bytes()
}

/// Sends `request` and fills `sample`'s timings and usage; the error is
/// the outcome's name (`HTTP 429`, `transport`, `framing`).
pub(super) async fn send(
    connection: &HttpConnection,
    key: &str,
    request: &GenerateRequest,
    sent: Instant,
    sample: &mut Sample,
) -> Result<(), String> {
    let message = hyper::Request::post(connection.completions.clone())
        .header(hyper::header::AUTHORIZATION, format!("Bearer {key}"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body(request))))
        .map_err(|_| "bad key".to_owned())?;
    let response = connection
        .client
        .request(message)
        .await
        .map_err(|_| "transport".to_owned())?;
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        // Read the error body to its end, as a client would.
        let _ = body.collect().await;
        return Err(format!("HTTP {}", status.as_u16()));
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut last = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| "transport".to_owned())?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let now = Instant::now();
        pending.extend_from_slice(&data);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            for line in event.split(|&b| b == b'\n') {
                let Some(payload) = line.strip_prefix(b"data: ") else {
                    continue;
                };
                if payload == b"[DONE]" {
                    // Read the body to its end: a stream dropped before it
                    // is reset by this client, and after 1,024 resets h2
                    // closes the connection (as with gRPC, see `load`).
                    while let Some(rest) = body.frame().await {
                        rest.map_err(|_| "transport".to_owned())?;
                    }
                    return if sample.completion_tokens > 0 || sample.prompt_tokens > 0 {
                        Ok(())
                    } else {
                        Err("no usage".to_owned())
                    };
                }
                let chunk: Chunk =
                    serde_json::from_slice(payload).map_err(|_| "framing".to_owned())?;
                if chunk.choices.iter().any(|c| !c.text.is_empty()) {
                    sample.token_at(sent, &mut last, now);
                    for choice in &chunk.choices {
                        sample.text.push_str(&choice.text);
                    }
                }
                if let Some(u) = chunk.usage {
                    sample.set_usage(ReportedUsage {
                        prompt_tokens: u.prompt_tokens,
                        cached_prompt_tokens: u.prompt_cache_hit_tokens,
                        completion_tokens: u.completion_tokens,
                        device_time_us: u.device_time_us,
                        energy_mj: u.energy_mj,
                    });
                }
            }
        }
    }
    Err("the stream ended before [DONE]".to_owned())
}
