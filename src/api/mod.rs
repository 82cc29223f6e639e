//! The gRPC surface: translation between protobuf messages and domain types,
//! and the one mapping from domain errors to `tonic::Status`.
//!
//! Only this module knows protobuf and gRPC. It holds no business rules: each
//! handler validates and converts its input, calls a domain module, and
//! converts the answer back.

mod admin;
pub mod auth_layer;
mod billing;
pub mod codec;
mod convert;
mod deadline;
mod inference;
pub mod pb;
pub mod refusals;
pub mod status;
mod webhooks;

pub use admin::TenantAdminApi;
pub use billing::{BillingApi, event_from_pb, line_from_pb};
pub use inference::InferenceApi;
pub use webhooks::WebhooksApi;

/// The full gRPC names of the services this gateway serves, as listed by
/// server reflection.
pub const SERVICE_NAMES: &[&str] = &[
    "ascend.gateway.v1.Inference",
    "ascend.gateway.v1.TenantAdmin",
    "ascend.gateway.v1.Billing",
    "ascend.gateway.v1.Webhooks",
];
