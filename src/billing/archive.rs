//! Archival of raw usage: a finalized month's events written to a Parquet
//! file with a manifest (row count, token sums, SHA-256), checked by reading
//! the file back, then removed from the database in one step with the
//! month's row in `usage_archives`. Hourly rollups and invoices stay, so
//! usage queries and invoices keep working for archived months. A restore
//! puts the file's events back, exactly as they were (`recorded_at_us`
//! included), without touching the rollups they are already counted in.
//!
//! A month is archived only when nothing can still bill from its raw events:
//! it is over, every tenant with usage in it has its invoice finalized, and
//! none of its events was recorded after its tenant's latest finalization
//! (such a late event sits on a draft as an adjustment). While a month
//! leaves, inserts wait (PostgreSQL: `metering::ARCHIVE_LOCK_KEY`; SQLite:
//! the write lock), and afterwards the metering writer refuses the month.
//!
//! Knows the database, the invoice rules' tables and the file format; nothing
//! of gRPC.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Array, Int64Array, StringArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::FromRow;

use super::BillingError;
use super::file::{ExportFile, FileFormat, Record, Value};
use crate::calendar::Month;
use crate::store::{Backend, Db, now_us};

/// Events read and written per page.
const PAGE_ROWS: i64 = 10_000;

/// A claim on a month older than this is taken over: its run died.
const STALE_CLAIM_US: i64 = 3_600_000_000;

/// What an archive holds, written beside its Parquet file as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub period: String,
    /// The Parquet file's name, in the manifest's directory.
    pub file: String,
    pub sha256: String,
    pub events: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub archived_at_us: i64,
}

/// Archives and restores months under one directory. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Archiver {
    db: Db,
    dir: PathBuf,
}

/// One archived event: every column of `usage_events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, FromRow)]
pub struct ArchivedEvent {
    pub tenant_id: String,
    pub request_id: String,
    pub key_id: String,
    pub model: String,
    pub device_profile: String,
    pub prompt_tokens: i64,
    pub cached_prompt_tokens: i64,
    pub completion_tokens: i64,
    pub queue_time_us: i64,
    pub ttft_us: i64,
    pub total_time_us: i64,
    pub device_time_us: i64,
    pub energy_mj: i64,
    pub mean_power_mw: i64,
    pub finish_reason: String,
    pub started_at_us: i64,
    pub finished_at_us: i64,
    pub recorded_at_us: i64,
}

impl Record for ArchivedEvent {
    const COLUMNS: &'static [(&'static str, bool)] = &[
        ("tenant_id", true),
        ("request_id", true),
        ("key_id", true),
        ("model", true),
        ("device_profile", true),
        ("prompt_tokens", false),
        ("cached_prompt_tokens", false),
        ("completion_tokens", false),
        ("queue_time_us", false),
        ("ttft_us", false),
        ("total_time_us", false),
        ("device_time_us", false),
        ("energy_mj", false),
        ("mean_power_mw", false),
        ("finish_reason", true),
        ("started_at_us", false),
        ("finished_at_us", false),
        ("recorded_at_us", false),
    ];

    fn value(&self, column: usize) -> Value<'_> {
        match column {
            0 => Value::Text(&self.tenant_id),
            1 => Value::Text(&self.request_id),
            2 => Value::Text(&self.key_id),
            3 => Value::Text(&self.model),
            4 => Value::Text(&self.device_profile),
            5 => Value::Int(self.prompt_tokens),
            6 => Value::Int(self.cached_prompt_tokens),
            7 => Value::Int(self.completion_tokens),
            8 => Value::Int(self.queue_time_us),
            9 => Value::Int(self.ttft_us),
            10 => Value::Int(self.total_time_us),
            11 => Value::Int(self.device_time_us),
            12 => Value::Int(self.energy_mj),
            13 => Value::Int(self.mean_power_mw),
            14 => Value::Text(&self.finish_reason),
            15 => Value::Int(self.started_at_us),
            16 => Value::Int(self.finished_at_us),
            _ => Value::Int(self.recorded_at_us),
        }
    }
}

const COLUMNS: &str = "tenant_id, request_id, key_id, model, device_profile, prompt_tokens, \
     cached_prompt_tokens, completion_tokens, queue_time_us, ttft_us, total_time_us, \
     device_time_us, energy_mj, mean_power_mw, finish_reason, started_at_us, finished_at_us, \
     recorded_at_us";

/// Row count and token sums of a set of events, to check one copy against
/// another.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    events: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
}

impl Totals {
    fn add(&mut self, prompt: i64, completion: i64) {
        self.events += 1;
        self.prompt_tokens += u64::try_from(prompt).unwrap_or(0);
        self.completion_tokens += u64::try_from(completion).unwrap_or(0);
    }
}

fn internal(what: impl std::fmt::Display) -> BillingError {
    BillingError::Internal(what.to_string())
}

impl Archiver {
    pub fn new(db: Db, dir: PathBuf) -> Archiver {
        Archiver { db, dir }
    }

    /// The archive files of `period` written by the run `claim`: (Parquet,
    /// manifest). Each run writes files of its own, so a run that fails (or
    /// races another) never overwrites an archive that holds a month.
    fn paths(&self, period: Month, claim: &str) -> (PathBuf, PathBuf) {
        (
            self.dir
                .join(format!("usage-events-{period}-{claim}.parquet")),
            self.dir
                .join(format!("usage-events-{period}-{claim}.manifest.json")),
        )
    }

    /// Where the archive `manifest` describes lives.
    pub fn file_path(&self, manifest: &Manifest) -> PathBuf {
        self.dir.join(&manifest.file)
    }

    /// The manifest beside an archive file.
    fn manifest_path(&self, file: &str) -> PathBuf {
        let stem = file.strip_suffix(".parquet").unwrap_or(file);
        self.dir.join(format!("{stem}.manifest.json"))
    }

    /// Why `period` cannot be archived now, if it cannot.
    async fn refusal(
        conn: &mut sqlx::AnyConnection,
        period: Month,
    ) -> Result<Option<String>, BillingError> {
        if period.end_us() > now_us() {
            return Ok(Some(format!("{period} is not over yet")));
        }
        let (unbilled,): (i64,) = sqlx::query_as(
            "SELECT COUNT(DISTINCT e.tenant_id) FROM usage_events e \
             WHERE e.finished_at_us >= $1 AND e.finished_at_us < $2 AND NOT EXISTS ( \
               SELECT 1 FROM invoices i WHERE i.tenant_id = e.tenant_id AND i.period = $3 \
               AND i.status = 'finalized')",
        )
        .bind(period.start_us())
        .bind(period.end_us())
        .bind(period.to_string())
        .fetch_one(&mut *conn)
        .await?;
        if unbilled > 0 {
            return Ok(Some(format!(
                "{unbilled} tenants with usage in {period} have no finalized invoice for it; \
                 finalize them first"
            )));
        }
        let (late,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM usage_events e \
             WHERE e.finished_at_us >= $1 AND e.finished_at_us < $2 AND e.recorded_at_us >= ( \
               SELECT MAX(i.finalized_at_us) FROM invoices i \
               WHERE i.tenant_id = e.tenant_id AND i.status = 'finalized')",
        )
        .bind(period.start_us())
        .bind(period.end_us())
        .fetch_one(&mut *conn)
        .await?;
        if late > 0 {
            return Ok(Some(format!(
                "{late} events of {period} were recorded after their tenant's latest \
                 finalization: they are adjustments on a draft; finalize it first"
            )));
        }
        Ok(None)
    }

    /// The month's row in `usage_archives`: its state.
    async fn state(&self, period: Month) -> Result<Option<String>, BillingError> {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT state FROM usage_archives WHERE month_start_us = $1")
                .bind(period.start_us())
                .fetch_optional(self.db.pool())
                .await?;
        Ok(row.map(|(state,)| state))
    }

    /// Claims `period` for the run `claim`: a month never archived, a
    /// restored one, or one whose claim went stale. Two runs never hold one
    /// month.
    async fn claim(&self, period: Month, claim: &str) -> Result<(), BillingError> {
        let now = now_us();
        let won: Option<(String,)> = sqlx::query_as(
            "INSERT INTO usage_archives (month_start_us, period, state, claim, claimed_at_us, \
             file, sha256, events, prompt_tokens, completion_tokens, archived_at_us) \
             VALUES ($1, $2, 'archiving', $3, $4, '', '', 0, 0, 0, 0) \
             ON CONFLICT (month_start_us) DO UPDATE SET state = 'archiving', claim = $3, \
             claimed_at_us = $4 \
             WHERE usage_archives.state = 'restored' \
             OR (usage_archives.state = 'archiving' AND usage_archives.claimed_at_us < $5) \
             RETURNING claim",
        )
        .bind(period.start_us())
        .bind(period.to_string())
        .bind(claim)
        .bind(now)
        .bind(now.saturating_sub(STALE_CLAIM_US))
        .fetch_optional(self.db.pool())
        .await?;
        if won.is_some() {
            return Ok(());
        }
        match self.state(period).await?.as_deref() {
            Some("archived") => Err(BillingError::AlreadyExists(format!(
                "the archive of {period}"
            ))),
            _ => Err(BillingError::Precondition(format!(
                "{period} is being archived by another run; retry later"
            ))),
        }
    }

    /// Gives up a claim that did not end in an archive: the month is as it
    /// was (never archived, or restored).
    async fn release(&self, period: Month, claim: &str) {
        let released = sqlx::query(
            "DELETE FROM usage_archives WHERE month_start_us = $1 AND claim = $2 \
             AND state = 'archiving' AND restored_at_us IS NULL",
        )
        .bind(period.start_us())
        .bind(claim)
        .execute(self.db.pool())
        .await;
        let restored = sqlx::query(
            "UPDATE usage_archives SET state = 'restored' WHERE month_start_us = $1 \
             AND claim = $2 AND state = 'archiving'",
        )
        .bind(period.start_us())
        .bind(claim)
        .execute(self.db.pool())
        .await;
        if let Err(error) = released.and(restored) {
            tracing::warn!(%error, %period, "archive: a failed run's claim stays until it is stale");
        }
    }

    /// Writes `period`'s events to files of their own and a manifest, checks
    /// the file against the database, and removes the events from it.
    pub async fn archive(&self, period: Month) -> Result<Manifest, BillingError> {
        {
            let mut conn = self.db.pool().acquire().await?;
            if let Some(why) = Self::refusal(&mut conn, period).await? {
                return Err(BillingError::Precondition(format!(
                    "cannot archive {period}: {why}"
                )));
            }
        }
        let claim = uuid::Uuid::new_v4().simple().to_string();
        self.claim(period, &claim).await?;
        let archived = self.archive_claimed(period, &claim).await;
        if archived.is_err() {
            self.release(period, &claim).await;
        }
        archived
    }

    async fn archive_claimed(&self, period: Month, claim: &str) -> Result<Manifest, BillingError> {
        crate::private_fs::private_dir(&self.dir)
            .map_err(|e| internal(format!("archive directory {}: {e}", self.dir.display())))?;
        let (parquet, manifest_path) = self.paths(period, claim);
        let written = self.write_file(period, &parquet).await?;
        if written.events == 0 {
            let _ = std::fs::remove_file(&parquet);
            return Err(BillingError::Precondition(format!(
                "{period} has no usage events to archive"
            )));
        }
        let check = parquet.clone();
        let (sha256, read_back) = tokio::task::spawn_blocking(move || {
            Ok::<_, BillingError>((sha256_of(&check)?, read_totals(&check)?))
        })
        .await
        .map_err(internal)??;
        if read_back != written {
            return Err(internal(format!(
                "the archive of {period} reads back as {read_back:?}, not {written:?}"
            )));
        }
        let manifest = Manifest {
            period: period.to_string(),
            file: file_name(&parquet),
            sha256,
            events: written.events,
            prompt_tokens: written.prompt_tokens,
            completion_tokens: written.completion_tokens,
            archived_at_us: now_us(),
        };
        write_manifest(&manifest_path, &manifest)?;
        // The file and manifest names are durable before their events go.
        sync_dir(&self.dir)?;
        self.remove_month(period, &manifest, claim).await?;
        tracing::info!(%period, events = manifest.events, file = %parquet.display(), "usage archived");
        Ok(manifest)
    }

    /// Reads the month in key order into the file; returns what it wrote.
    async fn write_file(&self, period: Month, path: &Path) -> Result<Totals, BillingError> {
        let mut file =
            ExportFile::<ArchivedEvent>::create(path, FileFormat::Parquet).map_err(internal)?;
        let mut totals = Totals::default();
        let mut after = (String::new(), i64::MIN, String::new());
        loop {
            let page: Vec<ArchivedEvent> = sqlx::query_as(&format!(
                "SELECT {COLUMNS} FROM usage_events \
                 WHERE finished_at_us >= $1 AND finished_at_us < $2 \
                 AND (tenant_id, finished_at_us, request_id) > ($3, $4, $5) \
                 ORDER BY tenant_id, finished_at_us, request_id LIMIT $6"
            ))
            .bind(period.start_us())
            .bind(period.end_us())
            .bind(after.0.as_str())
            .bind(after.1)
            .bind(after.2.as_str())
            .bind(PAGE_ROWS)
            .fetch_all(self.db.pool())
            .await?;
            for e in &page {
                totals.add(e.prompt_tokens, e.completion_tokens);
            }
            file.write_chunk(&page).map_err(internal)?;
            match page.last() {
                Some(last) if page.len() as i64 == PAGE_ROWS => {
                    after = (
                        last.tenant_id.clone(),
                        last.finished_at_us,
                        last.request_id.clone(),
                    );
                }
                _ => break,
            }
        }
        file.finish().map_err(internal)?;
        Ok(totals)
    }

    /// Removes the month's events and records the archive, in one
    /// transaction under the archive lock (inserts wait for it), after
    /// checking again, under the lock, that nothing bills from the month,
    /// that the claim is still this run's, and that the database holds
    /// exactly what the file holds.
    async fn remove_month(
        &self,
        period: Month,
        manifest: &Manifest,
        claim: &str,
    ) -> Result<(), BillingError> {
        let (start, end) = (period.start_us(), period.end_us());
        let mut tx = self.db.begin_write().await?;
        if self.db.backend() == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(crate::metering::ARCHIVE_LOCK_KEY)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(why) = Self::refusal(&mut tx, period).await? {
            return Err(BillingError::Precondition(format!(
                "cannot archive {period}: {why}"
            )));
        }
        let held: Option<(String, String)> =
            sqlx::query_as("SELECT claim, state FROM usage_archives WHERE month_start_us = $1")
                .bind(start)
                .fetch_optional(&mut *tx)
                .await?;
        if held != Some((claim.to_owned(), "archiving".to_owned())) {
            return Err(BillingError::Precondition(format!(
                "{period}: this run's claim was taken over; its files are left unused"
            )));
        }
        // PostgreSQL sums BIGINT as NUMERIC: cast back for both drivers.
        let (events, prompt, completion): (i64, i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT) FROM usage_events \
             WHERE finished_at_us >= $1 AND finished_at_us < $2",
        )
        .bind(start)
        .bind(end)
        .fetch_one(&mut *tx)
        .await?;
        let now = Totals {
            events: u64::try_from(events).unwrap_or(0),
            prompt_tokens: u64::try_from(prompt).unwrap_or(0),
            completion_tokens: u64::try_from(completion).unwrap_or(0),
        };
        let archived = Totals {
            events: manifest.events,
            prompt_tokens: manifest.prompt_tokens,
            completion_tokens: manifest.completion_tokens,
        };
        if now != archived {
            return Err(BillingError::Precondition(format!(
                "{period} changed while it was archived ({now:?} now, {archived:?} in the file); \
                 archive it again"
            )));
        }
        sqlx::query(
            "UPDATE usage_archives SET state = 'archived', file = $1, sha256 = $2, events = $3, \
             prompt_tokens = $4, completion_tokens = $5, archived_at_us = $6, \
             restored_at_us = NULL WHERE month_start_us = $7 AND claim = $8",
        )
        .bind(&manifest.file)
        .bind(&manifest.sha256)
        .bind(events)
        .bind(prompt)
        .bind(completion)
        .bind(manifest.archived_at_us)
        .bind(start)
        .bind(claim)
        .execute(&mut *tx)
        .await?;
        if self.db.backend() == Backend::Postgres {
            // The whole partition goes at once; what sits in the default
            // partition (none, normally) is deleted row by row below.
            let suffix = Month::of_us(start).table_suffix();
            let partition = format!("usage_events_{suffix}");
            let exists: Option<(String,)> =
                sqlx::query_as("SELECT to_regclass($1)::text WHERE to_regclass($1) IS NOT NULL")
                    .bind(&partition)
                    .fetch_optional(&mut *tx)
                    .await?;
            if exists.is_some() {
                // Identifiers cannot be bound; `suffix` is digits and '_'.
                sqlx::query(&format!(
                    "ALTER TABLE usage_events DETACH PARTITION {partition}"
                ))
                .execute(&mut *tx)
                .await?;
                sqlx::query(&format!("DROP TABLE {partition}"))
                    .execute(&mut *tx)
                    .await?;
            }
        }
        sqlx::query("DELETE FROM usage_events WHERE finished_at_us >= $1 AND finished_at_us < $2")
            .bind(start)
            .bind(end)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Puts an archived month's events back from its file, after checking
    /// the file against its manifest and the database's record of it. While
    /// the month is archived the metering writer inserts nothing into it, so
    /// no lock is needed; the events go in batches, in one transaction.
    pub async fn restore(&self, period: Month) -> Result<Manifest, BillingError> {
        let row: Option<(String, String, String)> = sqlx::query_as(
            "SELECT state, file, sha256 FROM usage_archives WHERE month_start_us = $1",
        )
        .bind(period.start_us())
        .fetch_optional(self.db.pool())
        .await?;
        let Some((state, file, recorded)) = row.filter(|(state, _, _)| state == "archived") else {
            return Err(BillingError::NotFound(format!(
                "an archive of {period} whose events are out of the database"
            )));
        };
        let _ = state;
        let parquet = self.dir.join(&file);
        let manifest_path = self.manifest_path(&file);
        let manifest: Manifest = std::fs::read(&manifest_path)
            .map_err(|e| internal(format!("{}: {e}", manifest_path.display())))
            .and_then(|bytes| serde_json::from_slice(&bytes).map_err(internal))?;
        let check = parquet.clone();
        let sha256 = tokio::task::spawn_blocking(move || sha256_of(&check))
            .await
            .map_err(internal)??;
        if sha256 != manifest.sha256 || sha256 != recorded {
            return Err(BillingError::Precondition(format!(
                "{} does not match its manifest or the database's record of it (SHA-256 {sha256})",
                parquet.display()
            )));
        }
        if let Some(pg) = self.db.postgres() {
            crate::metering::create_partition(pg, period).await?;
        }
        let mut restored = 0u64;
        let mut tx = self.db.begin_write().await?;
        for batch in batches(&parquet)? {
            let batch = batch?;
            for chunk in batch.chunks(500) {
                insert_events(&mut tx, chunk).await?;
            }
            restored += batch.len() as u64;
        }
        if restored != manifest.events {
            return Err(internal(format!(
                "{} holds {restored} events, its manifest {}",
                parquet.display(),
                manifest.events
            )));
        }
        sqlx::query(
            "UPDATE usage_archives SET state = 'restored', restored_at_us = $1 \
             WHERE month_start_us = $2 AND state = 'archived'",
        )
        .bind(now_us())
        .bind(period.start_us())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(%period, events = restored, "usage restored from its archive");
        Ok(manifest)
    }
}

/// Inserts archived events as they were.
async fn insert_events(
    conn: &mut sqlx::AnyConnection,
    events: &[ArchivedEvent],
) -> Result<(), BillingError> {
    let rows =
        vec![format!("({})", vec!["?"; ArchivedEvent::COLUMNS.len()].join(", ")); events.len()]
            .join(", ");
    let sql = numbered(&format!(
        "INSERT INTO usage_events ({COLUMNS}) VALUES {rows}"
    ));
    let mut query = sqlx::query(&sql);
    for e in events {
        query = query
            .bind(&e.tenant_id)
            .bind(&e.request_id)
            .bind(&e.key_id)
            .bind(&e.model)
            .bind(&e.device_profile)
            .bind(e.prompt_tokens)
            .bind(e.cached_prompt_tokens)
            .bind(e.completion_tokens)
            .bind(e.queue_time_us)
            .bind(e.ttft_us)
            .bind(e.total_time_us)
            .bind(e.device_time_us)
            .bind(e.energy_mj)
            .bind(e.mean_power_mw)
            .bind(&e.finish_reason)
            .bind(e.started_at_us)
            .bind(e.finished_at_us)
            .bind(e.recorded_at_us);
    }
    query.execute(&mut *conn).await?;
    Ok(())
}

/// Makes the names of files just created or renamed in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), BillingError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| internal(format!("{}: {e}", dir.display())))
}

/// `?` placeholders numbered `$1, $2, …` (both drivers read those).
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + sql.len() / 4);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push_str(&format!("${n}"));
        } else {
            out.push(c);
        }
    }
    out
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn sha256_of(path: &Path) -> Result<String, BillingError> {
    let mut file =
        std::fs::File::open(path).map_err(|e| internal(format!("{}: {e}", path.display())))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)
        .map_err(|e| internal(format!("{}: {e}", path.display())))?;
    Ok(crate::hex::encode(&hasher.finalize()))
}

fn write_manifest(path: &Path, manifest: &Manifest) -> Result<(), BillingError> {
    let partial = super::file::partial_path(path);
    let text = serde_json::to_vec_pretty(manifest).map_err(internal)?;
    let write = || -> std::io::Result<()> {
        let mut file = crate::private_fs::private_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)?;
        std::io::Write::write_all(&mut file, &text)?;
        file.sync_all()?;
        std::fs::rename(&partial, path)
    };
    write().map_err(|e| internal(format!("{}: {e}", path.display())))
}

/// The events of an archive file, one record batch at a time, so memory
/// holds one batch (about a thousand events), whatever the month's size.
pub fn batches(
    path: &Path,
) -> Result<impl Iterator<Item = Result<Vec<ArchivedEvent>, BillingError>>, BillingError> {
    let file =
        std::fs::File::open(path).map_err(|e| internal(format!("{}: {e}", path.display())))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(internal)?;
    let path = path.to_owned();
    Ok(reader.map(move |batch| {
        let batch = batch.map_err(internal)?;
        events_of(&batch, &path)
    }))
}

/// The events of one record batch.
fn events_of(
    batch: &arrow_array::RecordBatch,
    path: &Path,
) -> Result<Vec<ArchivedEvent>, BillingError> {
    let text = |name: &str| -> Result<Arc<StringArray>, BillingError> {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned())
            .map(Arc::new)
            .ok_or_else(|| internal(format!("{}: no text column {name}", path.display())))
    };
    let int = |name: &str| -> Result<Arc<Int64Array>, BillingError> {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>().cloned())
            .map(Arc::new)
            .ok_or_else(|| internal(format!("{}: no integer column {name}", path.display())))
    };
    let (tenant, request, key, model, device, finish) = (
        text("tenant_id")?,
        text("request_id")?,
        text("key_id")?,
        text("model")?,
        text("device_profile")?,
        text("finish_reason")?,
    );
    let ints: Vec<Arc<Int64Array>> = ArchivedEvent::COLUMNS
        .iter()
        .filter(|(_, is_text)| !is_text)
        .map(|(name, _)| int(name))
        .collect::<Result<_, _>>()?;
    Ok((0..batch.num_rows())
        .map(|row| {
            let i = |n: usize| ints[n].value(row);
            ArchivedEvent {
                tenant_id: tenant.value(row).to_owned(),
                request_id: request.value(row).to_owned(),
                key_id: key.value(row).to_owned(),
                model: model.value(row).to_owned(),
                device_profile: device.value(row).to_owned(),
                prompt_tokens: i(0),
                cached_prompt_tokens: i(1),
                completion_tokens: i(2),
                queue_time_us: i(3),
                ttft_us: i(4),
                total_time_us: i(5),
                device_time_us: i(6),
                energy_mj: i(7),
                mean_power_mw: i(8),
                finish_reason: finish.value(row).to_owned(),
                started_at_us: i(9),
                finished_at_us: i(10),
                recorded_at_us: i(11),
            }
        })
        .collect())
}

fn read_totals(path: &Path) -> Result<Totals, BillingError> {
    let mut totals = Totals::default();
    for batch in batches(path)? {
        for e in batch? {
            totals.add(e.prompt_tokens, e.completion_tokens);
        }
    }
    Ok(totals)
}

impl Archiver {
    /// The retention job: every hour until `stop`, archives each month
    /// that ended more than `months` months before the current one (looking
    /// back three years), once nothing bills from it. A month not ready yet
    /// (a draft, late usage) is tried again the next hour; a month with a
    /// row in `usage_archives` (archived, being archived, or restored for
    /// an audit) is left alone.
    pub async fn run_retention(self, months: u32, stop: tokio_util::sync::CancellationToken) {
        loop {
            self.archive_due(months).await;
            tokio::select! {
                () = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// One round of the retention job.
    pub async fn archive_due(&self, months: u32) {
        let mut period = Month::of_us(now_us());
        for _ in 0..months {
            period = Month::of_us(period.start_us() - 1);
        }
        for _ in 0..36 {
            period = Month::of_us(period.start_us() - 1);
            match self.state(period).await {
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(%error, "archive job: cannot read the archived months");
                    return;
                }
            }
            let any: Result<Option<(i64,)>, _> = sqlx::query_as(
                "SELECT finished_at_us FROM usage_events \
                 WHERE finished_at_us >= $1 AND finished_at_us < $2 LIMIT 1",
            )
            .bind(period.start_us())
            .bind(period.end_us())
            .fetch_optional(self.db.pool())
            .await;
            match any {
                Ok(None) => continue,
                Ok(Some(_)) => {}
                Err(error) => {
                    tracing::warn!(%error, %period, "archive job: cannot read the month");
                    return;
                }
            }
            match self.archive(period).await {
                Ok(manifest) => {
                    tracing::info!(%period, events = manifest.events, "archive job: month archived");
                }
                Err(BillingError::Precondition(why)) => {
                    tracing::debug!(%period, %why, "archive job: not yet");
                }
                Err(error) => tracing::warn!(%error, %period, "archive job: month not archived"),
            }
        }
    }
}
