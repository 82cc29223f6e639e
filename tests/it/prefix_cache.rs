//! Context caching end to end: the prefix cache on the workers' paged KV pools, tenant
//! isolation, the same tokens from a cached prefix as from a computed one, cache-affinity
//! routing among workers, and cache hits in usage, quotes, metering and invoices.

use std::time::Duration;

use ascend_gateway::api::pb::v1::billing_client::BillingClient;
use ascend_gateway::api::pb::v1::inference_client::InferenceClient;
use ascend_gateway::api::pb::v1::{
    CountTokensRequest, CreateTenantRequest, GenerateRequest, GenerateResponse, GetInvoiceRequest,
    LineKind, Money, Price, PutPricesRequest,
};
use ascend_gateway::calendar::Month;
use ascend_gateway::serving::ModelSettings;
use tonic::transport::Channel;

use crate::common::{TestGateway, admin, authed, test_settings, tiny_model, token_count};

/// KV block size of the workers' pools: cached prefixes are whole blocks.
const BLOCK: u32 = 16;

async fn tenant_on_plan(channel: &Channel, slug: &str, plan: &str) -> (String, String) {
    let request = CreateTenantRequest {
        slug: slug.to_owned(),
        price_plan: plan.to_owned(),
        ..Default::default()
    };
    crate::common::tenant_with(channel, request).await
}

fn usd(nanos: i64) -> Option<Money> {
    Some(Money {
        currency_code: "USD".to_owned(),
        amount_nanos: nanos,
    })
}

/// A prompt of at least `tokens` tokens on the tiny model's vocabulary.
async fn long_prompt(channel: &Channel, key: &str, tokens: u32, salt: &str) -> (String, u32) {
    let mut prompt = format!("{salt}: the system prompt every turn resends.");
    let mut n = 0;
    for i in 0.. {
        prompt.push_str(&format!(" rule {i} of the Ascend operator handbook;"));
        if i % 8 == 7 {
            n = token_count(
                channel,
                key,
                CountTokensRequest {
                    model: "tiny".to_owned(),
                    prompt: prompt.clone(),
                    ..Default::default()
                },
            )
            .await;
            if n >= tokens {
                break;
            }
        }
    }
    (prompt, n)
}

fn request(prompt: &str, seed: u64, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        model: "tiny".to_owned(),
        prompt: prompt.to_owned(),
        max_tokens: Some(max_tokens),
        temperature: Some(0.9),
        seed: Some(seed),
        ignore_eos: true,
        ..Default::default()
    }
}

async fn generate(channel: &Channel, key: &str, request: GenerateRequest) -> GenerateResponse {
    InferenceClient::new(channel.clone())
        .generate(authed(request, key))
        .await
        .expect("generate")
        .into_inner()
}

fn cached(answer: &GenerateResponse) -> u32 {
    answer.usage.as_ref().expect("usage").cached_prompt_tokens
}

#[tokio::test]
async fn a_repeated_prompt_reuses_its_prefix_gives_the_same_tokens_and_is_billed_as_hits() {
    let gateway = TestGateway::start().await;
    let channel = gateway.channel.clone();
    // $0.10 per million computed prompt tokens, $0.02 per million hits, $0.30 completion.
    BillingClient::new(channel.clone())
        .put_prices(admin(PutPricesRequest {
            plan: "chat".to_owned(),
            currency_code: "USD".to_owned(),
            description: "cache-hit pricing".to_owned(),
            prices: vec![Price {
                model: "tiny".to_owned(),
                prompt_per_million_tokens: usd(100_000_000),
                cached_prompt_per_million_tokens: usd(20_000_000),
                completion_per_million_tokens: usd(300_000_000),
                ..Default::default()
            }],
        }))
        .await
        .expect("prices");
    let (tenant, key) = tenant_on_plan(&channel, "chatty", "chat").await;
    let (_, other_key) = tenant_on_plan(&channel, "stranger", "chat").await;
    let (prompt, prompt_tokens) = long_prompt(&channel, &key, 600, "acme").await;

    let first = generate(&channel, &key, request(&prompt, 42, 20)).await;
    assert_eq!(cached(&first), 0, "nothing cached yet");
    let second = generate(&channel, &key, request(&prompt, 42, 20)).await;
    let hits = cached(&second);
    // Whole blocks, never the prompt's last token (its logits are needed).
    assert_eq!(hits, (prompt_tokens - 1) / BLOCK * BLOCK);
    assert!(
        hits >= 512,
        "a 600-token prompt reuses at least 512: {hits}"
    );
    assert_eq!(
        second.text, first.text,
        "the same seed gives the same tokens from a cached prefix"
    );
    let usage = second.usage.as_ref().expect("usage");
    assert_eq!(usage.prompt_tokens, prompt_tokens);
    // Cached tokens cost no prefill compute on the emulated device.
    let computed = first.usage.as_ref().expect("usage");
    assert!(
        usage.device_time_us < computed.device_time_us && usage.energy_mj < computed.energy_mj,
        "device time {} < {}, energy {} < {}",
        usage.device_time_us,
        computed.device_time_us,
        usage.energy_mj,
        computed.energy_mj
    );
    // Quoted exactly: computed and cached prompt tokens at their prices.
    let expected = (i64::from(prompt_tokens - hits) * 100_000_000
        + i64::from(hits) * 20_000_000
        + i64::from(usage.completion_tokens) * 300_000_000)
        / 1_000_000;
    assert_eq!(
        usage.cost.as_ref().expect("quoted").amount_nanos,
        expected,
        "the quote prices hits at the cache-hit price"
    );

    // Another tenant's identical prompt finds nothing: caches are per tenant.
    let theirs = generate(&channel, &other_key, request(&prompt, 42, 20)).await;
    assert_eq!(cached(&theirs), 0, "another tenant's prefix is not served");
    assert_eq!(theirs.text, first.text);

    // The HTTP API reports the same hits in OpenAI's and DeepSeek's fields.
    let reply = crate::http::post(
        &gateway,
        "/v1/completions",
        &key,
        &serde_json::json!({"model": "tiny", "prompt": prompt, "max_tokens": 4, "seed": 1}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let http_usage = &reply.json()["usage"];
    assert_eq!(http_usage["prompt_tokens_details"]["cached_tokens"], hits);
    assert_eq!(http_usage["prompt_cache_hit_tokens"], hits);
    assert_eq!(http_usage["prompt_cache_miss_tokens"], prompt_tokens - hits);

    // Metered once each, with the hits; the invoice bills them on their own line.
    let period = Month::of_us(ascend_gateway::store::now_us());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let metered_hits: i64 = loop {
        let (n, hits): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), CAST(COALESCE(SUM(cached_prompt_tokens), 0) AS BIGINT) \
             FROM usage_events WHERE tenant_id = $1",
        )
        .bind(&tenant)
        .fetch_one(gateway.db.pool())
        .await
        .expect("usage");
        if n == 3 {
            break hits;
        }
        assert!(std::time::Instant::now() < deadline, "metered: {n} of 3");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(metered_hits, 2 * i64::from(hits));
    let invoice = BillingClient::new(channel.clone())
        .get_invoice(admin(GetInvoiceRequest {
            tenant: tenant.clone(),
            period: period.to_string(),
            ..Default::default()
        }))
        .await
        .expect("invoice")
        .into_inner();
    let line = |kind: LineKind| {
        invoice
            .lines
            .iter()
            .find(|l| l.kind() == kind)
            .unwrap_or_else(|| panic!("{kind:?} line in {:?}", invoice.lines))
    };
    let hit_line = line(LineKind::CachedPromptTokens);
    assert_eq!(hit_line.quantity, 2 * u64::from(hits));
    assert_eq!(
        hit_line.unit_price.as_ref().expect("price").amount_nanos,
        20_000_000
    );
    let miss_line = line(LineKind::PromptTokens);
    assert_eq!(
        miss_line.quantity,
        3 * u64::from(prompt_tokens) - 2 * u64::from(hits)
    );
    gateway.stop().await.expect("clean stop");
}

/// A gateway serving the tiny model as configured by `change`.
async fn gateway_with(change: impl FnOnce(&mut ModelSettings)) -> TestGateway {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut settings = test_settings(&data_dir);
    let mut model = tiny_model();
    change(&mut model);
    settings.models = vec![model];
    TestGateway::start_with(settings, data_dir).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_under_a_small_pool_keeps_every_request_correct() {
    // Reference answers with no cache at all.
    let reference = gateway_with(|m| m.prefix_cache = false).await;
    let (_, ref_key) = tenant_on_plan(&reference.channel, "ref", "").await;
    // 48 blocks of 16 tokens: room for about three of these prompts at once.
    let small = gateway_with(|m| {
        m.kv_max_blocks = Some(48);
        m.max_batch_size = 4;
    })
    .await;
    let (_, key) = tenant_on_plan(&small.channel, "evicted", "").await;
    let mut prompts = Vec::new();
    for salt in ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"] {
        prompts.push(long_prompt(&small.channel, &key, 180, salt).await.0);
    }
    let mut expected = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        expected.push(
            generate(&reference.channel, &ref_key, request(prompt, i as u64, 24))
                .await
                .text,
        );
    }
    // Rounds over more prompts than the pool holds, sequential and concurrent.
    for round in 0..3 {
        for (i, prompt) in prompts.iter().enumerate() {
            // Cycling through more prompts than the pool holds evicts each before its
            // next round; asked twice in a row, the second finds it.
            for repeat in 0..2 {
                let answer = generate(&small.channel, &key, request(prompt, i as u64, 24)).await;
                assert_eq!(answer.text, expected[i], "round {round}, prompt {i}");
                if repeat == 1 {
                    assert!(cached(&answer) > 0, "round {round}: prompt {i} again");
                }
            }
        }
        let together = prompts.iter().enumerate().map(|(i, prompt)| {
            let (channel, key, request) = (
                small.channel.clone(),
                key.clone(),
                request(prompt, i as u64, 24),
            );
            tokio::spawn(async move { generate(&channel, &key, request).await.text })
        });
        for (i, handle) in together.enumerate() {
            assert_eq!(
                handle.await.expect("join"),
                expected[i],
                "round {round}, together, {i}"
            );
        }
    }
    let metrics = crate::common::scrape(small.metrics_addr).await;
    let evictions = crate::generate::sample(
        &metrics,
        "ascend_gateway_prefix_cache_evictions_total{model=\"tiny\"}",
    );
    assert!(evictions > 0.0, "the small pool evicted:\n{metrics}");
    let ratio = crate::generate::sample(
        &metrics,
        "ascend_gateway_prompt_cache_hit_ratio{model=\"tiny\"}",
    );
    assert!(ratio > 0.0 && ratio < 1.0, "hit ratio {ratio}");
    reference.stop().await.expect("stop");
    small.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_follows_the_cached_prefix_until_the_load_margin() {
    for (margin, all_hit) in [(1000, true), (1, false)] {
        let gateway = gateway_with(|m| {
            m.workers = 2;
            m.cache_affinity_margin = margin;
            m.max_output_tokens = 256;
        })
        .await;
        let (_, key) = tenant_on_plan(&gateway.channel, "router", "").await;
        let (history, _) = long_prompt(&gateway.channel, &key, 200, "conversation").await;
        // One worker computes the conversation; both are idle after.
        generate(&gateway.channel, &key, request(&history, 1, 2)).await;
        // Turns of the same conversation, one after another: each goes to the holder while
        // the other worker is idle, so each reuses the history.
        for turn in 0..6 {
            let prompt = format!("{history} turn {turn}");
            let answer = generate(&gateway.channel, &key, request(&prompt, turn, 2)).await;
            assert!(
                cached(&answer) > 0,
                "margin {margin}: turn {turn} missed the cache"
            );
        }
        // Six long turns at once: within the margin they all wait for the holder; past it
        // some go to the other worker, which holds nothing of the conversation.
        let together: Vec<_> = (0..6u64)
            .map(|i| {
                let (channel, key) = (gateway.channel.clone(), key.clone());
                let request = request(&format!("{history} branch {i}"), i, 160);
                tokio::spawn(async move { generate(&channel, &key, request).await })
            })
            .collect();
        let mut hit = Vec::new();
        for handle in together {
            hit.push(cached(&handle.await.expect("join")) > 0);
        }
        if all_hit {
            assert!(hit.iter().all(|&h| h), "margin {margin}: {hit:?}");
        } else {
            assert!(
                hit.iter().any(|&h| !h) && hit.iter().any(|&h| h),
                "margin {margin}: past the margin some turns go to the idle worker: {hit:?}"
            );
        }
        gateway.stop().await.expect("stop");
    }
}

#[tokio::test]
async fn tenants_that_opt_in_share_one_cache_and_others_stay_apart() {
    use ascend_gateway::api::pb::v1::{CacheScope, UpdateTenantRequest};
    let gateway = TestGateway::start().await;
    let channel = gateway.channel.clone();
    let shared = |slug: &str| CreateTenantRequest {
        slug: slug.to_owned(),
        cache_scope: CacheScope::Shared.into(),
        ..Default::default()
    };
    let (_, first) = crate::common::tenant_with(&channel, shared("public-a")).await;
    let (_, second) = crate::common::tenant_with(&channel, shared("public-b")).await;
    let (_, private) = tenant_on_plan(&channel, "private-c", "").await;
    let (prompt, _) = long_prompt(&channel, &first, 200, "a public system prompt").await;

    let computed = generate(&channel, &first, request(&prompt, 3, 8)).await;
    assert_eq!(cached(&computed), 0);
    let reused = generate(&channel, &second, request(&prompt, 3, 8)).await;
    assert!(
        cached(&reused) > 0,
        "another tenant of the shared scope reuses it"
    );
    assert_eq!(reused.text, computed.text);
    let apart = generate(&channel, &private, request(&prompt, 3, 8)).await;
    assert_eq!(cached(&apart), 0, "a tenant of its own scope does not");

    // Opting in later takes effect on the next key lookup; an unknown scope is refused.
    let mut admin_client =
        ascend_gateway::api::pb::v1::tenant_admin_client::TenantAdminClient::new(channel.clone());
    let updated = admin_client
        .update_tenant(admin(UpdateTenantRequest {
            tenant: "private-c".to_owned(),
            cache_scope: CacheScope::Shared.into(),
            ..Default::default()
        }))
        .await
        .expect("update")
        .into_inner();
    assert_eq!(updated.cache_scope(), CacheScope::Shared);
    let status = admin_client
        .update_tenant(admin(UpdateTenantRequest {
            tenant: "private-c".to_owned(),
            cache_scope: 99,
            ..Default::default()
        }))
        .await
        .expect_err("unknown scope");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("cache_scope"),
        "{}",
        status.message()
    );
    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_one_system_prompt_computes_it_once() {
    let gateway = gateway_with(|m| m.max_batch_size = 8).await;
    let (_, key) = tenant_on_plan(&gateway.channel, "bursty", "").await;
    let (system, _) = long_prompt(&gateway.channel, &key, 400, "shared system prompt").await;
    // Eight chats start at once on the same system prompt: one computes it, the others
    // wait for its blocks rather than computing them again in the same steps.
    let burst: Vec<_> = (0..8u64)
        .map(|i| {
            let (channel, key) = (gateway.channel.clone(), key.clone());
            let request = request(&format!("{system} User {i}: hello"), i, 4);
            tokio::spawn(async move { generate(&channel, &key, request).await })
        })
        .collect();
    let mut answers = Vec::new();
    for handle in burst {
        answers.push(handle.await.expect("join"));
    }
    let hits = answers.iter().filter(|a| cached(a) >= 384).count();
    assert!(
        hits >= 7,
        "all but the first reuse the system prompt: {hits} of 8"
    );
    // And each answer is the one its seed gives with the prefix computed.
    for (i, answer) in answers.iter().enumerate() {
        let again = generate(
            &gateway.channel,
            &key,
            request(&format!("{system} User {i}: hello"), i as u64, 4),
        )
        .await;
        assert_eq!(again.text, answer.text, "chat {i}");
    }
    gateway.stop().await.expect("stop");
}

/// Caching turned off in the config across a restart of the real binary: every request
/// before and after is metered once, hits only before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_caching_off_across_a_restart_loses_no_usage() {
    let data = tempfile::tempdir().expect("dir");
    let config = data.path().join("gateway.toml");
    let spawn = |caching: bool| {
        std::fs::write(
            &config,
            format!(
                "[[models]]\nid = \"tiny\"\ndir = {:?}\nprefix_cache = {caching}\n",
                crate::common::tiny_model_dir()
            ),
        )
        .expect("config");
        crate::common::GatewayProcess::spawn(|command| {
            command
                .arg("--config")
                .arg(&config)
                .arg("--data-dir")
                .arg(data.path());
        })
    };
    let mut hits = Vec::new();
    let mut key = String::new();
    let mut prompt = String::new();
    for (round, caching) in [(0, true), (1, false)] {
        let gateway = spawn(caching);
        let channel = gateway.channel().await;
        if round == 0 {
            key = tenant_on_plan(&channel, "restarted", "").await.1;
            prompt = long_prompt(&channel, &key, 100, "restart").await.0;
        }
        for n in 0..3u64 {
            let mut request = request(&prompt, n, 4);
            request.request_id = format!("restart-{round}-{n}");
            hits.push(cached(&generate(&channel, &key, request).await));
        }
        let (status, log) = gateway.terminate().await;
        assert!(status.success(), "clean stop:\n{log}");
    }
    assert_eq!(hits[0], 0);
    assert!(hits[1] > 0 && hits[2] > 0, "cached while on: {hits:?}");
    assert_eq!(&hits[3..], &[0, 0, 0], "nothing cached while off");
    let url = format!(
        "sqlite://{}",
        data.path().join("ascend-gateway.db").display()
    );
    let db = ascend_gateway::store::Db::connect_url(&url, 1, Duration::from_secs(5))
        .await
        .expect("db");
    let (events, cached_total): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), CAST(COALESCE(SUM(cached_prompt_tokens), 0) AS BIGINT) \
         FROM usage_events WHERE request_id LIKE 'restart-%'",
    )
    .fetch_one(db.pool())
    .await
    .expect("usage");
    assert_eq!(events, 6, "every request metered once, across the restart");
    assert_eq!(cached_total, i64::from(hits.iter().sum::<u32>()));
    db.close().await;
}
