//! Ascend Gateway: a multi-tenant gRPC inference gateway for LLMs served on
//! (emulated) Huawei Ascend NPUs, with per-tenant limits and per-million-token
//! billing.
//!
//! The binaries (`ascend-gateway`, `ascendctl`) are thin shells over this
//! library. `ARCHITECTURE.md` has the bird's-eye view and the code map; the
//! one entry point that wires everything is [`app::App::build`].

pub mod api;
pub mod app;
pub mod auth;
pub mod bench;
pub mod billing;
pub mod calendar;
pub mod config;
pub mod error;
pub mod generation;
pub mod hex;
pub mod http;
pub mod idempotency;
pub mod limits;
pub mod listener;
pub mod metering;
pub mod metrics;
pub mod model;
pub mod npu;
pub mod outbox;
pub mod private_fs;
pub mod serving;
pub mod store;
pub mod telemetry;
pub mod tenancy;
pub mod tls;
pub mod traces;
pub mod webhooks;
