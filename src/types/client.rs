//! Who a connection is: its id and what presence shows of it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Identifies one WebSocket connection for its whole life.
pub type ClientId = uuid::Uuid;

/// Who is subscribed: one entry per connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientInfo {
    /// The connection.
    pub client_id: ClientId,
    /// The authenticated user, if any (`null` for anonymous connections).
    pub user: Option<Arc<str>>,
    /// The token's `info` claim, verbatim (absent without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Arc<RawValue>>,
}

impl ClientInfo {
    /// An anonymous connection's entry.
    pub fn anonymous(client_id: ClientId) -> Self {
        Self {
            client_id,
            user: None,
            info: None,
        }
    }
}

impl PartialEq for ClientInfo {
    fn eq(&self, other: &Self) -> bool {
        self.client_id == other.client_id
            && self.user == other.user
            && self.info.as_ref().map(|i| i.get()) == other.info.as_ref().map(|i| i.get())
    }
}

impl Eq for ClientInfo {}
