//! Server-Sent Events bodies of the streamed endpoints. Every event ready
//! when the connection asks for more is written into one buffer and sent
//! as one body frame (as tonic does with ready gRPC messages), so a burst
//! of tokens from one step costs one HTTP/2 DATA frame, not one each.
//!
//! Knows the SSE framing (`data: ` lines, a blank line after each event),
//! not what the events say.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use axum::response::Response;
use bytes::BytesMut;
use tokio_stream::Stream;

/// A frame is sent once this much is buffered, even if more is ready.
const MAX_FRAME_BYTES: usize = 16 * 1024;

/// The events' data, one string per event.
pub type Events = Pin<Box<dyn Stream<Item = String> + Send>>;

/// A `text/event-stream` response whose events are `events`.
pub fn response(events: Events) -> Response {
    let mut response = Response::new(Body::from_stream(Coalesced {
        events,
        ended: false,
    }));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Appends one event: each line of `data` on its own `data: ` line (the
/// JSON we send has none, but an event must never break the framing),
/// then the blank line that ends it.
fn write_event(buffer: &mut BytesMut, data: &str) {
    for line in data.split('\n') {
        buffer.extend_from_slice(b"data: ");
        buffer.extend_from_slice(line.trim_end_matches('\r').as_bytes());
        buffer.extend_from_slice(b"\n");
    }
    buffer.extend_from_slice(b"\n");
}

struct Coalesced {
    events: Events,
    ended: bool,
}

impl Stream for Coalesced {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut buffer = BytesMut::new();
        while !self.ended && buffer.len() < MAX_FRAME_BYTES {
            match self.events.as_mut().poll_next(cx) {
                Poll::Ready(Some(data)) => write_event(&mut buffer, &data),
                Poll::Ready(None) => self.ended = true,
                // The inner stream holds the waker: it wakes us when more
                // is ready, whether or not this poll returns a frame.
                Poll::Pending => break,
            }
        }
        if !buffer.is_empty() {
            Poll::Ready(Some(Ok(buffer.freeze())))
        } else if self.ended {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_of(events: Vec<&'static str>) -> (Vec<Bytes>, Response) {
        let stream = tokio_stream::iter(events.into_iter().map(str::to_owned));
        let mut response = response(Box::pin(stream));
        let mut frames = Vec::new();
        while let Some(frame) = response.body_mut().frame().await {
            if let Ok(data) = frame.expect("infallible").into_data() {
                frames.push(data);
            }
        }
        (frames, response)
    }

    #[tokio::test]
    async fn ready_events_share_one_frame_with_exact_framing() {
        let (frames, response) = body_of(vec!["{\"a\":1}", "[DONE]"]).await;
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(&frames[0][..], b"data: {\"a\":1}\n\ndata: [DONE]\n\n");
        assert_eq!(response.headers()[CONTENT_TYPE], "text/event-stream");
        assert_eq!(response.headers()[CACHE_CONTROL], "no-cache");
    }

    #[tokio::test]
    async fn a_newline_in_data_cannot_end_the_event_early() {
        let (frames, _) = body_of(vec!["one\ntwo\r\n"]).await;
        assert_eq!(&frames[0][..], b"data: one\ndata: two\ndata: \n\n");
    }

    #[tokio::test]
    async fn a_long_burst_is_split_into_bounded_frames() {
        let event: &'static str = Box::leak("x".repeat(1000).into_boxed_str());
        let (frames, _) = body_of(vec![event; 100]).await;
        assert!(frames.len() > 1);
        assert!(frames.iter().all(|f| f.len() < MAX_FRAME_BYTES + 1100));
        let total: usize = frames.iter().map(Bytes::len).sum();
        assert_eq!(total, 100 * (1000 + "data: \n\n".len()));
    }
}
