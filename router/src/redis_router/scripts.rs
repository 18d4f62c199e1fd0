//! The Lua scripts behind the Redis router's conditional writes.
//!
//! Each script touches one key, or several keys of one user that share its
//! hash tag `{<mid>}`, so it runs in one hash slot and works the same on a
//! single Redis and on a Redis Cluster. Values:
//! - a key string holds `"<mid>|<server>"`;
//! - a field of a user hash holds `"<server>|<expiry unix ms>"` (the per-field
//!   lease Redis 7.0 lacks); the expiry is the last `|`-separated part, so a
//!   server id may itself contain `|`;
//! - the same field of the user's device hash holds `"<since unix ms>|<platform>"`
//!   (the platform is the rest, so it may contain `|`);
//! - the user's presence hash holds `seen` (unix ms of the last add, renewal or
//!   removal), `state` (`online` / `offline`, last announced) and `seq`
//!   (transitions announced).

use std::sync::LazyLock;

use redis::Script;

/// Sets a device field of a user hash and of its device hash, drops the
/// user's expired fields (a user has few devices, so this is small), makes
/// both hashes live at least as long as the new lease and marks the user
/// seen.
///
/// KEYS[1] user hash, KEYS[2] device hash, KEYS[3] presence hash; ARGV: key,
/// value, lease ms, now ms, `"<since>|<platform>"`, presence keep ms.
/// Returns 1.
pub(crate) static ADD_DEVICE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[5])
local now = tonumber(ARGV[4])
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local expires = tonumber(string.match(all[i + 1], '|(%d+)$'))
  if expires == nil or expires <= now then
    redis.call('HDEL', KEYS[1], all[i])
    redis.call('HDEL', KEYS[2], all[i])
  end
end
for _, hash in ipairs({KEYS[1], KEYS[2]}) do
  if redis.call('PTTL', hash) < tonumber(ARGV[3]) then
    redis.call('PEXPIRE', hash, ARGV[3])
  end
end
redis.call('HSET', KEYS[3], 'seen', ARGV[4])
redis.call('PEXPIRE', KEYS[3], ARGV[6])
return 1
",
    )
});

/// Deletes a key string only if it still holds the expected session.
///
/// KEYS[1] key string; ARGV: `"<mid>|<server>"`. Returns 1 if deleted, else 0.
pub(crate) static REMOVE_KEY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// Deletes a device field (and its device-hash field) only if it is on the
/// given server, marking the user seen.
///
/// KEYS[1] user hash, KEYS[2] device hash, KEYS[3] presence hash; ARGV: key,
/// server, now ms, presence keep ms. Returns 1 if it deleted a live
/// (unexpired) field, else 0.
pub(crate) static REMOVE_DEVICE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then
  return 0
end
local server, expires = string.match(value, '^(.*)|(%d+)$')
if server ~= ARGV[2] then
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if tonumber(expires) > tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[3], 'seen', ARGV[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
  return 1
end
return 0
",
    )
});

/// Extends a key string's lease only if it still holds the expected session.
///
/// KEYS[1] key string; ARGV: `"<mid>|<server>"`, lease ms. Returns 1 if
/// renewed, else 0.
pub(crate) static RENEW_KEY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
",
    )
});

/// Rewrites a device field with a new expiry unless another server owns it
/// (a missing field is re-created: the caller has just renewed the key
/// string, so the session is live, its platform unknown), keeps the hashes
/// alive that long and marks the user seen.
///
/// KEYS[1] user hash, KEYS[2] device hash, KEYS[3] presence hash; ARGV: key,
/// server, value, lease ms, now ms, presence keep ms. Returns 1 if written,
/// 0 if another server owns the field.
pub(crate) static RENEW_DEVICE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local value = redis.call('HGET', KEYS[1], ARGV[1])
if value and string.match(value, '^(.*)|%d+$') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[5] .. '|')
for _, hash in ipairs({KEYS[1], KEYS[2]}) do
  if redis.call('PTTL', hash) < tonumber(ARGV[4]) then
    redis.call('PEXPIRE', hash, ARGV[4])
  end
end
redis.call('HSET', KEYS[3], 'seen', ARGV[5])
redis.call('PEXPIRE', KEYS[3], ARGV[6])
return 1
",
    )
});

/// Deletes a device field (and its device-hash field) only if it still
/// holds the (expired) value a reader saw, so a concurrent renewal is never
/// undone.
///
/// KEYS[1] user hash, KEYS[2] device hash; ARGV: key, value. Returns 1 if
/// deleted, else 0.
pub(crate) static PRUNE_DEVICE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[2], ARGV[1])
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
",
    )
});

/// Replaces a server's room-count hash in one step: the report time in
/// field `t`, each room in field `r:<room>`, and a TTL so a vanished
/// server's hash goes away.
///
/// KEYS[1] online hash; ARGV: now ms, ttl ms, then field/count pairs.
/// Returns 1.
pub(crate) static REPLACE_ROOMS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 't', ARGV[1])
local n = #ARGV
local i = 3
while i <= n do
  -- 1000 arguments (500 pairs) per HSET keeps unpack below Lua's stack limit.
  local j = math.min(i + 999, n)
  redis.call('HSET', KEYS[1], unpack(ARGV, i, j))
  i = j + 1
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
",
    )
});

/// Raises a connection's IM ack position (a field of the user's ack hash:
/// key -> acked sync); it never moves back. The hash lives at least as long
/// as the lease.
///
/// KEYS[1] ack hash; ARGV: key, sync, lease ms. Returns the position now.
pub(crate) static SET_ACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local new = tonumber(ARGV[2])
if new > old then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
else
  new = old
end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return new
",
    )
});

/// Compares a user's live device fields with its last announced presence
/// state and, when they disagree, records the new state: the one atomic
/// step that lets exactly one logic announce each transition.
///
/// KEYS[1] user hash, KEYS[2] presence hash; ARGV: now ms, presence keep ms.
/// Returns {changed (0/1), online (0/1), seq, live devices, last seen ms,
/// last lease end ms (0 when none is live)}.
pub(crate) static SETTLE_PRESENCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local now = tonumber(ARGV[1])
local all = redis.call('HGETALL', KEYS[1])
local live = 0
local last_end = 0
for i = 2, #all, 2 do
  local expires = tonumber(string.match(all[i], '|(%d+)$'))
  if expires ~= nil and expires > now then
    live = live + 1
    if expires > last_end then
      last_end = expires
    end
  end
end
local state = redis.call('HMGET', KEYS[2], 'state', 'seq', 'seen')
local online = 0
if live > 0 then
  online = 1
end
local was = 0
if state[1] == 'online' then
  was = 1
end
local seq = tonumber(state[2] or '0')
local seen = tonumber(state[3] or ARGV[1])
if online == was then
  return {0, online, seq, live, seen, last_end}
end
seq = seq + 1
local name = 'offline'
if online == 1 then
  name = 'online'
end
redis.call('HSET', KEYS[2], 'state', name, 'seq', seq, 'seen', seen)
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return {1, online, seq, live, seen, last_end}
",
    )
});

/// Takes a user off the due set only if its entry is due (score at most
/// now): an online settle that raced ahead and scheduled a later check
/// keeps its entry.
///
/// KEYS[1] due sorted set; ARGV: mid, now ms. Returns 1 if removed, else 0.
pub(crate) static UNSCHEDULE_PRESENCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) <= tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
",
    )
});
