//! rim-router owns the online map: user id (mid) -> connection key -> comet
//! server id, the reverse key -> server, leases, and per-comet room counts,
//! behind one trait with an in-memory and a Redis backend.
//!
//! It does not decide who may connect (rim-logic). Not built yet (issue #4).
