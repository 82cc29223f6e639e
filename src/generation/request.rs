//! A generation request as either front end hands it over
//! ([`GenerateInput`]), and the one validation that turns it into a
//! [`ValidRequest`]: every bound a request can be refused for before it
//! claims its id or touches a limit, with errors naming the field.

use std::sync::Arc;

use serde::Serialize;

use super::error::GenerationError;
use crate::idempotency::Fingerprint;
use crate::model::sampling::{MAX_LOGPROBS, SamplingParams};
use crate::model::tokenizer::ChatMessage;
use crate::serving::{Priority, ServedModel};

pub const MAX_STOP_SEQUENCES: usize = 8;
pub const MAX_STOP_LEN: usize = 64;
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// What a client asked for, in neither front end's wire format. Exactly one
/// of `prompt` and `messages` is set.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateInput {
    pub model: String,
    /// A raw prompt; special-token strings in it are text unless
    /// `parse_special_tokens`.
    pub prompt: String,
    /// A conversation, rendered by the model's chat template.
    pub messages: Vec<ChatMessage>,
    pub parse_special_tokens: bool,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    /// `None`: no log-probabilities; `Some(n)`: the chosen token's and its
    /// `n` most likely alternatives'.
    pub logprobs: Option<u32>,
    pub ignore_eos: bool,
    #[serde(serialize_with = "priority_name")]
    pub priority: Priority,
    /// The client's idempotency key; not part of the fingerprint.
    #[serde(skip)]
    pub request_id: Option<String>,
}

impl Default for GenerateInput {
    fn default() -> Self {
        GenerateInput {
            model: String::new(),
            prompt: String::new(),
            messages: Vec::new(),
            parse_special_tokens: false,
            max_tokens: None,
            temperature: None,
            top_p: None,
            top_k: None,
            stop: Vec::new(),
            seed: None,
            logprobs: None,
            ignore_eos: false,
            priority: Priority::Normal,
            request_id: None,
        }
    }
}

fn priority_name<S: serde::Serializer>(priority: &Priority, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match priority {
        Priority::Low => "low",
        Priority::Normal => "normal",
        Priority::High => "high",
    })
}

impl GenerateInput {
    /// The request without its id, for telling a retry from another request
    /// under the same id. The same request through either front end has one
    /// fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        // Serializing plain strings and numbers cannot fail; an empty
        // fingerprint would only make every request under an id "the same".
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        Fingerprint::of(&bytes)
    }

    /// The prompt's size in bytes, which bounds its token count from below.
    pub fn prompt_bytes(&self) -> usize {
        self.prompt.len() + self.messages.iter().map(|m| m.content.len()).sum::<usize>()
    }
}

/// A request validated and tokenized, not yet admitted.
pub struct ValidRequest {
    pub served: Arc<ServedModel>,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub priority: Priority,
    /// The client's id, or a fresh one.
    pub request_id: String,
    /// Whether the client chose the id (so it is claimed for duplicates).
    pub client_request_id: bool,
}

/// The request id: the client's when it follows the rules, else a fresh one.
pub fn request_id(requested: Option<&str>) -> Result<(String, bool), GenerationError> {
    match requested {
        None | Some("") => Ok((uuid::Uuid::now_v7().to_string(), false)),
        Some(id) if id.len() > MAX_REQUEST_ID_LEN || !id.bytes().all(|b| b.is_ascii_graphic()) => {
            Err(GenerationError::invalid(
                "request_id",
                format!("at most {MAX_REQUEST_ID_LEN} printable ASCII characters"),
            ))
        }
        Some(id) => Ok((id.to_owned(), true)),
    }
}

/// Checks every sampling field against the model; `prompt` is already
/// tokenized.
pub fn sampling(
    input: &GenerateInput,
    served: &ServedModel,
    prompt_tokens: usize,
) -> Result<SamplingParams, GenerationError> {
    let settings = &served.settings;
    let max_tokens = input.max_tokens.unwrap_or(settings.max_output_tokens);
    if max_tokens == 0 || max_tokens > settings.max_output_tokens {
        return Err(GenerationError::invalid(
            "max_tokens",
            format!(
                "between 1 and {} for this model",
                settings.max_output_tokens
            ),
        ));
    }
    let context = served.context_length;
    if prompt_tokens + max_tokens as usize > context {
        let field = if input.messages.is_empty() {
            "prompt"
        } else {
            "messages"
        };
        return Err(GenerationError::invalid(
            field,
            format!(
                "{prompt_tokens} prompt tokens + max_tokens {max_tokens} exceed the context window of {context}"
            ),
        ));
    }
    let temperature = input.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(GenerationError::invalid(
            "temperature",
            "a number in [0, 2]",
        ));
    }
    let top_p = input.top_p.unwrap_or(1.0);
    if !(top_p.is_finite() && top_p > 0.0 && top_p <= 1.0) {
        return Err(GenerationError::invalid("top_p", "a number in (0, 1]"));
    }
    let top_k = input.top_k.unwrap_or(0) as usize;
    if top_k > served.tokenizer.vocab_size() {
        return Err(GenerationError::invalid(
            "top_k",
            "at most the vocabulary size",
        ));
    }
    if input.stop.len() > MAX_STOP_SEQUENCES {
        return Err(GenerationError::invalid(
            "stop",
            format!("at most {MAX_STOP_SEQUENCES} sequences"),
        ));
    }
    if input
        .stop
        .iter()
        .any(|s| s.is_empty() || s.chars().count() > MAX_STOP_LEN)
    {
        return Err(GenerationError::invalid(
            "stop",
            format!("each 1 to {MAX_STOP_LEN} characters"),
        ));
    }
    let logprobs = match input.logprobs {
        Some(n) if n as usize > MAX_LOGPROBS => {
            return Err(GenerationError::invalid(
                "top_logprobs",
                format!("at most {MAX_LOGPROBS}"),
            ));
        }
        other => other.map(|n| n as usize),
    };
    Ok(SamplingParams {
        temperature,
        top_k,
        top_p,
        seed: input
            .seed
            .unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0),
        max_tokens: max_tokens as usize,
        stop: input.stop.clone(),
        logprobs,
        ignore_eos: input.ignore_eos,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_ignores_the_request_id_only() {
        let a = GenerateInput {
            model: "m".into(),
            prompt: "hello".into(),
            request_id: Some("one".into()),
            ..GenerateInput::default()
        };
        let b = GenerateInput {
            request_id: Some("two".into()),
            ..a.clone()
        };
        let c = GenerateInput {
            seed: Some(7),
            ..a.clone()
        };
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    #[test]
    fn request_ids_are_bounded_printable_ascii() {
        assert!(!request_id(None).unwrap().1);
        assert_eq!(request_id(Some("abc-1")).unwrap(), ("abc-1".into(), true));
        for bad in ["has space", "tab\t", "é", &"x".repeat(129)] {
            let e = request_id(Some(bad)).unwrap_err();
            assert!(e.to_string().contains("request_id"), "{e}");
        }
    }
}
