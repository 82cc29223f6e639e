//! The `Inference` service: generation, token counting, model listing.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::convert::principal;
use super::pb::v1::inference_server::Inference;
use super::pb::v1::{
    CountTokensRequest, CountTokensResponse, GenerateRequest, GenerateResponse,
    GenerateStreamResponse, ListModelsRequest, ListModelsResponse,
};
use super::status::{not_implemented, to_status};
use crate::limits::{Cost, Limiter, Permit, RateState};

/// Handlers of `ascend.gateway.v1.Inference`.
#[derive(Clone)]
pub struct InferenceApi {
    limiter: Arc<Limiter>,
}

impl InferenceApi {
    pub fn new(limiter: Arc<Limiter>) -> InferenceApi {
        InferenceApi { limiter }
    }

    /// Applies the caller's tenant limits to this request.
    async fn admit<T>(&self, request: &Request<T>, cost: Cost) -> Result<Permit, Status> {
        let principal = principal(request)?;
        let Some(tenant) = principal.tenant() else {
            // The auth layer lets only tenant keys reach Inference.
            return Err(Status::permission_denied(
                "Inference needs a tenant API key",
            ));
        };
        self.limiter
            .admit(&tenant.tenant_id, &tenant.limits, cost)
            .await
            .map_err(|e| to_status(&e))
    }
}

/// Adds the IETF draft `ratelimit-policy` / `ratelimit` fields for the
/// request-rate limit to a response.
fn with_rate_headers<T>(mut response: Response<T>, rate: Option<RateState>) -> Response<T> {
    if let Some(rate) = rate {
        let window = rate.window.as_secs().max(1);
        let refill = rate.window.as_secs_f64()
            * f64::from(rate.limit - rate.remaining.min(rate.limit))
            / f64::from(rate.limit.max(1));
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

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Inference for InferenceApi {
    async fn generate(
        &self,
        _request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        Err(not_implemented("Inference.Generate"))
    }

    type GenerateStreamStream = ResponseStream<GenerateStreamResponse>;

    async fn generate_stream(
        &self,
        _request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        Err(not_implemented("Inference.GenerateStream"))
    }

    async fn count_tokens(
        &self,
        request: Request<CountTokensRequest>,
    ) -> Result<Response<CountTokensResponse>, Status> {
        let permit = self.admit(&request, Cost::default()).await?;
        permit.settle(0).await;
        Err(not_implemented("Inference.CountTokens"))
    }

    async fn list_models(
        &self,
        request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        let permit = self.admit(&request, Cost::default()).await?;
        let rate = permit.rate_state();
        permit.settle(0).await;
        // No model is served until the serving layer lands: an honest empty list.
        Ok(with_rate_headers(
            Response::new(ListModelsResponse::default()),
            rate,
        ))
    }
}
