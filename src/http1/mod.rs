//! The one HTTP/1 codec: every HTTP/1 byte the gateway reads or writes,
//! client side and instance side, goes through this module.
//!
//! A proxy that judges one message with two parsers invites request
//! smuggling: the bytes one parser calls the end of a body, the other may
//! read as the start of the next request. So each rule lives here once, and
//! the gateway's HTTP/1 server ([`crate::server`]) and its client to the
//! instances ([`crate::upstream`]) both call it:
//!
//! - [`head`]: request heads (the server's side) and response heads (the
//!   client's side), parsed by `httparse`, with the framing rules of
//!   RFC 9112 §6: one `Content-Length` rule, one `Transfer-Encoding` rule,
//!   and `Host` (§3.2).
//! - [`decode`]: bodies delimited by a length, by chunks or by the
//!   connection's end: one chunked decoder.
//! - [`encode`]: header lines, chunk framing, and the framing a message
//!   gets from what is known of its body: one encoder.
//! - [`hop`]: the hop-by-hop fields (RFC 9110 §7.6.1) and what
//!   `Connection` says: one list.
//! - [`date`]: the `Date` field, formatted once a second.
//!
//! HTTP/2 is hyper's (`crate::server`); this module knows nothing of it.

pub mod date;
pub mod decode;
pub mod encode;
pub mod head;
pub mod hop;

pub use decode::{DecodeError, Decoded, Decoder};
pub use head::{BodyLength, HeadError, RequestHead, ResponseHead};
pub use hop::ConnectionOptions;
