//! Billing: price plans, invoices and exports, from metered usage.
//!
//! - `money`: exact amounts in nanos, ISO 4217 currencies, the one rounding
//!   rule (half to even, once per invoice line).
//! - `prices`: plans and insert-only prices; which price is in effect.
//! - `invoice`: invoices, lines, and the pure pricing of usage into lines.
//! - `service`: the operations (plans, drafts computed on read, ordered
//!   finalization in one transaction) and which usage each invoice holds,
//!   late usage included.
//! - `export`: invoice lines and usage events in chunks, keyset-paged.
//! - `file`: CSV, JSON Lines and Parquet export files.
//! - `quote`: one request's cost under its tenant's plan, for its answer.
//! - `balance`: the month's spend against the tenant's budget, for
//!   `GetBalance`.
//! - `repo`: the SQL.
//!
//! Finalized invoices, their lines and all prices are immutable, enforced by
//! database triggers on both backends. Knows usage events and tenants' price
//! plans as rows; knows nothing of gRPC.

pub mod archive;
pub mod balance;
mod error;
pub mod export;
pub mod file;
pub mod invoice;
pub mod money;
pub mod prices;
pub mod quote;
mod repo;
mod service;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use error::BillingError;
pub use invoice::{Invoice, InvoiceLine, InvoiceStatus, LineKind};
pub use prices::{MoneyInput, Price, PriceInput, PricePlan, PutPrices};
pub use repo::now_sql;
pub use service::{BillingService, MonthSpend, invoice_id};

/// `[billing]` settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BillingSettings {
    /// How long after its month ends an invoice stays a draft that late usage
    /// still lands in; it may be finalized only after this.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
    /// How long a plan's prices are reused for the cost quoted with each
    /// answer; a price change shows in quotes within this.
    #[serde(with = "humantime_serde")]
    pub price_cache_ttl: Duration,
    /// Billing calls per second a tenant's keys may make (the admin token is
    /// not limited): exports and usage queries are heavy reads.
    pub tenant_requests_per_second: f64,
    /// And at once.
    pub tenant_burst: u32,
    /// Where archived months of raw usage go (Parquet and a manifest each);
    /// unset: `<data_dir>/archive`.
    pub archive_dir: Option<std::path::PathBuf>,
    /// Months of raw usage events kept in the database besides the current
    /// one; older finalized months are archived by this replica every hour.
    /// 0 (the default): never archived on schedule.
    pub raw_retention_months: u32,
}

impl Default for BillingSettings {
    fn default() -> Self {
        BillingSettings {
            grace_period: Duration::from_secs(3 * 24 * 3600),
            price_cache_ttl: Duration::from_secs(5),
            tenant_requests_per_second: 5.0,
            tenant_burst: 20,
            archive_dir: None,
            raw_retention_months: 0,
        }
    }
}
