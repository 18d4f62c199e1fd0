//! The behaviour suite over the SQLite store, and what only SQLite has:
//! its pragmas and its schema version.

mod suite;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rim_im::{
    ConvId, Draft, Error, GroupSpec, IdGenerator, MessageStore, Page, Reader, SqliteOptions,
    SqliteStore, Synchronous,
};
use suite::Backend;

/// How long a store waits for a lock another connection holds: short, so
/// the blocked-writes case fails fast.
const TIMEOUT: Duration = Duration::from_millis(300);

struct Sqlite {
    dir: tempfile::TempDir,
    ids: Arc<IdGenerator>,
}

impl Sqlite {
    fn new() -> Sqlite {
        Sqlite {
            dir: tempfile::tempdir().expect("a temporary directory"),
            ids: Arc::new(IdGenerator::new(1).expect("node 1")),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("im").join("store.db")
    }

    fn options(&self) -> SqliteOptions {
        SqliteOptions {
            timeout: TIMEOUT,
            ..SqliteOptions::new(self.ids.clone())
        }
    }

    fn store(&self) -> SqliteStore {
        SqliteStore::open(&self.path(), self.options()).expect("the store opens")
    }
}

#[async_trait]
impl Backend for Sqlite {
    async fn open(&self) -> Arc<dyn MessageStore> {
        Arc::new(self.store())
    }

    async fn reopen(&self) -> Arc<dyn MessageStore> {
        Arc::new(self.store())
    }

    async fn block_writes(&self) -> Box<dyn Send> {
        let conn = rusqlite::Connection::open(self.path()).expect("a second connection");
        conn.execute_batch("BEGIN EXCLUSIVE")
            .expect("the write lock");
        Box::new(conn)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seq_is_dense_under_concurrent_senders() {
    suite::seq_is_dense_under_concurrent_senders(&Sqlite::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dedup_holds_under_concurrent_resends() {
    suite::dedup_holds_under_concurrent_resends(&Sqlite::new()).await;
}

#[tokio::test]
async fn inbox_sync_is_dense_per_user() {
    suite::inbox_sync_is_dense_per_user(&Sqlite::new()).await;
}

#[tokio::test]
async fn retention_cap_keeps_the_newest_and_reads_below_say_reset() {
    suite::retention_cap_keeps_the_newest_and_reads_below_say_reset(&Sqlite::new()).await;
}

#[tokio::test]
async fn retention_by_age_removes_what_is_older() {
    suite::retention_by_age_removes_what_is_older(&Sqlite::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_pages_both_ways_with_clamps() {
    suite::history_pages_both_ways_with_clamps(&Sqlite::new()).await;
}

#[tokio::test]
async fn read_position_is_monotonic() {
    suite::read_position_is_monotonic(&Sqlite::new()).await;
}

#[tokio::test]
async fn conversations_list_most_recent_first() {
    suite::conversations_list_most_recent_first(&Sqlite::new()).await;
}

#[tokio::test]
async fn membership_add_remove_and_limits() {
    suite::membership_add_remove_and_limits(&Sqlite::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_error_is_code_5_and_stores_nothing() {
    suite::a_store_error_is_code_5_and_stores_nothing(&Sqlite::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sends_share_commits() {
    let commits = suite::concurrent_sends_share_commits(&Sqlite::new()).await;
    eprintln!("sqlite: 1000 concurrent sends (50 senders x 20) took {commits} commits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn big_group_sends_write_no_inbox_entries() {
    suite::big_group_sends_write_no_inbox_entries(&Sqlite::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn big_group_dedup_refusals_reads_and_members() {
    suite::big_group_dedup_refusals_reads_and_members(&Sqlite::new()).await;
}

#[tokio::test]
async fn big_mode_is_sticky_and_big_groups_lists_a_users() {
    suite::big_mode_is_sticky_and_big_groups_lists_a_users(&Sqlite::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_batches_give_each_conversation_its_inbox_entries() {
    suite::mixed_batches_give_each_conversation_its_inbox_entries(&Sqlite::new()).await;
}

#[tokio::test]
async fn acknowledged_writes_survive_a_reopen() {
    suite::acknowledged_writes_survive_a_reopen(&Sqlite::new()).await;
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let backend = Sqlite::new();
    drop(backend.store());
    let conn = rusqlite::Connection::open(backend.path()).expect("a connection");
    conn.pragma_update(None, "user_version", 4)
        .expect("user_version set");
    drop(conn);
    let err = SqliteStore::open(&backend.path(), backend.options()).expect_err("refused");
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("schema version 4") && text.contains("version 3"),
        "names both versions: {text}"
    );
}

#[tokio::test]
async fn a_version_1_file_gets_the_retention_floors_and_keeps_its_rows() {
    let backend = Sqlite::new();
    let pair = ConvId::peer(1, 2).unwrap();
    {
        let store = backend.store();
        for i in 0..3 {
            let draft = Draft::new(pair.clone(), 1, format!("m{i}"), 0, "x".into(), 4000);
            store.send(draft.unwrap()).await.unwrap();
        }
    }
    // Back to what version 1 wrote: no floors, no big groups.
    let conn = rusqlite::Connection::open(backend.path()).expect("a connection");
    conn.execute_batch(
        "ALTER TABLE convs DROP COLUMN min_seq; ALTER TABLE users DROP COLUMN min_sync; \
         ALTER TABLE groups DROP COLUMN big; PRAGMA user_version = 1;",
    )
    .expect("back to version 1");
    drop(conn);
    let store = backend.store();
    let page = store
        .pull(&pair, Reader::Business, Page::After(0), 10)
        .await
        .unwrap();
    assert_eq!((page.min_seq, page.max_seq, page.messages.len()), (1, 3, 3));
    let synced = store.sync(2, 0, 10).await.unwrap();
    assert_eq!((synced.reset, synced.entries.len()), (false, 3));
    let conn = rusqlite::Connection::open(backend.path()).expect("a connection");
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .unwrap();
    assert_eq!(version, 3);
}

#[tokio::test]
async fn a_version_2_file_gets_big_groups_and_keeps_its_groups_small() {
    let backend = Sqlite::new();
    let team = ConvId::group("team").unwrap();
    {
        let store = backend.store();
        let spec = GroupSpec {
            name: "Team".into(),
            max_members: 10,
            big: false,
        };
        store.put_group(&team, spec).await.unwrap();
        store.change_members(&team, &[1, 2], &[]).await.unwrap();
        let draft = Draft::new(team.clone(), 1, "a".into(), 0, "x".into(), 4000);
        store.send(draft.unwrap()).await.unwrap();
    }
    // Back to what version 2 wrote: no big column.
    let conn = rusqlite::Connection::open(backend.path()).expect("a connection");
    conn.execute_batch("ALTER TABLE groups DROP COLUMN big; PRAGMA user_version = 2;")
        .expect("back to version 2");
    drop(conn);
    let store = backend.store();
    let group = store.group(&team).await.unwrap();
    assert_eq!(
        (group.name.as_str(), group.members, group.big),
        ("Team", 2, false)
    );
    assert!(store.big_groups(1, 0).await.unwrap().is_empty());
    // Its messages and inbox entries are there, and new sends still write
    // inbox entries.
    assert_eq!(store.sync(2, 0, 10).await.unwrap().entries.len(), 1);
    let draft = Draft::new(team.clone(), 2, "b".into(), 0, "x".into(), 4000);
    let sent = store.send(draft.unwrap()).await.unwrap();
    assert_eq!(
        (sent.message.seq, sent.big, sent.inbox.len()),
        (2, false, 2)
    );
    // And it can become big.
    let spec = GroupSpec {
        name: "Team".into(),
        max_members: 10_000,
        big: true,
    };
    assert!(store.put_group(&team, spec).await.unwrap().big);
    assert_eq!(store.big_groups(1, 0).await.unwrap(), vec![team.clone()]);
    let conn = rusqlite::Connection::open(backend.path()).expect("a connection");
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .unwrap();
    assert_eq!(version, 3);
}

#[tokio::test]
async fn the_file_is_wal_and_full_by_default_normal_when_asked() {
    let backend = Sqlite::new();
    let store = backend.store();
    assert_eq!(store.pragmas().journal_mode, "wal");
    assert_eq!(store.pragmas().synchronous, Synchronous::Full);
    drop(store);
    // WAL is a property of the file: a fresh connection sees it.
    let conn = rusqlite::Connection::open(backend.path()).expect("a connection");
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .expect("journal mode");
    assert_eq!(mode, "wal");
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .expect("user_version");
    assert_eq!(version, 3);

    let normal = SqliteStore::open(
        &backend.path(),
        SqliteOptions {
            synchronous: Synchronous::Normal,
            ..backend.options()
        },
    )
    .expect("opens");
    assert_eq!(normal.pragmas().synchronous, Synchronous::Normal);
}

#[tokio::test]
async fn ids_increase_with_seq_and_ts_is_the_ids_time() {
    let backend = Sqlite::new();
    let store = backend.store();
    let c = ConvId::peer(1, 2).expect("conv");
    for i in 0..50 {
        let draft = rim_im::Draft::new(c.clone(), 1 + i % 2, format!("c{i}"), 0, "x".into(), 4000)
            .expect("draft");
        store.send(draft).await.expect("sent");
    }
    let page = store
        .pull(&c, Reader::Business, Page::After(0), 100)
        .await
        .expect("pull");
    assert_eq!(page.messages.len(), 50);
    for pair in page.messages.windows(2) {
        assert!(pair[0].id < pair[1].id, "ids follow seqs");
    }
    for m in &page.messages {
        assert_eq!(m.ts, m.id.unix_ms() as i64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_on_while_writes_are_blocked() {
    let backend = Sqlite::new();
    let store = backend.store();
    let c = ConvId::peer(1, 2).expect("conv");
    let draft = rim_im::Draft::new(c.clone(), 1, "a".into(), 0, "x".into(), 4000).expect("draft");
    store.send(draft).await.expect("sent");

    let guard = backend.block_writes().await;
    let page = store
        .pull(&c, Reader::Member(2), Page::Latest, 0)
        .await
        .expect("a read beside a writer (WAL)");
    assert_eq!(page.max_seq, 1);
    assert_eq!(store.sync(2, 0, 0).await.expect("sync").entries.len(), 1);
    let draft = rim_im::Draft::new(c.clone(), 1, "b".into(), 0, "x".into(), 4000).expect("draft");
    assert!(matches!(
        store.send(draft).await,
        Err(Error::Unavailable(_))
    ));
    drop(guard);
}
