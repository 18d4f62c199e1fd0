//! Groups: settings and members.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use rim_im::ConvId;
use serde::{Deserialize, Serialize};

use super::{Segment, bad, checked_mid, group, json, service};
use crate::error::{ImError, ok};
use crate::params::Params;
use crate::{Api, HttpError};

/// The longest group name, in bytes.
const MAX_NAME_BYTES: usize = 256;

/// The body of PUT /im/v1/groups/{gid}.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    name: String,
    /// Absent: `im.big_group_members`.
    #[serde(default)]
    max_members: Option<u32>,
}

/// A group's settings.
#[derive(Serialize)]
struct GroupAnswer {
    gid: String,
    conv: String,
    name: String,
    max_members: u32,
    members: u32,
    /// A big group (read diffusion): `max_members` was set above
    /// `im.big_group_members` at some point; it stays big.
    big: bool,
    /// Whether this PUT created it (absent on GET).
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<bool>,
}

impl GroupAnswer {
    fn new(gid: String, group: rim_im::Group, created: Option<bool>) -> GroupAnswer {
        GroupAnswer {
            gid,
            conv: group.conv.to_string(),
            name: group.name,
            max_members: group.max_members,
            members: group.members,
            big: group.big,
            created,
        }
    }
}

/// PUT /im/v1/groups/{gid}: creates the group or updates its settings.
pub(super) async fn put(
    State(api): State<Arc<Api>>,
    Segment(gid): Segment,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ImError> {
    let im = service(&api)?;
    let conv = group(&gid)?;
    let req: PutBody = json(&api, &headers, body).await?;
    let max_members = req.max_members.unwrap_or(api.im.big_group_members);
    if max_members == 0 {
        return Err(bad(
            "invalid field \"max_members\": a group has room for at least 1 member",
        ));
    }
    let limit = api.im.max_group_members;
    if max_members > limit {
        return Err(ImError(HttpError::BigGroup { max_members, limit }));
    }
    if req.name.len() > MAX_NAME_BYTES {
        return Err(bad(format!(
            "invalid field \"name\": {} bytes, over the limit of {MAX_NAME_BYTES}",
            req.name.len()
        )));
    }
    let stored = im.put_group(&conv, req.name, max_members).await?;
    let created = stored.created;
    Ok(ok(GroupAnswer::new(gid, stored, Some(created))))
}

/// GET /im/v1/groups/{gid}: the group's settings and member count.
pub(super) async fn get(
    State(api): State<Arc<Api>>,
    Segment(gid): Segment,
) -> Result<Response, ImError> {
    let im = service(&api)?;
    let conv = group(&gid)?;
    let stored = im.store().group(&conv).await?;
    Ok(ok(GroupAnswer::new(gid, stored, None)))
}

/// The body of POST /im/v1/groups/{gid}/members.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MembersBody {
    #[serde(default)]
    add: Vec<i64>,
    #[serde(default)]
    remove: Vec<i64>,
}

/// What a membership change did.
#[derive(Serialize)]
struct MembersChanged {
    added: Vec<i64>,
    removed: Vec<i64>,
    members: u32,
}

/// POST /im/v1/groups/{gid}/members: removes, then adds members.
pub(super) async fn change_members(
    State(api): State<Arc<Api>>,
    Segment(gid): Segment,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ImError> {
    let im = service(&api)?;
    let conv: ConvId = group(&gid)?;
    let req: MembersBody = json(&api, &headers, body).await?;
    if req.add.is_empty() && req.remove.is_empty() {
        return Err(bad(
            "missing field \"add\" or \"remove\": give the mids to add or remove",
        ));
    }
    for (name, mids) in [("add", &req.add), ("remove", &req.remove)] {
        for &m in mids {
            checked_mid(name, m)?;
        }
    }
    let changed = im.change_members(&conv, &req.add, &req.remove).await?;
    Ok(ok(MembersChanged {
        added: changed.added,
        removed: changed.removed,
        members: changed.members,
    }))
}

/// A page of a group's members.
#[derive(Serialize)]
struct MembersPage {
    mids: Vec<i64>,
    next: Option<i64>,
}

/// GET /im/v1/groups/{gid}/members?cursor=&limit=: members above `cursor`,
/// ascending.
pub(super) async fn members(
    State(api): State<Arc<Api>>,
    Segment(gid): Segment,
    RawQuery(query): RawQuery,
) -> Result<Response, ImError> {
    let im = service(&api)?;
    let conv = group(&gid)?;
    let params = Params::parse(query.as_deref());
    let cursor = params.parse_opt("cursor", "a mid (the last one of the previous page)")?;
    let limit = params.parse_or("limit", super::LIMIT, 0)?;
    let page = im.store().members(&conv, cursor, limit).await?;
    Ok(ok(MembersPage {
        mids: page.mids,
        next: page.next,
    }))
}
