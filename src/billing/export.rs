//! Exports in chunks: invoice lines and raw usage events of a period, paged
//! through the database with keyset pagination so memory stays flat however
//! many rows there are. Each pager knows its row count before the first
//! chunk (the stream's first message carries it).
//!
//! Knows the database and the invoice rules through `service`; knows nothing
//! of gRPC or file formats.

use std::collections::VecDeque;

use sqlx::FromRow;

use super::BillingError;
use super::invoice::{InvoiceLine, InvoiceStatus};
use super::repo;
use super::service::BillingService;
use crate::calendar::Month;
use crate::metering::UsageEvent;
use crate::store::Db;

/// Rows of an export in chunks, their count known before the first.
pub trait Pager: Send + 'static {
    type Row: Send + 'static;

    fn total_rows(&self) -> u64;

    /// The next chunk, or `None` when every row has been returned.
    fn next_chunk(
        &mut self,
    ) -> impl Future<Output = Result<Option<Vec<Self::Row>>, BillingError>> + Send;
}

/// Rows per chunk: large enough that round trips do not dominate, small
/// enough that a chunk is a few hundred kilobytes.
pub const CHUNK_ROWS: usize = 2000;

enum LineSource {
    /// A draft's lines, computed when the export opened.
    Computed(Vec<InvoiceLine>),
    /// A finalized invoice's stored lines, after `after_line`.
    Stored { invoice_id: String, after_line: i64 },
}

/// Invoice lines of one period (one tenant or all), invoice by invoice.
pub struct LinePager {
    db: Db,
    sources: VecDeque<LineSource>,
    total_rows: u64,
    chunk_rows: usize,
}

impl LinePager {
    pub async fn open(
        service: &BillingService,
        tenant_id: Option<&str>,
        period: Month,
        chunk_rows: usize,
    ) -> Result<LinePager, BillingError> {
        let mut sources = VecDeque::new();
        let mut total_rows = 0;
        let mut conn = service.db().pool().acquire().await?;
        for row in service.invoices_of_period(tenant_id, period).await? {
            if row.status == InvoiceStatus::Finalized {
                total_rows += repo::count_stored_lines(&mut conn, &row.id).await?;
                sources.push_back(LineSource::Stored {
                    invoice_id: row.id,
                    after_line: 0,
                });
            } else {
                let lines = service.draft_lines(&row).await?;
                total_rows += lines.len() as u64;
                sources.push_back(LineSource::Computed(lines));
            }
        }
        Ok(LinePager {
            db: service.db().clone(),
            sources,
            total_rows,
            chunk_rows: chunk_rows.max(1),
        })
    }
}

impl Pager for LinePager {
    type Row = InvoiceLine;

    fn total_rows(&self) -> u64 {
        self.total_rows
    }

    async fn next_chunk(&mut self) -> Result<Option<Vec<InvoiceLine>>, BillingError> {
        let mut chunk = Vec::new();
        while chunk.len() < self.chunk_rows {
            let wanted = self.chunk_rows - chunk.len();
            match self.sources.front_mut() {
                None => break,
                Some(LineSource::Computed(lines)) => {
                    let take = wanted.min(lines.len());
                    chunk.extend(lines.drain(..take));
                    if lines.is_empty() {
                        self.sources.pop_front();
                    }
                }
                Some(LineSource::Stored {
                    invoice_id,
                    after_line,
                }) => {
                    let mut conn = self.db.pool().acquire().await?;
                    let limit = i64::try_from(wanted).unwrap_or(i64::MAX);
                    let page =
                        repo::stored_lines(&mut conn, invoice_id, *after_line, limit).await?;
                    if let Some(last) = page.last() {
                        *after_line = i64::from(last.line_number);
                    }
                    if page.len() < wanted {
                        self.sources.pop_front();
                    }
                    chunk.extend(page);
                }
            }
        }
        Ok((!chunk.is_empty()).then_some(chunk))
    }
}

#[derive(FromRow)]
struct EventRow {
    tenant_id: String,
    request_id: String,
    key_id: String,
    model: String,
    device_profile: String,
    prompt_tokens: i64,
    cached_prompt_tokens: i64,
    completion_tokens: i64,
    queue_time_us: i64,
    ttft_us: i64,
    total_time_us: i64,
    device_time_us: i64,
    energy_mj: i64,
    mean_power_mw: i64,
    finish_reason: String,
    started_at_us: i64,
    finished_at_us: i64,
}

impl From<EventRow> for UsageEvent {
    fn from(r: EventRow) -> UsageEvent {
        // Stored from u32/u64 fields and checked non-negative by the schema.
        let u64_of = |v: i64| u64::try_from(v).unwrap_or(0);
        let u32_of = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
        UsageEvent {
            request_id: r.request_id,
            tenant_id: r.tenant_id,
            key_id: r.key_id,
            model: r.model,
            device_profile: r.device_profile,
            prompt_tokens: u32_of(r.prompt_tokens),
            cached_prompt_tokens: u32_of(r.cached_prompt_tokens),
            completion_tokens: u32_of(r.completion_tokens),
            queue_time_us: u64_of(r.queue_time_us),
            ttft_us: u64_of(r.ttft_us),
            total_time_us: u64_of(r.total_time_us),
            device_time_us: u64_of(r.device_time_us),
            energy_mj: u64_of(r.energy_mj),
            mean_power_mw: u64_of(r.mean_power_mw),
            finish_reason: crate::metering::FinishReason::from_stored(&r.finish_reason),
            started_at_us: r.started_at_us,
            finished_at_us: r.finished_at_us,
        }
    }
}

const EVENT_COLUMNS: &str = "tenant_id, request_id, key_id, model, device_profile, \
     prompt_tokens, completion_tokens, queue_time_us, ttft_us, total_time_us, device_time_us, \
     energy_mj, mean_power_mw, finish_reason, started_at_us, finished_at_us, cached_prompt_tokens";

/// Where the next page of usage events starts. Owns what it needs, so a
/// page can be read on another task.
#[derive(Debug, Clone)]
struct EventPage {
    db: Db,
    tenant_id: Option<String>,
    from_us: i64,
    to_us: i64,
    /// The last key returned: `(tenant_id, finished_at_us, request_id)`.
    after: (String, i64, String),
    limit: i64,
}

impl EventPage {
    async fn read(self) -> Result<Vec<EventRow>, BillingError> {
        // Two statements rather than an optional filter, so each keeps its
        // index range scan under a generic plan.
        let sql = match &self.tenant_id {
            Some(_) => format!(
                "SELECT {EVENT_COLUMNS} FROM usage_events WHERE tenant_id = $1 \
                 AND finished_at_us >= $2 AND finished_at_us < $3 \
                 AND (finished_at_us, request_id) > ($4, $5) \
                 ORDER BY finished_at_us, request_id LIMIT $6"
            ),
            None => format!(
                "SELECT {EVENT_COLUMNS} FROM usage_events \
                 WHERE finished_at_us >= $1 AND finished_at_us < $2 \
                 AND (tenant_id, finished_at_us, request_id) > ($3, $4, $5) \
                 ORDER BY tenant_id, finished_at_us, request_id LIMIT $6"
            ),
        };
        // The same binds for either driver.
        macro_rules! bind_page {
            ($query:expr) => {
                match &self.tenant_id {
                    Some(tenant) => $query
                        .bind(tenant.as_str())
                        .bind(self.from_us)
                        .bind(self.to_us)
                        .bind(self.after.1)
                        .bind(self.after.2.as_str())
                        .bind(self.limit),
                    None => $query
                        .bind(self.from_us)
                        .bind(self.to_us)
                        .bind(self.after.0.as_str())
                        .bind(self.after.1)
                        .bind(self.after.2.as_str())
                        .bind(self.limit),
                }
            };
        }
        // On PostgreSQL the typed driver: it decodes rows several times
        // faster than `Any`, and this is the one query that reads millions.
        Ok(match self.db.postgres() {
            Some(pg) => {
                bind_page!(sqlx::query_as::<sqlx::Postgres, EventRow>(&sql))
                    .fetch_all(pg)
                    .await?
            }
            None => {
                bind_page!(sqlx::query_as::<sqlx::Any, EventRow>(&sql))
                    .fetch_all(self.db.pool())
                    .await?
            }
        })
    }
}

/// Usage events finished in one period (one tenant or all), in primary-key
/// order `(tenant_id, finished_at_us, request_id)`, each chunk one indexed
/// range read after the last key of the previous one. While the caller
/// handles a chunk, the next one is already being read (one page ahead, so
/// memory stays at two chunks).
pub struct EventPager {
    next: Option<EventPage>,
    /// The read-ahead of `next`'s page. A child of this pager: aborted when
    /// the pager is dropped (the export ends or its client goes away).
    ahead: Option<tokio::task::JoinHandle<Result<Vec<EventRow>, BillingError>>>,
    total_rows: u64,
    chunk_rows: usize,
}

impl EventPager {
    pub async fn open(
        db: &Db,
        tenant_id: Option<&str>,
        period: Month,
        chunk_rows: usize,
    ) -> Result<EventPager, BillingError> {
        let (count,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM usage_events WHERE ($1 = '' OR tenant_id = $1) \
             AND finished_at_us >= $2 AND finished_at_us < $3",
        )
        .bind(tenant_id.unwrap_or(""))
        .bind(period.start_us())
        .bind(period.end_us())
        .fetch_one(db.pool())
        .await?;
        let chunk_rows = chunk_rows.max(1);
        Ok(EventPager {
            next: Some(EventPage {
                db: db.clone(),
                tenant_id: tenant_id.map(str::to_owned),
                from_us: period.start_us(),
                to_us: period.end_us(),
                after: (String::new(), i64::MIN, String::new()),
                limit: i64::try_from(chunk_rows).unwrap_or(i64::MAX),
            }),
            ahead: None,
            total_rows: u64::try_from(count).unwrap_or(0),
            chunk_rows,
        })
    }
}

impl Drop for EventPager {
    fn drop(&mut self) {
        if let Some(ahead) = self.ahead.take() {
            ahead.abort();
        }
    }
}

impl Pager for EventPager {
    type Row = UsageEvent;

    fn total_rows(&self) -> u64 {
        self.total_rows
    }

    async fn next_chunk(&mut self) -> Result<Option<Vec<UsageEvent>>, BillingError> {
        let Some(page) = self.next.take() else {
            return Ok(None);
        };
        let rows = match self.ahead.take() {
            Some(ahead) => ahead
                .await
                .map_err(|e| BillingError::Internal(format!("export read-ahead failed: {e}")))??,
            None => page.clone().read().await?,
        };
        let Some(last) = rows.last() else {
            return Ok(None);
        };
        if rows.len() >= self.chunk_rows {
            let next = EventPage {
                after: (
                    last.tenant_id.clone(),
                    last.finished_at_us,
                    last.request_id.clone(),
                ),
                ..page
            };
            self.ahead = Some(tokio::spawn(next.clone().read()));
            self.next = Some(next);
        }
        Ok(Some(rows.into_iter().map(UsageEvent::from).collect()))
    }
}
