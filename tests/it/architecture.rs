//! The module boundaries ARCHITECTURE.md states, checked on the source: which
//! modules may name gRPC, HTTP, the async runtime, storage or the
//! environment, and where `unsafe` may stand. A line comment is not code, so
//! comments are skipped; everything else counts, tests included.

use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `path` (or `path` itself), as (file, code lines
/// with their numbers).
fn code_of(path: &Path) -> Vec<(PathBuf, Vec<(usize, String)>)> {
    let mut files = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            for entry in std::fs::read_dir(&p).expect("read dir") {
                stack.push(entry.expect("entry").path());
            }
        } else if p.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&p).expect("read source");
            let lines = text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim_start().starts_with("//"))
                .map(|(n, l)| (n + 1, l.to_owned()))
                .collect();
            files.push((p, lines));
        }
    }
    assert!(!files.is_empty(), "no source under {}", path.display());
    files
}

/// Lines of `module` (a path under src/) naming any of `forbidden`.
fn violations(module: &str, forbidden: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for (file, lines) in code_of(&src().join(module)) {
        for (n, line) in lines {
            if let Some(word) = forbidden.iter().find(|w| line.contains(*w)) {
                found.push(format!(
                    "{}:{n}: `{word}` in {}",
                    file.display(),
                    line.trim()
                ));
            }
        }
    }
    found
}

#[test]
fn only_api_knows_protobuf_and_grpc_statuses() {
    let grpc = ["tonic::", "prost::", "crate::api::"];
    let mut found = Vec::new();
    for module in [
        "generation",
        "http",
        "auth",
        "tenancy",
        "limits",
        "idempotency",
        "metering",
        "billing",
        "serving",
        "model",
        "npu",
        "store",
        "outbox.rs",
        "calendar.rs",
        "error.rs",
    ] {
        found.extend(violations(module, &grpc));
    }
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn generation_knows_neither_protobuf_nor_http() {
    let found = violations(
        "generation",
        &["tonic::", "prost::", "hyper::", "axum::", "crate::http::"],
    );
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn compute_has_no_runtime_no_storage_and_serving_no_storage() {
    let mut found = Vec::new();
    for module in ["npu", "model"] {
        found.extend(violations(module, &["tokio", "sqlx", "redis::"]));
    }
    // Workers never touch the database or Redis: usage leaves through the
    // one UsageSink.
    found.extend(violations(
        "serving",
        &["sqlx", "redis::", "crate::store", "crate::metering"],
    ));
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn only_config_reads_the_environment() {
    let env = ["std::env::var", "env::var(", "env::vars(", "env::var_os("];
    let mut found = Vec::new();
    for (file, lines) in code_of(&src()) {
        // The binaries choose their own flags and config paths.
        let allowed = file.ends_with("config.rs") || file.starts_with(src().join("bin"));
        if allowed {
            continue;
        }
        for (n, line) in lines {
            if env.iter().any(|w| line.contains(w)) {
                found.push(format!("{}:{n}: {}", file.display(), line.trim()));
            }
        }
    }
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn unsafe_only_in_the_simd_kernels_each_with_its_safety_note() {
    let kernels = src().join("npu").join("kernels");
    let (mut found, mut checked) = (Vec::new(), 0);
    for (file, lines) in code_of(&src()) {
        let text = std::fs::read_to_string(&file).expect("read");
        let all: Vec<&str> = text.lines().collect();
        for (n, line) in lines {
            let code = line.split("//").next().unwrap_or("");
            let opens_unsafe = code.contains("unsafe {")
                || code.contains("unsafe fn")
                || code.contains("unsafe impl");
            if !opens_unsafe {
                continue;
            }
            checked += 1;
            if !file.starts_with(&kernels) {
                found.push(format!(
                    "{}:{n}: unsafe outside npu/kernels",
                    file.display()
                ));
                continue;
            }
            // A SAFETY note within the few lines before (or on) the line.
            let from = n.saturating_sub(8);
            let noted = all[from..n]
                .iter()
                .any(|l| l.contains("SAFETY") || l.contains("# Safety"));
            if !noted {
                found.push(format!(
                    "{}:{n}: unsafe without a SAFETY note",
                    file.display()
                ));
            }
        }
    }
    assert!(
        checked > 10,
        "the SIMD kernels' unsafe blocks were seen: {checked}"
    );
    assert!(found.is_empty(), "{found:#?}");
}
