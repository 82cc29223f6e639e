//! The one mapping from domain errors to gRPC statuses.
//!
//! Client-visible kinds carry the error's own message (which names the
//! field). Outages and internal errors get an opaque message; their cause
//! chain goes to the log, never to the client.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::{Classified, ErrorKind};

/// `result.or_status()?` in a handler: a domain error as the status the
/// client sees (through [`to_status`]).
pub trait OrStatus<T> {
    fn or_status(self) -> Result<T, Status>;
}

impl<T, E: Classified> OrStatus<T> for Result<T, E> {
    fn or_status(self) -> Result<T, Status> {
        self.map_err(|e| to_status(&e))
    }
}

/// Converts any classified domain error into the status the client sees.
pub fn to_status<E: Classified>(error: &E) -> Status {
    let kind = error.kind();
    let code = code_of(kind);
    if kind == ErrorKind::ResourceExhausted {
        return resource_exhausted(error);
    }
    if kind.is_client_visible() {
        return Status::new(code, bounded(error.to_string()));
    }
    Status::new(code, crate::error::hidden_message(error))
}

/// Longest message a status carries. It travels as the `grpc-message`
/// header; a message that quotes a huge field of the request would make the
/// answer's headers too large for the client, which then drops the whole
/// connection instead of reading the status.
const MAX_MESSAGE_BYTES: usize = 1024;

/// `message` cut to [`MAX_MESSAGE_BYTES`] on a character boundary.
fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES - "…".len();
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

/// RESOURCE_EXHAUSTED with `google.rpc.RetryInfo` and `google.rpc.QuotaFailure`
/// details, and `retry-after` (whole seconds, rounded up) plus the IETF draft
/// `ratelimit` field in the metadata.
fn resource_exhausted<E: Classified>(error: &E) -> Status {
    let mut details = ErrorDetails::new();
    if let Some(wait) = error.retry_after() {
        details.set_retry_info(Some(wait));
    }
    if let Some((subject, description)) = error.quota_violation() {
        details.add_quota_failure_violation(subject, description);
    }
    let mut status =
        Status::with_error_details(Code::ResourceExhausted, bounded(error.to_string()), details);
    if let Some(wait) = error.retry_after() {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        if let Ok(value) = secs.to_string().parse() {
            status.metadata_mut().insert("retry-after", value);
        }
        if let Some((subject, _)) = error.quota_violation()
            && let Ok(value) = format!("\"{subject}\";r=0;t={secs}").parse()
        {
            status.metadata_mut().insert("ratelimit", value);
        }
    }
    status
}

/// The gRPC code of each error kind. Exhaustive: a new kind must be placed.
pub fn code_of(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::Aborted => Code::Aborted,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorKind::Cancelled => Code::Cancelled,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Internal => Code::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Sample {
        #[error("field `max_tokens`: must be at least 1")]
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
    }

    #[test]
    fn client_errors_keep_their_message() {
        let status = to_status(&Sample::Bad);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("max_tokens"));
    }

    #[test]
    fn outages_hide_their_cause() {
        let cause = std::io::Error::other("connection refused to db.internal:5432");
        let status = to_status(&Sample::Down(cause));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(!status.message().contains("db.internal"));
    }
}

#[cfg(test)]
mod bounded_tests {
    use super::*;

    #[test]
    fn a_message_quoting_a_huge_field_is_cut_on_a_character_boundary() {
        assert_eq!(bounded("short".to_owned()), "short");
        for filler in ["9", "é", "漢"] {
            let cut = bounded(format!("invalid `period`: {}", filler.repeat(100_000)));
            assert!(cut.len() <= MAX_MESSAGE_BYTES, "{}", cut.len());
            assert!(cut.starts_with("invalid `period`: "));
            assert!(cut.ends_with('…'));
        }
    }
}
