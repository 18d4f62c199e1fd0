//! The IM layer in logic (../shared/docs/im.md): the client ops comets hand
//! over (SEND 18, ACK 20, SYNC 22, PULL 24, READ 26) answered from the
//! message store, and the frames pushed after a commit (MSG 21, NOTIFY 27).
//!
//! A SEND is answered only after the store committed it durably; its MSG
//! frames are then queued in the background (deliver.rs). Replies echo the
//! request's header seq; a malformed request gets its reply op with a
//! non-zero code and the connection stays open. ACK and READ have no reply:
//! a bad one is logged and counted. ACKs are kept in the router; a device
//! that leaves a push unacked for `im.ack_timeout` gets NOTIFY sync.

mod acks;
mod deliver;
mod limits;
mod metrics;
mod relay;
mod retention;
mod wire;

use std::sync::Arc;

use rim_config::{ImConfig, RateLimit};
use rim_im::{
    ConvId, DEFAULT_SYNC_LIMIT, Draft, Group, GroupSpec, MAX_SYNC_LIMIT, MembersChanged,
    MessageStore, Page, Reader, Sent, clamp_limit,
};
use rim_proto::Op;
use rim_proto::im::{
    Ack, Body, Code, Notify, PullReply, PullRequest, ReadRequest, SendReply, SendRequest,
    SyncReply, SyncRequest,
};
use rim_proto::pb::frame::v1::Proto;
use rim_queue::Producer;
use rim_router::Router;

use self::deliver::Deliverer;
use self::limits::Limits;
pub use self::limits::{ApiClient, Limit, Limited};
use self::metrics::ImMetrics;
use self::wire::Refusal;
pub use self::wire::msg as wire_msg;

/// The most body bytes of messages one SYNC or PULL reply carries; a page
/// that would be larger is cut (SYNC says `more`, PULL continues from its
/// last seq), so a reply stays a reasonable frame.
const MAX_REPLY_BODY_BYTES: usize = 256 << 10;

/// The IM service: the store behind it, the queue its pushes go to and
/// the rate limits in front of them.
pub struct Im {
    store: Arc<dyn MessageStore>,
    deliver: Deliverer,
    limits: Arc<Limits>,
    conn_send_limit: Option<RateLimit>,
    max_body: usize,
    /// `im.big_group_members`: groups above it are big (read diffusion).
    big_group_members: u32,
    metrics: Arc<ImMetrics>,
}

impl std::fmt::Debug for Im {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Im")
            .field("max_body", &self.max_body)
            .finish_non_exhaustive()
    }
}

impl Im {
    /// Creates the IM service over a store, the online map (to find the
    /// recipients' connections) and the push queue, with the rate limits
    /// of `config`; it starts its background tasks on the current runtime
    /// (they end when the service is dropped).
    pub fn new(
        store: Arc<dyn MessageStore>,
        router: Arc<dyn Router>,
        queue: Arc<dyn Producer>,
        config: &ImConfig,
    ) -> Im {
        let metrics = Arc::new(ImMetrics::default());
        let limits = Arc::new(Limits::new(config));
        Limits::spawn_pruning(&limits);
        retention::start(&store, config, &metrics);
        let deliver = Deliverer::new(
            router,
            queue,
            Arc::clone(&metrics),
            config.ack_timeout,
            config.big_group_rate,
        );
        relay::start(&store, deliver.clone(), &metrics);
        Im {
            store,
            deliver,
            limits,
            conn_send_limit: config.send_limit_per_conn(),
            max_body: config.max_body,
            big_group_members: config.big_group_members,
            metrics,
        }
    }

    /// Registers the IM metrics (`rim_logic_im_*`) in `registry`.
    pub fn register_metrics(&self, registry: &mut rim_metrics::Registry) {
        self.metrics
            .register(registry, Arc::clone(&self.store), Arc::clone(&self.limits));
    }

    /// Takes one /im/v1 write (POST, PUT) of `client` from
    /// `im.api_write_rate`; over it, the request must be refused and
    /// nothing done.
    pub fn admit_api_write(&self, client: &ApiClient) -> Result<(), Limited> {
        self.limits.check_api(client).inspect_err(|limited| {
            self.metrics.limited(limited.limit);
        })
    }

    /// Returns the per-connection SEND limit (`im.send_rate_per_conn`,
    /// `im.send_burst_per_conn`), which comets enforce before a SEND
    /// reaches logic; None when it is off.
    pub fn connection_send_limit(&self) -> Option<RateLimit> {
        self.conn_send_limit
    }

    /// Returns the largest message body it accepts (`im.max_body`).
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// Returns the store (the HTTP endpoints read through it).
    pub fn store(&self) -> &Arc<dyn MessageStore> {
        &self.store
    }

    /// Stores a message and, once it is durable, queues its MSG frames to
    /// every member's connections except `sender_key` (the connection that
    /// sent it, which gets SEND_REPLY instead). A resend (duplicate cmid)
    /// stores and pushes nothing.
    pub async fn send(&self, draft: Draft, sender_key: Option<&str>) -> rim_im::Result<Sent> {
        let sent = self.store.send(draft).await?;
        if sent.big {
            // Read diffusion: one push to the group's channel. A resend's
            // first push may have been lost with its logic: pushed again
            // (devices drop a (conv, seq) they have).
            self.deliver.group_message(&sent).await;
        } else if sent.duplicate {
            self.hint_resent(&sent.message.conv, sender_key).await;
        } else {
            self.deliver.message(&sent, sender_key).await;
        }
        Ok(sent)
    }

    /// After a resend: the first send may have been committed without its
    /// MSG frames going out (its sender lost the reply when logic died
    /// after the commit), so the members' online devices get NOTIFY sync
    /// with their latest inbox entry — never a lost last message without a
    /// hint. Best effort: a failure here is logged, the resend still
    /// answers.
    async fn hint_resent(&self, conv: &ConvId, sender_key: Option<&str>) {
        let mids = match self.members_of(conv).await {
            Ok(mids) => mids,
            Err(err) => {
                tracing::warn!(%err, %conv, "IM resend hint: members unknown; skipped");
                return;
            }
        };
        let heads = match self.store.inbox_heads(&mids).await {
            Ok(heads) => heads,
            Err(err) => {
                tracing::warn!(%err, %conv, "IM resend hint: inboxes unknown; skipped");
                return;
            }
        };
        for (mid, sync) in mids.into_iter().zip(heads) {
            if sync > 0 {
                self.deliver
                    .notify(mid, &Notify::Sync { sync }, sender_key)
                    .await;
            }
        }
    }

    /// Creates group `conv` or updates it; `max_members` above
    /// `im.big_group_members` makes it a big group (read diffusion, for
    /// good). A group that becomes big has its online members' connections
    /// put in its delivery channel.
    pub async fn put_group(
        &self,
        conv: &ConvId,
        name: String,
        max_members: u32,
    ) -> rim_im::Result<Group> {
        let was_big = match self.store.group(conv).await {
            Ok(group) => group.big,
            Err(rim_im::Error::NoSuchGroup { .. }) => false,
            Err(err) => return Err(err),
        };
        let spec = GroupSpec {
            name,
            max_members,
            big: max_members > self.big_group_members,
        };
        let group = self.store.put_group(conv, spec).await?;
        if group.big && !was_big && group.members > 0 {
            let mids = self.members_of(conv).await?;
            self.deliver.channel(conv, mids, false).await;
        }
        Ok(group)
    }

    /// Removes, then adds members of group `conv` (see
    /// [`MessageStore::change_members`]); a big group's channel follows:
    /// the connections of new members join it, those of removed ones
    /// leave it, within the push pipeline's latency (and at the latest at
    /// each connection's next presence renewal).
    pub async fn change_members(
        &self,
        conv: &ConvId,
        add: &[i64],
        remove: &[i64],
    ) -> rim_im::Result<MembersChanged> {
        let changed = self.store.change_members(conv, add, remove).await?;
        if !(changed.added.is_empty() && changed.removed.is_empty())
            && self.store.group(conv).await?.big
        {
            self.deliver
                .channel(conv, changed.removed.clone(), true)
                .await;
            self.deliver
                .channel(conv, changed.added.clone(), false)
                .await;
        }
        Ok(changed)
    }

    /// Returns the big groups `mid` is a member of (conv ids): the delivery
    /// channels its IM connections belong in.
    pub async fn big_groups(&self, mid: i64) -> rim_im::Result<Vec<String>> {
        let groups = self.store.big_groups(mid, 0).await?;
        Ok(groups.iter().map(ToString::to_string).collect())
    }

    /// Every member of a conversation (a group's, page by page).
    async fn members_of(&self, conv: &ConvId) -> rim_im::Result<Vec<i64>> {
        if let ConvId::Peer { low, high } = conv {
            return Ok(if low == high {
                vec![*low]
            } else {
                vec![*low, *high]
            });
        }
        let mut mids = Vec::new();
        let mut after = None;
        loop {
            let page = self.store.members(conv, after, 0).await?;
            mids.extend(page.mids);
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(mids),
            }
        }
    }

    /// Moves `mid`'s read position in `conv` and, when it moved, tells the
    /// user's other connections (NOTIFY read) except `reader_key`.
    pub async fn read(
        &self,
        conv: &ConvId,
        mid: i64,
        seq: u64,
        reader_key: Option<&str>,
    ) -> rim_im::Result<rim_im::ReadPos> {
        let pos = self.store.read(conv, mid, seq).await?;
        if pos.advanced {
            let notify = Notify::Read {
                conv: conv.to_string(),
                seq: pos.read_seq,
            };
            self.deliver.notify(mid, &notify, reader_key).await;
        }
        Ok(pos)
    }

    /// Handles one IM frame of connection `key` of user `mid`; returns the
    /// frames it answers (none for ACK, READ and server-only ops).
    pub(crate) async fn request(&self, mid: i64, key: &str, frame: Proto) -> Vec<Proto> {
        let (seq, body) = (frame.seq, &frame.body[..]);
        match Op(frame.op) {
            Op::IM_SEND => {
                let reply = self.client_send(mid, key, body).await;
                self.metrics.request("send", reply.code.0);
                vec![reply.to_frame(seq).into()]
            }
            Op::IM_SYNC => {
                let reply = self.client_sync(mid, body).await;
                self.metrics.request("sync", reply.code.0);
                vec![reply.to_frame(seq).into()]
            }
            Op::IM_PULL => {
                let reply = self.client_pull(mid, body).await;
                self.metrics.request("pull", reply.code.0);
                vec![reply.to_frame(seq).into()]
            }
            Op::IM_ACK => {
                let code = match self.client_ack(mid, key, body).await {
                    Ok(()) => Code::OK,
                    Err(refusal) => Self::dropped("ACK", mid, &refusal),
                };
                self.metrics.request("ack", code.0);
                Vec::new()
            }
            Op::IM_READ => {
                let code = match self.client_read(mid, key, body).await {
                    Ok(()) => Code::OK,
                    Err(refusal) => Self::dropped("READ", mid, &refusal),
                };
                self.metrics.request("read", code.0);
                Vec::new()
            }
            op => {
                tracing::debug!(
                    op = op.0,
                    mid,
                    "server-to-client IM op from a client ignored"
                );
                Vec::new()
            }
        }
    }

    /// Logs a refused request that has no reply; returns its code.
    fn dropped(op: &str, mid: i64, refusal: &Refusal) -> Code {
        tracing::debug!(op, mid, code = refusal.code.0, error = ?refusal.error, "IM request refused");
        refusal.code
    }

    async fn client_send(&self, mid: i64, key: &str, body: &[u8]) -> SendReply {
        let req = match SendRequest::decode(body) {
            Ok(req) => req,
            Err(err) => return refused_send(Refusal::undecodable("SEND", &err), ""),
        };
        // Before the store: a limited SEND stores nothing, and its resend
        // with the same cmid is a first send.
        if let Err(limited) = self.limits.check_send(mid, key) {
            self.metrics.limited(limited.limit);
            tracing::debug!(mid, key, %limited, "IM send refused");
            return SendReply {
                retry_ms: Some(limited.retry_ms()),
                ..SendReply::refused(Code::RATE_LIMITED, limited.to_string(), req.cmid)
            };
        }
        let cmid = req.cmid.clone();
        match self.try_send(mid, key, req).await {
            Ok(sent) => SendReply {
                cmid,
                conv: sent.message.conv.to_string(),
                seq: sent.message.seq,
                id: sent.message.id.to_string(),
                ts: sent.message.ts,
                ..SendReply::default()
            },
            Err(refusal) => refused_send(refusal, &cmid),
        }
    }

    async fn try_send(&self, mid: i64, key: &str, req: SendRequest) -> Result<Sent, Refusal> {
        let conv = match (req.to, req.conv.as_deref()) {
            (Some(to), None) => ConvId::peer(mid, to)?,
            (None, Some(conv)) => wire::conv(conv)?,
            (Some(_), Some(_)) => return Err(Refusal::bad("give `to` or `conv`, not both")),
            (None, None) => return Err(Refusal::bad("missing `to` (a user) or `conv` (a group)")),
        };
        let draft = Draft::new(conv, mid, req.cmid, req.kind, req.body, self.max_body)?;
        Ok(self.send(draft, Some(key)).await?)
    }

    async fn client_sync(&self, mid: i64, body: &[u8]) -> SyncReply {
        let req = match SyncRequest::decode(body) {
            Ok(req) => req,
            Err(err) => return refused_sync(Refusal::undecodable("SYNC", &err)),
        };
        match self.sync(mid, req.sync, req.limit).await {
            Ok(reply) => reply,
            Err(err) => refused_sync(err.into()),
        }
    }

    /// Returns `mid`'s inbox entries after `after` as a SYNC_REPLY: at most
    /// `limit` (0 = 100, at most 200), cut earlier when their bodies pass
    /// 256 KiB (`more` then says to continue).
    pub async fn sync(&self, mid: i64, after: u64, limit: u32) -> rim_im::Result<SyncReply> {
        let limit = clamp_limit(limit, DEFAULT_SYNC_LIMIT, MAX_SYNC_LIMIT);
        let page = self.store.sync(mid, after, limit).await?;
        let mut reply = SyncReply {
            sync: page.sync,
            more: page.more,
            reset: page.reset,
            ..SyncReply::default()
        };
        let mut bytes = 0;
        for entry in page.entries {
            bytes += entry.message.body.len();
            if !reply.msgs.is_empty() && bytes > MAX_REPLY_BODY_BYTES {
                // Cut here: the device continues after the last entry sent.
                reply.more = true;
                reply.sync = reply.msgs.last().and_then(|m| m.sync).unwrap_or(reply.sync);
                break;
            }
            reply.msgs.push(wire::msg(&entry.message, Some(entry.sync)));
        }
        Ok(reply)
    }

    async fn client_pull(&self, mid: i64, body: &[u8]) -> PullReply {
        let req = match PullRequest::decode(body) {
            Ok(req) => req,
            Err(err) => return refused_pull(Refusal::undecodable("PULL", &err), ""),
        };
        let page = match (req.before, req.after) {
            (Some(before), None) => Page::Before(before),
            (None, Some(after)) => Page::After(after),
            (None, None) => Page::Latest,
            (Some(_), Some(_)) => {
                return refused_pull(
                    Refusal::bad("give `before` or `after`, not both"),
                    &req.conv,
                );
            }
        };
        let conv = match wire::conv(&req.conv) {
            Ok(conv) => conv,
            Err(refusal) => return refused_pull(refusal, &req.conv),
        };
        match self.pull(&conv, Reader::Member(mid), page, req.limit).await {
            Ok(reply) => reply,
            Err(err) => refused_pull(err.into(), &req.conv),
        }
    }

    /// Returns a page of `conv`'s history for `reader` as a PULL_REPLY: at
    /// most `limit` messages (0 = 100, at most 100), cut earlier when their
    /// bodies pass 256 KiB (the reader continues from the last seq).
    pub async fn pull(
        &self,
        conv: &ConvId,
        reader: Reader,
        page: Page,
        limit: u32,
    ) -> rim_im::Result<PullReply> {
        let page = self.store.pull(conv, reader, page, limit).await?;
        let mut bytes = 0;
        let msgs = page
            .messages
            .iter()
            .enumerate()
            .take_while(|(i, m)| {
                bytes += m.body.len();
                *i == 0 || bytes <= MAX_REPLY_BODY_BYTES
            })
            .map(|(_, m)| wire::msg(m, None))
            .collect();
        Ok(PullReply {
            conv: conv.to_string(),
            msgs,
            max_seq: page.max_seq,
            min_seq: page.min_seq,
            reset: page.reset,
            ..PullReply::default()
        })
    }

    async fn client_ack(&self, mid: i64, key: &str, body: &[u8]) -> Result<(), Refusal> {
        let ack = Ack::decode(body).map_err(|err| Refusal::undecodable("ACK", &err))?;
        self.deliver
            .ack(mid, key, ack.sync)
            .await
            .map_err(|err| Refusal {
                code: Code::UNAVAILABLE,
                error: format!("router: {err}"),
            })
    }

    async fn client_read(&self, mid: i64, key: &str, body: &[u8]) -> Result<(), Refusal> {
        let req = ReadRequest::decode(body).map_err(|err| Refusal::undecodable("READ", &err))?;
        let conv = wire::conv(&req.conv)?;
        self.read(&conv, mid, req.seq, Some(key)).await?;
        Ok(())
    }
}

/// What a deployment without a message store answers an IM request.
pub(crate) fn off_reply(frame: &Proto) -> Vec<Proto> {
    const ERROR: &str = "IM is off on this deployment (im.store = \"off\")";
    let seq = frame.seq;
    let reply = match Op(frame.op) {
        Op::IM_SEND => SendReply::refused(Code::NOT_ALLOWED, ERROR, "").to_frame(seq),
        Op::IM_SYNC => refused_sync(Refusal {
            code: Code::NOT_ALLOWED,
            error: ERROR.into(),
        })
        .to_frame(seq),
        Op::IM_PULL => refused_pull(
            Refusal {
                code: Code::NOT_ALLOWED,
                error: ERROR.into(),
            },
            "",
        )
        .to_frame(seq),
        _ => return Vec::new(),
    };
    vec![reply.into()]
}

fn refused_send(refusal: Refusal, cmid: &str) -> SendReply {
    SendReply::refused(refusal.code, refusal.error, cmid)
}

fn refused_sync(refusal: Refusal) -> SyncReply {
    SyncReply {
        code: refusal.code,
        error: refusal.error,
        ..SyncReply::default()
    }
}

fn refused_pull(refusal: Refusal, conv: &str) -> PullReply {
    PullReply {
        code: refusal.code,
        error: refusal.error,
        conv: conv.to_owned(),
        ..PullReply::default()
    }
}
