//! Sends the outbox's deliveries: each replica claims due ones under a
//! lease (so a replica set sends each by one replica at a time, and a
//! replica killed mid-send leaves its claims to the others once the lease
//! passes), posts each with the signature header, at most
//! `webhooks.max_in_flight` at once and each within `webhooks.timeout`, and
//! schedules a retry with exponential backoff on a non-2xx answer, a
//! timeout or a refused connection, until `webhooks.retry_for` after the
//! event. Runs on its own task: a receiver that never answers holds one
//! delivery slot for one timeout, never a request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::repo::{self, Due, Outcome};
use super::target::Target;
use super::{WebhookError, WebhookSettings, signature};
use crate::store::{Db, now_us};

/// The longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// How much of an answer's body is read (and thrown away) at most.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The delivery loop of one replica.
pub struct Deliverer {
    db: Db,
    settings: WebhookSettings,
    tls: tokio_rustls::TlsConnector,
}

impl Deliverer {
    pub fn new(db: Db, settings: WebhookSettings) -> Result<Deliverer, WebhookError> {
        let roots = tokio_rustls::rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| WebhookError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Deliverer {
            db,
            settings,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// Claims and sends due deliveries every `webhooks.poll_interval` until
    /// `stop`; deliveries under way then get their timeout to finish.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let slots = Arc::new(tokio::sync::Semaphore::new(self.settings.max_in_flight));
        let mut running = tokio::task::JoinSet::new();
        let mut tick = tokio::time::interval(self.settings.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some(_) = running.join_next(), if !running.is_empty() => continue,
                () = stop.cancelled() => break,
            }
            let free = slots.available_permits();
            if free == 0 {
                continue;
            }
            let claimed = match self.claim(free).await {
                Ok(claimed) => claimed,
                Err(error) => {
                    tracing::warn!(%error, "webhook deliveries not claimed; retrying");
                    continue;
                }
            };
            for id in claimed {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break;
                };
                let this = self.clone();
                running.spawn(async move {
                    if let Err(error) = this.deliver(&id).await {
                        tracing::warn!(%error, delivery = %id, "webhook delivery not recorded; it is retried after its lease");
                    }
                    drop(slot);
                });
            }
        }
        let _ = tokio::time::timeout(self.settings.timeout, async {
            while running.join_next().await.is_some() {}
        })
        .await;
    }

    async fn claim(&self, limit: usize) -> Result<Vec<String>, WebhookError> {
        let now = now_us();
        // Long enough for a whole attempt and its bookkeeping.
        let lease = micros(self.settings.timeout + Duration::from_secs(5));
        let mut tx = self.db.begin_write().await?;
        let claimed = repo::claim(&mut tx, now, now.saturating_add(lease), limit).await?;
        tx.commit().await?;
        Ok(claimed)
    }

    /// One attempt of delivery `id`, and its outcome recorded.
    async fn deliver(&self, id: &str) -> Result<(), WebhookError> {
        let mut conn = self.db.pool().acquire().await?;
        let Some(due) = repo::due(&mut conn, id).await? else {
            return Ok(());
        };
        drop(conn);
        let outcome = if due.webhook_deleted != 0 {
            Outcome::GiveUp {
                status: None,
                error: "endpoint deleted".to_owned(),
            }
        } else {
            match self.post(&due).await {
                Ok(status) if (200..300).contains(&status) => Outcome::Delivered { status },
                Ok(status) => self.after_failure(&due, Some(status), format!("answered {status}")),
                Err(error) => self.after_failure(&due, None, error),
            }
        };
        if let Outcome::Retry { error, .. } | Outcome::GiveUp { error, .. } = &outcome {
            tracing::info!(delivery = %due.id, event = %due.event_id, attempts = due.attempts, %error, "webhook delivery failed");
        }
        let mut tx = self.db.begin_write().await?;
        repo::finish(&mut tx, id, now_us(), &outcome).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A retry after the backoff for this attempt, or giving up once the
    /// event is older than `webhooks.retry_for`.
    fn after_failure(&self, due: &Due, status: Option<u16>, error: String) -> Outcome {
        let now = now_us();
        let exponent = u32::try_from(due.attempts.saturating_sub(1).clamp(0, 20)).unwrap_or(20);
        let backoff = self
            .settings
            .retry_base
            .saturating_mul(1 << exponent)
            .min(MAX_BACKOFF);
        let at_us = now.saturating_add(micros(backoff));
        if at_us
            > due
                .event_created_at_us
                .saturating_add(micros(self.settings.retry_for))
        {
            Outcome::GiveUp {
                status,
                error: format!(
                    "{error}; retried for {}",
                    humantime::format_duration(self.settings.retry_for)
                ),
            }
        } else {
            Outcome::Retry {
                status,
                error,
                at_us,
            }
        }
    }

    /// Posts the event: the answer's status, or why there was none.
    async fn post(&self, due: &Due) -> Result<u16, String> {
        let target = Target::parse(&due.url).map_err(|e| e.to_string())?;
        let attempt = async {
            // Resolved and checked again now, and connected to exactly the
            // addresses checked.
            let addresses = target
                .resolve(self.settings.allow_private)
                .await
                .map_err(|e| e.to_string())?;
            let stream = connect(&addresses).await?;
            let sent_at = now_us().div_euclid(1_000_000);
            let request = hyper::Request::post(target.path_and_query.as_str())
                .header(hyper::header::HOST, target.authority())
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .header(
                    hyper::header::USER_AGENT,
                    concat!("ascend-gateway/", env!("CARGO_PKG_VERSION")),
                )
                .header(
                    signature::HEADER,
                    signature::sign(&due.signing_secret, sent_at, due.body.as_bytes()),
                )
                .header("ascend-event-id", due.event_id.as_str())
                .header("ascend-event-type", due.event_type.as_str())
                .body(Full::new(Bytes::from(due.body.clone())))
                .map_err(|e| format!("request: {e}"))?;
            if target.https {
                let name =
                    tokio_rustls::rustls::pki_types::ServerName::try_from(target.host.clone())
                        .map_err(|e| format!("TLS name {:?}: {e}", target.host))?;
                let tls = self
                    .tls
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                send(tls, request).await
            } else {
                send(stream, request).await
            }
        };
        tokio::time::timeout(self.settings.timeout, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "no answer within {}",
                    humantime::format_duration(self.settings.timeout)
                ))
            })
    }
}

async fn connect(addresses: &[SocketAddr]) -> Result<TcpStream, String> {
    let mut last = String::from("no address");
    for address in addresses {
        match TcpStream::connect(address).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = format!("connect {address}: {e}"),
        }
    }
    Err(last)
}

/// One HTTP/1.1 exchange on `io`; the answer's body is read (bounded) so
/// the receiver's write completes, then dropped.
async fn send<Io>(io: Io, request: hyper::Request<Full<Bytes>>) -> Result<u16, String>
where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let driver = tokio::spawn(connection);
    let answer = sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP: {e}"));
    let status = match answer {
        Ok(answer) => {
            let status = answer.status().as_u16();
            let _ = http_body_util::Limited::new(answer.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await;
            Ok(status)
        }
        Err(e) => Err(e),
    };
    driver.abort();
    status
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}
