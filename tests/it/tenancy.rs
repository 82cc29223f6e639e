//! Tenants, keys and authentication over real gRPC, on SQLite and PostgreSQL.

use ascend_gateway::api::pb::v1::inference_client::InferenceClient;
use ascend_gateway::api::pb::v1::tenant_admin_client::TenantAdminClient;
use ascend_gateway::api::pb::v1::{
    CreateApiKeyRequest, CreateTenantRequest, DeleteTenantRequest, GetTenantRequest,
    ListApiKeysRequest, ListAuditEventsRequest, ListModelsRequest, ListTenantsRequest,
    ResumeTenantRequest, RevokeApiKeyRequest, RotateApiKeyRequest, SuspendTenantRequest,
    TenantLimits, UpdateTenantRequest,
};
use sqlx::Row;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::{PgTestDb, TestGateway, admin, authed, test_settings};

async fn create_tenant(channel: &Channel, slug: &str) -> String {
    let request = CreateTenantRequest {
        slug: slug.to_owned(),
        display_name: format!("{slug} Inc."),
        ..Default::default()
    };
    crate::common::create_tenant(channel, request).await
}

async fn create_key(channel: &Channel, tenant: &str, scopes: &[&str]) -> (String, String) {
    let response = TenantAdminClient::new(channel.clone())
        .create_api_key(admin(CreateApiKeyRequest {
            tenant: tenant.to_owned(),
            name: "test".to_owned(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            expires_at: None,
            limits: None,
        }))
        .await
        .expect("create key")
        .into_inner();
    (response.key.expect("key").key_id, response.secret)
}

async fn list_models(channel: &Channel, key: &str) -> Result<(), tonic::Status> {
    InferenceClient::new(channel.clone())
        .list_models(authed(ListModelsRequest {}, key))
        .await
        .map(|_| ())
}

fn code_of(result: Result<(), tonic::Status>) -> Code {
    match result {
        Ok(()) => Code::Ok,
        Err(status) => status.code(),
    }
}

async fn key_lifecycle(gateway: &TestGateway) {
    let channel = &gateway.channel;
    create_tenant(channel, "acme").await;
    let (key_id, secret) = create_key(channel, "acme", &[]).await;
    assert!(secret.starts_with(&format!("agw_{key_id}_")));
    assert_eq!(code_of(list_models(channel, &secret).await), Code::Ok);

    let rows = sqlx::query("SELECT * FROM api_keys")
        .fetch_all(gateway.db.pool())
        .await
        .expect("read keys");
    assert_eq!(rows.len(), 1);
    let secret_part = secret.rsplit('_').next().expect("secret part");
    for index in 0..rows[0].len() {
        let value: Option<String> = rows[0].try_get(index).unwrap_or(None);
        if let Some(value) = value {
            assert!(
                !value.contains(secret_part),
                "column {index} holds the secret"
            );
        }
    }

    let mut admin_client = TenantAdminClient::new(channel.clone());
    admin_client
        .revoke_api_key(admin(RevokeApiKeyRequest {
            key_id: key_id.clone(),
        }))
        .await
        .expect("revoke");
    let status = list_models(channel, &secret)
        .await
        .expect_err("revoked key");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("revoked"), "{status:?}");
    assert!(!status.message().contains(secret_part));

    let keys = admin_client
        .list_api_keys(admin(ListApiKeysRequest {
            tenant: "acme".to_owned(),
            include_revoked: true,
            ..Default::default()
        }))
        .await
        .expect("list keys")
        .into_inner()
        .keys;
    assert_eq!(keys.len(), 1);
    assert!(keys[0].revoked_at.is_some());
}

#[tokio::test]
async fn key_lifecycle_on_sqlite() {
    let gateway = TestGateway::start().await;
    key_lifecycle(&gateway).await;
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn key_lifecycle_on_postgres() {
    let test_db = PgTestDb::create().await;
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut settings = test_settings(&data_dir);
    settings.database.url = Some(test_db.secret_url());
    let gateway = TestGateway::start_with(settings, data_dir).await;
    key_lifecycle(&gateway).await;
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn rotation_keeps_the_old_secret_for_the_overlap_only() {
    let gateway = TestGateway::start().await;
    let channel = &gateway.channel;
    create_tenant(channel, "rotating").await;
    let (key_id, first) = create_key(channel, "rotating", &[]).await;
    let mut admin_client = TenantAdminClient::new(channel.clone());

    let rotated = admin_client
        .rotate_api_key(admin(RotateApiKeyRequest {
            key_id: key_id.clone(),
            overlap_seconds: Some(3600),
        }))
        .await
        .expect("rotate")
        .into_inner();
    let second = rotated.secret;
    assert_eq!(
        rotated.key.expect("key").key_id,
        key_id,
        "public id is stable"
    );
    assert_ne!(first, second);
    assert_eq!(
        code_of(list_models(channel, &first).await),
        Code::Ok,
        "old works in overlap"
    );
    assert_eq!(code_of(list_models(channel, &second).await), Code::Ok);

    let third = admin_client
        .rotate_api_key(admin(RotateApiKeyRequest {
            key_id: key_id.clone(),
            overlap_seconds: Some(0),
        }))
        .await
        .expect("rotate without overlap")
        .into_inner()
        .secret;
    assert_eq!(
        code_of(list_models(channel, &first).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code_of(list_models(channel, &second).await),
        Code::Unauthenticated
    );
    assert_eq!(code_of(list_models(channel, &third).await), Code::Ok);
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn credentials_are_checked_per_service() {
    let gateway = TestGateway::start().await;
    let channel = &gateway.channel;
    create_tenant(channel, "scoped").await;
    let (_, inference_key) = create_key(channel, "scoped", &["inference"]).await;
    let (_, billing_key) = create_key(channel, "scoped", &["billing:read"]).await;
    let mut admin_client = TenantAdminClient::new(channel.clone());

    let status = admin_client
        .list_tenants(authed(ListTenantsRequest::default(), &inference_key))
        .await
        .expect_err("tenant key on an admin RPC");
    assert_eq!(status.code(), Code::PermissionDenied);

    let status = admin_client
        .list_tenants(ListTenantsRequest::default())
        .await
        .expect_err("no credentials");
    assert_eq!(status.code(), Code::Unauthenticated);

    for garbage in ["Bearer nonsense", "Basic dXNlcjpwYXNz", "Bearer agw_zz_zz"] {
        let mut request = tonic::Request::new(ListModelsRequest {});
        request
            .metadata_mut()
            .insert("authorization", garbage.parse().expect("ascii"));
        let status = InferenceClient::new(channel.clone())
            .list_models(request)
            .await
            .expect_err("garbage credentials");
        assert_eq!(status.code(), Code::Unauthenticated, "{garbage}");
    }

    assert_eq!(
        code_of(list_models(channel, &billing_key).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code_of(list_models(channel, crate::common::ADMIN_TOKEN).await),
        Code::PermissionDenied,
        "the admin token is not a tenant"
    );
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn suspension_and_deletion_stop_keys_at_once() {
    let gateway = TestGateway::start().await;
    let channel = &gateway.channel;
    create_tenant(channel, "fickle").await;
    let (_, key) = create_key(channel, "fickle", &[]).await;
    let mut admin_client = TenantAdminClient::new(channel.clone());
    assert_eq!(
        code_of(list_models(channel, &key).await),
        Code::Ok,
        "warms the cache"
    );

    admin_client
        .suspend_tenant(admin(SuspendTenantRequest {
            tenant: "fickle".to_owned(),
            reason: "unpaid invoice".to_owned(),
        }))
        .await
        .expect("suspend");
    assert_eq!(
        code_of(list_models(channel, &key).await),
        Code::PermissionDenied
    );

    admin_client
        .resume_tenant(admin(ResumeTenantRequest {
            tenant: "fickle".to_owned(),
        }))
        .await
        .expect("resume");
    assert_eq!(code_of(list_models(channel, &key).await), Code::Ok);

    admin_client
        .delete_tenant(admin(DeleteTenantRequest {
            tenant: "fickle".to_owned(),
        }))
        .await
        .expect("delete");
    assert_eq!(
        code_of(list_models(channel, &key).await),
        Code::Unauthenticated
    );
    let status = admin_client
        .resume_tenant(admin(ResumeTenantRequest {
            tenant: "fickle".to_owned(),
        }))
        .await
        .expect_err("deleted is terminal");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let tenant = admin_client
        .get_tenant(admin(GetTenantRequest {
            tenant: "fickle".to_owned(),
        }))
        .await
        .expect("a deleted tenant stays readable")
        .into_inner();
    assert_eq!(tenant.status, 3);
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn every_change_is_audited_and_the_log_is_append_only() {
    let gateway = TestGateway::start().await;
    let channel = &gateway.channel;
    let tenant_id = create_tenant(channel, "audited").await;
    let (key_id, _) = create_key(channel, "audited", &[]).await;
    let mut admin_client = TenantAdminClient::new(channel.clone());
    admin_client
        .update_tenant(admin(UpdateTenantRequest {
            tenant: "audited".to_owned(),
            scheduling_weight: Some(3),
            ..Default::default()
        }))
        .await
        .expect("update");
    admin_client
        .revoke_api_key(admin(RevokeApiKeyRequest { key_id }))
        .await
        .expect("revoke");
    let events = admin_client
        .list_audit_events(admin(ListAuditEventsRequest {
            tenant: "audited".to_owned(),
            ..Default::default()
        }))
        .await
        .expect("audit")
        .into_inner()
        .events;
    let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        ["tenant.create", "key.create", "tenant.update", "key.revoke"]
    );
    assert!(events.iter().all(|e| e.actor == "operator:bootstrap"));
    assert!(events[2].before_json.contains("\"scheduling_weight\":1"));
    assert!(events[2].after_json.contains("\"scheduling_weight\":3"));
    assert!(events.iter().all(|e| !e.after_json.contains("secret")));

    let tamper = sqlx::query("UPDATE admin_audit_log SET actor = 'mallory' WHERE tenant_id = $1")
        .bind(&tenant_id)
        .execute(gateway.db.pool())
        .await;
    assert!(tamper.is_err(), "the database refuses to rewrite history");
    let erase = sqlx::query("DELETE FROM admin_audit_log")
        .execute(gateway.db.pool())
        .await;
    assert!(erase.is_err(), "the database refuses to erase history");
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn bad_admin_input_is_refused_naming_the_field() {
    let gateway = TestGateway::start().await;
    let channel = &gateway.channel;
    create_tenant(channel, "dupe").await;
    let mut admin_client = TenantAdminClient::new(channel.clone());

    let status = admin_client
        .create_tenant(admin(CreateTenantRequest {
            slug: "dupe".to_owned(),
            ..Default::default()
        }))
        .await
        .expect_err("duplicate slug");
    assert_eq!(status.code(), Code::AlreadyExists);

    let cases: Vec<(CreateTenantRequest, &str)> = vec![
        (
            CreateTenantRequest {
                slug: "Bad Slug".to_owned(),
                ..Default::default()
            },
            "slug",
        ),
        (
            CreateTenantRequest {
                slug: "burst-zero".to_owned(),
                limits: Some(TenantLimits {
                    requests_per_second: Some(10.0),
                    burst: Some(0),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "limits.burst",
        ),
        (
            CreateTenantRequest {
                slug: "negative-rate".to_owned(),
                limits: Some(TenantLimits {
                    requests_per_second: Some(-1.0),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "limits.requests_per_second",
        ),
        (
            CreateTenantRequest {
                slug: "zero-concurrency".to_owned(),
                limits: Some(TenantLimits {
                    max_concurrent_requests: Some(0),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "limits.max_concurrent_requests",
        ),
        (
            CreateTenantRequest {
                slug: "no-such-plan".to_owned(),
                price_plan: "platinum".to_owned(),
                ..Default::default()
            },
            "price_plan",
        ),
    ];
    for (request, field) in cases {
        let status = admin_client
            .create_tenant(admin(request))
            .await
            .expect_err("invalid tenant");
        assert_eq!(status.code(), Code::InvalidArgument, "{field}");
        assert!(
            status.message().contains(field),
            "{field}: {}",
            status.message()
        );
    }

    let status = admin_client
        .list_tenants(admin(ListTenantsRequest {
            page_token: "not-a-token".to_owned(),
            ..Default::default()
        }))
        .await
        .expect_err("bad page token");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("page_token"));

    let status = admin_client
        .create_api_key(admin(CreateApiKeyRequest {
            tenant: "dupe".to_owned(),
            scopes: vec!["root".to_owned()],
            ..Default::default()
        }))
        .await
        .expect_err("unknown scope");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("scopes"));
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn tenants_page_through_in_creation_order() {
    let gateway = TestGateway::start().await;
    let channel = &gateway.channel;
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(create_tenant(channel, &format!("paged-{i}")).await);
    }
    let mut admin_client = TenantAdminClient::new(channel.clone());
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin_client
            .list_tenants(admin(ListTenantsRequest {
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            }))
            .await
            .expect("page")
            .into_inner();
        assert!(page.tenants.len() <= 2);
        seen.extend(page.tenants.into_iter().map(|t| t.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, created);
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn an_oversized_header_gets_a_clean_error_and_the_server_lives_on() {
    let gateway = TestGateway::start().await;
    let huge = format!("Bearer {}", "x".repeat(10 * 1024 * 1024));
    let mut request = tonic::Request::new(ListModelsRequest {});
    request
        .metadata_mut()
        .insert("authorization", huge.parse().expect("ascii"));
    let result = InferenceClient::new(gateway.channel.clone())
        .list_models(request)
        .await;
    assert!(result.is_err(), "a 10 MB header is refused");

    let fresh = Channel::from_shared(format!("http://{}", gateway.addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("server still accepts connections");
    let status = InferenceClient::new(fresh)
        .list_models(ListModelsRequest {})
        .await
        .expect_err("no credentials");
    assert_eq!(status.code(), Code::Unauthenticated);
    gateway.stop().await.expect("clean stop");
}

/// Eight operators writing at once for ten seconds on the embedded SQLite
/// default: every tenant, key and update lands (it used to fail a third of
/// them with `database is locked`), while the gateway keeps serving keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_admin_writes_on_sqlite_all_succeed() {
    let gateway = TestGateway::start().await;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut writers = Vec::new();
    for writer in 0..8 {
        let channel = gateway.channel.clone();
        writers.push(tokio::spawn(async move {
            let mut client = TenantAdminClient::new(channel.clone());
            let (mut done, mut failures) = (0u32, Vec::new());
            while std::time::Instant::now() < until {
                let slug = format!("writer-{writer}-{done}");
                let step = async {
                    client
                        .create_tenant(admin(CreateTenantRequest {
                            slug: slug.clone(),
                            display_name: "Concurrent".to_owned(),
                            ..Default::default()
                        }))
                        .await?;
                    client
                        .create_api_key(admin(CreateApiKeyRequest {
                            tenant: slug.clone(),
                            name: "k".to_owned(),
                            ..Default::default()
                        }))
                        .await?;
                    client
                        .update_tenant(admin(UpdateTenantRequest {
                            tenant: slug.clone(),
                            display_name: Some("Renamed".to_owned()),
                            ..Default::default()
                        }))
                        .await?;
                    Ok::<_, tonic::Status>(())
                };
                if let Err(status) = step.await {
                    failures.push(format!("{slug}: {:?} {}", status.code(), status.message()));
                }
                done += 1;
            }
            (done, failures)
        }));
    }
    let mut total = 0;
    for writer in writers {
        let (done, failures) = writer.await.expect("writer");
        assert!(failures.is_empty(), "{failures:?}");
        total += done;
    }
    assert!(total >= 8, "every writer finished at least one round");
    let row = sqlx::query("SELECT COUNT(*) AS n FROM tenants WHERE slug LIKE 'writer-%'")
        .fetch_one(gateway.db.pool())
        .await
        .expect("count");
    assert_eq!(row.get::<i64, _>("n"), i64::from(total));
    gateway.stop().await.expect("clean stop");
}

/// A slug shaped like another tenant's id is refused, and lookups keep ids
/// and slugs apart; names cannot carry bidirectional overrides.
#[tokio::test]
async fn slugs_cannot_impersonate_ids_and_names_cannot_reorder_text() {
    let gateway = TestGateway::start().await;
    let channel = &gateway.channel;
    let beta_id = create_tenant(channel, "beta").await;
    let mut client = TenantAdminClient::new(channel.clone());
    for slug in [beta_id.clone(), beta_id.replace('-', "")] {
        let status = client
            .create_tenant(admin(CreateTenantRequest {
                slug: slug.clone(),
                display_name: "Impostor".to_owned(),
                ..Default::default()
            }))
            .await
            .expect_err("a slug in the id format");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("slug"), "{}", status.message());
    }
    // A slug that is an id of nobody finds nothing, even if a tenant's slug
    // once looked like it (the lookup by id never reads slugs).
    sqlx::query("UPDATE tenants SET slug = $1 WHERE id = $2")
        .bind("00000000-0000-7000-8000-000000000000")
        .bind(&beta_id)
        .execute(gateway.db.pool())
        .await
        .expect("plant a legacy slug");
    let status = client
        .get_tenant(admin(GetTenantRequest {
            tenant: "00000000-0000-7000-8000-000000000000".to_owned(),
        }))
        .await
        .expect_err("ids are looked up as ids");
    assert_eq!(status.code(), Code::NotFound);
    let found = client
        .get_tenant(admin(GetTenantRequest {
            tenant: beta_id.clone(),
        }))
        .await
        .expect("by id")
        .into_inner();
    assert_eq!(found.id, beta_id);

    for (field, request) in [
        (
            "display_name",
            CreateTenantRequest {
                slug: "gamma".to_owned(),
                display_name: "Gamma \u{202E}cod.exe".to_owned(),
                ..Default::default()
            },
        ),
        (
            "display_name",
            CreateTenantRequest {
                slug: "delta".to_owned(),
                display_name: "\u{2067}Delta".to_owned(),
                ..Default::default()
            },
        ),
    ] {
        let status = client
            .create_tenant(admin(request))
            .await
            .expect_err("bidi control");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains(field), "{}", status.message());
    }
    let status = client
        .suspend_tenant(admin(SuspendTenantRequest {
            tenant: beta_id,
            reason: "overdue\u{202E}".to_owned(),
        }))
        .await
        .expect_err("bidi control in a reason");
    assert!(status.message().contains("reason"), "{}", status.message());
    gateway.stop().await.expect("clean stop");
}

/// A bad API key gets one answer whether its id exists or not, and an
/// address that keeps failing is throttled (admin-token guessing included),
/// counted in the metrics by kind.
#[tokio::test]
async fn bad_credentials_tell_nothing_and_guessers_are_throttled() {
    let dir = tempfile::tempdir().expect("dir");
    let mut settings = test_settings(&dir);
    settings.auth.failed_auth_burst = 5;
    settings.auth.failed_auth_per_minute = 60;
    let gateway = TestGateway::start_with(settings, dir).await;
    let channel = &gateway.channel;
    create_tenant(channel, "oracle").await;
    let (key_id, secret) = create_key(channel, "oracle", &[]).await;
    // A known id with a wrong secret, and an unknown id: same message.
    let flip = |c: char| if c == 'a' { 'b' } else { 'a' };
    let mut wrong_secret = secret.clone();
    let last = wrong_secret.pop().expect("non-empty");
    wrong_secret.push(flip(last));
    let unknown_id = secret.replacen(&key_id, &"0".repeat(key_id.len()), 1);
    assert_ne!(unknown_id, secret);
    let answer = |key: String| async move {
        InferenceClient::new(channel.clone())
            .list_models(authed(ListModelsRequest {}, &key))
            .await
            .expect_err("bad key")
    };
    let (a, b) = (answer(wrong_secret).await, answer(unknown_id).await);
    assert_eq!(a.code(), Code::Unauthenticated);
    assert_eq!((a.code(), a.message()), (b.code(), b.message()));
    assert!(!a.message().contains(&key_id), "{}", a.message());

    // Two failures of a budget of 5 so far: three more, then throttled, even
    // with the right admin token.
    let mut admin_client = TenantAdminClient::new(channel.clone());
    let mut codes = Vec::new();
    for _ in 0..4 {
        let status = admin_client
            .list_tenants(authed(
                ListTenantsRequest::default(),
                "not-the-admin-token-at-all",
            ))
            .await
            .expect_err("wrong admin token");
        codes.push(status.code());
    }
    assert_eq!(
        codes,
        [
            Code::Unauthenticated,
            Code::Unauthenticated,
            Code::Unauthenticated,
            Code::ResourceExhausted
        ]
    );
    let throttled = admin_client
        .list_tenants(admin(ListTenantsRequest::default()))
        .await
        .expect_err("the address is throttled");
    assert_eq!(throttled.code(), Code::ResourceExhausted);
    assert!(throttled.metadata().get("retry-after").is_some());
    let body = crate::common::scrape(gateway.metrics_addr).await;
    let count = |kind: &str| {
        body.lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "ascend_gateway_auth_failures_total{{kind=\"{kind}\"}} "
                ))
            })
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {kind} count in {body}"))
    };
    assert_eq!(count("invalid_key"), 2.0);
    assert_eq!(count("invalid_token"), 3.0);
    assert_eq!(count("throttled"), 2.0);
    // The budget refills: one attempt a second.
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    admin_client
        .list_tenants(admin(ListTenantsRequest::default()))
        .await
        .expect("served again once the budget refilled");
    gateway.stop().await.expect("clean stop");
}
