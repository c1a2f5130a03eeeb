//! The node's part in connections and servers that end: the shutdown gate that refuses
//! publishes once shutdown begins, and leaving channels in two steps (locally at once, at the
//! broker after the close frame).

use std::sync::atomic::{AtomicUsize, Ordering};

use super::Node;
use crate::broker::Published;
use crate::engine::hub::{Left, MemberState};
use crate::engine::namespace::NamespaceOptions;
use crate::types::error::ClientError;
use crate::types::{ClientId, ClientInfo};

/// Counts one publish in `Node::publishing` until dropped (also when its future is
/// cancelled).
pub(super) struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Node {
    /// Refuses every publish from now on ([`ClientError::ShuttingDown`]), then waits up to
    /// `within` for the publishes already past that check to return. Called before sessions
    /// are asked to close: a publish acknowledged after that point would be delivered to
    /// subscribers whose sessions already said goodbye, acknowledged and then lost.
    pub async fn begin_shutdown(&self, within: std::time::Duration) {
        // SeqCst pairs with `enter_publish`: either the publish sees the flag, or this loop
        // sees the publish counted.
        self.shutting_down.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + within;
        while self.publishing.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        self.stopped_waiting.store(true, Ordering::SeqCst);
    }

    /// The answer to a publish whose broker call returned: acknowledged, unless shutdown
    /// stopped waiting for it meanwhile (the sessions it reached here may be closed already).
    /// Then it may or may not have been stored, like any publish whose answer was lost.
    pub(super) fn confirm(&self, published: Published) -> Result<Published, ClientError> {
        if self.stopped_waiting.load(Ordering::SeqCst) {
            return Err(ClientError::Unavailable(
                "the server began shutting down before this publish was confirmed; it may have \
                 been stored: retry with the same idempotency_key"
                    .to_owned(),
            ));
        }
        Ok(published)
    }

    /// Counts a publish as in flight, or refuses it once shutdown has begun.
    pub(super) fn enter_publish(&self) -> Result<InFlight<'_>, ClientError> {
        self.publishing.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(&self.publishing);
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ClientError::ShuttingDown);
        }
        Ok(guard)
    }

    pub(super) fn detach_channel(&self, channel: &str, client_id: ClientId) -> Left {
        let left = self.hub.unsubscribe(channel, client_id);
        if left != Left::NotMember {
            self.count_subscription(channel, -1);
            self.track_leave(channel, client_id);
        }
        left
    }

    /// Takes a closing connection off `state`'s channel on this node, at once and without
    /// the broker: nothing more is queued for it (no notices for a client that is leaving
    /// anyway), and a cleanup that is cut short later leaves nothing behind locally. The
    /// broker's part follows in [`Node::release_detached`].
    pub fn detach(&self, client_id: ClientId, state: &MemberState) {
        state.set_left(self.detach_channel(&state.channel, client_id));
    }

    /// The broker's part of leaving a channel [`Node::detach`]ed before: unsubscribes the
    /// node with its last member, removes the presence entry and, if `announce`, sends the
    /// leave notice. `quiet` logs failures at debug level (on shutdown every connection
    /// leaves at once, and one line per connection would drown the log).
    pub async fn release_detached(
        &self,
        state: &MemberState,
        client: &ClientInfo,
        announce: bool,
        quiet: bool,
    ) {
        let left = state.left();
        let channel = &*state.channel;
        let Ok(options) = self.leave_options(channel) else {
            return;
        };
        if left != Left::NotMember {
            self.release(left, client, channel, &options, announce, quiet)
                .await;
        }
    }

    pub(super) async fn release(
        &self,
        left: Left,
        client: &ClientInfo,
        channel: &str,
        options: &NamespaceOptions,
        announce: bool,
        quiet: bool,
    ) {
        super::Departure {
            unsubscribe: left == Left::Last,
            presence: options.presence,
            leave_notice: options.join_leave && announce,
        }
        .run(&*self.broker, channel, client, quiet)
        .await;
    }
}
