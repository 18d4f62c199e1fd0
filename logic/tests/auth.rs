//! Black-box tests of the auth policies: goim's trusted JSON (`none`), HS256
//! tokens built here with hmac + sha2 + base64 (`jwt`), and a business
//! webhook served by axum on 127.0.0.1:0 (`webhook`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use hmac::{Hmac, KeyInit, Mac};
use rim_config::{AuthConfig, AuthPolicy};
use rim_logic::auth::{AuthError, Authenticator, Identity, MAX_TOKEN_LEN};
use rim_logic::{HttpClient, MAX_RESPONSE_BODY, WebhookError};
use serde_json::{Value, json};
use sha2::Sha256;

const SECRET: &str = "test-secret-0123456789-abcdefghijklmnop";
const IP: &str = "203.0.113.7";

fn authenticator(config: AuthConfig) -> Authenticator {
    Authenticator::new(&config, HttpClient::new().expect("http client"))
}

fn refused(result: Result<Identity, AuthError>) -> String {
    match result {
        Err(AuthError::Refused(reason)) => reason,
        other => panic!("expected Refused, got {other:?}"),
    }
}

fn unavailable(result: Result<Identity, AuthError>) -> String {
    match result {
        Err(AuthError::Unavailable(reason)) => reason,
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

// ---------------------------------------------------------------- none

fn none() -> Authenticator {
    authenticator(AuthConfig::default())
}

#[tokio::test]
async fn none_accepts_goim_token() {
    let token = br#"{"mid":123,"key":"k-1","room_id":"live://1000","platform":"web","accepts":[1000,1001,1002]}"#;
    let identity = none().authenticate(token, IP).await.unwrap();
    assert_eq!(
        identity,
        Identity {
            mid: 123,
            key: "k-1".into(),
            room_id: "live://1000".into(),
            platform: "web".into(),
            accepts: vec![1000, 1001, 1002],
        }
    );
}

#[tokio::test]
async fn none_defaults_missing_optional_fields() {
    let identity = none().authenticate(br#"{"mid":-5}"#, IP).await.unwrap();
    assert_eq!(
        identity,
        Identity {
            mid: -5,
            ..Identity::default()
        }
    );
}

#[tokio::test]
async fn none_refuses_missing_mid() {
    let reason = refused(
        none()
            .authenticate(br#"{"key":"k","room_id":"live://1"}"#, IP)
            .await,
    );
    assert_eq!(reason, r#"invalid token field "mid": missing"#);
}

#[tokio::test]
async fn none_refuses_non_integer_mid() {
    for token in [
        &br#"{"mid":"123"}"#[..],
        br#"{"mid":1.5}"#,
        br#"{"mid":null}"#,
        br#"{"mid":[1]}"#,
    ] {
        let reason = refused(none().authenticate(token, IP).await);
        assert!(
            reason.starts_with(r#"invalid token field "mid""#),
            "{reason}"
        );
    }
}

#[tokio::test]
async fn none_refuses_invalid_json() {
    for token in [
        &b"{\"mid\":1"[..],
        b"mid=1",
        b"",
        b"\xff\xfe",
        br#"{"mid":1} trailing"#,
        b"[1]",
    ] {
        let reason = refused(none().authenticate(token, IP).await);
        assert!(reason.starts_with("invalid token: "), "{reason}");
    }
}

#[tokio::test]
async fn none_refuses_oversized_token() {
    let pad = "x".repeat(MAX_TOKEN_LEN);
    let token = format!(r#"{{"mid":1,"key":"{pad}"}}"#);
    let reason = refused(none().authenticate(token.as_bytes(), IP).await);
    assert!(reason.contains("more than the 4096 allowed"), "{reason}");
    // Right at the limit is still read.
    let fits = format!(r#"{{"mid":1,"key":"{}"}}"#, "x".repeat(MAX_TOKEN_LEN - 18));
    assert_eq!(fits.len(), MAX_TOKEN_LEN);
    assert_eq!(
        none().authenticate(fits.as_bytes(), IP).await.unwrap().mid,
        1
    );
}

// ---------------------------------------------------------------- jwt

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn jwt(issuer: &str, audience: &str) -> Authenticator {
    authenticator(AuthConfig {
        policy: AuthPolicy::Jwt,
        jwt_secret: SECRET.into(),
        jwt_issuer: issuer.into(),
        jwt_audience: audience.into(),
        jwt_leeway: Duration::from_secs(30),
        ..AuthConfig::default()
    })
}

/// HMAC-SHA256 of `signing_input`, base64url without padding.
fn signature(secret: &str, signing_input: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(signing_input.as_bytes());
    URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

/// A compact JWS from already-encoded parts, signed with `secret`.
fn sign_encoded(secret: &str, header_b64: &str, payload_b64: &str) -> String {
    let input = format!("{header_b64}.{payload_b64}");
    let sig = signature(secret, &input);
    format!("{input}.{sig}")
}

fn sign_with(secret: &str, header: &Value, claims: &Value) -> String {
    sign_encoded(
        secret,
        &URL_SAFE_NO_PAD.encode(header.to_string()),
        &URL_SAFE_NO_PAD.encode(claims.to_string()),
    )
}

fn hs256() -> Value {
    json!({"alg": "HS256", "typ": "JWT"})
}

fn sign(claims: &Value) -> String {
    sign_with(SECRET, &hs256(), claims)
}

fn claims() -> Value {
    json!({
        "mid": 42,
        "key": "k-42",
        "room_id": "live://7",
        "platform": "ios",
        "accepts": [1000, 2000],
        "exp": now() + 300,
        "iat": now(),
    })
}

fn with(mut claims: Value, name: &str, value: Value) -> Value {
    claims[name] = value;
    claims
}

fn without(mut claims: Value, name: &str) -> Value {
    claims.as_object_mut().unwrap().remove(name);
    claims
}

#[tokio::test]
async fn jwt_accepts_valid_token() {
    let token = sign(&claims());
    let identity = jwt("", "")
        .authenticate(token.as_bytes(), IP)
        .await
        .unwrap();
    assert_eq!(
        identity,
        Identity {
            mid: 42,
            key: "k-42".into(),
            room_id: "live://7".into(),
            platform: "ios".into(),
            accepts: vec![1000, 2000],
        }
    );
}

#[tokio::test]
async fn jwt_trims_surrounding_whitespace() {
    let token = format!(" \r\n{}\n ", sign(&claims()));
    assert_eq!(
        jwt("", "")
            .authenticate(token.as_bytes(), IP)
            .await
            .unwrap()
            .mid,
        42
    );
}

#[tokio::test]
async fn jwt_accepts_mid_as_decimal_string() {
    let token = sign(&with(claims(), "mid", json!("9007199254740993")));
    let identity = jwt("", "")
        .authenticate(token.as_bytes(), IP)
        .await
        .unwrap();
    assert_eq!(identity.mid, 9_007_199_254_740_993);
}

#[tokio::test]
async fn jwt_refuses_bad_mid() {
    for mid in [json!(null), json!("12a"), json!(1.5), json!({"id": 1})] {
        let token = sign(&with(claims(), "mid", mid.clone()));
        let reason = refused(jwt("", "").authenticate(token.as_bytes(), IP).await);
        assert!(
            reason.starts_with(r#"invalid jwt claim "mid""#),
            "{mid}: {reason}"
        );
    }
    let token = sign(&without(claims(), "mid"));
    let reason = refused(jwt("", "").authenticate(token.as_bytes(), IP).await);
    assert_eq!(reason, r#"invalid jwt claim "mid": missing"#);
}

#[tokio::test]
async fn jwt_refuses_expired_beyond_leeway() {
    let token = sign(&with(claims(), "exp", json!(now() - 120)));
    let reason = refused(jwt("", "").authenticate(token.as_bytes(), IP).await);
    assert!(reason.starts_with("jwt expired 12"), "{reason}");
    assert!(reason.ends_with("s ago (leeway 30 s)"), "{reason}");
}

#[tokio::test]
async fn jwt_accepts_expired_within_leeway() {
    let token = sign(&with(claims(), "exp", json!(now() - 10)));
    assert_eq!(
        jwt("", "")
            .authenticate(token.as_bytes(), IP)
            .await
            .unwrap()
            .mid,
        42
    );
}

#[tokio::test]
async fn jwt_refuses_missing_exp() {
    let token = sign(&without(claims(), "exp"));
    let reason = refused(jwt("", "").authenticate(token.as_bytes(), IP).await);
    assert_eq!(reason, "jwt has no exp claim");
}

#[tokio::test]
async fn jwt_refuses_nbf_in_the_future() {
    let token = sign(&with(claims(), "nbf", json!(now() + 120)));
    let reason = refused(jwt("", "").authenticate(token.as_bytes(), IP).await);
    assert!(
        reason.starts_with("jwt is not valid for another "),
        "{reason}"
    );
    // Within the leeway, and in the past, it is accepted.
    for nbf in [now() + 10, now() - 60] {
        let token = sign(&with(claims(), "nbf", json!(nbf)));
        assert!(jwt("", "").authenticate(token.as_bytes(), IP).await.is_ok());
    }
}

#[tokio::test]
async fn jwt_refuses_forged_payload() {
    let genuine = sign(&claims());
    let parts: Vec<&str> = genuine.split('.').collect();
    let forged_claims = URL_SAFE_NO_PAD.encode(with(claims(), "mid", json!(1)).to_string());
    let forged = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);
    let reason = refused(jwt("", "").authenticate(forged.as_bytes(), IP).await);
    assert_eq!(reason, "jwt signature does not verify");
}

#[tokio::test]
async fn jwt_refuses_other_secret() {
    let token = sign_with("another-secret-0123456789-abcdefghijk", &hs256(), &claims());
    let reason = refused(jwt("", "").authenticate(token.as_bytes(), IP).await);
    assert_eq!(reason, "jwt signature does not verify");
}

#[tokio::test]
async fn jwt_refuses_truncated_or_extended_signature() {
    let genuine = sign(&claims());
    let (input, sig) = genuine.rsplit_once('.').unwrap();
    let short = URL_SAFE_NO_PAD.encode(&URL_SAFE_NO_PAD.decode(sig).unwrap()[..16]);
    let long = URL_SAFE_NO_PAD.encode([URL_SAFE_NO_PAD.decode(sig).unwrap(), vec![0]].concat());
    for sig in [short, long] {
        let token = format!("{input}.{sig}");
        let reason = refused(jwt("", "").authenticate(token.as_bytes(), IP).await);
        assert_eq!(reason, "jwt signature does not verify");
    }
}

#[tokio::test]
async fn jwt_refuses_alg_none() {
    for header in [json!({"alg": "none", "typ": "JWT"}), json!({"alg": "none"})] {
        let unsigned = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims().to_string())
        );
        let reason = refused(jwt("", "").authenticate(unsigned.as_bytes(), IP).await);
        assert_eq!(reason, r#"jwt alg "none" is not allowed (only HS256 is)"#);
    }
}

#[tokio::test]
async fn jwt_refuses_other_algs() {
    for alg in ["HS512", "RS256", "ES256", "HS384", "hs256", "HS256 ", ""] {
        // Signed with the shared secret, so only the alg can make it fail.
        let token = sign_with(SECRET, &json!({"alg": alg, "typ": "JWT"}), &claims());
        let reason = refused(jwt("", "").authenticate(token.as_bytes(), IP).await);
        assert_eq!(
            reason,
            format!("jwt alg {alg:?} is not allowed (only HS256 is)")
        );
    }
    let token = sign_with(SECRET, &json!({"typ": "JWT"}), &claims());
    let reason = refused(jwt("", "").authenticate(token.as_bytes(), IP).await);
    assert_eq!(reason, "jwt header has no alg");
}

#[tokio::test]
async fn jwt_refuses_typ_other_than_jwt() {
    let token = sign_with(SECRET, &json!({"alg": "HS256", "typ": "at+jwt"}), &claims());
    let reason = refused(jwt("", "").authenticate(token.as_bytes(), IP).await);
    assert_eq!(reason, r#"jwt typ "at+jwt" is not JWT"#);
    // typ is optional.
    let token = sign_with(SECRET, &json!({"alg": "HS256"}), &claims());
    assert!(jwt("", "").authenticate(token.as_bytes(), IP).await.is_ok());
}

#[tokio::test]
async fn jwt_checks_issuer_when_configured() {
    let auth = jwt("https://biz.example", "");
    let good = sign(&with(claims(), "iss", json!("https://biz.example")));
    assert!(auth.authenticate(good.as_bytes(), IP).await.is_ok());

    let wrong = sign(&with(claims(), "iss", json!("https://evil.example")));
    let reason = refused(auth.authenticate(wrong.as_bytes(), IP).await);
    assert_eq!(
        reason,
        r#"jwt iss "https://evil.example" is not the expected issuer "https://biz.example""#
    );
    let missing = sign(&claims());
    let reason = refused(auth.authenticate(missing.as_bytes(), IP).await);
    assert_eq!(
        reason,
        r#"jwt has no iss claim, expected "https://biz.example""#
    );
    // Unchecked when not configured.
    assert!(jwt("", "").authenticate(wrong.as_bytes(), IP).await.is_ok());
}

#[tokio::test]
async fn jwt_checks_audience_when_configured() {
    let auth = jwt("", "rim");
    for aud in [json!("rim"), json!(["other", "rim"]), json!(["rim"])] {
        let token = sign(&with(claims(), "aud", aud.clone()));
        assert!(
            auth.authenticate(token.as_bytes(), IP).await.is_ok(),
            "{aud}"
        );
    }
    for aud in [json!("other"), json!(["other", "rims"]), json!([])] {
        let token = sign(&with(claims(), "aud", aud.clone()));
        let reason = refused(auth.authenticate(token.as_bytes(), IP).await);
        assert_eq!(reason, r#"jwt aud does not include "rim""#, "{aud}");
    }
    for aud in [json!(1), json!(["rim", 1])] {
        let token = sign(&with(claims(), "aud", aud.clone()));
        let reason = refused(auth.authenticate(token.as_bytes(), IP).await);
        assert!(
            reason.starts_with(r#"invalid jwt claim "aud""#),
            "{aud}: {reason}"
        );
    }
    let token = sign(&claims());
    let reason = refused(auth.authenticate(token.as_bytes(), IP).await);
    assert_eq!(reason, r#"jwt has no aud claim, expected "rim""#);
}

#[tokio::test]
async fn jwt_refuses_padded_base64() {
    // A header whose JSON length is not a multiple of 3 gets '=' padding; the
    // token is correctly signed over the padded text, so only the encoding
    // can make it fail.
    let header = r#"{"alg":"HS256","typ":"JWT","k":"1"}"#;
    let padded = URL_SAFE.encode(header);
    assert!(padded.ends_with('='), "{padded}");
    let payload = URL_SAFE_NO_PAD.encode(claims().to_string());
    let token = sign_encoded(SECRET, &padded, &payload);
    let reason = refused(jwt("", "").authenticate(token.as_bytes(), IP).await);
    assert_eq!(reason, "jwt header is not base64url without padding");

    let genuine = sign(&claims());
    let padded_sig = format!("{genuine}=");
    let reason = refused(jwt("", "").authenticate(padded_sig.as_bytes(), IP).await);
    assert_eq!(reason, "jwt signature is not base64url without padding");
}

#[tokio::test]
async fn jwt_refuses_standard_alphabet_base64() {
    // Find a header whose standard base64 uses '+' or '/', then sign it so
    // only the alphabet can make it fail.
    let header = (0..64)
        .map(|n| format!(r#"{{"alg":"HS256","kid":"{}?>"}}"#, "?".repeat(n)))
        .find(|h| STANDARD_NO_PAD.encode(h).contains(['+', '/']))
        .unwrap();
    let payload = URL_SAFE_NO_PAD.encode(claims().to_string());
    let token = sign_encoded(SECRET, &STANDARD_NO_PAD.encode(&header), &payload);
    let reason = refused(jwt("", "").authenticate(token.as_bytes(), IP).await);
    assert_eq!(reason, "jwt header is not base64url without padding");
    // The same header in base64url is accepted.
    let token = sign_encoded(SECRET, &URL_SAFE_NO_PAD.encode(&header), &payload);
    assert!(jwt("", "").authenticate(token.as_bytes(), IP).await.is_ok());
}

#[tokio::test]
async fn jwt_refuses_garbage_without_panic() {
    let auth = jwt("iss", "aud");
    let not_json = URL_SAFE_NO_PAD.encode("not json");
    let header = URL_SAFE_NO_PAD.encode(hs256().to_string());
    let array = URL_SAFE_NO_PAD.encode("[42]");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"".to_vec(), "jwt is empty"),
        (b"   ".to_vec(), "jwt is empty"),
        (
            b"abc".to_vec(),
            "jwt has 1 dot-separated parts, expected 3 (header.payload.signature)",
        ),
        (
            b"a.b".to_vec(),
            "jwt has 2 dot-separated parts, expected 3 (header.payload.signature)",
        ),
        (
            b"a.b.c.d.e".to_vec(),
            "jwt has 5 dot-separated parts, expected 3 (header.payload.signature)",
        ),
        (b"..".to_vec(), "jwt header is not a json object"),
        (
            b"!!!.###.$$$".to_vec(),
            "jwt header is not base64url without padding",
        ),
        (
            b"\xff\xfe.\x00.\x80".to_vec(),
            "jwt header is not base64url without padding",
        ),
        (
            format!("{not_json}.e30.sig").into_bytes(),
            "jwt header is not a json object",
        ),
        (
            format!("{header}.e30.!!").into_bytes(),
            "jwt signature is not base64url without padding",
        ),
        (
            sign_encoded(SECRET, &header, &not_json).into_bytes(),
            "jwt payload is not a json object",
        ),
        (
            sign_encoded(SECRET, &header, &array).into_bytes(),
            "jwt payload is not a json object",
        ),
        (
            sign_encoded(SECRET, &header, "").into_bytes(),
            "jwt payload is not a json object",
        ),
    ];
    for (token, want) in cases {
        let reason = refused(auth.authenticate(&token, IP).await);
        assert_eq!(reason, want, "{}", String::from_utf8_lossy(&token));
    }

    // Every strict prefix of a valid token, and every single-byte change to
    // it, is refused.
    let jwt = jwt("", "");
    let token = sign(&claims()).into_bytes();
    assert!(jwt.authenticate(&token, IP).await.is_ok());
    for len in 0..token.len() {
        refused(jwt.authenticate(&token[..len], IP).await);
    }
    for at in 0..token.len() {
        let mut changed = token.clone();
        changed[at] = if changed[at] == b'A' { b'B' } else { b'A' };
        refused(jwt.authenticate(&changed, IP).await);
    }
}

#[tokio::test]
async fn jwt_refuses_oversized_token() {
    let token = sign(&with(claims(), "pad", json!("x".repeat(MAX_TOKEN_LEN))));
    let reason = refused(jwt("", "").authenticate(token.as_bytes(), IP).await);
    assert!(reason.contains("more than the 4096 allowed"), "{reason}");
}

#[tokio::test]
async fn jwt_refusals_never_echo_the_secret() {
    let auth = jwt("iss", "aud");
    let tokens = [
        sign(&claims()),
        sign(&with(claims(), "exp", json!(0))),
        sign_with(SECRET, &json!({"alg": "none"}), &claims()),
        sign_with("x", &hs256(), &claims()),
        format!("{SECRET}.{SECRET}.{SECRET}"),
    ];
    for token in tokens {
        let reason = refused(auth.authenticate(token.as_bytes(), IP).await);
        assert!(!reason.contains(SECRET), "{reason}");
    }
    assert!(!format!("{auth:?}").contains(SECRET));
}

// ---------------------------------------------------------------- webhook

/// Request bodies the fake business saw.
type Seen = Arc<Mutex<Vec<Value>>>;

/// Starts a fake business on 127.0.0.1:0 with one route per behaviour.
async fn business() -> (SocketAddr, Seen) {
    let seen: Seen = Arc::default();
    let router = Router::new()
        .route(
            "/ok",
            post(|State(seen): State<Seen>, Json(body): Json<Value>| async move {
                seen.lock().unwrap().push(body);
                Json(json!({
                    "mid": 7, "key": "", "room_id": "live://9", "platform": "android", "accepts": [1000]
                }))
            }),
        )
        .route(
            "/mid-as-string",
            post(|| async { Json(json!({"mid": "9223372036854775807"})) }),
        )
        .route(
            "/forbidden",
            post(|| async { (StatusCode::FORBIDDEN, "user 7 is banned") }),
        )
        .route(
            "/unauthorized-long",
            post(|| async { (StatusCode::UNAUTHORIZED, "z".repeat(10_000)) }),
        )
        .route("/not-found", post(|| async { StatusCode::NOT_FOUND }))
        .route(
            "/too-many",
            post(|| async { (StatusCode::TOO_MANY_REQUESTS, "slow down") }),
        )
        .route(
            "/error",
            post(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "database down") }),
        )
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Json(json!({"mid": 1}))
            }),
        )
        .route("/html", post(|| async { "<html>hello</html>" }))
        .route("/no-mid", post(|| async { Json(json!({"key": "k"})) }))
        .route(
            "/redirect",
            post(|| async { (StatusCode::FOUND, [("location", "/ok")]) }),
        )
        .route(
            "/huge",
            post(|| async { "x".repeat(MAX_RESPONSE_BODY + 1) }),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (addr, seen)
}

fn webhook(addr: SocketAddr, path: &str, timeout: Duration) -> Authenticator {
    authenticator(AuthConfig {
        policy: AuthPolicy::Webhook,
        webhook_url: format!("http://{addr}{path}"),
        webhook_timeout: timeout,
        ..AuthConfig::default()
    })
}

const TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn webhook_accepts_identity_and_sends_token_and_client_ip() {
    let (addr, seen) = business().await;
    let identity = webhook(addr, "/ok", TIMEOUT)
        .authenticate(b"opaque-session-token", IP)
        .await
        .unwrap();
    assert_eq!(
        identity,
        Identity {
            mid: 7,
            key: String::new(),
            room_id: "live://9".into(),
            platform: "android".into(),
            accepts: vec![1000],
        }
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![json!({"token": "opaque-session-token", "client_ip": IP})]
    );
}

#[tokio::test]
async fn webhook_sends_non_utf8_token_as_base64() {
    let (addr, seen) = business().await;
    let token = b"\xff\x00binary";
    webhook(addr, "/ok", TIMEOUT)
        .authenticate(token, IP)
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![json!({"token": STANDARD.encode(token), "token_encoding": "base64", "client_ip": IP})]
    );
}

#[tokio::test]
async fn webhook_accepts_mid_as_decimal_string() {
    let (addr, _) = business().await;
    let identity = webhook(addr, "/mid-as-string", TIMEOUT)
        .authenticate(b"t", IP)
        .await
        .unwrap();
    assert_eq!(identity.mid, i64::MAX);
}

#[tokio::test]
async fn webhook_refuses_on_403_with_the_body() {
    let (addr, _) = business().await;
    let reason = refused(
        webhook(addr, "/forbidden", TIMEOUT)
            .authenticate(b"t", IP)
            .await,
    );
    assert_eq!(
        reason,
        r#"auth webhook refused the token (403): "user 7 is banned""#
    );
}

#[tokio::test]
async fn webhook_refusal_quotes_a_truncated_body() {
    let (addr, _) = business().await;
    let reason = refused(
        webhook(addr, "/unauthorized-long", TIMEOUT)
            .authenticate(b"t", IP)
            .await,
    );
    assert!(
        reason.starts_with("auth webhook refused the token (401): \"zzz"),
        "{reason}"
    );
    assert!(reason.ends_with("\"..."), "{reason}");
    assert!(reason.len() < 300, "{} chars", reason.len());
}

#[tokio::test]
async fn webhook_refuses_on_other_4xx() {
    let (addr, _) = business().await;
    let reason = refused(
        webhook(addr, "/not-found", TIMEOUT)
            .authenticate(b"t", IP)
            .await,
    );
    assert_eq!(reason, "auth webhook answered 404: empty body");
}

#[tokio::test]
async fn webhook_throttling_is_unavailable() {
    let (addr, _) = business().await;
    let reason = unavailable(
        webhook(addr, "/too-many", TIMEOUT)
            .authenticate(b"t", IP)
            .await,
    );
    assert_eq!(reason, r#"auth webhook answered 429: "slow down""#);
}

#[tokio::test]
async fn webhook_unavailable_on_500() {
    let (addr, _) = business().await;
    let reason = unavailable(
        webhook(addr, "/error", TIMEOUT)
            .authenticate(b"t", IP)
            .await,
    );
    assert_eq!(reason, r#"auth webhook answered 500: "database down""#);
}

#[tokio::test]
async fn webhook_unavailable_on_timeout() {
    let (addr, _) = business().await;
    let auth = webhook(addr, "/slow", Duration::from_millis(200));
    let reason = unavailable(auth.authenticate(b"t", IP).await);
    assert_eq!(reason, "auth webhook did not answer within 200ms");
}

#[tokio::test]
async fn webhook_unavailable_on_bad_json() {
    let (addr, _) = business().await;
    let reason = unavailable(webhook(addr, "/html", TIMEOUT).authenticate(b"t", IP).await);
    assert_eq!(
        reason,
        "auth webhook answered 200 with a body that is not an identity: not a json object"
    );
    let reason = unavailable(
        webhook(addr, "/no-mid", TIMEOUT)
            .authenticate(b"t", IP)
            .await,
    );
    assert_eq!(
        reason,
        r#"auth webhook answered 200 with a body that is not an identity: field "mid": missing"#
    );
}

#[tokio::test]
async fn webhook_does_not_follow_redirects() {
    let (addr, seen) = business().await;
    let reason = unavailable(
        webhook(addr, "/redirect", TIMEOUT)
            .authenticate(b"t", IP)
            .await,
    );
    assert!(reason.starts_with("auth webhook answered 302"), "{reason}");
    assert!(seen.lock().unwrap().is_empty(), "the token was sent to /ok");
}

#[tokio::test]
async fn webhook_unavailable_when_unreachable() {
    // Bind then drop: the port is closed (nothing else binds it in between
    // on loopback in practice, and a refusal is all this needs).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let reason = unavailable(webhook(addr, "/auth", TIMEOUT).authenticate(b"t", IP).await);
    assert!(
        reason.starts_with(&format!("webhook http://{addr}/auth is unreachable")),
        "{reason}"
    );
}

#[tokio::test]
async fn webhook_refuses_oversized_token_without_calling() {
    let (addr, seen) = business().await;
    let token = vec![b'x'; MAX_TOKEN_LEN + 1];
    refused(webhook(addr, "/ok", TIMEOUT).authenticate(&token, IP).await);
    assert!(seen.lock().unwrap().is_empty());
}

// ---------------------------------------------------------------- http client

#[tokio::test]
async fn http_client_bounds_the_answer_body() {
    let (addr, _) = business().await;
    let http = HttpClient::new().unwrap();
    let err = http
        .post_json(&format!("http://{addr}/huge"), &json!({}), TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            WebhookError::BodyTooLarge {
                limit: MAX_RESPONSE_BODY,
                ..
            }
        ),
        "{err}"
    );
    // Unavailable through the authenticator too.
    let reason = unavailable(webhook(addr, "/huge", TIMEOUT).authenticate(b"t", IP).await);
    assert!(reason.contains("longer than 65536 bytes"), "{reason}");
}

#[tokio::test]
async fn http_client_returns_any_status_with_its_body() {
    let (addr, _) = business().await;
    let http = HttpClient::new().unwrap();
    let (status, body) = http
        .post_json(&format!("http://{addr}/error"), &json!({"x": 1}), TIMEOUT)
        .await
        .unwrap();
    assert_eq!((status, &body[..]), (500, &b"database down"[..]));
}

#[tokio::test]
async fn http_client_speaks_https_or_fails_cleanly() {
    // No TLS server here: an https call to a closed port must fail with a
    // connect error, proving the TLS stack is set up without panicking.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let http = HttpClient::new().unwrap();
    let err = http
        .post_json(
            &format!("https://user:pw@{addr}/auth?sig=s3cret"),
            &json!({}),
            TIMEOUT,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, WebhookError::Connect { .. }), "{err}");
    let text = err.to_string();
    assert!(!text.contains("s3cret") && !text.contains("pw@"), "{text}");
}

#[tokio::test]
async fn https_handshake_against_a_plain_server_fails_cleanly() {
    // A TLS ClientHello sent to a plain HTTP server: the handshake fails and
    // is reported, not panicked on.
    let (addr, _) = business().await;
    let http = HttpClient::new().unwrap();
    let err = http
        .post_json(&format!("https://{addr}/ok"), &json!({}), TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, WebhookError::Connect { .. }), "{err}");
}

/// Set in the child process of `http_client_works_without_ca_certificates`.
const NO_CA_CHILD: &str = "RIM_TEST_NO_CA_CHILD";

#[test]
fn http_client_works_without_ca_certificates() {
    if std::env::var_os(NO_CA_CHILD).is_some() {
        // Child: SSL_CERT_FILE / SSL_CERT_DIR point at nothing, as on a host
        // without ca-certificates.
        let http = HttpClient::new().expect("the client builds without CA certificates");
        assert!(
            reqwest::Client::builder().build().is_err(),
            "this environment still has CA certificates: the fallback is not exercised"
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (addr, _) = business().await;
            let (status, _) = http
                .post_json(&format!("http://{addr}/error"), &json!({}), TIMEOUT)
                .await
                .expect("plain http works without CA certificates");
            assert_eq!(status, 500);
        });
        return;
    }
    // Parent: environment variables cannot be changed safely in a threaded
    // test binary, so run this test again in a child process.
    let dir = std::env::temp_dir().join(format!("rim-logic-no-ca-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("certs")).unwrap();
    std::fs::write(dir.join("empty.pem"), "").unwrap();
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "http_client_works_without_ca_certificates",
            "--nocapture",
        ])
        .env(NO_CA_CHILD, "1")
        .env("SSL_CERT_FILE", dir.join("empty.pem"))
        .env("SSL_CERT_DIR", dir.join("certs"))
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
