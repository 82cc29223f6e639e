//! Turns the `authorization` value of a request into a [`Principal`], or
//! says why not.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::cache::{KeyCache, Lookup};
use super::key::{self, KeyHash};
use super::principal::OperatorPrincipal;
use super::throttle::{FailureKind, FailureThrottle};
use super::{AdminCredential, AuthError, LastUsedRecorder, Principal, TenantPrincipal};
use crate::error::{Classified, ErrorKind};
use crate::store::now_us;
use crate::tenancy::{KeyForAuth, Scope, TenancyService, TenantStatus, operators};

/// What an RPC demands of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// The operator's admin token.
    Admin,
    /// A tenant key holding this scope.
    Scope(Scope),
    /// The admin token, or a tenant key holding this scope.
    AdminOrScope(Scope),
}

pub struct Authenticator {
    tenancy: TenancyService,
    cache: Arc<KeyCache>,
    admin: Option<AdminCredential>,
    last_used: Arc<LastUsedRecorder>,
    /// When a lookup last found the database unreachable.
    last_outage: Mutex<Option<Instant>>,
    failures: FailureThrottle,
}

/// A refused credential: what the client is told, and what is counted and
/// logged (the log may say more than the client is told).
struct Refusal {
    error: AuthError,
    /// `None` for a valid credential that may not do this (not a failure
    /// to authenticate).
    kind: Option<FailureKind>,
    detail: String,
}

fn unauthenticated(kind: FailureKind, message: impl Into<String>) -> Refusal {
    let message = message.into();
    Refusal {
        detail: message.clone(),
        error: AuthError::Unauthenticated(message),
        kind: Some(kind),
    }
}

impl From<AuthError> for Refusal {
    fn from(error: AuthError) -> Refusal {
        Refusal {
            detail: String::new(),
            error,
            kind: None,
        }
    }
}

/// What every client presenting a bad API key is told, whether its id is
/// unknown or its secret wrong: the difference would tell a guesser which
/// key ids exist.
const INVALID_KEY: &str = "invalid API key";

/// After a lookup found the database down, lookups within this long go
/// straight to the stale cache instead of each waiting for a connection.
const OUTAGE_SHORTCUT: Duration = Duration::from_secs(1);

impl Authenticator {
    pub fn new(
        tenancy: TenancyService,
        cache: Arc<KeyCache>,
        admin: Option<AdminCredential>,
        last_used: Arc<LastUsedRecorder>,
        failures: FailureThrottle,
    ) -> Authenticator {
        Authenticator {
            tenancy,
            cache,
            admin,
            last_used,
            last_outage: Mutex::new(None),
            failures,
        }
    }

    /// Refused credentials of `kind` so far.
    pub fn failure_count(&self, kind: FailureKind) -> u64 {
        self.failures.count(kind)
    }

    fn in_outage(&self) -> bool {
        let last = self.last_outage.lock().unwrap_or_else(|e| e.into_inner());
        last.is_some_and(|at| at.elapsed() < OUTAGE_SHORTCUT)
    }

    /// Looks the key up in the database; when it cannot be reached, falls
    /// back on the last known answer within the cache's stale window.
    async fn lookup(&self, key_id: &str) -> Result<Lookup, AuthError> {
        if self.in_outage()
            && let Some(stale) = self.cache.get_stale(key_id)
        {
            return Ok(stale);
        }
        match self.tenancy.key_for_auth(key_id).await {
            Ok(found) => {
                let found = found.map(Arc::new);
                self.cache.put(key_id, found.clone());
                Ok(found)
            }
            Err(e) if e.kind() == ErrorKind::Unavailable => {
                *self.last_outage.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                match self.cache.get_stale(key_id) {
                    Some(stale) => {
                        tracing::warn!(error = %e, "database unreachable: judging a key by its last known state");
                        Ok(stale)
                    }
                    None => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Checks the raw `authorization` header value against `requirement`.
    /// `peer` is the client's address: a peer that failed too often is
    /// refused without a check until its budget refills.
    pub async fn authenticate(
        &self,
        header: Option<&[u8]>,
        requirement: Requirement,
        peer: Option<std::net::IpAddr>,
    ) -> Result<Principal, AuthError> {
        use tracing::Instrument as _;
        let request = tracing::Span::current();
        let span = crate::trace_span!("authenticate");
        let result = self
            .authenticate_untraced(header, requirement, peer)
            .instrument(span.clone())
            .await;
        match &result {
            Ok(Principal::Tenant(tenant)) => {
                crate::traces::set(&request, "ascend.tenant_id", tenant.tenant_id.clone());
                crate::traces::set(&request, "ascend.api_key_id", tenant.key_id.clone());
            }
            Ok(Principal::Admin(operator)) => {
                crate::traces::set(&request, "ascend.operator", operator.name.clone());
            }
            Err(error) => {
                crate::traces::set(&span, "ascend.auth.refused", error.kind().as_str());
            }
        }
        result
    }

    async fn authenticate_untraced(
        &self,
        header: Option<&[u8]>,
        requirement: Requirement,
        peer: Option<std::net::IpAddr>,
    ) -> Result<Principal, AuthError> {
        if let Err(retry_after) = self.failures.check(peer) {
            self.failures.record(
                peer,
                FailureKind::Throttled,
                "too many failed authentications",
            );
            return Err(AuthError::Throttled { retry_after });
        }
        match self.check(header, requirement).await {
            Ok(principal) => Ok(principal),
            Err(refusal) => {
                if let Some(kind) = refusal.kind {
                    self.failures.record(peer, kind, &refusal.detail);
                }
                Err(refusal.error)
            }
        }
    }

    async fn check(
        &self,
        header: Option<&[u8]>,
        requirement: Requirement,
    ) -> Result<Principal, Refusal> {
        let Some(header) = header else {
            return Err(unauthenticated(
                FailureKind::Missing,
                "missing credentials: send `authorization: Bearer <key>` (a gRPC metadata entry or an HTTP header)",
            ));
        };
        let token = bearer_token(header).ok_or_else(|| {
            unauthenticated(
                FailureKind::Malformed,
                "malformed `authorization`: expected `Bearer <key>`",
            )
        })?;
        if let Some(presented) = key::parse_operator(token) {
            return self.operator(presented, requirement).await;
        }
        match key::parse(token) {
            Some(presented) => {
                let principal = self.tenant_key(presented.key_id, &presented.hash).await?;
                check_tenant(&principal, requirement)?;
                self.last_used.record(&principal.key_id);
                Ok(Principal::Tenant(principal))
            }
            None => {
                let is_admin = self
                    .admin
                    .as_ref()
                    .is_some_and(|admin| admin.matches(token));
                if !is_admin {
                    return Err(unauthenticated(
                        FailureKind::InvalidToken,
                        "invalid credentials: not a valid API key or admin token",
                    ));
                }
                match requirement {
                    Requirement::Admin | Requirement::AdminOrScope(_) => {
                        Ok(Principal::Admin(OperatorPrincipal {
                            name: operators::BOOTSTRAP.to_owned(),
                            role: operators::Role::Admin,
                        }))
                    }
                    Requirement::Scope(scope) => Err(AuthError::PermissionDenied(format!(
                        "the admin token cannot call this RPC; use a tenant API key with scope `{}`",
                        scope.as_str()
                    ))
                    .into()),
                }
            }
        }
    }

    /// A named operator's token: its role decides later which RPCs it may
    /// call; it never calls tenant RPCs.
    async fn operator(
        &self,
        presented: key::PresentedKey<'_>,
        requirement: Requirement,
    ) -> Result<Principal, Refusal> {
        let found = self
            .tenancy
            .operator_for_auth(presented.key_id)
            .await
            .map_err(|e| Refusal {
                error: e.into(),
                kind: None,
                detail: "operator lookup failed".to_owned(),
            })?;
        let valid = found.filter(|(_, hash)| {
            KeyHash::from_hex(hash).is_some_and(|stored| stored.matches(&presented.hash))
        });
        let Some((operator, _)) = valid else {
            return Err(unauthenticated(
                FailureKind::InvalidToken,
                "invalid credentials: not a valid operator token (unknown, revoked or mistyped)",
            ));
        };
        match requirement {
            Requirement::Admin | Requirement::AdminOrScope(_) => {
                Ok(Principal::Admin(OperatorPrincipal {
                    name: operator.name,
                    role: operator.role,
                }))
            }
            Requirement::Scope(scope) => Err(AuthError::PermissionDenied(format!(
                "an operator token cannot call this RPC; use a tenant API key with scope `{}`",
                scope.as_str()
            ))
            .into()),
        }
    }

    async fn tenant_key(
        &self,
        key_id: &str,
        presented: &KeyHash,
    ) -> Result<Arc<TenantPrincipal>, Refusal> {
        let lookup = match self.cache.get(key_id) {
            Some(lookup) => lookup,
            None => self.lookup(key_id).await?,
        };
        let invalid = |detail: String| Refusal {
            error: AuthError::Unauthenticated(INVALID_KEY.to_owned()),
            kind: Some(FailureKind::InvalidKey),
            detail,
        };
        let Some(record) = lookup else {
            return Err(invalid(format!("unknown API key {key_id}")));
        };
        let now = now_us();
        if !secret_matches(&record, presented, now) {
            return Err(invalid(format!("wrong secret for API key {key_id}")));
        }
        // From here on the caller holds the key's secret: telling it why
        // its own key fails gives nothing away.
        if record.revoked_at_us.is_some() {
            return Err(unauthenticated(
                FailureKind::RevokedKey,
                format!("API key {key_id} is revoked"),
            ));
        }
        if record.expires_at_us.is_some_and(|at| at <= now) {
            return Err(unauthenticated(
                FailureKind::ExpiredKey,
                format!("API key {key_id} has expired"),
            ));
        }
        match TenantStatus::parse(&record.tenant_status) {
            Some(TenantStatus::Active) => {}
            Some(TenantStatus::Suspended) => {
                return Err(AuthError::PermissionDenied(format!(
                    "tenant {} is suspended",
                    record.tenant_slug
                ))
                .into());
            }
            Some(TenantStatus::Deleted) | None => {
                return Err(unauthenticated(
                    FailureKind::DeletedTenant,
                    format!("API key {key_id} belongs to a deleted tenant"),
                ));
            }
        }
        Ok(Arc::new(TenantPrincipal {
            tenant_id: record.tenant_id.clone(),
            tenant_slug: record.tenant_slug.clone(),
            key_id: record.key_id.clone(),
            scopes: crate::tenancy::parse_scopes(&record.scopes),
            scheduling_weight: u32::try_from(record.scheduling_weight).unwrap_or(1),
            price_plan: record.price_plan.clone(),
            limits: record.limits(),
            key_limits: record.key_limits(),
            // The schema allows only the values `parse` knows.
            cache_scope: crate::tenancy::CacheScope::parse(&record.cache_scope).unwrap_or_default(),
        }))
    }
}

fn check_tenant(principal: &TenantPrincipal, requirement: Requirement) -> Result<(), AuthError> {
    let scope = match requirement {
        Requirement::Admin => {
            return Err(AuthError::PermissionDenied(
                "this RPC needs the operator's admin token; tenant API keys cannot call it"
                    .to_owned(),
            ));
        }
        Requirement::Scope(scope) | Requirement::AdminOrScope(scope) => scope,
    };
    if principal.scopes.contains(&scope) {
        Ok(())
    } else {
        Err(AuthError::PermissionDenied(format!(
            "API key {} lacks the scope `{}`",
            principal.key_id,
            scope.as_str()
        )))
    }
}

/// The current secret, or the previous one while its rotation overlap lasts.
fn secret_matches(record: &KeyForAuth, presented: &KeyHash, now: i64) -> bool {
    let current = KeyHash::from_hex(&record.secret_hash).is_some_and(|h| h.matches(presented));
    let previous = record
        .previous_secret_hash
        .as_deref()
        .and_then(KeyHash::from_hex)
        .is_some_and(|h| h.matches(presented))
        && record
            .previous_expires_at_us
            .is_some_and(|until| now < until);
    current | previous
}

/// The token of a `Bearer` header value (scheme case-insensitive).
fn bearer_token(header: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(header).ok()?;
    let (scheme, token) = text.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_token(b"Bearer abc"), Some("abc"));
        assert_eq!(bearer_token(b"bearer  abc "), Some("abc"));
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"\xff\xfe"), None);
    }
}
