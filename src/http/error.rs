//! The one mapping from domain errors to HTTP answers in OpenAI's error
//! shape, `{"error": {"message", "type", "param", "code"}}`, with the
//! status OpenAI clients act on (their SDKs raise `RateLimitError` for 429
//! and retry after `Retry-After`).
//!
//! Client-visible kinds carry the error's own message (which names the
//! field); outages and internal errors get an opaque message and their
//! cause chain goes to the log.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::headers;
use crate::error::{Classified, ErrorKind};
use crate::metrics::refusals::{RefusalCause, Refusals};
use crate::tenancy::Limits;

#[derive(Debug, Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Debug, Serialize)]
struct Detail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

/// An error answer, ready to be sent.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Boxed: most errors have none, and results stay small.
    pub headers: Box<HeaderMap>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            headers: Box::default(),
        }
    }

    pub fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn param(mut self, param: impl Into<String>) -> ApiError {
        self.param = Some(param.into());
        self
    }

    /// 400 for a request that cannot be read; nothing reaches a worker.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
            .code("invalid_request")
    }

    /// The body as OpenAI clients parse it.
    pub fn body_json(&self) -> String {
        let body = Body {
            error: Detail {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        };
        // Strings and options only: serializing cannot fail.
        serde_json::to_string(&body).unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.body_json()).into_response();
        response.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response.headers_mut().extend(*self.headers);
        response
    }
}

/// The HTTP status of each error kind. Exhaustive: a new kind must be placed.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidArgument | ErrorKind::FailedPrecondition => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::AlreadyExists | ErrorKind::Aborted => StatusCode::CONFLICT,
        ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorKind::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        // nginx's "client closed request": the client is gone anyway.
        ErrorKind::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn type_and_code(kind: ErrorKind) -> (&'static str, &'static str) {
    match kind {
        ErrorKind::InvalidArgument | ErrorKind::FailedPrecondition => {
            ("invalid_request_error", "invalid_value")
        }
        ErrorKind::NotFound => ("invalid_request_error", "not_found"),
        ErrorKind::AlreadyExists => ("invalid_request_error", "already_exists"),
        ErrorKind::Aborted => ("invalid_request_error", "request_in_progress"),
        ErrorKind::Unauthenticated => ("authentication_error", "invalid_api_key"),
        ErrorKind::PermissionDenied => ("permission_error", "permission_denied"),
        ErrorKind::ResourceExhausted => ("rate_limit_error", "rate_limit_exceeded"),
        ErrorKind::DeadlineExceeded => ("timeout_error", "timeout"),
        ErrorKind::Cancelled => ("invalid_request_error", "cancelled"),
        ErrorKind::Unavailable => ("server_error", "service_unavailable"),
        ErrorKind::Internal => ("server_error", "internal_error"),
    }
}

/// Who was refused, for the rate-limit headers of a 429.
pub struct Context<'a> {
    pub limits: Option<&'a Limits>,
    pub refusals: &'a Refusals,
}

/// Converts any classified domain error into the answer the client sees.
pub fn to_api_error<E: Classified>(error: &E, context: &Context<'_>) -> ApiError {
    let kind = error.kind();
    let status = status_of(kind);
    let (mut kind_name, mut code) = type_and_code(kind);
    if !kind.is_client_visible() {
        let message = crate::error::hidden_message(error);
        return ApiError::new(status, kind_name, message).code(code);
    }
    let mut headers = HeaderMap::new();
    if kind == ErrorKind::ResourceExhausted {
        let subject = error.quota_violation().map(|(subject, _)| subject);
        let cause = match subject {
            Some("authentication_failures") => RefusalCause::AuthThrottled,
            Some(_) => RefusalCause::TenantLimit,
            None => RefusalCause::QueueFull,
        };
        context.refusals.record(cause);
        (kind_name, code) = match subject {
            Some("requests_per_second") => ("requests", "rate_limit_exceeded"),
            Some("tokens_per_minute") => ("tokens", "rate_limit_exceeded"),
            Some("monthly_token_quota" | "monthly_budget") => {
                ("insufficient_quota", "insufficient_quota")
            }
            Some("max_concurrent_requests") => ("requests", "concurrency_limit_exceeded"),
            Some("authentication_failures") => ("rate_limit_error", "auth_throttled"),
            _ => ("rate_limit_error", "queue_full"),
        };
        if let Some(wait) = error.retry_after() {
            retry_headers(&mut headers, wait);
            if let Some(limits) = context.limits {
                headers::refused(&mut headers, limits, subject, wait);
            }
        }
    }
    if kind == ErrorKind::NotFound && error.field() == Some("model") {
        code = "model_not_found";
    }
    let mut answer = ApiError::new(status, kind_name, error.to_string()).code(code);
    answer.param = error.field().map(str::to_owned);
    answer.headers = Box::new(headers);
    answer
}

/// `Retry-After` in whole seconds (rounded up, as HTTP has it) and
/// `retry-after-ms`, which OpenAI's SDKs read first.
fn retry_headers(headers: &mut HeaderMap, wait: Duration) {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    headers.insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
    let millis = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
    headers.insert("retry-after-ms", HeaderValue::from(millis));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Sample {
        #[error("invalid `max_tokens`: must be at least 1")]
        Bad,
        #[error("query failed")]
        Down(#[source] std::io::Error),
    }

    impl Classified for Sample {
        fn kind(&self) -> ErrorKind {
            match self {
                Sample::Bad => ErrorKind::InvalidArgument,
                Sample::Down(_) => ErrorKind::Unavailable,
            }
        }

        fn field(&self) -> Option<&str> {
            matches!(self, Sample::Bad).then_some("max_tokens")
        }
    }

    #[test]
    fn client_errors_name_the_field_and_outages_hide_their_cause() {
        let refusals = Refusals::default();
        let context = Context {
            limits: None,
            refusals: &refusals,
        };
        let bad = to_api_error(&Sample::Bad, &context);
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        assert_eq!(bad.param.as_deref(), Some("max_tokens"));
        let body: serde_json::Value = serde_json::from_str(&bad.body_json()).unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "max_tokens");

        let cause = std::io::Error::other("connection refused to db.internal:5432");
        let down = to_api_error(&Sample::Down(cause), &context);
        assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!down.message.contains("db.internal"));
    }
}
