//! Plain types every layer shares: client ids, stream positions and publications, channel
//! names, the errors a client can cause, clocks and the token bucket, secrets and address
//! ranges, and a list that costs one pointer until its first element.
//!
//! The lowest layer: it imports nothing else of the crate, so anything may use it.

pub mod channel;
pub mod client;
pub mod clock;
pub mod error;
pub mod net;
pub mod position;
pub mod rate;
pub mod secret;
pub mod thin_list;

pub use channel::ChannelError;
pub use client::{ClientId, ClientInfo};
pub use error::{AuthError, ClientError, DataError};
pub use position::{Publication, StreamPosition};
