//! Channel names: what is a valid one, and which namespace it belongs to.

/// Longest channel name accepted, in bytes.
pub const MAX_CHANNEL_LEN: usize = 255;

/// Why a channel name or namespace was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// Empty, too long, or with characters outside the allowed set.
    #[error(
        "channel names are 1-255 characters from A-Z a-z 0-9 and _ - . : @ / = +, with a non-empty namespace before ':'"
    )]
    InvalidName,
    /// The namespace is not configured.
    #[error(
        "namespace {0:?} is not configured: add it to RUSTY_SOCKS_NAMESPACES, e.g. RUSTY_SOCKS_NAMESPACES='{{\"{0}\":{{}}}}', or use a channel without a namespace (no ':')"
    )]
    UnknownNamespace(String),
}

/// The namespace a channel belongs to: the part before its first `:`, or `""`.
pub fn namespace_of(channel: &str) -> &str {
    channel.split_once(':').map_or("", |(ns, _)| ns)
}

/// Whether `b` may appear in a channel or namespace name.
pub fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"_-.:@/=+".contains(&b)
}

/// Checks length, characters, and that a `:` has a namespace before it.
pub fn validate_name(channel: &str) -> Result<(), ChannelError> {
    let ok = !channel.is_empty()
        && channel.len() <= MAX_CHANNEL_LEN
        && channel.bytes().all(is_name_byte)
        && !channel.starts_with(':');
    if ok {
        Ok(())
    } else {
        Err(ChannelError::InvalidName)
    }
}
