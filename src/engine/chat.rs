//! The `/ws` endpoint's behaviour: the legacy chat dialect and protocol v1 on one connection.
//!
//! A legacy connection (no subprotocol) joins [`DEFAULT_CHANNEL`] on open and gets the legacy
//! welcome and replay; a legacy chat message is published there, and it may send v1 commands
//! too. A connection that offered `rusty-socks.v1` ([`Dialect::V1`]) gets the v1 `welcome`
//! instead and no legacy traffic at all: it never joins [`DEFAULT_CHANNEL`], so a broker gap
//! there (which closes legacy clients with 4002) cannot touch it. Mistakes get an error frame
//! (legacy `Error` or v1 `error`, matching what the client speaks) and the connection stays
//! open.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::value::RawValue;
use time::OffsetDateTime;

use self::gather::Gathered;
use super::outbox::Outbox;
use super::session::{Handler, Replies};
use crate::auth::Identity;
use crate::broker::Published;
use crate::engine::hub::MemberState;
use crate::engine::node::{Caller, DEFAULT_CHANNEL, Node};
use crate::protocol::legacy::{ServerFrame, parse_chat};
use crate::protocol::v1::{self, Command, Frame, Parsed};
use crate::types::error::ClientError;
use crate::types::position::continues_from;
use crate::types::rate::{Rate, TokenBucket};
use crate::types::thin_list::ThinList;
use crate::types::{AuthError, ClientId, ClientInfo};
use crate::ws::close::CloseCode;

mod gather;

/// What a `/ws` connection speaks, chosen by the subprotocols it offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// No subprotocol: legacy chat on [`DEFAULT_CHANNEL`] (`Connect`, replay, `Chat`,
    /// `Disconnect`), plus v1 commands; today's wire contract for old clients.
    Legacy,
    /// Offered `rusty-socks.v1`: a v1 `welcome`, v1 frames only, never on
    /// [`DEFAULT_CHANNEL`]. A v1 client must not lose its connection (4002) to a gap on a
    /// channel it never asked for, nor pay for legacy chat it ignores.
    V1,
}

/// Per-connection limits of the `/ws` endpoint.
#[derive(Debug, Clone, Copy)]
pub struct ChatLimits {
    /// Stored messages replayed after the welcome.
    pub replay: u32,
    /// Most channels one connection may be subscribed to.
    pub max_channels: u32,
    /// Largest `data` accepted in a v1 publish, in bytes.
    pub max_data: u32,
    /// Messages per second a connection may send (0: no limit).
    pub rate: u32,
    /// Messages it may send at once above the rate.
    pub burst: u32,
}

/// The per-connection rate limit: a token bucket of `rate` messages a second, at most `burst`
/// at once, and the count of messages refused since the bucket was last full: a client that
/// keeps going after `burst` refusals is closed.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: TokenBucket,
    refused: u32,
}

/// What the bucket says about one message.
enum Admit {
    Yes,
    Refuse,
    Close,
}

impl Bucket {
    fn new(burst: u32, now_us: u64) -> Self {
        Self {
            tokens: TokenBucket::full(
                Rate {
                    per_second: 0,
                    burst,
                },
                now_us,
            ),
            refused: 0,
        }
    }

    /// One message at `now_us` (microseconds, [`crate::types::clock::now_us`]).
    fn admit(&mut self, rate: u32, burst: u32, now_us: u64) -> Admit {
        let rate = Rate {
            per_second: rate,
            burst,
        };
        self.tokens.refill(rate, now_us);
        if self.tokens.is_full(rate) {
            self.refused = 0;
        }
        if self.tokens.try_take() {
            return Admit::Yes;
        }
        self.refused = self.refused.saturating_add(1);
        if self.refused > burst {
            Admit::Close
        } else {
            Admit::Refuse
        }
    }
}

/// A token-authenticated connection's state.
#[derive(Debug)]
struct Auth {
    identity: Identity,
    /// A `refresh` push was sent for the current token.
    asked: bool,
}

/// Handler for one `/ws` connection.
#[derive(Debug)]
pub struct ChatHandler {
    /// Its fan-out queue, which also carries the connection's id (not kept a second time:
    /// every connection's task holds this struct for its whole life).
    outbox: Outbox,
    /// The node and the limits, shared by every connection (one pointer per connection).
    shared: Arc<ChatShared>,
    /// The membership of the default channel, which nearly every connection has: kept apart
    /// so the usual connection needs no list allocation at all.
    default: Option<Arc<MemberState>>,
    /// Other memberships (a few at most: a list beats a map here, and costs nothing until
    /// the first v1 subscription).
    others: ThinList<Arc<MemberState>>,
    /// Set for connections that presented a token (boxed: most connections have none).
    auth: Option<Box<Auth>>,
    /// The per-connection rate limit's state, from the first message under a rate.
    bucket: Option<Box<Bucket>>,
    /// Legacy chat messages of the current read, to be published together at its end (only
    /// with a broker that pipelines publishes; boxed: empty between reads).
    gathered: Option<Box<Gathered>>,
    /// Legacy or v1-only.
    dialect: Dialect,
}

/// What every `/ws` connection of a server shares.
#[derive(Debug)]
pub struct ChatShared {
    /// Channels, history and presence.
    pub node: Arc<Node>,
    /// Per-connection limits, replaced whole by a reload: every message reads the current
    /// ones (a lock-free load), so a changed rate limit applies to existing connections too.
    pub limits: arc_swap::ArcSwap<ChatLimits>,
    /// The backend proxy, asked first in namespaces with `proxy_subscribe`/`proxy_publish`.
    pub proxy: Arc<crate::engine::backend::Proxy>,
}

impl ChatHandler {
    /// A handler for the connection whose fan-out goes to `outbox` (and whose id is the
    /// outbox's), authenticated as `identity` (`None`: anonymous), speaking `dialect`.
    pub fn new(
        outbox: Outbox,
        shared: Arc<ChatShared>,
        identity: Option<Box<Identity>>,
        dialect: Dialect,
    ) -> Self {
        Self {
            outbox,
            shared,
            default: None,
            others: ThinList::default(),
            auth: identity.map(|identity| {
                Box::new(Auth {
                    identity: *identity,
                    asked: false,
                })
            }),
            bucket: None,
            gathered: None,
            dialect,
        }
    }

    fn node(&self) -> &Node {
        &self.shared.node
    }

    fn limits(&self) -> ChatLimits {
        **self.shared.limits.load()
    }

    /// This connection as presence, join and leave show it (built when needed, so an idle
    /// connection does not carry a copy).
    fn client(&self) -> ClientInfo {
        ClientInfo {
            client_id: self.client_id(),
            user: self.auth.as_ref().map(|a| Arc::clone(&a.identity.user)),
            info: self.auth.as_ref().and_then(|a| a.identity.info.clone()),
        }
    }

    fn caller(&self) -> Caller<'_> {
        Caller::Client(self.auth.as_ref().map(|a| &a.identity))
    }

    /// Applies the rate limit to one incoming message; `false` drops it (with an error reply,
    /// or a close for a client that keeps going).
    fn admit(&mut self, out: &mut Replies<'_>, v1: Option<Option<&RawValue>>) -> bool {
        match self.admission() {
            Ok(()) => true,
            Err(Some(err)) => {
                match v1 {
                    Some(id) => out.text(&Frame::error(id, &err).to_json()),
                    None => out.text(&ServerFrame::error(&err).to_json()),
                }
                false
            }
            Err(None) => false,
        }
    }

    /// The rate limit's verdict on one message: `Err(Some)` refuses it with that error,
    /// `Err(None)` refuses it and is closing the connection.
    fn admission(&mut self) -> Result<(), Option<ClientError>> {
        let limits = self.limits();
        if limits.rate == 0 {
            return Ok(());
        }
        // Made at the first message under a rate (full, as a new connection's would be), so a
        // rate set by a reload also limits connections that were open before it.
        let bucket = self.bucket.get_or_insert_with(|| {
            Box::new(Bucket::new(limits.burst, crate::types::clock::now_us()))
        });
        match bucket.admit(limits.rate, limits.burst, crate::types::clock::now_us()) {
            Admit::Yes => Ok(()),
            Admit::Refuse => {
                self.node().stats().rate_limited();
                Err(Some(ClientError::RateLimited(limits.rate)))
            }
            Admit::Close => {
                self.node().stats().rate_limited();
                self.outbox.close(CloseCode::RateLimited);
                Err(None)
            }
        }
    }

    fn refresh(&mut self, token: &str) -> Result<Option<u64>, ClientError> {
        let verifier = self.node().verifier().ok_or(ClientError::AuthDisabled)?;
        let identity = verifier.verify(token).map_err(ClientError::InvalidToken)?;
        match &mut self.auth {
            Some(auth) if auth.identity.user != identity.user => {
                Err(ClientError::InvalidToken(AuthError::WrongUser))
            }
            Some(auth) => {
                let expires_at = identity.expires_at;
                auth.identity = identity;
                auth.asked = false;
                Ok(expires_at)
            }
            // An anonymous connection may not become someone by refreshing.
            None => Err(ClientError::InvalidToken(AuthError::WrongUser)),
        }
    }

    fn client_id(&self) -> ClientId {
        self.outbox.id()
    }

    fn subscription_count(&self) -> usize {
        usize::from(self.default.is_some()) + self.others.len()
    }

    fn remember(&mut self, state: Arc<MemberState>) {
        if &*state.channel == DEFAULT_CHANNEL {
            self.default = Some(state);
        } else {
            self.others.push(state);
        }
    }

    fn forget(&mut self, channel: &str) {
        if channel == DEFAULT_CHANNEL {
            self.default = None;
        } else {
            self.others.retain(|s| &*s.channel != channel);
        }
    }

    fn membership(&self, channel: &str) -> Option<&Arc<MemberState>> {
        self.default
            .iter()
            .chain(self.others.iter())
            .find(|s| &*s.channel == channel)
    }

    /// A legacy chat message: published on [`DEFAULT_CHANNEL`] if the unnamed namespace's
    /// `publish` lets this connection, with the token's `sub` as `sender` when it has one.
    async fn legacy_chat(&mut self, text: &str, out: &mut Replies<'_>) {
        let data = match self.legacy_data(text) {
            Ok(Some(data)) => data,
            Ok(None) => return,
            Err(err) => return out.text(&ServerFrame::error(&err).to_json()),
        };
        let published = self
            .shared
            .node
            .publish(
                DEFAULT_CHANNEL,
                data,
                Some(self.client_id()),
                None,
                self.caller(),
            )
            .await;
        if let Err(err) = published {
            if matches!(err, ClientError::Unavailable(_)) {
                tracing::warn!(%err, "legacy publish failed");
            }
            out.text(&ServerFrame::error(&err).to_json());
        }
    }

    /// A legacy chat message's publication data (`None`: nothing to publish or answer).
    fn legacy_data(&self, text: &str) -> Result<Option<Arc<RawValue>>, ClientError> {
        let user = self.auth.as_ref().map(|a| &*a.identity.user);
        let chat = parse_chat(text, OffsetDateTime::now_utc(), user)?;
        // The legacy frame itself is the publication's data: stored once, replayed verbatim.
        Ok(RawValue::from_string(ServerFrame::Chat(&chat).to_json())
            .ok()
            .map(Arc::from))
    }

    /// What a v1 `publish` is refused for before anything is published: data over the
    /// limit, or the default channel (legacy chat's). Checked by the ordinary way and by the
    /// gathering ([`ChatHandler::gathers_v1`]) alike.
    fn check_publish(&self, channel: &str, data: &RawValue) -> Result<(), ClientError> {
        if data.get().len() > self.limits().max_data as usize {
            return Err(ClientError::DataTooBig(self.limits().max_data as usize));
        }
        if channel == DEFAULT_CHANNEL {
            return Err(ClientError::PermissionDenied(
                "the default channel carries legacy chat; send a legacy message",
            ));
        }
        Ok(())
    }

    async fn command(
        &mut self,
        id: Option<&RawValue>,
        command: Command<'_>,
        out: &mut Replies<'_>,
    ) -> Result<(), ClientError> {
        match command {
            Command::Subscribe { channel, since } => {
                if self.dialect == Dialect::V1 && channel == DEFAULT_CHANNEL {
                    return Err(ClientError::PermissionDenied(
                        "the default channel carries legacy chat, which a rusty-socks.v1 \
                         connection does not get; connect without the subprotocol for it",
                    ));
                }
                if self.subscription_count() >= self.limits().max_channels as usize
                    && self.membership(&channel).is_none()
                {
                    return Err(ClientError::TooManyChannels(
                        self.limits().max_channels as usize,
                    ));
                }
                if self.membership(&channel).is_none()
                    && self.node().options(&channel)?.proxy_subscribe
                {
                    let user = self.auth.as_ref().map(|a| &*a.identity.user);
                    // Bounded by RUSTY_SOCKS_PROXY_TIMEOUT; no lock is held.
                    let asked = self
                        .shared
                        .proxy
                        .subscribe(self.client_id(), user, &channel, None);
                    Box::pin(asked).await?;
                }
                let caller = Caller::Client(self.auth.as_ref().map(|a| &a.identity));
                let sub = self
                    .shared
                    .node
                    .subscribe(
                        &self.outbox,
                        &self.client(),
                        &channel,
                        since.as_ref(),
                        0,
                        caller,
                    )
                    .await?;
                out.text(
                    &Frame::Subscribed {
                        id,
                        channel: &channel,
                        offset: sub.position.offset,
                        epoch: &sub.position.epoch,
                        recovered: sub.recovered.unwrap_or(false),
                        publications: &sub.publications,
                    }
                    .to_json(),
                );
                sub.live.iter().for_each(|frame| out.frame(frame));
                self.remember(sub.state);
            }
            Command::Unsubscribe { channel } => {
                self.node()
                    .unsubscribe(self.client_id(), &self.client(), &channel, true)
                    .await?;
                self.forget(&channel);
                out.text(
                    &Frame::Unsubscribed {
                        id,
                        channel: &channel,
                    }
                    .to_json(),
                );
            }
            Command::Publish {
                channel,
                data,
                idempotency_key,
            } => {
                self.check_publish(&channel, data)?;
                let mut data: Arc<RawValue> = Arc::from(data.to_owned());
                if self.node().options(&channel)?.proxy_publish {
                    let user = self.auth.as_ref().map(|a| &*a.identity.user);
                    let asked = self
                        .shared
                        .proxy
                        .publish(self.client_id(), user, &channel, &data);
                    if let Some(replaced) = Box::pin(asked).await? {
                        if replaced.get().len() > self.limits().max_data as usize {
                            return Err(ClientError::DataTooBig(self.limits().max_data as usize));
                        }
                        data = Arc::from(replaced);
                    }
                }
                let published = self
                    .shared
                    .node
                    .publish(
                        &channel,
                        data,
                        Some(self.client_id()),
                        idempotency_key,
                        self.caller(),
                    )
                    .await?;
                out.text(&published_reply(id, &channel, &published));
            }
            Command::Presence { channel } => {
                let clients = self.node().presence(&channel, self.caller()).await?;
                out.text(
                    &Frame::Presence {
                        id,
                        channel: &channel,
                        clients: &clients,
                    }
                    .to_json(),
                );
            }
            Command::History {
                channel,
                limit,
                since,
            } => {
                let page = self
                    .shared
                    .node
                    .history(&channel, since.as_ref(), limit, self.caller())
                    .await?;
                let complete = since
                    .as_ref()
                    .map(|since| continues_from(since, &page.position, &page.publications));
                out.text(
                    &Frame::History {
                        id,
                        channel: &channel,
                        offset: page.position.offset,
                        epoch: &page.position.epoch,
                        publications: &page.publications,
                        complete,
                    }
                    .to_json(),
                );
            }
            Command::Refresh { token } => {
                let expires_at = self.refresh(&token)?;
                out.text(&Frame::Refreshed { id, expires_at }.to_json());
            }
        }
        Ok(())
    }
}

impl Handler for ChatHandler {
    fn on_welcome(&mut self, out: &mut Replies<'_>) {
        match self.dialect {
            Dialect::Legacy => out.text(
                &ServerFrame::Connect {
                    client_id: self.client_id(),
                }
                .to_json(),
            ),
            Dialect::V1 => {
                let identity = self.auth.as_ref().map(|a| &a.identity);
                out.text(
                    &Frame::Welcome {
                        client_id: self.client_id(),
                        version: env!("CARGO_PKG_VERSION"),
                        user: identity.map(|i| &*i.user),
                        expires_at: identity.and_then(|i| i.expires_at),
                    }
                    .to_json(),
                );
            }
        }
    }

    async fn on_open(&mut self, out: &mut Replies<'_>) {
        if self.dialect == Dialect::V1 {
            return; // Nothing to join: a v1 client subscribes to what it wants.
        }
        // Boxed: a connection's task would otherwise be as large as its biggest command
        // for its whole life, most of which is spent idle.
        Box::pin(async move {
            let joined = self
                .shared
                .node
                .subscribe(
                    &self.outbox,
                    &self.client(),
                    DEFAULT_CHANNEL,
                    None,
                    self.limits().replay as usize,
                    // The unnamed namespace decides, as for v1: without `subscribe` the
                    // connection is not on the channel, without `read_history` no replay.
                    self.caller(),
                )
                .await;
            match joined {
                Ok(sub) => {
                    for publication in &sub.publications {
                        out.text(publication.data.get());
                    }
                    sub.live.iter().for_each(|frame| out.frame(frame));
                    self.remember(sub.state);
                }
                Err(err) => {
                    out.text(&ServerFrame::error(&err).to_json());
                    if matches!(err, ClientError::PermissionDenied(_)) {
                        tracing::debug!(%err, "not allowed on the default channel");
                    } else {
                        // Left open off `default`, a legacy client would chat into the void
                        // and never hear a reply: close it so it reconnects once the broker
                        // is back.
                        tracing::debug!(%err, "could not join the default channel; closing with 1013");
                        self.outbox.close(CloseCode::TryAgainLater);
                    }
                }
            }
        })
        .await
    }

    async fn on_text(&mut self, text: Bytes, out: &mut Replies<'_>) {
        // Boxed: a connection's task would otherwise be as large as its biggest command
        // for its whole life, most of which is spent idle.
        Box::pin(async move {
            let Ok(text) = std::str::from_utf8(&text) else {
                return; // The session only hands over validated UTF-8.
            };
            let parsed = match self.dialect {
                Dialect::Legacy => v1::parse(text),
                Dialect::V1 => v1::parse_v1_only(text),
            };
            let pipelines = self.shared.node.pipelines_publish();
            if matches!(parsed, Parsed::Legacy) && pipelines {
                return self.gather_legacy(text);
            }
            if pipelines && self.gather_publish(&parsed, out).await {
                return;
            }
            // Anything else waits for the chat messages before it, and answers after them.
            if self.gathered.is_some() {
                Box::pin(self.publish_gathered(out)).await;
            }
            let v1_id = match &parsed {
                Parsed::Command(id, _) | Parsed::BadCommand(id, _) => Some(*id),
                Parsed::Legacy | Parsed::Invalid(_) => None,
            };
            if !self.admit(out, v1_id) {
                return;
            }
            match parsed {
                Parsed::Legacy => self.legacy_chat(text, out).await,
                Parsed::Invalid(err) => out.text(&ServerFrame::error(&err).to_json()),
                Parsed::BadCommand(id, err) => out.text(&Frame::error(id, &err).to_json()),
                Parsed::Command(id, command) => {
                    if let Err(err) = self.command(id, command, out).await {
                        out.text(&Frame::error(id, &err).to_json());
                    }
                }
            }
        })
        .await
    }

    async fn on_binary(&mut self, _data: Bytes, out: &mut Replies<'_>) {
        if self.gathered.is_some() {
            Box::pin(self.publish_gathered(out)).await;
        }
        let err = ClientError::BinaryNotSupported;
        match self.dialect {
            Dialect::Legacy => out.text(&ServerFrame::error(&err).to_json()),
            Dialect::V1 => out.text(&Frame::error(None, &err).to_json()),
        }
    }

    async fn on_read_end(&mut self, out: &mut Replies<'_>) {
        if self.gathered.is_some() {
            // Boxed: a connection's task would otherwise be as large as a pipelined publish
            // for its whole life.
            Box::pin(self.publish_gathered(out)).await;
        }
    }

    fn on_tick(&mut self, out: &mut Replies<'_>) {
        let Some(auth) = &mut self.auth else { return };
        let Some(expires_at) = auth.identity.expires_at else {
            return;
        };
        let now = crate::types::clock::now_s();
        if now >= expires_at {
            tracing::info!(user = %auth.identity.user, "token expired without a refresh");
            self.outbox.close(CloseCode::TokenExpired);
        } else if !auth.asked && now + self.shared.node.refresh_window().as_secs() >= expires_at {
            auth.asked = true;
            out.text(&Frame::Refresh { expires_at }.to_json());
        }
    }

    fn on_gaps(&mut self, out: &mut Replies<'_>) {
        if !self.outbox.take_gap_report() {
            return;
        }
        // The report is a flag: the gapped memberships say which channels it is about.
        for state in self.default.iter().chain(self.others.iter()) {
            if state.is_gapped() {
                out.text(
                    &Frame::Gap {
                        channel: &state.channel,
                        offset: state.last_offset(),
                    }
                    .to_json(),
                );
                state.clear_gap();
            }
        }
    }

    fn on_closing(&mut self) {
        let node = &self.shared.node;
        for state in self.default.iter().chain(self.others.iter()) {
            node.detach(self.client_id(), state);
        }
    }

    async fn on_close(&mut self, server_shutting_down: bool) {
        // Boxed: a connection's task would otherwise be as large as its biggest command
        // for its whole life, most of which is spent idle.
        Box::pin(async move {
            // On shutdown every client is leaving at once; N leave notices to N clients would be
            // N² frames for nobody.
            let announce = !server_shutting_down;
            let client = self.client();
            let all = self.default.take().into_iter().chain(self.others.take());
            for state in all {
                self.shared
                    .node
                    .release_detached(&state, &client, announce, server_shutting_down)
                    .await;
            }
        })
        .await
    }
}

/// The `published` answer to a v1 `publish` command.
fn published_reply(id: Option<&RawValue>, channel: &str, published: &Published) -> String {
    Frame::Published {
        id,
        channel,
        offset: published.position.offset,
        duplicate: published.duplicate,
    }
    .to_json()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_US: u64 = 86_400 * 1_000_000;

    fn admitted(admit: Admit) -> bool {
        matches!(admit, Admit::Yes)
    }

    #[test]
    fn the_rate_limit_still_refills_after_fifty_days() {
        // 2 messages a second, 3 at once, for a connection opened at `start`.
        for start in [1, 49 * DAY_US, 60 * DAY_US, 400 * DAY_US] {
            let mut bucket = Bucket::new(3, start);
            let mut now = start;
            for _ in 0..3 {
                assert!(admitted(bucket.admit(2, 3, now)), "the burst passes");
            }
            assert!(matches!(bucket.admit(2, 3, now), Admit::Refuse));
            // Half a second later, one more token.
            now += 500_000;
            assert!(admitted(bucket.admit(2, 3, now)), "refilled at {start}");
            assert!(matches!(bucket.admit(2, 3, now), Admit::Refuse));
            // Across the 49.7-day mark of a millisecond count in 32 bits.
            now += 50 * DAY_US;
            for _ in 0..3 {
                assert!(
                    admitted(bucket.admit(2, 3, now)),
                    "full again after 50 days"
                );
            }
            assert!(matches!(bucket.admit(2, 3, now), Admit::Refuse));
            now += 500_000;
            assert!(admitted(bucket.admit(2, 3, now)), "still refilling");
        }
    }

    #[test]
    fn a_client_that_keeps_going_after_the_burst_of_refusals_is_closed() {
        let mut bucket = Bucket::new(2, 1);
        assert!(admitted(bucket.admit(1, 2, 1)));
        assert!(admitted(bucket.admit(1, 2, 1)));
        assert!(matches!(bucket.admit(1, 2, 1), Admit::Refuse));
        assert!(matches!(bucket.admit(1, 2, 1), Admit::Refuse));
        assert!(matches!(bucket.admit(1, 2, 1), Admit::Close));
        // A full bucket forgives earlier refusals.
        let mut bucket = Bucket::new(2, 1);
        for _ in 0..4 {
            let _ = bucket.admit(1, 2, 1);
        }
        let later = 1 + 2_000_000;
        assert!(admitted(bucket.admit(1, 2, later)));
        assert!(admitted(bucket.admit(1, 2, later)));
        assert!(matches!(bucket.admit(1, 2, later), Admit::Refuse));
    }
}
