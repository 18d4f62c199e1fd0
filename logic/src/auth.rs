//! Client authentication: turns the token of a client's Auth frame into an
//! [`Identity`] by the configured policy (`none`, `jwt` or `webhook`).
//!
//! It does not assign a key to a connection that brings none, nor record
//! presence: the logic service does both with the identity returned here.
//!
//! Identity fields (`mid`, `key`, `room_id`, `platform`, `accepts`) read the
//! same way under every policy: `key`, `room_id` and `platform` are strings
//! and `accepts` an array of int32, each empty when missing or `null`; `mid`
//! is required and an int64. Under `jwt` and `webhook` a `mid` may also be a
//! decimal string (`"123"`), because JavaScript cannot write every int64 as
//! a number; under `none` it must be a JSON integer, as goim requires.

mod jwt;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rim_config::{AuthConfig, AuthPolicy};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::webhook::{HttpClient, WebhookError};
use jwt::JwtVerifier;

/// Largest token accepted, in bytes (the comet's default frame body limit).
pub const MAX_TOKEN_LEN: usize = 4096;

/// Longest piece of a webhook's refusal body quoted in the refusal, in chars.
const MAX_QUOTED_BODY: usize = 200;

/// Who a verified token says the client is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// The member (user) id.
    pub mid: i64,
    /// The connection key; empty means logic assigns a fresh UUID.
    pub key: String,
    /// The room to join, `type://id`; empty means no room.
    pub room_id: String,
    /// The client platform (`web`, `ios`, ...), free-form.
    pub platform: String,
    /// The business ops the connection accepts pushes for.
    pub accepts: Vec<i32>,
}

/// Why a token did not yield an identity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The token is malformed, forged or expired, or the business refused it.
    #[error("auth refused: {0}")]
    Refused(String),
    /// The auth webhook could not give an answer (unreachable, timeout, 5xx,
    /// or an answer that is not an identity); the client is not at fault.
    #[error("auth unavailable: {0}")]
    Unavailable(String),
}

/// Verifies client tokens by the configured policy; cheap to clone and share.
#[derive(Clone)]
pub struct Authenticator {
    policy: Arc<Policy>,
}

/// The configured policy with what it needs, prepared once.
enum Policy {
    None,
    Jwt(JwtVerifier),
    Webhook {
        http: HttpClient,
        url: String,
        timeout: Duration,
    },
}

impl Authenticator {
    /// Prepares the policy of `config`; logs a warning when it is `none`.
    pub fn new(config: &AuthConfig, http: HttpClient) -> Authenticator {
        let policy = match config.policy {
            AuthPolicy::None => {
                tracing::warn!(
                    "logic.auth.policy is none: clients are trusted to say who they are (insecure, goim's behaviour): any client may claim any user id and any connection key, and so take over another client's connection and its pushes; keep the client ports private, or set logic.auth.policy = \"jwt\" with logic.auth.jwt_secret (see docs/operations.md, Security)"
                );
                Policy::None
            }
            AuthPolicy::Jwt => Policy::Jwt(JwtVerifier::new(config)),
            AuthPolicy::Webhook => Policy::Webhook {
                http,
                url: config.webhook_url.clone(),
                timeout: config.webhook_timeout,
            },
        };
        Authenticator {
            policy: Arc::new(policy),
        }
    }

    /// Returns the configured policy.
    pub(crate) fn policy(&self) -> AuthPolicy {
        match *self.policy {
            Policy::None => AuthPolicy::None,
            Policy::Jwt(_) => AuthPolicy::Jwt,
            Policy::Webhook { .. } => AuthPolicy::Webhook,
        }
    }

    /// Verifies the body of a client's Auth frame and returns who it is.
    ///
    /// `client_ip` is only passed on to the webhook.
    pub async fn authenticate(&self, token: &[u8], client_ip: &str) -> Result<Identity, AuthError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Refused(format!(
                "token is {} bytes, more than the {MAX_TOKEN_LEN} allowed",
                token.len()
            )));
        }
        match &*self.policy {
            Policy::None => trust(token).map_err(AuthError::Refused),
            Policy::Jwt(verifier) => verifier
                .verify(token, unix_now())
                .map_err(AuthError::Refused),
            Policy::Webhook { http, url, timeout } => {
                ask_webhook(http, url, *timeout, token, client_ip).await
            }
        }
    }
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the jwt secret, nor a webhook URL that may carry one.
        f.debug_struct("Authenticator")
            .field("policy", &self.policy())
            .finish_non_exhaustive()
    }
}

/// Reads goim's JSON token as is (policy `none`).
fn trust(token: &[u8]) -> Result<Identity, String> {
    let fields =
        IdentityFields::parse(token).map_err(|problem| format!("invalid token: {problem}"))?;
    fields
        .into_identity(MidForm::Integer)
        .map_err(|problem| format!("invalid token field {problem}"))
}

/// The request body POSTed to the auth webhook.
#[derive(Serialize)]
struct WebhookRequest<'a> {
    /// The token as sent by the client, or its standard base64 when it is not UTF-8.
    token: Cow<'a, str>,
    /// `"base64"` when `token` is base64; absent when it is the token itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    token_encoding: Option<&'static str>,
    client_ip: &'a str,
}

/// Asks the business whether it knows the token (policy `webhook`).
async fn ask_webhook(
    http: &HttpClient,
    url: &str,
    timeout: Duration,
    token: &[u8],
    client_ip: &str,
) -> Result<Identity, AuthError> {
    let request = match std::str::from_utf8(token) {
        Ok(text) => WebhookRequest {
            token: Cow::Borrowed(text),
            token_encoding: None,
            client_ip,
        },
        Err(_) => WebhookRequest {
            token: Cow::Owned(base64::engine::general_purpose::STANDARD.encode(token)),
            token_encoding: Some("base64"),
            client_ip,
        },
    };
    let (status, body) = match http.post_json(url, &request, timeout).await {
        Ok(answer) => answer,
        Err(WebhookError::Timeout { timeout, .. }) => {
            return Err(AuthError::Unavailable(format!(
                "auth webhook did not answer within {timeout:?}"
            )));
        }
        Err(err) => return Err(AuthError::Unavailable(err.to_string())),
    };
    match status {
        200..=299 => IdentityFields::parse(&body)
            .and_then(|fields| {
                fields
                    .into_identity(MidForm::IntegerOrString)
                    .map_err(|problem| format!("field {problem}"))
            })
            .map_err(|problem| {
                AuthError::Unavailable(format!(
                    "auth webhook answered {status} with a body that is not an identity: {problem}"
                ))
            }),
        401 | 403 => Err(AuthError::Refused(format!(
            "auth webhook refused the token ({status}): {}",
            quote_body(&body)
        ))),
        // Throttling and request timeouts say nothing about the token.
        408 | 429 => Err(AuthError::Unavailable(format!(
            "auth webhook answered {status}: {}",
            quote_body(&body)
        ))),
        400..=499 => Err(AuthError::Refused(format!(
            "auth webhook answered {status}: {}",
            quote_body(&body)
        ))),
        // 5xx, and 3xx since redirects are not followed.
        _ => Err(AuthError::Unavailable(format!(
            "auth webhook answered {status}: {}",
            quote_body(&body)
        ))),
    }
}

/// Quotes the start of an answer body, lossily decoded and trimmed.
fn quote_body(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "empty body".into();
    }
    match text.char_indices().nth(MAX_QUOTED_BODY) {
        Some((cut, _)) => format!("{:?}...", &text[..cut]),
        None => format!("{text:?}"),
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
        })
}

/// How a `mid` may be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MidForm {
    /// Only a JSON integer (goim).
    Integer,
    /// A JSON integer or a decimal string.
    IntegerOrString,
}

/// The identity fields of a JSON object, not yet type-checked.
///
/// Reading a struct (rather than a map) makes a repeated field an error
/// instead of letting the last one silently win.
#[derive(Debug, Default, Deserialize)]
struct IdentityFields {
    mid: Option<Value>,
    key: Option<Value>,
    room_id: Option<Value>,
    platform: Option<Value>,
    accepts: Option<Value>,
}

/// A field that is missing or of the wrong type: `"mid": missing`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldProblem {
    name: &'static str,
    problem: String,
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.name, self.problem)
    }
}

impl IdentityFields {
    /// Parses a JSON object holding identity fields.
    fn parse(json: &[u8]) -> Result<IdentityFields, String> {
        let json = json.trim_ascii();
        if json.is_empty() {
            return Err("empty".into());
        }
        // serde would also read a struct from a JSON array, by position.
        if json.first() != Some(&b'{') {
            return Err("not a json object".into());
        }
        serde_json::from_slice(json).map_err(|err| format!("not a valid json object: {err}"))
    }

    /// Type-checks the fields into an identity.
    fn into_identity(self, mid_form: MidForm) -> Result<Identity, FieldProblem> {
        Ok(Identity {
            mid: read_mid(self.mid, mid_form)?,
            key: read_string("key", self.key)?,
            room_id: read_string("room_id", self.room_id)?,
            platform: read_string("platform", self.platform)?,
            accepts: read_accepts(self.accepts)?,
        })
    }
}

fn read_mid(value: Option<Value>, form: MidForm) -> Result<i64, FieldProblem> {
    let problem = |problem: &str| FieldProblem {
        name: "mid",
        problem: problem.to_owned(),
    };
    match value {
        None => Err(problem("missing")),
        Some(Value::Number(number)) => match number.as_i64() {
            Some(mid) => Ok(mid),
            None if number.is_u64() => Err(problem("out of the int64 range")),
            None => Err(problem("not an integer")),
        },
        Some(Value::String(text)) if form == MidForm::IntegerOrString => {
            let digits = text.strip_prefix('-').unwrap_or(&text);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(problem("not an integer nor a decimal string"));
            }
            text.parse().map_err(|_| problem("out of the int64 range"))
        }
        Some(_) => Err(problem("not an integer")),
    }
}

fn read_string(name: &'static str, value: Option<Value>) -> Result<String, FieldProblem> {
    match value {
        None => Ok(String::new()),
        Some(Value::String(text)) => Ok(text),
        Some(_) => Err(FieldProblem {
            name,
            problem: "not a string".into(),
        }),
    }
}

fn read_accepts(value: Option<Value>) -> Result<Vec<i32>, FieldProblem> {
    let problem = |problem: String| FieldProblem {
        name: "accepts",
        problem,
    };
    match value {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                item.as_i64()
                    .and_then(|op| i32::try_from(op).ok())
                    .ok_or_else(|| problem(format!("element {index} is not an int32")))
            })
            .collect(),
        Some(_) => Err(problem("not an array of int32".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_reads_goim_token() {
        let identity = trust(
            br#"{"mid":7,"key":"k","room_id":"live://1","platform":"web","accepts":[1000,1001]}"#,
        )
        .unwrap();
        assert_eq!(
            identity,
            Identity {
                mid: 7,
                key: "k".into(),
                room_id: "live://1".into(),
                platform: "web".into(),
                accepts: vec![1000, 1001],
            }
        );
    }

    #[test]
    fn trust_names_the_bad_field() {
        let cases: [(&[u8], &str); 9] = [
            (br#"{"key":"k"}"#, r#"invalid token field "mid": missing"#),
            (
                br#"{"mid":"7"}"#,
                r#"invalid token field "mid": not an integer"#,
            ),
            (
                br#"{"mid":1.5}"#,
                r#"invalid token field "mid": not an integer"#,
            ),
            (
                br#"{"mid":18446744073709551615}"#,
                r#"invalid token field "mid": out of the int64 range"#,
            ),
            (
                br#"{"mid":1,"key":5}"#,
                r#"invalid token field "key": not a string"#,
            ),
            (
                br#"{"mid":1,"accepts":[1,"x"]}"#,
                r#"invalid token field "accepts": element 1 is not an int32"#,
            ),
            (
                br#"{"mid":1,"accepts":[4294967296]}"#,
                r#"invalid token field "accepts": element 0 is not an int32"#,
            ),
            (br#"[1,"k"]"#, "invalid token: not a json object"),
            (b"   ", "invalid token: empty"),
        ];
        for (token, want) in cases {
            assert_eq!(
                trust(token).unwrap_err(),
                want,
                "{}",
                String::from_utf8_lossy(token)
            );
        }
    }

    #[test]
    fn repeated_fields_are_refused() {
        let err = trust(br#"{"mid":1,"mid":2}"#).unwrap_err();
        assert!(err.contains("duplicate field"), "{err}");
    }

    #[test]
    fn mid_as_decimal_string_only_where_allowed() {
        let read = |v: Value| read_mid(Some(v), MidForm::IntegerOrString);
        assert_eq!(read(Value::from("-42")).unwrap(), -42);
        assert_eq!(read(Value::from("9223372036854775807")).unwrap(), i64::MAX);
        for bad in ["", "-", "+1", "1e3", " 1", "0x10", "9223372036854775808"] {
            assert!(read(Value::from(bad)).is_err(), "{bad:?}");
        }
        assert!(read_mid(Some(Value::from("1")), MidForm::Integer).is_err());
    }

    #[test]
    fn quote_body_truncates_on_char_boundary() {
        let body = "é".repeat(500);
        let quoted = quote_body(body.as_bytes());
        assert_eq!(
            quoted.chars().filter(|c| *c == 'é').count(),
            MAX_QUOTED_BODY
        );
        assert!(quoted.ends_with("..."));
        assert_eq!(quote_body(b"  no  \n"), "\"no\"");
        assert_eq!(quote_body(b" \n"), "empty body");
    }
}
