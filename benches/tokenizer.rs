//! Cost of tokenizing and detokenizing one request's text: the work every
//! Generate pays before and after serving, measured on the `small` model's
//! trained tokenizer and on DeepSeek V4's (129,280 ids) in one run, with
//! prompts like the overhead benchmark's (4-16 words) and longer ones (200
//! words), and on a chat-templated conversation.
//!
//! Run: `cargo bench --bench tokenizer` (uses `data/models/small`, creating
//! it with `model init --preset small` if missing).

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark fails loudly by design

use std::hint::black_box;
use std::path::Path;

use ascend_gateway::model::vendored::{TokenizerSource, VendoredTokenizer};
use ascend_gateway::model::{ChatMessage, Preset, Role, Tokenizer, init_model_dir};
use criterion::Criterion;

const WORDS: [&str; 12] = [
    "the", "gateway", "routes", "Ascend", "tokens", "é", "batch", "😀", "model", "42", "price",
    "of",
];

fn text(words: usize) -> String {
    (0..words)
        .map(|i| WORDS[(i * 7 + 3) % WORDS.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let dir = Path::new("data/models/small");
    if !dir.join("tokenizer.json").exists() {
        init_model_dir(Preset::Small, 7, dir).expect("model init");
    }
    bench(
        &mut c,
        "small",
        &Tokenizer::from_dir(dir).expect("tokenizer"),
    );
    let v4 = tempfile::tempdir().expect("dir");
    TokenizerSource::Vendored(VendoredTokenizer::DeepSeekV4)
        .write_to(v4.path())
        .expect("write");
    bench(
        &mut c,
        "deepseek-v4",
        &Tokenizer::from_dir(v4.path()).expect("tokenizer"),
    );
    c.final_summary();
}

/// The same texts through one tokenizer; ids are named `NAME/...`.
fn bench(c: &mut Criterion, name: &str, tokenizer: &Tokenizer) {
    let (short, long) = (text(10), text(200));
    let chat = vec![
        ChatMessage {
            role: Role::System,
            content: text(12),
        },
        ChatMessage {
            role: Role::User,
            content: text(30),
        },
    ];
    let short_ids = tokenizer.encode(&short, true).unwrap();
    c.bench_function(&format!("{name}/encode 10 words"), |b| {
        b.iter(|| tokenizer.encode(black_box(&short), true).unwrap())
    });
    c.bench_function(&format!("{name}/encode 200 words"), |b| {
        b.iter(|| tokenizer.encode(black_box(&long), true).unwrap())
    });
    c.bench_function(&format!("{name}/encode chat (42 words)"), |b| {
        b.iter(|| tokenizer.encode_chat(black_box(&chat)).unwrap())
    });
    c.bench_function(&format!("{name}/decode 10 words"), |b| {
        b.iter(|| tokenizer.decode(black_box(&short_ids), true).unwrap())
    });
}
