//! Serving: requests from many tenants share a pool of workers, each an
//! emulated NPU running the model with continuous batching.
//!
//! Built so far: [`queue`], the bounded admission queue that is fair across
//! tenants. The worker pool, the continuous batcher and the router follow
//! (see ARCHITECTURE.md). Serving never touches the database or Redis; usage
//! leaves through `metering::Metering::record`.

pub mod queue;
