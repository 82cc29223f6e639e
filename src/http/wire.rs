//! OpenAI's JSON request bodies, turned into [`GenerateInput`]; fields we do
//! not support are refused naming the field, fields we do not know are
//! ignored (OpenAI clients send many).

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::generation::{GenerateInput, GenerationError};
use crate::model::sampling::MAX_LOGPROBS;
use crate::model::tokenizer::{ChatMessage, Role};
use crate::serving::Priority;

/// Longest `user` value kept (OpenAI's end-user id).
const MAX_USER_LEN: usize = 256;

/// `stop`: one string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The fields both endpoints share.
#[derive(Debug, Default, Deserialize)]
pub struct Common {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    #[serde(default)]
    pub priority: Option<String>,
    #[serde(default)]
    pub request_id: Option<String>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub logit_bias: Option<Value>,
}

/// `POST /v1/chat/completions`, beside the [`Common`] fields.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub messages: Option<Vec<Value>>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    #[serde(default)]
    pub tools: Option<Value>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub functions: Option<Value>,
    #[serde(default)]
    pub function_call: Option<Value>,
    #[serde(default)]
    pub response_format: Option<Value>,
    #[serde(default)]
    pub audio: Option<Value>,
    #[serde(default)]
    pub modalities: Option<Value>,
    #[serde(default)]
    pub prediction: Option<Value>,
}

/// `POST /v1/completions`, beside the [`Common`] fields.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(default)]
    pub prompt: Option<Value>,
    /// The legacy endpoint's `logprobs` is a count of alternatives.
    #[serde(default)]
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub best_of: Option<u32>,
    #[serde(default)]
    pub suffix: Option<Value>,
    /// Read special-token strings in the prompt as control tokens.
    #[serde(default)]
    pub parse_special_tokens: Option<bool>,
}

/// What the front end needs beyond the generation itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Delivery {
    pub stream: bool,
    pub include_usage: bool,
}

fn unsupported(field: &str, problem: &str) -> GenerationError {
    GenerationError::invalid(field, problem)
}

/// Refuses a field that is set to anything but "nothing" (absent, null,
/// an empty list or object).
fn refuse_if_set(value: Option<&Value>, field: &str, problem: &str) -> Result<(), GenerationError> {
    let set = match value {
        None | Some(Value::Null) => false,
        Some(Value::Array(items)) => !items.is_empty(),
        Some(Value::Object(map)) => !map.is_empty(),
        Some(_) => true,
    };
    if set {
        return Err(unsupported(field, problem));
    }
    Ok(())
}

impl Common {
    fn into_input(self) -> Result<(GenerateInput, Delivery), GenerationError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(unsupported("n", "only 1 is supported"));
        }
        for (value, field) in [
            (self.presence_penalty, "presence_penalty"),
            (self.frequency_penalty, "frequency_penalty"),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(unsupported(field, "not supported; omit it or send 0"));
            }
        }
        refuse_if_set(self.logit_bias.as_ref(), "logit_bias", "not supported")?;
        if let Some(user) = &self.user
            && user.chars().count() > MAX_USER_LEN
        {
            return Err(unsupported(
                "user",
                &format!("at most {MAX_USER_LEN} characters"),
            ));
        }
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(a), Some(b)) if a != b => {
                return Err(unsupported(
                    "max_completion_tokens",
                    "differs from max_tokens; send one of them",
                ));
            }
            (a, b) => a.or(b),
        };
        let priority = match self.priority.as_deref() {
            None | Some("normal") => Priority::Normal,
            Some("low") => Priority::Low,
            Some("high") => Priority::High,
            Some(_) => return Err(unsupported("priority", "one of low, normal, high")),
        };
        let stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(stop)) => vec![stop],
            Some(Stop::Many(stops)) => stops,
        };
        let stream = self.stream.unwrap_or(false);
        let include_usage = self
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let input = GenerateInput {
            model: self.model.unwrap_or_default(),
            max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            stop,
            // OpenAI's seed is a signed 64-bit integer; its bits are ours.
            seed: self.seed.map(|seed| seed as u64),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            priority,
            request_id: self.request_id,
            ..GenerateInput::default()
        };
        Ok((
            input,
            Delivery {
                stream,
                include_usage,
            },
        ))
    }
}

/// One message's text: a string, or a list of text parts.
fn message_text(i: usize, content: Option<&Value>) -> Result<String, GenerationError> {
    match content {
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str);
                match (kind, part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(part_text)) => text.push_str(part_text),
                    (Some("text"), None) => {
                        return Err(GenerationError::invalid(
                            format!("messages[{i}].content[{j}].text"),
                            "required: a string",
                        ));
                    }
                    _ => {
                        return Err(GenerationError::invalid(
                            format!("messages[{i}].content[{j}].type"),
                            "only text parts are supported",
                        ));
                    }
                }
            }
            Ok(text)
        }
        None | Some(Value::Null) => Err(GenerationError::invalid(
            format!("messages[{i}].content"),
            "required: a string or a list of text parts",
        )),
        Some(_) => Err(GenerationError::invalid(
            format!("messages[{i}].content"),
            "a string or a list of text parts",
        )),
    }
}

fn chat_message(i: usize, message: &Value) -> Result<ChatMessage, GenerationError> {
    let Some(object) = message.as_object() else {
        return Err(GenerationError::invalid(
            format!("messages[{i}]"),
            "an object with role and content",
        ));
    };
    let role = match object.get("role").and_then(Value::as_str) {
        // OpenAI's newer name for system instructions.
        Some("system" | "developer") => Role::System,
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        Some("tool" | "function") => {
            return Err(GenerationError::invalid(
                format!("messages[{i}].role"),
                "tool messages are not supported (tools are not); use system, user or assistant",
            ));
        }
        _ => {
            return Err(GenerationError::invalid(
                format!("messages[{i}].role"),
                "system, developer, user or assistant",
            ));
        }
    };
    for field in ["tool_calls", "function_call", "audio"] {
        refuse_if_set(
            object.get(field),
            &format!("messages[{i}].{field}"),
            "not supported",
        )?;
    }
    Ok(ChatMessage {
        role,
        content: message_text(i, object.get("content"))?,
    })
}

/// `body` as `T`; a field of the wrong type is refused naming its path.
/// (Each request type is read from the body separately rather than one
/// flattened into another, since flattening loses the path.)
fn typed<T: DeserializeOwned>(body: &Value) -> Result<T, GenerationError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        GenerationError::invalid(path, e.into_inner())
    })
}

impl ChatRequest {
    /// The generation a chat body asks for.
    pub fn parse(body: &Value) -> Result<(GenerateInput, Delivery), GenerationError> {
        let common: Common = typed(body)?;
        typed::<ChatRequest>(body)?.into_input(common)
    }

    fn into_input(self, common: Common) -> Result<(GenerateInput, Delivery), GenerationError> {
        refuse_if_set(self.tools.as_ref(), "tools", "tools are not supported")?;
        refuse_if_set(
            self.functions.as_ref(),
            "functions",
            "functions are not supported",
        )?;
        refuse_if_set(
            self.function_call.as_ref(),
            "function_call",
            "functions are not supported",
        )?;
        match &self.tool_choice {
            None | Some(Value::Null) => {}
            Some(Value::String(choice)) if choice == "none" || choice == "auto" => {}
            Some(_) => return Err(unsupported("tool_choice", "tools are not supported")),
        }
        if let Some(format) = &self.response_format
            && !format.is_null()
            && format.get("type").and_then(Value::as_str) != Some("text")
        {
            return Err(unsupported(
                "response_format",
                "only {\"type\": \"text\"} is supported",
            ));
        }
        refuse_if_set(self.audio.as_ref(), "audio", "audio is not supported")?;
        refuse_if_set(
            self.prediction.as_ref(),
            "prediction",
            "predicted outputs are not supported",
        )?;
        if let Some(modalities) = &self.modalities
            && !modalities.is_null()
            && modalities
                .as_array()
                .is_none_or(|m| m.iter().any(|m| m.as_str() != Some("text")))
        {
            return Err(unsupported("modalities", "only [\"text\"] is supported"));
        }
        let logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (false, Some(n)) if n > 0 => {
                return Err(unsupported("top_logprobs", "needs logprobs: true"));
            }
            (false, _) => None,
            (true, n) => Some(n.unwrap_or(0)),
        };
        if logprobs.is_some_and(|n| n as usize > MAX_LOGPROBS) {
            return Err(unsupported(
                "top_logprobs",
                &format!("at most {MAX_LOGPROBS}"),
            ));
        }
        let messages = match &self.messages {
            None => return Err(GenerationError::invalid("messages", "required")),
            Some(messages) if messages.is_empty() => {
                return Err(GenerationError::invalid("messages", "must not be empty"));
            }
            Some(messages) => messages
                .iter()
                .enumerate()
                .map(|(i, m)| chat_message(i, m))
                .collect::<Result<Vec<_>, _>>()?,
        };
        let (mut input, delivery) = common.into_input()?;
        input.messages = messages;
        input.logprobs = logprobs;
        Ok((input, delivery))
    }
}

/// Most alternatives the legacy `logprobs` count may ask for.
const MAX_COMPLETION_LOGPROBS: u32 = 5;

impl CompletionRequest {
    /// The generation a completion body asks for.
    pub fn parse(body: &Value) -> Result<(GenerateInput, Delivery), GenerationError> {
        let common: Common = typed(body)?;
        typed::<CompletionRequest>(body)?.into_input(common)
    }

    fn into_input(self, common: Common) -> Result<(GenerateInput, Delivery), GenerationError> {
        if self.echo.unwrap_or(false) {
            return Err(unsupported("echo", "not supported"));
        }
        if self.best_of.is_some_and(|n| n != 1) {
            return Err(unsupported("best_of", "only 1 is supported"));
        }
        refuse_if_set(self.suffix.as_ref(), "suffix", "not supported")?;
        if self.logprobs.is_some_and(|n| n > MAX_COMPLETION_LOGPROBS) {
            return Err(unsupported(
                "logprobs",
                &format!("at most {MAX_COMPLETION_LOGPROBS}"),
            ));
        }
        let prompt = match self.prompt {
            Some(Value::String(prompt)) => prompt,
            Some(Value::Array(items)) => match items.as_slice() {
                [Value::String(prompt)] => prompt.clone(),
                [] => return Err(GenerationError::invalid("prompt", "must not be empty")),
                [Value::Number(_), ..] | [Value::Array(_), ..] => {
                    return Err(GenerationError::invalid(
                        "prompt",
                        "token-id prompts are not supported; send text",
                    ));
                }
                _ => {
                    return Err(GenerationError::invalid(
                        "prompt",
                        "one prompt per request (a string, or a list of one string)",
                    ));
                }
            },
            None | Some(Value::Null) => {
                return Err(GenerationError::invalid("prompt", "required"));
            }
            Some(_) => return Err(GenerationError::invalid("prompt", "a string")),
        };
        let (mut input, delivery) = common.into_input()?;
        input.prompt = prompt;
        input.logprobs = self.logprobs;
        input.parse_special_tokens = self.parse_special_tokens.unwrap_or(false);
        Ok((input, delivery))
    }
}
