//! What a generation gives back, in neither front end's wire format: text
//! deltas while it runs and one [`Answer`] when it finished. An answer is
//! also what a client request id keeps for duplicates, encoded by
//! [`Answer::encode`].

use serde::{Deserialize, Serialize};

use crate::billing::quote::Quote;
use crate::model::FinishReason;

/// The chosen token's log-probability and its most likely alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogprobEntry {
    pub token_id: u32,
    /// The token's text (lossy when the token is part of a character).
    pub token: String,
    pub logprob: f32,
    /// Most likely first: (token id, text, log-probability).
    pub top: Vec<(u32, String, f32)>,
}

/// A request's cost under its tenant's plan, exact to the nano.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cost {
    pub currency_code: String,
    pub amount_nanos: i64,
}

impl From<Quote> for Cost {
    fn from(quote: Quote) -> Cost {
        Cost {
            currency_code: quote.currency_code.to_owned(),
            amount_nanos: quote.amount_nanos,
        }
    }
}

/// What a finished request consumed, as metered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswerUsage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens served from a cached prefix (none before prefix
    /// caching).
    pub cached_prompt_tokens: u32,
    pub device_time_us: u64,
    pub energy_mj: u64,
    /// `None` when the tenant's plan prices no such request.
    pub cost: Option<Cost>,
    pub queue_time_us: u64,
    pub time_to_first_token_us: u64,
    pub total_time_us: u64,
}

impl AnswerUsage {
    pub fn total_tokens(&self) -> u32 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    /// The model ended its answer.
    Eos,
    /// A stop sequence appeared (it is not part of the text).
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl From<FinishReason> for Finish {
    fn from(reason: FinishReason) -> Finish {
        match reason {
            FinishReason::Eos => Finish::Eos,
            FinishReason::Stop => Finish::Stop,
            FinishReason::Length => Finish::Length,
        }
    }
}

/// A finished request's whole answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub request_id: String,
    pub model: String,
    pub text: String,
    pub finish: Finish,
    pub usage: AnswerUsage,
    /// Empty unless the request asked for log-probabilities.
    pub logprobs: Vec<LogprobEntry>,
}

impl Answer {
    /// The bytes a claim keeps for duplicates of this request.
    pub fn encode(&self) -> Vec<u8> {
        // Strings, numbers and lists only: serializing cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Option<Answer> {
        serde_json::from_slice(bytes).ok()
    }
}

/// One step of a running request, for a stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// New text (possibly empty when a token completes no character), with
    /// the token's log-probabilities when asked for.
    Delta {
        text: String,
        logprobs: Option<LogprobEntry>,
    },
    /// The last update: the whole answer, already kept for duplicates.
    Done(Box<Answer>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_survives_its_encoding() {
        let answer = Answer {
            request_id: "r-1".into(),
            model: "m".into(),
            text: "昇腾 \u{1F680}\n\"quoted\"".into(),
            finish: Finish::Stop,
            usage: AnswerUsage {
                prompt_tokens: 3,
                completion_tokens: 5,
                cost: Some(Cost {
                    currency_code: "USD".into(),
                    amount_nanos: 12,
                }),
                ..AnswerUsage::default()
            },
            logprobs: vec![LogprobEntry {
                token_id: 9,
                token: "x".into(),
                logprob: -0.25,
                top: vec![(9, "x".into(), -0.25)],
            }],
        };
        assert_eq!(Answer::decode(&answer.encode()), Some(answer));
        assert_eq!(Answer::decode(b"\x0a\x03abc"), None);
    }
}
