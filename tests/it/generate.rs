//! Generation end to end over real gRPC: the tiny model on emulated NPU
//! workers, limits, and usage metered exactly once.

use std::time::Duration;

use ascend_gateway::api::pb::v1::inference_client::InferenceClient;
use ascend_gateway::api::pb::v1::{
    ChatMessage, CountTokensRequest, GenerateRequest, ListModelsRequest, generate_stream_response,
};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::common::{TestGateway, authed};

pub use crate::common::tenant_key;

fn request(prompt: &str, seed: u64) -> GenerateRequest {
    GenerateRequest {
        model: "tiny".to_owned(),
        prompt: prompt.to_owned(),
        max_tokens: Some(12),
        temperature: Some(0.8),
        seed: Some(seed),
        ..Default::default()
    }
}

#[tokio::test]
async fn generate_and_stream_agree_and_report_usage() {
    let gateway = TestGateway::start().await;
    let key = tenant_key(&gateway, "writer").await;
    let mut client = InferenceClient::new(gateway.channel.clone());

    let models = client
        .list_models(authed(ListModelsRequest {}, &key))
        .await
        .expect("models")
        .into_inner()
        .models;
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].id, "tiny");
    assert_eq!(models[0].device_profile, "ascend-910b");

    let prompt = "The quick brown fox jumps over the lazy dog.";
    let counted = crate::common::token_count(
        &gateway.channel,
        &key,
        CountTokensRequest {
            model: "tiny".to_owned(),
            prompt: prompt.to_owned(),
            ..Default::default()
        },
    )
    .await;

    let unary = client
        .generate(authed(request(prompt, 42), &key))
        .await
        .expect("generate")
        .into_inner();
    let usage = unary.usage.expect("usage");
    assert_eq!(
        usage.prompt_tokens, counted,
        "billed prompt tokens are the tokenizer's count"
    );
    assert!(usage.completion_tokens >= 1 && usage.completion_tokens <= 12);
    assert!(usage.device_time_us > 0 && usage.energy_mj > 0, "{usage:?}");
    assert_ne!(unary.finish_reason, 0);

    let mut stream = client
        .generate_stream(authed(request(prompt, 42), &key))
        .await
        .expect("stream")
        .into_inner();
    let mut streamed = String::new();
    let mut complete = None;
    while let Some(message) = stream.next().await {
        match message.expect("message").event.expect("event") {
            generate_stream_response::Event::Delta(delta) => streamed.push_str(&delta.text),
            generate_stream_response::Event::Complete(done) => complete = Some(done),
        }
    }
    let complete = complete.expect("a final message");
    assert_eq!(
        streamed, unary.text,
        "same seed, same text, streamed or not"
    );
    assert_eq!(
        complete.usage.expect("usage").completion_tokens,
        usage.completion_tokens
    );

    let chat = client
        .generate(authed(
            GenerateRequest {
                model: "tiny".to_owned(),
                messages: vec![ChatMessage {
                    role: "user".to_owned(),
                    content: "Hello there".to_owned(),
                }],
                max_tokens: Some(4),
                ..Default::default()
            },
            &key,
        ))
        .await
        .expect("chat");
    assert!(chat.into_inner().usage.expect("usage").prompt_tokens > 2);
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn bad_requests_are_refused_naming_the_field() {
    let gateway = TestGateway::start().await;
    let key = tenant_key(&gateway, "careless").await;
    let mut client = InferenceClient::new(gateway.channel.clone());
    let base = || request("hello", 1);
    let cases: Vec<(GenerateRequest, Code, &str)> = vec![
        (
            GenerateRequest {
                model: "gpt-9".to_owned(),
                ..base()
            },
            Code::NotFound,
            "gpt-9",
        ),
        (
            GenerateRequest {
                max_tokens: Some(0),
                ..base()
            },
            Code::InvalidArgument,
            "max_tokens",
        ),
        (
            GenerateRequest {
                max_tokens: Some(100_000),
                ..base()
            },
            Code::InvalidArgument,
            "max_tokens",
        ),
        (
            GenerateRequest {
                temperature: Some(f32::NAN),
                ..base()
            },
            Code::InvalidArgument,
            "temperature",
        ),
        (
            GenerateRequest {
                temperature: Some(-1.0),
                ..base()
            },
            Code::InvalidArgument,
            "temperature",
        ),
        (
            GenerateRequest {
                top_p: Some(0.0),
                ..base()
            },
            Code::InvalidArgument,
            "top_p",
        ),
        (
            GenerateRequest {
                prompt: String::new(),
                ..base()
            },
            Code::InvalidArgument,
            "prompt",
        ),
        (
            GenerateRequest {
                stop: (0..9).map(|i| i.to_string()).collect(),
                ..base()
            },
            Code::InvalidArgument,
            "stop",
        ),
        (
            GenerateRequest {
                prompt: "word ".repeat(5000),
                ..base()
            },
            Code::InvalidArgument,
            "context window",
        ),
        (
            GenerateRequest {
                request_id: "has spaces".to_owned(),
                ..base()
            },
            Code::InvalidArgument,
            "request_id",
        ),
    ];
    for (request, code, needle) in cases {
        let status = client
            .generate(authed(request, &key))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), code, "{needle}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{needle}: {}",
            status.message()
        );
    }
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn usage_is_metered_once_per_request_id() {
    let gateway = TestGateway::start().await;
    let key = tenant_key(&gateway, "metered").await;
    let mut client = InferenceClient::new(gateway.channel.clone());
    let mut retried = request("count me once", 3);
    retried.request_id = "client-retry-1".to_owned();
    let first = client
        .generate(authed(retried.clone(), &key))
        .await
        .expect("first")
        .into_inner();
    client
        .generate(authed(retried, &key))
        .await
        .expect("the retry is served too");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let row: (i64, i64, i64) = loop {
        let row: Option<(i64, i64, i64)> = sqlx::query_as(
            "SELECT COUNT(*), MAX(prompt_tokens), MAX(completion_tokens) FROM usage_events \
             WHERE request_id = 'client-retry-1' HAVING COUNT(*) > 0",
        )
        .fetch_optional(gateway.db.pool())
        .await
        .expect("query");
        if let Some(row) = row {
            break row;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "usage never reached the database"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let usage = first.usage.expect("usage");
    assert_eq!(row.0, 1, "one usage row for one request id");
    assert_eq!(row.1, i64::from(usage.prompt_tokens));
    assert_eq!(row.2, i64::from(usage.completion_tokens));
    gateway.stop().await.expect("clean stop");
}

async fn solo_then_together(
    gateway: &TestGateway,
    key: &str,
    prompts: &[String],
) -> (Vec<String>, Vec<String>) {
    let mut client = InferenceClient::new(gateway.channel.clone());
    let mut solo = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let mut r = request(prompt, 100 + i as u64);
        r.max_tokens = Some(24);
        solo.push(
            client
                .generate(authed(r, key))
                .await
                .expect("solo")
                .into_inner()
                .text,
        );
    }
    let together = futures_join_all(prompts.iter().enumerate().map(|(i, prompt)| {
        let mut client = InferenceClient::new(gateway.channel.clone());
        let mut r = request(prompt, 100 + i as u64);
        r.max_tokens = Some(24);
        let key = key.to_owned();
        async move {
            client
                .generate(authed(r, &key))
                .await
                .expect("batched")
                .into_inner()
                .text
        }
    }))
    .await;
    (solo, together)
}

async fn futures_join_all<F: std::future::Future<Output = String> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<String> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.expect("join"));
    }
    out
}

fn prompts() -> Vec<String> {
    [
        "Once upon a time",
        "The gateway serves many tenants",
        "Ascend NPUs have cube and vector cores",
        "Hello",
        "Billing is per million tokens and must be exact to the unit",
        "Continuous batching",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_output_equals_solo_output() {
    let gateway = TestGateway::start().await;
    let key = tenant_key(&gateway, "batched").await;
    let (solo, together) = solo_then_together(&gateway, &key, &prompts()).await;
    assert_eq!(
        solo, together,
        "each request's text is the same alone or batched"
    );
    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_kv_pool_preempts_and_still_completes_every_request_exactly() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut settings = crate::common::test_settings(&data_dir);
    // 6 blocks of 16 tokens: far less than six requests need at once.
    settings.models[0].kv_max_blocks = Some(6);
    let gateway = TestGateway::start_with(settings, data_dir).await;
    let key = tenant_key(&gateway, "squeezed").await;
    let (solo, together) = solo_then_together(&gateway, &key, &prompts()).await;
    assert_eq!(
        solo, together,
        "recompute after preemption continues exactly"
    );
    let model = gateway.models.get("tiny").expect("tiny");
    assert!(
        model.preemptions() > 0,
        "the pool was too small not to preempt"
    );
    gateway.stop().await.expect("clean stop");
}

/// The tiny model paced as the 175B launch shape on an emulated 910B: each
/// step lasts tens of milliseconds, so a request takes seconds.
pub(crate) fn slow_model() -> ascend_gateway::serving::ModelSettings {
    ascend_gateway::serving::ModelSettings {
        id: "slow".to_owned(),
        pace: ascend_gateway::serving::Pace::Device,
        served_as: Some(ascend_gateway::bench::launch_shape(
            ascend_gateway::bench::LaunchReading::Dense,
        )),
        ..crate::common::tiny_model()
    }
}

#[tokio::test]
async fn an_expired_deadline_answers_deadline_exceeded_and_is_metered() {
    let dir = tempfile::tempdir().expect("dir");
    let mut settings = crate::common::test_settings(&dir);
    settings.models.push(slow_model());
    let gateway = TestGateway::start_with(settings, dir).await;
    let key = tenant_key(&gateway, "hurried").await;
    let mut client = InferenceClient::new(gateway.channel.clone());
    let mut slow = request("no time", 9);
    slow.model = "slow".to_owned();
    slow.max_tokens = Some(64);
    slow.ignore_eos = true;
    slow.request_id = "hurried-1".to_owned();
    let mut r = authed(slow, &key);
    // The client's own timer fires at 300 ms too; the gateway answers a
    // few milliseconds before it, so the status is the server's.
    r.set_timeout(Duration::from_millis(300));
    let status = client.generate(r).await.expect_err("no time to finish");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let (reason, completion) = usage_row(&gateway, "hurried-1").await;
    assert_eq!(reason, "deadline_exceeded");
    assert!(completion < 64, "usage covers only the tokens produced");
    gateway.stop().await.expect("clean stop");
}

/// The finish reason and completion tokens of one request's usage row,
/// waiting up to 20 s for the writer to ship it.
async fn usage_row(gateway: &TestGateway, request_id: &str) -> (String, i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let row: Option<(String, i64)> = sqlx::query_as(
            "SELECT finish_reason, completion_tokens FROM usage_events WHERE request_id = $1",
        )
        .bind(request_id)
        .fetch_optional(gateway.db.pool())
        .await
        .expect("query");
        if let Some(row) = row {
            return row;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no usage row for {request_id}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GenerateRequest` with `prompt` as raw bytes, to send what a conforming
/// client never would.
#[derive(Clone, PartialEq, prost::Message)]
struct RawGenerateRequest {
    #[prost(string, tag = "1")]
    model: String,
    #[prost(bytes = "vec", tag = "2")]
    prompt: Vec<u8>,
}

#[tokio::test]
async fn a_prompt_that_is_not_utf8_is_invalid_argument_naming_it() {
    let gateway = TestGateway::start().await;
    let key = tenant_key(&gateway, "garbled").await;
    let mut grpc = tonic::client::Grpc::new(gateway.channel.clone());
    grpc.ready().await.expect("ready");
    let request = RawGenerateRequest {
        model: "tiny".to_owned(),
        prompt: vec![b'h', b'i', 0xff, 0xfe],
    };
    let codec = tonic_prost::ProstCodec::<RawGenerateRequest, RawGenerateRequest>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/ascend.gateway.v1.Inference/Generate",
    );
    let status = grpc
        .unary(authed(request, &key), path, codec)
        .await
        .expect_err("not UTF-8");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("GenerateRequest.prompt"),
        "names the field: {}",
        status.message()
    );
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_dropped_stream_frees_its_slot_and_blocks_and_is_metered() {
    let gateway = TestGateway::start().await;
    let key = tenant_key(&gateway, "impatient").await;
    let model = gateway.models.get("tiny").expect("tiny").clone();
    let free_before = model.kv_free_blocks();
    let mut client = InferenceClient::new(gateway.channel.clone());
    let mut r = request(&"a long prompt to chew on ".repeat(20), 5);
    r.max_tokens = Some(64);
    r.request_id = "dropped-1".to_owned();
    let mut stream = client
        .generate_stream(authed(r, &key))
        .await
        .expect("stream")
        .into_inner();
    let _first = stream.next().await.expect("a first message").expect("ok");
    drop(stream);

    let (reason, completion) = usage_row(&gateway, "dropped-1").await;
    assert!(
        ["cancelled", "eos", "length", "stop"].contains(&reason.as_str()),
        "{reason}"
    );
    if reason == "cancelled" {
        assert!(completion < 64, "usage covers only the tokens produced");
    }
    crate::common::wait_until_idle(&model, free_before).await;
    gateway.stop().await.expect("clean stop");
}

/// Tenant A floods the queue with 200 requests; tenant B then sends 10. The
/// bound stated and checked: B's 10 finish while A completes at most 40 more
/// (fair queuing interleaves B with A's queue instead of behind it; a FIFO
/// would make B wait for all of A's backlog, well over 100 requests here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_does_not_starve_a_quiet_one() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let gateway = TestGateway::start().await;
    let flood_key = tenant_key(&gateway, "flooder").await;
    let quiet_key = tenant_key(&gateway, "quiet").await;
    let a_done = Arc::new(AtomicUsize::new(0));
    let small = |seed: u64| {
        let mut r = request("flood", seed);
        r.max_tokens = Some(4);
        r
    };
    let mut flood = Vec::new();
    for i in 0..200 {
        let mut client = InferenceClient::new(gateway.channel.clone());
        let (key, done, r) = (flood_key.clone(), a_done.clone(), small(i));
        flood.push(tokio::spawn(async move {
            client
                .generate(authed(r, &key))
                .await
                .expect("flood request");
            done.fetch_add(1, Ordering::SeqCst);
        }));
    }
    // Let the flood reach the queue first.
    let wait_until = std::time::Instant::now() + Duration::from_secs(30);
    while gateway.models.get("tiny").expect("tiny").queue_depth().0 < 100 {
        assert!(
            std::time::Instant::now() < wait_until,
            "the flood never queued up"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let a_before = a_done.load(Ordering::SeqCst);
    let mut quiet = Vec::new();
    for i in 0..10 {
        let mut client = InferenceClient::new(gateway.channel.clone());
        let (key, r) = (quiet_key.clone(), small(1000 + i));
        quiet.push(tokio::spawn(async move {
            client
                .generate(authed(r, &key))
                .await
                .expect("quiet request");
        }));
    }
    for q in quiet {
        q.await.expect("join");
    }
    let a_during = a_done.load(Ordering::SeqCst) - a_before;
    eprintln!("flooder completions while the quiet tenant waited: {a_during}");
    assert!(
        a_during <= 40,
        "the flooder completed {a_during} requests while the quiet tenant's 10 waited"
    );
    for f in flood {
        f.await.expect("join");
    }
    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once_with_resource_exhausted() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut settings = crate::common::test_settings(&data_dir);
    settings.models[0].max_queue_requests = 2;
    settings.models[0].max_batch_size = 1;
    let gateway = TestGateway::start_with(settings, data_dir).await;
    let key = tenant_key(&gateway, "crowded").await;
    let calls: Vec<_> = (0..50)
        .map(|i| {
            let mut client = InferenceClient::new(gateway.channel.clone());
            let key = key.clone();
            tokio::spawn(async move {
                let mut r = request("crowd", i);
                r.max_tokens = Some(8);
                client.generate(authed(r, &key)).await
            })
        })
        .collect();
    let (mut served, mut refused) = (0, 0);
    for call in calls {
        match call.await.expect("join") {
            Ok(_) => served += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("queue"), "{status:?}");
                refused += 1;
            }
        }
    }
    assert!(
        refused > 0,
        "50 requests at once cannot all fit a queue of 2"
    );
    assert!(served > 0);
    let model = gateway.models.get("tiny").expect("tiny");
    assert_eq!(model.queue_depth().0, 0, "nothing is left behind");
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_served_as_shape_is_charged_for_its_full_size() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut settings = crate::common::test_settings(&data_dir);
    let mut big = crate::common::tiny_model();
    big.id = "tiny-as-175b".to_owned();
    big.served_as = slow_model().served_as;
    settings.models.push(big);
    let gateway = TestGateway::start_with(settings, data_dir).await;
    let key = tenant_key(&gateway, "shaped").await;
    let mut client = InferenceClient::new(gateway.channel.clone());
    let models = client
        .list_models(authed(ListModelsRequest {}, &key))
        .await
        .expect("models")
        .into_inner()
        .models;
    let shaped = models
        .iter()
        .find(|m| m.id == "tiny-as-175b")
        .expect("listed");
    let served_as = shaped.served_as.as_ref().expect("served_as");
    assert_eq!(
        (served_as.parameters, served_as.devices),
        (175_000_000_000, 8)
    );

    let mut usage = Vec::new();
    for model in ["tiny", "tiny-as-175b"] {
        let r = GenerateRequest {
            model: model.to_owned(),
            ..request("same work", 11)
        };
        usage.push(
            client
                .generate(authed(r, &key))
                .await
                .expect("generate")
                .into_inner()
                .usage
                .expect("usage"),
        );
    }
    assert_eq!(
        usage[0].completion_tokens, usage[1].completion_tokens,
        "same numerics"
    );
    assert!(
        usage[1].device_time_us > 100 * usage[0].device_time_us,
        "the 175B shape is charged far more device time: {} vs {}",
        usage[1].device_time_us,
        usage[0].device_time_us
    );
    assert!(usage[1].energy_mj > usage[0].energy_mj);
    gateway.stop().await.expect("clean stop");
}

/// The value of one sample line of a Prometheus text scrape.
pub fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{body}"))
}

#[tokio::test]
async fn serving_latencies_and_tokens_are_in_the_metrics() {
    let gateway = TestGateway::start().await;
    let key = tenant_key(&gateway, "observed").await;
    let mut client = InferenceClient::new(gateway.channel.clone());
    let mut completion_tokens = 0;
    for seed in 0..3 {
        let mut r = request("measure me", seed);
        r.ignore_eos = true;
        let usage = client
            .generate(authed(r, &key))
            .await
            .expect("generate")
            .into_inner()
            .usage
            .expect("usage");
        assert_eq!(usage.completion_tokens, 12, "ignore_eos runs to max_tokens");
        completion_tokens += u64::from(usage.completion_tokens);
    }
    let body = crate::common::scrape(gateway.metrics_addr).await;
    let tiny = "{model=\"tiny\"}";
    assert_eq!(
        sample(
            &body,
            &format!("ascend_gateway_generation_tokens_total{tiny}")
        ),
        completion_tokens as f64
    );
    assert_eq!(
        sample(
            &body,
            &format!("ascend_gateway_time_to_first_token_seconds_count{tiny}")
        ),
        3.0
    );
    assert_eq!(
        sample(
            &body,
            &format!("ascend_gateway_inter_token_latency_seconds_count{tiny}")
        ),
        (completion_tokens - 3) as f64,
        "one gap per token after each first"
    );
    assert_eq!(
        sample(
            &body,
            &format!("ascend_gateway_e2e_request_latency_seconds_count{tiny}")
        ),
        3.0
    );
    assert_eq!(
        sample(
            &body,
            "ascend_gateway_requests_finished_total{model=\"tiny\",reason=\"length\"}"
        ),
        3.0
    );
    let steps = sample(&body, &format!("ascend_gateway_step_sequences_count{tiny}"));
    let sequences = sample(&body, &format!("ascend_gateway_step_sequences_sum{tiny}"));
    assert!(steps >= 12.0, "at least one step per token: {steps}");
    assert_eq!(sequences, steps, "one request at a time: batches of one");
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn the_echo_engine_answers_with_the_prompt_and_is_metered_like_any_model() {
    let dir = tempfile::tempdir().expect("dir");
    let mut settings = crate::common::test_settings(&dir);
    settings
        .models
        .push(ascend_gateway::serving::ModelSettings {
            id: "echo".to_owned(),
            engine: ascend_gateway::serving::Engine::Echo,
            ..crate::common::tiny_model()
        });
    let gateway = TestGateway::start_with(settings, dir).await;
    let key = tenant_key(&gateway, "echoer").await;
    let mut client = InferenceClient::new(gateway.channel.clone());
    let mut r = request("say it back to me", 1);
    r.model = "echo".to_owned();
    r.max_tokens = Some(64);
    r.request_id = "echo-1".to_owned();
    let answer = client
        .generate(authed(r.clone(), &key))
        .await
        .expect("echo")
        .into_inner();
    assert_eq!(answer.text, "say it back to me");
    let usage = answer.usage.expect("usage");
    assert_eq!(usage.completion_tokens, usage.prompt_tokens);
    assert_eq!(usage.device_time_us, 0);
    r.max_tokens = Some(2);
    r.request_id = "echo-2".to_owned();
    let cut = client
        .generate(authed(r, &key))
        .await
        .expect("echo")
        .into_inner();
    assert_eq!(cut.usage.expect("usage").completion_tokens, 2);
    assert!("say it back to me".starts_with(&cut.text), "{}", cut.text);
    let (reason, completion) = usage_row(&gateway, "echo-1").await;
    assert_eq!(reason, "length");
    assert_eq!(completion, i64::from(usage.completion_tokens));
    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_whose_clients_left_give_their_queue_places_back_at_once() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut settings = crate::common::test_settings(&data_dir);
    let mut slow = slow_model();
    slow.max_queue_requests = 2;
    slow.max_batch_size = 1;
    settings.models.push(slow);
    let gateway = TestGateway::start_with(settings, data_dir).await;
    let key = tenant_key(&gateway, "leavers").await;
    let slow_request = |seed| {
        let mut r = request("hold the worker", seed);
        r.model = "slow".to_owned();
        r.max_tokens = Some(48);
        r.ignore_eos = true;
        r
    };
    // One request holds the only batch slot for seconds (device pace).
    let mut holder = InferenceClient::new(gateway.channel.clone());
    let mut held = holder
        .generate_stream(authed(slow_request(1), &key))
        .await
        .expect("stream")
        .into_inner();
    held.message().await.expect("first").expect("a message");
    // Two more fill the queue, and their clients leave.
    let mut leavers = Vec::new();
    for seed in 2..4 {
        let mut client = InferenceClient::new(gateway.channel.clone());
        let mut stream = client
            .generate_stream(authed(slow_request(seed), &key))
            .await
            .expect("queued")
            .into_inner();
        leavers.push(tokio::spawn(async move {
            // Nothing comes while it waits behind the holder.
            let _ = tokio::time::timeout(Duration::from_millis(100), stream.message()).await;
        }));
    }
    for leaver in leavers {
        leaver.await.expect("join");
    }
    let model = gateway.models.get("slow").expect("slow");
    assert_eq!(model.queue_depth().0, 2, "both wait behind the holder");
    // The server has seen both leave once their calls are counted Canceled.
    let canceled = "ascend_gateway_grpc_requests_total{grpc_service=\"ascend.gateway.v1.Inference\",grpc_code=\"Canceled\"} 2";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !crate::common::scrape(gateway.metrics_addr)
        .await
        .contains(canceled)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leavers were never seen to leave"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(model.queue_depth().0, 2, "still queued: no worker was free");
    // The queue is full of requests nobody waits for: a new one takes a
    // freed place instead of being refused.
    let mut client = InferenceClient::new(gateway.channel.clone());
    let mut newcomer = slow_request(5);
    newcomer.max_tokens = Some(2);
    let answered = tokio::spawn(async move { client.generate(authed(newcomer, &key)).await });
    // Queued alone (the leavers swept out), while the holder still runs.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while model.queue_depth().0 != 1 {
        assert!(
            tokio::time::Instant::now() < deadline && !answered.is_finished(),
            "the newcomer was not queued in a freed place"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(held);
    let answer = answered
        .await
        .expect("join")
        .expect("admitted, not refused");
    assert_eq!(
        answer.into_inner().usage.expect("usage").completion_tokens,
        2
    );
    let metrics = crate::common::scrape(gateway.metrics_addr).await;
    assert!(
        metrics.contains("ascend_gateway_queue_full_rejections_total{model=\"slow\"} 0"),
        "{metrics}"
    );
    gateway.stop().await.expect("clean stop");
}
