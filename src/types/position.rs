//! Stream positions and publications.
//!
//! Every publication on a channel gets the next offset (1, 2, 3, ...). The `epoch` names one
//! life of a channel's stream: it changes whenever the history that backs the offsets is lost,
//! so a client can tell "offset 12 of this life" from "offset 12 of the last one" and never
//! recovers from the wrong stream.

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
    if since.epoch != current.epoch || since.offset > current.offset {
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
    since.epoch == current.epoch
        && since.offset <= current.offset
        && publications
            .first()
            .map_or(since.offset == current.offset, |p| {
                p.offset == since.offset + 1
            })
}
