//! Cluster-wide transitions in Redis (see [`crate::broker::Broker::track`]).
//!
//! Keys, under the broker's prefix `P`:
//! - `P:tr:h:<holding>`: a set of the node ids that hold the holding (`Holding::encode`);
//! - `P:tr:of:<node>`: a set of the holdings a node holds, for when it dies;
//! - `P:tr:nodes`: a sorted set of node ids by their last heartbeat (server clock, ms);
//! - `P:tr:dead:<node>`: set when a node was declared dead (kept a week).
//!
//! `track` is one script: it adds or removes this node in the holding's set, and the call
//! that makes the set non-empty or empty returns the transition. `sweep` is one script too:
//! it refreshes this node's heartbeat, then claims nodes whose heartbeat is older than the
//! presence TTL: removes each from the sorted set (so no other survivor claims it), marks it
//! dead, removes it from every holding it held and returns the holdings it was the last
//! holder of. Each node runs under a random id drawn at start, so a restarted node is never
//! taken for its old self; a node that finds itself marked dead (it was alive but missed its
//! heartbeats, e.g. through a long broker outage) draws a new id and tracks everything again.

use redis::Script;

use super::scripts::script;
use super::{RedisBroker, millis};
use crate::broker::transition::NodeIdentity;
use crate::broker::{BrokerError, Holding, Swept, Transition};

/// Dead nodes claimed per sweep (each one in a call of its own).
const CLAIMS_PER_SWEEP: usize = 16;
/// How long a dead node's marker is kept.
const DEAD_MARK_MS: u64 = 7 * 24 * 3600 * 1000;

/// `KEYS`: nodes, this node's dead marker, this node's holdings, the holding's holders.
/// `ARGV`: node id, `1` held / `0` not, the encoded holding. Returns `1` for a transition,
/// `0` for none, `-1` if this node was declared dead (nothing done).
const TRACK: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
redis.call('ZADD', KEYS[1], now_ms(), ARGV[1])
if ARGV[2] == '1' then
  redis.call('SADD', KEYS[3], ARGV[3])
  if redis.call('SADD', KEYS[4], ARGV[1]) == 1 and redis.call('SCARD', KEYS[4]) == 1 then
    return 1
  end
else
  redis.call('SREM', KEYS[3], ARGV[3])
  if redis.call('SREM', KEYS[4], ARGV[1]) == 1 and redis.call('SCARD', KEYS[4]) == 0 then
    return 1
  end
end
return 0
";

/// `KEYS`: nodes, this node's dead marker. `ARGV`: node id, the TTL in ms, the key prefix
/// (`P:tr:`), the dead marker's lifetime in ms. Refreshes the heartbeat and claims at most
/// one dead node. Returns `{'rejoin'}` if this node was declared dead, else `{'ok'}` or
/// `{'claimed', holding, ...}` (the holdings the dead node was the last holder of).
const SWEEP: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return {'rejoin'} end
local now = now_ms()
redis.call('ZADD', KEYS[1], now, ARGV[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0, 1)
if #dead == 0 then return {'ok'} end
local node, p = dead[1], ARGV[3]
redis.call('ZREM', KEYS[1], node)
redis.call('SET', p .. 'dead:' .. node, '1', 'PX', ARGV[4])
local out = {'claimed'}
local of = p .. 'of:' .. node
for _, h in ipairs(redis.call('SMEMBERS', of)) do
  local holders = p .. 'h:' .. h
  redis.call('SREM', holders, node)
  if redis.call('SCARD', holders) == 0 then table.insert(out, h) end
end
redis.call('DEL', of)
return out
";

/// This node's identity for transitions, and the two scripts.
pub(super) struct Tracking {
    node: NodeIdentity,
    track: Script,
    sweep: Script,
}

impl Tracking {
    pub(super) fn new() -> Self {
        Self {
            node: NodeIdentity::default(),
            track: script(TRACK),
            sweep: script(SWEEP),
        }
    }

    fn node(&self) -> String {
        self.node.current()
    }

    fn declared_dead(&self, old: &str) {
        self.node.declared_dead(old, "redis");
    }
}

impl RedisBroker {
    fn tr_key(&self, what: &str) -> String {
        format!("{}:tr:{what}", self.shared.options.prefix)
    }

    pub(super) async fn track_holding(
        &self,
        holding: &Holding,
        held: bool,
    ) -> Result<Option<Transition>, BrokerError> {
        let node = self.tracking.node();
        let encoded = holding.encode();
        let (lease, mut conn) = self.shared.commands.get().await?;
        let decided: i64 = lease.finish(
            self.tracking
                .track
                .key(self.tr_key("nodes"))
                .key(self.tr_key(&format!("dead:{node}")))
                .key(self.tr_key(&format!("of:{node}")))
                .key(self.tr_key(&format!("h:{encoded}")))
                .arg(&node)
                .arg(if held { "1" } else { "0" })
                .arg(&encoded)
                .invoke_async(&mut conn)
                .await,
        )?;
        match decided {
            1 => Ok(Some(holding.transition(held))),
            -1 => {
                self.tracking.declared_dead(&node);
                Err(BrokerError::Unavailable(
                    "redis had declared this node dead; it tracks again under a new id".into(),
                ))
            }
            _ => Ok(None),
        }
    }

    pub(super) async fn sweep_nodes(&self) -> Result<Swept, BrokerError> {
        let mut swept = Swept::default();
        for _ in 0..CLAIMS_PER_SWEEP {
            let node = self.tracking.node();
            let (lease, mut conn) = self.shared.commands.get().await?;
            let reply: Vec<String> = lease.finish(
                self.tracking
                    .sweep
                    .key(self.tr_key("nodes"))
                    .key(self.tr_key(&format!("dead:{node}")))
                    .arg(&node)
                    .arg(millis(self.shared.options.presence_ttl))
                    .arg(self.tr_key(""))
                    .arg(DEAD_MARK_MS)
                    .invoke_async(&mut conn)
                    .await,
            )?;
            let mut reply = reply.into_iter();
            match reply.next().as_deref() {
                Some("rejoin") => self.tracking.declared_dead(&node),
                Some("claimed") => {
                    swept.transitions.extend(reply.filter_map(|encoded| {
                        let holding = Holding::decode(&encoded);
                        if holding.is_none() {
                            tracing::warn!(encoded, "unreadable holding of a dead node");
                        }
                        holding.map(|h| h.transition(false))
                    }));
                    continue;
                }
                _ => {}
            }
            break;
        }
        // Memberships first, so `member_removed` goes before its channel's `channel_vacated`.
        swept.transitions.sort_by_key(|t| t.user.is_none());
        swept.rejoined = self.tracking.node.take_rejoined();
        Ok(swept)
    }
}
