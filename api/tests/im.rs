//! The IM endpoints /im/v1/*, black box, against a real SQLite message
//! store in a temporary directory, logic's IM service, the in-memory router
//! and the in-memory queue: every endpoint's answer as exact JSON, what a
//! send queues for connected devices, and every refusal (status, im.md
//! code, the parameter it names).

mod support;

use rim_proto::Op;
use rim_queue::PushType;
use serde_json::{Value, json};
use support::{Answer, Harness, Setup, TOKEN};

const IM_TOKEN: &str = "s3cret-im-token";

async fn im() -> Harness {
    Setup::new().im_store().start().await
}

async fn put(h: &Harness, path: &str, body: Value) -> Answer {
    h.send(h.http.put(h.url(path)).body(body.to_string())).await
}

async fn post(h: &Harness, path: &str, body: Value) -> Answer {
    h.post(path, body.to_string()).await
}

/// Sends `body` as user `from` to user `to` with `cmid`; returns the data.
async fn send_peer(h: &Harness, from: i64, to: i64, cmid: &str, body: &str) -> Value {
    let answer = post(
        h,
        "/im/v1/messages",
        json!({ "from": from, "to": to, "cmid": cmid, "type": 0, "body": body }),
    )
    .await;
    answer.ok().clone()
}

/// The JSON a client sees for a message: the send's answer plus the fields
/// the request gave (and `sync` for an inbox entry).
fn message(sent: &Value, from: i64, cmid: &str, body: &str, sync: Option<u64>) -> Value {
    let mut msg = json!({
        "conv": sent["conv"], "seq": sent["seq"], "id": sent["id"], "from": from,
        "cmid": cmid, "type": 0, "body": body, "ts": sent["ts"],
    });
    if let Some(sync) = sync {
        msg["sync"] = json!(sync);
    }
    msg
}

/// Asserts an /im/v1 refusal: HTTP `status`, im.md `code`, a message
/// naming every one of `words`.
#[track_caller]
fn refused(answer: &Answer, status: u16, code: i64, words: &[&str]) {
    answer.error(status, code, words);
}

// ---------------------------------------------------------------------------
// Messages, inboxes, history
// ---------------------------------------------------------------------------

/// A send answers `{conv, seq, id, ts}` (id a decimal string); a resend of
/// the same cmid answers the first send and stores nothing; both users'
/// inboxes hold it at sync 1, in SYNC_REPLY's shape.
#[tokio::test]
async fn a_send_answers_its_seq_and_the_recipient_syncs_it() {
    let h = im().await;
    let sent = send_peer(&h, 1, 2, "c-1", "hello").await;
    let object = sent.as_object().expect("an object");
    assert_eq!(
        object.keys().map(String::as_str).collect::<Vec<_>>(),
        ["conv", "id", "seq", "ts"],
        "{sent}"
    );
    assert_eq!((&sent["conv"], &sent["seq"]), (&json!("p:1:2"), &json!(1)));
    let id = sent["id"].as_str().expect("id is a string");
    assert!(id.parse::<u64>().is_ok_and(|id| id > 0), "{id}");
    assert!(sent["ts"].as_i64().is_some_and(|ts| ts > 0), "{sent}");

    assert_eq!(send_peer(&h, 1, 2, "c-1", "hello").await, sent, "a resend");

    for user in [2, 1] {
        let inbox = h.get(&format!("/im/v1/users/{user}/sync")).await;
        assert_eq!(
            inbox.ok(),
            &json!({
                "msgs": [message(&sent, 1, "c-1", "hello", Some(1))],
                "sync": 1, "more": false, "reset": false,
            }),
            "user {user}"
        );
    }
    let after = h.get("/im/v1/users/2/sync?since=1").await;
    assert_eq!(
        after.ok(),
        &json!({ "msgs": [], "sync": 1, "more": false, "reset": false })
    );
    // A page smaller than the inbox says there is more.
    send_peer(&h, 2, 1, "c-2", "back").await;
    let first = h.get("/im/v1/users/1/sync?since=0&limit=1").await;
    assert_eq!(first.ok()["sync"], 1);
    assert_eq!(first.ok()["more"], true);
}

/// A send through the API queues MSG (op 21) with the recipient's inbox
/// sync to the recipient's connection, as a PUSH to its comet.
#[tokio::test]
async fn a_send_queues_msg_for_a_connected_recipient() {
    let mut h = im().await;
    let ops = [Op::IM_MSG.0, Op::IM_NOTIFY.0];
    h.connect_accepting("comet-a", 2, "k2", &ops).await;
    let sent = send_peer(&h, 1, 2, "c-1", "hello").await;
    let pushed = h.next_enqueued().await;
    assert_eq!(pushed.r#type, PushType::Push as i32);
    assert_eq!(pushed.operation, 21);
    assert_eq!(
        (pushed.server.as_str(), pushed.keys.clone()),
        ("comet-a", vec!["k2".to_string()])
    );
    let body: Value = serde_json::from_slice(&pushed.msg).expect("a JSON body");
    assert_eq!(body, message(&sent, 1, "c-1", "hello", Some(1)));
    // The sender has no connection: nothing else is queued.
    assert!(h.drain().await.is_empty());
}

/// History pages: newest first with `before` or neither, oldest first with
/// `after`, `limit` honoured, in PULL_REPLY's shape without `sync`.
#[tokio::test]
async fn history_pages_go_both_ways() {
    let h = im().await;
    let mut sent = Vec::new();
    for n in 1..=3 {
        sent.push(send_peer(&h, 1, 2, &format!("c-{n}"), &format!("m{n}")).await);
    }
    let msg = |n: usize| message(&sent[n - 1], 1, &format!("c-{n}"), &format!("m{n}"), None);
    let page = |msgs: Vec<Value>| json!({ "conv": "p:1:2", "msgs": msgs, "max_seq": 3, "min_seq": 1, "reset": false });
    let path = "/im/v1/conversations/p:1:2/messages";
    assert_eq!(h.get(path).await.ok(), &page(vec![msg(3), msg(2), msg(1)]));
    assert_eq!(
        h.get(&format!("{path}?limit=2")).await.ok(),
        &page(vec![msg(3), msg(2)])
    );
    assert_eq!(
        h.get(&format!("{path}?before=3&limit=5")).await.ok(),
        &page(vec![msg(2), msg(1)])
    );
    assert_eq!(
        h.get(&format!("{path}?after=1")).await.ok(),
        &page(vec![msg(2), msg(3)])
    );
    // A conversation without messages is an empty page.
    assert_eq!(
        h.get("/im/v1/conversations/p:5:6/messages").await.ok(),
        &json!({ "conv": "p:5:6", "msgs": [], "max_seq": 0, "min_seq": 1, "reset": false })
    );
    // Request metrics are labelled by the route, not by the conversation.
    let metrics = h.get("/metrics").await.raw;
    assert!(
        metrics.contains("endpoint=\"/im/v1/conversations/{conv}/messages\""),
        "{metrics}"
    );
    assert!(!metrics.contains("p:5:6"), "{metrics}");
}

/// The conversation list, most recent first, with read positions, unread
/// counts and the last message (null when there is none).
#[tokio::test]
async fn conversations_list_the_most_recent_first() {
    let h = im().await;
    send_peer(&h, 1, 2, "c-1", "one").await;
    let last_peer = send_peer(&h, 2, 1, "c-2", "two").await;
    put(&h, "/im/v1/groups/team", json!({ "name": "Team" }))
        .await
        .ok();
    post(&h, "/im/v1/groups/team/members", json!({ "add": [1, 5] }))
        .await
        .ok();
    let in_group = post(
        &h,
        "/im/v1/messages",
        json!({ "from": 5, "conv": "g:team", "cmid": "g-1", "body": "hi all" }),
    )
    .await;
    let in_group = in_group.ok().clone();

    let list = h.get("/im/v1/users/1/conversations").await;
    assert_eq!(
        list.ok(),
        &json!([
            { "conv": "g:team", "max_seq": 1, "read_seq": 0, "unread": 1,
              "last": message(&in_group, 5, "g-1", "hi all", None) },
            { "conv": "p:1:2", "max_seq": 2, "read_seq": 1, "unread": 1,
              "last": message(&last_peer, 2, "c-2", "two", None) },
        ])
    );
    let limited = h.get("/im/v1/users/1/conversations?limit=1").await;
    assert_eq!(limited.ok().as_array().map(Vec::len), Some(1));
    // A new group without messages lists with `last: null`.
    put(&h, "/im/v1/groups/quiet", json!({ "name": "" }))
        .await
        .ok();
    post(&h, "/im/v1/groups/quiet/members", json!({ "add": [9] }))
        .await
        .ok();
    assert_eq!(
        h.get("/im/v1/users/9/conversations").await.ok(),
        &json!([{ "conv": "g:quiet", "max_seq": 0, "read_seq": 0, "unread": 0, "last": null }])
    );
}

/// A read moves the position (never back) and tells every device of the
/// user (NOTIFY read, op 27): the API is none of them.
#[tokio::test]
async fn a_read_moves_the_position_and_notifies_the_users_devices() {
    let mut h = im().await;
    for n in 1..=3 {
        send_peer(&h, 1, 2, &format!("c-{n}"), "x").await;
    }
    h.connect_accepting("comet-b", 2, "k2", &[Op::IM_MSG.0, Op::IM_NOTIFY.0])
        .await;
    let path = "/im/v1/conversations/p:1:2/read";
    let answer = post(&h, path, json!({ "mid": 2, "seq": 2 })).await;
    assert_eq!(answer.ok(), &json!({ "read_seq": 2, "max_seq": 3 }));
    let pushed = h.next_enqueued().await;
    assert_eq!(
        (
            pushed.operation,
            pushed.server.as_str(),
            pushed.keys.clone()
        ),
        (27, "comet-b", vec!["k2".to_string()])
    );
    let body: Value = serde_json::from_slice(&pushed.msg).expect("a JSON body");
    assert_eq!(body, json!({ "kind": "read", "conv": "p:1:2", "seq": 2 }));
    // Monotonic: an older seq leaves it, and notifies nobody.
    let back = post(&h, path, json!({ "mid": 2, "seq": 1 })).await;
    assert_eq!(back.ok(), &json!({ "read_seq": 2, "max_seq": 3 }));
    assert!(h.drain().await.is_empty());
    let list = h.get("/im/v1/users/2/conversations").await;
    assert_eq!(list.ok()[0]["unread"], 1);
    // A non-member cannot read.
    let stranger = post(&h, path, json!({ "mid": 7, "seq": 1 })).await;
    refused(&stranger, 403, 2, &["7", "p:1:2"]);
}

// ---------------------------------------------------------------------------
// Groups
// ---------------------------------------------------------------------------

/// Group settings, members, paged listing, member and system sends, and
/// the group's limits: full (409, code 4), above im.max_group_members (413,
/// code 4), unknown (404, code 2); above im.big_group_members a group is
/// big (read diffusion: no inbox entries), for good.
#[tokio::test]
async fn groups_are_created_filled_paged_and_bounded() {
    let h = Setup::new()
        .im_store()
        .im(|im| {
            im.big_group_members = 10;
            im.max_group_members = 20;
        })
        .start()
        .await;
    let created = put(
        &h,
        "/im/v1/groups/team",
        json!({ "name": "Team", "max_members": 3 }),
    )
    .await;
    assert_eq!(
        created.ok(),
        &json!({ "gid": "team", "conv": "g:team", "name": "Team", "max_members": 3,
                 "members": 0, "big": false, "created": true })
    );
    let renamed = put(
        &h,
        "/im/v1/groups/team",
        json!({ "name": "Team 2", "max_members": 3 }),
    )
    .await;
    assert_eq!(renamed.ok()["created"], false);
    assert_eq!(renamed.ok()["name"], "Team 2");

    let path = "/im/v1/groups/team/members";
    let added = post(&h, path, json!({ "add": [3, 1, 2, 2] })).await;
    assert_eq!(
        added.ok(),
        &json!({ "added": [1, 2, 3], "removed": [], "members": 3 })
    );
    let full = post(&h, path, json!({ "add": [4] })).await;
    refused(&full, 409, 4, &["g:team", "4 members", "limit of 3"]);
    let swapped = post(&h, path, json!({ "add": [4], "remove": [3, 8] })).await;
    assert_eq!(
        swapped.ok(),
        &json!({ "added": [4], "removed": [3], "members": 3 })
    );
    assert_eq!(
        h.get("/im/v1/groups/team").await.ok(),
        &json!({ "gid": "team", "conv": "g:team", "name": "Team 2", "max_members": 3, "members": 3,
                 "big": false })
    );
    assert_eq!(
        h.get(&format!("{path}?limit=2")).await.ok(),
        &json!({ "mids": [1, 2], "next": 2 })
    );
    assert_eq!(
        h.get(&format!("{path}?cursor=2&limit=2")).await.ok(),
        &json!({ "mids": [4], "next": null })
    );

    // A member sends; a non-member is refused; a system send passes.
    let send = |from: i64, cmid: &str, system: bool| json!({ "from": from, "conv": "g:team", "cmid": cmid, "body": "x", "system": system });
    let by_member = post(&h, "/im/v1/messages", send(1, "a", false)).await;
    assert_eq!(by_member.ok()["seq"], 1);
    let by_stranger = post(&h, "/im/v1/messages", send(9, "b", false)).await;
    refused(&by_stranger, 403, 2, &["9 is not a member of g:team"]);
    let by_system = post(&h, "/im/v1/messages", send(9, "b", true)).await;
    assert_eq!(by_system.ok()["seq"], 2);
    let inbox = h.get("/im/v1/users/4/sync").await;
    assert_eq!(inbox.ok()["sync"], 2, "members get system sends");

    // Limits and unknown groups.
    let huge = put(
        &h,
        "/im/v1/groups/big",
        json!({ "name": "Big", "max_members": 21 }),
    )
    .await;
    refused(
        &huge,
        413,
        4,
        &["\"max_members\"", "im.max_group_members (20)"],
    );
    let defaulted = put(&h, "/im/v1/groups/big", json!({ "name": "Big" })).await;
    assert_eq!(defaulted.ok()["max_members"], 10, "im.big_group_members");
    assert_eq!(defaulted.ok()["big"], false);
    let big = put(
        &h,
        "/im/v1/groups/big",
        json!({ "name": "Big", "max_members": 11 }),
    )
    .await;
    assert_eq!(big.ok()["big"], true);
    let added = post(&h, "/im/v1/groups/big/members", json!({ "add": [1, 8] })).await;
    assert_eq!(added.ok()["members"], 2);
    let to_big = post(
        &h,
        "/im/v1/messages",
        json!({ "from": 1, "conv": "g:big", "cmid": "b1", "body": "x" }),
    )
    .await;
    assert_eq!(to_big.ok()["seq"], 1);
    // Read diffusion: no inbox entry, but the conversation list shows it.
    assert_eq!(h.get("/im/v1/users/8/sync").await.ok()["msgs"], json!([]));
    let listed = h.get("/im/v1/users/8/conversations").await;
    let line = listed
        .ok()
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["conv"] == "g:big")
        .cloned();
    assert_eq!(
        line.map(|c| (c["max_seq"].clone(), c["unread"].clone())),
        Some((json!(1), json!(1)))
    );
    // Lowering max_members keeps it big.
    let lowered = put(
        &h,
        "/im/v1/groups/big",
        json!({ "name": "Big", "max_members": 5 }),
    )
    .await;
    assert_eq!(lowered.ok()["big"], true, "a big group stays big");
    let empty = put(
        &h,
        "/im/v1/groups/none",
        json!({ "name": "x", "max_members": 0 }),
    )
    .await;
    refused(&empty, 400, 1, &["\"max_members\""]);
    refused(
        &h.get("/im/v1/groups/nope").await,
        404,
        2,
        &["no group g:nope"],
    );
    refused(
        &h.get("/im/v1/groups/nope/members").await,
        404,
        2,
        &["g:nope"],
    );
    let add = post(&h, "/im/v1/groups/nope/members", json!({ "add": [1] })).await;
    refused(&add, 404, 2, &["g:nope"]);
    let system = post(
        &h,
        "/im/v1/messages",
        json!({ "from": 9, "conv": "g:nope", "cmid": "s", "system": true }),
    )
    .await;
    refused(&system, 404, 2, &["g:nope"]);
}

// ---------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------

/// Every malformed request gets 400 with code 1 naming its parameter or
/// field, and stores nothing.
#[tokio::test]
async fn malformed_requests_name_their_parameter() {
    let h = im().await;
    let send = |body: Value| post(&h, "/im/v1/messages", body);
    let cases = [
        (json!({ "from": 1, "to": 2, "body": "x" }), "`cmid`"),
        (json!({ "from": 1, "to": 2, "cmid": "" }), "cmid"),
        (json!({ "from": "one", "to": 2, "cmid": "c" }), "\"from\""),
        (json!({ "from": -1, "to": 2, "cmid": "c" }), "\"from\""),
        (json!({ "from": 1, "to": -2, "cmid": "c" }), "\"to\""),
        (json!({ "from": 1, "conv": "x:1", "cmid": "c" }), "conv"),
        (json!({ "from": 1, "conv": "p:2:1", "cmid": "c" }), "conv"),
        (json!({ "from": 1, "cmid": "c" }), "\"to\""),
        (
            json!({ "from": 1, "to": 2, "conv": "p:1:2", "cmid": "c" }),
            "\"conv\"",
        ),
        (
            json!({ "from": 1, "to": 2, "cmid": "c", "sytem": true }),
            "`sytem`",
        ),
        (
            json!({ "from": 1, "to": 2, "cmid": "c", "type": "text" }),
            "\"type\"",
        ),
    ];
    for (body, word) in cases {
        let answer = send(body.clone()).await;
        assert_eq!(answer.status, 400, "{body}: {answer:?}");
        refused(&answer, 400, 1, &[word]);
    }
    refused(
        &h.post("/im/v1/messages", "{not json").await,
        400,
        1,
        &["JSON"],
    );
    refused(
        &h.post("/im/v1/messages", r#"{"from":1,"to":2,"cmid":"c"} 7"#)
            .await,
        400,
        1,
        &["trailing"],
    );

    let history = "/im/v1/conversations/p:1:2/messages";
    let both = h.get(&format!("{history}?before=3&after=1")).await;
    refused(&both, 400, 1, &["\"before\"", "\"after\""]);
    refused(
        &h.get(&format!("{history}?before=x")).await,
        400,
        1,
        &["\"before\""],
    );
    refused(
        &h.get(&format!("{history}?limit=-1")).await,
        400,
        1,
        &["\"limit\""],
    );
    refused(
        &h.get("/im/v1/conversations/p:2:1/messages").await,
        400,
        1,
        &["conv"],
    );
    refused(
        &h.get("/im/v1/conversations/nope/messages").await,
        400,
        1,
        &["conv"],
    );
    let read = post(
        &h,
        "/im/v1/conversations/g:a%20b/read",
        json!({ "mid": 1, "seq": 1 }),
    )
    .await;
    refused(&read, 400, 1, &["conv"]);
    let no_seq = post(&h, "/im/v1/conversations/p:1:2/read", json!({ "mid": 1 })).await;
    refused(&no_seq, 400, 1, &["`seq`"]);
    refused(&h.get("/im/v1/users/x/sync").await, 400, 1, &["\"mid\""]);
    refused(
        &h.get("/im/v1/users/%FF/sync").await,
        400,
        1,
        &["invalid path"],
    );
    refused(
        &h.get("/im/v1/users/-3/conversations").await,
        400,
        1,
        &["\"mid\""],
    );
    refused(
        &h.get("/im/v1/users/1/sync?since=-1").await,
        400,
        1,
        &["\"since\""],
    );
    let gid = put(&h, "/im/v1/groups/a%20b", json!({ "name": "x" })).await;
    refused(&gid, 400, 1, &["\"gid\""]);
    put(&h, "/im/v1/groups/team", json!({ "name": "x" }))
        .await
        .ok();
    let nothing = post(&h, "/im/v1/groups/team/members", json!({})).await;
    refused(&nothing, 400, 1, &["\"add\"", "\"remove\""]);
    let negative = post(&h, "/im/v1/groups/team/members", json!({ "remove": [-1] })).await;
    refused(&negative, 400, 1, &["\"remove\""]);
    refused(
        &h.get("/im/v1/groups/team/members?cursor=z").await,
        400,
        1,
        &["\"cursor\""],
    );
    let long = put(&h, "/im/v1/groups/team", json!({ "name": "n".repeat(257) })).await;
    refused(&long, 400, 1, &["\"name\""]);

    let stored = h.get("/im/v1/users/1/sync").await;
    assert_eq!(stored.ok()["msgs"], json!([]), "a refused send was stored");
}

/// A message body over `im.max_body` is 413 with code 4 naming `body`; a
/// request over `api.max_body` is 413 before it is parsed.
#[tokio::test]
async fn bodies_over_their_limits_are_refused() {
    let h = Setup::new()
        .im_store()
        .im(|im| im.max_body = 10)
        .max_body(256)
        .start()
        .await;
    let fits = post(
        &h,
        "/im/v1/messages",
        json!({ "from": 1, "to": 2, "cmid": "c-1", "body": "0123456789" }),
    )
    .await;
    assert_eq!(fits.ok()["seq"], 1);
    let big = post(
        &h,
        "/im/v1/messages",
        json!({ "from": 1, "to": 2, "cmid": "c-2", "body": "0123456789a" }),
    )
    .await;
    refused(&big, 413, 4, &["body is 11 bytes", "limit of 10"]);
    let huge = post(
        &h,
        "/im/v1/messages",
        json!({ "from": 1, "to": 2, "cmid": "c-3", "body": "x".repeat(300) }),
    )
    .await;
    refused(&huge, 413, 4, &["exceeds 256 bytes"]);
    let history = h.get("/im/v1/conversations/p:1:2/messages").await;
    assert_eq!(history.ok()["max_seq"], 1);
}

/// With `im.api_token` set, /im/v1 needs it (401, code 2) and the admin
/// token does not open it; unset, `api.admin_token` guards it.
#[tokio::test]
async fn the_im_token_guards_and_the_admin_token_is_the_fallback() {
    let h = Setup::new()
        .im_store()
        .admin_token()
        .im(|im| im.api_token = Some(IM_TOKEN.into()))
        .start()
        .await;
    let url = h.url("/im/v1/users/1/sync");
    refused(
        &h.get("/im/v1/users/1/sync").await,
        401,
        2,
        &["Authorization: Bearer"],
    );
    let admin = h.send(h.http.get(&url).bearer_auth(TOKEN)).await;
    refused(&admin, 401, 2, &["does not match"]);
    let body = json!({ "from": 1, "to": 2, "cmid": "c" }).to_string();
    let send = h.http.post(h.url("/im/v1/messages")).body(body.clone());
    refused(&h.send(send).await, 401, 2, &[]);
    assert_eq!(
        h.send(h.http.get(&url).bearer_auth(IM_TOKEN)).await.ok()["sync"],
        0
    );
    let send = h
        .http
        .post(h.url("/im/v1/messages"))
        .bearer_auth(IM_TOKEN)
        .body(body);
    assert_eq!(h.send(send).await.ok()["seq"], 1);

    let fallback = Setup::new().im_store().admin_token().start().await;
    let url = fallback.url("/im/v1/users/1/sync");
    refused(
        &fallback.get("/im/v1/users/1/sync").await,
        401,
        2,
        &["Authorization"],
    );
    let wrong = fallback.http.get(&url).bearer_auth(IM_TOKEN);
    refused(&fallback.send(wrong).await, 401, 2, &[]);
    let admin = fallback.http.get(&url).bearer_auth(TOKEN);
    assert_eq!(fallback.send(admin).await.ok()["msgs"], json!([]));
}

/// Without a message store every endpoint is 404 saying im.store is off.
#[tokio::test]
async fn every_endpoint_is_404_when_im_is_off() {
    let h = Setup::new().start().await;
    let message = json!({ "from": 1, "to": 2, "cmid": "c" });
    let answers = [
        post(&h, "/im/v1/messages", message).await,
        h.get("/im/v1/conversations/p:1:2/messages").await,
        post(
            &h,
            "/im/v1/conversations/p:1:2/read",
            json!({ "mid": 1, "seq": 1 }),
        )
        .await,
        h.get("/im/v1/users/1/conversations").await,
        h.get("/im/v1/users/1/sync").await,
        put(&h, "/im/v1/groups/team", json!({ "name": "x" })).await,
        h.get("/im/v1/groups/team").await,
        post(&h, "/im/v1/groups/team/members", json!({ "add": [1] })).await,
        h.get("/im/v1/groups/team/members").await,
    ];
    for answer in answers {
        refused(&answer, 404, 2, &["im.store", "off"]);
    }
}

/// A store outage is 503 with code 5 and `Retry-After: 1` on every
/// endpoint, and nothing is queued.
#[tokio::test]
async fn a_store_outage_is_503_with_retry_after() {
    let mut h = Setup::new().im_store_down().start().await;
    h.connect_accepting("comet-a", 2, "k2", &[Op::IM_MSG.0])
        .await;
    let requests = [
        h.http
            .post(h.url("/im/v1/messages"))
            .body(json!({ "from": 1, "to": 2, "cmid": "c" }).to_string()),
        h.http.get(h.url("/im/v1/conversations/p:1:2/messages")),
        h.http
            .post(h.url("/im/v1/conversations/p:1:2/read"))
            .body(json!({ "mid": 1, "seq": 1 }).to_string()),
        h.http.get(h.url("/im/v1/users/1/conversations")),
        h.http.get(h.url("/im/v1/users/1/sync")),
        h.http
            .put(h.url("/im/v1/groups/team"))
            .body(json!({ "name": "x" }).to_string()),
        h.http.get(h.url("/im/v1/groups/team")),
        h.http
            .post(h.url("/im/v1/groups/team/members"))
            .body(json!({ "add": [1] }).to_string()),
        h.http.get(h.url("/im/v1/groups/team/members")),
    ];
    for request in requests {
        let response = request.send().await.expect("http request");
        let retry = response.headers().get("retry-after").cloned();
        let status = response.status().as_u16();
        let body: Value = response.json().await.expect("a JSON body");
        assert_eq!(status, 503, "{body}");
        assert_eq!(
            retry.as_ref().and_then(|v| v.to_str().ok()),
            Some("1"),
            "{body}"
        );
        assert_eq!(body["code"], 5, "{body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains("message store unavailable"), "{body}");
    }
    assert!(h.drain().await.is_empty(), "nothing stored, nothing queued");
}

/// GET /im/v1/users/{mid}/presence lists the live connections (platform,
/// comet, start, oldest first) and last seen, behind the IM token, with or
/// without a message store; a router outage is 503 with code 5.
#[tokio::test]
async fn presence_lists_devices_and_last_seen() {
    let h = Setup::new()
        .admin_token()
        .im(|im| im.api_token = Some(IM_TOKEN.into()))
        .start()
        .await;
    let url = h.url("/im/v1/users/7/presence");
    refused(&h.get("/im/v1/users/7/presence").await, 401, 2, &[]);
    let get = || h.send(h.http.get(&url).bearer_auth(IM_TOKEN));
    assert_eq!(
        get().await.ok(),
        &json!({ "online": false, "devices": [], "last_seen": null })
    );

    h.connect("comet-1", 7, "k1").await;
    h.connect("comet-2", 7, "k2").await;
    let answer = get().await;
    let data = answer.ok();
    assert_eq!(data["online"], true);
    let devices = data["devices"].as_array().unwrap();
    let shown: Vec<(&str, &str, &str)> = devices
        .iter()
        .map(|d| {
            (
                d["key"].as_str().unwrap(),
                d["platform"].as_str().unwrap(),
                d["comet"].as_str().unwrap(),
            )
        })
        .collect();
    let mut sorted = shown.clone();
    sorted.sort();
    assert_eq!(sorted, [("k1", "web", "comet-1"), ("k2", "web", "comet-2")]);
    let since: Vec<i64> = devices
        .iter()
        .map(|d| d["since"].as_i64().unwrap())
        .collect();
    assert!(since[0] <= since[1] && since[0] > 0, "{since:?}");
    assert!(data["last_seen"].as_i64().unwrap() >= since[1]);

    let bad = h.send(
        h.http
            .get(h.url("/im/v1/users/x/presence"))
            .bearer_auth(IM_TOKEN),
    );
    refused(&bad.await, 400, 1, &["mid"]);

    let down = Setup::new()
        .router(std::sync::Arc::new(support::DownRouter))
        .start()
        .await;
    let answer = down.get("/im/v1/users/7/presence").await;
    refused(&answer, 503, 5, &["redis is down"]);
}

// ---------------------------------------------------------------------------
// Rate limits
// ---------------------------------------------------------------------------

/// One write's answer: status, `Retry-After`, envelope.
struct Written {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

async fn write(h: &Harness, method: reqwest::Method, path: &str, body: Value) -> Written {
    write_as(h, method, path, body, None).await
}

async fn write_as(
    h: &Harness,
    method: reqwest::Method,
    path: &str,
    body: Value,
    token: Option<&str>,
) -> Written {
    let mut request = h.http.request(method, h.url(path)).body(body.to_string());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("http request");
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap().to_owned());
    Written {
        status: response.status().as_u16(),
        retry_after,
        body: response.json().await.unwrap_or(Value::Null),
    }
}

/// Repeats a write (`nth` gives the i-th body) until the limit refuses
/// one, at most 50 times; returns the refusal and the refused body.
/// im.api_write_rate = 1 with a burst of 3: the limit is reached unless
/// every request takes over a second.
async fn until_limited(
    h: &Harness,
    method: reqwest::Method,
    path: &str,
    nth: impl Fn(usize) -> Value,
) -> (Written, Value) {
    for i in 0..50 {
        let body = nth(i);
        let answer = write(h, method.clone(), path, body.clone()).await;
        if answer.status == 429 {
            return (answer, body);
        }
        assert_eq!(answer.status, 200, "{method} {path}: {}", answer.body);
    }
    panic!("{method} {path}: 50 writes and none limited");
}

#[track_caller]
fn assert_limited(answer: &Written) {
    assert_eq!(answer.status, 429, "{}", answer.body);
    assert_eq!(answer.retry_after.as_deref(), Some("1"), "1 per second");
    assert_eq!(answer.body["code"], 3, "{}", answer.body);
    assert!(answer.body["data"].is_null(), "{}", answer.body);
    let message = answer.body["message"].as_str().unwrap();
    assert!(message.contains("im.api_write_rate"), "{message}");
}

/// Over `im.api_write_rate`, every write endpoint answers 429 with
/// `Retry-After` and IM code 3, and the refused send is not stored;
/// reads go on.
#[tokio::test]
async fn writes_over_the_limit_get_429_with_retry_after_and_reads_do_not() {
    use reqwest::Method;
    let h = Setup::new()
        .im_store()
        .im(|im| {
            im.api_write_rate = 1;
            im.api_write_burst = 3;
        })
        .start()
        .await;
    let group = json!({ "name": "team" });
    assert_eq!(
        write(&h, Method::PUT, "/im/v1/groups/team", group)
            .await
            .status,
        200
    );
    let send = |i: usize| json!({ "from": 1, "to": 2, "cmid": format!("c-{i}"), "body": "hi" });
    let (refused, body) = until_limited(&h, Method::POST, "/im/v1/messages", send).await;
    assert_limited(&refused);
    let history = h.get("/im/v1/conversations/p:1:2/messages?after=0").await;
    let cmids: Vec<&Value> = history.ok()["msgs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["cmid"])
        .collect();
    assert!(
        !cmids.is_empty() && !cmids.contains(&&body["cmid"]),
        "{cmids:?}"
    );

    let read = |_| json!({ "mid": 1, "seq": 1 });
    let (refused, _) =
        until_limited(&h, Method::POST, "/im/v1/conversations/p:1:2/read", read).await;
    assert_limited(&refused);
    let group = |_| json!({ "name": "team" });
    let (refused, _) = until_limited(&h, Method::PUT, "/im/v1/groups/team", group).await;
    assert_limited(&refused);
    let members = |i: usize| json!({ "add": [i] });
    let (refused, _) = until_limited(&h, Method::POST, "/im/v1/groups/team/members", members).await;
    assert_limited(&refused);

    for path in [
        "/im/v1/conversations/p:1:2/messages",
        "/im/v1/users/1/conversations",
        "/im/v1/users/2/sync",
        "/im/v1/groups/team",
        "/im/v1/groups/team/members",
    ] {
        for _ in 0..5 {
            h.get(path).await.ok();
        }
    }
}

/// With a token, its callers share one limit; a request with a wrong
/// token is refused before the limit and takes nothing from it.
#[tokio::test]
async fn the_token_has_one_limit_and_wrong_tokens_take_nothing_from_it() {
    use reqwest::Method;
    let h = Setup::new()
        .im_store()
        .im(|im| {
            im.api_token = Some(IM_TOKEN.into());
            im.api_write_rate = 1;
            im.api_write_burst = 1;
        })
        .start()
        .await;
    let group = json!({ "name": "team" });
    for _ in 0..5 {
        let wrong = write_as(
            &h,
            Method::PUT,
            "/im/v1/groups/team",
            group.clone(),
            Some("nope"),
        )
        .await;
        assert_eq!((wrong.status, &wrong.body["code"]), (401, &json!(2)));
    }
    let first = write_as(
        &h,
        Method::PUT,
        "/im/v1/groups/team",
        group.clone(),
        Some(IM_TOKEN),
    )
    .await;
    assert_eq!(first.status, 200, "{}", first.body);
    // Until a second has passed, the token's next write is refused.
    let mut limited = None;
    for _ in 0..50 {
        let next = write_as(
            &h,
            Method::PUT,
            "/im/v1/groups/team",
            group.clone(),
            Some(IM_TOKEN),
        )
        .await;
        if next.status == 429 {
            limited = Some(next);
            break;
        }
        assert_eq!(next.status, 200, "{}", next.body);
    }
    assert_limited(&limited.expect("a write over the token's limit"));
}
