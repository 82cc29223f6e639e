//! The reference for the overhead benchmark: a bare tonic server with the
//! same `Inference` contract whose `GenerateStream` echoes the prompt at
//! once, with no authentication, limits, queue, tokenizer or metering.
//! Whatever the gateway's echo engine costs beyond this is the gateway.
//!
//! Knows the generated service trait only.

use std::net::SocketAddr;
use std::pin::Pin;

use tokio::sync::oneshot;
use tokio_stream::Stream;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use super::BenchError;
use crate::api::pb::v1::generate_stream_response::Event;
use crate::api::pb::v1::inference_server::{Inference, InferenceServer};
use crate::api::pb::v1::{
    CountTokensRequest, CountTokensResponse, GenerateComplete, GenerateRequest, GenerateResponse,
    GenerateStreamResponse, ListModelsRequest, ListModelsResponse, TextDelta, Usage,
};

struct BareEcho;

type EchoStream = Pin<Box<dyn Stream<Item = Result<GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for BareEcho {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(GenerateResponse {
            text: r.prompt,
            ..Default::default()
        }))
    }

    type GenerateStreamStream = EchoStream;

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<EchoStream>, Status> {
        let r = request.into_inner();
        // Words stand in for tokens: no tokenizer on the bare path.
        let words = u32::try_from(r.prompt.split_whitespace().count()).unwrap_or(u32::MAX);
        let messages = [
            Event::Delta(TextDelta {
                text: r.prompt,
                logprobs: Vec::new(),
            }),
            Event::Complete(GenerateComplete {
                usage: Some(Usage {
                    prompt_tokens: words,
                    completion_tokens: words,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ]
        .map(|event| {
            Ok(GenerateStreamResponse {
                request_id: String::new(),
                event: Some(event),
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(messages))))
    }

    async fn count_tokens(
        &self,
        _: Request<CountTokensRequest>,
    ) -> Result<Response<CountTokensResponse>, Status> {
        Err(Status::unimplemented("the bare echo server only echoes"))
    }

    async fn list_models(
        &self,
        _: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        Err(Status::unimplemented("the bare echo server only echoes"))
    }
}

/// A running bare echo server.
pub struct BareServer {
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl BareServer {
    pub async fn start() -> Result<BareServer, BenchError> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| BenchError::Gateway(format!("bare server: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| BenchError::Gateway(format!("bare server: {e}")))?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(InferenceServer::new(BareEcho))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "bare echo server failed");
            }
        });
        Ok(BareServer { addr, stop, task })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}
