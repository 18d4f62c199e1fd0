//! The `jwt` policy: a compact JWS (RFC 7515) signed with HS256 whose claims
//! (RFC 7519) carry the identity.
//!
//! Only `HS256` is accepted, whatever the header says, so a token cannot pick
//! a weaker or keyless algorithm (`none`) or confuse a public key for an HMAC
//! secret. Parts are strict base64url without padding; a `crit` header is
//! refused since no extension is understood. The signature is checked in
//! constant time before any claim is read. `exp` is required, `nbf` checked
//! when present, both with the configured leeway; `iss` and `aud` are checked
//! only when configured (a token's `aud` is otherwise ignored).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use rim_config::AuthConfig;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::Sha256;

use super::{Identity, IdentityFields, MidForm};

/// Longest piece of a claim or header value quoted in a refusal, in chars.
const MAX_QUOTED: usize = 64;

/// Verifies HS256 tokens with the configured secret and claim rules.
#[derive(Clone)]
pub(crate) struct JwtVerifier {
    /// The HMAC keyed with the secret once; cloned for each token.
    mac: Hmac<Sha256>,
    issuer: Option<String>,
    audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    leeway: i64,
}

/// The JOSE header fields that matter; others (`kid`, ...) are ignored.
#[derive(Deserialize)]
struct Header {
    alg: Option<Value>,
    typ: Option<Value>,
    crit: Option<Value>,
}

/// The registered claims checked here plus the identity claims.
#[derive(Deserialize)]
struct Claims {
    exp: Option<Value>,
    nbf: Option<Value>,
    iss: Option<Value>,
    aud: Option<Value>,
    mid: Option<Value>,
    key: Option<Value>,
    room_id: Option<Value>,
    platform: Option<Value>,
    accepts: Option<Value>,
}

impl JwtVerifier {
    /// Keys the HMAC with `jwt_secret` and reads the claim rules of `config`.
    pub(crate) fn new(config: &AuthConfig) -> JwtVerifier {
        // HMAC takes a key of any length (longer keys are hashed first), so
        // new_from_slice cannot fail for Hmac<Sha256>.
        let mac = Hmac::<Sha256>::new_from_slice(config.jwt_secret.as_bytes())
            .expect("hmac accepts keys of any length");
        let configured = |value: &str| (!value.is_empty()).then(|| value.to_owned());
        JwtVerifier {
            mac,
            issuer: configured(&config.jwt_issuer),
            audience: configured(&config.jwt_audience),
            leeway: i64::try_from(config.jwt_leeway.as_secs()).unwrap_or(i64::MAX),
        }
    }

    /// Verifies `token` at `now` (Unix seconds) and returns its identity, or
    /// says what failed.
    pub(crate) fn verify(&self, token: &[u8], now: i64) -> Result<Identity, String> {
        let token = token.trim_ascii();
        if token.is_empty() {
            return Err("jwt is empty".into());
        }
        let parts: Vec<&[u8]> = token.splitn(4, |b| *b == b'.').collect();
        let [header_b64, payload_b64, signature_b64] = parts[..] else {
            let dots = token.iter().filter(|b| **b == b'.').count();
            return Err(format!(
                "jwt has {} dot-separated parts, expected 3 (header.payload.signature)",
                dots + 1
            ));
        };

        let header: Header = decode_json("header", header_b64)?;
        match header.alg {
            Some(Value::String(alg)) if alg == "HS256" => {}
            Some(Value::String(alg)) => {
                return Err(format!(
                    "jwt alg {:?} is not allowed (only HS256 is)",
                    clip(&alg)
                ));
            }
            Some(_) => return Err("jwt alg is not a string".into()),
            None => return Err("jwt header has no alg".into()),
        }
        match header.typ {
            None => {}
            // Media types are case-insensitive (RFC 7515, section 4.1.9).
            Some(Value::String(typ)) if typ.eq_ignore_ascii_case("JWT") => {}
            Some(Value::String(typ)) => {
                return Err(format!("jwt typ {:?} is not JWT", clip(&typ)));
            }
            Some(_) => return Err("jwt typ is not a string".into()),
        }
        if header.crit.is_some() {
            return Err("jwt crit header is not supported".into());
        }

        let signature = URL_SAFE_NO_PAD
            .decode(signature_b64)
            .map_err(|_| "jwt signature is not base64url without padding".to_owned())?;
        let mut mac = self.mac.clone();
        mac.update(&token[..header_b64.len() + 1 + payload_b64.len()]);
        mac.verify_slice(&signature)
            .map_err(|_| "jwt signature does not verify".to_owned())?;

        let claims: Claims = decode_json("payload", payload_b64)?;
        self.check_times(&claims, now)?;
        self.check_issuer(claims.iss)?;
        self.check_audience(claims.aud)?;
        IdentityFields {
            mid: claims.mid,
            key: claims.key,
            room_id: claims.room_id,
            platform: claims.platform,
            accepts: claims.accepts,
        }
        .into_identity(MidForm::IntegerOrString)
        .map_err(|problem| format!("invalid jwt claim {problem}"))
    }

    fn check_times(&self, claims: &Claims, now: i64) -> Result<(), String> {
        let exp = match &claims.exp {
            Some(value) => numeric_date("exp", value, f64::floor)?,
            None => return Err("jwt has no exp claim".into()),
        };
        // Valid only while now < exp (RFC 7519, section 4.1.4).
        if now >= exp.saturating_add(self.leeway) {
            return Err(format!(
                "jwt expired {} s ago (leeway {} s)",
                now.saturating_sub(exp),
                self.leeway
            ));
        }
        if let Some(value) = &claims.nbf {
            let nbf = numeric_date("nbf", value, f64::ceil)?;
            if now.saturating_add(self.leeway) < nbf {
                return Err(format!(
                    "jwt is not valid for another {} s (leeway {} s)",
                    nbf.saturating_sub(now),
                    self.leeway
                ));
            }
        }
        Ok(())
    }

    fn check_issuer(&self, iss: Option<Value>) -> Result<(), String> {
        let Some(expected) = &self.issuer else {
            return Ok(());
        };
        match iss {
            Some(Value::String(iss)) if iss == *expected => Ok(()),
            Some(Value::String(iss)) => Err(format!(
                "jwt iss {:?} is not the expected issuer {expected:?}",
                clip(&iss)
            )),
            Some(_) => Err(r#"invalid jwt claim "iss": not a string"#.into()),
            None => Err(format!("jwt has no iss claim, expected {expected:?}")),
        }
    }

    fn check_audience(&self, aud: Option<Value>) -> Result<(), String> {
        let Some(expected) = &self.audience else {
            return Ok(());
        };
        let not_strings = || r#"invalid jwt claim "aud": not a string nor an array of strings"#;
        let found = match aud {
            None => return Err(format!("jwt has no aud claim, expected {expected:?}")),
            Some(Value::String(aud)) => aud == *expected,
            Some(Value::Array(items)) => {
                let mut found = false;
                for item in items {
                    match item {
                        Value::String(aud) => found |= aud == *expected,
                        _ => return Err(not_strings().into()),
                    }
                }
                found
            }
            Some(_) => return Err(not_strings().into()),
        };
        if found {
            Ok(())
        } else {
            Err(format!("jwt aud does not include {expected:?}"))
        }
    }
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .finish_non_exhaustive()
    }
}

/// Decodes one base64url part and parses it as a JSON object.
fn decode_json<T: DeserializeOwned>(part: &str, encoded: &[u8]) -> Result<T, String> {
    let json = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| format!("jwt {part} is not base64url without padding"))?;
    // serde would also read a struct from a JSON array, by position.
    if json.trim_ascii_start().first() != Some(&b'{') {
        return Err(format!("jwt {part} is not a json object"));
    }
    serde_json::from_slice(&json)
        .map_err(|err| format!("jwt {part} is not a valid json object: {err}"))
}

/// Reads a NumericDate claim as whole seconds, rounding fractions with `round`.
fn numeric_date(name: &str, value: &Value, round: fn(f64) -> f64) -> Result<i64, String> {
    let Value::Number(number) = value else {
        return Err(format!("invalid jwt claim {name:?}: not a number"));
    };
    if let Some(seconds) = number.as_i64() {
        Ok(seconds)
    } else if number.is_u64() {
        Ok(i64::MAX)
    } else {
        // JSON has no NaN nor infinity; `as` saturates out-of-range values.
        Ok(number.as_f64().map_or(0, |seconds| round(seconds) as i64))
    }
}

/// Cuts a client-chosen value quoted in a refusal to a readable length.
fn clip(text: &str) -> &str {
    match text.char_indices().nth(MAX_QUOTED) {
        Some((cut, _)) => &text[..cut],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rim_config::AuthPolicy;

    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-unit";
    const NOW: i64 = 1_700_000_000;

    fn verifier(issuer: &str, audience: &str) -> JwtVerifier {
        JwtVerifier::new(&AuthConfig {
            policy: AuthPolicy::Jwt,
            jwt_secret: SECRET.into(),
            jwt_issuer: issuer.into(),
            jwt_audience: audience.into(),
            jwt_leeway: Duration::from_secs(30),
            ..AuthConfig::default()
        })
    }

    fn sign_raw(header: &str, payload: &str) -> String {
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(signing_input.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signing_input}.{signature}")
    }

    fn sign(payload: &str) -> String {
        sign_raw(r#"{"alg":"HS256","typ":"JWT"}"#, payload)
    }

    #[test]
    fn expiry_boundary_is_exclusive_and_includes_leeway() {
        let v = verifier("", "");
        let token = sign(&format!(r#"{{"mid":1,"exp":{}}}"#, NOW - 30));
        assert_eq!(
            v.verify(token.as_bytes(), NOW).unwrap_err(),
            "jwt expired 30 s ago (leeway 30 s)"
        );
        assert_eq!(v.verify(token.as_bytes(), NOW - 1).unwrap().mid, 1);
    }

    #[test]
    fn not_before_boundary_includes_leeway() {
        let v = verifier("", "");
        let token = sign(&format!(
            r#"{{"mid":1,"exp":{},"nbf":{}}}"#,
            NOW + 600,
            NOW + 30
        ));
        assert!(v.verify(token.as_bytes(), NOW).is_ok());
        assert_eq!(
            v.verify(token.as_bytes(), NOW - 1).unwrap_err(),
            "jwt is not valid for another 31 s (leeway 30 s)"
        );
    }

    #[test]
    fn fractional_and_huge_numeric_dates() {
        let v = verifier("", "");
        // exp 1.9 s after NOW - 30 rounds down: already expired at NOW.
        let token = sign(&format!(r#"{{"mid":1,"exp":{}.9}}"#, NOW - 30));
        assert!(v.verify(token.as_bytes(), NOW).is_err());
        let token = sign(r#"{"mid":1,"exp":18446744073709551615}"#);
        assert!(v.verify(token.as_bytes(), NOW).is_ok());
        let token = sign(r#"{"mid":1,"exp":1e300}"#);
        assert!(v.verify(token.as_bytes(), NOW).is_ok());
        let token = sign(r#"{"mid":1,"exp":"2030-01-01"}"#);
        assert_eq!(
            v.verify(token.as_bytes(), NOW).unwrap_err(),
            r#"invalid jwt claim "exp": not a number"#
        );
    }

    #[test]
    fn header_rules() {
        let v = verifier("", "");
        let payload = format!(r#"{{"mid":1,"exp":{}}}"#, NOW + 60);
        let cases = [
            (r#"{"alg":"HS256"}"#, None),
            (r#"{"alg":"HS256","typ":"jwt","kid":"k1"}"#, None),
            (
                r#"{"alg":"HS256","typ":"JOSE"}"#,
                Some(r#"jwt typ "JOSE" is not JWT"#),
            ),
            (
                r#"{"alg":"HS256","crit":["b64"],"b64":false}"#,
                Some("jwt crit header is not supported"),
            ),
            (r#"{"typ":"JWT"}"#, Some("jwt header has no alg")),
            (r#"{"alg":["HS256"]}"#, Some("jwt alg is not a string")),
            (
                r#"{"alg":"hs256"}"#,
                Some(r#"jwt alg "hs256" is not allowed (only HS256 is)"#),
            ),
            (
                r#"{"alg":"HS256","alg":"none"}"#,
                Some(
                    "jwt header is not a valid json object: duplicate field `alg` at line 1 column 20",
                ),
            ),
            (r#"["HS256"]"#, Some("jwt header is not a json object")),
        ];
        for (header, want) in cases {
            let got = v.verify(sign_raw(header, &payload).as_bytes(), NOW);
            match want {
                None => assert!(got.is_ok(), "{header}: {got:?}"),
                Some(want) => assert_eq!(got.unwrap_err(), want, "{header}"),
            }
        }
    }

    #[test]
    fn refusals_do_not_echo_the_secret() {
        let v = verifier("iss", "aud");
        let tokens = [
            sign(r#"{"mid":1}"#),
            sign(&format!(r#"{{"mid":1,"exp":{}}}"#, NOW - 100)),
            sign(&format!(r#"{{"exp":{}}}"#, NOW + 100)),
            sign_raw(r#"{"alg":"none"}"#, r#"{"mid":1}"#),
            format!("{}x", sign(r#"{"mid":1}"#)),
        ];
        for token in tokens {
            let err = v.verify(token.as_bytes(), NOW).unwrap_err();
            assert!(!err.contains(SECRET), "{err}");
            assert!(!err.contains("0123456789abcdef"), "{err}");
        }
        assert!(!format!("{v:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn quoted_values_are_clipped() {
        let v = verifier("", "");
        let alg = "A".repeat(1000);
        let token = sign_raw(&format!(r#"{{"alg":"{alg}"}}"#), "{}");
        let err = v.verify(token.as_bytes(), NOW).unwrap_err();
        assert!(err.len() < 200, "{err}");
    }
}
