//! The HTTP API's port: HTTP/1.1 and cleartext HTTP/2 (prior knowledge) on
//! one listener, with the bounds of the gRPC port (`server.*`): at most
//! `max_connections` open, request headers within `handshake_timeout`,
//! HTTP/2 keepalive pings. On stop it stops accepting and lets open
//! connections finish what they are answering.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower_service::Service as _;

use super::Peer;
use crate::listener::{ConnectionStats, ServerSettings};

/// Largest request header block, as on the gRPC port.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// A connection's bytes, in the clear or inside TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// Serves `router` on `listener` until `stop`, then waits for open
/// connections to finish their requests (the caller bounds the wait).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    settings: ServerSettings,
    stats: Arc<ConnectionStats>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(settings.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.handshake_timeout)
        .max_buf_size(MAX_HEADER_BYTES.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(Some(settings.http2_keepalive_interval))
        .keep_alive_timeout(settings.http2_keepalive_timeout);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                tracing::warn!(%error, "cannot accept an HTTP connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            stats.refused_over_cap.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "HTTP connection refused: server.max_connections are open");
            continue;
        };
        let _ = stream.set_nodelay(true);
        stats.open.fetch_add(1, Ordering::Relaxed);
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
            request.extensions_mut().insert(Peer(peer));
            let mut router = router.clone();
            async move { router.call(request.map(axum::body::Body::new)).await }
        });
        let stats = stats.clone();
        let (tls, builder, watcher) = (tls.clone(), builder.clone(), graceful.watcher());
        let handshake_timeout = settings.handshake_timeout;
        // Each connection on its own task, the TLS handshake included
        // (bounded like the request headers), so a slow client holds up no
        // one else.
        tokio::spawn(async move {
            let io: Result<Box<dyn Io>, String> = match tls {
                None => Ok(Box::new(stream)),
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => Ok(Box::new(tls)),
                        Ok(Err(error)) => Err(format!("TLS handshake failed: {error}")),
                        Err(_) => Err("TLS handshake timed out".to_owned()),
                    }
                }
            };
            match io {
                Ok(io) => {
                    let connection =
                        builder.serve_connection_with_upgrades(TokioIo::new(io), service);
                    if let Err(error) = watcher.watch(connection.into_owned()).await {
                        tracing::debug!(%peer, error = %error, "HTTP connection ended with an error");
                    }
                }
                Err(error) => tracing::debug!(%peer, %error, "HTTP connection not served"),
            }
            stats.open.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
