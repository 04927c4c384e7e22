//! The one body type used end to end, and constructors for bodies the
//! gateway makes up itself.
//!
//! Upstream and client bodies are streamed as `Body` without being collected;
//! only the capped replay buffer (see `retry::replay`) ever holds a whole body.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

/// Errors carried by bodies: hyper's, the replay buffer's, timeouts.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streaming body, boxed once so every handler and the proxy agree on it.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body holding `bytes` in full.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body with no bytes at all.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Whether a response with `status` has no body whatever its headers say
/// (RFC 9110 §6.4.1: 1xx, 204, 304).
pub fn status_has_no_body(status: http::StatusCode) -> bool {
    status.is_informational()
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED
}

/// Boxes any body whose error converts into [`BoxError`], without buffering it.
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// Why [`collect_capped`] gave up.
#[derive(Debug)]
pub enum CollectError {
    /// More than the limit.
    TooLarge,
    /// No progress for the idle timeout.
    Stalled,
    /// The body broke off.
    Broken(BoxError),
}

/// Reads a whole body of at most `limit` bytes, giving up when no data
/// arrives for `idle`.
pub async fn collect_capped<B>(
    body: B,
    limit: usize,
    idle: std::time::Duration,
) -> Result<Bytes, CollectError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = std::pin::pin!(body);
    let mut collected = Vec::new();
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(CollectError::Stalled),
            Ok(None) => return Ok(Bytes::from(collected)),
            Ok(Some(Err(e))) => return Err(CollectError::Broken(e.into())),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if collected.len() + data.len() > limit {
                return Err(CollectError::TooLarge);
            }
            collected.extend_from_slice(&data);
        }
    }
}
