//! `POST /v1/chat/completions` and `POST /v1/completions`: authenticate,
//! read and check the body, hand the [`GenerateInput`] to the shared path,
//! answer in one JSON body or as Server-Sent Events.
//!
//! A client that disconnects drops the answer (body or stream), which drops
//! the running request: the worker frees it within a step and meters the
//! tokens produced, as on the gRPC path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::HttpApi;
use super::error::ApiError;
use super::headers;
use super::response::{ChunkWriter, Endpoint, completion};
use super::sse;
use super::wire::{ChatRequest, CompletionRequest, Delivery};
use crate::auth::TenantPrincipal;
use crate::generation::{
    Answer, GenerateInput, GenerationError, MAX_REQUEST_ID_LEN, Running, Start, Update,
};

/// The client's idempotency key and echo of the request id.
const REQUEST_ID: &str = "x-request-id";
/// How long the client waits, in seconds (a decimal number).
const REQUEST_TIMEOUT: &str = "x-request-timeout";
/// Set on an answer replayed for a duplicate `request_id`.
const REPLAYED: &str = "idempotent-replayed";
/// The longest `X-Request-Timeout` honoured.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

pub async fn chat(State(api): State<HttpApi>, request: Request) -> Response {
    generate(api, request, Endpoint::Chat, ChatRequest::parse).await
}

pub async fn completions(State(api): State<HttpApi>, request: Request) -> Response {
    generate(
        api,
        request,
        Endpoint::Completions,
        CompletionRequest::parse,
    )
    .await
}

/// The headers' request id and deadline, checked before anything else.
fn request_headers(
    headers: &HeaderMap,
    received_at: Instant,
) -> Result<(Option<String>, Option<Instant>), ApiError> {
    let request_id = match headers.get(REQUEST_ID) {
        None => None,
        Some(value) => {
            let text = value
                .to_str()
                .ok()
                .filter(|t| {
                    !t.is_empty()
                        && t.len() <= MAX_REQUEST_ID_LEN
                        && t.bytes().all(|b| b.is_ascii_graphic())
                })
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "invalid `X-Request-Id` header: 1 to {MAX_REQUEST_ID_LEN} printable ASCII characters"
                    ))
                    .param("X-Request-Id")
                })?;
            Some(text.to_owned())
        }
    };
    let deadline = match headers.get(REQUEST_TIMEOUT) {
        None => None,
        Some(value) => {
            let secs = value
                .to_str()
                .ok()
                .and_then(|t| t.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s > 0.0 && *s <= MAX_TIMEOUT.as_secs_f64())
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "invalid `X-Request-Timeout` header: seconds, a number above 0 and at most {}",
                        MAX_TIMEOUT.as_secs()
                    ))
                    .param("X-Request-Timeout")
                })?;
            Some(received_at + Duration::from_secs_f64(secs))
        }
    };
    Ok((request_id, deadline))
}

/// The body as a JSON object, or why not: over the size limit (413), too
/// slow (408), not JSON (400), not UTF-8 (400), not an object (400).
async fn read_body(
    api: &HttpApi,
    headers: &HeaderMap,
    body: Body,
) -> Result<serde_json::Value, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::bad_request(
            "the request body must be JSON, sent with `Content-Type: application/json`",
        ));
    }
    let bounds = api.body_bounds();
    let limit = bounds.max_bytes;
    let read = tokio::time::timeout(bounds.timeout, axum::body::to_bytes(body, limit));
    let Ok(read) = read.await else {
        return Err(ApiError::new(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "the request body did not arrive within {} (setting `http_body_timeout`)",
                humantime::format_duration(bounds.timeout)
            ),
        )
        .code("request_timeout"));
    };
    let bytes = read.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit")
        {
            api.refusals()
                .record(crate::metrics::refusals::RefusalCause::MessageTooLarge);
            ApiError::new(
                axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("the request body is over {limit} bytes (setting `http_max_body_bytes`)"),
            )
            .code("request_too_large")
        } else {
            ApiError::bad_request("the request body could not be read")
        }
    })?;
    if std::str::from_utf8(&bytes).is_err() {
        return Err(ApiError::bad_request("the request body is not UTF-8"));
    }
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    Ok(value)
}

async fn generate(
    api: HttpApi,
    request: Request,
    endpoint: Endpoint,
    parse: fn(&serde_json::Value) -> Result<(GenerateInput, Delivery), GenerationError>,
) -> Response {
    let received_at = Instant::now();
    let (parts, body) = request.into_parts();
    let (header_id, deadline) = match request_headers(&parts.headers, received_at) {
        Ok(found) => found,
        Err(error) => return error.into_response(),
    };
    let tenant = match api.tenant(&parts).await {
        Ok(tenant) => tenant,
        Err(error) => return error.into_response(),
    };
    let answer = async {
        let body = match read_body(&api, &parts.headers, body).await {
            Ok(body) => body,
            Err(error) => return Err(api.refused_before_admission(&tenant, error).await),
        };
        let (mut input, delivery) = match parse(&body) {
            Ok(found) => found,
            Err(error) => {
                let error = api.generation().refused(&tenant, error).await;
                return Err(api.error(&error, &tenant));
            }
        };
        match (&header_id, &input.request_id) {
            (Some(header), Some(field)) if header != field => {
                let error =
                    GenerationError::invalid("request_id", "differs from the X-Request-Id header");
                let error = api.generation().refused(&tenant, error).await;
                return Err(api.error(&error, &tenant));
            }
            (Some(header), _) => input.request_id = Some(header.clone()),
            _ => {}
        }
        let started = api
            .generation()
            .start(tenant.clone(), &input, received_at, deadline)
            .await
            .map_err(|e| api.error(&e, &tenant))?;
        Ok((started, delivery))
    };
    let timed = match deadline {
        Some(at) => tokio::time::timeout_at(at.into(), answer)
            .await
            .unwrap_or_else(|_| Err(api.error(&GenerationError::DeadlineExceeded, &tenant))),
        None => answer.await,
    };
    let (started, delivery) = match timed {
        Ok(found) => found,
        Err(error) => return with_request_id(error.into_response(), header_id.as_deref()),
    };
    match started {
        Start::Replay(answer) => {
            let mut response = if delivery.stream {
                replay_stream(endpoint, &answer, delivery)
            } else {
                json(completion(endpoint, &answer))
            };
            response
                .headers_mut()
                .insert(REPLAYED, HeaderValue::from_static("true"));
            with_request_id(response, Some(&answer.request_id))
        }
        Start::Run(running) => {
            let request_id = running.request_id().to_owned();
            let mut response = if delivery.stream {
                stream(api, tenant, running, endpoint, delivery)
            } else {
                let headroom = running.headroom();
                let finished = match deadline {
                    Some(at) => tokio::time::timeout_at(at.into(), running.finish())
                        .await
                        .unwrap_or(Err(GenerationError::DeadlineExceeded)),
                    None => running.finish().await,
                };
                match finished {
                    Ok(answer) => {
                        let mut response = json(completion(endpoint, &answer));
                        headers::admitted(response.headers_mut(), headroom);
                        response
                    }
                    Err(error) => api.error(&error, &tenant).into_response(),
                }
            };
            if delivery.stream {
                response
                    .headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            }
            with_request_id(response, Some(&request_id))
        }
    }
}

fn with_request_id(mut response: Response, request_id: Option<&str>) -> Response {
    if let Some(value) = request_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

fn json(body: String) -> Response {
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The stream's last event.
const DONE: &str = "[DONE]";

/// A stored answer as a stream: the role, its text as one chunk, the end.
fn replay_stream(endpoint: Endpoint, answer: &Answer, delivery: Delivery) -> Response {
    let mut writer = ChunkWriter::new(
        endpoint,
        &answer.request_id,
        &answer.model,
        delivery.include_usage,
    );
    let mut events = Vec::new();
    events.extend(writer.role());
    events.extend(writer.text(&answer.text, None));
    events.extend(writer.end(answer));
    events.push(DONE.to_owned());
    sse::response(Box::pin(tokio_stream::iter(events)))
}

/// The running request's updates as Server-Sent Events, ending with
/// `data: [DONE]`; a failure mid-stream is sent as an `error` object and
/// ends the stream.
fn stream(
    api: HttpApi,
    tenant: Arc<TenantPrincipal>,
    running: Running,
    endpoint: Endpoint,
    delivery: Delivery,
) -> Response {
    let headroom = running.headroom();
    let writer = ChunkWriter::new(
        endpoint,
        running.request_id(),
        running.model(),
        delivery.include_usage,
    );
    let first: Vec<String> = writer.role().into_iter().collect();
    let state = (Some(running), writer);
    let updates = futures_util::stream::unfold(state, move |(running, mut writer)| {
        let (api, tenant) = (api.clone(), tenant.clone());
        async move {
            let mut running = running?;
            loop {
                let events: Vec<String> = match running.next().await {
                    None => return None,
                    Some(Ok(Update::Delta { text, logprobs })) => {
                        match writer.text(&text, logprobs.as_ref()) {
                            Some(chunk) => vec![chunk],
                            None => continue,
                        }
                    }
                    Some(Ok(Update::Done(answer))) => {
                        let mut events = writer.end(&answer);
                        events.push(DONE.to_owned());
                        return Some((tokio_stream::iter(events), (None, writer)));
                    }
                    Some(Err(error)) => {
                        let error = api.error(&error, &tenant);
                        return Some((tokio_stream::iter(vec![error.body_json()]), (None, writer)));
                    }
                };
                return Some((tokio_stream::iter(events), (Some(running), writer)));
            }
        }
    });
    use futures_util::StreamExt as _;
    let events = tokio_stream::iter(first).chain(updates.flatten());
    let mut response = sse::response(Box::pin(events));
    headers::admitted(response.headers_mut(), headroom);
    response
}
