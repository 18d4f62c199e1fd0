//! Messages, history, inboxes, conversation lists and read positions.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use rim_im::{Draft, Page, Reader};
use rim_proto::im::Msg;
use serde::{Deserialize, Serialize};

use super::{LIMIT, Segment, bad, checked_mid, conv, json, mid, service};
use crate::Api;
use crate::error::{ImError, ok};
use crate::params::Params;

const SEQ: &str = "a seq (a non-negative integer)";

/// The body of POST /im/v1/messages.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody {
    from: i64,
    #[serde(default)]
    to: Option<i64>,
    #[serde(default)]
    conv: Option<String>,
    cmid: String,
    #[serde(rename = "type", default)]
    kind: i32,
    #[serde(default)]
    body: String,
    /// A business's system send: a group's membership is not checked.
    #[serde(default)]
    system: bool,
}

/// The answer to a send.
#[derive(Serialize)]
struct SendAnswer {
    conv: String,
    seq: u64,
    id: String,
    ts: i64,
}

/// POST /im/v1/messages: sends as user `from` to `to` (1:1) or `conv`.
pub(super) async fn send(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ImError> {
    let im = service(&api)?;
    let req: SendBody = json(&api, &headers, body).await?;
    let from = checked_mid("from", req.from)?;
    let conv = match (req.to, req.conv.as_deref()) {
        (Some(to), None) => rim_im::ConvId::peer(from, checked_mid("to", to)?)?,
        (None, Some(text)) => conv(text)?,
        (Some(_), Some(_)) => {
            return Err(bad(
                "invalid fields \"to\" and \"conv\": give one, not both",
            ));
        }
        (None, None) => {
            return Err(bad(
                "missing field \"to\" (a user) or \"conv\" (a conversation)",
            ));
        }
    };
    let draft = Draft::new(conv, from, req.cmid, req.kind, req.body, im.max_body())?;
    let draft = if req.system { draft.system() } else { draft };
    let sent = im.send(draft, None).await?;
    let message = sent.message;
    Ok(ok(SendAnswer {
        conv: message.conv.to_string(),
        seq: message.seq,
        id: message.id.to_string(),
        ts: message.ts,
    }))
}

/// A page of a conversation's history.
#[derive(Serialize)]
struct History {
    conv: String,
    msgs: Vec<Msg>,
    max_seq: u64,
    min_seq: u64,
    reset: bool,
}

/// GET /im/v1/conversations/{conv}/messages?before=&after=&limit=: a page
/// of history, newest first (`before`, or neither) or oldest first (`after`).
pub(super) async fn history(
    State(api): State<Arc<Api>>,
    Segment(conv_id): Segment,
    RawQuery(query): RawQuery,
) -> Result<Response, ImError> {
    let im = service(&api)?;
    let conv = conv(&conv_id)?;
    let params = Params::parse(query.as_deref());
    let page = match (
        params.parse_opt("before", SEQ)?,
        params.parse_opt("after", SEQ)?,
    ) {
        (Some(before), None) => Page::Before(before),
        (None, Some(after)) => Page::After(after),
        (None, None) => Page::Latest,
        (Some(_), Some(_)) => {
            return Err(bad(
                "invalid parameters \"before\" and \"after\": give one, not both",
            ));
        }
    };
    let limit = params.parse_or("limit", LIMIT, 0)?;
    let reply = im.pull(&conv, Reader::Business, page, limit).await?;
    Ok(ok(History {
        conv: reply.conv,
        msgs: reply.msgs,
        max_seq: reply.max_seq,
        min_seq: reply.min_seq,
        reset: reply.reset,
    }))
}

/// One line of a user's conversation list.
#[derive(Serialize)]
struct ConvLine {
    conv: String,
    max_seq: u64,
    read_seq: u64,
    unread: u64,
    last: Option<Msg>,
}

/// GET /im/v1/users/{mid}/conversations?limit=: the user's conversations,
/// most recent first.
pub(super) async fn conversations(
    State(api): State<Arc<Api>>,
    Segment(user): Segment,
    RawQuery(query): RawQuery,
) -> Result<Response, ImError> {
    let im = service(&api)?;
    let user = mid("mid", &user)?;
    let limit = Params::parse(query.as_deref()).parse_or("limit", LIMIT, 0)?;
    let lines: Vec<ConvLine> = im
        .store()
        .conversations(user, limit)
        .await?
        .into_iter()
        .map(|line| ConvLine {
            conv: line.conv.to_string(),
            max_seq: line.max_seq,
            read_seq: line.read_seq,
            unread: line.unread,
            last: line.last.as_ref().map(|m| rim_logic::wire_msg(m, None)),
        })
        .collect();
    Ok(ok(lines))
}

/// A page of a user's inbox, as SYNC_REPLY.
#[derive(Serialize)]
struct Inbox {
    msgs: Vec<Msg>,
    sync: u64,
    more: bool,
    reset: bool,
}

/// GET /im/v1/users/{mid}/sync?since=&limit=: the user's inbox entries
/// after `since`.
pub(super) async fn sync(
    State(api): State<Arc<Api>>,
    Segment(user): Segment,
    RawQuery(query): RawQuery,
) -> Result<Response, ImError> {
    let im = service(&api)?;
    let user = mid("mid", &user)?;
    let params = Params::parse(query.as_deref());
    let since = params.parse_or("since", "an inbox sync (a non-negative integer)", 0)?;
    let limit = params.parse_or("limit", LIMIT, 0)?;
    let reply = im.sync(user, since, limit).await?;
    Ok(ok(Inbox {
        msgs: reply.msgs,
        sync: reply.sync,
        more: reply.more,
        reset: reply.reset,
    }))
}

/// The body of POST /im/v1/conversations/{conv}/read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadBody {
    mid: i64,
    seq: u64,
}

/// A read position.
#[derive(Serialize)]
struct ReadAnswer {
    read_seq: u64,
    max_seq: u64,
}

/// POST /im/v1/conversations/{conv}/read: moves user `mid`'s read position
/// and tells all the user's devices (NOTIFY read).
pub(super) async fn read(
    State(api): State<Arc<Api>>,
    Segment(conv_id): Segment,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ImError> {
    let im = service(&api)?;
    let conv = conv(&conv_id)?;
    let req: ReadBody = json(&api, &headers, body).await?;
    let reader = checked_mid("mid", req.mid)?;
    let pos = im.read(&conv, reader, req.seq, None).await?;
    Ok(ok(ReadAnswer {
        read_seq: pos.read_seq,
        max_seq: pos.max_seq,
    }))
}
