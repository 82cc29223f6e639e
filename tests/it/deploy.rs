//! The operator files under `deploy/`: every metric the Grafana dashboard
//! and the Prometheus alert rules name is one a live gateway (with TLS on,
//! so the certificate gauge is there) exports on /metrics.

use std::collections::BTreeSet;

/// Every `ascend_gateway_*` name in `text`.
fn named(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut at = 0;
    while let Some(found) = text[at..].find("ascend_gateway_") {
        let start = at + found;
        let mut end = start;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        names.insert(text[start..end].to_owned());
        at = end;
    }
    names
}

/// Every rule of the alert file as Prometheus loads it (`groups`, each with
/// `rules`, each an `alert` with an `expr`, a `severity` label and a
/// summary): (name, expression).
fn alert_rules(text: &str) -> Vec<(String, String)> {
    let docs = yaml_rust2::YamlLoader::load_from_str(text).expect("the alert rules are YAML");
    let groups = docs[0]["groups"].as_vec().expect("groups");
    let mut rules = Vec::new();
    for group in groups {
        assert!(group["name"].as_str().is_some(), "a group has a name");
        for rule in group["rules"].as_vec().expect("rules") {
            let name = rule["alert"].as_str().expect("alert").to_owned();
            let expr = rule["expr"].as_str().expect("expr").to_owned();
            assert_eq!(
                expr.matches('(').count(),
                expr.matches(')').count(),
                "{name}: unbalanced parentheses"
            );
            let severity = rule["labels"]["severity"].as_str();
            assert!(
                matches!(severity, Some("warning" | "critical")),
                "{name}: severity {severity:?}"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{name}: summary"
            );
            if let Some(duration) = rule["for"].as_str() {
                assert!(
                    duration.ends_with('m') || duration.ends_with('s'),
                    "{name}: for {duration}"
                );
            }
            rules.push((name, expr));
        }
    }
    rules
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_name_is_exported() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard = std::fs::read_to_string(format!("{root}/deploy/grafana/ascend-gateway.json"))
        .expect("the dashboard");
    let parsed: serde_json::Value =
        serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(
        parsed["panels"].as_array().is_some_and(|p| p.len() >= 10),
        "panels"
    );
    for title in [
        "Requests by status code",
        "Server error rate",
        "Top 10 tenants by tokens",
        "Time to first token",
        "Inter-token latency",
        "End-to-end latency",
        "Queue depth",
        "Batch size per step",
        "KV blocks free",
        "Limit refusals by limit",
        "Metering backlog and lag",
        "Redis fallbacks",
    ] {
        assert!(
            parsed["panels"]
                .as_array()
                .is_some_and(|p| p.iter().any(|panel| panel["title"] == title)),
            "no panel {title}"
        );
    }
    let alerts = std::fs::read_to_string(format!("{root}/deploy/prometheus/alerts.yml"))
        .expect("the alert rules");
    let rules = alert_rules(&alerts);
    for alert in [
        "AscendUsageSpoolBacklogGrowing",
        "AscendMeteringLag",
        "AscendUsageWriteErrors",
        "AscendRedisFallbackActive",
        "AscendQueueFull",
        "AscendErrorRate",
        "AscendCertificateExpiring",
    ] {
        assert!(
            rules.iter().any(|(name, _)| name == alert),
            "no alert {alert}"
        );
    }
    let expressions: String = rules.iter().map(|(_, expr)| expr.as_str()).collect();

    let secured = crate::tls::secured().await;
    // One generation, so the per-status and per-tenant families have a
    // series (they export only what happened).
    let addr = secured.gateway.addr;
    let client = (secured.client.0.as_str(), secured.client.1.as_str());
    let operator = crate::tls::tls_channel(addr, &secured.server_ca, Some(client)).await;
    let (_, key) =
        crate::common::tenant_with_limits(&operator, "dashboard", Default::default()).await;
    let mut inference = ascend_gateway::api::pb::v1::inference_client::InferenceClient::new(
        crate::tls::tls_channel(addr, &secured.server_ca, None).await,
    );
    inference
        .generate(crate::common::authed(
            ascend_gateway::api::pb::v1::GenerateRequest {
                model: "tiny".to_owned(),
                prompt: "dashboards".to_owned(),
                max_tokens: Some(2),
                ..Default::default()
            },
            &key,
        ))
        .await
        .expect("generate");
    let scrape = crate::common::scrape(secured.gateway.metrics_addr).await;
    let mut exported: BTreeSet<String> = scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    assert!(exported.contains("ascend_gateway_grpc_requests_total"));
    assert!(exported.contains("ascend_gateway_tenant_tokens_total"));
    // A family declared without a series yet (the HTTP API's, before any
    // HTTP request) is exported too.
    for line in scrape.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut words = line.split_whitespace().skip(2);
        if let (Some(name), Some(kind)) = (words.next(), words.next()) {
            exported.insert(match kind {
                "counter" => format!("{name}_total"),
                _ => name.to_owned(),
            });
        }
    }
    for (file, text) in [("dashboard", &dashboard), ("alerts", &expressions)] {
        let names = named(text);
        assert!(names.len() >= 7, "{file} names metrics: {names:?}");
        let missing: Vec<&String> = names.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(
            missing.is_empty(),
            "{file} names metrics the gateway does not export: {missing:?}"
        );
    }
    secured.gateway.stop().await.expect("stop");
}
