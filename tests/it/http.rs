//! The OpenAI-compatible HTTP API end to end over real HTTP/1.1 and h2c on
//! TCP: answers equal to the gRPC path's for a seed, usage equal to
//! `CountTokens`, OpenAI's error shapes and statuses with the rate-limit
//! headers, the SSE framing byte for byte, disconnects freeing their slot
//! and metered once, request ids metered once and kept per tenant.

use std::time::Duration;

use ascend_gateway::api::pb::v1::inference_client::InferenceClient;
use ascend_gateway::api::pb::v1::{ChatMessage, CountTokensRequest, GenerateRequest, TenantLimits};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{ADMIN_TOKEN, TestGateway, authed, tenant_with_limits};
use crate::generate::tenant_key;

/// An answer: status, headers, the whole body as text.
pub struct Reply {
    pub status: u16,
    headers: hyper::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `error` object of an OpenAI error body, checked for its shape.
    fn error(&self) -> Value {
        let body = self.json();
        let error = body["error"].clone();
        for field in ["message", "type", "param", "code"] {
            assert!(
                error.get(field).is_some(),
                "error body without `{field}`: {}",
                self.body
            );
        }
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        error
    }
}

fn client(http2: bool) -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build_http()
}

pub(crate) async fn send(
    gateway: &TestGateway,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Reply {
    send_with(&client(false), gateway, method, path, headers, body).await
}

async fn send_with(
    client: &Client<HttpConnector, Full<Bytes>>,
    gateway: &TestGateway,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Reply {
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", gateway.http_addr));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::from(body))).expect("request");
    let response = tokio::time::timeout(Duration::from_secs(60), client.request(request))
        .await
        .expect("answered within 60 s")
        .expect("HTTP exchange");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8(body.to_vec()).expect("UTF-8 body"),
    }
}

/// A GET with a tenant key.
pub async fn get(gateway: &TestGateway, path: &str, key: &str) -> Reply {
    let auth = format!("Bearer {key}");
    send(
        gateway,
        "GET",
        path,
        &[("authorization", auth.as_str())],
        Vec::new(),
    )
    .await
}

/// A JSON POST with a tenant key.
pub async fn post(gateway: &TestGateway, path: &str, key: &str, body: &Value) -> Reply {
    post_with(gateway, path, key, body, &[]).await
}

async fn post_with(
    gateway: &TestGateway,
    path: &str,
    key: &str,
    body: &Value,
    extra: &[(&str, &str)],
) -> Reply {
    let auth = format!("Bearer {key}");
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    send(
        gateway,
        "POST",
        path,
        &headers,
        body.to_string().into_bytes(),
    )
    .await
}

/// The JSON of each `data:` event of an SSE body, checking the framing
/// byte for byte: every event is `data: <payload>\n\n` and the last one is
/// `data: [DONE]`.
fn sse_events(body: &str) -> Vec<Value> {
    assert!(
        body.ends_with("data: [DONE]\n\n"),
        "ends with [DONE]: {body:?}"
    );
    let mut events = Vec::new();
    for frame in body.split_terminator("\n\n") {
        let payload = frame
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("a frame that is not `data: `: {frame:?}"));
        assert!(!payload.contains('\n'), "one line per event: {frame:?}");
        if payload == "[DONE]" {
            continue;
        }
        events.push(serde_json::from_str(payload).expect("each event is JSON"));
    }
    events
}

/// The content of a chat stream's events, and its finish reason.
fn chat_stream_text(events: &[Value]) -> (String, String) {
    let mut text = String::new();
    let mut finish = String::new();
    for event in events {
        for choice in event["choices"].as_array().expect("choices") {
            if let Some(content) = choice["delta"]["content"].as_str() {
                text.push_str(content);
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish = reason.to_owned();
            }
        }
    }
    (text, finish)
}

const QUESTION: &str = "What runs on an Ascend 910B?";

fn chat_body(seed: i64, stream: bool) -> Value {
    json!({
        "model": "tiny",
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": QUESTION}
        ],
        "max_tokens": 16,
        "temperature": 0.8,
        "seed": seed,
        "stream": stream,
    })
}

async fn usage_rows(gateway: &TestGateway, request_id: &str) -> Vec<(String, i64, i64)> {
    sqlx::query_as(
        "SELECT request_id, prompt_tokens, completion_tokens FROM usage_events \
         WHERE request_id = $1 OR request_id LIKE $2",
    )
    .bind(request_id)
    .bind(format!("{request_id} #%"))
    .fetch_all(gateway.db.pool())
    .await
    .expect("usage query")
}

/// Waits until the usage writer has shipped `n` rows for `request_id`.
async fn wait_for_usage(
    gateway: &TestGateway,
    request_id: &str,
    n: usize,
) -> Vec<(String, i64, i64)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let rows = usage_rows(gateway, request_id).await;
        if rows.len() >= n {
            return rows;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} usage rows for {request_id}, waited for {n}",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn chat_unary_and_streamed_equal_the_grpc_answer_with_usage_from_the_tokenizer() {
    let gateway = TestGateway::start().await;
    let key = tenant_key(&gateway, "openai-user").await;

    let unary = post(
        &gateway,
        "/v1/chat/completions",
        &key,
        &chat_body(42, false),
    )
    .await;
    assert_eq!(unary.status, 200, "{}", unary.body);
    assert_eq!(unary.header("content-type"), Some("application/json"));
    assert!(unary.header("x-request-id").is_some());
    let answer = unary.json();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["model"], "tiny");
    assert!(answer["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(answer["created"].as_i64().unwrap() > 1_700_000_000);
    let choice = &answer["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let text = choice["message"]["content"].as_str().unwrap().to_owned();
    assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()));

    // The same request over gRPC gives the same text.
    let mut grpc = InferenceClient::new(gateway.channel.clone());
    let messages = vec![
        ChatMessage {
            role: "system".into(),
            content: "Answer briefly.".into(),
        },
        ChatMessage {
            role: "user".into(),
            content: QUESTION.into(),
        },
    ];
    let grpc_answer = grpc
        .generate(authed(
            GenerateRequest {
                model: "tiny".into(),
                messages: messages.clone(),
                max_tokens: Some(16),
                temperature: Some(0.8),
                seed: Some(42),
                ..Default::default()
            },
            &key,
        ))
        .await
        .expect("gRPC generate")
        .into_inner();
    assert_eq!(text, grpc_answer.text, "HTTP and gRPC agree for a seed");

    // Usage: prompt tokens as CountTokens counts them.
    let counted = crate::common::token_count(
        &gateway.channel,
        &key,
        CountTokensRequest {
            model: "tiny".into(),
            messages,
            ..Default::default()
        },
    )
    .await;
    let usage = &answer["usage"];
    assert_eq!(usage["prompt_tokens"], counted);
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(usage["prompt_cache_hit_tokens"], 0);
    assert_eq!(usage["prompt_cache_miss_tokens"], counted);
    assert!(usage["device_time_us"].as_u64().unwrap() > 0);
    assert!(usage["energy_mj"].as_u64().is_some());
    let cost = &usage["cost"];
    assert_eq!(cost["currency"], "USD", "{usage}");
    assert!(cost["amount"].as_str().unwrap().parse::<f64>().is_ok());

    // Streamed: the same text, a role first, a finish reason last, no usage
    // chunk unless asked for.
    let streamed = post(&gateway, "/v1/chat/completions", &key, &chat_body(42, true)).await;
    assert_eq!(streamed.status, 200, "{}", streamed.body);
    assert!(
        streamed
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/event-stream"))
    );
    let events = sse_events(&streamed.body);
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        events
            .iter()
            .all(|e| e["object"] == "chat.completion.chunk")
    );
    assert!(events.iter().all(|e| e.get("usage").is_none()));
    let ids: std::collections::HashSet<&str> =
        events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 1, "one id for the whole stream");
    let (streamed_text, finish) = chat_stream_text(&events);
    assert_eq!(
        streamed_text, text,
        "streamed content equals the unary answer"
    );
    assert_eq!(finish, choice["finish_reason"].as_str().unwrap());

    // With include_usage: every chunk carries `usage: null` but the last,
    // which has no choices and the usage.
    let mut body = chat_body(42, true);
    body["stream_options"] = json!({"include_usage": true});
    let with_usage = post(&gateway, "/v1/chat/completions", &key, &body).await;
    let events = sse_events(&with_usage.body);
    let (last, rest) = events.split_last().unwrap();
    assert!(rest.iter().all(|e| e["usage"].is_null()));
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["prompt_tokens"], counted);
    assert_eq!(
        last["usage"]["completion_tokens"],
        answer["usage"]["completion_tokens"]
    );
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn completions_unary_and_streamed_agree_with_grpc_and_report_logprobs() {
    let gateway = TestGateway::start().await;
    let key = tenant_key(&gateway, "legacy-user").await;
    let body = json!({
        "model": "tiny",
        "prompt": "The Ascend 910C",
        "max_tokens": 12,
        "temperature": 0.7,
        "seed": 7,
        "logprobs": 2,
        "stop": ["\n\n"],
    });
    let unary = post(&gateway, "/v1/completions", &key, &body).await;
    assert_eq!(unary.status, 200, "{}", unary.body);
    let answer = unary.json();
    assert_eq!(answer["object"], "text_completion");
    let text = answer["choices"][0]["text"].as_str().unwrap().to_owned();
    let logprobs = &answer["choices"][0]["logprobs"];
    let tokens = logprobs["tokens"].as_array().unwrap();
    assert_eq!(
        tokens.len() as u64,
        answer["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert!(
        logprobs["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|top| top.as_object().unwrap().len() <= 2 && !top.as_object().unwrap().is_empty())
    );

    let mut grpc = InferenceClient::new(gateway.channel.clone());
    let grpc_answer = grpc
        .generate(authed(
            GenerateRequest {
                model: "tiny".into(),
                prompt: "The Ascend 910C".into(),
                max_tokens: Some(12),
                temperature: Some(0.7),
                seed: Some(7),
                stop: vec!["\n\n".into()],
                ..Default::default()
            },
            &key,
        ))
        .await
        .expect("gRPC")
        .into_inner();
    assert_eq!(text, grpc_answer.text);

    let mut streamed_body = body.clone();
    streamed_body["stream"] = json!(true);
    let streamed = post(&gateway, "/v1/completions", &key, &streamed_body).await;
    let events = sse_events(&streamed.body);
    let streamed_text: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed_text, text);
    assert!(events.iter().all(|e| e["object"] == "text_completion"));
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn models_are_listed_in_openai_shape_and_an_unknown_one_is_404() {
    let gateway = TestGateway::start().await;
    let key = tenant_key(&gateway, "lister").await;
    let auth = format!("Bearer {key}");
    let list = send(
        &gateway,
        "GET",
        "/v1/models",
        &[("authorization", &auth)],
        vec![],
    )
    .await;
    assert_eq!(list.status, 200, "{}", list.body);
    let list = list.json();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], "tiny");
    assert_eq!(list["data"][0]["object"], "model");
    let one = send(
        &gateway,
        "GET",
        "/v1/models/tiny",
        &[("authorization", &auth)],
        vec![],
    )
    .await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["id"], "tiny");
    let missing = send(
        &gateway,
        "GET",
        "/v1/models/gpt-9",
        &[("authorization", &auth)],
        vec![],
    )
    .await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.error()["code"], "model_not_found");

    // Over cleartext HTTP/2 as well, on the same port.
    let h2 = send_with(
        &client(true),
        &gateway,
        "GET",
        "/v1/models",
        &[("authorization", &auth)],
        vec![],
    )
    .await;
    assert_eq!(h2.status, 200, "{}", h2.body);
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn every_error_has_openai_shape_a_status_and_names_the_field() {
    let dir = tempfile::tempdir().expect("dir");
    let mut settings = crate::common::test_settings(&dir);
    settings.http_max_body_bytes = 4096;
    let gateway = TestGateway::start_with(settings, dir).await;
    let key = tenant_key(&gateway, "careless").await;
    let auth = format!("Bearer {key}");
    let json_headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let chat = "/v1/chat/completions";

    // Unreadable bodies: 400 with a clear message.
    let malformed = send(
        &gateway,
        "POST",
        chat,
        &json_headers,
        b"{\"model\": ".to_vec(),
    )
    .await;
    assert_eq!(malformed.status, 400);
    assert!(
        malformed.error()["message"]
            .as_str()
            .unwrap()
            .contains("JSON")
    );
    let not_utf8 = send(
        &gateway,
        "POST",
        chat,
        &json_headers,
        vec![b'{', 0xff, 0xfe, b'}'],
    )
    .await;
    assert_eq!(not_utf8.status, 400);
    assert!(
        not_utf8.error()["message"]
            .as_str()
            .unwrap()
            .contains("UTF-8")
    );
    let form = send(
        &gateway,
        "POST",
        chat,
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        chat_body(1, false).to_string().into_bytes(),
    )
    .await;
    assert_eq!(form.status, 400);
    assert!(
        form.error()["message"]
            .as_str()
            .unwrap()
            .contains("Content-Type")
    );
    let huge =
        json!({"model": "tiny", "messages": [{"role": "user", "content": "x".repeat(5000)}]});
    let too_large = post(&gateway, chat, &key, &huge).await;
    assert_eq!(too_large.status, 413);
    assert!(
        too_large.error()["message"]
            .as_str()
            .unwrap()
            .contains("http_max_body_bytes")
    );

    // Fields: the wrong type, unsupported values, bad values. Each names
    // its field in `param` and in the message.
    let cases: Vec<(Value, &str)> = vec![
        (json!({"max_tokens": "many"}), "max_tokens"),
        (json!({"max_tokens": -1}), "max_tokens"),
        (json!({"max_tokens": 100000}), "max_tokens"),
        (json!({"n": 2}), "n"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tools",
        ),
        (
            json!({"response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (json!({"audio": {"voice": "alloy"}}), "audio"),
        (json!({"temperature": 3.5}), "temperature"),
        (json!({"top_p": 0}), "top_p"),
        (
            json!({"stop": ["a", "b", "c", "d", "e", "f", "g", "h", "i"]}),
            "stop",
        ),
        (
            json!({"logprobs": true, "top_logprobs": 99}),
            "top_logprobs",
        ),
        (json!({"priority": "urgent"}), "priority"),
        (json!({"frequency_penalty": 0.5}), "frequency_penalty"),
        (json!({"request_id": "has space"}), "request_id"),
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "tool", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}),
            "messages[0].content[0].type",
        ),
        (json!({"model": ""}), "model"),
    ];
    for (overrides, field) in cases {
        let mut body = chat_body(1, false);
        for (name, value) in overrides.as_object().unwrap() {
            body[name] = value.clone();
        }
        let reply = post(&gateway, chat, &key, &body).await;
        assert_eq!(reply.status, 400, "{field}: {}", reply.body);
        let error = reply.error();
        assert_eq!(error["type"], "invalid_request_error", "{field}");
        assert_eq!(error["param"], field, "{}", reply.body);
        assert!(
            error["message"].as_str().unwrap().contains(field),
            "{}",
            reply.body
        );
    }
    // Fields we do not know are ignored, as OpenAI clients send many.
    let mut body = chat_body(1, false);
    body["metadata"] = json!({"team": "a"});
    body["store"] = json!(false);
    body["parallel_tool_calls"] = json!(true);
    assert_eq!(post(&gateway, chat, &key, &body).await.status, 200);

    // Credentials.
    let missing = send(
        &gateway,
        "POST",
        chat,
        &[("content-type", "application/json")],
        chat_body(1, false).to_string().into_bytes(),
    )
    .await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.error()["type"], "authentication_error");
    let wrong = post(
        &gateway,
        chat,
        "agw_nosuchkey_0000000000000000000000000000000",
        &chat_body(1, false),
    )
    .await;
    assert_eq!(wrong.status, 401);
    let admin = post(&gateway, chat, ADMIN_TOKEN, &chat_body(1, false)).await;
    assert_eq!(admin.status, 403);
    assert_eq!(admin.error()["type"], "permission_error");

    // The model and the path.
    let mut body = chat_body(1, false);
    body["model"] = json!("gpt-9");
    let unknown = post(&gateway, chat, &key, &body).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.error()["code"], "model_not_found");
    assert_eq!(unknown.error()["param"], "model");
    let nowhere = send(&gateway, "GET", "/v2/everything", &[], vec![]).await;
    assert_eq!(nowhere.status, 404);
    nowhere.error();
    let wrong_method = send(&gateway, "GET", chat, &[("authorization", &auth)], vec![]).await;
    assert_eq!(wrong_method.status, 405);
    wrong_method.error();

    // Headers: a bad request id or timeout is named.
    let bad_id = post_with(
        &gateway,
        chat,
        &key,
        &chat_body(1, false),
        &[("x-request-id", "a b")],
    )
    .await;
    assert_eq!(bad_id.status, 400);
    assert_eq!(bad_id.error()["param"], "X-Request-Id");
    let bad_timeout = post_with(
        &gateway,
        chat,
        &key,
        &chat_body(1, false),
        &[("x-request-timeout", "soon")],
    )
    .await;
    assert_eq!(bad_timeout.status, 400);
    assert_eq!(bad_timeout.error()["param"], "X-Request-Timeout");

    // Nothing that was refused reached a worker.
    let model = gateway.models.get("tiny").expect("tiny");
    let served: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_events")
        .fetch_one(gateway.db.pool())
        .await
        .unwrap_or(0);
    assert!(served <= 1, "only the one good request ran: {served}");
    assert_eq!(model.running(), 0);
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn over_the_limit_is_429_with_retry_after_and_rate_limit_headers() {
    let gateway = TestGateway::start().await;
    let (_, key) = tenant_with_limits(
        &gateway.channel,
        "limited",
        TenantLimits {
            requests_per_second: Some(0.2),
            burst: Some(2),
            tokens_per_minute: Some(5000),
            ..Default::default()
        },
    )
    .await;
    let chat = "/v1/chat/completions";
    let first = post(&gateway, chat, &key, &chat_body(1, false)).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.header("x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(first.header("x-ratelimit-remaining-requests"), Some("1"));
    assert!(
        first
            .header("x-ratelimit-reset-requests")
            .is_some_and(|r| r.ends_with('s'))
    );
    assert_eq!(first.header("x-ratelimit-limit-tokens"), Some("5000"));
    let remaining: u64 = first
        .header("x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(remaining < 5000, "the reservation shows: {remaining}");
    assert!(first.header("x-ratelimit-reset-tokens").is_some());

    let _second = post(&gateway, chat, &key, &chat_body(2, false)).await;
    let limited = post(&gateway, chat, &key, &chat_body(3, false)).await;
    assert_eq!(limited.status, 429, "{}", limited.body);
    let error = limited.error();
    assert_eq!(error["type"], "requests");
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("requests_per_second")
    );
    let retry_after: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=6).contains(&retry_after), "{retry_after}");
    let retry_ms: u64 = limited.header("retry-after-ms").unwrap().parse().unwrap();
    assert!(retry_ms > 0 && retry_ms <= retry_after * 1000);
    assert_eq!(limited.header("x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(limited.header("x-ratelimit-remaining-requests"), Some("0"));
    assert!(limited.header("x-ratelimit-reset-requests").is_some());
    assert_eq!(limited.header("x-ratelimit-limit-tokens"), Some("5000"));

    // Streaming is refused the same way, before any event.
    let mut body = chat_body(4, true);
    body["stream"] = json!(true);
    let streamed = post(&gateway, chat, &key, &body).await;
    assert_eq!(streamed.status, 429);
    streamed.error();
    let refusals = crate::common::scrape(gateway.metrics_addr).await;
    assert!(
        refusals.contains("ascend_gateway_resource_exhausted_total{cause=\"tenant_limit\"} 2"),
        "{}",
        refusals
            .lines()
            .filter(|l| l.contains("resource_exhausted"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    gateway.stop().await.expect("clean stop");
}

/// A model paced like the device, so requests take long enough to overlap.
fn slow_settings(dir: &tempfile::TempDir) -> ascend_gateway::config::Settings {
    let mut settings = crate::common::test_settings(dir);
    settings
        .models
        .push(ascend_gateway::serving::ModelSettings {
            id: "slow".to_owned(),
            pace: ascend_gateway::serving::Pace::Device,
            served_as: Some(ascend_gateway::bench::launch_shape(
                ascend_gateway::bench::LaunchReading::Dense,
            )),
            ..crate::common::tiny_model()
        });
    settings
}

fn slow_body(stream: bool) -> Value {
    json!({
        "model": "slow",
        "prompt": "take your time",
        "max_tokens": 64,
        "ignore_eos": true,
        "seed": 3,
        "stream": stream,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_in_progress_is_409_and_the_deadline_is_504() {
    let dir = tempfile::tempdir().expect("dir");
    let gateway = TestGateway::start_with(slow_settings(&dir), dir).await;
    let key = tenant_key(&gateway, "hurried").await;
    let first = {
        let (key, addr) = (key.clone(), gateway.http_addr);
        tokio::spawn(async move {
            let body = slow_body(false).to_string();
            let auth = format!("Bearer {key}");
            let request = hyper::Request::post(format!("http://{addr}/v1/completions"))
                .header("authorization", auth)
                .header("content-type", "application/json")
                .header("x-request-id", "busy-1")
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            client(false)
                .request(request)
                .await
                .map(|r| r.status().as_u16())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let duplicate = post_with(
        &gateway,
        "/v1/completions",
        &key,
        &slow_body(false),
        &[("x-request-id", "busy-1")],
    )
    .await;
    assert_eq!(duplicate.status, 409, "{}", duplicate.body);
    assert!(
        duplicate.error()["message"]
            .as_str()
            .unwrap()
            .starts_with("request_id already in progress")
    );
    assert_eq!(first.await.unwrap().unwrap(), 200);

    let late = post_with(
        &gateway,
        "/v1/completions",
        &key,
        &slow_body(false),
        &[("x-request-timeout", "0.3"), ("x-request-id", "late-1")],
    )
    .await;
    assert_eq!(late.status, 504, "{}", late.body);
    assert_eq!(late.error()["type"], "timeout_error");
    let rows = wait_for_usage(&gateway, "late-1", 1).await;
    assert!(rows[0].2 < 64, "metered only what was produced: {rows:?}");
    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_frees_its_slot_and_is_metered_once() {
    let dir = tempfile::tempdir().expect("dir");
    let gateway = TestGateway::start_with(slow_settings(&dir), dir).await;
    let key = tenant_key(&gateway, "leaver").await;
    let model = gateway.models.get("slow").expect("slow").clone();
    let free_before = model.kv_free_blocks();

    let body = slow_body(true).to_string();
    let mut socket = tokio::net::TcpStream::connect(gateway.http_addr)
        .await
        .unwrap();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\nx-request-id: leaver-1\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    // Read until two events with text arrived, then hang up.
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let read_two = async {
        loop {
            let n = socket.read(&mut buffer).await.unwrap();
            assert!(
                n > 0,
                "the stream ended early: {}",
                String::from_utf8_lossy(&received)
            );
            received.extend_from_slice(&buffer[..n]);
            if String::from_utf8_lossy(&received)
                .matches("\"text\":\"")
                .count()
                >= 2
            {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read_two)
        .await
        .expect("two events within 30 s");
    drop(socket);

    let rows = wait_for_usage(&gateway, "leaver-1", 1).await;
    assert_eq!(rows.len(), 1, "metered once: {rows:?}");
    assert!(
        rows[0].2 >= 2 && rows[0].2 < 64,
        "the tokens produced, not all: {rows:?}"
    );
    crate::common::wait_until_idle(&model, free_before).await;
    let (reason, _) = sqlx::query_as::<_, (String, i64)>(
        "SELECT finish_reason, completion_tokens FROM usage_events WHERE request_id = 'leaver-1'",
    )
    .fetch_one(gateway.db.pool())
    .await
    .unwrap();
    assert_eq!(reason, "cancelled");
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_retried_request_id_is_metered_once_and_ids_are_per_tenant() {
    let gateway = TestGateway::start().await;
    let alice = tenant_key(&gateway, "alice").await;
    let bob = tenant_key(&gateway, "bob").await;
    let chat = "/v1/chat/completions";
    let id = [("x-request-id", "retry-me-1")];
    let first = post_with(&gateway, chat, &alice, &chat_body(5, false), &id).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-request-id"), Some("retry-me-1"));
    assert_eq!(first.header("idempotent-replayed"), None);
    let again = post_with(&gateway, chat, &alice, &chat_body(5, false), &id).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    let (a, b) = (first.json(), again.json());
    assert_eq!(a["choices"], b["choices"]);
    assert_eq!(a["usage"], b["usage"]);
    // The id in the body means the same; as a stream, the stored text.
    let mut in_body = chat_body(5, true);
    in_body["request_id"] = json!("retry-me-1");
    let streamed = post(&gateway, chat, &alice, &in_body).await;
    assert_eq!(streamed.header("idempotent-replayed"), Some("true"));
    let (text, _) = chat_stream_text(&sse_events(&streamed.body));
    assert_eq!(
        text,
        a["choices"][0]["message"]["content"].as_str().unwrap()
    );
    // Another request under the id is refused, naming it.
    let different = post_with(&gateway, chat, &alice, &chat_body(6, false), &id).await;
    assert_eq!(different.status, 400);
    assert_eq!(different.error()["param"], "request_id");

    // Bob's request under the same id is his own: run and billed to him,
    // never Alice's stored answer.
    let bobs = post_with(&gateway, chat, &bob, &chat_body(6, false), &id).await;
    assert_eq!(bobs.status, 200);
    assert_eq!(bobs.header("idempotent-replayed"), None);

    let rows = wait_for_usage(&gateway, "retry-me-1", 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tenants: Vec<String> = sqlx::query_scalar(
        "SELECT t.slug FROM usage_events u JOIN tenants t ON t.id = u.tenant_id \
         WHERE u.request_id LIKE 'retry-me-1%' ORDER BY t.slug",
    )
    .fetch_all(gateway.db.pool())
    .await
    .unwrap();
    assert_eq!(tenants, ["alice", "bob"], "one execution each: {rows:?}");
    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependency_down_is_503_with_an_opaque_message() {
    let redis = crate::common::PrivateRedis::start();
    let dir = tempfile::tempdir().expect("dir");
    let mut settings = crate::common::test_settings(&dir);
    settings.redis.url = Some(secrecy::SecretString::from(redis.url()));
    settings.limits.redis_failure = ascend_gateway::limits::FailurePolicy::FailClosed;
    let gateway = TestGateway::start_with(settings, dir).await;
    let (_, key) = tenant_with_limits(
        &gateway.channel,
        "dependent",
        TenantLimits {
            max_concurrent_requests: Some(4),
            ..Default::default()
        },
    )
    .await;
    let chat = "/v1/chat/completions";
    assert_eq!(
        post(&gateway, chat, &key, &chat_body(1, false))
            .await
            .status,
        200
    );
    let port = redis.stop();
    let down = post(&gateway, chat, &key, &chat_body(2, false)).await;
    assert_eq!(down.status, 503, "{}", down.body);
    let error = down.error();
    assert_eq!(error["type"], "server_error");
    assert!(
        !error["message"]
            .as_str()
            .unwrap()
            .contains(&port.to_string()),
        "no address leaks: {}",
        down.body
    );
    gateway.stop().await.expect("clean stop");
}

/// Whatever one raw HTTP/1.1 connection gets back before the server closes
/// it or `within` passes: (the bytes, whether the server closed it).
async fn raw_exchange(gateway: &TestGateway, sent: &[u8], within: Duration) -> (String, bool) {
    let mut socket = tokio::net::TcpStream::connect(gateway.http_addr)
        .await
        .unwrap();
    // The server may answer and close before all of it is written.
    let _ = socket.write_all(sent).await;
    let mut received = Vec::new();
    let mut buffer = [0u8; 8192];
    let closed = tokio::time::timeout(within, async {
        loop {
            match socket.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&received).into_owned(), closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_http_input_gets_a_bounded_clear_answer_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let mut settings = crate::common::test_settings(&dir);
    // Short enough to wait for, long enough that a 3.5 MB body sent on a
    // loaded machine arrives in time.
    settings.server.handshake_timeout = Duration::from_secs(2);
    settings.http_body_timeout = Duration::from_secs(2);
    let gateway = TestGateway::start_with(settings, dir).await;
    let key = tenant_key(&gateway, "stranger").await;
    let auth = format!("Bearer {key}");
    let json_headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let chat = "/v1/chat/completions";

    // JSON nested 100,000 deep inside an ignored field: a parse error, not
    // a stack overflow.
    let deep = format!(
        "{{\"model\":\"tiny\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"metadata\":{}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let nested = send(&gateway, "POST", chat, &json_headers, deep.into_bytes()).await;
    assert_eq!(nested.status, 400, "{}", nested.body);
    assert!(nested.error()["message"].as_str().unwrap().contains("JSON"));

    // A lone UTF-16 surrogate escape and a NUL: JSON that is not text.
    let surrogate = br#"{"model":"tiny","messages":[{"role":"user","content":"\ud800"}]}"#;
    let reply = send(&gateway, "POST", chat, &json_headers, surrogate.to_vec()).await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    let mut body = chat_body(1, false);
    body["messages"][1]["content"] = json!("nul \u{0} and \u{202e}right-to-left");
    assert_eq!(post(&gateway, chat, &key, &body).await.status, 200);

    // A prompt far over the model's context, just under the body limit:
    // 400 naming the field, answered without running the model.
    let mut long = chat_body(1, false);
    long["messages"][1]["content"] = json!("word ".repeat(700_000));
    let reply = post(&gateway, chat, &key, &long).await;
    assert_eq!(
        reply.status,
        400,
        "{}",
        &reply.body[..reply.body.len().min(400)]
    );
    assert_eq!(reply.error()["param"], "messages", "{}", reply.body);

    // Wrong types where numbers and lists belong, each named.
    for (field, value) in [
        ("messages", json!("hello")),
        ("messages", json!([42])),
        ("seed", json!(1e300)),
        ("stop", json!({"a": 1})),
        ("stream", json!("yes")),
    ] {
        let mut body = chat_body(1, false);
        body[field] = value;
        let reply = post(&gateway, chat, &key, &body).await;
        assert_eq!(reply.status, 400, "{field}: {}", reply.body);
        assert!(
            reply.error()["param"].as_str().unwrap().starts_with(field),
            "{field}: {}",
            reply.body
        );
    }

    // A header block of 100 KiB: refused (431) and the connection closed.
    let huge_header = format!(
        "POST {chat} HTTP/1.1\r\nhost: g\r\nx-junk: {}\r\ncontent-length: 0\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let (answer, closed) =
        raw_exchange(&gateway, huge_header.as_bytes(), Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    assert!(closed);

    // Headers that never end (slowloris): closed after
    // server.handshake_timeout, not held open.
    let (_, closed) = raw_exchange(
        &gateway,
        format!("POST {chat} HTTP/1.1\r\nhost: g\r\nauthorization: {auth}\r\n").as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    assert!(closed, "a connection whose headers never end is closed");

    // A body that never arrives in full: 408 naming http_body_timeout.
    let stalled = format!(
        "POST {chat} HTTP/1.1\r\nhost: g\r\nauthorization: {auth}\r\n\
         content-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"model\":"
    );
    let (answer, _) = raw_exchange(&gateway, stalled.as_bytes(), Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("http_body_timeout"), "{answer:?}");

    // A bad chunked encoding and a Content-Length past u64: an error status
    // or a closed connection, never a hang.
    for malformed in [
        format!(
            "POST {chat} HTTP/1.1\r\nhost: g\r\nauthorization: {auth}\r\n\
             content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{{}}\r\n"
        ),
        format!("POST {chat} HTTP/1.1\r\nhost: g\r\ncontent-length: 99999999999999999999\r\n\r\n"),
    ] {
        let (answer, closed) =
            raw_exchange(&gateway, malformed.as_bytes(), Duration::from_secs(10)).await;
        assert!(
            answer.starts_with("HTTP/1.1 4") || (answer.is_empty() && closed),
            "{answer:?}"
        );
    }

    // After all of it the gateway still answers, and metered exactly the
    // requests that ran: the one 200 above and this one.
    let mut last = chat_body(2, false);
    last["request_id"] = json!("after-hostile-1");
    let reply = post(&gateway, chat, &key, &last).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        wait_for_usage(&gateway, "after-hostile-1", 1).await.len(),
        1
    );
    let (events,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM usage_events")
        .fetch_one(gateway.db.pool())
        .await
        .expect("usage count");
    assert_eq!(events, 2, "only the two requests that ran are metered");
    gateway.stop().await.expect("clean stop");
}
