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

/// Boxes any body whose error converts into [`BoxError`], without buffering it.
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}
