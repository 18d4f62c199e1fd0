//! Where rows live when the store is spread over several PostgreSQL
//! primaries (im.md, Storage: scale-out).
//!
//! A key is hashed into one of [`BUCKETS`] virtual buckets, and the
//! buckets are mapped to primaries: a conversation's rows (its counter,
//! messages, members, group settings) by the hash of its id, a user's rows
//! (its inbox and sync counter) by the hash of its mid. The hash and the
//! bucket count never change, so a key's bucket is the same in every
//! version; what an operator changes is only which primary holds which
//! buckets (`im.shard_map`), which is how buckets move between primaries
//! (docs/operations.md, "Moving buckets").

use crate::conv::ConvId;
use crate::error::{Error, Result};

/// The number of virtual buckets: fixed for good (a key's bucket must not
/// move when the code changes).
pub const BUCKETS: u16 = 1024;

/// Which primary holds each bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardMap {
    /// bucket → primary (an index into the store's list).
    owner: Vec<u16>,
    shards: usize,
}

/// FNV-1a, 64 bits: simple, fast, and stable across versions and platforms.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The bucket of a conversation: the hash of its id as written (`p:1:2`,
/// `g:team`).
pub fn conv_bucket(conv: &ConvId) -> u16 {
    // The modulo keeps it below BUCKETS.
    (fnv1a(conv.to_string().as_bytes()) % u64::from(BUCKETS)) as u16
}

/// The bucket of a user: the hash of its mid's eight bytes, little-endian.
pub fn mid_bucket(mid: i64) -> u16 {
    (fnv1a(&mid.to_le_bytes()) % u64::from(BUCKETS)) as u16
}

impl ShardMap {
    /// The buckets spread over `shards` primaries in equal contiguous
    /// ranges: primary `i` holds buckets `i*B/n .. (i+1)*B/n`.
    pub fn even(shards: usize) -> Result<ShardMap> {
        if shards == 0 || shards > usize::from(BUCKETS) {
            return Err(Error::invalid(
                "shards",
                format!("between 1 and {BUCKETS} primaries"),
            ));
        }
        let owner = (0..usize::from(BUCKETS))
            .map(|b| (b * shards / usize::from(BUCKETS)) as u16)
            .collect();
        Ok(ShardMap { owner, shards })
    }

    /// An explicit map: `ranges` of buckets `lo..=hi` to a primary, which
    /// must cover every bucket exactly once, each primary in `0..shards`.
    pub fn from_ranges(shards: usize, ranges: &[(u16, u16, usize)]) -> Result<ShardMap> {
        let mut owner: Vec<Option<u16>> = vec![None; usize::from(BUCKETS)];
        for &(lo, hi, shard) in ranges {
            if lo > hi || hi >= BUCKETS {
                return Err(Error::invalid(
                    "shard_map",
                    format!("buckets {lo}-{hi}: a range within 0-{}", BUCKETS - 1),
                ));
            }
            if shard >= shards {
                return Err(Error::invalid(
                    "shard_map",
                    format!("buckets {lo}-{hi} go to primary {shard}, but there are {shards}"),
                ));
            }
            for b in lo..=hi {
                if owner[usize::from(b)].replace(shard as u16).is_some() {
                    return Err(Error::invalid(
                        "shard_map",
                        format!("bucket {b} is mapped twice"),
                    ));
                }
            }
        }
        let owner = owner
            .iter()
            .enumerate()
            .map(|(b, o)| {
                o.ok_or_else(|| Error::invalid("shard_map", format!("bucket {b} is not mapped")))
            })
            .collect::<Result<Vec<u16>>>()?;
        Ok(ShardMap { owner, shards })
    }

    /// How many primaries.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// The primary holding a conversation's rows.
    pub fn conv_shard(&self, conv: &ConvId) -> usize {
        usize::from(self.owner[usize::from(conv_bucket(conv))])
    }

    /// The primary holding a user's inbox.
    pub fn mid_shard(&self, mid: i64) -> usize {
        usize::from(self.owner[usize::from(mid_bucket(mid))])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_stable_across_versions() {
        // Fixed values (FNV-1a 64 of the bytes, modulo 1024, computed
        // apart from this code): changing the hash would move every row.
        assert_eq!(conv_bucket(&ConvId::peer(1, 2).unwrap()), 374);
        assert_eq!(conv_bucket(&ConvId::group("team").unwrap()), 725);
        assert_eq!(mid_bucket(1), 932);
        assert_eq!(mid_bucket(-7), 507);
    }

    #[test]
    fn an_even_map_spreads_keys_over_every_primary() {
        let map = ShardMap::even(2).unwrap();
        let mut counts = [0usize; 2];
        for mid in 0..10_000 {
            counts[map.mid_shard(mid)] += 1;
        }
        assert!(counts.iter().all(|&n| n > 4_000), "{counts:?}");
        assert_eq!(
            ShardMap::even(1)
                .unwrap()
                .conv_shard(&ConvId::peer(3, 4).unwrap()),
            0
        );
        assert!(ShardMap::even(0).is_err());
    }

    #[test]
    fn an_explicit_map_must_cover_every_bucket_once() {
        let map = ShardMap::from_ranges(2, &[(0, 99, 1), (100, 1023, 0)]).unwrap();
        assert_eq!(map.shards(), 2);
        let moved = (0..10_000).filter(|&mid| map.mid_shard(mid) == 1).count();
        assert!(moved > 500 && moved < 1500, "{moved}");
        for bad in [
            vec![(0, 1023, 2)],
            vec![(0, 99, 0)],
            vec![(0, 600, 0), (600, 1023, 1)],
            vec![(0, 1024, 0)],
        ] {
            assert!(ShardMap::from_ranges(2, &bad).is_err(), "{bad:?}");
        }
    }
}
