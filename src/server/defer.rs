//! `TCP_DEFER_ACCEPT` on the listening socket (Linux): the kernel hands a
//! connection to `accept` once its first bytes have arrived, not at the
//! end of the handshake. HTTP clients speak first, so a new connection's
//! request is there when it is accepted: the first read succeeds at once,
//! with no trip through the event loop in between, and a connection that
//! never sends anything holds no slot and no task until the kernel gives
//! up waiting (after about [`DEFER`]; it is accepted then, and
//! `header_read_timeout` applies as usual).
//!
//! One of the three places in the crate with `unsafe` (with
//! `write_batch::ring` and `server::listener`): one `setsockopt` that
//! neither the standard library nor socket2 offers.

use std::os::fd::AsRawFd;
use std::time::Duration;

/// How long the kernel waits for a new connection's first bytes before
/// handing it over anyway (rounded by the kernel to SYN-ACK retransmits).
pub const DEFER: Duration = Duration::from_secs(1);

/// Sets `TCP_DEFER_ACCEPT` to [`DEFER`] on a listening socket.
pub fn defer_accept(socket: &impl AsRawFd) -> std::io::Result<()> {
    let secs = DEFER.as_secs() as libc::c_int;
    // SAFETY: `socket` is an open socket for the call's duration, and the
    // option value is a `c_int` passed with its exact size, as tcp(7) asks.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&raw const secs).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
