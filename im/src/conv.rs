//! Conversation ids (im.md, Model): `p:<a>:<b>` for two users, the smaller
//! mid first (a user may talk to themselves: `p:7:7`), and `g:<gid>` for a
//! group, gid `[A-Za-z0-9_.-]{1,64}`. One spelling per conversation: a
//! parsed id prints back exactly as it was written.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The longest group id.
pub const MAX_GID_LEN: usize = 64;

/// A conversation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConvId {
    /// Two users (or one talking to themselves); `low <= high`.
    Peer {
        /// The smaller mid.
        low: i64,
        /// The larger mid.
        high: i64,
    },
    /// A group created by the business.
    Group(String),
}

impl ConvId {
    /// The 1:1 conversation of `a` and `b`, in either order; mids are
    /// never negative.
    pub fn peer(a: i64, b: i64) -> Result<ConvId> {
        if a < 0 || b < 0 {
            return Err(Error::invalid("to", "a mid is not negative"));
        }
        Ok(ConvId::Peer {
            low: a.min(b),
            high: a.max(b),
        })
    }

    /// The group conversation `gid`, once the gid is checked.
    pub fn group(gid: &str) -> Result<ConvId> {
        check_gid(gid)?;
        Ok(ConvId::Group(gid.to_owned()))
    }

    /// Returns whether `mid` is one of a 1:1 conversation's two users
    /// (always false for a group: membership is the store's).
    pub fn is_peer_of(&self, mid: i64) -> bool {
        matches!(self, ConvId::Peer { low, high } if *low == mid || *high == mid)
    }
}

fn check_gid(gid: &str) -> Result<()> {
    if gid.is_empty() || gid.len() > MAX_GID_LEN {
        return Err(Error::invalid(
            "conv",
            format!("a group id has 1 to {MAX_GID_LEN} characters"),
        ));
    }
    if let Some(bad) = gid
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(Error::invalid(
            "conv",
            format!("a group id is made of A-Z a-z 0-9 _ . - (found {bad:?})"),
        ));
    }
    Ok(())
}

/// A mid as written in a 1:1 id: decimal, no sign, no leading zero, so that
/// every conversation has exactly one spelling.
fn parse_mid(text: &str) -> Result<i64> {
    let canonical = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if !canonical {
        return Err(Error::invalid(
            "conv",
            "a 1:1 id is p:<mid>:<mid> with decimal mids",
        ));
    }
    text.parse()
        .map_err(|_| Error::invalid("conv", "a mid is out of range"))
}

impl FromStr for ConvId {
    type Err = Error;

    fn from_str(text: &str) -> Result<ConvId> {
        if let Some(gid) = text.strip_prefix("g:") {
            return ConvId::group(gid);
        }
        let Some(mids) = text.strip_prefix("p:") else {
            return Err(Error::invalid(
                "conv",
                "a conversation id starts with p: (1:1) or g: (group)",
            ));
        };
        let Some((a, b)) = mids.split_once(':') else {
            return Err(Error::invalid(
                "conv",
                "a 1:1 id is p:<mid>:<mid> with decimal mids",
            ));
        };
        let (low, high) = (parse_mid(a)?, parse_mid(b)?);
        if low > high {
            return Err(Error::invalid(
                "conv",
                format!("a 1:1 id names the smaller mid first: p:{high}:{low}"),
            ));
        }
        Ok(ConvId::Peer { low, high })
    }
}

impl fmt::Display for ConvId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConvId::Peer { low, high } => write!(f, "p:{low}:{high}"),
            ConvId::Group(gid) => write!(f, "g:{gid}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn ids_parse_and_print_back() {
        for text in [
            "p:1:2",
            "p:7:7",
            "p:0:9223372036854775807",
            "g:team-1",
            "g:a.b_c",
        ] {
            let conv: ConvId = text.parse().unwrap();
            assert_eq!(conv.to_string(), text);
        }
        assert_eq!(ConvId::peer(9, 3).unwrap().to_string(), "p:3:9");
        assert!(ConvId::peer(3, 9).unwrap().is_peer_of(9));
        assert!(!ConvId::peer(3, 9).unwrap().is_peer_of(4));
        assert!(ConvId::peer(-1, 9).is_err());
    }

    #[test]
    fn malformed_ids_are_refused_naming_conv() {
        for text in [
            "",
            "x:1:2",
            "p:",
            "p:1",
            "p:2:1",
            "p:01:2",
            "p:+1:2",
            "p:-1:2",
            "p:1:2:3",
            "p:1:99999999999999999999",
            "g:",
            "g:a b",
            "g:ü",
            "g:a/b",
        ] {
            let err = text.parse::<ConvId>().unwrap_err();
            assert!(
                matches!(err, Error::Invalid { field: "conv", .. }),
                "{text:?}: {err:?}"
            );
            assert_eq!(err.code(), crate::Code::BadRequest);
        }
        let long = format!("g:{}", "a".repeat(MAX_GID_LEN + 1));
        assert!(long.parse::<ConvId>().is_err());
        let longest = format!("g:{}", "a".repeat(MAX_GID_LEN));
        assert!(longest.parse::<ConvId>().is_ok());
    }

    proptest! {
        #[test]
        fn a_peer_id_has_one_spelling(a in 0i64.., b in 0i64..) {
            let conv = ConvId::peer(a, b).unwrap();
            prop_assert_eq!(conv.to_string().parse::<ConvId>().unwrap(), conv.clone());
            prop_assert_eq!(ConvId::peer(b, a).unwrap(), conv);
        }

        #[test]
        fn parsing_never_panics(text in ".{0,80}") {
            let _ = text.parse::<ConvId>();
        }
    }
}
