//! Accepting connections for the gRPC server, with the bounds a public
//! port needs: at most `server.max_connections` open at once (the next is
//! closed at once), and a connection that has not sent the whole HTTP/2
//! preface within `server.handshake_timeout` is closed, so idle or
//! trickling sockets cannot pile up file descriptors. Keepalive pings
//! (`server.http2_keepalive_*`, set on the server in `app`) then close
//! connections whose peer stopped answering.
//!
//! Knows TCP and the HTTP/2 preface; nothing of gRPC services or tenants.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// What every HTTP/2 client sends first (RFC 9113, section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Connections open at once; one more is closed as soon as it is
    /// accepted.
    pub max_connections: usize,
    /// How long a new connection may take to send the HTTP/2 preface.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// How often an HTTP/2 PING checks an open connection.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_interval: Duration,
    /// How long the peer has to answer it before the connection is closed.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_timeout: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
            http2_keepalive_interval: Duration::from_secs(60),
            http2_keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// Connection counters, read by `/metrics`.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    pub accepted: AtomicU64,
    /// Closed at once: `max_connections` were open.
    pub refused_over_cap: AtomicU64,
    /// Closed without a complete HTTP/2 preface in time (or a wrong one).
    pub handshake_failures: AtomicU64,
    pub open: AtomicU64,
}

/// A connection's bytes: in the clear, or inside TLS.
enum Transport {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// What the server knows of a connection, in each request's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub tcp: TcpConnectInfo,
    /// The client presented a certificate the TLS handshake verified.
    pub client_cert: bool,
}

/// A connection that passed the preface check (or the TLS handshake),
/// holding its slot under the cap until it closes.
pub struct Admitted {
    stream: Transport,
    stats: Arc<ConnectionStats>,
    _slot: OwnedSemaphorePermit,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connected for Admitted {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        match &self.stream {
            Transport::Plain(tcp) => ConnInfo {
                tcp: tcp.connect_info(),
                client_cert: false,
            },
            Transport::Tls(tls) => {
                let (tcp, session) = tls.get_ref();
                ConnInfo {
                    tcp: tcp.connect_info(),
                    client_cert: session.peer_certificates().is_some_and(|c| !c.is_empty()),
                }
            }
        }
    }
}

/// Both transports' bytes, one call each.
macro_rules! on_transport {
    ($self:ident, $stream:ident => $call:expr) => {
        match &mut $self.stream {
            Transport::Plain($stream) => $call,
            Transport::Tls($stream) => $call,
        }
    };
}

impl AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        on_transport!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        on_transport!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_transport!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_transport!(self, s => Pin::new(s).poll_shutdown(cx))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        on_transport!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Waits, without consuming anything, until the whole preface is readable.
async fn preface_arrives(stream: &TcpStream) -> bool {
    let mut seen = [0u8; PREFACE.len()];
    loop {
        match stream.peek(&mut seen).await {
            Ok(0) | Err(_) => return false,
            Ok(n) if seen[..n] != PREFACE[..n] => return false,
            Ok(n) if n == PREFACE.len() => return true,
            // Part of it so far: wait for more (peek returns at once while
            // the bytes already seen are all there is).
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// The server's incoming connections: those that sent the HTTP/2 preface
/// in time, within the cap.
pub type Incoming = tokio_stream::wrappers::ReceiverStream<Result<Admitted, io::Error>>;

/// Accepts connections until `stop`: the incoming stream, and the accept
/// loop for the caller to run as a tracked task.
pub fn accept(
    listener: TcpListener,
    settings: &ServerSettings,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stats: Arc<ConnectionStats>,
    stop: CancellationToken,
) -> (Incoming, impl Future<Output = ()> + Send + 'static) {
    let (admitted, incoming) = mpsc::channel(1024);
    let slots = Arc::new(Semaphore::new(settings.max_connections.max(1)));
    let handshake_timeout = settings.handshake_timeout;
    let accept_loop = async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = stop.cancelled() => return,
            };
            let (stream, peer): (TcpStream, SocketAddr) = match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of file descriptors, typically: back off a little
                    // rather than spin.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            stats.accepted.fetch_add(1, Ordering::Relaxed);
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                stats.refused_over_cap.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, "connection refused: server.max_connections are open");
                continue;
            };
            let _ = stream.set_nodelay(true);
            stats.open.fetch_add(1, Ordering::Relaxed);
            let (admitted, stats, tls) = (admitted.clone(), stats.clone(), tls.clone());
            tokio::spawn(async move {
                // The preface check runs on the clear bytes; inside TLS the
                // handshake itself must finish in time.
                let transport = match tls {
                    None => {
                        let ready =
                            tokio::time::timeout(handshake_timeout, preface_arrives(&stream)).await;
                        (ready == Ok(true)).then_some(Transport::Plain(stream))
                    }
                    Some(acceptor) => {
                        match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await
                        {
                            Ok(Ok(tls)) => Some(Transport::Tls(Box::new(tls))),
                            Ok(Err(error)) => {
                                tracing::debug!(%peer, %error, "TLS handshake failed");
                                None
                            }
                            Err(_) => None,
                        }
                    }
                };
                let connection = transport.map(|stream| Admitted {
                    stream,
                    stats: stats.clone(),
                    _slot: slot,
                });
                match connection {
                    Some(connection) => {
                        let _ = admitted.send(Ok(connection)).await;
                    }
                    None => {
                        stats.open.fetch_sub(1, Ordering::Relaxed);
                        stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    };
    (
        tokio_stream::wrappers::ReceiverStream::new(incoming),
        accept_loop,
    )
}
