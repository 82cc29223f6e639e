//! `ascendctl` as a subprocess against a live gateway, in both output modes.

use std::process::Output;

use ascend_gateway::api::pb::v1::ListModelsRequest;
use ascend_gateway::api::pb::v1::inference_client::InferenceClient;
use tonic::Code;

use crate::common::{ADMIN_TOKEN, TestGateway, authed};

async fn ascendctl(gateway: &TestGateway, token: Option<&str>, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ascendctl"));
    command
        .args(args)
        .env("ASCENDCTL_ENDPOINT", format!("http://{}", gateway.addr))
        .env_remove("ASCENDCTL_ADMIN_TOKEN")
        .env("XDG_CONFIG_HOME", "/nonexistent");
    if let Some(token) = token {
        command.env("ASCENDCTL_ADMIN_TOKEN", token);
    }
    command.output().await.expect("run ascendctl")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "ascendctl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn json(output: &Output) -> serde_json::Value {
    serde_json::from_str(&stdout(output)).expect("JSON output")
}

#[tokio::test]
async fn tenant_and_key_commands_in_json_mode() {
    let gateway = TestGateway::start().await;
    let token = Some(ADMIN_TOKEN);
    let created = json(
        &ascendctl(
            &gateway,
            token,
            &[
                "-o", "json", "tenant", "create", "globex", "--rps", "5", "--burst", "10",
            ],
        )
        .await,
    );
    assert_eq!(created["slug"], "globex");
    assert_eq!(created["requests_per_second"], 5.0);
    assert_eq!(created["burst"], 10);

    let updated = json(
        &ascendctl(
            &gateway,
            token,
            &[
                "-o",
                "json",
                "tenant",
                "update",
                "globex",
                "--max-concurrent",
                "3",
                "--cache-scope",
                "shared",
            ],
        )
        .await,
    );
    assert_eq!(updated["max_concurrent_requests"], 3);
    assert_eq!(updated["requests_per_second"], 5.0, "other limits kept");
    assert_eq!(created["cache_scope"], "tenant", "its own cache by default");
    assert_eq!(updated["cache_scope"], "shared");

    let issued =
        json(&ascendctl(&gateway, token, &["-o", "json", "key", "create", "globex"]).await);
    let secret = issued["secret"].as_str().expect("secret").to_owned();
    let key_id = issued["key"]["key_id"].as_str().expect("key id").to_owned();
    InferenceClient::new(gateway.channel.clone())
        .list_models(authed(ListModelsRequest {}, &secret))
        .await
        .expect("the new key works");

    let keys = json(&ascendctl(&gateway, token, &["-o", "json", "key", "list", "globex"]).await);
    assert_eq!(keys["key_id"], key_id.as_str());
    assert!(
        !stdout(&ascendctl(&gateway, token, &["-o", "json", "key", "list", "globex"]).await)
            .contains(&secret)
    );

    json(&ascendctl(&gateway, token, &["-o", "json", "key", "revoke", &key_id]).await);
    let status = InferenceClient::new(gateway.channel.clone())
        .list_models(authed(ListModelsRequest {}, &secret))
        .await
        .expect_err("revoked");
    assert_eq!(status.code(), Code::Unauthenticated);

    let suspended = json(
        &ascendctl(
            &gateway,
            token,
            &["-o", "json", "tenant", "suspend", "globex"],
        )
        .await,
    );
    assert_eq!(suspended["status"], "suspended");
    let audit = json(
        &ascendctl(
            &gateway,
            token,
            &["-o", "json", "audit", "--tenant", "globex"],
        )
        .await,
    );
    let actions: Vec<&str> = audit
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["action"].as_str().expect("action"))
        .collect();
    assert_eq!(
        actions,
        [
            "tenant.create",
            "tenant.update",
            "key.create",
            "key.revoke",
            "tenant.suspend"
        ]
    );
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn table_mode_shows_people_what_they_asked_for() {
    let gateway = TestGateway::start().await;
    let token = Some(ADMIN_TOKEN);
    let out = stdout(
        &ascendctl(
            &gateway,
            token,
            &["tenant", "create", "initech", "--name", "Initech"],
        )
        .await,
    );
    assert!(
        out.contains("initech") && out.contains("Initech") && out.contains("SLUG"),
        "{out}"
    );
    let out = stdout(
        &ascendctl(
            &gateway,
            token,
            &["key", "create", "initech", "--name", "ci"],
        )
        .await,
    );
    assert!(
        out.contains("agw_") && out.contains("only this once"),
        "{out}"
    );
    let out = stdout(&ascendctl(&gateway, token, &["key", "list", "initech"]).await);
    assert!(
        out.contains("KEY ID") && out.contains("ci") && !out.contains("agw_"),
        "{out}"
    );
    let out = stdout(&ascendctl(&gateway, token, &["tenant", "list"]).await);
    assert!(out.contains("initech"), "{out}");
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn errors_say_what_to_check() {
    let gateway = TestGateway::start().await;
    let output = ascendctl(&gateway, None, &["tenant", "list"]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ASCENDCTL_ADMIN_TOKEN"), "{stderr}");

    let output = ascendctl(
        &gateway,
        Some("wrong-token-wrong-token-wrong"),
        &["tenant", "list"],
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("UNAUTHENTICATED"), "{stderr}");
    assert!(
        !stderr.contains("wrong-token"),
        "the token is not echoed: {stderr}"
    );

    let output = ascendctl(&gateway, Some(ADMIN_TOKEN), &["tenant", "create", "x"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("INVALID_ARGUMENT") && stderr.contains("slug"),
        "{stderr}"
    );

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_ascendctl"))
        .args(["--endpoint", "http://127.0.0.1:1", "health"])
        .output()
        .await
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot reach the gateway"), "{stderr}");
    gateway.stop().await.expect("clean stop");
}

#[tokio::test]
async fn completions_are_generated() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_ascendctl"))
        .args(["completions", "bash"])
        .output()
        .await
        .expect("run");
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("ascendctl"));
}

#[tokio::test]
async fn a_cache_hit_price_above_the_prompt_price_is_kept_with_a_warning() {
    let gateway = TestGateway::start().await;
    let put = |price: &'static str| {
        let gateway = &gateway;
        let cached = format!("--cached-prompt={price}");
        async move {
            ascendctl(
                gateway,
                Some(ADMIN_TOKEN),
                &[
                    "-o",
                    "json",
                    "price",
                    "put",
                    "cachey",
                    "--currency",
                    "USD",
                    "--model",
                    "tiny",
                    "--prompt",
                    "0.05",
                    "--completion",
                    "0.10",
                    &cached,
                ],
            )
            .await
        }
    };
    let above = put("0.08").await;
    let plan = json(&above);
    assert_eq!(
        plan["prices"][0]["cached_prompt_per_million_tokens"]["amount_nanos"], 80_000_000,
        "{plan}"
    );
    let warning = String::from_utf8_lossy(&above.stderr);
    assert!(
        warning.contains("warning") && warning.contains("--cached-prompt"),
        "{warning}"
    );
    let below = put("0.01").await;
    assert!(
        String::from_utf8_lossy(&below.stderr).is_empty(),
        "no warning below the prompt price"
    );
    let negative = put("-0.01").await;
    assert!(!negative.status.success(), "a negative price is refused");
    let message = String::from_utf8_lossy(&negative.stderr);
    assert!(message.contains("cached"), "{message}");
    gateway.stop().await.expect("stop");
}

/// The operator's path to a budget: set it with `--monthly-budget`, read it
/// back, see the balance; a malformed amount fails before any RPC, a
/// negative one is refused by the gateway naming the field.
#[tokio::test]
async fn monthly_budgets_from_the_command_line() {
    let gateway = TestGateway::start().await;
    let token = Some(ADMIN_TOKEN);
    let tenant = json(
        &ascendctl(
            &gateway,
            token,
            &[
                "-o",
                "json",
                "tenant",
                "create",
                "budgeted",
                "--monthly-budget",
                "250.00",
            ],
        )
        .await,
    );
    assert_eq!(tenant["monthly_budget"]["amount"], "250.00", "{tenant}");
    assert_eq!(
        tenant["monthly_budget"]["currency_code"], "USD",
        "the plan's currency"
    );
    assert_eq!(
        tenant["monthly_budget"]["amount_nanos"],
        250_000_000_000_i64
    );
    let updated = json(
        &ascendctl(
            &gateway,
            token,
            &[
                "-o",
                "json",
                "tenant",
                "update",
                "budgeted",
                "--monthly-budget",
                "400.5 usd",
            ],
        )
        .await,
    );
    assert_eq!(updated["monthly_budget"]["amount"], "400.50", "{updated}");

    let balance = json(
        &ascendctl(
            &gateway,
            token,
            &["-o", "json", "billing", "balance", "--tenant", "budgeted"],
        )
        .await,
    );
    assert_eq!(balance["monthly_budget"]["amount"], "400.50", "{balance}");
    assert_eq!(
        balance["remaining"]["amount"], "400.50",
        "nothing spent yet: {balance}"
    );
    assert_eq!(balance["is_available"], true);
    let table = stdout(
        &ascendctl(
            &gateway,
            token,
            &["billing", "balance", "--tenant", "budgeted"],
        )
        .await,
    );
    assert!(table.contains("400.50 USD"), "{table}");

    let output = ascendctl(
        &gateway,
        token,
        &["tenant", "update", "budgeted", "--monthly-budget", "lots"],
    )
    .await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--monthly-budget"), "{stderr}");
    let output = ascendctl(
        &gateway,
        token,
        &["tenant", "update", "budgeted", "--monthly-budget", "-5"],
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("INVALID_ARGUMENT")
            && stderr.contains("limits.monthly_budget.amount_nanos"),
        "{stderr}"
    );
    let cleared = json(
        &ascendctl(
            &gateway,
            token,
            &[
                "-o",
                "json",
                "tenant",
                "update",
                "budgeted",
                "--clear-limit",
                "monthly_budget",
            ],
        )
        .await,
    );
    assert!(cleared["monthly_budget"].is_null(), "{cleared}");
    gateway.stop().await.expect("clean stop");
}

/// Per-key limits from the command line: set at creation, changed and
/// cleared with `key update`, shown by `key list`.
#[tokio::test]
async fn key_limits_from_the_command_line() {
    let gateway = TestGateway::start().await;
    let token = Some(ADMIN_TOKEN);
    stdout(&ascendctl(&gateway, token, &["tenant", "create", "keyed"]).await);
    let issued = json(
        &ascendctl(
            &gateway,
            token,
            &[
                "-o",
                "json",
                "key",
                "create",
                "keyed",
                "--rps",
                "2",
                "--burst",
                "4",
                "--monthly-budget",
                "1.50",
            ],
        )
        .await,
    );
    let key = &issued["key"];
    assert_eq!(key["requests_per_second"], 2.0, "{issued}");
    assert_eq!(key["burst"], 4);
    assert_eq!(key["monthly_budget"]["amount"], "1.50");
    let key_id = key["key_id"].as_str().expect("key id").to_owned();
    let updated = json(
        &ascendctl(
            &gateway,
            token,
            &[
                "-o",
                "json",
                "key",
                "update",
                &key_id,
                "--max-concurrent",
                "3",
                "--clear-limit",
                "monthly_budget",
            ],
        )
        .await,
    );
    assert_eq!(updated["max_concurrent_requests"], 3, "{updated}");
    assert_eq!(updated["requests_per_second"], 2.0, "kept: {updated}");
    assert!(updated["monthly_budget"].is_null(), "{updated}");
    let table = stdout(&ascendctl(&gateway, token, &["key", "list", "keyed"]).await);
    assert!(table.contains("2 rps (burst 4), 3 at once"), "{table}");
    let output = ascendctl(
        &gateway,
        token,
        &["key", "update", &key_id, "--monthly-quota", "100"],
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("limits.monthly_token_quota"),
        "{stderr}"
    );
    gateway.stop().await.expect("clean stop");
}

/// Operators from the command line: created with a role (the token shown
/// once), listed, used as the admin token, named in the audit log, revoked.
#[tokio::test]
async fn operators_from_the_command_line() {
    let gateway = TestGateway::start().await;
    let token = Some(ADMIN_TOKEN);
    let created = json(
        &ascendctl(
            &gateway,
            token,
            &[
                "-o", "json", "operator", "create", "vera", "--role", "viewer",
            ],
        )
        .await,
    );
    assert_eq!(created["operator"]["role"], "viewer", "{created}");
    let vera = created["token"].as_str().expect("token").to_owned();
    assert!(vera.starts_with("agwop_"), "{vera}");
    let listed = stdout(&ascendctl(&gateway, token, &["operator", "list"]).await);
    assert!(
        listed.contains("vera") && listed.contains("viewer"),
        "{listed}"
    );
    // The viewer's token works for reads and is refused for changes.
    stdout(&ascendctl(&gateway, Some(&vera), &["tenant", "list"]).await);
    let output = ascendctl(&gateway, Some(&vera), &["tenant", "create", "by-vera"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("PERMISSION_DENIED"),
        "{stderr}"
    );
    let audit = stdout(&ascendctl(&gateway, Some(&vera), &["audit"]).await);
    assert!(audit.contains("operator:bootstrap"), "{audit}");
    stdout(&ascendctl(&gateway, token, &["operator", "revoke", "vera"]).await);
    let output = ascendctl(&gateway, Some(&vera), &["tenant", "list"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("UNAUTHENTICATED"), "{stderr}");
    gateway.stop().await.expect("clean stop");
}
