//! `bench chat`: a multi-turn chat workload with context caching on and off, in one run.
//!
//! Several tenants each have a system prompt of their own (about `--system-tokens` long);
//! each runs several conversations at once, and every turn resends the system prompt, the
//! conversation so far (user messages and the model's answers) and a new user message, as
//! chat clients do. The same conversations run against a gateway with the prefix cache on
//! and one with it off, at each pace; reported per configuration: time to first token (p50,
//! p99) at the client, prompt tokens per second, the hit rate the gateway reported, and the
//! workload's ideal hit rate (the share of prompt tokens that repeat the start of an earlier
//! request of the same tenant, as the model's tokenizer counts them).
//!
//! Knows the workload and its rules; the gateway, the streaming client and the percentiles
//! are other modules'.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::load::{Connection, Sample, one_request};
use super::selfhost::{SelfHosted, connect};
use super::suite::{git_revision, machine};
use super::{BenchError, Summary, equal_tenants, scenario_model, write_results};
use crate::api::pb::v1::GenerateRequest;
use crate::model::tokenizer::Tokenizer;
use crate::serving::Pace;

#[derive(Debug, Clone, clap::Args)]
pub struct ChatArgs {
    #[arg(long, default_value_t = 4)]
    pub tenants: usize,
    /// Conversations each tenant runs at once
    #[arg(long, default_value_t = 3)]
    pub conversations: usize,
    /// Turns of each conversation
    #[arg(long, default_value_t = 5)]
    pub turns: usize,
    /// Length of each tenant's system prompt, in the model's tokens (at least)
    #[arg(long, default_value_t = 1000)]
    pub system_tokens: usize,
    /// Words of each user message
    #[arg(long, default_value_t = 24)]
    pub user_words: usize,
    /// Tokens of each answer (generated in full)
    #[arg(long, default_value_t = 16)]
    pub answer_tokens: u32,
    /// Paces to run, each with the cache on and off
    #[arg(long, value_enum, value_delimiter = ',', default_value = "cpu,device")]
    pub paces: Vec<Pace>,
    #[arg(long, default_value_t = 32)]
    pub max_batch_size: usize,
    #[arg(long, default_value = "data/models/small")]
    pub model_dir: PathBuf,
    #[arg(long, default_value = "benchmarks/caching")]
    pub out_dir: PathBuf,
}

/// One configuration's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatRun {
    pub pace: Pace,
    pub prefix_cache: bool,
    pub requests: usize,
    pub errors: usize,
    pub ttft_ms: Summary,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    /// `cached_prompt_tokens / prompt_tokens`.
    pub hit_rate: f64,
    pub prompt_tokens_per_s: f64,
    pub wall_s: f64,
}

/// Cache on against off at one pace.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatComparison {
    pub pace: Pace,
    /// TTFT p50 with the cache off over with it on.
    pub ttft_p50_speedup: f64,
    pub ttft_p99_speedup: f64,
    /// Hit rate with the cache on over the workload's ideal.
    pub hit_rate_of_ideal: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatReport {
    pub command: String,
    pub git_revision: String,
    pub machine: String,
    pub tenants: usize,
    pub conversations_per_tenant: usize,
    pub turns: usize,
    pub system_prompt_tokens: Vec<usize>,
    /// The share of prompt tokens that repeat an earlier prompt's start (same tenant).
    pub ideal_hit_rate: f64,
    pub runs: Vec<ChatRun>,
    pub comparisons: Vec<ChatComparison>,
}

/// Deterministic filler words (the model's text is random anyway).
const WORDS: &[&str] = &[
    "ascend", "device", "tenant", "prompt", "kernel", "matrix", "expert", "router", "token",
    "cache", "block", "batch", "queue", "latency", "energy", "invoice", "replica", "gateway",
    "stream", "window", "vector", "policy", "answer", "context",
];

fn words(seed: usize, count: usize) -> String {
    (0..count)
        .map(|i| WORDS[(seed * 7 + i * 13 + i * i) % WORDS.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

/// A system prompt of at least `tokens` tokens for tenant `tenant`.
fn system_prompt(
    tokenizer: &Tokenizer,
    tenant: usize,
    tokens: usize,
) -> Result<String, BenchError> {
    let mut text = format!("You are the assistant of tenant {tenant}. Rules follow.");
    let mut rule = 0;
    while count(tokenizer, &text)? < tokens {
        for _ in 0..16 {
            text.push_str(&format!(
                " Rule {rule}: {}.",
                words(tenant * 1000 + rule, 6)
            ));
            rule += 1;
        }
    }
    Ok(text)
}

/// The ids the gateway gives a raw prompt.
fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, BenchError> {
    tokenizer
        .encode_plain(text, true)
        .map_err(|e| BenchError::Usage {
            flag: "--model-dir",
            message: format!("the model's tokenizer: {e}"),
        })
}

fn count(tokenizer: &Tokenizer, text: &str) -> Result<usize, BenchError> {
    encode(tokenizer, text).map(|ids| ids.len())
}

/// One conversation: its tenant, system prompt and what was said so far.
struct Conversation {
    tenant: usize,
    history: String,
    turn: usize,
    seed: usize,
}

impl Conversation {
    fn next_prompt(&self, user_words: usize) -> String {
        format!(
            "{}\nUser: {}\nAssistant:",
            self.history,
            words(self.seed * 100 + self.turn, user_words)
        )
    }
}

/// Runs every conversation against `connection`; each conversation's turns go one after
/// another, conversations at once. Returns each turn's sample and its prompt, and the wall
/// time.
async fn run_conversations(
    connection: Connection,
    keys: &[String],
    systems: &[String],
    args: &ChatArgs,
    model: &str,
) -> (Vec<(Sample, String)>, Duration) {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for tenant in 0..args.tenants {
        for c in 0..args.conversations {
            let mut conversation = Conversation {
                tenant,
                history: systems[tenant].clone(),
                turn: 0,
                seed: tenant * 100 + c,
            };
            let (connection, key) = (connection.clone(), keys[tenant].clone());
            let (turns, user_words, answer_tokens) =
                (args.turns, args.user_words, args.answer_tokens);
            let model = model.to_owned();
            tasks.spawn(async move {
                let mut samples = Vec::new();
                for turn in 0..turns {
                    conversation.turn = turn;
                    let prompt = conversation.next_prompt(user_words);
                    let request = GenerateRequest {
                        model: model.clone(),
                        prompt: prompt.clone(),
                        max_tokens: Some(answer_tokens),
                        ignore_eos: true,
                        seed: Some((conversation.seed * 1000 + turn) as u64),
                        ..Default::default()
                    };
                    let sample = one_request(
                        connection.clone(),
                        &key,
                        conversation.tenant,
                        request,
                        start,
                    )
                    .await;
                    conversation.history = format!("{prompt} {}", sample.text);
                    samples.push((sample, prompt));
                }
                samples
            });
        }
    }
    let mut samples = Vec::new();
    while let Some(done) = tasks.join_next().await {
        if let Ok(batch) = done {
            samples.extend(batch);
        }
    }
    (samples, start.elapsed())
}

/// Tokens of each prompt that repeat the start of an earlier prompt of the same tenant
/// (in the order they were sent), over all prompt tokens.
fn ideal_hit_rate(tokenizer: &Tokenizer, turns: &[(Sample, String)]) -> Result<f64, BenchError> {
    let mut ordered: Vec<&(Sample, String)> = turns.iter().collect();
    ordered.sort_by_key(|(s, _)| s.sent_at);
    let mut seen: HashMap<usize, Vec<Vec<u32>>> = HashMap::new();
    let (mut repeated, mut total) = (0usize, 0usize);
    for (sample, prompt) in ordered {
        let ids = encode(tokenizer, prompt)?;
        let earlier = seen.entry(sample.tenant).or_default();
        let common = earlier
            .iter()
            .map(|e| e.iter().zip(&ids).take_while(|(a, b)| a == b).count())
            .max()
            .unwrap_or(0);
        // The last token is always computed: its logits are the answer's start.
        repeated += common.min(ids.len().saturating_sub(1));
        total += ids.len();
        earlier.push(ids);
    }
    Ok(if total == 0 {
        0.0
    } else {
        repeated as f64 / total as f64
    })
}

fn summarize(
    pace: Pace,
    prefix_cache: bool,
    turns: &[(Sample, String)],
    wall: Duration,
) -> ChatRun {
    let ok: Vec<&Sample> = turns
        .iter()
        .map(|(s, _)| s)
        .filter(|s| s.outcome.is_ok())
        .collect();
    let prompt_tokens: u64 = ok.iter().map(|s| u64::from(s.prompt_tokens)).sum();
    let cached_prompt_tokens: u64 = ok.iter().map(|s| u64::from(s.cached_prompt_tokens)).sum();
    ChatRun {
        pace,
        prefix_cache,
        requests: turns.len(),
        errors: turns.len() - ok.len(),
        ttft_ms: Summary::of_micros(ok.iter().filter_map(|s| s.ttft_us)),
        prompt_tokens,
        cached_prompt_tokens,
        hit_rate: if prompt_tokens == 0 {
            0.0
        } else {
            cached_prompt_tokens as f64 / prompt_tokens as f64
        },
        prompt_tokens_per_s: prompt_tokens as f64 / wall.as_secs_f64().max(1e-9),
        wall_s: wall.as_secs_f64(),
    }
}

/// `bench chat`.
pub async fn chat_scenario(
    args: &ChatArgs,
    command: &str,
) -> Result<(ChatReport, String), BenchError> {
    if args.tenants == 0 || args.conversations == 0 || args.turns == 0 {
        return Err(BenchError::Usage {
            flag: "--tenants",
            message: "--tenants, --conversations and --turns must be at least 1".to_owned(),
        });
    }
    let model_id = "chat";
    let mut runs = Vec::new();
    let mut systems: Vec<String> = Vec::new();
    let mut ideal = None;
    for &pace in &args.paces {
        for prefix_cache in [true, false] {
            let mut model = scenario_model(model_id, args.model_dir.clone(), args.max_batch_size);
            model.pace = pace;
            model.prefix_cache = prefix_cache;
            let hosted = SelfHosted::start(vec![model]).await?;
            // The directory exists once the first gateway has started.
            let tokenizer =
                Tokenizer::from_dir(&args.model_dir).map_err(|e| BenchError::Usage {
                    flag: "--model-dir",
                    message: e.to_string(),
                })?;
            if systems.is_empty() {
                for tenant in 0..args.tenants {
                    systems.push(system_prompt(&tokenizer, tenant, args.system_tokens)?);
                }
            }
            let keys = hosted.provision(&equal_tenants(args.tenants)).await?;
            let connection = Connection::Grpc(connect(&hosted.endpoint(), 1).await?.remove(0));
            tracing::info!(?pace, prefix_cache, "chat workload");
            let (turns, wall) =
                run_conversations(connection, &keys, &systems, args, model_id).await;
            hosted.stop().await?;
            if ideal.is_none() {
                ideal = Some(ideal_hit_rate(&tokenizer, &turns)?);
            }
            runs.push(summarize(pace, prefix_cache, &turns, wall));
        }
    }
    let ideal = ideal.unwrap_or(0.0);
    let comparisons = args
        .paces
        .iter()
        .filter_map(|&pace| {
            let on = runs.iter().find(|r| r.pace == pace && r.prefix_cache)?;
            let off = runs.iter().find(|r| r.pace == pace && !r.prefix_cache)?;
            Some(ChatComparison {
                pace,
                ttft_p50_speedup: off.ttft_ms.p50 / on.ttft_ms.p50.max(1e-9),
                ttft_p99_speedup: off.ttft_ms.p99 / on.ttft_ms.p99.max(1e-9),
                hit_rate_of_ideal: on.hit_rate / ideal.max(1e-9),
            })
        })
        .collect();
    let tokenizer = Tokenizer::from_dir(&args.model_dir).map_err(|e| BenchError::Usage {
        flag: "--model-dir",
        message: e.to_string(),
    })?;
    let report = ChatReport {
        command: command.to_owned(),
        git_revision: git_revision(),
        machine: machine(),
        tenants: args.tenants,
        conversations_per_tenant: args.conversations,
        turns: args.turns,
        system_prompt_tokens: systems
            .iter()
            .map(|s| count(&tokenizer, s))
            .collect::<Result<_, _>>()?,
        ideal_hit_rate: ideal,
        runs,
        comparisons,
    };
    let markdown = markdown(&report);
    write_results(&args.out_dir, &report, &markdown)?;
    Ok((report, markdown))
}

fn markdown(r: &ChatReport) -> String {
    let mut out = format!(
        "# Context caching: multi-turn chat, cache on against off\n\n\
         Command: `{}`\nRevision: {}\nMachine: {}\n\n\
         {} tenants x {} conversations x {} turns; system prompts of {:?} tokens; every turn \
         resends the conversation. Ideal hit rate (prompt tokens that repeat an earlier \
         prompt's start, same tenant): {:.1}%.\n\n\
         | pace | cache | requests | errors | TTFT p50 ms | TTFT p99 ms | prompt tokens/s | hit rate |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
        r.command,
        r.git_revision,
        r.machine,
        r.tenants,
        r.conversations_per_tenant,
        r.turns,
        r.system_prompt_tokens,
        r.ideal_hit_rate * 100.0
    );
    for run in &r.runs {
        out.push_str(&format!(
            "| {:?} | {} | {} | {} | {:.1} | {:.1} | {:.0} | {:.1}% |\n",
            run.pace,
            if run.prefix_cache { "on" } else { "off" },
            run.requests,
            run.errors,
            run.ttft_ms.p50,
            run.ttft_ms.p99,
            run.prompt_tokens_per_s,
            run.hit_rate * 100.0
        ));
    }
    out.push_str(
        "\n| pace | TTFT p50 off/on | TTFT p99 off/on | hit rate / ideal |\n|---|---:|---:|---:|\n",
    );
    for c in &r.comparisons {
        out.push_str(&format!(
            "| {:?} | {:.2}x | {:.2}x | {:.2} |\n",
            c.pace, c.ttft_p50_speedup, c.ttft_p99_speedup, c.hit_rate_of_ideal
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filler_is_deterministic_and_varies_by_seed() {
        assert_eq!(words(3, 5), words(3, 5));
        assert_ne!(words(3, 5), words(4, 5));
        assert_eq!(words(1, 4).split(' ').count(), 4);
    }
}
