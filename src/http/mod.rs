//! The OpenAI- and DeepSeek-compatible HTTP API, a second front end of the
//! same request path as gRPC: `POST /v1/chat/completions`,
//! `POST /v1/completions`, `GET /v1/models`, `GET /v1/models/{id}`,
//! DeepSeek's `GET /user/balance`, and `GET /health` for load balancers.
//!
//! It authenticates with the same `Authorization: Bearer agw_…` keys and
//! the same `Authenticator` (failed attempts throttled by address), and
//! hands every generation to `generation`, so limits, fairness, deadlines,
//! cancellation, request ids, metering and cost quotes are the gRPC path's.
//! JSON in and out lives here (`wire`, `response`), as does the one mapping
//! of errors to HTTP statuses (`error`); no request rule does.

mod balance;
mod completions;
mod error;
mod headers;
mod models;
mod response;
mod server;
mod sse;
mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::IntoResponse;
use axum::routing::{get, post};

pub use error::status_of;
pub use server::serve;
pub use sse::response as sse_response;

use crate::auth::{Authenticator, Principal, Requirement, TenantPrincipal};
use crate::billing::balance::Balances;
use crate::generation::Generation;
use crate::metrics::refusals::Refusals;
use crate::tenancy::Scope;
use error::{ApiError, Context, to_api_error};

/// The peer address of a connection, put into each request by the server.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// How much of a request body the API reads, and how long it waits for it.
#[derive(Debug, Clone, Copy)]
pub struct BodyBounds {
    /// `http_max_body_bytes`.
    pub max_bytes: usize,
    /// `http_body_timeout`.
    pub timeout: std::time::Duration,
}

/// The HTTP API's shared state; cheap to clone.
#[derive(Clone)]
pub struct HttpApi {
    inner: Arc<Inner>,
}

struct Inner {
    generation: Generation,
    balances: Balances,
    authenticator: Arc<Authenticator>,
    refusals: Arc<Refusals>,
    /// Responses by route and status, counted by the request layer.
    requests: Arc<crate::metrics::requests::RequestCounts>,
    body: BodyBounds,
    serving: AtomicBool,
}

impl HttpApi {
    pub fn new(
        generation: Generation,
        balances: Balances,
        authenticator: Arc<Authenticator>,
        refusals: Arc<Refusals>,
        requests: Arc<crate::metrics::requests::RequestCounts>,
        body: BodyBounds,
    ) -> HttpApi {
        HttpApi {
            inner: Arc::new(Inner {
                generation,
                balances,
                authenticator,
                refusals,
                requests,
                body,
                serving: AtomicBool::new(true),
            }),
        }
    }

    /// The routes, with OpenAI-shaped answers for unknown paths and methods.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/chat/completions", post(completions::chat))
            .route("/v1/completions", post(completions::completions))
            .route("/v1/models", get(models::list))
            .route("/v1/models/{id}", get(models::one))
            .route("/user/balance", get(balance::balance))
            .route("/health", get(health))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(crate::traces::TraceLayer::new(
                crate::traces::Protocol::Http,
                self.inner.requests.clone(),
            ))
            .with_state(self.clone())
    }

    /// Turns `/health` to 503, for a shutdown that lets balancers move
    /// traffic first.
    pub fn set_not_serving(&self) {
        self.inner.serving.store(false, Ordering::Relaxed);
    }

    fn generation(&self) -> &Generation {
        &self.inner.generation
    }

    fn balances(&self) -> &Balances {
        &self.inner.balances
    }

    fn refusals(&self) -> &Refusals {
        &self.inner.refusals
    }

    fn body_bounds(&self) -> BodyBounds {
        self.inner.body
    }

    /// The tenant behind the request's `Authorization` header.
    async fn tenant(&self, parts: &Parts) -> Result<Arc<TenantPrincipal>, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        let peer = parts.extensions.get::<Peer>().map(|p| p.0.ip());
        let context = Context {
            limits: None,
            refusals: &self.inner.refusals,
        };
        match self
            .inner
            .authenticator
            .authenticate(header, Requirement::Scope(Scope::Inference), peer)
            .await
        {
            Ok(Principal::Tenant(tenant)) => Ok(tenant),
            Ok(Principal::Admin(_)) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                "the admin token cannot call the inference API; use a tenant API key",
            )
            .code("permission_denied")),
            Err(error) => Err(to_api_error(&error, &context)),
        }
    }

    /// The answer for `error`, with the tenant's rate-limit headers on a 429.
    fn error<E: crate::error::Classified>(&self, error: &E, tenant: &TenantPrincipal) -> ApiError {
        to_api_error(
            error,
            &Context {
                limits: Some(&tenant.limits),
                refusals: &self.inner.refusals,
            },
        )
    }

    /// A request refused before admission counts against the tenant's
    /// request rate like one admitted; over the rate, that is the answer.
    async fn refused_before_admission(
        &self,
        tenant: &TenantPrincipal,
        error: ApiError,
    ) -> ApiError {
        match self.generation().admit_call(tenant).await {
            Ok(_) => error,
            Err(limited) => self.error(&limited, tenant),
        }
    }
}

async fn health(axum::extract::State(api): axum::extract::State<HttpApi>) -> impl IntoResponse {
    if api.inner.serving.load(Ordering::Relaxed) {
        (StatusCode::OK, "serving\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not serving\n")
    }
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!(
            "unknown path {}; the API serves /v1/chat/completions, /v1/completions and /v1/models",
            uri.path()
        ),
    )
    .code("unknown_url")
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("{method} is not allowed on {}", uri.path()),
    )
    .code("method_not_allowed")
}
