//! rim-comet owns the edge server: TCP, WebSocket and WSS listeners, the
//! goim connection lifecycle (auth, heartbeat, rooms, sub/unsub), sharded
//! session buckets and rooms, the per-connection write path, and the comet
//! gRPC service the job pushes through.
//!
//! It does not authenticate or track presence itself: that is logic's, reached
//! through the `LogicApi` trait. Not built yet (issue #3): `rim comet` says so.
