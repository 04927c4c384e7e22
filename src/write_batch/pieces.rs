//! Large pieces of a write kept as they are, each with the place in the
//! write's own buffer where it goes: the write then sends the buffer and
//! the pieces in one vectored system call, without copying the pieces.

use std::io::{self, IoSlice};
use std::time::Duration;

use crate::socket::Socket;
use bytes::Bytes;
use tokio::io::AsyncWriteExt;

/// Body chunks at least this large go into a write as pieces; smaller
/// ones cost less copied into its buffer than sent as slices of their own.
pub const PIECE_MIN: usize = 4 * 1024;
/// Pieces one write takes at most.
pub const MAX_PIECES: usize = 8;
/// The slices of a write: the pieces and the buffer's bytes around them.
pub const MAX_SLICES: usize = 2 * MAX_PIECES + 1;

/// Up to [`MAX_PIECES`] byte strings, each placed at an offset of a
/// buffer that the write sends around them. Small while empty (no
/// allocation), as most writes are: it moves with every batched write.
#[derive(Default)]
pub struct Pieces {
    /// Each piece with the length its buffer had when it came: where it goes.
    at: Vec<(usize, Bytes)>,
    /// Their bytes, all together.
    size: usize,
}

impl Pieces {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    /// Their bytes, all together.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether another piece fits.
    pub fn is_full(&self) -> bool {
        self.at.len() == MAX_PIECES
    }

    /// Places `data` at offset `at` of the buffer; `at` is no smaller than
    /// the previous piece's. Panics if [`Self::is_full`].
    pub fn push(&mut self, at: usize, data: Bytes) {
        assert!(!self.is_full(), "at most MAX_PIECES pieces");
        debug_assert!(self.at.last().is_none_or(|&(last, _)| last <= at));
        if self.at.capacity() == 0 {
            self.at.reserve_exact(MAX_PIECES);
        }
        self.size += data.len();
        self.at.push((at, data));
    }

    /// The pieces, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Bytes> {
        self.at.iter().map(|(_, data)| data)
    }

    /// Drops the pieces, so that their buffers can be reused.
    pub fn clear(&mut self) {
        self.at.clear();
        self.size = 0;
    }

    /// The pieces and `buf` around them, in order, as slices written into
    /// `into`; returns how many. Empty slices are left out.
    pub fn slices<'a>(&'a self, buf: &'a [u8], into: &mut [IoSlice<'a>; MAX_SLICES]) -> usize {
        let mut count = 0;
        let mut put = |bytes: &'a [u8]| {
            if !bytes.is_empty() {
                into[count] = IoSlice::new(bytes);
                count += 1;
            }
        };
        let mut from = 0;
        for (at, data) in &self.at {
            put(&buf[from..*at]);
            put(data);
            from = *at;
        }
        put(&buf[from..]);
        count
    }

    /// The bytes the write sends, in order, joined into one.
    pub fn joined(&self, buf: &[u8]) -> Vec<u8> {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let count = self.slices(buf, &mut slices);
        let mut joined = Vec::with_capacity(buf.len() + self.size);
        for slice in &slices[..count] {
            joined.extend_from_slice(slice);
        }
        joined
    }
}

/// Writes `buf` with `pieces` in it to `stream` now, in as few system
/// calls as the socket allows, after skipping the first `skip` bytes
/// (already sent); fails with `TimedOut` when the peer takes none of them
/// for `idle`.
pub async fn write_now(
    stream: &mut Socket,
    buf: &[u8],
    pieces: &Pieces,
    skip: usize,
    idle: Duration,
) -> io::Result<()> {
    let mut slices = [IoSlice::new(&[]); MAX_SLICES];
    let count = pieces.slices(buf, &mut slices);
    let mut bytes = &mut slices[..count];
    IoSlice::advance_slices(&mut bytes, skip);
    while !bytes.is_empty() {
        let written = tokio::time::timeout(idle, stream.write_vectored(bytes))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer took no bytes for idle_timeout",
                )
            })??;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bytes, written);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pieces_go_where_they_were_placed() {
        let mut pieces = Pieces::new();
        let buf = b"head|mid|tail";
        pieces.push(0, Bytes::from_static(b"<0>"));
        pieces.push(5, Bytes::from_static(b"<5>"));
        pieces.push(5, Bytes::from_static(b"<5b>"));
        pieces.push(buf.len(), Bytes::from_static(b"<end>"));
        assert_eq!(pieces.size(), 15);
        assert_eq!(pieces.joined(buf), b"<0>head|<5><5b>mid|tail<end>");
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        assert_eq!(
            pieces.slices(buf, &mut slices),
            6,
            "no empty slice between two pieces at one place, nor at the ends"
        );
        pieces.clear();
        assert!(pieces.is_empty());
        assert_eq!(pieces.size(), 0);
        assert_eq!(pieces.joined(buf), buf);
    }

    #[test]
    fn a_cleared_piece_lets_go_of_its_bytes() {
        let data = Bytes::from(vec![1u8; 100]);
        let mut pieces = Pieces::new();
        pieces.push(0, data.clone());
        pieces.clear();
        assert!(data.is_unique(), "no other owner left");
    }
}
