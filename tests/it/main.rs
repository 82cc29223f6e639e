//! Integration tests: the real server over real gRPC, the storage layer on
//! real SQLite and PostgreSQL, and the real binaries as subprocesses. One
//! test binary (modules below) keeps link time down on small machines.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod architecture;
mod ascendctl;
mod bench;
mod billing;
mod budgets;
mod common;
mod crash;
mod deepseek_tokenizer;
mod deploy;
mod generate;
mod hostile;
mod hosts;
mod http;
mod idempotency;
mod key_limits;
mod limits;
mod metering;
mod operators;
mod prefix_cache;
mod responses;
mod secrets;
mod server;
mod startup;
mod store;
mod tenancy;
mod tls;
mod topology;
mod traces;
mod webhooks;
