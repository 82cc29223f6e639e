//! The `Inference` service: protobuf requests to [`GenerateInput`], the
//! shared request path in `generation`, and its updates back as protobuf.
//! No request rule lives here; the HTTP front end shares every one.

use super::status::OrStatus;
use std::pin::Pin;
use std::time::Instant;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::convert::principal;
use super::deadline::ClientDeadline;
use super::pb::v1::inference_server::Inference;
use super::pb::v1::{
    self as pb, CountTokensRequest, CountTokensResponse, GenerateComplete, GenerateRequest,
    GenerateResponse, GenerateStreamResponse, ListModelsRequest, ListModelsResponse, TextDelta,
    generate_stream_response,
};
use super::status::to_status;
use crate::auth::TenantPrincipal;
use crate::generation::{
    Answer, AnswerUsage, Finish, GenerateInput, Generation, GenerationError, LogprobEntry, Running,
    Start, Update,
};
use crate::limits::Headroom;
use crate::model::tokenizer::{ChatMessage, Role};
use crate::serving::Priority;

/// Handlers of `ascend.gateway.v1.Inference`.
#[derive(Clone)]
pub struct InferenceApi {
    generation: Generation,
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Metadata on a response that replays a stored answer.
const REPLAY_HEADER: &str = "idempotent-replayed";

impl InferenceApi {
    pub fn new(generation: Generation) -> InferenceApi {
        InferenceApi { generation }
    }

    fn tenant<T>(request: &Request<T>) -> Result<std::sync::Arc<TenantPrincipal>, Status> {
        match principal(request)? {
            crate::auth::Principal::Tenant(tenant) => Ok(tenant),
            // The auth layer lets only tenant keys reach Inference.
            crate::auth::Principal::Admin(_) => Err(Status::permission_denied(
                "Inference needs a tenant API key",
            )),
        }
    }

    async fn start(&self, request: Request<GenerateRequest>) -> Result<Start, Status> {
        let received_at = Instant::now();
        let tenant = Self::tenant(&request)?;
        let deadline = request.extensions().get::<ClientDeadline>().map(|d| d.0);
        let input = match input_from_pb(request.into_inner()) {
            Ok(input) => input,
            Err(error) => return Err(to_status(&self.generation.refused(&tenant, error).await)),
        };
        self.generation
            .start(tenant, &input, received_at, deadline)
            .await
            .or_status()
    }
}

fn messages_from_pb(messages: Vec<pb::ChatMessage>) -> Result<Vec<ChatMessage>, GenerationError> {
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role: Role = m.role.parse().map_err(|_| {
                GenerationError::invalid(format!("messages[{i}].role"), "system, user or assistant")
            })?;
            Ok(ChatMessage {
                role,
                content: m.content,
            })
        })
        .collect()
}

fn input_from_pb(r: GenerateRequest) -> Result<GenerateInput, GenerationError> {
    let priority = match pb::Priority::try_from(r.priority) {
        Ok(pb::Priority::Low) => Priority::Low,
        Ok(pb::Priority::High) => Priority::High,
        Ok(pb::Priority::Normal | pb::Priority::Unspecified) => Priority::Normal,
        Err(_) => return Err(GenerationError::invalid("priority", "unknown value")),
    };
    Ok(GenerateInput {
        model: r.model,
        prompt: r.prompt,
        messages: messages_from_pb(r.messages)?,
        parse_special_tokens: r.parse_special_tokens,
        max_tokens: r.max_tokens,
        temperature: r.temperature,
        top_p: r.top_p,
        top_k: r.top_k,
        stop: r.stop,
        seed: r.seed,
        logprobs: r.logprobs.then_some(0),
        ignore_eos: r.ignore_eos,
        priority,
        request_id: Some(r.request_id).filter(|id| !id.is_empty()),
    })
}

fn replayed<T>(message: T) -> Response<T> {
    let mut response = Response::new(message);
    response.metadata_mut().insert(
        REPLAY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    response
}

fn usage_to_pb(usage: &AnswerUsage) -> pb::Usage {
    pb::Usage {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        total_tokens: usage.total_tokens(),
        cached_prompt_tokens: usage.cached_prompt_tokens,
        device_time_us: usage.device_time_us,
        energy_mj: usage.energy_mj,
        cost: usage.cost.as_ref().map(|c| pb::Money {
            currency_code: c.currency_code.clone(),
            amount_nanos: c.amount_nanos,
        }),
    }
}

fn timings_to_pb(usage: &AnswerUsage) -> pb::Timings {
    pb::Timings {
        queue_time_us: usage.queue_time_us,
        time_to_first_token_us: usage.time_to_first_token_us,
        total_time_us: usage.total_time_us,
    }
}

fn finish_to_pb(finish: Finish) -> pb::FinishReason {
    match finish {
        Finish::Eos => pb::FinishReason::Eos,
        Finish::Stop => pb::FinishReason::Stop,
        Finish::Length => pb::FinishReason::Length,
    }
}

fn logprob_to_pb(entry: &LogprobEntry) -> pb::TokenLogprob {
    pb::TokenLogprob {
        token_id: entry.token_id,
        token: entry.token.clone(),
        logprob: entry.logprob,
    }
}

fn complete_to_pb(answer: &Answer) -> GenerateComplete {
    GenerateComplete {
        finish_reason: finish_to_pb(answer.finish).into(),
        usage: Some(usage_to_pb(&answer.usage)),
        timings: Some(timings_to_pb(&answer.usage)),
    }
}

fn answer_to_pb(answer: Answer) -> GenerateResponse {
    GenerateResponse {
        finish_reason: finish_to_pb(answer.finish).into(),
        usage: Some(usage_to_pb(&answer.usage)),
        timings: Some(timings_to_pb(&answer.usage)),
        logprobs: answer.logprobs.iter().map(logprob_to_pb).collect(),
        request_id: answer.request_id,
        model: answer.model,
        text: answer.text,
    }
}

/// A stored answer as a stream: its text as one delta, then its final
/// message.
fn replay_stream(stored: Answer) -> ResponseStream<GenerateStreamResponse> {
    let mut messages = Vec::with_capacity(2);
    if !stored.text.is_empty() || !stored.logprobs.is_empty() {
        messages.push(Ok(GenerateStreamResponse {
            request_id: stored.request_id.clone(),
            event: Some(generate_stream_response::Event::Delta(TextDelta {
                text: stored.text.clone(),
                logprobs: stored.logprobs.iter().map(logprob_to_pb).collect(),
            })),
        }));
    }
    messages.push(Ok(GenerateStreamResponse {
        event: Some(generate_stream_response::Event::Complete(complete_to_pb(
            &stored,
        ))),
        request_id: stored.request_id,
    }));
    Box::pin(tokio_stream::iter(messages))
}

/// A running request's updates as stream messages.
fn running_stream(running: Running) -> ResponseStream<GenerateStreamResponse> {
    let request_id = running.request_id().to_owned();
    let stream = futures_util::stream::unfold(running, move |mut running| {
        let request_id = request_id.clone();
        async move {
            let update = running.next().await?;
            let message = match update {
                Ok(Update::Delta { text, logprobs }) => Ok(GenerateStreamResponse {
                    request_id,
                    event: Some(generate_stream_response::Event::Delta(TextDelta {
                        text,
                        logprobs: logprobs.iter().map(logprob_to_pb).collect(),
                    })),
                }),
                Ok(Update::Done(answer)) => Ok(GenerateStreamResponse {
                    request_id,
                    event: Some(generate_stream_response::Event::Complete(complete_to_pb(
                        &answer,
                    ))),
                }),
                Err(error) => Err(to_status(&error)),
            };
            Some((message, running))
        }
    });
    Box::pin(stream)
}

/// Adds the IETF draft `ratelimit-policy` / `ratelimit` fields for the
/// request-rate limit to a response.
fn with_rate_headers<T>(mut response: Response<T>, headroom: Headroom) -> Response<T> {
    if let Some(rate) = headroom.requests {
        let window = rate.window.as_secs().max(1);
        let spent = f64::from(rate.limit - rate.remaining.min(rate.limit));
        let refill = rate.window.as_secs_f64() * spent / f64::from(rate.limit.max(1));
        let policy = format!("\"requests\";q={};w={window}", rate.limit);
        let state = format!(
            "\"requests\";r={};t={}",
            rate.remaining,
            refill.ceil() as u64
        );
        let metadata = response.metadata_mut();
        if let Ok(value) = policy.parse() {
            metadata.insert("ratelimit-policy", value);
        }
        if let Ok(value) = state.parse() {
            metadata.insert("ratelimit", value);
        }
    }
    response
}

#[tonic::async_trait]
impl Inference for InferenceApi {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        // The auth layer bounds this by the client's deadline.
        let running = match self.start(request).await? {
            Start::Run(running) => running,
            Start::Replay(stored) => return Ok(replayed(answer_to_pb(stored))),
        };
        let headroom = running.headroom();
        let answer = running.finish().await.or_status()?;
        Ok(with_rate_headers(
            Response::new(answer_to_pb(answer)),
            headroom,
        ))
    }

    type GenerateStreamStream = ResponseStream<GenerateStreamResponse>;

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let running = match self.start(request).await? {
            Start::Run(running) => running,
            Start::Replay(stored) => return Ok(replayed(replay_stream(stored))),
        };
        let headroom = running.headroom();
        Ok(with_rate_headers(
            Response::new(running_stream(running)),
            headroom,
        ))
    }

    async fn count_tokens(
        &self,
        request: Request<CountTokensRequest>,
    ) -> Result<Response<CountTokensResponse>, Status> {
        let tenant = Self::tenant(&request)?;
        let r = request.into_inner();
        // Admitted first: a refused count costs the tenant a request too.
        let headroom = self.generation.admit_call(&tenant).await.or_status()?;
        let counted = async {
            let served = self.generation.model(&r.model)?;
            let input = GenerateInput {
                model: r.model.clone(),
                prompt: r.prompt,
                messages: messages_from_pb(r.messages)?,
                parse_special_tokens: r.parse_special_tokens,
                ..GenerateInput::default()
            };
            self.generation.tokenize(&served, &input).await
        };
        let tokens = counted.await.or_status()?;
        let response = CountTokensResponse {
            token_count: u32::try_from(tokens.len()).unwrap_or(u32::MAX),
            token_ids: if r.return_token_ids {
                tokens
            } else {
                Vec::new()
            },
        };
        Ok(with_rate_headers(Response::new(response), headroom))
    }

    async fn list_models(
        &self,
        request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        let tenant = Self::tenant(&request)?;
        let headroom = self.generation.admit_call(&tenant).await.or_status()?;
        let models = self
            .generation
            .models()
            .map(|served| pb::ModelInfo {
                id: served.settings.id.clone(),
                description: served.settings.description.clone(),
                context_length: u32::try_from(served.context_length).unwrap_or(u32::MAX),
                max_output_tokens: served.settings.max_output_tokens,
                device_profile: served.device_profile.clone(),
                workers: u32::try_from(served.settings.workers).unwrap_or(u32::MAX),
                served_as: served.settings.served_as.as_ref().map(|s| pb::ServedAs {
                    name: s.name.clone(),
                    parameters: s.total_params,
                    devices: s.devices,
                    device_profile: served.device_profile.clone(),
                }),
            })
            .collect();
        Ok(with_rate_headers(
            Response::new(ListModelsResponse { models }),
            headroom,
        ))
    }
}
