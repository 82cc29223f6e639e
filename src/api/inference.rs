//! The `Inference` service: validation and tokenization of requests, tenant
//! limits, then serving; text deltas and usage back to the client.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt as _;
use prost::Message as _;
use tokio::sync::mpsc;
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
use crate::billing::quote::{Consumption, PlanPrices, PriceCache};
use crate::idempotency::{Claim, Claimed, Fingerprint, Idempotency, RequestKey};
use crate::limits::{Cost, Limiter, Permit, RateState};
use crate::metering::Metering;
use crate::model::FinishReason;
use crate::model::sampling::SamplingParams;
use crate::model::tokenizer::{ChatMessage, Role};
use crate::serving::tokenize::TokenizePool;
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
    claims: Arc<Idempotency>,
    tokenize_pool: TokenizePool,
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
    /// The client's request id, owned by this request until its answer is
    /// stored for duplicates.
    claim: Option<Claim>,
}

/// A generation request validated and tokenized, not yet admitted.
struct Prepared {
    served: Arc<ServedModel>,
    prompt: Vec<u32>,
    params: SamplingParams,
    priority: Priority,
    /// The client's id, or a fresh one.
    request_id: String,
}

/// What a generation request turned into: a job running, or the stored
/// answer of the completed request that first used its `request_id`.
enum Start {
    Run(Started),
    Replay(GenerateResponse),
}

/// Metadata on a response that replays a stored answer.
const REPLAY_HEADER: &str = "idempotent-replayed";

impl InferenceApi {
    pub fn new(
        limiter: Arc<Limiter>,
        registry: ModelRegistry,
        metering: Arc<Metering>,
        prices: Arc<PriceCache>,
        claims: Arc<Idempotency>,
    ) -> InferenceApi {
        InferenceApi {
            limiter,
            registry,
            metering,
            prices,
            claims,
            tokenize_pool: TokenizePool::for_this_machine(),
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

    /// Prompt or chat messages to token ids, with the model's tokenizer:
    /// refused by its size alone when it cannot fit the context window,
    /// and tokenized off the runtime when large.
    async fn tokenize(
        &self,
        served: &Arc<ServedModel>,
        prompt: &str,
        messages: &[pb::ChatMessage],
        parse_special_tokens: bool,
    ) -> Result<Vec<u32>, Status> {
        let chat = match (prompt.is_empty(), messages.is_empty()) {
            (false, false) => {
                return Err(invalid("prompt", "set either prompt or messages, not both"));
            }
            (true, true) => {
                return Err(invalid(
                    "prompt",
                    "required (or messages); it must not be empty",
                ));
            }
            (false, true) => None,
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
                Some(chat)
            }
        };
        let bytes = prompt.len() + messages.iter().map(|m| m.content.len()).sum::<usize>();
        let context = served.context_length;
        if let Some(at_least) = served.tokenizer.min_tokens_for_bytes(bytes)
            && at_least >= context
        {
            let field = if chat.is_some() { "messages" } else { "prompt" };
            return Err(invalid(
                field,
                format!(
                    "{bytes} bytes encode to at least {at_least} tokens; the context window is {context} tokens"
                ),
            ));
        }
        let tokenizer = served.tokenizer.clone();
        let prompt = prompt.to_owned();
        let tokens = self
            .tokenize_pool
            .run(bytes, move || match chat {
                None if parse_special_tokens => tokenizer.encode(&prompt, true),
                None => tokenizer.encode_plain(&prompt, true),
                Some(chat) => tokenizer.encode_chat(&chat),
            })
            .await
            .map_err(|e| to_status(&e))?;
        let tokens = tokens.map_err(|e| invalid("prompt", e))?;
        if tokens.is_empty() {
            return Err(invalid("prompt", "encodes to no tokens"));
        }
        Ok(tokens)
    }

    /// A request refused before admission still counts against the
    /// tenant's request rate, so a flood of bad requests is throttled like
    /// a flood of good ones; over the rate, the rate refusal is the answer.
    async fn refused(&self, tenant: &TenantPrincipal, status: Status) -> Status {
        match self.admit(tenant, Cost::default()).await {
            Ok(permit) => {
                permit.settle(0).await;
                status
            }
            Err(limited) => limited,
        }
    }

    async fn start(&self, request: Request<GenerateRequest>) -> Result<Start, Status> {
        let received_at = Instant::now();
        let tenant = Self::tenant(&request)?;
        let deadline = request.extensions().get::<ClientDeadline>().map(|d| d.0);
        let r = request.into_inner();
        let prepared = match self.prepare(&r).await {
            Ok(prepared) => prepared,
            Err(status) => return Err(self.refused(&tenant, status).await),
        };
        self.run(tenant, r, prepared, received_at, deadline).await
    }

    /// Validation and tokenization: everything a request can be refused for
    /// before it claims its id or touches a limit.
    async fn prepare(&self, r: &GenerateRequest) -> Result<Prepared, Status> {
        let served = self.model(&r.model)?;
        let settings = &served.settings;
        let prompt = self
            .tokenize(&served, &r.prompt, &r.messages, r.parse_special_tokens)
            .await?;
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
        Ok(Prepared {
            served,
            prompt,
            params,
            priority,
            request_id,
        })
    }

    /// Claims the request id, admits the request against the tenant's
    /// limits and hands it to serving.
    async fn run(
        &self,
        tenant: Arc<TenantPrincipal>,
        mut r: GenerateRequest,
        prepared: Prepared,
        received_at: Instant,
        deadline: Option<Instant>,
    ) -> Result<Start, Status> {
        let Prepared {
            served,
            prompt,
            params,
            priority,
            request_id,
        } = prepared;
        let settings = &served.settings;
        let max_tokens = params.max_tokens as u64;
        // Duplicates are decided before any work: a replay costs no work, no
        // tokens and no billing, only a request against the rate, as a
        // refusal does.
        let claim = if r.request_id.is_empty() {
            None
        } else {
            let key = RequestKey {
                tenant_id: tenant.tenant_id.clone(),
                request_id: request_id.clone(),
            };
            let claimed = match self.claims.claim(key, &fingerprint(&mut r)).await {
                Ok(claimed) => claimed,
                Err(refused) => return Err(self.refused(&tenant, to_status(&refused)).await),
            };
            match claimed {
                Claimed::New(claim) => Some(claim),
                Claimed::Replay(answer) => {
                    // Free, but not unlimited: a replay counts against the
                    // tenant's request rate like any call.
                    let permit = self.admit(&tenant, Cost::default()).await?;
                    permit.settle(0).await;
                    let stored = GenerateResponse::decode(answer.as_slice()).map_err(|e| {
                        tracing::error!(error = %e, "a stored answer does not decode");
                        Status::internal("the stored answer of this request_id is unreadable")
                    })?;
                    return Ok(Start::Replay(stored));
                }
            }
        };
        let metered_id = claim
            .as_ref()
            .map_or_else(|| request_id.clone(), Claim::metered_request_id);
        let cost = Cost {
            tokens: prompt.len() as u64 + max_tokens,
        };
        let admitted = match self.metering.admitting() {
            Ok(()) => self.admit(&tenant, cost).await,
            Err(e) => Err(to_status(&e)),
        };
        let permit = match admitted {
            Ok(permit) => permit,
            Err(status) => {
                // Freed before the answer, so the client's retry finds it free.
                if let Some(claim) = claim {
                    claim.release().await;
                }
                return Err(status);
            }
        };
        let rate = permit.rate_state();
        let prices = self.prices.plan(&tenant.price_plan).await;
        let (sender, events) = mpsc::unbounded_channel();
        let job = Job {
            requester: Requester {
                request_id: metered_id,
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
            if let Some(claim) = claim {
                claim.release().await;
            }
            return Err(to_status(&ServingError::from(full)));
        }
        let mut claim = claim;
        if let Some(claim) = claim.as_mut() {
            claim.mark_started();
        }
        Ok(Start::Run(Started {
            request_id,
            model: served.settings.id.clone(),
            events,
            served,
            logprobs: r.logprobs,
            rate,
            prices,
            claim,
        }))
    }
}

/// The request as the client sent it, without its id, for telling a retry
/// from another request under the same id.
fn fingerprint(request: &mut GenerateRequest) -> Fingerprint {
    // The id is taken out and put back rather than the request cloned: a
    // prompt may be megabytes.
    let id = std::mem::take(&mut request.request_id);
    let fingerprint = Fingerprint::of(&request.encode_to_vec());
    request.request_id = id;
    fingerprint
}

fn replayed<T>(message: T) -> Response<T> {
    let mut response = Response::new(message);
    response.metadata_mut().insert(
        REPLAY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    response
}

/// A stored answer as a stream: its text as one delta, then its final
/// message.
fn replay_stream(stored: GenerateResponse) -> ResponseStream<GenerateStreamResponse> {
    let mut messages = Vec::with_capacity(2);
    if !stored.text.is_empty() || !stored.logprobs.is_empty() {
        messages.push(Ok(GenerateStreamResponse {
            request_id: stored.request_id.clone(),
            event: Some(generate_stream_response::Event::Delta(TextDelta {
                text: stored.text,
                logprobs: stored.logprobs,
            })),
        }));
    }
    messages.push(Ok(GenerateStreamResponse {
        request_id: stored.request_id,
        event: Some(generate_stream_response::Event::Complete(
            GenerateComplete {
                finish_reason: stored.finish_reason,
                usage: stored.usage,
                timings: stored.timings,
            },
        )),
    }));
    Box::pin(tokio_stream::iter(messages))
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
        let mut started = match self.start(request).await? {
            Start::Run(started) => started,
            Start::Replay(stored) => return Ok(replayed(stored)),
        };
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
                    if let Some(claim) = started.claim.take() {
                        claim.complete(response.encode_to_vec()).await;
                    }
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
        let mut started = match self.start(request).await? {
            Start::Run(started) => started,
            Start::Replay(stored) => return Ok(replayed(replay_stream(stored))),
        };
        let request_id = started.request_id.clone();
        let served = started.served.clone();
        let want_logprobs = started.logprobs;
        let rate = started.rate;
        let (model, prices) = (started.model.clone(), started.prices.clone());
        // With a client request id, the deltas are kept so the final answer
        // can be stored for duplicates before the last message goes out.
        let mut answer = started.claim.take().map(|claim| {
            let stored = GenerateResponse {
                request_id: request_id.clone(),
                model: model.clone(),
                ..Default::default()
            };
            (claim, stored)
        });
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(started.events).then(
            move |event| {
                let mut finished_answer = None;
                let event = match event {
                    JobEvent::Delta { text, logprob } => {
                        let logprobs = match (want_logprobs, logprob) {
                            (true, Some((token, lp))) => {
                                vec![logprob_to_pb(&served, token, lp.logprob)]
                            }
                            _ => Vec::new(),
                        };
                        if let Some((_, stored)) = answer.as_mut() {
                            stored.text.push_str(&text);
                            stored.logprobs.extend(logprobs.iter().cloned());
                        }
                        Ok(generate_stream_response::Event::Delta(TextDelta {
                            text,
                            logprobs,
                        }))
                    }
                    JobEvent::Finished { reason, usage } => {
                        let complete = GenerateComplete {
                            finish_reason: finish_to_pb(reason).into(),
                            usage: Some(usage_to_pb(&usage, &model, prices.as_deref())),
                            timings: Some(timings_to_pb(&usage)),
                        };
                        if let Some((claim, mut stored)) = answer.take() {
                            stored.finish_reason = complete.finish_reason;
                            stored.usage = complete.usage.clone();
                            stored.timings = complete.timings;
                            finished_answer = Some((claim, stored.encode_to_vec()));
                        }
                        Ok(generate_stream_response::Event::Complete(complete))
                    }
                    JobEvent::Failed { failure, .. } => Err(failure_to_status(&failure)),
                };
                let request_id = request_id.clone();
                async move {
                    if let Some((claim, bytes)) = finished_answer {
                        claim.complete(bytes).await;
                    }
                    event.map(|event| GenerateStreamResponse {
                        request_id,
                        event: Some(event),
                    })
                }
            },
        );
        let stream: ResponseStream<GenerateStreamResponse> = Box::pin(stream);
        Ok(with_rate_headers(Response::new(stream), rate))
    }

    async fn count_tokens(
        &self,
        request: Request<CountTokensRequest>,
    ) -> Result<Response<CountTokensResponse>, Status> {
        let tenant = Self::tenant(&request)?;
        let r = request.into_inner();
        // Admitted first: a refused count costs the tenant a request too.
        let permit = self.admit(&tenant, Cost::default()).await?;
        let rate = permit.rate_state();
        permit.settle(0).await;
        let served = self.model(&r.model)?;
        let tokens = self
            .tokenize(&served, &r.prompt, &r.messages, r.parse_special_tokens)
            .await?;
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
