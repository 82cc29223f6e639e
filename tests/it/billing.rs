//! Billing over real gRPC: invoices that reconcile to the unit with the
//! usage events, late usage as one adjustment, price changes that split
//! lines, finalized invoices that the database itself keeps immutable,
//! exports in three formats (also through `ascendctl`), tenant isolation and
//! the statuses of bad input.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use ascend_gateway::api::pb::v1::billing_client::BillingClient;
use ascend_gateway::api::pb::v1::tenant_admin_client::TenantAdminClient;
use ascend_gateway::api::pb::v1::{
    CreateApiKeyRequest, CreateTenantRequest, ExportRequest, FinalizeInvoiceRequest,
    GetInvoiceRequest, Invoice, InvoiceLine, InvoiceStatus, LineKind, ListInvoicesRequest,
    ListPricePlansRequest, Money, Price, PutPricesRequest,
};
use ascend_gateway::billing::file::{EventRecord, LineRecord};
use ascend_gateway::calendar::Month;
use ascend_gateway::metering::{UsageEvent, insert_batch};
use ascend_gateway::store::Db;
use prost_types::Timestamp;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::{ADMIN_TOKEN, PgTestDb, TestGateway, admin, authed, test_settings};

const USD_CENT_NANOS: i128 = 10_000_000;

/// The month `n` months before the current one.
fn months_ago(n: u32) -> Month {
    let mut period = Month::of_us(ascend_gateway::store::now_us());
    for _ in 0..n {
        period = Month::of_us(period.start_us() - 1);
    }
    period
}

/// A gateway on a fresh PostgreSQL database, with no grace period so that
/// last month can be finalized whatever today's date.
async fn pg_gateway() -> (PgTestDb, TestGateway) {
    let test_db = PgTestDb::create().await;
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut settings = test_settings(&data_dir);
    settings.database.url = Some(test_db.secret_url());
    settings.billing.grace_period = Duration::ZERO;
    (test_db, TestGateway::start_with(settings, data_dir).await)
}

/// A gateway on the embedded SQLite, with no grace period.
async fn sqlite_gateway() -> TestGateway {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut settings = test_settings(&data_dir);
    settings.billing.grace_period = Duration::ZERO;
    TestGateway::start_with(settings, data_dir).await
}

async fn create_tenant(channel: &Channel, slug: &str, plan: &str) -> String {
    let request = CreateTenantRequest {
        slug: slug.to_owned(),
        price_plan: plan.to_owned(),
        ..Default::default()
    };
    crate::common::create_tenant(channel, request).await
}

async fn billing_key(channel: &Channel, slug: &str) -> String {
    TenantAdminClient::new(channel.clone())
        .create_api_key(admin(CreateApiKeyRequest {
            tenant: slug.to_owned(),
            scopes: vec!["billing:read".to_owned()],
            ..Default::default()
        }))
        .await
        .expect("key")
        .into_inner()
        .secret
}

fn usd(nanos: i64) -> Option<Money> {
    Some(Money {
        currency_code: "USD".to_owned(),
        amount_nanos: nanos,
    })
}

fn at(us: i64) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: i32::try_from(us.rem_euclid(1_000_000) * 1000).expect("nanos"),
    })
}

fn price(model: &str, device: &str, from_us: i64, prompt: i64, completion: i64) -> Price {
    Price {
        model: model.to_owned(),
        device_class: device.to_owned(),
        prompt_per_million_tokens: usd(prompt),
        cached_prompt_per_million_tokens: None,
        completion_per_million_tokens: usd(completion),
        per_kwh: None,
        effective_from: at(from_us),
    }
}

async fn put_prices(channel: &Channel, plan: &str, prices: Vec<Price>) {
    BillingClient::new(channel.clone())
        .put_prices(admin(PutPricesRequest {
            plan: plan.to_owned(),
            currency_code: "USD".to_owned(),
            description: "test plan".to_owned(),
            prices,
        }))
        .await
        .expect("put prices");
}

fn event(
    tenant_id: &str,
    request_id: &str,
    model: &str,
    device: &str,
    finished_at_us: i64,
) -> UsageEvent {
    UsageEvent {
        request_id: request_id.to_owned(),
        tenant_id: tenant_id.to_owned(),
        key_id: "0123456789abcdef".to_owned(),
        model: model.to_owned(),
        device_profile: device.to_owned(),
        prompt_tokens: 100,
        cached_prompt_tokens: 0,
        completion_tokens: 10,
        queue_time_us: 100,
        ttft_us: 1000,
        total_time_us: 5000,
        device_time_us: 700,
        energy_mj: 30,
        mean_power_mw: 350_000,
        finish_reason: ascend_gateway::metering::FinishReason::Eos,
        started_at_us: finished_at_us - 5000,
        finished_at_us,
    }
}

/// A tenant `slug` on a new plan of its own (named after it) with one price.
async fn priced_tenant(channel: &Channel, slug: &str, only_price: Price) -> String {
    let plan = format!("{slug}-plan");
    put_prices(channel, &plan, vec![only_price]).await;
    create_tenant(channel, slug, &plan).await
}

/// Records small events (100 prompt, 10 completion tokens on an
/// ascend-910b), one per (tenant, request id, model, finish time).
pub(crate) async fn record(db: &Db, events: &[(&str, &str, &str, i64)]) {
    let events: Vec<UsageEvent> = events
        .iter()
        .map(|(tenant, id, model, at)| event(tenant, id, model, "ascend-910b", *at))
        .collect();
    insert_batch(db, &events).await.expect("insert");
}

/// An admin `PutPrices` of `plan` (in its own currency).
fn prices_request(plan: &str, prices: Vec<Price>) -> tonic::Request<PutPricesRequest> {
    admin(PutPricesRequest {
        plan: plan.to_owned(),
        prices,
        ..Default::default()
    })
}

async fn get_invoice(channel: &Channel, tenant: &str, period: Month) -> Invoice {
    BillingClient::new(channel.clone())
        .get_invoice(admin(GetInvoiceRequest {
            tenant: tenant.to_owned(),
            period: period.to_string(),
            ..Default::default()
        }))
        .await
        .expect("get invoice")
        .into_inner()
}

async fn finalize(channel: &Channel, invoice_id: &str) -> Result<Invoice, tonic::Status> {
    BillingClient::new(channel.clone())
        .finalize_invoice(admin(FinalizeInvoiceRequest {
            invoice_id: invoice_id.to_owned(),
        }))
        .await
        .map(tonic::Response::into_inner)
}

fn total_nanos(invoice: &Invoice) -> i64 {
    invoice.total.as_ref().expect("total").amount_nanos
}

fn line_sum(lines: &[InvoiceLine]) -> i64 {
    lines
        .iter()
        .map(|l| l.amount.as_ref().expect("amount").amount_nanos)
        .sum()
}

/// Every line of an export stream, checking `total_rows` on the first message.
async fn export_lines(
    channel: &Channel,
    token: &str,
    tenant: &str,
    period: Month,
) -> Vec<InvoiceLine> {
    let mut stream = BillingClient::new(channel.clone())
        .export_invoice_lines(authed(
            ExportRequest {
                period: period.to_string(),
                tenant: tenant.to_owned(),
            },
            token,
        ))
        .await
        .expect("export lines")
        .into_inner();
    let mut lines = Vec::new();
    let mut total = None;
    while let Some(message) = stream.message().await.expect("message") {
        if total.is_none() {
            total = Some(
                message
                    .total_rows
                    .expect("first message carries total_rows"),
            );
        } else {
            assert!(
                message.total_rows.is_none(),
                "only the first message has a total"
            );
        }
        lines.extend(message.lines);
    }
    assert_eq!(Some(lines.len() as u64), total);
    lines
}

/// Half-even division, written apart from the gateway's on purpose.
fn half_even(numerator: i128, denominator: i128) -> i128 {
    let (q, r) = (numerator / denominator, numerator % denominator);
    if 2 * r > denominator || (2 * r == denominator && q % 2 == 1) {
        q + 1
    } else {
        q
    }
}

/// The reconciliation test's price list, as the test understands it:
/// (price id, prompt, cache-hit prompt, completion, per kWh) for a model,
/// device and time.
fn test_price(
    model: &str,
    device: &str,
    finished_at_us: i64,
    change_us: i64,
) -> (u8, i64, i64, i64, Option<i64>) {
    match (model, device) {
        ("m-alpha", "ascend-910b") if finished_at_us >= change_us => {
            (1, 70_000_001, 20_000_007, 90_000_003, None)
        }
        ("m-alpha", "ascend-910b") => (0, 80_000_000, 80_000_000, 80_000_000, None),
        ("m-alpha", _) => (2, 140_000_000, 140_000_000, 140_000_000, Some(123_456_789)),
        _ => (3, 33_333_333, 33_333_333, 66_666_667, None),
    }
}

#[tokio::test]
async fn hundred_thousand_events_reconcile_to_the_unit() {
    let (_db, gateway) = pg_gateway().await;
    let channel = gateway.channel.clone();
    let period = months_ago(2);
    let change_us = period.start_us() + 13 * 86_400_000_000 + 12_345;
    let mut alpha_any = price("m-alpha", "", 0, 140_000_000, 140_000_000);
    alpha_any.per_kwh = usd(123_456_789);
    let mut changed = price("m-alpha", "ascend-910b", change_us, 70_000_001, 90_000_003);
    changed.cached_prompt_per_million_tokens = usd(20_000_007);
    put_prices(
        &channel,
        "recon",
        vec![
            price("m-alpha", "ascend-910b", 0, 80_000_000, 80_000_000),
            changed,
            alpha_any,
            price("m-beta", "", 0, 33_333_333, 66_666_667),
        ],
    )
    .await;
    let mut tenants = Vec::new();
    for slug in ["recon-a", "recon-b", "recon-c"] {
        tenants.push(create_tenant(&channel, slug, "recon").await);
    }

    let span = period.end_us() - period.start_us();
    let events: Vec<UsageEvent> = (0..100_000_u64)
        .map(|i| {
            let offset =
                i64::try_from(i.wrapping_mul(7_919_993_437) % u64::try_from(span).expect("span"))
                    .expect("offset");
            let mut e = event(
                &tenants[(i % 3) as usize],
                &format!("recon-{i:06}"),
                ["m-alpha", "m-beta"][((i / 3) % 2) as usize],
                ["ascend-910b", "h100-sxm", "ascend-910c"][((i / 7) % 3) as usize],
                period.start_us() + offset,
            );
            e.prompt_tokens = u32::try_from(1 + (i * 37) % 4000).expect("tokens");
            // Some prompts partly from the prefix cache, some not at all.
            e.cached_prompt_tokens = u32::try_from((i * 29) % 5)
                .expect("small")
                .saturating_mul(e.prompt_tokens / 5);
            e.completion_tokens = u32::try_from((i * 11) % 900).expect("tokens");
            e.energy_mj = 1000 + (i * 13) % 500_000;
            e
        })
        .collect();
    for chunk in events.chunks(5000) {
        assert_eq!(
            insert_batch(&gateway.db, chunk).await.expect("insert").new as usize,
            chunk.len()
        );
    }

    // The expected total of each tenant, priced here from the raw events.
    let mut expected: BTreeMap<&str, i64> = BTreeMap::new();
    for tenant in &tenants {
        let mut quantities: BTreeMap<(&str, &str, u8, u8), (i128, i128)> = BTreeMap::new();
        for e in events.iter().filter(|e| &e.tenant_id == tenant) {
            let (id, prompt, cached, completion, per_kwh) =
                test_price(&e.model, &e.device_profile, e.finished_at_us, change_us);
            let mut add = |kind: u8, quantity: i128, unit: i64| {
                let entry = quantities
                    .entry((e.model.as_str(), e.device_profile.as_str(), id, kind))
                    .or_insert((0, i128::from(unit)));
                entry.0 += quantity;
            };
            add(
                0,
                i128::from(e.prompt_tokens - e.cached_prompt_tokens),
                prompt,
            );
            add(3, i128::from(e.cached_prompt_tokens), cached);
            add(1, i128::from(e.completion_tokens), completion);
            if let Some(per_kwh) = per_kwh {
                add(2, i128::from(e.energy_mj), per_kwh);
            }
        }
        let total: i128 = quantities
            .iter()
            .map(|((_, _, _, kind), (quantity, unit))| {
                let (quantity, per) = if *kind == 2 {
                    (half_even(*quantity, 3_600_000), 1_000)
                } else {
                    (*quantity, 1_000_000)
                };
                half_even(quantity * unit, per * USD_CENT_NANOS) * USD_CENT_NANOS
            })
            .sum();
        expected.insert(tenant, i64::try_from(total).expect("fits"));
    }

    let mut finalized_totals = 0;
    for tenant in &tenants {
        let draft = get_invoice(&channel, tenant, period).await;
        assert_eq!(draft.status(), InvoiceStatus::Draft);
        assert_eq!(
            total_nanos(&draft),
            expected[tenant.as_str()],
            "draft of {tenant}"
        );
        assert_eq!(line_sum(&draft.lines), total_nanos(&draft));
        let split = draft
            .lines
            .iter()
            .filter(|l| {
                l.model == "m-alpha"
                    && l.device_class == "ascend-910b"
                    && l.kind() == LineKind::PromptTokens
            })
            .count();
        assert_eq!(split, 2, "the mid-month price change splits the line");
        let hits = draft
            .lines
            .iter()
            .filter(|l| l.kind() == LineKind::CachedPromptTokens)
            .map(|l| l.unit_price.as_ref().expect("price").amount_nanos)
            .collect::<std::collections::BTreeSet<_>>();
        assert!(
            hits.contains(&20_000_007) && hits.contains(&80_000_000),
            "cache hits are billed on lines of their own, at the cache-hit price where the \
             plan has one and at the prompt price where not: {hits:?}"
        );
        assert!(draft.lines.iter().any(|l| l.kind() == LineKind::Energy));

        let invoice = finalize(&channel, &draft.id).await.expect("finalize");
        assert_eq!(invoice.status(), InvoiceStatus::Finalized);
        assert_eq!(total_nanos(&invoice), expected[tenant.as_str()]);
        assert_eq!(
            invoice.lines, draft.lines,
            "finalizing changes nothing but the status"
        );
        finalized_totals += total_nanos(&invoice);
    }

    let lines = export_lines(&channel, ADMIN_TOKEN, "", period).await;
    assert_eq!(
        line_sum(&lines),
        finalized_totals,
        "exported lines sum to the invoices"
    );
    assert_eq!(
        lines
            .iter()
            .map(|l| l.tenant_id.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        3
    );

    let mut stream = BillingClient::new(channel.clone())
        .export_usage_events(admin(ExportRequest {
            period: period.to_string(),
            tenant: String::new(),
        }))
        .await
        .expect("export events")
        .into_inner();
    let mut exported = 0_u64;
    let mut prompt_tokens = 0_u64;
    let mut first = true;
    let mut last_key = (String::new(), i64::MIN, String::new());
    while let Some(message) = stream.message().await.expect("message") {
        if first {
            assert_eq!(message.total_rows, Some(100_000));
            first = false;
        }
        assert!(message.events.len() <= 5000, "chunks stay small");
        for e in &message.events {
            let key = (
                e.tenant_id.clone(),
                e.finished_at
                    .as_ref()
                    .map_or(0, |t| t.seconds * 1_000_000 + i64::from(t.nanos / 1000)),
                e.request_id.clone(),
            );
            assert!(key > last_key, "keyset order, no repeats");
            last_key = key;
            prompt_tokens += u64::from(e.prompt_tokens);
        }
        exported += message.events.len() as u64;
    }
    assert_eq!(exported, 100_000);
    assert_eq!(
        prompt_tokens,
        events
            .iter()
            .map(|e| u64::from(e.prompt_tokens))
            .sum::<u64>()
    );
}

/// Direct SQL cannot change a finalized invoice, its lines, or any price.
async fn assert_immutable(db: &Db, invoice_id: &str) {
    let statements = [
        format!("UPDATE invoices SET total_nanos = 0 WHERE id = '{invoice_id}'"),
        format!("DELETE FROM invoices WHERE id = '{invoice_id}'"),
        format!("UPDATE invoice_lines SET amount_nanos = 0 WHERE invoice_id = '{invoice_id}'"),
        format!("DELETE FROM invoice_lines WHERE invoice_id = '{invoice_id}'"),
        format!(
            "INSERT INTO invoice_lines (invoice_id, line_number, model, device_class, kind, \
             quantity, unit_price_nanos, amount_nanos, adjusts_period, price_effective_from_us) \
             VALUES ('{invoice_id}', 999, 'm', 'd', 'prompt_tokens', 1, 1, 1, '', 0)"
        ),
        "UPDATE prices SET prompt_per_million_nanos = 0".to_owned(),
        "DELETE FROM prices".to_owned(),
    ];
    for sql in statements {
        let result = sqlx::query(&sql).execute(db.pool()).await;
        assert!(result.is_err(), "the database accepted: {sql}");
    }
}

#[tokio::test]
async fn late_usage_lands_once_as_an_adjustment_on_the_next_invoice() {
    let (_db, gateway) = pg_gateway().await;
    late_usage_flow(&gateway).await;
}

#[tokio::test]
async fn late_usage_lands_once_as_an_adjustment_on_sqlite_too() {
    late_usage_flow(&sqlite_gateway().await).await;
}

/// Finalize a month, record usage of it afterwards, and follow where it is
/// billed; also checks that direct SQL cannot change the finalized invoice.
async fn late_usage_flow(gateway: &TestGateway) {
    let channel = gateway.channel.clone();
    let tenant = priced_tenant(
        &channel,
        "late-co",
        price("m", "", 0, 1_000_000_000, 2_000_000_000),
    )
    .await;
    let (p1, p2, p3) = (months_ago(3), months_ago(2), months_ago(1));
    record(
        &gateway.db,
        &[
            (&tenant, "on-time-1", "m", p1.start_us() + 1000),
            (&tenant, "on-time-2", "m", p2.start_us() + 1000),
        ],
    )
    .await;

    let first = get_invoice(&channel, &tenant, p1).await;
    let first = finalize(&channel, &first.id).await.expect("finalize p1");
    // 100 prompt and 10 completion tokens: two lines that round to 0 cents.
    assert_eq!(first.lines.len(), 2);
    assert_immutable(&gateway.db, &first.id).await;

    let mut late = event(&tenant, "late-1", "m", "ascend-910b", p1.start_us() + 2000);
    late.prompt_tokens = 1_000_000;
    late.completion_tokens = 500_000;
    insert_batch(&gateway.db, &[late])
        .await
        .expect("insert late");

    let first_again = get_invoice(&channel, &tenant, p1).await;
    assert_eq!(
        first_again.lines, first.lines,
        "a finalized invoice never changes"
    );
    assert_eq!(first_again.total, first.total);

    let second = get_invoice(&channel, &tenant, p2).await;
    let adjustments: Vec<&InvoiceLine> = second
        .lines
        .iter()
        .filter(|l| !l.adjusts_period.is_empty())
        .collect();
    assert_eq!(adjustments.len(), 2, "{:?}", second.lines);
    assert!(
        adjustments
            .iter()
            .all(|l| l.adjusts_period == p1.to_string())
    );
    let adjusted: Vec<(u64, i64)> = adjustments
        .iter()
        .map(|l| (l.quantity, l.amount.as_ref().expect("amount").amount_nanos))
        .collect();
    assert_eq!(
        adjusted,
        vec![(1_000_000, 1_000_000_000), (500_000, 1_000_000_000)]
    );
    let third = get_invoice(&channel, &tenant, p3).await;
    assert!(
        third.lines.iter().all(|l| l.adjusts_period.is_empty()),
        "only the next open invoice carries the adjustment"
    );

    let second = finalize(&channel, &second.id).await.expect("finalize p2");
    assert_eq!(
        second
            .lines
            .iter()
            .filter(|l| !l.adjusts_period.is_empty())
            .count(),
        2,
        "finalization keeps the adjustment"
    );
    let third = get_invoice(&channel, &tenant, p3).await;
    assert!(
        third.lines.iter().all(|l| l.adjusts_period.is_empty()),
        "the late event is billed once: {:?}",
        third.lines
    );

    // Later still, after p2 is final: it moves on to p3, still naming p1.
    let mut later = event(&tenant, "late-2", "m", "ascend-910b", p1.start_us() + 3000);
    later.prompt_tokens = 3_000_000;
    insert_batch(&gateway.db, &[later])
        .await
        .expect("insert later");
    let third = get_invoice(&channel, &tenant, p3).await;
    let adjustments: Vec<(String, u64)> = third
        .lines
        .iter()
        .filter(|l| !l.adjusts_period.is_empty() && l.kind() == LineKind::PromptTokens)
        .map(|l| (l.adjusts_period.clone(), l.quantity))
        .collect();
    assert_eq!(adjustments, vec![(p1.to_string(), 3_000_000)]);
    assert_eq!(line_sum(&third.lines), total_nanos(&third));
}

#[tokio::test]
async fn a_mid_month_price_change_splits_lines_on_sqlite() {
    let gateway = sqlite_gateway().await;
    let channel = gateway.channel.clone();
    let period = months_ago(1);
    let change = period.start_us() + 10 * 86_400_000_000;
    put_prices(
        &channel,
        "split",
        vec![
            price("m", "ascend-910b", 0, 1_000_000_000, 2_000_000_000),
            price("m", "ascend-910b", change, 3_000_000_000, 4_000_000_000),
        ],
    )
    .await;
    let tenant = create_tenant(&channel, "split-co", "split").await;
    let times = [
        period.start_us(),
        change - 1,
        change - 86_400_000_000,
        change,
        period.end_us() - 1,
    ];
    let events: Vec<UsageEvent> = times
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut e = event(&tenant, &format!("split-{i}"), "m", "ascend-910b", *t);
            e.prompt_tokens = 100_000;
            e.completion_tokens = 50_000;
            e
        })
        .collect();
    insert_batch(&gateway.db, &events).await.expect("insert");
    let invoice = get_invoice(&channel, &tenant, period).await;
    let lines: Vec<(i64, LineKind, u64, i64, i64)> = invoice
        .lines
        .iter()
        .map(|l| {
            let from = l.price_effective_from.as_ref().expect("from");
            (
                from.seconds * 1_000_000 + i64::from(from.nanos / 1000),
                l.kind(),
                l.quantity,
                l.unit_price.as_ref().expect("unit").amount_nanos,
                l.amount.as_ref().expect("amount").amount_nanos,
            )
        })
        .collect();
    assert_eq!(
        lines,
        vec![
            (
                0,
                LineKind::PromptTokens,
                300_000,
                1_000_000_000,
                300_000_000
            ),
            (
                0,
                LineKind::CompletionTokens,
                150_000,
                2_000_000_000,
                300_000_000
            ),
            (
                change,
                LineKind::PromptTokens,
                200_000,
                3_000_000_000,
                600_000_000
            ),
            (
                change,
                LineKind::CompletionTokens,
                100_000,
                4_000_000_000,
                400_000_000
            ),
        ]
    );
    assert_eq!(total_nanos(&invoice), 1_600_000_000);
    let invoice = finalize(&channel, &invoice.id).await.expect("finalize");
    assert_eq!(total_nanos(&invoice), 1_600_000_000);
    assert_immutable(&gateway.db, &invoice.id).await;
}

#[tokio::test]
async fn a_tenant_sees_only_its_own_billing() {
    let gateway = sqlite_gateway().await;
    let channel = gateway.channel.clone();
    let period = months_ago(1);
    let a = create_tenant(&channel, "iso-a", "standard").await;
    let b = create_tenant(&channel, "iso-b", "standard").await;
    let key_a = billing_key(&channel, "iso-a").await;
    record(
        &gateway.db,
        &[
            (&a, "a-1", "tiny", period.start_us() + 5),
            (&b, "b-1", "tiny", period.start_us() + 5),
        ],
    )
    .await;
    let mut client = BillingClient::new(channel.clone());
    let status = client
        .export_usage_events(authed(
            ExportRequest {
                period: period.to_string(),
                tenant: "iso-b".to_owned(),
            },
            &key_a,
        ))
        .await
        .expect_err("another tenant's events");
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = client
        .export_invoice_lines(authed(
            ExportRequest {
                period: period.to_string(),
                tenant: b.clone(),
            },
            &key_a,
        ))
        .await
        .expect_err("another tenant's lines");
    assert_eq!(status.code(), Code::PermissionDenied);

    assert!(
        export_lines(&channel, &key_a, "", months_ago(2))
            .await
            .is_empty(),
        "an empty export still sends its count (0) first"
    );
    let own = export_lines(&channel, &key_a, "", period).await;
    assert!(!own.is_empty() && own.iter().all(|l| l.tenant_id == a));
    let b_invoice = get_invoice(&channel, &b, period).await;
    let status = client
        .get_invoice(authed(
            GetInvoiceRequest {
                invoice_id: b_invoice.id.clone(),
                ..Default::default()
            },
            &key_a,
        ))
        .await
        .expect_err("another tenant's invoice");
    assert_eq!(status.code(), Code::NotFound);
    let listed = client
        .list_invoices(authed(ListInvoicesRequest::default(), &key_a))
        .await
        .expect("own invoices")
        .into_inner();
    assert!(!listed.invoices.is_empty() && listed.invoices.iter().all(|i| i.tenant_id == a));
    let all = client
        .list_invoices(admin(ListInvoicesRequest {
            period: period.to_string(),
            ..Default::default()
        }))
        .await
        .expect("all invoices")
        .into_inner();
    assert_eq!(all.invoices.len(), 2);
    let status = client
        .finalize_invoice(authed(
            FinalizeInvoiceRequest {
                invoice_id: listed.invoices[0].id.clone(),
            },
            &key_a,
        ))
        .await
        .expect_err("tenants cannot finalize");
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = client
        .put_prices(authed(PutPricesRequest::default(), &key_a))
        .await
        .expect_err("tenants cannot set prices");
    assert_eq!(status.code(), Code::PermissionDenied);
}

fn assert_status(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{:?} lacks {needle:?}",
        status.message()
    );
}

#[tokio::test]
async fn bad_input_is_refused_naming_the_field() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let gateway = TestGateway::start_with(test_settings(&data_dir), data_dir).await;
    let channel = gateway.channel.clone();
    let mut client = BillingClient::new(channel.clone());
    let tenant = create_tenant(&channel, "bad-co", "standard").await;
    let (earlier, current) = (months_ago(1), months_ago(0));
    record(
        &gateway.db,
        &[
            (&tenant, "bad-1", "tiny", earlier.start_us() + 1),
            (&tenant, "bad-2", "tiny", current.start_us() + 1),
        ],
    )
    .await;
    let export = |period: &str| {
        admin(ExportRequest {
            period: period.to_owned(),
            tenant: String::new(),
        })
    };
    assert_status(
        client.export_usage_events(export("2026-13")).await,
        Code::InvalidArgument,
        "invalid `period`",
    );
    assert_status(
        client.export_invoice_lines(export("26-11")).await,
        Code::InvalidArgument,
        "invalid `period`",
    );
    assert_status(
        client.export_usage_events(export("9999-01")).await,
        Code::InvalidArgument,
        "future",
    );

    // The default grace period (3 days) keeps the current month open.
    let open = get_invoice(&channel, &tenant, current).await;
    assert_status(
        finalize(&channel, &open.id).await,
        Code::FailedPrecondition,
        "grace period",
    );
    assert_status(
        finalize(&channel, "inv-nope").await,
        Code::NotFound,
        "inv-nope",
    );

    assert_status(
        client
            .put_prices(prices_request(
                "standard",
                vec![price("tiny", "", current.end_us(), -1, 1)],
            ))
            .await,
        Code::InvalidArgument,
        "prices[0].prompt_per_million_tokens",
    );
    assert_status(
        client
            .put_prices(admin(PutPricesRequest {
                plan: "new-plan".to_owned(),
                currency_code: "XYZ".to_owned(),
                prices: vec![price("tiny", "", 0, 1, 1)],
                ..Default::default()
            }))
            .await,
        Code::InvalidArgument,
        "invalid `currency_code`",
    );
    assert_status(
        client
            .put_prices(prices_request("nowhere", vec![price("tiny", "", 0, 1, 1)]))
            .await,
        Code::NotFound,
        "nowhere",
    );

    // Usage of a model the plan has no price for.
    record(
        &gateway.db,
        &[(&tenant, "bad-3", "unpriced", earlier.start_us() + 9)],
    )
    .await;
    let status = client
        .get_invoice(admin(GetInvoiceRequest {
            tenant: "bad-co".to_owned(),
            period: earlier.to_string(),
            ..Default::default()
        }))
        .await
        .expect_err("no price");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("`unpriced`"),
        "{}",
        status.message()
    );

    // Seeded example prices are listed, marked as examples.
    let plans = client
        .list_price_plans(admin(ListPricePlansRequest {}))
        .await
        .expect("plans")
        .into_inner()
        .plans;
    let standard = plans
        .iter()
        .find(|p| p.name == "standard")
        .expect("standard");
    assert!(standard.description.contains("Example"));
    // Every preset is priced, the default served model included.
    for model in ["tiny", "small", "v4-small"] {
        assert!(
            standard.prices.iter().any(|p| {
                p.model == model
                    && p.device_class == "ascend-910b"
                    && p.prompt_per_million_tokens
                        .as_ref()
                        .is_some_and(|m| m.amount_nanos == 80_000_000)
            }),
            "{model} has an example price"
        );
    }
    assert_eq!(
        ascend_gateway::serving::ModelSettings::default().id,
        "v4-small",
        "the default served model is the one the example plan prices"
    );
}

#[tokio::test]
async fn finalization_goes_in_period_order_and_only_once() {
    let gateway = sqlite_gateway().await;
    let channel = gateway.channel.clone();
    let tenant = create_tenant(&channel, "order-co", "standard").await;
    let (p1, p2) = (months_ago(2), months_ago(1));
    record(&gateway.db, &[(&tenant, "o-1", "tiny", p1.start_us() + 1)]).await;
    let second = get_invoice(&channel, &tenant, p2).await;
    assert_status(
        finalize(&channel, &second.id).await,
        Code::FailedPrecondition,
        &p1.to_string(),
    );
    let first = get_invoice(&channel, &tenant, p1).await;
    finalize(&channel, &first.id).await.expect("first in order");
    assert_status(
        finalize(&channel, &first.id).await,
        Code::FailedPrecondition,
        "already finalized",
    );
    finalize(&channel, &second.id).await.expect("then the next");
    // A price may no longer start inside a finalized month.
    assert_status(
        BillingClient::new(channel.clone())
            .put_prices(prices_request(
                "standard",
                vec![price("tiny", "", p2.start_us(), 1, 1)],
            ))
            .await,
        Code::InvalidArgument,
        "prices[0].effective_from",
    );
}

async fn ascendctl(gateway: &TestGateway, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_ascendctl"))
        .args(args)
        .env("ASCENDCTL_ENDPOINT", format!("http://{}", gateway.addr))
        .env("ASCENDCTL_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .output()
        .await
        .expect("run ascendctl")
}

fn succeeded(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "ascendctl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Rows of a Parquet file as JSON objects keyed by column, then typed.
fn parquet_rows<T: serde::de::DeserializeOwned>(path: &Path) -> Vec<T> {
    use arrow_array::{Array, Int64Array, StringArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let file = std::fs::File::open(path).expect("parquet file");
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .expect("parquet")
        .build()
        .expect("reader");
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.expect("batch");
        for row in 0..batch.num_rows() {
            let mut object = serde_json::Map::new();
            for (i, field) in batch.schema().fields().iter().enumerate() {
                let column = batch.column(i);
                let value = if let Some(text) = column.as_any().downcast_ref::<StringArray>() {
                    serde_json::Value::from(text.value(row))
                } else {
                    let ints = column
                        .as_any()
                        .downcast_ref::<Int64Array>()
                        .expect("text or int64");
                    assert!(!ints.is_null(row));
                    serde_json::Value::from(ints.value(row))
                };
                object.insert(field.name().clone(), value);
            }
            rows.push(
                serde_json::from_value(serde_json::Value::Object(object)).expect("typed row"),
            );
        }
    }
    rows
}

#[tokio::test]
async fn ascendctl_exports_csv_jsonl_and_parquet_that_parse_back_alike() {
    let gateway = sqlite_gateway().await;
    let channel = gateway.channel.clone();
    let period = months_ago(1);
    let tenant = create_tenant(&channel, "export-co", "standard").await;
    let events: Vec<UsageEvent> = (0..2500)
        .map(|i| {
            let device = if i % 3 == 0 {
                "h100-sxm"
            } else {
                "ascend-910b"
            };
            let mut e = event(
                &tenant,
                &format!("exp-{i:05}"),
                ["tiny", "small"][i % 2],
                device,
                period.start_us() + i as i64 * 1000,
            );
            e.prompt_tokens = 1000 + i as u32;
            // A request id with a comma and a quote, to exercise CSV quoting.
            if i == 7 {
                e.request_id = format!("exp-{i:05},\"x\"");
                e.finish_reason = ascend_gateway::metering::FinishReason::Stop;
            }
            e
        })
        .collect();
    insert_batch(&gateway.db, &events).await.expect("insert");
    let invoice = get_invoice(&channel, &tenant, period).await;
    let finalized: serde_json::Value = serde_json::from_str(&succeeded(
        &ascendctl(
            &gateway,
            &["-o", "json", "invoice", "finalize", &invoice.id],
        )
        .await,
    ))
    .expect("json");
    assert_eq!(finalized["status"], "finalized");
    assert_eq!(finalized["total"]["amount_nanos"], total_nanos(&invoice));
    let expected_lines: Vec<LineRecord> = {
        let lines = export_lines(&channel, ADMIN_TOKEN, "export-co", period).await;
        lines
            .iter()
            .map(|l| LineRecord::from(&ascend_gateway::api::line_from_pb(l)))
            .collect()
    };
    assert_eq!(expected_lines.len(), 8, "2 models x 2 devices x 2 kinds");

    let dir = tempfile::tempdir().expect("dir");
    let period_arg = period.to_string();
    let mut parsed: Vec<Vec<LineRecord>> = Vec::new();
    for format in ["csv", "jsonl", "parquet"] {
        let out = dir.path().join(format!("lines.{format}"));
        let out_arg = out.display().to_string();
        succeeded(
            &ascendctl(
                &gateway,
                &[
                    "billing",
                    "export",
                    "--period",
                    &period_arg,
                    "--tenant",
                    "export-co",
                    "--kind",
                    "lines",
                    "--format",
                    format,
                    "--out",
                    &out_arg,
                ],
            )
            .await,
        );
        assert!(!dir.path().join(format!("lines.{format}.partial")).exists());
        let rows: Vec<LineRecord> = match format {
            "csv" => csv::Reader::from_path(&out)
                .expect("csv")
                .deserialize()
                .collect::<Result<_, _>>()
                .expect("csv rows"),
            "jsonl" => std::fs::read_to_string(&out)
                .expect("jsonl")
                .lines()
                .map(|line| serde_json::from_str(line).expect("json line"))
                .collect(),
            _ => parquet_rows(&out),
        };
        parsed.push(rows);
    }
    for rows in &parsed {
        assert_eq!(rows.len(), expected_lines.len());
        for (row, expected) in rows.iter().zip(&expected_lines) {
            assert_eq!(
                (
                    row.invoice_id.as_str(),
                    row.line_number,
                    row.quantity,
                    row.amount_nanos,
                    row.amount.as_str()
                ),
                (
                    expected.invoice_id.as_str(),
                    expected.line_number,
                    expected.quantity,
                    expected.amount_nanos,
                    expected.amount.as_str()
                )
            );
        }
        assert_eq!(rows, &parsed[0], "every format holds the same rows");
    }
    // The CSV's amounts add up to the total `ascendctl invoice show` prints.
    let shown: serde_json::Value = serde_json::from_str(&succeeded(
        &ascendctl(
            &gateway,
            &[
                "-o",
                "json",
                "invoice",
                "show",
                "--tenant",
                "export-co",
                "--period",
                &period_arg,
            ],
        )
        .await,
    ))
    .expect("json");
    let csv_total: i64 = parsed[0].iter().map(|r| r.amount_nanos).sum();
    assert_eq!(shown["total"]["amount_nanos"], csv_total);
    assert_eq!(shown["status"], "finalized");
    let table = succeeded(
        &ascendctl(
            &gateway,
            &[
                "invoice",
                "show",
                "--tenant",
                "export-co",
                "--period",
                &period_arg,
            ],
        )
        .await,
    );
    let total_text = ascend_gateway::billing::money::format_decimal(csv_total, 2);
    assert!(
        table.contains(&format!("Total: {total_text} USD")),
        "{table}"
    );

    for format in ["csv", "parquet"] {
        let out = dir.path().join(format!("events.{format}"));
        let out_arg = out.display().to_string();
        succeeded(
            &ascendctl(
                &gateway,
                &[
                    "billing",
                    "export",
                    "--period",
                    &period_arg,
                    "--kind",
                    "events",
                    "--format",
                    format,
                    "--out",
                    &out_arg,
                ],
            )
            .await,
        );
        let rows: Vec<EventRecord> = if format == "csv" {
            csv::Reader::from_path(&out)
                .expect("csv")
                .deserialize()
                .collect::<Result<_, _>>()
                .expect("rows")
        } else {
            parquet_rows(&out)
        };
        let expected: Vec<EventRecord> = events.iter().map(EventRecord::from).collect();
        assert_eq!(
            rows, expected,
            "{format}: every event, in key order, quoting intact"
        );
    }

    // A failed export leaves neither the file nor its partial.
    let out = dir.path().join("refused.csv");
    let out_arg = out.display().to_string();
    let refused = ascendctl(
        &gateway,
        &[
            "billing", "export", "--period", "2026-13", "--format", "csv", "--out", &out_arg,
        ],
    )
    .await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("invalid `period`"));
    assert!(!out.exists() && !dir.path().join("refused.csv.partial").exists());

    // A new plan in yen through `price put`: whole-yen decimals.
    let yen: serde_json::Value = serde_json::from_str(&succeeded(
        &ascendctl(
            &gateway,
            &[
                "-o",
                "json",
                "price",
                "put",
                "yen-plan",
                "--currency",
                "JPY",
                "--model",
                "tiny",
                "--prompt",
                "15",
                "--completion",
                "30.5",
            ],
        )
        .await,
    ))
    .expect("json");
    assert_eq!(yen["currency_code"], "JPY");
    assert_eq!(
        yen["prices"][0]["prompt_per_million_tokens"]["amount"],
        "15"
    );
    assert_eq!(
        yen["prices"][0]["completion_per_million_tokens"]["amount_nanos"],
        30_500_000_000_i64
    );

    // Other commands in table mode run and show the seeded example prices.
    let prices = succeeded(&ascendctl(&gateway, &["price", "list"]).await);
    assert!(
        prices.contains("ascend-910b") && prices.contains("0.08 USD"),
        "{prices}"
    );
    let list = succeeded(&ascendctl(&gateway, &["invoice", "list", "--tenant", "export-co"]).await);
    assert!(list.contains(&period_arg), "{list}");
    let usage = succeeded(
        &ascendctl(
            &gateway,
            &[
                "-o",
                "json",
                "usage",
                "export-co",
                "--from",
                &ascend_gateway::billing::file::rfc3339_us(period.start_us())
                    .replace(".000000", ""),
                "--to",
                &ascend_gateway::billing::file::rfc3339_us(period.end_us()).replace(".000000", ""),
            ],
        )
        .await,
    );
    let usage: serde_json::Value = serde_json::from_str(&usage).expect("json");
    assert_eq!(usage["total"]["requests"], 2500);
}

/// Usage of a month keeps arriving while the month is finalized: every event
/// is billed exactly once, either on the finalized invoice or as an
/// adjustment on the next one, never on both and never on neither.
#[tokio::test]
async fn usage_racing_finalization_is_billed_exactly_once() {
    let (_db, gateway) = pg_gateway().await;
    racing_flow(&gateway).await;
}

#[tokio::test]
async fn usage_racing_finalization_is_billed_exactly_once_on_sqlite() {
    racing_flow(&sqlite_gateway().await).await;
}

async fn racing_flow(gateway: &TestGateway) {
    let channel = gateway.channel.clone();
    let tenant = priced_tenant(
        &channel,
        "race-co",
        price("m", "", 0, 1_000_000_000, 1_000_000_000),
    )
    .await;
    let (period, next) = (months_ago(2), months_ago(1));
    record(
        &gateway.db,
        &[(&tenant, "race-first", "m", period.start_us())],
    )
    .await;
    let invoice = get_invoice(&channel, &tenant, period).await;

    let writer_db = gateway.db.clone();
    let writer_tenant = tenant.clone();
    let batches_done = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let progress = batches_done.clone();
    let writer = tokio::spawn(async move {
        let mut prompt_tokens = 100_u64;
        for batch in 0..100_u32 {
            let events: Vec<UsageEvent> = (0..20_u32)
                .map(|i| {
                    let mut e = event(
                        &writer_tenant,
                        &format!("race-{batch}-{i}"),
                        "m",
                        "ascend-910b",
                        period.start_us() + i64::from(batch * 20 + i),
                    );
                    e.prompt_tokens = 1 + batch;
                    e
                })
                .collect();
            prompt_tokens += events
                .iter()
                .map(|e| u64::from(e.prompt_tokens))
                .sum::<u64>();
            insert_batch(&writer_db, &events).await.expect("insert");
            progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        prompt_tokens
    });
    // Finalize about a third of the way through the writes.
    while batches_done.load(std::sync::atomic::Ordering::Relaxed) < 30 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let finalized = finalize(&channel, &invoice.id).await.expect("finalize");
    let mut expected = writer.await.expect("writer");
    // However the race went on this machine, some usage of the month is
    // certainly late: this batch is recorded after finalization returned.
    let after: Vec<UsageEvent> = (0..5_u32)
        .map(|i| {
            let mut e = event(
                &tenant,
                &format!("race-after-{i}"),
                "m",
                "ascend-910b",
                period.start_us() + 10_000 + i64::from(i),
            );
            e.prompt_tokens = 7;
            e
        })
        .collect();
    insert_batch(&gateway.db, &after)
        .await
        .expect("insert late");
    expected += 5 * 7;

    let prompt = |lines: &[InvoiceLine], adjusts: &str| -> u64 {
        lines
            .iter()
            .filter(|l| l.kind() == LineKind::PromptTokens && l.adjusts_period == adjusts)
            .map(|l| l.quantity)
            .sum()
    };
    let on_time = prompt(&finalized.lines, "");
    let following = get_invoice(&channel, &tenant, next).await;
    let late = prompt(&following.lines, &period.to_string());
    assert_eq!(on_time + late, expected, "on time {on_time} + late {late}");
    assert!(
        on_time > 100 && late >= 35,
        "usage before finalization is on time, after it late: {on_time} / {late}"
    );
}

/// Whether `amount` nanos is `numerator / 3.6e9` rounded to the nearest
/// nano: the common denominator of per-million-token and per-kWh prices
/// (1e6 tokens; 3.6e9 mJ per kWh).
fn nearest_nano(amount: i64, numerator: i128) -> bool {
    let denominator: i128 = 3_600_000_000;
    (i128::from(amount) * denominator - numerator).abs() * 2 <= denominator
}

#[tokio::test]
async fn answers_quote_their_cost_under_the_tenants_plan() {
    use ascend_gateway::api::pb::v1::inference_client::InferenceClient;
    use ascend_gateway::api::pb::v1::{GenerateRequest, generate_stream_response};

    let gateway = sqlite_gateway().await;
    let channel = &gateway.channel;
    let (prompt_price, completion_price, kwh_price) =
        (500_000_000i64, 1_500_000_000i64, 100_000_000i64);
    let priced = Price {
        per_kwh: usd(kwh_price),
        ..price("tiny", "", 0, prompt_price, completion_price)
    };
    priced_tenant(channel, "quoted", priced).await;
    priced_tenant(channel, "unquoted", price("another-model", "", 0, 1, 1)).await;
    let key = |slug: &'static str| async move {
        TenantAdminClient::new(channel.clone())
            .create_api_key(admin(CreateApiKeyRequest {
                tenant: slug.to_owned(),
                ..Default::default()
            }))
            .await
            .expect("key")
            .into_inner()
            .secret
    };
    let (quoted, unquoted) = (key("quoted").await, key("unquoted").await);
    let request = || GenerateRequest {
        model: "tiny".to_owned(),
        prompt: "How much does this cost?".to_owned(),
        max_tokens: Some(8),
        seed: Some(3),
        ..Default::default()
    };
    let mut inference = InferenceClient::new(channel.clone());

    let usage = inference
        .generate(authed(request(), &quoted))
        .await
        .expect("generate")
        .into_inner()
        .usage
        .expect("usage");
    let cost = usage.cost.clone().expect("a priced model has a cost");
    assert_eq!(cost.currency_code, "USD");
    let numerator = (i128::from(usage.prompt_tokens) * i128::from(prompt_price)
        + i128::from(usage.completion_tokens) * i128::from(completion_price))
        * 3600
        + i128::from(usage.energy_mj) * i128::from(kwh_price);
    assert!(usage.energy_mj > 0, "the emulated device charges energy");
    assert!(
        nearest_nano(cost.amount_nanos, numerator),
        "{cost:?} for {usage:?}"
    );

    let mut stream = inference
        .generate_stream(authed(request(), &quoted))
        .await
        .expect("stream")
        .into_inner();
    let mut streamed = None;
    while let Some(message) = stream.message().await.expect("message") {
        if let Some(generate_stream_response::Event::Complete(done)) = message.event {
            streamed = done.usage;
        }
    }
    let streamed = streamed.expect("a final usage");
    let streamed_cost = streamed.cost.clone().expect("streams quote too");
    let numerator = (i128::from(streamed.prompt_tokens) * i128::from(prompt_price)
        + i128::from(streamed.completion_tokens) * i128::from(completion_price))
        * 3600
        + i128::from(streamed.energy_mj) * i128::from(kwh_price);
    assert!(nearest_nano(streamed_cost.amount_nanos, numerator));

    let unpriced = inference
        .generate(authed(request(), &unquoted))
        .await
        .expect("generate")
        .into_inner()
        .usage
        .expect("usage");
    assert_eq!(unpriced.cost, None, "no price for the model: no quote");
    gateway.stop().await.expect("stop");
}

/// A tenant key sees only its own plan's prices, and its Billing calls have
/// a rate of their own (the admin token's do not).
#[tokio::test]
async fn tenant_keys_see_their_own_plan_and_are_rate_limited() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut settings = test_settings(&data_dir);
    settings.billing.tenant_requests_per_second = 0.5;
    settings.billing.tenant_burst = 3;
    let gateway = TestGateway::start_with(settings, data_dir).await;
    let channel = &gateway.channel;
    let now = ascend_gateway::store::now_us();
    put_prices(
        channel,
        "gold",
        vec![price("tiny", "", now - 1_000_000, 1, 1)],
    )
    .await;
    put_prices(
        channel,
        "silver",
        vec![price("tiny", "", now - 1_000_000, 2, 2)],
    )
    .await;
    create_tenant(channel, "golden", "gold").await;
    let key = billing_key(channel, "golden").await;
    let mut client = BillingClient::new(channel.clone());
    let seen: Vec<String> = client
        .list_price_plans(authed(ListPricePlansRequest {}, &key))
        .await
        .expect("own plan")
        .into_inner()
        .plans
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(seen, ["gold"]);
    let all = client
        .list_price_plans(admin(ListPricePlansRequest {}))
        .await
        .expect("every plan")
        .into_inner()
        .plans
        .len();
    assert!(all >= 2, "{all}");

    // Burst 3, one spent above: two more, then refused with a retry time.
    for _ in 0..2 {
        client
            .list_invoices(authed(ListInvoicesRequest::default(), &key))
            .await
            .expect("within the billing rate");
    }
    let status = client
        .export_usage_events(authed(
            ExportRequest {
                period: months_ago(0).to_string(),
                ..Default::default()
            },
            &key,
        ))
        .await
        .expect_err("over the billing rate");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.metadata().get("retry-after").is_some());
    for _ in 0..10 {
        client
            .list_price_plans(admin(ListPricePlansRequest {}))
            .await
            .expect("the admin token is not limited");
    }
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn an_archived_month_leaves_the_database_and_restores_event_for_event_on_sqlite() {
    archive_flow(&sqlite_gateway().await).await;
}

#[tokio::test]
async fn an_archived_month_leaves_the_database_and_restores_event_for_event_on_postgres() {
    let (_db, gateway) = pg_gateway().await;
    archive_flow(&gateway).await;
}

/// Every column of a month's events, in key order.
async fn month_rows(
    db: &Db,
    period: Month,
) -> Vec<ascend_gateway::billing::archive::ArchivedEvent> {
    sqlx::query_as(
        "SELECT tenant_id, request_id, key_id, model, device_profile, prompt_tokens, \
         cached_prompt_tokens, completion_tokens, queue_time_us, ttft_us, total_time_us, \
         device_time_us, energy_mj, mean_power_mw, finish_reason, started_at_us, finished_at_us, \
         recorded_at_us FROM usage_events WHERE finished_at_us >= $1 AND finished_at_us < $2 \
         ORDER BY tenant_id, finished_at_us, request_id",
    )
    .bind(period.start_us())
    .bind(period.end_us())
    .fetch_all(db.pool())
    .await
    .expect("rows")
}

async fn usage_of(channel: &Channel, tenant: &str, period: Month) -> Vec<(u64, u64)> {
    BillingClient::new(channel.clone())
        .get_usage(admin(ascend_gateway::api::pb::v1::GetUsageRequest {
            tenant: tenant.to_owned(),
            start_time: at(period.start_us()),
            end_time: at(period.end_us()),
            ..Default::default()
        }))
        .await
        .expect("usage")
        .into_inner()
        .buckets
        .iter()
        .map(|b| (b.prompt_tokens, b.completion_tokens))
        .collect()
}

async fn archive_flow(gateway: &TestGateway) {
    let channel = gateway.channel.clone();
    let tenant = priced_tenant(
        &channel,
        "archived-co",
        price("m", "", 0, 1_000_000_000, 2_000_000_000),
    )
    .await;
    let (old, next) = (months_ago(2), months_ago(1));
    let events: Vec<UsageEvent> = (0..1200)
        .map(|i| {
            let mut e = event(
                &tenant,
                &format!("old-{i:04}"),
                "m",
                "ascend-910b",
                old.start_us() + 1000 + i,
            );
            e.prompt_tokens = 100 + i as u32;
            e
        })
        .chain(std::iter::once(event(
            &tenant,
            "next-1",
            "m",
            "ascend-910b",
            next.start_us() + 5,
        )))
        .collect();
    assert_eq!(
        insert_batch(&gateway.db, &events)
            .await
            .expect("insert")
            .new,
        1201
    );
    let period = old.to_string();
    let archive = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ascendctl(gateway, &args).await
    };
    let archive_args = || {
        vec![
            "-o".into(),
            "json".into(),
            "billing".into(),
            "archive".into(),
            "--period".into(),
            period.clone(),
        ]
    };

    // A draft still bills from the raw events: refused, naming why.
    let refused = archive(archive_args()).await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("no finalized invoice"), "{stderr}");

    let invoice = finalize(&channel, &get_invoice(&channel, &tenant, old).await.id)
        .await
        .expect("finalize");
    // A late event of the month sits on the next draft as an adjustment.
    insert_batch(
        &gateway.db,
        &[event(
            &tenant,
            "old-late",
            "m",
            "ascend-910b",
            old.start_us() + 99,
        )],
    )
    .await
    .expect("late");
    let refused = archive(archive_args()).await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("recorded after"), "{stderr}");
    let next_invoice = finalize(&channel, &get_invoice(&channel, &tenant, next).await.id)
        .await
        .expect("finalize the next month, which takes the adjustment");
    assert!(
        next_invoice
            .lines
            .iter()
            .any(|l| !l.adjusts_period.is_empty())
    );

    let before = month_rows(&gateway.db, old).await;
    assert_eq!(before.len(), 1201);
    let usage_before = usage_of(&channel, &tenant, old).await;
    let archived: serde_json::Value =
        serde_json::from_str(&succeeded(&archive(archive_args()).await)).expect("json");
    assert_eq!(archived["events"], 1201);
    let file = std::path::PathBuf::from(archived["file"].as_str().expect("file"));
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(file.with_extension("manifest.json")).expect("manifest"),
    )
    .expect("manifest json");
    let digest: String = {
        use sha2::Digest;
        sha2::Sha256::digest(std::fs::read(&file).expect("archive"))
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    assert_eq!(manifest["sha256"], digest.as_str());
    assert_eq!(archived["sha256"], digest.as_str());

    // Out of the database; the invoice and the rollups unchanged.
    assert!(month_rows(&gateway.db, old).await.is_empty());
    let again = get_invoice(&channel, &tenant, old).await;
    assert_eq!(total_nanos(&again), total_nanos(&invoice));
    assert_eq!(usage_of(&channel, &tenant, old).await, usage_before);
    // Archiving twice is refused.
    assert!(!archive(archive_args()).await.status.success());

    // A replay of an archived record is refused and set aside, not billed
    // again; the batch's other events go in.
    let spool_dir = tempfile::tempdir().expect("spool");
    let spool =
        ascend_gateway::metering::Spool::open(spool_dir.path(), Default::default()).expect("spool");
    let writer = ascend_gateway::metering::UsageWriter::new(spool.clone(), gateway.db.clone(), 100);
    spool.append(&events[7]).await.expect("append the replay");
    spool
        .append(&event(
            &tenant,
            "now-1",
            "m",
            "ascend-910b",
            ascend_gateway::store::now_us(),
        ))
        .await
        .expect("append a new one");
    let report = writer.ship().await.expect("ship");
    assert_eq!((report.inserted, report.refused), (1, 1));
    let set_aside = std::fs::read_dir(spool_dir.path().join("refused"))
        .expect("refused dir")
        .count();
    assert_eq!(set_aside, 1);
    assert!(month_rows(&gateway.db, old).await.is_empty());
    spool.close();

    // Restored: the same events, every column, recorded_at included.
    let restored: serde_json::Value = serde_json::from_str(&succeeded(
        &archive(vec![
            "-o".into(),
            "json".into(),
            "billing".into(),
            "restore".into(),
            "--period".into(),
            period.clone(),
        ])
        .await,
    ))
    .expect("json");
    assert_eq!(restored["events"], 1201);
    assert_eq!(month_rows(&gateway.db, old).await, before);
    assert_eq!(usage_of(&channel, &tenant, old).await, usage_before);
}

#[tokio::test]
async fn the_retention_job_archives_finalized_months_past_the_retention_only() {
    let gateway = sqlite_gateway().await;
    let channel = gateway.channel.clone();
    let tenant = priced_tenant(
        &channel,
        "retained-co",
        price("m", "", 0, 1_000_000_000, 2_000_000_000),
    )
    .await;
    let (p3, p2, p1) = (months_ago(3), months_ago(2), months_ago(1));
    record(
        &gateway.db,
        &[
            (&tenant, "p3", "m", p3.start_us() + 10),
            (&tenant, "p2", "m", p2.start_us() + 10),
            (&tenant, "p1", "m", p1.start_us() + 10),
        ],
    )
    .await;
    for p in [p3, p2] {
        finalize(&channel, &get_invoice(&channel, &tenant, p).await.id)
            .await
            .expect("finalize");
    }
    let dir = tempfile::tempdir().expect("archive dir");
    let archiver =
        ascend_gateway::billing::archive::Archiver::new(gateway.db.clone(), dir.path().to_owned());
    // Two runs on one month at once (two replicas' jobs, or an operator and
    // the job): one archives it, the other is refused; nothing is lost.
    let p3_rows = month_rows(&gateway.db, p3).await;
    let (a, b) = tokio::join!(archiver.archive(p3), archiver.archive(p3));
    assert!(
        a.is_ok() != b.is_ok(),
        "exactly one run archives: {a:?} {b:?}"
    );
    assert!(month_rows(&gateway.db, p3).await.is_empty());
    // Keep one month besides the current: p2 is past it (p3 is done), p1
    // not (and its invoice is a draft anyway).
    archiver.archive_due(1).await;
    assert!(month_rows(&gateway.db, p2).await.is_empty());
    assert_eq!(month_rows(&gateway.db, p1).await.len(), 1);
    let archives = |p: Month| {
        std::fs::read_dir(dir.path())
            .expect("archive dir")
            .filter_map(Result::ok)
            .filter(|f| {
                let name = f.file_name().to_string_lossy().into_owned();
                name.starts_with(&format!("usage-events-{p}-")) && name.ends_with(".parquet")
            })
            .count()
    };
    assert_eq!((archives(p3), archives(p2)), (1, 1));
    // A restored month is left alone by the job (it is being audited).
    archiver.restore(p3).await.expect("restore");
    assert_eq!(month_rows(&gateway.db, p3).await, p3_rows);
    archiver.archive_due(1).await;
    assert_eq!(month_rows(&gateway.db, p3).await, p3_rows);
    assert_eq!(month_rows(&gateway.db, p1).await.len(), 1);
}

#[tokio::test]
async fn archive_and_restore_refuse_a_bad_period_naming_the_field() {
    let gateway = sqlite_gateway().await;
    let mut billing = BillingClient::new(gateway.channel.clone());
    let long = "9".repeat(100_000);
    for bad in [
        "",
        "2026-13",
        "2026-1",
        "26-01",
        "../../etc",
        "2026-01\0",
        long.as_str(),
    ] {
        let archived = billing
            .archive_usage(admin(ascend_gateway::api::pb::v1::ArchiveUsageRequest {
                period: bad.to_owned(),
            }))
            .await
            .expect_err("refused");
        assert_eq!(
            archived.code(),
            Code::InvalidArgument,
            "{bad:.20}: {archived:?}"
        );
        assert!(archived.message().contains("period"), "{archived:?}");
        let restored = billing
            .restore_usage(admin(ascend_gateway::api::pb::v1::RestoreUsageRequest {
                period: bad.to_owned(),
            }))
            .await
            .expect_err("refused");
        assert_eq!(
            restored.code(),
            Code::InvalidArgument,
            "{bad:.20}: {restored:?}"
        );
        assert!(restored.message().contains("period"), "{restored:?}");
    }
    // A month never archived has nothing to restore; the current month
    // cannot be archived.
    let current = Month::of_us(ascend_gateway::store::now_us()).to_string();
    let missing = billing
        .restore_usage(admin(ascend_gateway::api::pb::v1::RestoreUsageRequest {
            period: months_ago(3).to_string(),
        }))
        .await
        .expect_err("nothing archived");
    assert_eq!(missing.code(), Code::NotFound);
    let open = billing
        .archive_usage(admin(ascend_gateway::api::pb::v1::ArchiveUsageRequest {
            period: current,
        }))
        .await
        .expect_err("not over");
    assert_eq!(open.code(), Code::FailedPrecondition);
    assert!(open.message().contains("not over"), "{open:?}");
}
