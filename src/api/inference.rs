//! The `Inference` service: validation and tokenization of requests, tenant
//! limits, then serving; text deltas and usage back to the client.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
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
use crate::billing::quote::{Consumption, PlanPrices, PriceCache};
use crate::limits::{Cost, Limiter, Permit, RateState};
use crate::metering::Metering;
use crate::model::FinishReason;
use crate::model::sampling::SamplingParams;
use crate::model::tokenizer::{ChatMessage, Role};
use crate::serving::{
    Failure, Job, JobEvent, JobUsage, ModelRegistry, Priority, Requester, ServedModel, ServingError,
};
use crate::store::now_us;

const MAX_STOP_SEQUENCES: usize = 8;
const MAX_STOP_LEN: usize = 64;
const MAX_REQUEST_ID_LEN: usize = 128;

/// Handlers of `ascend.gateway.v1.Inference`.
#[derive(Clone)]
pub struct InferenceApi {
    limiter: Arc<Limiter>,
    registry: ModelRegistry,
    metering: Arc<Metering>,
    prices: Arc<PriceCache>,
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn invalid(field: &str, problem: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("invalid `{field}`: {problem}"))
}

/// A validated, tokenized generation request, admitted by the limits.
struct Started {
    request_id: String,
    model: String,
    events: mpsc::UnboundedReceiver<JobEvent>,
    served: Arc<ServedModel>,
    logprobs: bool,
    rate: Option<RateState>,
    /// The tenant's plan, for quoting the cost with the answer.
    prices: Option<Arc<PlanPrices>>,
}

impl InferenceApi {
    pub fn new(
        limiter: Arc<Limiter>,
        registry: ModelRegistry,
        metering: Arc<Metering>,
        prices: Arc<PriceCache>,
    ) -> InferenceApi {
        InferenceApi {
            limiter,
            registry,
            metering,
            prices,
        }
    }

    fn tenant<T>(request: &Request<T>) -> Result<Arc<TenantPrincipal>, Status> {
        match principal(request)? {
            crate::auth::Principal::Tenant(tenant) => Ok(tenant),
            // The auth layer lets only tenant keys reach Inference.
            crate::auth::Principal::Admin => Err(Status::permission_denied(
                "Inference needs a tenant API key",
            )),
        }
    }

    async fn admit(&self, tenant: &TenantPrincipal, cost: Cost) -> Result<Permit, Status> {
        self.limiter
            .admit(&tenant.tenant_id, &tenant.limits, cost)
            .await
            .map_err(|e| to_status(&e))
    }

    fn model(&self, id: &str) -> Result<Arc<ServedModel>, Status> {
        if id.is_empty() {
            return Err(invalid(
                "model",
                "required; ListModels shows the served ones",
            ));
        }
        self.registry.get(id).cloned().map_err(|e| to_status(&e))
    }

    /// Prompt or chat messages to token ids, with the model's tokenizer.
    fn tokenize(
        served: &ServedModel,
        prompt: &str,
        messages: &[pb::ChatMessage],
    ) -> Result<Vec<u32>, Status> {
        let tokens = match (prompt.is_empty(), messages.is_empty()) {
            (false, false) => {
                return Err(invalid("prompt", "set either prompt or messages, not both"));
            }
            (true, true) => {
                return Err(invalid(
                    "prompt",
                    "required (or messages); it must not be empty",
                ));
            }
            (false, true) => served.tokenizer.encode(prompt, true),
            (true, false) => {
                let mut chat = Vec::with_capacity(messages.len());
                for (i, m) in messages.iter().enumerate() {
                    let role: Role = m.role.parse().map_err(|_| {
                        invalid(&format!("messages[{i}].role"), "system, user or assistant")
                    })?;
                    chat.push(ChatMessage {
                        role,
                        content: m.content.clone(),
                    });
                }
                served.tokenizer.encode_chat(&chat)
            }
        };
        let tokens = tokens.map_err(|e| invalid("prompt", e))?;
        if tokens.is_empty() {
            return Err(invalid("prompt", "encodes to no tokens"));
        }
        Ok(tokens)
    }

    async fn start(&self, request: Request<GenerateRequest>) -> Result<Started, Status> {
        let received_at = Instant::now();
        let tenant = Self::tenant(&request)?;
        let deadline = request.extensions().get::<ClientDeadline>().map(|d| d.0);
        let r = request.into_inner();
        let served = self.model(&r.model)?;
        let settings = &served.settings;
        let prompt = Self::tokenize(&served, &r.prompt, &r.messages)?;
        let max_tokens = r.max_tokens.unwrap_or(settings.max_output_tokens);
        if max_tokens == 0 || max_tokens > settings.max_output_tokens {
            return Err(invalid(
                "max_tokens",
                format!(
                    "between 1 and {} for this model",
                    settings.max_output_tokens
                ),
            ));
        }
        let context = served.context_length;
        if prompt.len() + max_tokens as usize > context {
            return Err(invalid(
                "prompt",
                format!(
                    "{} prompt tokens + max_tokens {max_tokens} exceed the context window of {context}",
                    prompt.len()
                ),
            ));
        }
        let temperature = r.temperature.unwrap_or(1.0);
        if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
            return Err(invalid("temperature", "a number in [0, 2]"));
        }
        let top_p = r.top_p.unwrap_or(1.0);
        if !(top_p.is_finite() && top_p > 0.0 && top_p <= 1.0) {
            return Err(invalid("top_p", "a number in (0, 1]"));
        }
        let top_k = r.top_k.unwrap_or(0) as usize;
        if top_k > served.tokenizer.vocab_size() {
            return Err(invalid("top_k", "at most the vocabulary size"));
        }
        if r.stop.len() > MAX_STOP_SEQUENCES {
            return Err(invalid(
                "stop",
                format!("at most {MAX_STOP_SEQUENCES} sequences"),
            ));
        }
        if r.stop
            .iter()
            .any(|s| s.is_empty() || s.chars().count() > MAX_STOP_LEN)
        {
            return Err(invalid(
                "stop",
                format!("each 1 to {MAX_STOP_LEN} characters"),
            ));
        }
        let request_id = if r.request_id.is_empty() {
            uuid::Uuid::now_v7().to_string()
        } else if r.request_id.len() > MAX_REQUEST_ID_LEN
            || !r.request_id.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(invalid(
                "request_id",
                format!("at most {MAX_REQUEST_ID_LEN} printable ASCII characters"),
            ));
        } else {
            r.request_id.clone()
        };
        let priority = match pb::Priority::try_from(r.priority) {
            Ok(pb::Priority::Low) => Priority::Low,
            Ok(pb::Priority::High) => Priority::High,
            Ok(pb::Priority::Normal | pb::Priority::Unspecified) => Priority::Normal,
            Err(_) => return Err(invalid("priority", "unknown value")),
        };
        let params = SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: r
                .seed
                .unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0),
            max_tokens: max_tokens as usize,
            stop: r.stop.clone(),
            logprobs: r.logprobs.then_some(0),
            ignore_eos: r.ignore_eos,
        };
        self.metering.admitting().map_err(|e| to_status(&e))?;
        let permit = self
            .admit(
                &tenant,
                Cost {
                    tokens: prompt.len() as u64 + u64::from(max_tokens),
                },
            )
            .await?;
        let rate = permit.rate_state();
        let prices = self.prices.plan(&tenant.price_plan).await;
        let (sender, events) = mpsc::unbounded_channel();
        let job = Job {
            requester: Requester {
                request_id: request_id.clone(),
                tenant_id: tenant.tenant_id.clone(),
                key_id: tenant.key_id.clone(),
                model: settings.id.clone(),
                weight: tenant.scheduling_weight,
            },
            prompt,
            params,
            priority,
            deadline,
            received_at,
            started_at_us: now_us(),
            permit: Some(permit),
            events: sender,
        };
        if let Err(refused) = served.submit(job, priority) {
            let (full, mut job) = *refused;
            if let Some(permit) = job.permit.take() {
                permit.settle(0).await;
            }
            return Err(to_status(&ServingError::from(full)));
        }
        Ok(Started {
            request_id,
            model: served.settings.id.clone(),
            events,
            served,
            logprobs: r.logprobs,
            rate,
            prices,
        })
    }
}

fn usage_to_pb(usage: &JobUsage, model: &str, prices: Option<&PlanPrices>) -> pb::Usage {
    let cost = prices.and_then(|plan| {
        plan.quote(
            model,
            &usage.device_profile,
            now_us(),
            Consumption {
                prompt_tokens: u64::from(usage.prompt_tokens),
                completion_tokens: u64::from(usage.completion_tokens),
                energy_mj: usage.energy_mj,
            },
        )
    });
    pb::Usage {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        total_tokens: usage.prompt_tokens + usage.completion_tokens,
        device_time_us: usage.device_time_us,
        energy_mj: usage.energy_mj,
        cost: cost.map(|q| pb::Money {
            currency_code: q.currency_code.to_owned(),
            amount_nanos: q.amount_nanos,
        }),
    }
}

fn timings_to_pb(usage: &JobUsage) -> pb::Timings {
    pb::Timings {
        queue_time_us: usage.queue_time_us,
        time_to_first_token_us: usage.ttft_us,
        total_time_us: usage.total_time_us,
    }
}

fn finish_to_pb(reason: FinishReason) -> pb::FinishReason {
    match reason {
        FinishReason::Eos => pb::FinishReason::Eos,
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
    }
}

fn failure_to_status(failure: &Failure) -> Status {
    match failure {
        Failure::DeadlineExceeded => {
            Status::deadline_exceeded("the request's deadline passed before it finished")
        }
        Failure::Cancelled => Status::cancelled("the request was cancelled"),
        Failure::Internal(message) => {
            tracing::error!(error = %message, "generation failed");
            Status::internal("generation failed")
        }
    }
}

fn logprob_to_pb(served: &ServedModel, token: u32, logprob: f32) -> pb::TokenLogprob {
    pb::TokenLogprob {
        token_id: token,
        token: served.tokenizer.decode(&[token], false).unwrap_or_default(),
        logprob,
    }
}

/// Adds the IETF draft `ratelimit-policy` / `ratelimit` fields for the
/// request-rate limit to a response.
fn with_rate_headers<T>(mut response: Response<T>, rate: Option<RateState>) -> Response<T> {
    if let Some(rate) = rate {
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
        let mut started = self.start(request).await?;
        let mut text = String::new();
        let mut logprobs = Vec::new();
        while let Some(event) = started.events.recv().await {
            match event {
                JobEvent::Delta {
                    text: delta,
                    logprob,
                } => {
                    text.push_str(&delta);
                    if started.logprobs
                        && let Some((token, lp)) = logprob
                    {
                        logprobs.push(logprob_to_pb(&started.served, token, lp.logprob));
                    }
                }
                JobEvent::Finished { reason, usage } => {
                    let usage_pb = usage_to_pb(&usage, &started.model, started.prices.as_deref());
                    let response = GenerateResponse {
                        request_id: started.request_id,
                        model: started.model,
                        text,
                        finish_reason: finish_to_pb(reason).into(),
                        usage: Some(usage_pb),
                        timings: Some(timings_to_pb(&usage)),
                        logprobs,
                    };
                    return Ok(with_rate_headers(Response::new(response), started.rate));
                }
                JobEvent::Failed { failure, .. } => return Err(failure_to_status(&failure)),
            }
        }
        Err(Status::internal(
            "the worker ended the request without an answer",
        ))
    }

    type GenerateStreamStream = ResponseStream<GenerateStreamResponse>;

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let started = self.start(request).await?;
        let request_id = started.request_id.clone();
        let served = started.served.clone();
        let want_logprobs = started.logprobs;
        let rate = started.rate;
        let (model, prices) = (started.model, started.prices);
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(started.events).map(
            move |event| {
                let event = match event {
                    JobEvent::Delta { text, logprob } => {
                        let logprobs = match (want_logprobs, logprob) {
                            (true, Some((token, lp))) => {
                                vec![logprob_to_pb(&served, token, lp.logprob)]
                            }
                            _ => Vec::new(),
                        };
                        generate_stream_response::Event::Delta(TextDelta { text, logprobs })
                    }
                    JobEvent::Finished { reason, usage } => {
                        generate_stream_response::Event::Complete(GenerateComplete {
                            finish_reason: finish_to_pb(reason).into(),
                            usage: Some(usage_to_pb(&usage, &model, prices.as_deref())),
                            timings: Some(timings_to_pb(&usage)),
                        })
                    }
                    JobEvent::Failed { failure, .. } => return Err(failure_to_status(&failure)),
                };
                Ok(GenerateStreamResponse {
                    request_id: request_id.clone(),
                    event: Some(event),
                })
            },
        );
        Ok(with_rate_headers(Response::new(Box::pin(stream)), rate))
    }

    async fn count_tokens(
        &self,
        request: Request<CountTokensRequest>,
    ) -> Result<Response<CountTokensResponse>, Status> {
        let tenant = Self::tenant(&request)?;
        let r = request.into_inner();
        let served = self.model(&r.model)?;
        let tokens = Self::tokenize(&served, &r.prompt, &r.messages)?;
        let permit = self.admit(&tenant, Cost::default()).await?;
        let rate = permit.rate_state();
        permit.settle(0).await;
        let response = CountTokensResponse {
            token_count: u32::try_from(tokens.len()).unwrap_or(u32::MAX),
            token_ids: if r.return_token_ids {
                tokens
            } else {
                Vec::new()
            },
        };
        Ok(with_rate_headers(Response::new(response), rate))
    }

    async fn list_models(
        &self,
        request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        let tenant = Self::tenant(&request)?;
        let permit = self.admit(&tenant, Cost::default()).await?;
        let rate = permit.rate_state();
        permit.settle(0).await;
        let models = self
            .registry
            .iter()
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
            rate,
        ))
    }
}
