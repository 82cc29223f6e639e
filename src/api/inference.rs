//! The `Inference` service: generation, token counting, model listing.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::pb::v1::inference_server::Inference;
use super::pb::v1::{
    CountTokensRequest, CountTokensResponse, GenerateRequest, GenerateResponse,
    GenerateStreamResponse, ListModelsRequest, ListModelsResponse,
};
use super::status::not_implemented;

/// Handlers of `ascend.gateway.v1.Inference`.
#[derive(Debug, Clone, Default)]
pub struct InferenceApi {}

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
        _request: Request<CountTokensRequest>,
    ) -> Result<Response<CountTokensResponse>, Status> {
        Err(not_implemented("Inference.CountTokens"))
    }

    async fn list_models(
        &self,
        _request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        // No model is served until the serving layer lands: an honest empty list.
        Ok(Response::new(ListModelsResponse::default()))
    }
}
