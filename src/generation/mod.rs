//! The request path of a generation, shared by every front end: one
//! validation and tokenization (a [`ValidRequest`] from a [`GenerateInput`],
//! whichever wire format it came in), the request id's claim, the tenant's
//! limits, the hand-off to serving, and the job's events back as
//! [`Update`]s ending in one [`Answer`], which is kept for duplicates before
//! the client sees its end.
//!
//! The gRPC (`api::inference`) and HTTP (`http`) front ends only translate
//! their formats to and from these types, so the two cannot drift. Knows
//! neither protobuf nor HTTP.

mod answer;
mod error;
mod request;

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::Instrument as _;

pub use answer::{Answer, AnswerUsage, Cost, Finish, LogprobEntry, Update};
pub use error::GenerationError;
pub use request::{GenerateInput, MAX_REQUEST_ID_LEN, ValidRequest};

use crate::auth::TenantPrincipal;
use crate::billing::quote::{Consumption, PlanPrices, PriceCache};
use crate::error::Classified as _;
use crate::idempotency::{Claim, Claimed, Idempotency, RequestKey};
use crate::limits::{Cost as LimitCost, Headroom, Limiter, Permit, Used};
use crate::metering::Metering;
use crate::model::sampling::{SamplingParams, TokenLogprob};
use crate::serving::tokenize::TokenizePool;
use crate::serving::{
    Failure, IsolationKey, Job, JobEvent, JobUsage, ModelRegistry, Requester, ServedModel,
    SpendMeter,
};
use crate::store::now_us;

/// The shared request path; cheap to clone.
#[derive(Clone)]
pub struct Generation {
    limiter: Arc<Limiter>,
    registry: ModelRegistry,
    metering: Arc<Metering>,
    prices: Arc<PriceCache>,
    claims: Arc<Idempotency>,
    tokenize_pool: TokenizePool,
}

/// What a generation request turned into.
pub enum Start {
    /// A job is running.
    Run(Running),
    /// The stored answer of the completed request that first used this
    /// `request_id`: no work, no tokens, no billing.
    Replay(Answer),
}

/// A request admitted and handed to serving.
pub struct Running {
    request_id: String,
    model: String,
    served: Arc<ServedModel>,
    events: mpsc::UnboundedReceiver<JobEvent>,
    logprobs: bool,
    headroom: Headroom,
    /// The tenant's plan, for quoting the cost with the answer.
    prices: Option<Arc<PlanPrices>>,
    /// The client's request id, owned until the answer is kept for
    /// duplicates.
    claim: Option<Claim>,
    text: String,
    kept_logprobs: Vec<LogprobEntry>,
    ended: bool,
}

impl Generation {
    pub fn new(
        limiter: Arc<Limiter>,
        registry: ModelRegistry,
        metering: Arc<Metering>,
        prices: Arc<PriceCache>,
        claims: Arc<Idempotency>,
    ) -> Generation {
        Generation {
            limiter,
            registry,
            metering,
            prices,
            claims,
            tokenize_pool: TokenizePool::for_this_machine(),
        }
    }

    /// The served models.
    pub fn models(&self) -> impl Iterator<Item = &Arc<ServedModel>> {
        self.registry.iter()
    }

    /// The served model `id`; the error names the `model` field.
    pub fn model(&self, id: &str) -> Result<Arc<ServedModel>, GenerationError> {
        if id.is_empty() {
            return Err(GenerationError::invalid(
                "model",
                "required; the model list shows the served ones",
            ));
        }
        Ok(self.registry.get(id)?.clone())
    }

    /// Admits a call that generates nothing (a count, a listing) against the
    /// tenant's request rate.
    pub async fn admit_call(&self, tenant: &TenantPrincipal) -> Result<Headroom, GenerationError> {
        let permit = self.admit(tenant, LimitCost::default()).await?;
        let headroom = permit.headroom();
        permit.settle(Used::NOTHING).await;
        Ok(headroom)
    }

    /// Admits against the key's own limits first, then the tenant's; a
    /// tenant refusal hands the key's reservation back.
    async fn admit(
        &self,
        tenant: &TenantPrincipal,
        cost: LimitCost,
    ) -> Result<Permit, GenerationError> {
        let span = crate::trace_span!("limits.admit");
        let admitted = self
            .admit_untraced(tenant, cost)
            .instrument(span.clone())
            .await;
        let outcome = match &admitted {
            Ok(_) => "admitted",
            Err(error) if error.kind() == crate::error::ErrorKind::ResourceExhausted => "refused",
            Err(_) => "failed",
        };
        crate::traces::set(&span, "ascend.limits.outcome", outcome);
        admitted
    }

    async fn admit_untraced(
        &self,
        tenant: &TenantPrincipal,
        cost: LimitCost,
    ) -> Result<Permit, GenerationError> {
        let key = match tenant.key_limits.is_empty() {
            true => None,
            false => Some(
                self.limiter
                    .admit(&key_subject(tenant), &tenant.key_limits, cost)
                    .await
                    .map_err(GenerationError::KeyLimit)?,
            ),
        };
        match self
            .limiter
            .admit(&tenant.tenant_id, &tenant.limits, cost)
            .await
        {
            Ok(permit) => Ok(permit.with_inner(key)),
            Err(refused) => {
                if let Some(key) = key {
                    key.settle(Used::NOTHING).await;
                }
                Err(refused.into())
            }
        }
    }

    /// A request refused before admission still counts against the
    /// tenant's request rate, so a flood of bad requests is throttled like
    /// a flood of good ones; over the rate, the rate refusal is the answer.
    pub async fn refused(
        &self,
        tenant: &TenantPrincipal,
        error: GenerationError,
    ) -> GenerationError {
        match self.admit_call(tenant).await {
            Ok(_) => error,
            Err(limited) => limited,
        }
    }

    /// The prompt or chat messages of `input` as token ids: refused by its
    /// size alone when it cannot fit the context window, tokenized off the
    /// async runtime.
    pub async fn tokenize(
        &self,
        served: &Arc<ServedModel>,
        input: &GenerateInput,
    ) -> Result<Vec<u32>, GenerationError> {
        let chat = match (input.prompt.is_empty(), input.messages.is_empty()) {
            (false, false) => {
                return Err(GenerationError::invalid(
                    "prompt",
                    "set either prompt or messages, not both",
                ));
            }
            (true, true) => {
                return Err(GenerationError::invalid(
                    "prompt",
                    "required (or messages); it must not be empty",
                ));
            }
            (false, true) => None,
            (true, false) => Some(input.messages.clone()),
        };
        let field = if chat.is_some() { "messages" } else { "prompt" };
        let bytes = input.prompt_bytes();
        let context = served.context_length;
        if let Some(at_least) = served.tokenizer.min_tokens_for_bytes(bytes)
            && at_least >= context
        {
            return Err(GenerationError::invalid(
                field,
                format!(
                    "{bytes} bytes encode to at least {at_least} tokens; the context window is {context} tokens"
                ),
            ));
        }
        let tokenizer = served.tokenizer.clone();
        let prompt = input.prompt.clone();
        let parse_special_tokens = input.parse_special_tokens;
        let tokens = self
            .tokenize_pool
            .run(bytes, move || match chat {
                None if parse_special_tokens => tokenizer.encode(&prompt, true),
                None => tokenizer.encode_plain(&prompt, true),
                Some(chat) => tokenizer.encode_chat(&chat),
            })
            .await?
            .map_err(|e| GenerationError::invalid(field, e))?;
        if tokens.is_empty() {
            return Err(GenerationError::invalid(field, "encodes to no tokens"));
        }
        Ok(tokens)
    }

    /// Validation and tokenization: everything a request can be refused for
    /// before it claims its id or touches a limit.
    pub async fn validate(&self, input: &GenerateInput) -> Result<ValidRequest, GenerationError> {
        let served = self.model(&input.model)?;
        let (request_id, client_request_id) = request::request_id(input.request_id.as_deref())?;
        let prompt = self
            .tokenize(&served, input)
            .instrument(crate::trace_span!("tokenize"))
            .await?;
        crate::traces::set_current("gen_ai.usage.input_tokens", prompt.len() as i64);
        let params = request::sampling(input, &served, prompt.len())?;
        Ok(ValidRequest {
            served,
            prompt,
            params,
            priority: input.priority,
            request_id,
            client_request_id,
        })
    }

    /// Validates `input`, claims its request id, admits it against the
    /// tenant's limits and hands it to serving. `received_at` is when the
    /// front end received it; `deadline`, when the client stops waiting.
    pub async fn start(
        &self,
        tenant: Arc<TenantPrincipal>,
        input: &GenerateInput,
        received_at: Instant,
        deadline: Option<Instant>,
    ) -> Result<Start, GenerationError> {
        let valid = match self.validate(input).await {
            Ok(valid) => valid,
            Err(error) => return Err(self.refused(&tenant, error).await),
        };
        let ValidRequest {
            served,
            prompt,
            params,
            priority,
            request_id,
            client_request_id,
        } = valid;
        crate::traces::set_current("ascend.request_id", request_id.clone());
        crate::traces::set_current("gen_ai.request.model", served.settings.id.clone());
        // Duplicates are decided before any work: a replay costs no work, no
        // tokens and no billing, only a request against the rate, as a
        // refusal does.
        let claim = if client_request_id {
            let key = RequestKey {
                tenant_id: tenant.tenant_id.clone(),
                request_id: request_id.clone(),
            };
            match self
                .claims
                .claim(key, &input.fingerprint())
                .instrument(crate::trace_span!("idempotency.claim"))
                .await
            {
                Ok(Claimed::New(claim)) => Some(claim),
                Ok(Claimed::Replay(bytes)) => {
                    self.admit_call(&tenant).await?;
                    let Some(answer) = Answer::decode(&bytes) else {
                        tracing::error!(request_id, "a stored answer does not decode");
                        return Err(GenerationError::StoredAnswerUnreadable);
                    };
                    return Ok(Start::Replay(answer));
                }
                Err(refused) => return Err(self.refused(&tenant, refused.into()).await),
            }
        } else {
            None
        };
        let metered_id = claim
            .as_ref()
            .map_or_else(|| request_id.clone(), Claim::metered_request_id);
        let prices = self.prices.plan(&tenant.price_plan).await;
        let budgeted = self
            .metering
            .admitting()
            .map_err(GenerationError::from)
            .and_then(|()| self.budgeted(&tenant, &served, prices.as_ref(), &prompt, &params));
        let admitted = match budgeted {
            Ok((spend_nanos, meter)) => {
                let cost = LimitCost {
                    tokens: prompt.len() as u64 + params.max_tokens as u64,
                    spend_nanos,
                };
                self.admit(&tenant, cost)
                    .await
                    .map(|permit| (permit, meter))
            }
            Err(e) => Err(e),
        };
        let (permit, spend) = match admitted {
            Ok(permit) => permit,
            Err(error) => {
                // Freed before the answer, so the client's retry finds it free.
                if let Some(claim) = claim {
                    claim.release().await;
                }
                return Err(error);
            }
        };
        let headroom = permit.headroom();
        let (sender, events) = mpsc::unbounded_channel();
        let logprobs = params.logprobs.is_some();
        let job = Job {
            requester: Requester {
                request_id: metered_id,
                tenant_id: tenant.tenant_id.clone(),
                tenant_slug: tenant.tenant_slug.clone(),
                key_id: tenant.key_id.clone(),
                model: served.settings.id.clone(),
                weight: tenant.scheduling_weight,
            },
            isolation: isolation_key(&tenant),
            prefix_hashes: Vec::new(),
            preferred_worker: None,
            prompt,
            params,
            priority,
            deadline,
            received_at,
            started_at_us: now_us(),
            permit: Some(permit),
            spend,
            events: sender,
            trace: crate::traces::JobTrace::in_current_span(),
        };
        if let Err(refused) = served.submit(job, priority) {
            let (full, mut job) = *refused;
            if let Some(permit) = job.permit.take() {
                permit.settle(Used::NOTHING).await;
            }
            if let Some(claim) = claim {
                claim.release().await;
            }
            return Err(crate::serving::ServingError::from(full).into());
        }
        let mut claim = claim;
        if let Some(claim) = claim.as_mut() {
            claim.mark_started();
        }
        Ok(Start::Run(Running {
            request_id,
            model: served.settings.id.clone(),
            served,
            events,
            logprobs,
            headroom,
            prices,
            claim,
            text: String::new(),
            kept_logprobs: Vec::new(),
            ended: false,
        }))
    }
}

impl Generation {
    /// For a tenant with a monthly budget: the request's worst-case cost in
    /// nanos (prompt tokens all computed, `max_tokens` all generated, at the
    /// price in effect now) and the meter that prices its exact usage when
    /// it ends. `(0, None)` without a budget. A model without a price under
    /// the plan is refused: its usage could not be priced into the spend
    /// the budget is seeded from (nor into the invoice).
    fn budgeted(
        &self,
        tenant: &TenantPrincipal,
        served: &Arc<ServedModel>,
        prices: Option<&Arc<PlanPrices>>,
        prompt: &[u32],
        params: &SamplingParams,
    ) -> Result<(u64, Option<SpendMeter>), GenerationError> {
        if tenant.limits.monthly_budget.is_none() && tenant.key_limits.monthly_budget.is_none() {
            return Ok((0, None));
        }
        let plan = prices.cloned().ok_or(GenerationError::BudgetUnpriced)?;
        let model = served.settings.id.clone();
        let worst = Consumption {
            prompt_tokens: prompt.len() as u64,
            cached_prompt_tokens: 0,
            completion_tokens: params.max_tokens as u64,
            energy_mj: 0,
        };
        let nanos =
            |quote: crate::billing::quote::Quote| u64::try_from(quote.amount_nanos).unwrap_or(0);
        let Some(reserve) = plan
            .quote(&model, &served.device_profile, now_us(), worst)
            .map(nanos)
        else {
            return Err(GenerationError::NoPrice(model));
        };
        let meter: SpendMeter = Arc::new(move |usage: &JobUsage| {
            plan.quote(&model, &usage.device_profile, now_us(), consumption(usage))
                .map_or(0, nanos)
        });
        Ok((reserve, Some(meter)))
    }
}

impl Running {
    /// The request's id (the client's, or the one given to it).
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// What the admission left of the tenant's rate limits.
    pub fn headroom(&self) -> Headroom {
        self.headroom
    }

    /// The next update; `None` after the last. The answer is kept for
    /// duplicates before [`Update::Done`] is returned.
    pub async fn next(&mut self) -> Option<Result<Update, GenerationError>> {
        if self.ended {
            return None;
        }
        let Some(event) = self.events.recv().await else {
            self.ended = true;
            return Some(Err(GenerationError::NoAnswer));
        };
        match event {
            JobEvent::Delta { text, logprob } => {
                let logprobs = match logprob {
                    Some((token, lp)) if self.logprobs => Some(self.logprob_entry(token, &lp)),
                    _ => None,
                };
                self.text.push_str(&text);
                if let Some(entry) = &logprobs {
                    self.kept_logprobs.push(entry.clone());
                }
                Some(Ok(Update::Delta { text, logprobs }))
            }
            JobEvent::Finished { reason, usage } => {
                self.ended = true;
                let answer = Answer {
                    request_id: self.request_id.clone(),
                    model: self.model.clone(),
                    text: std::mem::take(&mut self.text),
                    finish: reason.into(),
                    usage: self.usage(&usage),
                    logprobs: std::mem::take(&mut self.kept_logprobs),
                };
                if let Some(claim) = self.claim.take() {
                    claim.complete(answer.encode()).await;
                }
                Some(Ok(Update::Done(Box::new(answer))))
            }
            JobEvent::Failed { failure, .. } => {
                self.ended = true;
                Some(Err(match failure {
                    Failure::DeadlineExceeded => GenerationError::DeadlineExceeded,
                    Failure::Cancelled => GenerationError::Cancelled,
                    Failure::Internal(message) => GenerationError::Failed(message),
                }))
            }
        }
    }

    /// Runs the request to its end: the whole answer.
    pub async fn finish(mut self) -> Result<Answer, GenerationError> {
        while let Some(update) = self.next().await {
            if let Update::Done(answer) = update? {
                return Ok(*answer);
            }
        }
        Err(GenerationError::NoAnswer)
    }

    fn logprob_entry(&self, token: u32, lp: &TokenLogprob) -> LogprobEntry {
        let text = |id: u32| {
            self.served
                .tokenizer
                .decode(&[id], false)
                .unwrap_or_default()
        };
        LogprobEntry {
            token_id: token,
            token: text(token),
            logprob: lp.logprob,
            top: lp.top.iter().map(|&(id, p)| (id, text(id), p)).collect(),
        }
    }

    fn usage(&self, usage: &JobUsage) -> AnswerUsage {
        let cost = self.prices.as_deref().and_then(|plan| {
            plan.quote(
                &self.model,
                &usage.device_profile,
                now_us(),
                consumption(usage),
            )
        });
        AnswerUsage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cached_prompt_tokens: usage.cached_prompt_tokens,
            device_time_us: usage.device_time_us,
            energy_mj: usage.energy_mj,
            cost: cost.map(Cost::from),
            queue_time_us: usage.queue_time_us,
            time_to_first_token_us: usage.ttft_us,
            total_time_us: usage.total_time_us,
        }
    }
}

/// The limiter subject of a tenant's API key: its own counters, apart from
/// the tenant's (tenant ids are UUIDs, so the two never meet).
pub fn key_subject(tenant: &TenantPrincipal) -> String {
    format!("key:{}/{}", tenant.tenant_id, tenant.key_id)
}

/// The tenant and key of a subject made by [`key_subject`].
pub fn parse_key_subject(subject: &str) -> Option<(&str, &str)> {
    subject.strip_prefix("key:")?.split_once('/')
}

/// What a finished job used, in the units prices are per: the one
/// conversion both its quoted cost and its budget settlement price.
fn consumption(usage: &JobUsage) -> Consumption {
    Consumption {
        prompt_tokens: u64::from(usage.prompt_tokens),
        cached_prompt_tokens: u64::from(usage.cached_prompt_tokens),
        completion_tokens: u64::from(usage.completion_tokens),
        energy_mj: usage.energy_mj,
    }
}

/// Whose cached prompt prefixes a tenant's request may reuse: its own, unless the tenant
/// opted in to the shared pool.
fn isolation_key(tenant: &TenantPrincipal) -> IsolationKey {
    match tenant.cache_scope {
        crate::tenancy::CacheScope::Tenant => IsolationKey::tenant(&tenant.tenant_id),
        crate::tenancy::CacheScope::Shared => IsolationKey::shared(),
    }
}
