//! Named operators with roles: who may administer the gateway, each with a
//! token of their own (`agwop_<id>_<secret>`, only its SHA-256 stored), so
//! the audit log says who did what. The configured admin token stays, as
//! the operator `bootstrap` with the `admin` role.
//!
//! Knows operators as rows; which RPC a role may call is the API's rule.

use secrecy::SecretString;
use serde::Serialize;
use sqlx::AnyConnection;

use super::TenancyError;
use super::validate;

/// What an operator may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything.
    Admin,
    /// Prices, invoices, exports and finalization, and what a viewer reads.
    Billing,
    /// Read-only: tenants, keys, usage, invoices, the audit log.
    Viewer,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Admin, Role::Billing, Role::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Billing => "billing",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        Self::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

/// The bootstrap credential's operator name.
pub const BOOTSTRAP: &str = "bootstrap";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Operator {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_at_us: i64,
    pub revoked_at_us: Option<i64>,
}

/// A new operator and its token, shown this once.
#[derive(Debug)]
pub struct IssuedOperator {
    pub operator: Operator,
    pub token: SecretString,
}

#[derive(sqlx::FromRow)]
struct OperatorRow {
    id: String,
    name: String,
    role: String,
    created_at_us: i64,
    revoked_at_us: Option<i64>,
    token_hash: String,
}

impl OperatorRow {
    fn operator(self) -> Result<(Operator, String), TenancyError> {
        let role = Role::parse(&self.role).ok_or_else(|| {
            TenancyError::from(sqlx::Error::Decode(
                "unexpected value in column operators.role".into(),
            ))
        })?;
        Ok((
            Operator {
                id: self.id,
                name: self.name,
                role,
                created_at_us: self.created_at_us,
                revoked_at_us: self.revoked_at_us,
            },
            self.token_hash,
        ))
    }
}

const COLUMNS: &str = "id, name, role, created_at_us, revoked_at_us, token_hash";

/// An operator's name: as a tenant slug is (lowercase letters, digits and
/// '-', 3 to 63 characters), and never `bootstrap`.
pub fn validate_name(name: &str) -> Result<(), TenancyError> {
    validate::slug(name).map_err(|_| {
        TenancyError::invalid(
            "name",
            "lowercase letters, digits and '-', 3 to 63 characters, starting and ending with a letter or digit",
        )
    })?;
    // An operator is named by id or name in the API: a name in the form of
    // an id (16 hex digits) could stand for another operator.
    if name.len() == 16 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TenancyError::invalid(
            "name",
            "16 hex digits is the form of an operator id; choose another name",
        ));
    }
    if name == BOOTSTRAP {
        return Err(TenancyError::invalid(
            "name",
            "`bootstrap` is the configured admin token's name",
        ));
    }
    Ok(())
}

pub async fn insert(
    conn: &mut AnyConnection,
    operator: &Operator,
    token_hash: &str,
) -> Result<(), TenancyError> {
    let result = sqlx::query(
        "INSERT INTO operators (id, name, role, token_hash, created_at_us) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&operator.id)
    .bind(&operator.name)
    .bind(operator.role.as_str())
    .bind(token_hash)
    .bind(operator.created_at_us)
    .execute(&mut *conn)
    .await;
    match result {
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(
            TenancyError::AlreadyExists(format!("an operator named {:?}", operator.name)),
        ),
        other => other.map(|_| ()).map_err(TenancyError::from),
    }
}

/// An operator by id alone, with its token hash (authentication).
pub async fn fetch_by_id(
    conn: &mut AnyConnection,
    id: &str,
) -> Result<Option<(Operator, String)>, TenancyError> {
    fetch_where(conn, "id = $1", id).await
}

/// An operator by id or name, with its token hash.
pub async fn fetch(
    conn: &mut AnyConnection,
    id_or_name: &str,
) -> Result<Option<(Operator, String)>, TenancyError> {
    // Names never take the form of ids (`validate_name`): one row at most.
    fetch_where(conn, "id = $1 OR name = $1", id_or_name).await
}

async fn fetch_where(
    conn: &mut AnyConnection,
    condition: &str,
    value: &str,
) -> Result<Option<(Operator, String)>, TenancyError> {
    let sql = format!("SELECT {COLUMNS} FROM operators WHERE {condition}");
    let row: Option<OperatorRow> = sqlx::query_as(&sql)
        .bind(value)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(OperatorRow::operator).transpose()
}

pub async fn list(conn: &mut AnyConnection) -> Result<Vec<Operator>, TenancyError> {
    let sql = format!("SELECT {COLUMNS} FROM operators ORDER BY name");
    let rows: Vec<OperatorRow> = sqlx::query_as(&sql).fetch_all(&mut *conn).await?;
    rows.into_iter()
        .map(|r| r.operator().map(|(operator, _)| operator))
        .collect()
}

pub async fn revoke(conn: &mut AnyConnection, id: &str, at_us: i64) -> Result<(), TenancyError> {
    sqlx::query("UPDATE operators SET revoked_at_us = $2 WHERE id = $1 AND revoked_at_us IS NULL")
        .bind(id)
        .bind(at_us)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
