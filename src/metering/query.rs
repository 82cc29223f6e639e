//! Usage totals over a time range, answered from the hourly rollups.

use std::collections::BTreeMap;

use sqlx::FromRow;

use super::{HOUR_US, MeteringError};
use crate::store::Db;

const DAY_US: i64 = 24 * HOUR_US;

/// How to group usage totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    Total,
    Model,
    Day,
    Hour,
    ModelDay,
    ModelHour,
}

/// Totals of one group; `start_us` / `model` are set when grouped by them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageTotals {
    pub start_us: Option<i64>,
    pub model: Option<String>,
    pub requests: u64,
    pub prompt_tokens: u64,
    /// Of `prompt_tokens`, those served from the prefix cache.
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
    pub device_time_us: u64,
    pub energy_mj: u64,
}

#[derive(FromRow)]
struct HourRow {
    model: String,
    hour_us: i64,
    requests: i64,
    prompt_tokens: i64,
    cached_prompt_tokens: i64,
    completion_tokens: i64,
    device_time_us: i64,
    energy_mj: i64,
}

impl UsageTotals {
    fn add(&mut self, row: &HourRow) {
        let u = |v: i64| u64::try_from(v).unwrap_or(0);
        self.requests += u(row.requests);
        self.prompt_tokens += u(row.prompt_tokens);
        self.cached_prompt_tokens += u(row.cached_prompt_tokens);
        self.completion_tokens += u(row.completion_tokens);
        self.device_time_us += u(row.device_time_us);
        self.energy_mj += u(row.energy_mj);
    }
}

/// Usage of `tenant_id` in `[start_us, end_us)` (hour boundaries), grouped,
/// plus the overall total.
pub async fn usage(
    db: &Db,
    tenant_id: &str,
    start_us: i64,
    end_us: i64,
    model: Option<&str>,
    grouping: Grouping,
) -> Result<(Vec<UsageTotals>, UsageTotals), MeteringError> {
    let rows: Vec<HourRow> = sqlx::query_as(
        "SELECT model, hour_us, requests, prompt_tokens, cached_prompt_tokens, \
         completion_tokens, device_time_us, energy_mj FROM usage_hourly WHERE tenant_id = $1 AND hour_us >= $2 AND hour_us < $3 \
         AND ($4 = '' OR model = $4) ORDER BY hour_us, model",
    )
    .bind(tenant_id)
    .bind(start_us)
    .bind(end_us)
    .bind(model.unwrap_or(""))
    .fetch_all(db.pool())
    .await?;
    let mut total = UsageTotals::default();
    let mut groups: BTreeMap<(Option<i64>, Option<String>), UsageTotals> = BTreeMap::new();
    for row in &rows {
        total.add(row);
        let day = row.hour_us.div_euclid(DAY_US) * DAY_US;
        let key = match grouping {
            Grouping::Total => continue,
            Grouping::Model => (None, Some(row.model.clone())),
            Grouping::Day => (Some(day), None),
            Grouping::Hour => (Some(row.hour_us), None),
            Grouping::ModelDay => (Some(day), Some(row.model.clone())),
            Grouping::ModelHour => (Some(row.hour_us), Some(row.model.clone())),
        };
        let group = groups.entry(key.clone()).or_insert_with(|| UsageTotals {
            start_us: key.0,
            model: key.1.clone(),
            ..UsageTotals::default()
        });
        group.add(row);
    }
    Ok((groups.into_values().collect(), total))
}
