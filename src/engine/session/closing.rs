//! Closing a connection: the close handshake and the handler's cleanup after it. Kept apart
//! from the main loop: this runs once per connection, boxed, so none of its state is in an
//! idle connection's task.

use std::time::Duration;

use bytes::BytesMut;
use tokio::time::timeout;

use super::{Busy, End, Handler, Session, busy};
use crate::ws::close::CloseCode;
use crate::ws::frame::encode_close;
use crate::ws::reader::{Incoming, MessageReader};
use crate::ws::transport::{READ_CHUNK, Transport, read_some, write_all};

/// How long the server waits for the client's close frame after sending its own.
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(1);

impl<T, H> Session<T, H>
where
    T: Transport,
    H: Handler,
{
    /// The handler's cleanup after the close frame; on shutdown it is best effort, cut short
    /// after the close grace period, so a broker that does not answer cannot hold the exit.
    pub(super) async fn clean_up(&mut self, shutting_down: bool) {
        let grace = self.config.close_grace();
        let cleanup = self.handler.on_close(shutting_down);
        if !shutting_down {
            cleanup.await;
        } else if timeout(grace, cleanup).await.is_err() {
            tracing::debug!("broker cleanup cut short by shutdown");
        }
    }

    /// Sends the closing frames, flushes within the grace period and waits briefly for the
    /// client's close reply, so the server ends the TCP connection only after the handshake.
    pub(super) async fn finish(&mut self, end: End) {
        if matches!(end, End::Gone) {
            return;
        }
        let stats = self.guards.stats();
        let Busy {
            rbuf,
            wbuf,
            frames,
            parser,
            held,
            ..
        } = busy(&mut self.busy, &self.config);
        let held = *held;
        // Closing writes one buffer: the uncopied frames that still wait go in front of it.
        frames.flatten_into(wbuf, self.config.deflate);
        let code = match end {
            End::Gone => return,
            End::ClientClosed(code) => {
                // Echo the client's code, as RFC 6455 §5.5.1 asks; no reply needed after.
                encode_close(wbuf, code.unwrap_or(1000), "");
                let _ = timeout(self.config.close_grace(), write_all(&self.io, wbuf)).await;
                return;
            }
            End::Violation(code) => code,
            End::Server(code) => code,
        };
        let violation = matches!(end, End::Violation(_));
        if code == CloseCode::SlowConsumer {
            stats.slow_consumer_closed();
        }
        // On shutdown, what was already queued for this client goes out first; so do frames
        // the write delay held back (they would have been written already without it), but
        // not ahead of a slow consumer's or a protocol violation's close.
        let deliver_queued =
            code == CloseCode::GoingAway || (held && !violation && code != CloseCode::SlowConsumer);
        if deliver_queued {
            let (n, _) = self
                .outbox
                .drain_into(wbuf, usize::MAX, self.config.deflate);
            stats.add_out(n);
        }
        encode_close(wbuf, code.code(), code.reason());
        let closing = async {
            write_all(&self.io, wbuf).await?;
            if violation {
                // Failing the connection: the stream cannot be trusted to parse any more, so
                // end TCP first and only drain (never parse) what is still arriving.
                std::future::poll_fn(|cx| self.io.poll_shutdown(cx)).await?;
                drain(&self.io, rbuf).await;
                Ok(())
            } else {
                wait_for_close(&self.io, rbuf, parser).await;
                std::future::poll_fn(|cx| self.io.poll_shutdown(cx)).await
            }
        };
        let _ = timeout(self.config.close_grace(), closing).await;
    }
}

/// Reads until the client's close frame, EOF, an error, or [`CLOSE_REPLY_WAIT`].
async fn wait_for_close<T: Transport>(io: &T, rbuf: &mut BytesMut, parser: &mut MessageReader) {
    let wait = async {
        loop {
            loop {
                match parser.next(rbuf) {
                    Ok(Some(Incoming::Close(_))) | Err(_) => return,
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                }
            }
            match read_some(io, rbuf, READ_CHUNK).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let _ = timeout(CLOSE_REPLY_WAIT, wait).await;
}

/// Discards input until EOF or [`CLOSE_REPLY_WAIT`]: closing a socket with unread input makes
/// the kernel send a reset, which can destroy the close frame before the client reads it.
async fn drain<T: Transport>(io: &T, rbuf: &mut BytesMut) {
    let wait = async {
        loop {
            rbuf.clear();
            match read_some(io, rbuf, READ_CHUNK).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let _ = timeout(CLOSE_REPLY_WAIT, wait).await;
}
