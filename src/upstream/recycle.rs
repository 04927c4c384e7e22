//! Read buffers for response bodies, held only while their bytes are in
//! flight and then used again.
//!
//! A large body is read in [`SIZE`] pieces straight into a buffer taken
//! from this thread's spares; the piece travels on as `Bytes` that own the
//! buffer, and when the last of them is dropped (the client has been sent
//! the bytes) the buffer goes back to the spares of the thread that drops
//! it. So a connection streaming a body holds a buffer only between a read
//! and the write that passes it on, not for its life: at 512 connections
//! streaming 256 KiB answers, the buffers out at once are those of the
//! writes waiting on a client, and the ones that come back stay warm in
//! the cache for the next read.

use std::cell::RefCell;

use bytes::Bytes;

/// The size of one read.
pub const SIZE: usize = 64 * 1024;
/// Spare buffers a thread keeps, at most; more are freed.
const SPARES: usize = 16;

thread_local! {
    static SPARE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of [`SIZE`] bytes: a spare if this thread has one.
pub fn take() -> Box<[u8]> {
    SPARE
        .with(|spare| spare.borrow_mut().pop())
        .unwrap_or_else(|| vec![0; SIZE].into_boxed_slice())
}

/// Gives a buffer back to this thread's spares.
pub fn give(buf: Box<[u8]>) {
    // During thread teardown the spares may be gone: the buffer is freed.
    let _ = SPARE.try_with(|spare| {
        let mut spare = spare.borrow_mut();
        if spare.len() < SPARES && buf.len() == SIZE {
            spare.push(buf);
        }
    });
}

/// The first `len` bytes of `buf` as `Bytes`, which give `buf` back when
/// the last of them is dropped.
pub fn freeze(buf: Box<[u8]>, len: usize) -> Bytes {
    Bytes::from_owner(Filled { buf, len })
}

struct Filled {
    buf: Box<[u8]>,
    len: usize,
}

impl AsRef<[u8]> for Filled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Filled {
    fn drop(&mut self) {
        give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_comes_back_when_its_last_bytes_are_dropped() {
        let mut buf = take();
        buf[..5].copy_from_slice(b"hello");
        let at = buf.as_ptr();
        let bytes = freeze(buf, 5);
        let part = bytes.slice(1..3);
        assert_eq!(&bytes[..], b"hello");
        drop(bytes);
        let other = take();
        assert_ne!(other.as_ptr(), at, "still held by the slice");
        drop(part);
        let again = take();
        assert_eq!(again.as_ptr(), at, "back, and taken again");
    }

    #[test]
    fn spares_are_bounded() {
        let bufs: Vec<_> = (0..SPARES + 4).map(|_| take()).collect();
        bufs.into_iter().for_each(give);
        assert_eq!(SPARE.with(|spare| spare.borrow().len()), SPARES);
    }
}
