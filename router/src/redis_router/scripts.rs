//! The Lua scripts behind the Redis router's conditional writes.
//!
//! Each script touches exactly one key, so it runs in one hash slot and
//! works the same on a single Redis and on a Redis Cluster. Values:
//! - a key string holds `"<mid>|<server>"`;
//! - a field of a user hash holds `"<server>|<expiry unix ms>"` (the per-field
//!   lease Redis 7.0 lacks); the expiry is the last `|`-separated part, so a
//!   server id may itself contain `|`.

use std::sync::LazyLock;

use redis::Script;

/// Sets a device field of a user hash, drops the user's expired fields (a
/// user has few devices, so this is small) and makes the hash live at least
/// as long as the new lease.
///
/// KEYS[1] user hash; ARGV: key, value, lease ms, now ms. Returns 1.
pub(crate) static ADD_DEVICE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local now = tonumber(ARGV[4])
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local expires = tonumber(string.match(all[i + 1], '|(%d+)$'))
  if expires == nil or expires <= now then
    redis.call('HDEL', KEYS[1], all[i])
  end
end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
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

/// Deletes a device field only if it is on the given server.
///
/// KEYS[1] user hash; ARGV: key, server, now ms. Returns 1 if it deleted a
/// live (unexpired) field, else 0.
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
if tonumber(expires) > tonumber(ARGV[3]) then
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
/// string, so the session is live) and keeps the hash alive that long.
///
/// KEYS[1] user hash; ARGV: key, server, value, lease ms. Returns 1 if
/// written, 0 if another server owns the field.
pub(crate) static RENEW_DEVICE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local value = redis.call('HGET', KEYS[1], ARGV[1])
if value and string.match(value, '^(.*)|%d+$') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[4]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return 1
",
    )
});

/// Deletes a device field only if it still holds the (expired) value a
/// reader saw, so a concurrent renewal is never undone.
///
/// KEYS[1] user hash; ARGV: key, value. Returns 1 if deleted, else 0.
pub(crate) static PRUNE_DEVICE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
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
