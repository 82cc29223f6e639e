//! The real `ascend-gateway` binary refusing bad start-up conditions: one
//! line on stderr naming the setting, and the documented exit code.

use std::process::{Command, Output};

fn gateway(args: &[&str], data_dir: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ascend-gateway"))
        .args(args)
        .env("ASCEND_METRICS_LISTEN", "127.0.0.1:0")
        .env("ASCEND_HTTP_LISTEN", "127.0.0.1:0")
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("DATABASE_URL")
        .env_remove("ASCEND_DATABASE_URL")
        .output()
        .expect("run ascend-gateway")
}

fn one_error_line(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "exactly one error line in: {stderr}");
    errors[0].to_owned()
}

#[test]
fn unknown_config_key_is_a_usage_error_naming_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\nlisten_port = 5\n").expect("write");
    let output = gateway(
        &["serve", "--config", file.to_str().expect("utf8")],
        dir.path(),
    );
    assert_eq!(output.status.code(), Some(2));
    let line = one_error_line(&output);
    assert!(line.contains("listen_port"), "{line}");
}

#[test]
fn malformed_config_file_is_a_usage_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, "[database\nurl = ").expect("write");
    let output = gateway(
        &["serve", "--config", file.to_str().expect("utf8")],
        dir.path(),
    );
    assert_eq!(output.status.code(), Some(2));
    one_error_line(&output);
}

#[test]
fn unreachable_database_names_the_setting() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Port 1 on loopback: nothing listens there, so the connection is refused.
    let output = gateway(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            "postgres://postgres@127.0.0.1:1/test",
        ],
        dir.path(),
    );
    assert_eq!(output.status.code(), Some(1));
    let line = one_error_line(&output);
    assert!(line.contains("database.url"), "{line}");
    assert!(line.contains("refused"), "{line}");
}

#[test]
fn port_in_use_names_the_setting_and_the_fix() {
    let dir = tempfile::tempdir().expect("temp dir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let output = gateway(&["serve", "--listen", &addr], dir.path());
    assert_eq!(output.status.code(), Some(1));
    let line = one_error_line(&output);
    assert!(line.contains("`listen`"), "{line}");
    assert!(line.contains("--listen"), "{line}");
}

#[test]
fn migrate_command_applies_the_embedded_schema() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = gateway(&["migrate"], dir.path());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("applied now"), "{stdout}");
    assert!(dir.path().join("ascend-gateway.db").exists());
}

#[test]
fn unreachable_or_read_only_redis_names_the_setting() {
    let dir = tempfile::tempdir().expect("temp dir");
    let serve = |url: &str| {
        gateway(
            &["serve", "--listen", "127.0.0.1:0", "--redis-url", url],
            dir.path(),
        )
    };
    let output = serve("redis://127.0.0.1:1");
    assert_eq!(output.status.code(), Some(1));
    let line = one_error_line(&output);
    assert!(line.contains("redis.url"), "{line}");

    let primary = crate::common::PrivateRedis::start();
    let replica_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let replica = crate::common::PrivateRedis::start_with(
        replica_port,
        &["--replicaof", "127.0.0.1", &primary.port().to_string()],
    );
    let output = serve(&replica.url());
    assert_eq!(output.status.code(), Some(1));
    let line = one_error_line(&output);
    assert!(
        line.contains("redis.url") && line.contains("read-only"),
        "{line}"
    );
}

#[test]
fn a_model_whose_tokenizer_is_broken_or_too_large_is_a_usage_error_naming_both_sizes() {
    use ascend_gateway::model::vendored::{TokenizerSource, VendoredTokenizer};
    let dir = tempfile::tempdir().expect("temp dir");
    let model = dir.path().join("model");
    ascend_gateway::model::init_model_dir(ascend_gateway::model::Preset::Tiny, 5, &model)
        .expect("init");
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        format!(
            "listen = \"127.0.0.1:0\"\n[[models]]\nid = \"m\"\ndir = {:?}\n",
            model.to_str().expect("utf8")
        ),
    )
    .expect("write");
    let serve = || {
        gateway(
            &["serve", "--config", file.to_str().expect("utf8")],
            dir.path(),
        )
    };

    // DeepSeek V4's 129,280 ids on the tiny model's 512-row embedding.
    TokenizerSource::Vendored(VendoredTokenizer::DeepSeekV4)
        .write_to(&model)
        .expect("write tokenizer");
    let output = serve();
    assert_eq!(output.status.code(), Some(2));
    let line = one_error_line(&output);
    assert!(
        line.contains("129280") && line.contains("vocab_size is 512"),
        "{line}"
    );

    // A tokenizer.json that does not parse.
    std::fs::write(model.join("tokenizer.json"), "{\"model\": ").expect("write");
    let output = serve();
    assert_eq!(output.status.code(), Some(2));
    let line = one_error_line(&output);
    assert!(line.contains("tokenizer.json"), "{line}");
}

#[test]
fn a_bad_model_setting_is_a_usage_error_before_any_database_exists() {
    let cases = [
        ("device_profile = \"ascend-920z\"", "ascend-920z"),
        (
            "device_profile = \"/nonexistent/device.toml\"",
            "device.toml",
        ),
        ("init_preset = \"huge\"", "init_preset"),
        (
            "[models.served_as]\nname = \"x\"\ntotal_params = 0\nactive_params = 0\ndevices = 0\ntp_efficiency = 7.0",
            "served_as",
        ),
    ];
    for (model_setting, named) in cases {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("gateway.toml");
        std::fs::write(&file, format!("[[models]]\nid = \"m\"\n{model_setting}\n")).expect("write");
        let data = dir.path().join("data");
        let output = gateway(
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--config",
                file.to_str().expect("utf8"),
            ],
            &data,
        );
        assert_eq!(output.status.code(), Some(2), "{model_setting}");
        let line = one_error_line(&output);
        assert!(line.contains(named), "{model_setting}: {line}");
        assert!(
            !data.join("ascend-gateway.db").exists(),
            "{model_setting}: a database was created before the settings were checked"
        );
    }
}
