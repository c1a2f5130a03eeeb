//! Cluster-wide transitions in Redis (see [`crate::broker::Broker::track`]).
//!
//! Keys, under the broker's prefix `P`:
//! - `P:tr:h:<holding>`: a set of the node ids that hold the holding (`Holding::encode`);
//! - `P:tr:of:<node>`: a set of the holdings a node holds, for when it dies;
//! - `P:tr:nodes`: a sorted set of node ids by their last heartbeat (server clock, ms);
//! - `P:tr:dead:<node>`: set when a node was declared dead (kept a week);
//! - `P:tr:d:<node>:<holding>`: the node's last `track` call on the holding: its state, its
//!   call number, and the decision it made (`seq`, time), kept for twice the presence TTL;
//! - `P:tr:seq`: the decision counter (`INCR`; created from the server's clock in µs when
//!   missing, so it keeps increasing if the key is lost);
//! - `P:tr:pend:<node>`: a sorted set (by `seq`) of the transitions the node claimed from
//!   dead nodes and has not yet acknowledged.
//!
//! `track` is one script: it adds or removes this node in the holding's set, and the call
//! that makes the set non-empty or empty decides the transition and takes its `seq`. It
//! remembers the call in `d:`, so a call repeated for the same state (its answer was lost:
//! the connection dropped after Redis applied it) returns the same decision, and a call
//! older than the last one (a request that was stuck on a dropped connection) is refused.
//! Past twice the presence TTL the memory is gone, but a node cut off that long was declared
//! dead and tracks everything again anyway.
//!
//! `sweep` is a script called up to [`CLAIMS_PER_SWEEP`] times: it first removes from
//! `pend:` what the previous sweep returned (the node handed it on), refreshes this node's
//! heartbeat, then claims at most one node whose heartbeat is older than the presence TTL:
//! removes it from the sorted set (so no other survivor claims it), marks it dead, removes it
//! from every holding it held, adds the transitions of the holdings it was the last holder of
//! to `pend:` (each with its `seq`), and takes over the dead node's own `pend:` (it may have
//! died between claiming and handing on). Every call returns the whole `pend:` set: a claim
//! whose answer is lost, a sweep cut short by an error or a deadline, lose nothing; the next
//! sweep returns them (with the same `seq`, so the same event ids).
//!
//! Each node runs under a random id drawn at start, so a restarted node is never taken for
//! its old self; a node that finds itself marked dead (it was alive but missed its
//! heartbeats, e.g. through a long broker outage) draws a new id and tracks everything again.

use std::sync::Mutex;
use std::time::Instant;

use redis::Script;

use super::scripts::script;
use super::{RedisBroker, millis};
use crate::broker::transition::NodeIdentity;
use crate::broker::{BrokerError, Holding, Swept, Transition};

/// Dead nodes claimed per sweep at most (each one in a call of its own).
const CLAIMS_PER_SWEEP: usize = 16;
/// How long a dead node's marker is kept.
const DEAD_MARK_MS: u64 = 7 * 24 * 3600 * 1000;

/// Shared by the two scripts: the next decision's `seq`.
const NEXT_SEQ: &str = r"
local function next_seq(key)
  if redis.call('EXISTS', key) == 0 then
    local t = redis.call('TIME')
    redis.call('SET', key, t[1] .. string.format('%06d', tonumber(t[2])))
  end
  return redis.call('INCR', key)
end
";

/// `KEYS`: nodes, this node's dead marker, this node's holdings, the holding's holders, this
/// node's last call on the holding, the decision counter. `ARGV`: node id, `1` held / `0`
/// not, the encoded holding, the call number, how long the last call is remembered (ms).
/// Returns `{'1', seq, time_ms}` for a transition (decided now, or by a call for the same
/// state before), `{'0'}` for none, `{'-1'}` if this node was declared dead, `{'-2'}` if a
/// later call was made (nothing done either way).
const TRACK: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return {'-1'} end
local call = tonumber(ARGV[4])
local last = redis.call('GET', KEYS[5])
if last then
  local state, was, seq, at = string.match(last, '^(%d)|(%d+)|(%d+)|(%d+)$')
  if tonumber(was) > call then return {'-2'} end
  if state == ARGV[2] then
    redis.call('SET', KEYS[5], state .. '|' .. ARGV[4] .. '|' .. seq .. '|' .. at, 'PX', ARGV[5])
    if seq == '0' then return {'0'} end
    return {'1', seq, at}
  end
end
local now = now_ms()
redis.call('ZADD', KEYS[1], now, ARGV[1])
local decided = false
if ARGV[2] == '1' then
  redis.call('SADD', KEYS[3], ARGV[3])
  decided = redis.call('SADD', KEYS[4], ARGV[1]) == 1 and redis.call('SCARD', KEYS[4]) == 1
else
  redis.call('SREM', KEYS[3], ARGV[3])
  decided = redis.call('SREM', KEYS[4], ARGV[1]) == 1 and redis.call('SCARD', KEYS[4]) == 0
end
local seq = '0'
if decided then seq = string.format('%d', next_seq(KEYS[6])) end
local at = string.format('%d', now)
redis.call('SET', KEYS[5], ARGV[2] .. '|' .. ARGV[4] .. '|' .. seq .. '|' .. at, 'PX', ARGV[5])
if decided then return {'1', seq, at} end
return {'0'}
";

/// `KEYS`: nodes, this node's dead marker, this node's pending claims, the decision counter.
/// `ARGV`: node id, the TTL in ms, the key prefix (`P:tr:`), the dead marker's lifetime in
/// ms, then the `seq`s to acknowledge. Acknowledges, refreshes the heartbeat and claims at
/// most one dead node. Returns `{'rejoin'}` if this node was declared dead, else `{'ok'}` or
/// `{'claimed'}` followed by every pending claim, `seq|time_ms|holding`, oldest first.
const SWEEP: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return {'rejoin'} end
for i = 5, #ARGV do
  redis.call('ZREMRANGEBYSCORE', KEYS[3], ARGV[i], ARGV[i])
end
local now = now_ms()
redis.call('ZADD', KEYS[1], now, ARGV[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0, 1)
local out = {'ok'}
if #dead > 0 then
  out[1] = 'claimed'
  local node, p = dead[1], ARGV[3]
  redis.call('ZREM', KEYS[1], node)
  redis.call('SET', p .. 'dead:' .. node, '1', 'PX', ARGV[4])
  local of = p .. 'of:' .. node
  local members, channels = {}, {}
  for _, h in ipairs(redis.call('SMEMBERS', of)) do
    local holders = p .. 'h:' .. h
    redis.call('SREM', holders, node)
    if redis.call('SCARD', holders) == 0 then
      if string.sub(h, 1, 2) == 'm:' then
        table.insert(members, h)
      else
        table.insert(channels, h)
      end
    end
  end
  redis.call('DEL', of)
  -- Memberships first, so `member_removed` goes before its channel's `channel_vacated`.
  for _, list in ipairs({members, channels}) do
    for _, h in ipairs(list) do
      local seq = next_seq(KEYS[4])
      redis.call('ZADD', KEYS[3], seq, string.format('%d|%d|', seq, now) .. h)
    end
  end
  local theirs = p .. 'pend:' .. node
  local taken = redis.call('ZRANGE', theirs, 0, -1, 'WITHSCORES')
  for i = 1, #taken, 2 do
    redis.call('ZADD', KEYS[3], taken[i + 1], taken[i])
  end
  redis.call('DEL', theirs)
end
for _, entry in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  table.insert(out, entry)
end
return out
";

/// This node's identity for transitions, the two scripts, and what the last sweep returned.
pub(super) struct Tracking {
    node: NodeIdentity,
    track: Script,
    sweep: Script,
    /// The `seq`s of the pending claims the last sweep returned (the node handed them on):
    /// the next sweep acknowledges them.
    handed: Mutex<Vec<u64>>,
}

impl Tracking {
    pub(super) fn new() -> Self {
        Self {
            node: NodeIdentity::default(),
            track: script(&format!("{NEXT_SEQ}{TRACK}")),
            sweep: script(&format!("{NEXT_SEQ}{SWEEP}")),
            handed: Mutex::default(),
        }
    }

    fn node(&self) -> String {
        self.node.current()
    }

    fn declared_dead(&self, old: &str) {
        self.node.declared_dead(old, "redis");
    }

    fn handed(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.handed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A pending claim as the sweep script returns it: `seq|time_ms|holding`.
fn pending(entry: &str, scope: &str) -> Option<Transition> {
    let mut parts = entry.splitn(3, '|');
    let seq = parts.next()?.parse().ok()?;
    let time_ms = parts.next()?.parse().ok()?;
    let holding = Holding::decode(parts.next()?)?;
    Some(holding.transition(false, scope, seq, time_ms))
}

impl RedisBroker {
    fn tr_key(&self, what: &str) -> String {
        format!("{}:tr:{what}", self.shared.options.prefix)
    }

    /// The scope of this broker's decision ids.
    fn scope(&self) -> String {
        format!("redis/{}", self.shared.options.prefix)
    }

    pub(super) async fn track_holding(
        &self,
        holding: &Holding,
        held: bool,
    ) -> Result<Option<Transition>, BrokerError> {
        let node = self.tracking.node();
        let call = self.tracking.node.next_call();
        let encoded = holding.encode();
        let remember = millis(self.shared.options.presence_ttl * 2).max(10_000);
        let (lease, mut conn) = self.shared.commands.get().await?;
        let reply: Vec<String> = lease.finish(
            self.tracking
                .track
                .key(self.tr_key("nodes"))
                .key(self.tr_key(&format!("dead:{node}")))
                .key(self.tr_key(&format!("of:{node}")))
                .key(self.tr_key(&format!("h:{encoded}")))
                .key(self.tr_key(&format!("d:{node}:{encoded}")))
                .key(self.tr_key("seq"))
                .arg(&node)
                .arg(if held { "1" } else { "0" })
                .arg(&encoded)
                .arg(call)
                .arg(remember)
                .invoke_async(&mut conn)
                .await,
        )?;
        match reply.first().map(String::as_str) {
            Some("1") => {
                let number = |at: usize| reply.get(at).and_then(|n| n.parse::<u64>().ok());
                let (Some(seq), Some(time_ms)) = (number(1), number(2)) else {
                    return Err(BrokerError::Unavailable(format!(
                        "redis: unreadable transition decision {reply:?}"
                    )));
                };
                Ok(Some(holding.transition(held, &self.scope(), seq, time_ms)))
            }
            Some("-1") => {
                self.tracking.declared_dead(&node);
                Err(BrokerError::Unavailable(
                    "redis had declared this node dead; it tracks again under a new id".into(),
                ))
            }
            Some("-2") => Err(BrokerError::Unavailable(
                "redis: a later transition call of this node came first; this one is void".into(),
            )),
            _ => Ok(None),
        }
    }

    /// One sweep call: acknowledges `acks`, beats, claims at most one dead node. `Ok(None)`:
    /// this node was declared dead; else whether it claimed one, and every pending claim.
    async fn sweep_call(&self, acks: &[u64]) -> Result<Option<(bool, Vec<String>)>, BrokerError> {
        let node = self.tracking.node();
        let (lease, mut conn) = self.shared.commands.get().await?;
        let mut invocation = self.tracking.sweep.key(self.tr_key("nodes"));
        invocation
            .key(self.tr_key(&format!("dead:{node}")))
            .key(self.tr_key(&format!("pend:{node}")))
            .key(self.tr_key("seq"))
            .arg(&node)
            .arg(millis(self.shared.options.presence_ttl))
            .arg(self.tr_key(""))
            .arg(DEAD_MARK_MS);
        for seq in acks {
            invocation.arg(*seq);
        }
        let reply: Vec<String> = lease.finish(invocation.invoke_async(&mut conn).await)?;
        let mut reply = reply.into_iter();
        match reply.next().as_deref() {
            Some("rejoin") => {
                self.tracking.declared_dead(&node);
                Ok(None)
            }
            Some(status) => Ok(Some((status == "claimed", reply.collect()))),
            None => Err(BrokerError::Unavailable("redis: empty sweep answer".into())),
        }
    }

    pub(super) async fn sweep_nodes(&self) -> Result<Swept, BrokerError> {
        let started = Instant::now();
        let acks = self.tracking.handed().clone();
        let mut last = None;
        for call in 0..CLAIMS_PER_SWEEP {
            let outcome = self.sweep_call(if call == 0 { &acks } else { &[] }).await;
            match outcome {
                Ok(None) => break,
                Ok(Some((claimed, entries))) => {
                    if call == 0 {
                        // Applied: those are gone from the broker.
                        self.tracking.handed().clear();
                    }
                    last = Some(entries);
                    // Claims stay pending in the broker: stopping early loses nothing, and
                    // the sweep stays within about one call deadline.
                    if !claimed || started.elapsed() >= self.shared.options.timeout / 2 {
                        break;
                    }
                }
                Err(err) if call == 0 => return Err(err),
                Err(err) => {
                    tracing::warn!(%err, "redis: a sweep call failed; its claims stay pending");
                    break;
                }
            }
        }
        let scope = self.scope();
        let entries = last.unwrap_or_default();
        let transitions: Vec<Transition> = entries
            .iter()
            .filter_map(|entry| {
                let transition = pending(entry, &scope);
                if transition.is_none() {
                    tracing::warn!(entry, "unreadable pending transition of a dead node");
                }
                transition
            })
            .collect();
        // Handed on by the caller once returned (unreadable ones are dropped): the next
        // sweep acknowledges them.
        *self.tracking.handed() = entries
            .iter()
            .filter_map(|entry| entry.split('|').next()?.parse().ok())
            .collect();
        Ok(Swept {
            transitions,
            rejoined: self.tracking.node.take_rejoined(),
            more: false,
        })
    }
}
