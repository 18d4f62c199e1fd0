//! What a client may ask for — a room id and a set of accepted ops — and the
//! one check each goes through, whether it comes with Auth (from logic's
//! answer) or later with ChangeRoom (op 12) or Sub (op 14). A refusal says
//! why in words that go into the log and the WebSocket close reason; it never
//! quotes the client's text.

/// Longest room id a client may join, in bytes.
pub(crate) const MAX_ROOM_LEN: usize = 256;

/// Most ops one connection may accept.
pub(crate) const MAX_ACCEPTS: usize = 256;

/// Checks a room id: at most [`MAX_ROOM_LEN`] bytes, no control characters.
pub(crate) fn check_room(room: &str) -> Result<(), String> {
    if room.len() > MAX_ROOM_LEN {
        return Err(format!(
            "room id of {} bytes exceeds {MAX_ROOM_LEN}",
            room.len()
        ));
    }
    if room.chars().any(char::is_control) {
        return Err("room id contains control characters".into());
    }
    Ok(())
}

/// Parses a ChangeRoom body: empty = leave; else a UTF-8 room id that passes
/// [`check_room`].
pub(crate) fn parse_room(body: &[u8]) -> Result<Option<Box<str>>, String> {
    if body.is_empty() {
        return Ok(None);
    }
    // Checked before decoding, so a huge body is refused by its size.
    if body.len() > MAX_ROOM_LEN {
        return Err(format!(
            "room id of {} bytes exceeds {MAX_ROOM_LEN}",
            body.len()
        ));
    }
    let room = std::str::from_utf8(body).map_err(|_| "room id is not UTF-8".to_string())?;
    check_room(room)?;
    Ok(Some(room.into()))
}

/// Returns the refusal for an accepted-op set that would hold `count` ops.
pub(crate) fn too_many_accepts(count: usize) -> String {
    format!("{count} accepted ops exceed the limit of {MAX_ACCEPTS}")
}

/// Sorts and deduplicates an accepted-op set; refuses one larger than
/// [`MAX_ACCEPTS`] (after deduplication).
pub(crate) fn check_accepts(ops: &[i32]) -> Result<Vec<i32>, String> {
    let mut ops = ops.to_vec();
    ops.sort_unstable();
    ops.dedup();
    if ops.len() > MAX_ACCEPTS {
        return Err(too_many_accepts(ops.len()));
    }
    ops.shrink_to_fit();
    Ok(ops)
}

/// Parses a Sub/Unsub body: comma-separated 32-bit ops, e.g. `1000,1001`.
pub(crate) fn parse_ops(body: &[u8]) -> Result<Vec<i32>, String> {
    let text = std::str::from_utf8(body).map_err(|_| "op list is not UTF-8".to_string())?;
    text.split(',')
        .map(str::trim)
        .filter(|op| !op.is_empty())
        .enumerate()
        .map(|(at, op)| {
            op.parse::<i32>()
                .map_err(|_| format!("element {at} of the op list is not a 32-bit integer"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_lists_parse_and_garbage_is_refused() {
        assert_eq!(parse_ops(b"1000,1001").unwrap(), vec![1000, 1001]);
        assert_eq!(parse_ops(b" 7 , ,8,").unwrap(), vec![7, 8]);
        assert_eq!(parse_ops(b"").unwrap(), Vec::<i32>::new());
        assert!(parse_ops(b"1000,abc").is_err());
        assert!(parse_ops(b"99999999999").is_err());
        assert!(parse_ops(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn room_ids_are_bounded_utf8() {
        assert_eq!(parse_room(b"").unwrap(), None);
        assert_eq!(
            parse_room(b"live://1000").unwrap().as_deref(),
            Some("live://1000")
        );
        assert!(parse_room(&[b'a'; MAX_ROOM_LEN + 1]).is_err());
        assert!(parse_room(&[0xc3, 0x28]).is_err());
        assert!(parse_room(b"a\nb").is_err());
        assert!(check_room(&"a".repeat(3907)).is_err());
        assert!(check_room("live://1\u{1b}[2J").is_err());
        assert!(check_room(&"a".repeat(MAX_ROOM_LEN)).is_ok());
    }

    #[test]
    fn accepted_op_sets_are_bounded_after_deduplication() {
        assert_eq!(
            check_accepts(&[1001, 1000, 1000]).unwrap(),
            vec![1000, 1001]
        );
        let many: Vec<i32> = (0..600).collect();
        assert_eq!(
            check_accepts(&many).unwrap_err(),
            "600 accepted ops exceed the limit of 256"
        );
        let repeated: Vec<i32> = (0..600).map(|i| i % 10).collect();
        assert_eq!(check_accepts(&repeated).unwrap().len(), 10);
    }
}
