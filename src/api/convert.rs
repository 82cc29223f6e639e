//! Conversions shared by the services: timestamps and principals.

use prost_types::Timestamp;
use tonic::{Request, Status};

use crate::auth::Principal;

/// Microseconds since the epoch to a protobuf timestamp.
pub fn timestamp(us: i64) -> Timestamp {
    Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: i32::try_from(us.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

pub fn opt_timestamp(us: Option<i64>) -> Option<Timestamp> {
    us.map(timestamp)
}

/// A protobuf timestamp to microseconds, naming `field` if it is invalid.
pub fn micros(field: &str, ts: &Timestamp) -> Result<i64, Status> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(Status::invalid_argument(format!(
            "invalid `{field}`: nanos must be in [0, 1e9)"
        )));
    }
    ts.seconds
        .checked_mul(1_000_000)
        .and_then(|us| us.checked_add(i64::from(ts.nanos / 1000)))
        .ok_or_else(|| Status::invalid_argument(format!("invalid `{field}`: out of range")))
}

/// The caller the auth layer attached. Its absence is a wiring bug.
pub fn principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| {
            tracing::error!("request reached a handler without a principal");
            Status::internal("internal error")
        })
}
