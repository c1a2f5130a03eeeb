//! How a session uses its socket: wait for readiness first, allocate a buffer only then.
//!
//! Reading with `AsyncRead::read_buf` needs a buffer *before* data arrives, so every idle
//! connection would hold one. Waiting for readiness and then reading what is there lets an
//! idle connection hold no read buffer at all. All I/O goes through `&self` readiness polls, so
//! one socket serves reads and writes at once without being split into two halves (which would
//! cost every connection a shared allocation).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A connection's socket, as the session drives it.
///
/// Readiness is polled rather than awaited through a future so that waiting costs nothing in
/// the session's state.
pub trait Transport: Send + Unpin + 'static {
    /// Ready when data, end of stream or an error can be read.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Reads what is available into `buf`'s spare capacity without waiting: `Ok(0)` at end of
    /// stream, `WouldBlock` if the readiness was spurious.
    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize>;
    /// Like [`Transport::try_read_buf`], into a plain slice.
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes some of `buf`, waiting for the socket to accept it.
    fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>>;
    /// Whether [`Transport::poll_write_vectored`] writes several slices in one system call
    /// and [`Transport::poll_write_ready`] really waits. When so, the session keeps outbox
    /// frames shared until the moment it writes them, instead of copying each into a buffer
    /// of its own as it takes it from the outbox.
    fn writes_vectored(&self) -> bool {
        false
    }
    /// Ready when the socket may take bytes. By default at once (the write itself waits).
    fn poll_write_ready(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    /// Writes some of `bufs`, in order, waiting for the socket to accept it. By default the
    /// first non-empty slice only.
    fn poll_write_vectored(
        &self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match bufs.iter().find(|b| !b.is_empty()) {
            Some(buf) => self.poll_write(cx, buf),
            None => Poll::Ready(Ok(0)),
        }
    }
    /// Whether bytes that `poll_write` accepted may still wait in a buffer of the transport's
    /// own (TLS records the socket had no room for). Nothing wakes a caller for them once its
    /// own buffer is empty, so it must call [`Transport::poll_flush`] while this is true.
    fn has_unflushed(&self) -> bool {
        false
    }
    /// Writes out what an earlier `poll_write` left in the transport's own buffer, waiting for
    /// the socket to accept it. Plain TCP buffers nothing of its own.
    fn poll_flush(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    /// Ends the write direction (TCP FIN).
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Transport for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }

    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        TcpStream::try_read_buf(self, buf)
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        TcpStream::try_read(self, buf)
    }

    fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.poll_write_ready(cx))?;
            match self.try_write(buf) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn writes_vectored(&self) -> bool {
        true
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_write_ready(self, cx)
    }

    fn poll_write_vectored(
        &self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.poll_write_ready(cx))?;
            match self.try_write_vectored(bufs) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(self), cx)
    }
}

/// Any `AsyncRead + AsyncWrite` stream (TLS, an `Upgraded` hyper could not hand back as TCP),
/// adapted with a lock and a buffer of its own. Costs more per connection; plain TCP uses
/// [`TcpStream`] directly.
#[derive(Debug)]
pub struct Buffered<S> {
    inner: Mutex<Inner<S>>,
}

#[derive(Debug)]
struct Inner<S> {
    stream: S,
    pending: BytesMut,
    eof: bool,
    /// Written since the last completed flush: a TLS stream may hold these bytes as records
    /// its socket had no room for, and sends them only when written to or flushed again.
    unflushed: bool,
}

impl<S> Buffered<S> {
    /// Wraps a stream.
    pub fn new(stream: S) -> Self {
        Self {
            inner: Mutex::new(Inner {
                stream,
                pending: BytesMut::new(),
                eof: false,
                unflushed: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<S>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes up to `max` bytes read ahead by `poll_read_ready`: empty at end of stream,
    /// `WouldBlock` when nothing is pending yet.
    fn take_pending(&self, max: usize) -> io::Result<BytesMut> {
        let mut inner = self.lock();
        if inner.pending.is_empty() {
            return if inner.eof {
                Ok(BytesMut::new())
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = inner.pending.len().min(max);
        let taken = inner.pending.split_to(n);
        if inner.pending.is_empty() {
            inner.pending = BytesMut::new();
        }
        Ok(taken)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for Buffered<S> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut inner = self.lock();
        if !inner.pending.is_empty() || inner.eof {
            return Poll::Ready(Ok(()));
        }
        let mut chunk = [0u8; 4096];
        let mut read = ReadBuf::new(&mut chunk);
        ready!(Pin::new(&mut inner.stream).poll_read(cx, &mut read))?;
        if read.filled().is_empty() {
            inner.eof = true;
        }
        inner.pending.extend_from_slice(read.filled());
        Poll::Ready(Ok(()))
    }

    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        let taken = self.take_pending(usize::MAX)?;
        buf.extend_from_slice(&taken);
        Ok(taken.len())
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let taken = self.take_pending(buf.len())?;
        buf[..taken.len()].copy_from_slice(&taken);
        Ok(taken.len())
    }

    fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut inner = self.lock();
        let written = ready!(Pin::new(&mut inner.stream).poll_write(cx, buf))?;
        if written > 0 {
            // Usually the socket took everything and this is ready at once; finding out now
            // spares the session a turn of its loop just to flush.
            let flushed = Pin::new(&mut inner.stream).poll_flush(cx);
            inner.unflushed = !matches!(flushed, Poll::Ready(Ok(())));
        }
        Poll::Ready(Ok(written))
    }

    fn has_unflushed(&self) -> bool {
        self.lock().unflushed
    }

    fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut inner = self.lock();
        if !inner.unflushed {
            return Poll::Ready(Ok(()));
        }
        ready!(Pin::new(&mut inner.stream).poll_flush(cx))?;
        inner.unflushed = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.lock().stream).poll_shutdown(cx)
    }
}

/// The least room a read gets: a small message, or the start of a large one.
pub const READ_CHUNK: usize = 4096;

/// Makes room in `buf` for the next read in proportion to the bytes that already arrived:
/// when less than [`READ_CHUNK`] is free, room for as many bytes as `buf` holds (at least a
/// chunk), so the capacity stays below twice what arrived plus two chunks.
///
/// Never sized by the length a frame header declares: believing it would let a client that
/// sends headers only (on many connections) make the server reserve up to the message limit
/// for each of them. A large message that really arrives costs a few doublings instead (each
/// copying what came so far, at most twice its size in all).
pub fn reserve_for_read(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK {
        buf.reserve(buf.len().max(READ_CHUNK));
    }
}

/// Waits for data and reads it into `buf`, reserving `chunk` bytes of room first.
pub async fn read_some<T: Transport>(
    io: &T,
    buf: &mut BytesMut,
    chunk: usize,
) -> io::Result<usize> {
    loop {
        std::future::poll_fn(|cx| io.poll_read_ready(cx)).await?;
        buf.reserve(chunk);
        match io.try_read_buf(buf) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// Writes all of `buf`, emptying it, and flushes: once it returns, every byte has reached the
/// socket (the last frames before a close would otherwise die in a TLS buffer).
pub async fn write_all<T: Transport>(io: &T, buf: &mut BytesMut) -> io::Result<()> {
    while !buf.is_empty() {
        let n = std::future::poll_fn(|cx| io.poll_write(cx, buf)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bytes::Buf::advance(buf, n);
    }
    std::future::poll_fn(|cx| io.poll_flush(cx)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_room_grows_with_the_bytes_that_arrived() {
        // A header declaring a 1 MiB frame, then its payload arriving in pieces: the buffer
        // never holds more than twice what came, plus two chunks.
        let mut buf = BytesMut::new();
        let mut arrived = 0usize;
        for piece in std::iter::once(14).chain(std::iter::repeat_n(1000, 1100)) {
            reserve_for_read(&mut buf);
            assert!(buf.capacity() - buf.len() >= READ_CHUNK.min(piece));
            buf.extend_from_slice(&vec![0u8; piece]);
            arrived += piece;
            assert!(
                buf.capacity() <= 2 * arrived + 2 * READ_CHUNK,
                "{} bytes of room for {arrived} bytes",
                buf.capacity()
            );
        }
        let mut header_only =
            BytesMut::from(&[0x82, 0xFF, 0, 0, 0, 0, 0, 0x10, 0, 0, 1, 2, 3, 4][..]);
        reserve_for_read(&mut header_only);
        assert!(header_only.capacity() <= READ_CHUNK + 14);
    }

    #[tokio::test]
    async fn buffered_streams_read_everything_then_eof_and_write() {
        let (client, server) = tokio::io::duplex(64);
        let io = Buffered::new(server);
        let mut client = client;
        tokio::io::AsyncWriteExt::write_all(&mut client, b"hello world")
            .await
            .expect("in-memory write");
        drop(tokio::io::AsyncWriteExt::shutdown(&mut client).await);
        let mut buf = BytesMut::new();
        let mut total = 0;
        loop {
            let n = read_some(&io, &mut buf, 4).await.expect("in-memory read");
            if n == 0 {
                break;
            }
            total += n;
        }
        assert_eq!(&buf[..total], b"hello world");
        let mut out = BytesMut::from(&b"back"[..]);
        write_all(&io, &mut out).await.expect("in-memory write");
        let mut echoed = [0u8; 4];
        tokio::io::AsyncReadExt::read_exact(&mut client, &mut echoed)
            .await
            .expect("in-memory read");
        assert_eq!(&echoed, b"back");
    }
}
