//! Requests answered, by front end and final status, for `/metrics`:
//! gRPC calls by service and status code (the code of the trailers, so a
//! stream counts when it ends; a stream the client left is `Cancelled`),
//! HTTP requests by route and status. Every label comes from a fixed list,
//! so no client can add a series.
//!
//! Fed by the request layer (`traces::request`) as each response ends.

use std::sync::atomic::{AtomicU64, Ordering};

/// The gRPC services the gateway serves; anything else is `other`.
pub const GRPC_SERVICES: [&str; 7] = [
    "ascend.gateway.v1.Inference",
    "ascend.gateway.v1.TenantAdmin",
    "ascend.gateway.v1.Billing",
    "ascend.gateway.v1.Webhooks",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// gRPC status codes by number, in the names Prometheus users know from
/// the gRPC middleware's `grpc_code` label.
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// The HTTP API's routes; a request that matched none is `unmatched`.
pub const HTTP_ROUTES: [&str; 6] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/models/{id}",
    "/user/balance",
    "/health",
];

/// HTTP statuses 100 to 599 each have a slot.
const HTTP_STATUSES: usize = 500;

pub struct RequestCounts {
    grpc: Vec<[AtomicU64; GRPC_CODES.len()]>,
    http: Vec<Vec<AtomicU64>>,
}

impl Default for RequestCounts {
    fn default() -> Self {
        RequestCounts {
            grpc: (0..=GRPC_SERVICES.len())
                .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
                .collect(),
            http: (0..=HTTP_ROUTES.len())
                .map(|_| (0..HTTP_STATUSES).map(|_| AtomicU64::new(0)).collect())
                .collect(),
        }
    }
}

impl std::fmt::Debug for RequestCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestCounts")
    }
}

/// A gRPC service's slot (the last is `other`).
pub fn grpc_service_index(service: &str) -> usize {
    GRPC_SERVICES
        .iter()
        .position(|s| *s == service)
        .unwrap_or(GRPC_SERVICES.len())
}

/// An HTTP route's slot (the last is `unmatched`).
pub fn http_route_index(route: Option<&str>) -> usize {
    route
        .and_then(|r| HTTP_ROUTES.iter().position(|known| *known == r))
        .unwrap_or(HTTP_ROUTES.len())
}

impl RequestCounts {
    /// One gRPC call ended with `code` (an unknown number counts as
    /// `Unknown`, as gRPC reads it).
    pub fn grpc(&self, service: usize, code: i32) {
        let code = usize::try_from(code)
            .ok()
            .filter(|c| *c < GRPC_CODES.len())
            .unwrap_or(2);
        if let Some(slots) = self.grpc.get(service) {
            slots[code].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One HTTP request ended with `status`.
    pub fn http(&self, route: usize, status: u16) {
        let Some(slot) = usize::from(status).checked_sub(100) else {
            return;
        };
        if let Some(counter) = self.http.get(route).and_then(|r| r.get(slot)) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Every nonzero gRPC series: (service, code, count).
    pub fn grpc_series(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut series = Vec::new();
        for (s, slots) in self.grpc.iter().enumerate() {
            let service = GRPC_SERVICES.get(s).copied().unwrap_or("other");
            for (c, count) in slots.iter().enumerate() {
                let count = count.load(Ordering::Relaxed);
                if count > 0 {
                    series.push((service, GRPC_CODES[c], count));
                }
            }
        }
        series
    }

    /// Every nonzero HTTP series: (route, status, count).
    pub fn http_series(&self) -> Vec<(&'static str, u16, u64)> {
        let mut series = Vec::new();
        for (r, slots) in self.http.iter().enumerate() {
            let route = HTTP_ROUTES.get(r).copied().unwrap_or("unmatched");
            for (status, count) in slots.iter().enumerate() {
                let count = count.load(Ordering::Relaxed);
                if count > 0 {
                    // Below 600 by construction.
                    series.push((route, 100 + status as u16, count));
                }
            }
        }
        series
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_fixed_lists_whatever_the_input() {
        let counts = RequestCounts::default();
        counts.grpc(grpc_service_index("ascend.gateway.v1.Inference"), 0);
        counts.grpc(grpc_service_index("evil.Service"), 99);
        counts.grpc(grpc_service_index("evil.Service"), -1);
        counts.http(http_route_index(Some("/v1/models/{id}")), 404);
        counts.http(http_route_index(Some("/wp-admin")), 404);
        counts.http(http_route_index(None), 42);
        counts.http(http_route_index(None), 600);
        assert_eq!(
            counts.grpc_series(),
            vec![
                ("ascend.gateway.v1.Inference", "OK", 1),
                ("other", "Unknown", 2)
            ]
        );
        assert_eq!(
            counts.http_series(),
            vec![("/v1/models/{id}", 404, 1), ("unmatched", 404, 1)]
        );
    }
}
