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
    let alerts = std::fs::read_to_string(format!("{root}/deploy/prometheus/alerts.yml"))
        .expect("the alert rules");
    assert!(
        alerts.matches("- alert: ").count() >= 7,
        "the alert rules are there"
    );

    let secured = crate::tls::secured().await;
    let scrape = crate::common::scrape(secured.gateway.metrics_addr).await;
    let exported: BTreeSet<String> = scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    for (file, text) in [("dashboard", &dashboard), ("alerts", &alerts)] {
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
