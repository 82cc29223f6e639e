//! Every response counted by front end and final status on `/metrics`, and
//! tokens by tenant: a stream counts when it ends (a client that leaves it
//! is `Canceled`), labels come from fixed lists whatever the path.

use std::time::Duration;

use ascend_gateway::api::pb::v1::GenerateRequest;
use ascend_gateway::api::pb::v1::inference_client::InferenceClient;

use crate::common::{TestGateway, authed, scrape};
use crate::generate::tenant_key;

/// The value of the sample `series` (name and labels, exactly as exported).
fn sample(scrape: &str, series: &str) -> u64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

fn grpc(service: &str, code: &str) -> String {
    format!(
        "ascend_gateway_grpc_requests_total{{grpc_service=\"ascend.gateway.v1.{service}\",grpc_code=\"{code}\"}}"
    )
}

#[tokio::test]
async fn responses_are_counted_by_final_status_and_tokens_by_tenant() {
    let gateway = TestGateway::start().await;
    let key = tenant_key(&gateway, "counted").await;
    let mut inference = InferenceClient::new(gateway.channel.clone());
    let request = |prompt: &str| GenerateRequest {
        model: "tiny".to_owned(),
        prompt: prompt.to_owned(),
        max_tokens: Some(4),
        ..Default::default()
    };
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    for prompt in ["one", "two"] {
        let usage = inference
            .generate(authed(request(prompt), &key))
            .await
            .expect("generate")
            .into_inner()
            .usage
            .expect("usage");
        prompt_tokens += u64::from(usage.prompt_tokens);
        completion_tokens += u64::from(usage.completion_tokens);
    }
    let bad = inference
        .generate(authed(request("three"), "agw_nope_nope"))
        .await
        .expect_err("a bad key");
    assert_eq!(bad.code(), tonic::Code::Unauthenticated);
    let metrics = scrape(gateway.metrics_addr).await;
    assert_eq!(sample(&metrics, &grpc("Inference", "OK")), 2, "{metrics}");
    assert_eq!(sample(&metrics, &grpc("Inference", "Unauthenticated")), 1);
    assert!(sample(&metrics, &grpc("TenantAdmin", "OK")) >= 2);
    let tokens = |kind: &str| {
        sample(
            &metrics,
            &format!("ascend_gateway_tenant_tokens_total{{tenant=\"counted\",kind=\"{kind}\"}}"),
        )
    };
    assert_eq!(tokens("prompt"), prompt_tokens);
    assert_eq!(tokens("completion"), completion_tokens);

    // A stream the client leaves after its first message ends Canceled.
    let mut long = request("a long one");
    long.max_tokens = Some(16);
    let mut stream = inference
        .generate_stream(authed(long, &key))
        .await
        .expect("stream")
        .into_inner();
    stream.message().await.expect("first").expect("a message");
    drop(stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = scrape(gateway.metrics_addr).await;
        if sample(&metrics, &grpc("Inference", "Canceled")) == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the left stream was never counted: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // HTTP: by route, and every unknown path under one label.
    let bearer = format!("Bearer {key}");
    let auth = [("authorization", bearer.as_str())];
    assert_eq!(
        crate::http::send(&gateway, "GET", "/v1/models", &auth, Vec::new())
            .await
            .status,
        200
    );
    assert_eq!(
        crate::http::send(&gateway, "GET", "/v1/models/nope", &auth, Vec::new())
            .await
            .status,
        404
    );
    for path in ["/wp-admin", "/%2e%2e/etc/passwd", "/v1/models/a/b/c"] {
        assert_eq!(
            crate::http::send(&gateway, "GET", path, &auth, Vec::new())
                .await
                .status,
            404
        );
    }
    let metrics = scrape(gateway.metrics_addr).await;
    let http = |route: &str, code: u16| {
        sample(
            &metrics,
            &format!("ascend_gateway_http_requests_total{{route=\"{route}\",code=\"{code}\"}}"),
        )
    };
    assert_eq!(http("/v1/models", 200), 1, "{metrics}");
    assert_eq!(http("/v1/models/{id}", 404), 1);
    assert_eq!(http("unmatched", 404), 3);
    assert!(!metrics.contains("wp-admin"));
    gateway.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_call_the_client_leaves_before_its_answer_counts_canceled() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut settings = crate::common::test_settings(&data_dir);
    settings.models.push(crate::generate::slow_model());
    let gateway = TestGateway::start_with(settings, data_dir).await;
    let key = tenant_key(&gateway, "impatient").await;
    let mut inference = InferenceClient::new(gateway.channel.clone());
    let slow = GenerateRequest {
        model: "slow".to_owned(),
        prompt: "take your time".to_owned(),
        max_tokens: Some(32),
        ignore_eos: true,
        ..Default::default()
    };
    // The client gives up long before the answer (its call is dropped).
    let gave_up = tokio::time::timeout(
        Duration::from_millis(150),
        inference.generate(authed(slow, &key)),
    )
    .await;
    assert!(gave_up.is_err(), "the slow model answered within 150 ms");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = scrape(gateway.metrics_addr).await;
        if sample(&metrics, &grpc("Inference", "Canceled")) == 1 {
            assert_eq!(sample(&metrics, &grpc("Inference", "OK")), 0);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the abandoned call was never counted: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gateway.stop().await.expect("stop");
}
