//! How a session reads its socket: wait for readiness first, allocate a buffer only then.
//!
//! Reading with `AsyncRead::read_buf` needs a buffer *before* data arrives, so every idle
//! connection would hold one. Waiting for readiness and then reading what is there lets an
//! idle connection hold no read buffer at all, which is most of what a connection costs.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::tcp::OwnedReadHalf;

/// The read side of a connection.
///
/// Readiness is polled (`poll_ready`) rather than awaited through a future so that waiting
/// costs nothing in the session's state: a readiness future would add a waiter node to every
/// connection's task.
pub trait SocketRead: Send + Unpin {
    /// Ready when data, end of stream or an error can be read.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Reads what is available into `buf`'s spare capacity without waiting: `Ok(0)` at end of
    /// stream, `WouldBlock` if the readiness was spurious.
    fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize>;
}

impl SocketRead for OwnedReadHalf {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.as_ref().poll_read_ready(cx)
    }

    fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        OwnedReadHalf::try_read_buf(self, buf)
    }
}

/// Any `AsyncRead` (a TLS stream, a split `Upgraded`), adapted by reading into a buffer of its
/// own while waiting. Costs a buffer per busy connection; plain TCP uses [`OwnedReadHalf`].
#[derive(Debug)]
pub struct Buffered<R> {
    inner: R,
    pending: BytesMut,
    eof: bool,
}

impl<R> Buffered<R> {
    /// Wraps a reader.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            pending: BytesMut::new(),
            eof: false,
        }
    }
}

impl<R: AsyncRead + Unpin + Send> SocketRead for Buffered<R> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.pending.is_empty() || self.eof {
            return Poll::Ready(Ok(()));
        }
        let mut chunk = [0u8; 4096];
        let mut read = ReadBuf::new(&mut chunk);
        match Pin::new(&mut self.inner).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                if read.filled().is_empty() {
                    self.eof = true;
                }
                self.pending.extend_from_slice(read.filled());
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        if self.pending.is_empty() {
            return if self.eof {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = self.pending.len();
        buf.extend_from_slice(&self.pending.split_to(n));
        if self.pending.is_empty() {
            self.pending = BytesMut::new();
        }
        Ok(n)
    }
}

/// Waits for data and reads it into `buf`, reserving `chunk` bytes of room first.
pub async fn read_some<R: SocketRead>(
    reader: &mut R,
    buf: &mut BytesMut,
    chunk: usize,
) -> io::Result<usize> {
    loop {
        std::future::poll_fn(|cx| reader.poll_ready(cx)).await?;
        buf.reserve(chunk);
        match reader.try_read_buf(buf) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn buffered_reads_deliver_everything_then_eof() {
        let data: &[u8] = b"hello world";
        let mut reader = Buffered::new(data);
        let mut buf = BytesMut::new();
        let mut total = 0;
        loop {
            let n = read_some(&mut reader, &mut buf, 4)
                .await
                .expect("in-memory read");
            if n == 0 {
                break;
            }
            total += n;
        }
        assert_eq!(total, data.len());
        assert_eq!(&buf[..], data);
    }
}
