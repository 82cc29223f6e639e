//! Error kinds shared by every module, as clients see them.
//!
//! Each module has its own `thiserror` enum and says, through [`Classified`],
//! which [`ErrorKind`] each variant is. The single translation of a kind into
//! a gRPC status lives in `api::status`, into an HTTP status in `http::error`;
//! nothing here knows about either.

use std::time::Duration;

/// How a failure is reported to a client. Exhaustive on purpose: adding a kind
/// forces the one mapping to gRPC codes to be revisited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The client sent something wrong; the message names the field.
    InvalidArgument,
    NotFound,
    AlreadyExists,
    /// The request is valid but the system is not in a state to apply it.
    FailedPrecondition,
    /// A concurrent operation conflicts (the same request id in progress);
    /// retrying once it ended may succeed.
    Aborted,
    Unauthenticated,
    PermissionDenied,
    /// A limit, quota or queue is full; retrying later may succeed.
    ResourceExhausted,
    DeadlineExceeded,
    /// The client went away or cancelled the request.
    Cancelled,
    /// A dependency (database, Redis) is down. The client sees an opaque
    /// message; the cause chain goes to the log.
    Unavailable,
    /// A bug or an unexpected state. Opaque to the client, logged in full.
    Internal,
}

impl ErrorKind {
    /// A stable lower-case name, for span attributes and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::NotFound => "not_found",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::FailedPrecondition => "failed_precondition",
            ErrorKind::Aborted => "aborted",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::ResourceExhausted => "resource_exhausted",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        }
    }

    /// Whether the error's own message may be shown to the client. Outage and
    /// internal errors may carry hostnames, SQL or paths, so they never are.
    pub fn is_client_visible(self) -> bool {
        !matches!(self, ErrorKind::Unavailable | ErrorKind::Internal)
    }
}

/// Implemented by every module error that can reach a client.
pub trait Classified: std::error::Error {
    fn kind(&self) -> ErrorKind;

    /// How long a client should wait before retrying, when that is known.
    fn retry_after(&self) -> Option<Duration> {
        None
    }

    /// For limit refusals: which limit (subject) and why (description).
    fn quota_violation(&self) -> Option<(&'static str, String)> {
        None
    }

    /// For invalid arguments: the request field at fault, as the API names
    /// it (OpenAI's error `param`).
    fn field(&self) -> Option<&str> {
        None
    }
}

/// For an error whose own message the client must not see (an outage, a
/// bug): logs its whole cause chain and returns the opaque message the
/// client gets instead. The one place both front ends take it from.
pub fn hidden_message<E: Classified + ?Sized>(error: &E) -> &'static str {
    let kind = error.kind();
    let mut chain = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        chain.push_str(": ");
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    tracing::error!(error = %chain, ?kind, "request failed");
    match kind {
        ErrorKind::Unavailable => "a backing service is unavailable; retry later",
        _ => "internal error",
    }
}

/// An error and its causes on one line, most specific last, skipping a cause
/// whose text its parent already repeats (sqlx and io errors often do). For
/// the binaries' last words.
pub fn one_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut next = Some(error);
    while let Some(cause) = next {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        next = cause.source();
    }
    line
}
