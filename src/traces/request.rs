//! The request span: a tower layer in front of the gRPC services and the
//! HTTP routes opens one server span per request, continues the client's
//! W3C trace when its `traceparent` header is well formed (a malformed one
//! is ignored: the request starts a trace of its own), runs the request
//! inside it, and closes it when the response body ends, with the status
//! (gRPC's from the trailers, or the headers of a trailers-only answer).
//!
//! The same layer counts every response by its final status for `/metrics`
//! (`metrics::requests`), since it is the one place that sees a stream end.
//!
//! Knows HTTP and the gRPC status headers, nothing of what the services do;
//! the spans name no credential and no prompt (they carry ids, counts and
//! statuses only).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http;
use http_body::{Body, Frame, SizeHint};
use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::{Status, TraceContextExt as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::{Instrument as _, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::TARGET;
use crate::metrics::requests::{RequestCounts, grpc_service_index, http_route_index};

/// Which front end a [`TraceLayer`] is in front of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    Http,
}

/// Opens the request span of every request through it, and counts its
/// response into `counts`.
#[derive(Debug, Clone)]
pub struct TraceLayer {
    protocol: Protocol,
    counts: Arc<RequestCounts>,
}

impl TraceLayer {
    pub fn new(protocol: Protocol, counts: Arc<RequestCounts>) -> TraceLayer {
        TraceLayer { protocol, counts }
    }
}

impl<S> tower_layer::Layer<S> for TraceLayer {
    type Service = TraceService<S>;

    fn layer(&self, inner: S) -> TraceService<S> {
        TraceService {
            inner,
            protocol: self.protocol,
            counts: self.counts.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TraceService<S> {
    inner: S,
    protocol: Protocol,
    counts: Arc<RequestCounts>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for TraceService<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    ResBody: Body + 'static,
{
    type Response = http::Response<TracedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let (span, slot) = match self.protocol {
            Protocol::Grpc => grpc_span(request.uri().path()),
            Protocol::Http => http_span(&request),
        };
        if let Some(parent) = remote_parent(request.headers()) {
            // Fails only for a span that is off or already started; then
            // the request keeps a trace of its own.
            let _ = span.set_parent(parent);
        }
        let future = span.in_scope(|| self.inner.call(request));
        let mut unanswered = Unanswered {
            counted: Counted {
                protocol: self.protocol,
                counts: self.counts.clone(),
                slot,
            },
            span: span.clone(),
            armed: true,
        };
        Box::pin(async move {
            let response = future.instrument(span.clone()).await;
            let counted = unanswered.take();
            match response {
                Ok(response) => Ok(traced(response, span, counted)),
                Err(error) => {
                    // The service itself failed (tonic's and axum's never
                    // do): counted as a server error.
                    counted.count(2, 500, &span);
                    Err(error)
                }
            }
        })
    }
}

/// Where a response is counted: its front end and its label slot.
#[derive(Clone)]
struct Counted {
    protocol: Protocol,
    counts: Arc<RequestCounts>,
    slot: usize,
}

impl Counted {
    /// Counts one response that ended with `grpc_code` (gRPC) or
    /// `http_status` (HTTP), and puts the status on the span.
    fn count(&self, grpc_code: i32, http_status: u16, span: &Span) {
        match self.protocol {
            Protocol::Grpc => {
                self.counts.grpc(self.slot, grpc_code);
                span.set_attribute("rpc.grpc.status_code", i64::from(grpc_code));
                if is_server_error(grpc_code) {
                    span.set_status(Status::error(format!("gRPC status {grpc_code}")));
                }
            }
            Protocol::Http => {
                self.counts.http(self.slot, http_status);
                span.set_attribute("http.response.status_code", i64::from(http_status));
                if http_status >= 500 {
                    span.set_status(Status::error(http_status.to_string()));
                }
            }
        }
    }
}

/// A request whose handler has not answered yet. Dropped so (the client
/// went away, or a deadline cut it), it is counted as the client leaving:
/// gRPC `Canceled`, HTTP 499 (nginx's "client closed request").
struct Unanswered {
    counted: Counted,
    span: Span,
    armed: bool,
}

impl Unanswered {
    /// The handler answered: the response is counted by its body instead.
    fn take(&mut self) -> Counted {
        self.armed = false;
        self.counted.clone()
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if self.armed {
            self.counted.count(1, 499, &self.span);
            self.span.set_attribute("ascend.response.incomplete", true);
        }
    }
}

/// The span of one gRPC call, named `package.Service/Method` as
/// OpenTelemetry's RPC conventions ask, and its service's counter slot.
fn grpc_span(path: &str) -> (Span, usize) {
    let name = path.trim_start_matches('/');
    let (service, method) = name.split_once('/').unwrap_or((name, ""));
    let slot = grpc_service_index(service);
    // Span names stay a bounded set: a service we do not serve is "other".
    let name = if slot < crate::metrics::requests::GRPC_SERVICES.len() {
        name
    } else {
        "other"
    };
    let span = tracing::debug_span!(
        target: TARGET,
        "request",
        otel.name = name,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
    );
    (span, slot)
}

/// The span of one HTTP request, named by its method and route (not its
/// path, so ids in paths do not make a name per request), and its route's
/// counter slot.
fn http_span<B>(request: &http::Request<B>) -> (Span, usize) {
    let method = request.method().as_str();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|path| path.as_str().to_owned());
    let name = match &route {
        Some(route) => format!("{method} {route}"),
        None => method.to_owned(),
    };
    let span = tracing::debug_span!(
        target: TARGET,
        "request",
        otel.name = name,
        otel.kind = "server",
        http.request.method = method,
        url.path = request.uri().path(),
    );
    let slot = http_route_index(route.as_deref());
    if let Some(route) = route {
        span.set_attribute("http.route", route);
    }
    (span, slot)
}

/// The client's trace context, when its `traceparent` is well formed.
pub fn remote_parent(headers: &http::HeaderMap) -> Option<opentelemetry::Context> {
    headers.get("traceparent")?;
    let context = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    context.span().span_context().is_valid().then_some(context)
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The response with its body wrapped to end `span` when the body ends.
fn traced<B: Body>(
    response: http::Response<B>,
    span: Span,
    counted: Counted,
) -> http::Response<TracedBody<B>> {
    let (parts, inner) = response.into_parts();
    let mut body = TracedBody {
        ended: inner.is_end_stream(),
        inner,
        span: Some(span),
        grpc_status: None,
        http_status: parts.status.as_u16(),
        counted,
    };
    // A trailers-only answer (every refusal) has its status here.
    if body.counted.protocol == Protocol::Grpc {
        body.grpc_status = grpc_status(&parts.headers);
    }
    http::Response::from_parts(parts, body)
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// The gRPC codes OpenTelemetry counts as a server's errors (the others are
/// the client's: a refusal, a bad argument).
fn is_server_error(code: i32) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

/// A response body that holds its request's span open until it ends (a
/// stream's last message, or the client going away).
pub struct TracedBody<B> {
    inner: B,
    span: Option<Span>,
    grpc_status: Option<i32>,
    http_status: u16,
    counted: Counted,
    ended: bool,
}

impl<B> TracedBody<B> {
    /// Counts how the response ended, records it and closes the span.
    fn finish(&mut self, complete: bool) {
        let Some(span) = self.span.take() else {
            return;
        };
        // A gRPC stream that stopped before its status: the client went
        // away (or the connection did), which gRPC calls CANCELLED.
        self.counted
            .count(self.grpc_status.unwrap_or(1), self.http_status, &span);
        if !complete {
            span.set_attribute("ascend.response.incomplete", true);
        }
    }
}

impl<B: Body + Unpin> Body for TracedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = match &this.span {
            Some(span) => span.in_scope(|| Pin::new(&mut this.inner).poll_frame(cx)),
            None => Pin::new(&mut this.inner).poll_frame(cx),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(code) = grpc_status(trailers)
                {
                    this.grpc_status = Some(code);
                }
                // The last frame of a body that knows its end.
                this.ended |= this.inner.is_end_stream();
            }
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Ready(None) => {
                this.ended = true;
                this.finish(true);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for TracedBody<B> {
    fn drop(&mut self) {
        // A body known to be over (a trailers-only answer, a full buffer)
        // may be dropped without its last poll.
        let complete = self.ended || self.grpc_status.is_some();
        self.finish(complete);
    }
}
