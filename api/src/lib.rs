//! rim-api owns the HTTP API on port 3111: the goim-compatible push and
//! online endpoints, push planning (router lookup, keys grouped by comet, one
//! queue message per comet), and the admin endpoints.
//!
//! It does not deliver messages (rim-job) nor keep presence (rim-logic).
//! Not built yet (issue #4).
