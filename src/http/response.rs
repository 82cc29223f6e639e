//! OpenAI's JSON response bodies and stream chunks, built from the shared
//! path's [`Answer`] and [`Update`]s, for both endpoints: chat
//! (`chat.completion`, `message` / `delta`, `logprobs.content`) and legacy
//! completions (`text_completion`, `text`, `logprobs.tokens`).

use serde::Serialize;

use crate::billing::money::format_decimal;
use crate::generation::{Answer, AnswerUsage, Finish, LogprobEntry};

/// Which endpoint's shape to answer in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Chat => "chatcmpl-",
            Endpoint::Completions => "cmpl-",
        }
    }

    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct CostBody {
    /// A decimal string, exact to the nano: never a float.
    pub amount: String,
    pub currency: String,
}

#[derive(Debug, Serialize)]
pub struct PromptDetails {
    pub cached_tokens: u32,
}

#[derive(Debug, Serialize)]
pub struct UsageBody {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptDetails,
    /// DeepSeek's split of the prompt into cached and computed tokens.
    pub prompt_cache_hit_tokens: u32,
    pub prompt_cache_miss_tokens: u32,
    pub device_time_us: u64,
    pub energy_mj: u64,
    pub cost: Option<CostBody>,
}

impl From<&AnswerUsage> for UsageBody {
    fn from(usage: &AnswerUsage) -> UsageBody {
        UsageBody {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.total_tokens(),
            prompt_tokens_details: PromptDetails {
                cached_tokens: usage.cached_prompt_tokens,
            },
            prompt_cache_hit_tokens: usage.cached_prompt_tokens,
            prompt_cache_miss_tokens: usage
                .prompt_tokens
                .saturating_sub(usage.cached_prompt_tokens),
            device_time_us: usage.device_time_us,
            energy_mj: usage.energy_mj,
            cost: usage.cost.as_ref().map(|cost| CostBody {
                amount: format_decimal(cost.amount_nanos, 2),
                currency: cost.currency_code.clone(),
            }),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Option<Vec<u8>>,
}

#[derive(Debug, Serialize)]
pub struct ContentLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Option<Vec<u8>>,
    pub top_logprobs: Vec<TopLogprob>,
}

/// `logprobs` of a chat choice, and of the legacy endpoint.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Logprobs {
    Chat {
        content: Vec<ContentLogprob>,
    },
    Legacy {
        tokens: Vec<String>,
        token_logprobs: Vec<f32>,
        top_logprobs: Vec<std::collections::BTreeMap<String, f32>>,
        text_offset: Vec<usize>,
    },
}

fn logprobs(endpoint: Endpoint, entries: &[LogprobEntry], offset: usize) -> Option<Logprobs> {
    if entries.is_empty() {
        return None;
    }
    Some(match endpoint {
        Endpoint::Chat => Logprobs::Chat {
            content: entries
                .iter()
                .map(|e| ContentLogprob {
                    token: e.token.clone(),
                    logprob: e.logprob,
                    bytes: None,
                    top_logprobs: e
                        .top
                        .iter()
                        .map(|(_, token, logprob)| TopLogprob {
                            token: token.clone(),
                            logprob: *logprob,
                            bytes: None,
                        })
                        .collect(),
                })
                .collect(),
        },
        Endpoint::Completions => {
            let mut text_offset = Vec::with_capacity(entries.len());
            let mut at = offset;
            for e in entries {
                text_offset.push(at);
                at += e.token.len();
            }
            Logprobs::Legacy {
                tokens: entries.iter().map(|e| e.token.clone()).collect(),
                token_logprobs: entries.iter().map(|e| e.logprob).collect(),
                top_logprobs: entries
                    .iter()
                    .map(|e| e.top.iter().map(|(_, t, p)| (t.clone(), *p)).collect())
                    .collect(),
                text_offset,
            }
        }
    })
}

pub fn finish_reason(finish: Finish) -> &'static str {
    match finish {
        Finish::Eos | Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

#[derive(Debug, Serialize)]
pub struct Message<'a> {
    pub role: &'static str,
    pub content: &'a str,
}

#[derive(Debug, Serialize)]
pub struct Choice<'a> {
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<Message<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<&'a str>,
    pub logprobs: Option<Logprobs>,
    pub finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
pub struct Completion<'a> {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    pub model: &'a str,
    pub choices: Vec<Choice<'a>>,
    pub usage: UsageBody,
}

fn unix_now() -> i64 {
    crate::store::now_us() / 1_000_000
}

/// The whole answer as one response body.
pub fn completion(endpoint: Endpoint, answer: &Answer) -> String {
    let text = answer.text.as_str();
    let (message, text) = match endpoint {
        Endpoint::Chat => (
            Some(Message {
                role: "assistant",
                content: text,
            }),
            None,
        ),
        Endpoint::Completions => (None, Some(text)),
    };
    let body = Completion {
        id: format!("{}{}", endpoint.id_prefix(), answer.request_id),
        object: endpoint.object(false),
        created: unix_now(),
        model: &answer.model,
        choices: vec![Choice {
            index: 0,
            message,
            text,
            logprobs: logprobs(endpoint, &answer.logprobs, 0),
            finish_reason: finish_reason(answer.finish),
        }],
        usage: UsageBody::from(&answer.usage),
    };
    // Strings and numbers only: serializing cannot fail.
    serde_json::to_string(&body).unwrap_or_default()
}

#[derive(Debug, Serialize)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice<'a> {
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<Delta<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<&'a str>,
    pub logprobs: Option<Logprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct Chunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: i64,
    pub model: &'a str,
    pub choices: Vec<ChunkChoice<'a>>,
    /// With `stream_options.include_usage`: `null` on every chunk but the
    /// last, which has no choices and the usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageBody>>,
}

/// Builds the chunks of one stream, which share an id and a creation time.
pub struct ChunkWriter {
    endpoint: Endpoint,
    id: String,
    model: String,
    created: i64,
    include_usage: bool,
    /// Bytes of text sent so far (the legacy `text_offset`).
    sent: usize,
}

impl ChunkWriter {
    pub fn new(
        endpoint: Endpoint,
        request_id: &str,
        model: &str,
        include_usage: bool,
    ) -> ChunkWriter {
        ChunkWriter {
            endpoint,
            id: format!("{}{request_id}", endpoint.id_prefix()),
            model: model.to_owned(),
            created: unix_now(),
            include_usage,
            sent: 0,
        }
    }

    fn chunk(&self, choice: Option<ChunkChoice<'_>>, usage: Option<UsageBody>) -> String {
        let chunk = Chunk {
            id: &self.id,
            object: self.endpoint.object(true),
            created: self.created,
            model: &self.model,
            choices: choice.into_iter().collect(),
            usage: self.include_usage.then_some(usage),
        };
        // Strings and numbers only: serializing cannot fail.
        serde_json::to_string(&chunk).unwrap_or_default()
    }

    /// The chat stream's first chunk: the role, no content yet.
    pub fn role(&self) -> Option<String> {
        (self.endpoint == Endpoint::Chat).then(|| {
            self.chunk(
                Some(ChunkChoice {
                    index: 0,
                    delta: Some(Delta {
                        role: Some("assistant"),
                        content: Some(""),
                    }),
                    text: None,
                    logprobs: None,
                    finish_reason: None,
                }),
                None,
            )
        })
    }

    /// New text; `None` when there is nothing to send (a token that
    /// completed no character, without log-probabilities).
    pub fn text(&mut self, text: &str, logprob: Option<&LogprobEntry>) -> Option<String> {
        if text.is_empty() && logprob.is_none() {
            return None;
        }
        let logprobs = logprob
            .and_then(|entry| logprobs(self.endpoint, std::slice::from_ref(entry), self.sent));
        self.sent += text.len();
        let (delta, text) = match self.endpoint {
            Endpoint::Chat => (
                Some(Delta {
                    role: None,
                    content: Some(text),
                }),
                None,
            ),
            Endpoint::Completions => (None, Some(text)),
        };
        Some(self.chunk(
            Some(ChunkChoice {
                index: 0,
                delta,
                text,
                logprobs,
                finish_reason: None,
            }),
            None,
        ))
    }

    /// The chunk with the finish reason, then (with `include_usage`) the
    /// usage chunk.
    pub fn end(&self, answer: &Answer) -> Vec<String> {
        let (delta, text) = match self.endpoint {
            Endpoint::Chat => (
                Some(Delta {
                    role: None,
                    content: None,
                }),
                None,
            ),
            Endpoint::Completions => (None, Some("")),
        };
        let mut chunks = vec![self.chunk(
            Some(ChunkChoice {
                index: 0,
                delta,
                text,
                logprobs: None,
                finish_reason: Some(finish_reason(answer.finish)),
            }),
            None,
        )];
        if self.include_usage {
            chunks.push(self.chunk(None, Some(UsageBody::from(&answer.usage))));
        }
        chunks
    }
}
