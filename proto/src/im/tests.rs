use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

/// Encodes `body` and returns it as a JSON value, to compare whole objects.
fn json_of<B: Body>(body: &B) -> Value {
    serde_json::from_slice(&body.encode()).unwrap()
}

fn decode<B: Body>(value: Value) -> Result<B, serde_json::Error> {
    B::decode(&serde_json::to_vec(&value).unwrap())
}

fn msg(seq: u64, sync: Option<u64>) -> Msg {
    Msg {
        conv: "p:1:2".into(),
        seq,
        id: "123456789012345678".into(),
        from: 1,
        cmid: format!("c{seq}"),
        kind: 7,
        body: "hi".into(),
        ts: 1_765_000_000_000,
        sync,
    }
}

#[test]
fn each_body_knows_its_op() {
    let ops = [
        SendRequest::OP,
        SendReply::OP,
        Ack::OP,
        Msg::OP,
        SyncRequest::OP,
        SyncReply::OP,
        PullRequest::OP,
        PullReply::OP,
        ReadRequest::OP,
        Notify::OP,
    ];
    assert_eq!(ops, Op::IM);
    assert_eq!(
        Op::IM.map(|op| op.0),
        [18, 19, 20, 21, 22, 23, 24, 25, 26, 27]
    );
    assert_eq!(<SendRequest as Request>::Reply::OP, Op(19));
    assert_eq!(<SyncRequest as Request>::Reply::OP, Op(23));
    assert_eq!(<PullRequest as Request>::Reply::OP, Op(25));
    assert_eq!(Op::IM_PUSHED.map(|op| op.0), [21, 27]);
    assert!(Op::IM.iter().all(|op| op.is_im()));
    assert!(!Op(17).is_im() && !Op(28).is_im() && !Op(1000).is_im());
    assert_eq!(Op(18).to_string(), "18(im_send)");
    assert_eq!(Op(27).to_string(), "27(im_notify)");
    assert_eq!(Op(28).name(), None);

    let frame = ReadRequest {
        conv: "g:a".into(),
        seq: 4,
    }
    .to_frame(9);
    assert_eq!((frame.op, frame.seq), (Op::IM_READ, 9));
    assert_eq!(&frame.body[..], br#"{"conv":"g:a","seq":4}"#);
}

#[test]
fn send_request_spells_type_and_omits_the_absent_target() {
    let req = SendRequest {
        cmid: "c-1".into(),
        to: Some(2),
        conv: None,
        kind: 3,
        body: "hello".into(),
    };
    assert_eq!(
        json_of(&req),
        json!({"cmid": "c-1", "to": 2, "type": 3, "body": "hello"})
    );
    let group: SendRequest = decode(json!({"cmid": "c-2", "conv": "g:team"})).unwrap();
    assert_eq!(
        group,
        SendRequest {
            cmid: "c-2".into(),
            to: None,
            conv: Some("g:team".into()),
            kind: 0,
            body: String::new(),
        },
        "type defaults to 0 and body to empty"
    );
    let null_to: SendRequest = decode(json!({"cmid": "c", "to": null})).unwrap();
    assert_eq!(null_to.to, None);
}

#[test]
fn a_missing_required_field_is_named() {
    let err = decode::<SendRequest>(json!({"to": 2, "body": "x"})).unwrap_err();
    assert!(err.to_string().contains("missing field `cmid`"), "{err}");
    let err = decode::<ReadRequest>(json!({"conv": "g:a"})).unwrap_err();
    assert!(err.to_string().contains("missing field `seq`"), "{err}");
    let err = decode::<PullRequest>(json!({"before": 3})).unwrap_err();
    assert!(err.to_string().contains("missing field `conv`"), "{err}");
    let err = decode::<Ack>(json!({})).unwrap_err();
    assert!(err.to_string().contains("missing field `sync`"), "{err}");
    let err = decode::<SyncRequest>(json!({"limit": 5})).unwrap_err();
    assert!(err.to_string().contains("missing field `sync`"), "{err}");
}

#[test]
fn wrong_types_and_non_json_are_errors() {
    assert!(
        decode::<Ack>(json!({"sync": -1})).is_err(),
        "sync is unsigned"
    );
    assert!(decode::<Ack>(json!({"sync": "5"})).is_err());
    assert!(decode::<SyncRequest>(json!({"sync": 1, "limit": 1u64 << 40})).is_err());
    assert!(decode::<SendRequest>(json!({"cmid": 5})).is_err());
    assert!(SendRequest::decode(b"").is_err());
    let err = SendRequest::decode(br#" ["c", 2, null, 0, "x"]"#).unwrap_err();
    assert!(err.to_string().contains("JSON object"), "{err}");
    assert!(ReadRequest::decode(b"\n\t {\"conv\":\"g:a\",\"seq\":1} ").is_ok());
    assert!(Ack::decode(b"12").is_err());
    assert!(Notify::decode(b"\"sync\"").is_err());
    assert!(SendRequest::decode(b"{\"cmid\":\"a\"").is_err());
    assert!(SendRequest::decode(b"\xff\xfe").is_err());
    assert!(
        SendRequest::decode(br#"{"cmid":"a","body":"\ud800"}"#).is_err(),
        "a lone surrogate is not UTF-8"
    );
    let deep = "[".repeat(100_000);
    assert!(
        Msg::decode(deep.as_bytes()).is_err(),
        "deep nesting is refused"
    );
    let deep = format!("{{\"cmid\":\"a\",\"x\":{}", "[".repeat(100_000));
    assert!(SendRequest::decode(deep.as_bytes()).is_err());
}

#[test]
fn unknown_fields_are_ignored() {
    let req: SendRequest =
        decode(json!({"cmid": "c", "to": 2, "future": {"a": [1, 2]}, "prio": 9})).unwrap();
    assert_eq!((req.cmid.as_str(), req.to), ("c", Some(2)));
    let reply: SyncReply = decode(json!({
        "code": 0, "msgs": [{"conv": "p:1:2", "seq": 1, "id": "5", "from": 1, "cmid": "c",
                             "ts": 9, "sync": 4, "edited": true}],
        "sync": 4, "more": false, "reset": false, "cursor": "x"
    }))
    .unwrap();
    assert_eq!(reply.msgs[0].sync, Some(4));
    let notify: Notify = decode(json!({"kind": "read", "conv": "g:a", "seq": 3, "by": 7})).unwrap();
    assert_eq!(
        notify,
        Notify::Read {
            conv: "g:a".into(),
            seq: 3
        }
    );
}

#[test]
fn a_send_refusal_is_small_and_a_success_is_complete() {
    let refused = SendReply::refused(Code::BAD_REQUEST, "missing field `cmid`", "");
    assert_eq!(
        json_of(&refused),
        json!({"code": 1, "error": "missing field `cmid`", "cmid": ""})
    );
    let limited = SendReply {
        conv: "p:1:2".into(),
        retry_ms: Some(250),
        ..SendReply::refused(Code::RATE_LIMITED, "over 20 sends/s", "c-9")
    };
    assert_eq!(
        json_of(&limited),
        json!({"code": 3, "error": "over 20 sends/s", "retry_ms": 250, "cmid": "c-9", "conv": "p:1:2"})
    );
    let ok = SendReply {
        code: Code::OK,
        error: String::new(),
        retry_ms: None,
        cmid: "c-1".into(),
        conv: "p:1:2".into(),
        seq: 1,
        id: "18446744073709551615".into(),
        ts: 1_765_000_000_000_i64,
    };
    assert_eq!(
        json_of(&ok),
        json!({"code": 0, "cmid": "c-1", "conv": "p:1:2", "seq": 1,
               "id": "18446744073709551615", "ts": 1_765_000_000_000_i64})
    );
    assert_eq!(decode::<SendReply>(json_of(&ok)).unwrap(), ok);
    assert_eq!(decode::<SendReply>(json_of(&limited)).unwrap(), limited);
}

#[test]
fn replies_name_their_fields_as_the_contract_does() {
    let sync = SyncReply {
        code: Code::OK,
        msgs: vec![msg(1, Some(10))],
        sync: 10,
        more: true,
        ..SyncReply::default()
    };
    assert_eq!(
        json_of(&sync),
        json!({"code": 0, "msgs": [{"conv": "p:1:2", "seq": 1, "id": "123456789012345678",
               "from": 1, "cmid": "c1", "type": 7, "body": "hi", "ts": 1_765_000_000_000_i64,
               "sync": 10}], "sync": 10, "more": true, "reset": false})
    );
    let pull = PullReply {
        code: Code::OK,
        conv: "p:1:2".into(),
        msgs: vec![msg(2, None)],
        max_seq: 2,
        min_seq: 1,
        ..PullReply::default()
    };
    let value = json_of(&pull);
    assert_eq!(value["msgs"][0].get("sync"), None, "no sync in a PULL page");
    assert_eq!(
        (&value["conv"], &value["max_seq"], &value["min_seq"]),
        (&json!("p:1:2"), &json!(2), &json!(1))
    );
    assert_eq!(value["reset"], json!(false));
    let refused = SyncReply {
        code: Code::UNAVAILABLE,
        error: "message store unavailable".into(),
        ..SyncReply::default()
    };
    assert_eq!(
        json_of(&refused),
        json!({"code": 5, "error": "message store unavailable", "msgs": [],
               "sync": 0, "more": false, "reset": false})
    );
    assert_eq!(
        json_of(&PullRequest {
            conv: "g:a".into(),
            before: Some(50),
            after: None,
            limit: 20
        }),
        json!({"conv": "g:a", "before": 50, "limit": 20})
    );
    assert_eq!(
        json_of(&SyncRequest { sync: 3, limit: 0 }),
        json!({"sync": 3, "limit": 0})
    );
    assert_eq!(
        decode::<SyncRequest>(json!({"sync": 3})).unwrap(),
        SyncRequest { sync: 3, limit: 0 }
    );
    assert_eq!(json_of(&Ack { sync: 12 }), json!({"sync": 12}));
}

#[test]
fn notify_kinds_carry_their_fields() {
    let cases = [
        (
            Notify::Read {
                conv: "p:1:2".into(),
                seq: 5,
            },
            json!({"kind": "read", "conv": "p:1:2", "seq": 5}),
        ),
        (
            Notify::Sync { sync: 40 },
            json!({"kind": "sync", "sync": 40}),
        ),
        (
            Notify::Truncated {
                conv: "g:big".into(),
                max_seq: 900,
            },
            json!({"kind": "truncated", "conv": "g:big", "max_seq": 900}),
        ),
        (
            Notify::Presence {
                mid: 7,
                online: true,
            },
            json!({"kind": "presence", "mid": 7, "online": true}),
        ),
    ];
    for (notify, value) in cases {
        assert_eq!(json_of(&notify), value);
        assert_eq!(decode::<Notify>(value).unwrap(), notify);
    }
    assert_eq!(
        decode::<Notify>(json!({"kind": "typing", "conv": "p:1:2"})).unwrap(),
        Notify::Other,
        "a kind from a newer server"
    );
    assert!(
        decode::<Notify>(json!({"conv": "p:1:2"})).is_err(),
        "no kind"
    );
    assert!(
        decode::<Notify>(json!({"kind": "read", "conv": "p:1:2"})).is_err(),
        "read without seq"
    );
}

#[test]
fn codes_of_any_value_decode() {
    assert_eq!(Code::from(3), Code::RATE_LIMITED);
    assert_eq!(i32::from(Code::UNAVAILABLE), 5);
    assert_eq!(
        [
            Code::OK,
            Code::BAD_REQUEST,
            Code::NOT_ALLOWED,
            Code::RATE_LIMITED,
            Code::TOO_LARGE,
            Code::UNAVAILABLE
        ]
        .map(i32::from),
        [0, 1, 2, 3, 4, 5]
    );
    assert!(Code::OK.is_ok() && !Code::BAD_REQUEST.is_ok());
    assert_eq!(Code(4).to_string(), "4(too_large)");
    let reply: PullReply = decode(json!({"code": 42, "error": "new"})).unwrap();
    assert_eq!((reply.code, reply.code.name()), (Code(42), None));
    assert_eq!(Code(-1).name(), None);
    assert!(
        decode::<PullReply>(json!({"error": "x"})).is_err(),
        "code is required"
    );
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[a-z0-9:_.-]{0,12}"]
}

prop_compose! {
    fn any_msg()(conv in text(), seq in any::<u64>(), id in text(), from in any::<i64>(),
                 cmid in text(), kind in any::<i32>(), body in text(), ts in any::<i64>(),
                 sync in any::<Option<u64>>()) -> Msg {
        Msg { conv, seq, id, from, cmid, kind, body, ts, sync }
    }
}

prop_compose! {
    fn any_send_reply()(code in any::<i32>(), error in text(), retry_ms in any::<Option<u64>>(),
                        cmid in text(), conv in text(), seq in any::<u64>(), id in text(),
                        ts in any::<i64>()) -> SendReply {
        SendReply { code: Code(code), error, retry_ms, cmid, conv, seq, id, ts }
    }
}

fn any_notify() -> impl Strategy<Value = Notify> {
    prop_oneof![
        (text(), any::<u64>()).prop_map(|(conv, seq)| Notify::Read { conv, seq }),
        any::<u64>().prop_map(|sync| Notify::Sync { sync }),
        (text(), any::<u64>()).prop_map(|(conv, max_seq)| Notify::Truncated { conv, max_seq }),
        (any::<i64>(), any::<bool>()).prop_map(|(mid, online)| Notify::Presence { mid, online }),
    ]
}

fn round_trips<B: Body + PartialEq + fmt::Debug>(body: &B) -> Result<(), TestCaseError> {
    let frame = body.to_frame(1);
    prop_assert_eq!(frame.op, B::OP);
    prop_assert_eq!(&B::decode(&frame.body).unwrap(), body);
    Ok(())
}

/// Decodes `bytes` as every body type; the point is that none panics.
fn decode_all(bytes: &[u8]) -> usize {
    [
        SendRequest::decode(bytes).is_ok(),
        SendReply::decode(bytes).is_ok(),
        Ack::decode(bytes).is_ok(),
        Msg::decode(bytes).is_ok(),
        SyncRequest::decode(bytes).is_ok(),
        SyncReply::decode(bytes).is_ok(),
        PullRequest::decode(bytes).is_ok(),
        PullReply::decode(bytes).is_ok(),
        ReadRequest::decode(bytes).is_ok(),
        Notify::decode(bytes).is_ok(),
    ]
    .into_iter()
    .filter(|ok| *ok)
    .count()
}

proptest! {
    #[test]
    fn every_body_round_trips(
        send in (text(), any::<Option<i64>>(), proptest::option::of(text()), any::<i32>(), text()),
        reply in any_send_reply(),
        msgs in proptest::collection::vec(any_msg(), 0..4),
        page in (any::<u64>(), any::<bool>(), any::<bool>(), any::<u64>(), any::<Option<u64>>()),
        pull in (text(), any::<Option<u64>>(), any::<Option<u64>>(), any::<u32>()),
        notify in any_notify(),
    ) {
        let (cmid, to, conv, kind, body) = send;
        round_trips(&SendRequest { cmid, to, conv, kind, body })?;
        round_trips(&reply)?;
        round_trips(&Ack { sync: page.0 })?;
        for m in &msgs {
            round_trips(m)?;
        }
        round_trips(&SyncRequest { sync: page.0, limit: pull.3 })?;
        round_trips(&SyncReply {
            code: reply.code, error: reply.error.clone(), retry_ms: page.4,
            msgs: msgs.clone(), sync: page.0, more: page.1, reset: page.2,
        })?;
        round_trips(&PullRequest { conv: pull.0.clone(), before: pull.1, after: pull.2, limit: pull.3 })?;
        round_trips(&PullReply {
            code: reply.code, error: reply.error.clone(), retry_ms: page.4, conv: pull.0.clone(),
            msgs, max_seq: page.0, min_seq: page.3, reset: page.2,
        })?;
        round_trips(&ReadRequest { conv: pull.0, seq: page.3 })?;
        round_trips(&notify)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        object in any::<bool>(),
    ) {
        // Half the cases open an object, so they reach serde_json's parser.
        let bytes = if object { [&b"{"[..], &bytes].concat() } else { bytes };
        decode_all(&bytes);
    }

    #[test]
    fn arbitrary_json_never_panics(
        keys in proptest::collection::vec(
            prop_oneof![
                Just("cmid"), Just("to"), Just("conv"), Just("type"), Just("body"), Just("sync"),
                Just("seq"), Just("kind"), Just("msgs"), Just("code"), Just("limit"), Just("x"),
            ],
            0..8,
        ),
        values in proptest::collection::vec(
            prop_oneof![
                Just(json!(null)), any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from), any::<f64>().prop_map(Value::from),
                any::<bool>().prop_map(Value::from), text().prop_map(Value::from),
                Just(json!([])), Just(json!({"kind": "sync", "sync": 1})),
                Just(json!("read")), Just(json!([{"seq": 1}])),
            ],
            8,
        ),
    ) {
        let object: serde_json::Map<String, Value> = keys
            .iter()
            .zip(values)
            .map(|(k, v)| ((*k).to_owned(), v))
            .collect();
        decode_all(&serde_json::to_vec(&Value::Object(object)).unwrap());
    }
}
