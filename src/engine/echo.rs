//! The `/echo` endpoint: every message back unchanged, nothing unsolicited.
//!
//! It runs on the very same session, frame reader and writer as `/ws`, so a conformance suite
//! (Autobahn|Testsuite) pointed at it measures the stack `/ws` clients use.

use bytes::Bytes;

use super::session::{Handler, Replies};

/// Handler for one `/echo` connection.
#[derive(Debug, Default)]
pub struct EchoHandler;

impl Handler for EchoHandler {
    async fn on_open(&mut self, _out: &mut Replies<'_>) {}

    async fn on_text(&mut self, text: Bytes, out: &mut Replies<'_>) {
        // The session validated the UTF-8; echo the exact bytes as a text frame.
        out.frame_text(&text);
    }

    async fn on_binary(&mut self, data: Bytes, out: &mut Replies<'_>) {
        out.binary(&data);
    }

    async fn on_close(&mut self, _server_shutting_down: bool) {}
}
