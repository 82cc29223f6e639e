//! OpenTelemetry traces from the real binary to an in-test OTLP collector:
//! over gRPC (a tonic server of the collector's trace service) and over
//! HTTP/protobuf (an HTTP server at `/v1/traces`), configured only by the
//! standard `OTEL_*` variables. One trace per request, with the spans and
//! attributes the operator follows a slow request by, the parent a client's
//! `traceparent` gave, no prompt text or key anywhere, a malformed
//! `traceparent` ignored, and bad settings refused at start.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ascend_gateway::api::pb::v1::inference_client::InferenceClient;
use ascend_gateway::api::pb::v1::{GenerateRequest, TenantLimits};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;

use crate::common::{GatewayProcess, authed, tenant_with_limits, tiny_model_config};

/// A client's trace: 16-byte trace id, 8-byte parent span id, sampled.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";
const PROMPT: &str = "the secret plan is to meet at noon";

/// A span received, with its resource's attributes.
type Received = (Vec<KeyValue>, Span);

/// What the in-test collector received.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

impl Collector {
    fn take(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.spans.lock().expect("spans");
        for resource_spans in request.resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push((resource.clone(), span));
                }
            }
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans
            .lock()
            .expect("spans")
            .iter()
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// Waits (at most 30 s) until `done` holds for the spans received.
    async fn wait_for(&self, what: &str, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {what} after 30 s; received: {:#?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.take(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The collector's trace service over gRPC on a free loopback port.
async fn grpc_collector() -> (Collector, String, tokio::task::JoinHandle<()>) {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let service = TraceServiceServer::new(collector.clone());
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    (collector, format!("http://{addr}"), server)
}

/// The collector's OTLP/HTTP endpoint (`POST /v1/traces`, protobuf).
async fn http_collector() -> (Collector, String, tokio::task::JoinHandle<()>) {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let state = collector.clone();
    let router = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let state = state.clone();
            async move {
                match ExportTraceServiceRequest::decode(body) {
                    Ok(request) => {
                        state.take(request);
                        (
                            axum::http::StatusCode::OK,
                            [("content-type", "application/x-protobuf")],
                            ExportTraceServiceResponse {
                                partial_success: None,
                            }
                            .encode_to_vec(),
                        )
                    }
                    Err(_) => (
                        axum::http::StatusCode::BAD_REQUEST,
                        [("content-type", "text/plain")],
                        b"not an ExportTraceServiceRequest".to_vec(),
                    ),
                }
            }
        }),
    );
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (collector, format!("http://{addr}"), server)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn str_attr<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    match attr(&span.attributes, key) {
        Some(Value::StringValue(s)) => Some(s),
        _ => None,
    }
}

fn int_attr(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attributes, key) {
        Some(Value::IntValue(i)) => Some(*i),
        _ => None,
    }
}

fn has_request(spans: &[Span], request_id: &str) -> bool {
    spans.iter().any(|s| {
        str_attr(s, "ascend.request_id") == Some(request_id) && s.kind == SpanKind::Server as i32
    })
}

/// Every stage of a generation is a child span of its request's span.
fn assert_stages<'a>(spans: impl IntoIterator<Item = &'a Span>, request: &Span) {
    let children: HashSet<&str> = spans
        .into_iter()
        .filter(|s| s.parent_span_id == request.span_id)
        .map(|s| s.name.as_str())
        .collect();
    for stage in [
        "authenticate",
        "tokenize",
        "idempotency.claim",
        "limits.admit",
        "queue",
        "generate",
        "metering.record",
    ] {
        assert!(children.contains(stage), "no {stage} span in {children:?}");
    }
}

/// The HTTP API's address, from the gateway's log.
async fn http_addr(gateway: &GatewayProcess) -> String {
    for _ in 0..200 {
        let log = gateway.log.lock().expect("log").clone();
        if let Some(line) = log.lines().find(|l| l.contains("http listening"))
            && let Some(addr) = line.split("address=").nth(1)
        {
            return addr.trim().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateway never logged its HTTP address");
}

fn spawn_traced(
    config: &std::path::Path,
    dir: &std::path::Path,
    endpoint: &str,
    protocol: Option<&str>,
) -> GatewayProcess {
    GatewayProcess::spawn(|command| {
        command
            .arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(dir)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            .env("OTEL_SERVICE_NAME", "gateway-under-test")
            .env("OTEL_TRACES_SAMPLER", "parentbased_always_on")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_SDK_DISABLED");
        match protocol {
            Some(protocol) => command.env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
            None => command.env_remove("OTEL_EXPORTER_OTLP_PROTOCOL"),
        };
    })
}

fn generate_request(request_id: &str) -> GenerateRequest {
    GenerateRequest {
        model: "tiny".to_owned(),
        prompt: PROMPT.to_owned(),
        max_tokens: Some(6),
        request_id: request_id.to_owned(),
        ..Default::default()
    }
}

fn with_traceparent<T>(mut request: tonic::Request<T>, traceparent: &str) -> tonic::Request<T> {
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().expect("metadata"));
    request
}

#[tokio::test]
async fn a_grpc_request_is_one_trace_under_the_clients_parent_with_every_stage() {
    let (collector, endpoint, server) = grpc_collector().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = tiny_model_config(dir.path());
    let gateway = spawn_traced(&config, dir.path(), &endpoint, Some("grpc"));
    let channel = gateway.channel().await;
    let (tenant_id, key) = tenant_with_limits(&channel, "traced", TenantLimits::default()).await;
    let mut inference = InferenceClient::new(channel);

    // A streamed request inside the client's trace.
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let mut stream = inference
        .generate_stream(with_traceparent(
            authed(generate_request("traced-1"), &key),
            &traceparent,
        ))
        .await
        .expect("stream")
        .into_inner();
    while stream.message().await.expect("message").is_some() {}
    // A malformed traceparent is ignored: the request succeeds in a trace
    // of its own.
    inference
        .generate(with_traceparent(
            authed(generate_request("malformed-parent"), &key),
            "00-not-a-trace-id-01",
        ))
        .await
        .expect("a malformed traceparent is no error");
    // The client decided not to sample: nothing of it is exported.
    let unsampled_trace = "0af7651916cd43dd8448eb211c80319c";
    inference
        .generate(with_traceparent(
            authed(generate_request("unsampled"), &key),
            &format!("00-{unsampled_trace}-b7ad6b7169203331-00"),
        ))
        .await
        .expect("unsampled");
    // Sent last: once its spans are in, the earlier ones would be too.
    inference
        .generate(authed(generate_request("sentinel"), &key))
        .await
        .expect("sentinel");

    let spans = collector
        .wait_for("spans of every request", |spans| {
            ["traced-1", "malformed-parent", "sentinel"]
                .iter()
                .all(|id| has_request(spans, id))
                && spans.iter().filter(|s| s.name == "metering.record").count() >= 3
        })
        .await;

    // One trace: the client's, its root our server span under the client's
    // parent.
    let request = spans
        .iter()
        .find(|s| str_attr(s, "ascend.request_id") == Some("traced-1"))
        .expect("the request span");
    assert_eq!(hex(&request.trace_id), TRACE_ID);
    assert_eq!(hex(&request.parent_span_id), PARENT_ID);
    assert_eq!(request.name, "ascend.gateway.v1.Inference/GenerateStream");
    assert_eq!(request.kind, SpanKind::Server as i32);
    assert_eq!(str_attr(request, "rpc.system"), Some("grpc"));
    assert_eq!(str_attr(request, "rpc.method"), Some("GenerateStream"));
    assert_eq!(
        str_attr(request, "ascend.tenant_id"),
        Some(tenant_id.as_str())
    );
    assert_eq!(str_attr(request, "gen_ai.request.model"), Some("tiny"));
    assert_eq!(
        int_attr(&request.attributes, "rpc.grpc.status_code"),
        Some(0)
    );
    let output_tokens =
        int_attr(&request.attributes, "gen_ai.usage.output_tokens").expect("output tokens");
    assert!(output_tokens >= 1);
    assert!(int_attr(&request.attributes, "gen_ai.usage.input_tokens").expect("input") > 0);
    let in_trace: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id == request.trace_id)
        .collect();
    assert_eq!(
        in_trace
            .iter()
            .filter(|s| s.kind == SpanKind::Server as i32)
            .count(),
        1,
        "one request, one server span in its trace"
    );
    assert_stages(in_trace.iter().copied(), request);
    // Every step the request took part in is in the generate span's events:
    // its prefill chunks one each, its decode steps in runs; each decode
    // step gave one token after the prefill's first.
    let generate = in_trace
        .iter()
        .find(|s| s.name == "generate")
        .expect("generate");
    let steps = int_attr(&generate.attributes, "ascend.steps").expect("steps");
    let prefills = generate
        .events
        .iter()
        .filter(|e| e.name == "prefill")
        .count() as i64;
    let decodes: i64 = generate
        .events
        .iter()
        .filter(|e| e.name == "decode")
        .map(|e| int_attr(&e.attributes, "ascend.step.count").expect("count"))
        .sum();
    assert!(prefills >= 1, "{:#?}", generate.events);
    assert_eq!(prefills + decodes, steps, "{:#?}", generate.events);
    assert!(
        (output_tokens - 1..=output_tokens).contains(&decodes),
        "{decodes} decode steps for {output_tokens} tokens"
    );
    assert_eq!(generate.dropped_events_count, 0);
    let metering = in_trace
        .iter()
        .find(|s| s.name == "metering.record")
        .expect("metering");
    assert_eq!(
        attr(&metering.attributes, "ascend.metering.durable"),
        Some(&Value::BoolValue(true))
    );

    // The malformed parent started a trace of its own.
    let malformed = spans
        .iter()
        .find(|s| str_attr(s, "ascend.request_id") == Some("malformed-parent"))
        .expect("malformed-parent span");
    assert!(malformed.parent_span_id.is_empty(), "a root span");
    assert_ne!(hex(&malformed.trace_id), TRACE_ID);
    assert_eq!(malformed.name, "ascend.gateway.v1.Inference/Generate");
    // The unsampled request left nothing.
    assert!(
        !spans.iter().any(|s| hex(&s.trace_id) == unsampled_trace),
        "a trace the client did not sample was exported"
    );
    // The admin calls of the set-up are traced too, with their operator.
    assert!(
        spans
            .iter()
            .any(|s| s.name == "ascend.gateway.v1.TenantAdmin/CreateTenant"
                && str_attr(s, "ascend.operator") == Some("bootstrap"))
    );
    // The resource names the service as configured.
    let resources = collector.spans.lock().expect("spans").clone();
    assert!(resources.iter().all(|(resource, _)| {
        matches!(attr(resource, "service.name"), Some(Value::StringValue(name)) if name == "gateway-under-test")
    }));

    // No prompt text and no credential in any span, attribute or event.
    let everything = format!("{resources:?}");
    assert!(
        !everything.contains("secret plan"),
        "the prompt leaked into a span"
    );
    let secret = key.rsplit('_').next().expect("secret part");
    assert!(
        !everything.contains(secret),
        "the API key leaked into a span"
    );
    assert!(!everything.contains(crate::common::ADMIN_TOKEN));

    let (status, _) = gateway.terminate().await;
    assert!(status.success());
    server.abort();
}

#[tokio::test]
async fn an_http_request_is_traced_over_otlp_http_under_the_clients_parent() {
    use http_body_util::{BodyExt, Full};
    let (collector, endpoint, server) = http_collector().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = tiny_model_config(dir.path());
    // No protocol set: http/protobuf, the specification's default.
    let gateway = spawn_traced(&config, dir.path(), &endpoint, None);
    let channel = gateway.channel().await;
    let (tenant_id, key) =
        tenant_with_limits(&channel, "traced-http", TenantLimits::default()).await;
    let http = http_addr(&gateway).await;

    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let body = serde_json::json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 4,
        "stream": true,
    });
    let request = hyper::Request::post(format!("http://{http}/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .header("x-request-id", "traced-http-1")
        .body(Full::new(bytes::Bytes::from(body.to_string())))
        .expect("request");
    let response = client.request(request).await.expect("response");
    assert_eq!(response.status(), 200);
    let text = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert!(String::from_utf8_lossy(&text).contains("[DONE]"));

    let spans = collector
        .wait_for("the HTTP request's spans", |spans| {
            spans.iter().any(|s| s.name == "POST /v1/chat/completions")
                && spans.iter().any(|s| s.name == "metering.record")
        })
        .await;
    let request = spans
        .iter()
        .find(|s| s.name == "POST /v1/chat/completions")
        .expect("request span");
    assert_eq!(hex(&request.trace_id), TRACE_ID);
    assert_eq!(hex(&request.parent_span_id), PARENT_ID);
    assert_eq!(request.kind, SpanKind::Server as i32);
    assert_eq!(
        str_attr(request, "http.route"),
        Some("/v1/chat/completions")
    );
    assert_eq!(str_attr(request, "http.request.method"), Some("POST"));
    assert_eq!(
        int_attr(&request.attributes, "http.response.status_code"),
        Some(200)
    );
    assert_eq!(
        str_attr(request, "ascend.tenant_id"),
        Some(tenant_id.as_str())
    );
    assert_eq!(str_attr(request, "gen_ai.request.model"), Some("tiny"));
    assert_eq!(
        str_attr(request, "ascend.request_id"),
        Some("traced-http-1")
    );
    assert!(request.end_time_unix_nano >= request.start_time_unix_nano);
    assert_stages(&spans, request);
    // The stream's span closes after its last event, not at its headers.
    let generate = spans
        .iter()
        .find(|s| s.name == "generate")
        .expect("generate");
    assert!(request.end_time_unix_nano >= generate.end_time_unix_nano);
    let everything = format!("{:?}", collector.spans.lock().expect("spans"));
    assert!(
        !everything.contains("secret plan"),
        "the prompt leaked into a span"
    );

    let (status, _) = gateway.terminate().await;
    assert!(status.success());
    server.abort();
}

/// Runs `command` to its exit, killing it (and failing) if it is still
/// running after `within`: a start that was not refused.
fn refused_within(
    mut command: std::process::Command,
    within: std::time::Duration,
) -> std::process::Output {
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run");
    let deadline = std::time::Instant::now() + within;
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} started instead of refusing its settings");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn bad_otel_settings_stop_the_start_naming_the_variable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cases: [(&str, &str, &str); 6] = [
        ("OTEL_TRACES_SAMPLER", "sometimes", "otel.traces_sampler"),
        ("OTEL_TRACES_SAMPLER_ARG", "2", "OTEL_TRACES_SAMPLER_ARG"),
        (
            "OTEL_EXPORTER_OTLP_TIMEOUT",
            "0",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "otel.protocol"),
        (
            "OTEL_EXPORTER_OTLP_HEADERS",
            "api-key",
            "OTEL_EXPORTER_OTLP_HEADERS",
        ),
        ("OTEL_BSP_SCHEDULE_DELAY", "soon", "otel.bsp_schedule_delay"),
    ];
    for (var, value, named) in cases {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ascend-gateway"));
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .env("ASCEND_METRICS_LISTEN", "127.0.0.1:0")
            .env("ASCEND_HTTP_LISTEN", "127.0.0.1:0")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
            // The ratio is read (and checked) by the ratio samplers only.
            .env("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
            .env(var, value);
        let output = refused_within(command, std::time::Duration::from_secs(30));
        assert_eq!(output.status.code(), Some(2), "{var}={value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{var}={value}: {stderr}");
        assert!(errors[0].contains(named), "{var}={value}: {}", errors[0]);
    }
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ascend-gateway"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317");
    let output = refused_within(command, std::time::Duration::from_secs(30));
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("OTEL_EXPORTER_OTLP_ENDPOINT"));

    // With traces off, what a platform sets on every process stops nothing:
    // an empty endpoint is unset, foreign samplers and protocols are not
    // looked at, and OTEL_SDK_DISABLED=1 is simply not "true".
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ascend-gateway"))
        .args(["config", "--data-dir"])
        .arg(dir.path())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "")
        .env("OTEL_TRACES_SAMPLER", "xray")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
        .env("OTEL_TRACES_SAMPLER_ARG", "whatever")
        .env("OTEL_SDK_DISABLED", "1")
        .output()
        .expect("run");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
