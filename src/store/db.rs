//! The connection pool and migrations for either backend.

use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::migrate::Migrator;
use sqlx::{AnyConnection, AnyPool, Connection, Executor};

use super::StoreError;
use crate::config::{Settings, redact_url};

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");

/// How long a SQLite writer waits for the write lock before failing. Every
/// write transaction takes the lock first (see [`Db::begin_write`]), so
/// writers queue here instead of failing with `database is locked`.
const SQLITE_BUSY_TIMEOUT_MS: u32 = 10_000;

/// Which database engine a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A pool of connections to the gateway's database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
    display_url: String,
    /// A typed pool for the few PostgreSQL-only statements (array binds).
    postgres: Option<sqlx::PgPool>,
}

impl Db {
    /// Opens the configured database: `database.url` if set, else the
    /// embedded SQLite file under `data_dir` (created if missing). Fails fast
    /// (within `database.connect_timeout`) if it cannot be reached.
    pub async fn connect(settings: &Settings) -> Result<Db, StoreError> {
        let url = match &settings.database.url {
            Some(url) => url.expose_secret().to_owned(),
            None => {
                let dir = &settings.data_dir;
                let data_dir_error = |source| StoreError::DataDir {
                    path: dir.clone(),
                    source,
                };
                crate::private_fs::private_dir(dir).map_err(data_dir_error)?;
                // 0600 before SQLite opens it; its -wal and -shm files take
                // the database file's mode.
                let file = dir.join("ascend-gateway.db");
                crate::private_fs::restrict_file(&file).map_err(data_dir_error)?;
                format!(
                    "sqlite://{}?mode=rwc",
                    dir.join("ascend-gateway.db").display()
                )
            }
        };
        Self::connect_url_with(
            &url,
            settings.database.max_connections,
            settings.database.connect_timeout,
            settings.database.acquire_timeout,
        )
        .await
    }

    /// Opens a database by URL (`postgres://…` or `sqlite://…`).
    pub async fn connect_url(
        url: &str,
        max_connections: u32,
        connect_timeout: Duration,
    ) -> Result<Db, StoreError> {
        Self::connect_url_with(url, max_connections, connect_timeout, connect_timeout).await
    }

    /// As [`Db::connect_url`]; a query waits at most `acquire_timeout` for a
    /// connection once running (a database outage must not hold requests
    /// for the whole `connect_timeout`).
    pub async fn connect_url_with(
        url: &str,
        max_connections: u32,
        connect_timeout: Duration,
        acquire_timeout: Duration,
    ) -> Result<Db, StoreError> {
        install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            Backend::Postgres
        };
        let display_url = redact_url(url);
        let connect_error = |source| StoreError::Connect {
            url: display_url.clone(),
            hint: match backend {
                Backend::Postgres => {
                    "check that PostgreSQL is running and that host, port, user and database in the URL are right"
                }
                Backend::Sqlite => "check that the directory exists and is writable",
            },
            source,
        };
        // One direct connection first: a pool only reports "timed out", while
        // this says what actually failed (refused, unknown database, ...).
        let probe = tokio::time::timeout(connect_timeout, AnyConnection::connect(url))
            .await
            .map_err(|_| connect_error(sqlx::Error::PoolTimedOut))?
            .map_err(connect_error)?;
        probe.close().await.map_err(connect_error)?;
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(acquire_timeout)
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers run beside the one writer; the busy
                        // timeout makes writers queue instead of failing.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute(
                            format!("PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}").as_str(),
                        )
                        .await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await
            .map_err(connect_error)?;
        let postgres = match backend {
            Backend::Postgres => Some(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(acquire_timeout)
                    .connect_lazy(url)
                    .map_err(connect_error)?,
            ),
            Backend::Sqlite => None,
        };
        Ok(Db {
            pool,
            backend,
            display_url,
            postgres,
        })
    }

    /// Applies every pending migration of this backend. Safe to run from
    /// several gateways at once: the migrator takes a lock.
    pub async fn migrate(&self) -> Result<MigrationReport, StoreError> {
        let migrator = match self.backend {
            Backend::Postgres => &POSTGRES_MIGRATIONS,
            Backend::Sqlite => &SQLITE_MIGRATIONS,
        };
        let before = self.applied_versions().await?;
        migrator.run(&self.pool).await?;
        let after = self.applied_versions().await?;
        Ok(MigrationReport {
            applied_now: after.saturating_sub(before),
            total: after,
        })
    }

    async fn applied_versions(&self) -> Result<usize, StoreError> {
        // The migrations table does not exist before the first run.
        let exists: Option<(i64,)> = sqlx::query_as(match self.backend {
            Backend::Postgres => {
                "SELECT 1::BIGINT FROM information_schema.tables WHERE table_name = '_sqlx_migrations'"
            }
            Backend::Sqlite => {
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'"
            }
        })
        .fetch_optional(&self.pool)
        .await?;
        if exists.is_none() {
            return Ok(0);
        }
        let (count,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM _sqlx_migrations WHERE success = TRUE")
                .fetch_one(&self.pool)
                .await?;
        Ok(usize::try_from(count).unwrap_or(0))
    }

    /// A round trip to the database, for readiness checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Starts a transaction that will write. On SQLite it takes the write
    /// lock at once (`BEGIN IMMEDIATE`), waiting up to the busy timeout
    /// behind other writers: a deferred transaction that reads first and
    /// writes later cannot be granted the lock when another connection
    /// committed in between (`SQLITE_BUSY_SNAPSHOT`, code 517), and fails
    /// without waiting. On PostgreSQL a plain `BEGIN`.
    pub async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.pool.begin().await,
        }
    }

    /// The typed PostgreSQL pool, for statements the `Any` driver cannot
    /// express; `None` on SQLite.
    pub fn postgres(&self) -> Option<&sqlx::PgPool> {
        self.postgres.as_ref()
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The URL with any password hidden, for logs.
    pub fn display_url(&self) -> &str {
        &self.display_url
    }

    /// Waits for connections in use to be returned, then closes them.
    pub async fn close(&self) {
        self.pool.close().await;
        if let Some(pg) = &self.postgres {
            pg.close().await;
        }
    }
}

/// What [`Db::migrate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationReport {
    pub applied_now: usize,
    pub total: usize,
}
