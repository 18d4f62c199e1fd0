//! rim-job owns delivery from the queue to the comets: consuming PushMsg,
//! per-room aggregation into op-9 batches, per-comet clients with retries and
//! breakers, and at-least-once offset commits.
//!
//! It does not plan pushes (rim-api). Not built yet (issue #5): `rim job`
//! says so.
