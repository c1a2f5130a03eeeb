//! Stream positions and publications.
//!
//! Every publication on a channel gets the next offset (1, 2, 3, ...). The `epoch` names one
//! life of a channel's stream: it changes whenever the history that backs the offsets is lost,
//! so a client can tell "offset 12 of this life" from "offset 12 of the last one" and never
//! recovers from the wrong stream.
//!
//! A channel that never had a publication has no epoch yet: its position is
//! [`StreamPosition::start`], `{offset: 0, epoch: ""}`, the same on every broker and every
//! read, so reading it stores nothing. That position comes before offset 1 of whatever epoch
//! the channel's first publication starts: recovering from it replays from offset 1.
//!
//! Live publications carry their epoch, so a client that subscribed before the first
//! publication takes the epoch from it: it never holds an offset above 0 with the empty epoch.
//! Such a position (`{offset: 3, epoch: ""}`, from a client that kept the empty epoch) is not
//! read in any epoch: it recovers nothing (`recovered: false`), since its offsets may belong
//! to a life of the channel that is gone. Only the start position itself counts in every
//! epoch.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::ClientId;

/// A place in a channel's stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPosition {
    /// Offset of the last publication (0 before the first).
    pub offset: u64,
    /// The stream's life this offset belongs to.
    pub epoch: String,
}

impl StreamPosition {
    /// The position of a channel without publications: offset 0, empty epoch.
    pub fn start() -> Self {
        Self {
            offset: 0,
            epoch: String::new(),
        }
    }

    /// Whether this is [`StreamPosition::start`].
    pub fn is_start(&self) -> bool {
        self.offset == 0 && self.epoch.is_empty()
    }
}

/// Whether offsets after `since` can be read in `current`'s epoch: the same epoch, or
/// `since` is [`StreamPosition::start`] (taken before the first publication; see the module
/// docs).
fn same_life(since: &StreamPosition, current: &StreamPosition) -> bool {
    since.epoch == current.epoch || since.is_start()
}

/// One published message, as kept in history and sent in replies.
#[derive(Debug, Clone, Serialize)]
pub struct Publication {
    /// Position in the channel's stream.
    pub offset: u64,
    /// The published JSON value, verbatim.
    pub data: Arc<RawValue>,
    /// The publishing connection, if a client published it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<ClientId>,
}

/// Decides whether a replay from `since` is complete: every publication after `since.offset`
/// up to `current.offset` is in `publications`, in order, in the same epoch. Recovery is all or
/// nothing, so anything less is a failure.
pub fn is_complete_replay(
    since: &StreamPosition,
    current: &StreamPosition,
    publications: &[Publication],
) -> bool {
    if !same_life(since, current) || since.offset > current.offset {
        return false;
    }
    let missed = current.offset - since.offset;
    publications.len() as u64 == missed
        && publications
            .iter()
            .zip(since.offset + 1..)
            .all(|(p, expected)| p.offset == expected)
}

/// Whether a history page read `since` a position starts right after it, in the same epoch:
/// nothing between `since` and the first returned publication was lost.
pub fn continues_from(
    since: &StreamPosition,
    current: &StreamPosition,
    publications: &[Publication],
) -> bool {
    same_life(since, current)
        && since.offset <= current.offset
        && publications
            .first()
            .map_or(since.offset == current.offset, |p| {
                p.offset == since.offset + 1
            })
}
