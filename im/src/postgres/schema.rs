//! The store's schema and its versioned migrations, applied at startup.
//!
//! `rim_im_schema` holds one row per applied version. The migrations run
//! in one transaction under an advisory lock keyed by the current schema,
//! so several rim processes starting at once apply each version exactly
//! once; a database whose version is newer than this code knows is
//! refused rather than written with the wrong layout.

use crate::error::{Error, Result, StoreFailure};

use super::{Shared, db, get};

/// Every migration, in version order; a version is never edited once
/// shipped, only followed by a new one.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE convs (
        conv TEXT PRIMARY KEY,
        max_seq BIGINT NOT NULL,
        last_ts BIGINT NOT NULL
    );
    CREATE TABLE groups (
        conv TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        max_members INT NOT NULL,
        members INT NOT NULL,
        created_ts BIGINT NOT NULL
    );
    CREATE TABLE members (
        conv TEXT NOT NULL,
        mid BIGINT NOT NULL,
        read_seq BIGINT NOT NULL,
        PRIMARY KEY (conv, mid)
    );
    CREATE INDEX members_by_mid ON members (mid, conv);
    CREATE TABLE messages (
        conv TEXT NOT NULL,
        seq BIGINT NOT NULL,
        id BIGINT NOT NULL,
        sender BIGINT NOT NULL,
        cmid TEXT NOT NULL,
        kind INT NOT NULL,
        body TEXT NOT NULL,
        ts BIGINT NOT NULL,
        PRIMARY KEY (conv, seq),
        UNIQUE (conv, sender, cmid),
        UNIQUE (id)
    );
    CREATE TABLE users (
        mid BIGINT PRIMARY KEY,
        max_sync BIGINT NOT NULL
    );
    CREATE TABLE inbox (
        mid BIGINT NOT NULL,
        sync BIGINT NOT NULL,
        conv TEXT NOT NULL,
        seq BIGINT NOT NULL,
        PRIMARY KEY (mid, sync)
    );",
    ),
    // Retention: each conversation's and each user's oldest retained
    // position (everything below it was pruned).
    (
        2,
        "ALTER TABLE convs ADD COLUMN min_seq BIGINT NOT NULL DEFAULT 1;
    ALTER TABLE users ADD COLUMN min_sync BIGINT NOT NULL DEFAULT 1;",
    ),
    // Big groups (read diffusion): a group's mode, never set back to
    // false; and a user's group memberships in conversation byte order,
    // the path of `big_groups` (pairs, most of `members`, stay out of it).
    (
        3,
        "ALTER TABLE groups ADD COLUMN big BOOLEAN NOT NULL DEFAULT false;
    CREATE INDEX members_groups_by_mid ON members (mid, conv COLLATE \"C\")
        WHERE conv LIKE 'g:%';",
    ),
    // Sharding: inbox entries whose message lives on another primary. The
    // message's primary keeps the members still to append in its outbox,
    // one row per message (written with the message); the members' primary
    // records each late append under its key, so a repeated append finds
    // it and adds nothing.
    (
        4,
        "CREATE TABLE inbox_outbox (
        conv TEXT NOT NULL,
        seq BIGINT NOT NULL,
        mids BIGINT[] NOT NULL,
        at BIGINT NOT NULL,
        PRIMARY KEY (conv, seq)
    );
    CREATE INDEX inbox_outbox_by_at ON inbox_outbox (at);
    CREATE TABLE inbox_remote (
        mid BIGINT NOT NULL,
        conv TEXT NOT NULL,
        seq BIGINT NOT NULL,
        sync BIGINT NOT NULL,
        PRIMARY KEY (mid, conv, seq)
    );",
    ),
];

/// The schema version this code writes.
pub(super) fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |(version, _)| *version)
}

/// Brings the database's schema to [`latest`], or refuses a newer one.
pub(super) async fn migrate(shared: &Shared) -> Result<()> {
    with_client!(shared, "migrating the schema", |client| {
        let tx = client
            .transaction()
            .await
            .map_err(db("starting the schema migration"))?;
        // Keyed by schema: stores in different schemas of one database do
        // not wait for each other.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('rim_im_schema ' || coalesce(current_schema(), '')))",
            &[],
        )
        .await
        .map_err(db("waiting for the schema migration lock"))?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS rim_im_schema (version INT NOT NULL)")
            .await
            .map_err(db("creating the schema version table"))?;
        let row = tx
            .query_one("SELECT coalesce(max(version), 0) FROM rim_im_schema", &[])
            .await
            .map_err(db("reading the schema version"))?;
        let current: i32 = get(&row, 0)?;
        let latest = latest();
        if current > latest {
            return Err(Error::Unavailable(StoreFailure::bare(format!(
                "the database's schema is version {current}, newer than this rim knows \
                 (version {latest}): run a rim that knows it"
            ))));
        }
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            tx.batch_execute(sql)
                .await
                .map_err(|e| Error::unavailable(format!("applying schema version {version}"), e))?;
            tx.execute(
                "INSERT INTO rim_im_schema (version) VALUES ($1)",
                &[version],
            )
            .await
            .map_err(db("recording the schema version"))?;
        }
        tx.commit()
            .await
            .map_err(db("committing the schema migration"))?;
        Ok(())
    })
}
