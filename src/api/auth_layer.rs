//! The tower layer in front of every service: decides what each RPC path
//! requires, authenticates the caller, and attaches the [`Principal`] to the
//! request's extensions for handlers to read.
//!
//! Secure by default: every path needs a credential except the explicit
//! [`PUBLIC_PREFIXES`]. An RPC added later cannot skip authentication by
//! accident; at worst it asks for the admin token.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;
use tower_layer::Layer;
use tower_service::Service;

use super::deadline::{self, ClientDeadline};
use super::status::to_status;
use crate::auth::{Authenticator, Principal, Requirement};
use crate::listener::ConnInfo;
use crate::metrics::refusals::Refusals;
use crate::tenancy::Scope;
use crate::tenancy::operators::Role;

/// Paths served without credentials: health checks and reflection.
pub const PUBLIC_PREFIXES: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// What the RPC at `path` requires; `None` for the public ones.
pub fn requirement_for(path: &str) -> Option<Requirement> {
    if PUBLIC_PREFIXES
        .iter()
        .any(|prefix| path.starts_with(prefix))
    {
        return None;
    }
    let service = path
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default();
    Some(match service {
        "ascend.gateway.v1.Inference" => Requirement::Scope(Scope::Inference),
        "ascend.gateway.v1.Billing" => Requirement::AdminOrScope(Scope::BillingRead),
        // TenantAdmin, Webhooks, and anything unknown: the operator only.
        _ => Requirement::Admin,
    })
}

/// What an operator's role may call: `admin` everything; `viewer` the
/// reads (methods named Get*, List*, Export*); `billing` the reads and all
/// of Billing (prices, finalization).
pub fn role_allows(role: Role, path: &str) -> bool {
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or_default();
    let read = ["Get", "List", "Export"]
        .iter()
        .any(|prefix| method.starts_with(prefix));
    match role {
        Role::Admin => true,
        Role::Billing => read || service == "ascend.gateway.v1.Billing",
        Role::Viewer => read,
    }
}

#[derive(Clone)]
pub struct AuthLayer {
    authenticator: Arc<Authenticator>,
    refusals: Arc<Refusals>,
    admin_needs_client_cert: bool,
}

impl AuthLayer {
    /// `refusals` counts every RESOURCE_EXHAUSTED that leaves.
    /// `admin_needs_client_cert`: the operator services (every path that
    /// admits the admin token) need a client certificate the TLS handshake
    /// verified (`tls.client_ca_file`).
    pub fn new(
        authenticator: Arc<Authenticator>,
        refusals: Arc<Refusals>,
        admin_needs_client_cert: bool,
    ) -> AuthLayer {
        AuthLayer {
            authenticator,
            refusals,
            admin_needs_client_cert,
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            authenticator: self.authenticator.clone(),
            refusals: self.refusals.clone(),
            admin_needs_client_cert: self.admin_needs_client_cert,
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    authenticator: Arc<Authenticator>,
    refusals: Arc<Refusals>,
    admin_needs_client_cert: bool,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for AuthService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        // Stamped here, the first of our code a request meets (just inside
        // tonic's own grpc-timeout timer), so deadlines derived from it end
        // no later than tonic's.
        let received = Instant::now();
        let deadline = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(deadline::grpc_timeout)
            .map(|timeout| deadline::deadline(received, timeout));
        if let Some(at) = deadline {
            request.extensions_mut().insert(ClientDeadline(at));
        }
        // The clone that was polled ready serves this request; a fresh clone
        // stays behind for the next one.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let authenticator = self.authenticator.clone();
        let admin_needs_client_cert = self.admin_needs_client_cert;
        let call = async move {
            let Some(requirement) = requirement_for(request.uri().path()) else {
                return inner.call(request).await;
            };
            let connection = request.extensions().get::<ConnInfo>().cloned();
            let path = request.uri().path().to_owned();
            let client_cert = connection.as_ref().is_some_and(|c| c.client_cert);
            let header = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(|value| value.as_bytes().to_vec());
            let peer = connection
                .and_then(|info| info.tcp.remote_addr())
                .map(|addr| addr.ip());
            match authenticator
                .authenticate(header.as_deref(), requirement, peer)
                .await
            {
                // Operators need a verified client certificate when the
                // gateway has a client CA; tenant keys never do.
                Ok(Principal::Admin(_)) if admin_needs_client_cert && !client_cert => {
                    Ok(tonic::Status::unauthenticated(
                        "operators need a client certificate (tls.client_ca_file); connect with one",
                    )
                    .into_http())
                }
                Ok(Principal::Admin(operator)) if !role_allows(operator.role, &path) => {
                    Ok(tonic::Status::permission_denied(format!(
                        "operator {} has the role `{}`, which may not call {path}",
                        operator.name,
                        operator.role.as_str()
                    ))
                    .into_http())
                }
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
                    let mut response = inner.call(request).await?;
                    oversized_request_is_resource_exhausted(&mut response);
                    Ok(response)
                }
                Err(error) => Ok(to_status(&error).into_http()),
            }
        };
        let refusals = self.refusals.clone();
        Box::pin(async move {
            // Authentication and the handler together answer by the
            // client's deadline (a stream's deadline covers its first
            // response; the worker bounds the rest).
            let answered = match deadline {
                Some(at) => tokio::time::timeout_at(at.into(), call)
                    .await
                    .unwrap_or_else(|_| {
                        Ok(tonic::Status::deadline_exceeded(
                            "the request's deadline passed before it finished",
                        )
                        .into_http())
                    }),
                None => call.await,
            };
            if let Ok(response) = &answered {
                super::refusals::observe(&refusals, response);
            }
            answered
        })
    }
}

/// tonic refuses a request message over the decoding limit with
/// OUT_OF_RANGE; gRPC specifies RESOURCE_EXHAUSTED for a message larger than
/// the receiver accepts, which is what clients retry (or not) by. The
/// refusal is trailers-only, so its status is in the headers.
fn oversized_request_is_resource_exhausted<B>(response: &mut http::Response<B>) {
    const TOO_LARGE: &[u8] = b"decoded%20message%20length%20too%20large";
    let headers = response.headers_mut();
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == b"11");
    let too_large = headers.get("grpc-message").is_some_and(|message| {
        message
            .as_bytes()
            .windows(TOO_LARGE.len())
            .any(|w| w == TOO_LARGE)
    });
    if out_of_range && too_large {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_health_and_reflection_are_public() {
        assert_eq!(requirement_for("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            requirement_for("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            None
        );
        assert_eq!(
            requirement_for("/ascend.gateway.v1.Inference/Generate"),
            Some(Requirement::Scope(Scope::Inference))
        );
        assert_eq!(
            requirement_for("/ascend.gateway.v1.TenantAdmin/CreateTenant"),
            Some(Requirement::Admin)
        );
        assert_eq!(
            requirement_for("/some.new.Service/Method"),
            Some(Requirement::Admin)
        );
        assert_eq!(
            requirement_for("/grpc.health.v1.HealthX/Check"),
            Some(Requirement::Admin)
        );
    }
}
