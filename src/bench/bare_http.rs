//! The HTTP reference for the overhead benchmark: the gateway's own HTTP
//! listener (the same hyper-util server, HTTP/1.1 and h2c) and SSE writer
//! with one route, a streamed `/v1/completions` that echoes the prompt in
//! OpenAI's chunk shape at once: no authentication, limits, queue, tokenizer or
//! metering. What the gateway's HTTP path costs beyond this is the gateway.
//!
//! Knows the wire shape of a completion chunk, not the gateway's handlers.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::BenchError;
use crate::listener::{ConnectionStats, ServerSettings};

#[derive(Deserialize)]
struct EchoRequest {
    prompt: String,
}

async fn echo(body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<EchoRequest>(&body) else {
        return (StatusCode::BAD_REQUEST, "prompt: a string is required").into_response();
    };
    // Words stand in for tokens: no tokenizer on the bare path.
    let words = request.prompt.split_whitespace().count();
    let chunk = |choices: serde_json::Value, usage: serde_json::Value| {
        serde_json::json!({
            "id": "cmpl-bare",
            "object": "text_completion",
            "created": 0,
            "model": "echo",
            "choices": choices,
            "usage": usage,
        })
        .to_string()
    };
    let events = [
        chunk(
            serde_json::json!([{"index": 0, "text": request.prompt, "finish_reason": null}]),
            serde_json::Value::Null,
        ),
        chunk(
            serde_json::json!([{"index": 0, "text": "", "finish_reason": "length"}]),
            serde_json::Value::Null,
        ),
        chunk(
            serde_json::json!([]),
            serde_json::json!({
                "prompt_tokens": words,
                "completion_tokens": words,
                "total_tokens": 2 * words,
            }),
        ),
        "[DONE]".to_owned(),
    ];
    // The gateway's own SSE writer: the reference frames events as the
    // gateway does (all four ready at once, so one frame).
    crate::http::sse_response(Box::pin(tokio_stream::iter(events)))
}

/// A running bare HTTP echo server.
pub struct BareHttpServer {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl BareHttpServer {
    pub async fn start() -> Result<BareHttpServer, BenchError> {
        let failed = |e: std::io::Error| BenchError::Gateway(format!("bare HTTP server: {e}"));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(failed)?;
        let addr = listener.local_addr().map_err(failed)?;
        let stop = CancellationToken::new();
        let router = Router::new().route("/v1/completions", post(echo));
        let task = tokio::spawn(crate::http::serve(
            listener,
            router,
            None,
            ServerSettings::default(),
            Arc::new(ConnectionStats::default()),
            stop.clone(),
        ));
        Ok(BareHttpServer { addr, stop, task })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}
