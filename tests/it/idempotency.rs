//! Client request ids are idempotency keys decided at admission: racers with
//! one id get one execution, duplicates after it get the stored answer for
//! free, a reuse for another request is refused, and an id is new again
//! after the retention window (and billed again). On SQLite, PostgreSQL,
//! and PostgreSQL with the Redis limit backend.

use std::time::Duration;

use ascend_gateway::api::pb::v1::inference_client::InferenceClient;
use ascend_gateway::api::pb::v1::{
    GenerateRequest, GenerateResponse, TenantLimits, generate_stream_response,
};
use ascend_gateway::config::Settings;
use secrecy::SecretString;
use tokio_stream::StreamExt;
use tonic::Code;

use crate::common::{PgTestDb, TestGateway, authed, tenant_with_limits, test_settings};

fn request(request_id: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        model: "tiny".to_owned(),
        prompt: "free inference for everyone".to_owned(),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        seed: Some(11),
        request_id: request_id.to_owned(),
        ..Default::default()
    }
}

/// A tenant's usage events in the database: (count, tokens).
async fn usage_totals(gateway: &TestGateway, tenant_id: &str) -> (i64, i64) {
    let row: (i64, Option<i64>) = sqlx::query_as(
        "SELECT COUNT(*), CAST(SUM(prompt_tokens + completion_tokens) AS BIGINT) \
         FROM usage_events WHERE tenant_id = $1",
    )
    .bind(tenant_id)
    .fetch_one(gateway.db.pool())
    .await
    .expect("usage");
    (row.0, row.1.unwrap_or(0))
}

/// Usage events of a tenant once the writer has shipped them: (count,
/// tokens), waiting until `expected` events are there (or a while), then a
/// little longer so that an extra event would show.
async fn metered(gateway: &TestGateway, tenant_id: &str, expected: i64) -> (i64, i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while usage_totals(gateway, tenant_id).await.0 < expected
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    usage_totals(gateway, tenant_id).await
}

async fn thirty_racers_are_served_once(gateway: &TestGateway) {
    let (tenant_id, key) =
        tenant_with_limits(&gateway.channel, "free-rider", TenantLimits::default()).await;
    let mut racers = Vec::new();
    for n in 0..30 {
        let (channel, key) = (gateway.channel.clone(), key.clone());
        racers.push(tokio::spawn(async move {
            let mut client = InferenceClient::new(channel);
            let r = request("free-ride", 48);
            if n % 3 == 0 {
                // Some racers stream: the same rules hold.
                let mut stream = client.generate_stream(authed(r, &key)).await?.into_inner();
                let mut text = String::new();
                let mut completion = 0;
                while let Some(message) = stream.next().await {
                    match message?.event {
                        Some(generate_stream_response::Event::Delta(d)) => text.push_str(&d.text),
                        Some(generate_stream_response::Event::Complete(c)) => {
                            completion = c.usage.expect("usage").completion_tokens;
                        }
                        None => {}
                    }
                }
                Ok::<_, tonic::Status>((text, completion))
            } else {
                let answer = client.generate(authed(r, &key)).await?.into_inner();
                Ok((answer.text, answer.usage.expect("usage").completion_tokens))
            }
        }));
    }
    let (mut answers, mut aborted) = (Vec::new(), 0);
    for racer in racers {
        match racer.await.expect("racer") {
            Ok(answer) => answers.push(answer),
            Err(status) => {
                assert_eq!(status.code(), Code::Aborted, "{status:?}");
                assert!(
                    status.message().contains("already in progress"),
                    "{status:?}"
                );
                aborted += 1;
            }
        }
    }
    assert_eq!(answers.len() + aborted, 30);
    assert!(!answers.is_empty(), "one racer is served");
    assert!(
        answers.iter().all(|a| *a == answers[0]),
        "every answer is the one execution's"
    );
    assert_eq!(answers[0].1, 48);
    let (events, tokens) = metered(gateway, &tenant_id, 1).await;
    assert_eq!(events, 1, "one execution, one usage event");

    // After it finished: the stored answer, unary and streamed, for free.
    let mut client = InferenceClient::new(gateway.channel.clone());
    let replay = client
        .generate(authed(request("free-ride", 48), &key))
        .await
        .expect("replay");
    assert_eq!(
        replay
            .metadata()
            .get("idempotent-replayed")
            .map(|v| v.to_str().unwrap_or_default()),
        Some("true")
    );
    let replay: GenerateResponse = replay.into_inner();
    assert_eq!(replay.text, answers[0].0);
    assert_eq!(replay.request_id, "free-ride");
    let usage = replay.usage.expect("the original usage");
    assert_eq!(i64::from(usage.total_tokens), tokens);
    let mut stream = client
        .generate_stream(authed(request("free-ride", 48), &key))
        .await
        .expect("stream replay")
        .into_inner();
    let (mut text, mut complete) = (String::new(), None);
    while let Some(message) = stream.next().await {
        match message.expect("message").event {
            Some(generate_stream_response::Event::Delta(d)) => text.push_str(&d.text),
            Some(generate_stream_response::Event::Complete(c)) => complete = Some(c),
            None => {}
        }
    }
    assert_eq!(text, replay.text);
    assert_eq!(complete.expect("final message").usage, Some(usage));

    // The same id for another request is refused, naming the field.
    let status = client
        .generate(authed(request("free-ride", 8), &key))
        .await
        .expect_err("another request under a used id");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("request_id"), "{status:?}");
    assert_eq!(
        metered(gateway, &tenant_id, 1).await.0,
        1,
        "replays cost nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_racers_with_one_id_are_served_once_on_sqlite() {
    let gateway = TestGateway::start().await;
    thirty_racers_are_served_once(&gateway).await;
    gateway.stop().await.expect("clean stop");
}

fn postgres_settings(db: &PgTestDb, dir: &tempfile::TempDir) -> Settings {
    let mut settings = test_settings(dir);
    settings.database.url = Some(db.secret_url());
    settings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_racers_with_one_id_are_served_once_on_postgres() {
    let db = PgTestDb::create().await;
    let dir = tempfile::tempdir().expect("dir");
    let gateway = TestGateway::start_with(postgres_settings(&db, &dir), dir).await;
    thirty_racers_are_served_once(&gateway).await;
    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_racers_with_one_id_are_served_once_on_postgres_and_redis() {
    let db = PgTestDb::create().await;
    let dir = tempfile::tempdir().expect("dir");
    let mut settings = postgres_settings(&db, &dir);
    settings.redis.url = Some(SecretString::from(
        std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned()),
    ));
    settings.limits.redis_prefix = format!("agwtest:{}:", uuid::Uuid::new_v4().simple());
    let gateway = TestGateway::start_with(settings, dir).await;
    thirty_racers_are_served_once(&gateway).await;
    gateway.stop().await.expect("clean stop");
}

/// A monthly quota cannot be exceeded through a reused id, across a
/// restart: every duplicate is a free replay of one execution.
#[tokio::test]
async fn a_quota_cannot_be_exceeded_through_ids() {
    let data_dir = tempfile::tempdir().expect("data dir");
    let settings = test_settings(&data_dir);
    let first =
        TestGateway::start_with(settings.clone(), tempfile::tempdir().expect("spare")).await;
    let (tenant_id, key) = tenant_with_limits(
        &first.channel,
        "quota-rider",
        TenantLimits {
            monthly_token_quota: Some(300),
            ..Default::default()
        },
    )
    .await;
    let mut client = InferenceClient::new(first.channel.clone());
    for _ in 0..20 {
        client
            .generate(authed(request("same-id", 48), &key))
            .await
            .expect("served once, then replayed");
    }
    assert_eq!(metered(&first, &tenant_id, 1).await.0, 1);
    first.stop().await.expect("stop");

    let second = TestGateway::start_with(settings, tempfile::tempdir().expect("spare")).await;
    let mut client = InferenceClient::new(second.channel.clone());
    for _ in 0..10 {
        let replay = client
            .generate(authed(request("same-id", 48), &key))
            .await
            .expect("still a replay after the restart");
        assert!(replay.metadata().get("idempotent-replayed").is_some());
    }
    let (events, tokens) = metered(&second, &tenant_id, 1).await;
    assert_eq!(events, 1);
    assert!(tokens <= 300, "{tokens}");
    second.stop().await.expect("stop");
}

/// A refused request releases its id, so the client's retry runs; after the
/// retention window the id is new again and billed as its own attempt.
#[tokio::test]
async fn refusals_release_ids_and_retention_ends_replays() {
    let dir = tempfile::tempdir().expect("dir");
    let mut settings = test_settings(&dir);
    settings.idempotency.retention = Duration::from_secs(1);
    let gateway = TestGateway::start_with(settings, dir).await;
    let (tenant_id, key) = tenant_with_limits(
        &gateway.channel,
        "retrier",
        TenantLimits {
            // Above one 8-token request of this prompt, twice, and below
            // one 64-token request.
            tokens_per_minute: Some(70),
            ..Default::default()
        },
    )
    .await;
    let mut client = InferenceClient::new(gateway.channel.clone());
    let status = client
        .generate(authed(request("retry-me", 64), &key))
        .await
        .expect_err("more than the tokens-per-minute limit");
    assert_eq!(status.code(), Code::ResourceExhausted);
    let first = client
        .generate(authed(request("retry-me", 8), &key))
        .await
        .expect("the retry under the same id runs");
    assert!(first.metadata().get("idempotent-replayed").is_none());
    assert_eq!(metered(&gateway, &tenant_id, 1).await.0, 1);

    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let again = client
        .generate(authed(request("retry-me", 8), &key))
        .await
        .expect("a new execution after the retention");
    assert!(again.metadata().get("idempotent-replayed").is_none());
    assert_eq!(metered(&gateway, &tenant_id, 2).await.0, 2);
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT request_id FROM usage_events WHERE tenant_id = $1 ORDER BY request_id",
    )
    .bind(&tenant_id)
    .fetch_all(gateway.db.pool())
    .await
    .expect("ids");
    assert_eq!(
        ids,
        ["retry-me", "retry-me #1"],
        "each execution billed once"
    );
    gateway.stop().await.expect("clean stop");
}

const DAY_US: i64 = 86_400_000_000;

/// Claims rows made on `day` (days since the epoch), as an older gateway
/// would have left them: a completed claim whose answer expired, and a
/// running one whose gateway died (its lease over).
async fn old_claims(db: &ascend_gateway::store::Db, day: i64, n: usize) {
    if let Some(pg) = db.postgres() {
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS request_claims_d{day} PARTITION OF request_claims \
             FOR VALUES FROM ({}) TO ({})",
            day * DAY_US,
            (day + 1) * DAY_US
        ))
        .execute(pg)
        .await
        .expect("old day");
    }
    for i in 0..n {
        let at = day * DAY_US + i64::try_from(i).expect("small") * 1_000_000;
        let state = if i % 2 == 0 { "completed" } else { "running" };
        sqlx::query(
            "INSERT INTO request_claims (tenant_id, request_id, attempt, state, fingerprint, \
             claimed_at_us, lease_until_us, expires_at_us, answer) \
             VALUES ('t', $1, 3, $2, 'f', $3, $4, $4, NULL)",
        )
        .bind(format!("day{day}-{i}"))
        .bind(state)
        .bind(at)
        .bind(at + 1_000_000)
        .execute(db.pool())
        .await
        .expect("old claim");
    }
}

async fn claims_count(db: &ascend_gateway::store::Db) -> i64 {
    sqlx::query_scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM request_claims")
        .fetch_one(db.pool())
        .await
        .expect("count")
}

/// The claims record is bounded by its window: days of claims before it go
/// whole (PostgreSQL partitions, SQLite rows), whatever the history, while a
/// claim inside it still refuses or replays its duplicates; at its edge an
/// id is new again, as attempt 0, and a day dropped under a running gateway
/// is made again on the next claim.
async fn claims_are_kept_over_their_window_only(db: ascend_gateway::store::Db) {
    use ascend_gateway::idempotency::{
        Claimed, Fingerprint, Idempotency, IdempotencySettings, RequestKey,
    };
    let settings = IdempotencySettings {
        retention: Duration::from_secs(3600),
        in_progress_ttl: Duration::from_secs(600),
    };
    // Without its run loop: the sweeps below are this test's, at the times
    // it chooses (claims finish on tasks of their own).
    let (claims, _pending) = Idempotency::new(db.clone(), settings);
    let now = ascend_gateway::store::now_us();
    let today = now.div_euclid(DAY_US);
    // Thirty days of history before the window, ten claims a day.
    for day in today - 32..today - 2 {
        old_claims(&db, day, 10).await;
    }
    let key = |id: &str| RequestKey {
        tenant_id: "t".to_owned(),
        request_id: id.to_owned(),
    };
    let fingerprint = Fingerprint::of(b"the request");
    let Claimed::New(claim) = claims
        .claim(key("fresh"), &fingerprint)
        .await
        .expect("claim")
    else {
        panic!("a new id is new");
    };
    assert_eq!(claim.metered_request_id(), "fresh");
    claim.complete(b"the answer".to_vec()).await;
    assert_eq!(claims_count(&db).await, 301);

    let report = claims.sweep(now).await.expect("sweep");
    assert_eq!(claims_count(&db).await, 1, "only the window's claim stays");
    if db.postgres().is_some() {
        assert_eq!(report.removed, 30, "thirty old days, dropped whole");
        let days = ascend_gateway::idempotency::claim_days(&db)
            .await
            .expect("days");
        assert_eq!(
            days,
            vec![today, today + 1, today + 2],
            "today and two ahead"
        );
    } else {
        assert_eq!(report.removed, 300, "SQLite deletes the old claims");
    }
    // Inside the window: replayed, and another request with the id refused.
    match claims
        .claim(key("fresh"), &fingerprint)
        .await
        .expect("replay")
    {
        Claimed::Replay(answer) => assert_eq!(answer, b"the answer"),
        Claimed::New(_) => panic!("a duplicate within the retention is replayed"),
    }
    assert!(
        claims
            .claim(key("fresh"), &Fingerprint::of(b"another request"))
            .await
            .is_err()
    );
    // An old id whose day went is new again, as attempt 0.
    let old_id = format!("day{}-0", today - 32);
    let Claimed::New(old) = claims.claim(key(&old_id), &fingerprint).await.expect("old") else {
        panic!("an id past the window is new");
    };
    assert_eq!(old.metered_request_id(), old_id, "attempt 0 again");
    old.release().await;

    // At the window's edge: a sweep as late as the window allows keeps
    // today's claims; one a day later removes them.
    let window = i64::try_from(claims.window().as_micros()).expect("window");
    let day_end = (today + 1) * DAY_US;
    claims
        .sweep(day_end + window - 1)
        .await
        .expect("sweep at the edge");
    assert_eq!(claims_count(&db).await, 2, "still inside the window");
    assert!(
        claims
            .claim(key("fresh"), &Fingerprint::of(b"another request"))
            .await
            .is_err(),
        "known up to the window's edge"
    );
    claims.sweep(day_end + window).await.expect("sweep past");
    assert_eq!(claims_count(&db).await, 0, "past the window nothing stays");
    // The day's partition went under this running gateway: the next claim
    // makes it again instead of failing or falling back to this node alone.
    let Claimed::New(again) = claims
        .claim(key("fresh"), &fingerprint)
        .await
        .expect("anew")
    else {
        panic!("past the window the id is new");
    };
    assert_eq!(again.metered_request_id(), "fresh");
    again.release().await;
    assert_eq!(claims_count(&db).await, 1, "claimed in the shared record");
}

#[tokio::test]
async fn claims_are_kept_over_their_window_only_on_postgres() {
    let test_db = PgTestDb::create().await;
    let db = ascend_gateway::store::Db::connect_url(&test_db.url, 4, Duration::from_secs(5))
        .await
        .expect("db");
    db.migrate().await.expect("migrate");
    claims_are_kept_over_their_window_only(db.clone()).await;
    db.close().await;
}

#[tokio::test]
async fn claims_are_kept_over_their_window_only_on_sqlite() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("claims.db").display()
    );
    let db = ascend_gateway::store::Db::connect_url(&url, 4, Duration::from_secs(5))
        .await
        .expect("db");
    db.migrate().await.expect("migrate");
    claims_are_kept_over_their_window_only(db.clone()).await;
    db.close().await;
}
