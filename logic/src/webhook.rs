//! The HTTP client logic uses to call business webhooks: the auth webhook and
//! the upstream "receive" webhook.
//!
//! It owns one pooled `reqwest` client with rustls on the ring provider (no
//! aws-lc, no OpenSSL), POSTs JSON with a per-call deadline and reads at most
//! [`MAX_RESPONSE_BODY`] bytes of the answer. It does not decide what an
//! answer means; callers map status codes and bodies to their own outcomes.

use std::error::Error as StdError;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::Url;
use reqwest::header::CONTENT_TYPE;
use serde::Serialize;
use tokio_rustls::rustls::crypto::{CryptoProvider, ring};

/// Largest webhook answer body read, in bytes; a longer answer is an error.
pub const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// Why a webhook call did not produce a status and a body.
///
/// Messages show the URL without its credentials, query or fragment, since
/// a webhook URL may carry a secret there.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The HTTP client could not be built.
    #[error("cannot build the webhook http client: {0}")]
    Build(String),
    /// The request body could not be serialized to JSON.
    #[error("cannot encode the webhook request body: {0}")]
    Encode(#[source] serde_json::Error),
    /// The URL is not an absolute `http://` or `https://` URL.
    #[error("invalid webhook url: {0}")]
    InvalidUrl(String),
    /// No complete answer arrived within the deadline.
    #[error("webhook {url} did not answer within {timeout:?}")]
    Timeout {
        /// The redacted URL.
        url: String,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// The server could not be reached (DNS, TCP connect or TLS handshake).
    #[error("webhook {url} is unreachable: {detail}")]
    Connect {
        /// The redacted URL.
        url: String,
        /// The cause chain, without the URL.
        detail: String,
    },
    /// The exchange failed after connecting (reset, malformed HTTP, ...).
    #[error("webhook {url} failed: {detail}")]
    Request {
        /// The redacted URL.
        url: String,
        /// The cause chain, without the URL.
        detail: String,
    },
    /// The answer body is longer than [`MAX_RESPONSE_BODY`].
    #[error("webhook {url} answered a body longer than {limit} bytes")]
    BodyTooLarge {
        /// The redacted URL.
        url: String,
        /// The limit that was exceeded.
        limit: usize,
    },
}

/// A pooled HTTP client for business webhooks, cheap to clone and share.
#[derive(Clone, Debug)]
pub struct HttpClient {
    client: reqwest::Client,
}

impl HttpClient {
    /// Builds the client: rustls with the ring provider, the system's CA
    /// certificates, no redirects.
    ///
    /// reqwest's `rustls-no-provider` feature reads rustls' process-wide
    /// default provider, so this installs ring as that default when none is
    /// installed yet (ring is the only provider compiled into rim). On a host
    /// without CA certificates it logs a warning and builds a client that
    /// still speaks plain http, while every https call fails certificate
    /// verification with a clear error. `SSL_CERT_FILE` / `SSL_CERT_DIR`
    /// replace the system certificates (e.g. to trust a private CA).
    pub fn new() -> Result<HttpClient, WebhookError> {
        if CryptoProvider::get_default().is_none() {
            // An error means another thread installed a provider meanwhile;
            // reqwest uses whichever is installed, so either outcome is fine.
            let _ = ring::default_provider().install_default();
        }
        let client = match builder().build() {
            Ok(client) => client,
            Err(err) => {
                // The platform verifier refuses to start without any CA
                // certificate; plain http must keep working regardless.
                tracing::warn!(
                    error = %error_chain(&err),
                    "no usable system CA certificates: https webhooks will fail certificate verification, plain http works"
                );
                builder()
                    .tls_certs_only(Vec::<reqwest::Certificate>::new())
                    .build()
                    .map_err(|err| WebhookError::Build(error_chain(&err)))?
            }
        };
        Ok(HttpClient { client })
    }

    /// POSTs `body` as JSON to `url` and returns the answer's status and body,
    /// failing when the whole exchange takes longer than `timeout`.
    ///
    /// Any status is returned as is; only transport failures, the deadline and
    /// an answer body above [`MAX_RESPONSE_BODY`] are errors.
    pub async fn post_json<T: Serialize + ?Sized>(
        &self,
        url: &str,
        body: &T,
        timeout: Duration,
    ) -> Result<(u16, Bytes), WebhookError> {
        let target = Url::parse(url).map_err(|err| WebhookError::InvalidUrl(err.to_string()))?;
        if !matches!(target.scheme(), "http" | "https") {
            return Err(WebhookError::InvalidUrl(format!(
                "scheme {:?} is not http or https",
                target.scheme()
            )));
        }
        let shown = redact(&target);
        let payload = serde_json::to_vec(body).map_err(WebhookError::Encode)?;
        let request = self
            .client
            .post(target)
            .header(CONTENT_TYPE, "application/json")
            .body(payload);
        match tokio::time::timeout(timeout, exchange(request, &shown)).await {
            Ok(answer) => answer,
            Err(_elapsed) => Err(WebhookError::Timeout {
                url: shown,
                timeout,
            }),
        }
    }
}

/// The client settings shared by the normal and the no-CA builds.
fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(concat!("rim-logic/", env!("CARGO_PKG_VERSION")))
        // A redirected POST would carry the client's token to another place
        // (or be turned into a GET); the business must configure the final URL.
        .redirect(reqwest::redirect::Policy::none())
}

/// Sends the request and reads the answer body up to the limit.
async fn exchange(
    request: reqwest::RequestBuilder,
    url: &str,
) -> Result<(u16, Bytes), WebhookError> {
    let mut response = request.send().await.map_err(|err| classify(err, url))?;
    let status = response.status().as_u16();
    let too_large = || WebhookError::BodyTooLarge {
        url: url.to_owned(),
        limit: MAX_RESPONSE_BODY,
    };
    if let Some(len) = response.content_length()
        && len > MAX_RESPONSE_BODY as u64
    {
        return Err(too_large());
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(|err| classify(err, url))? {
        if body.len() + chunk.len() > MAX_RESPONSE_BODY {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, body.freeze()))
}

/// Maps a reqwest failure to an error naming the redacted URL.
fn classify(err: reqwest::Error, url: &str) -> WebhookError {
    let err = err.without_url();
    let detail = error_chain(&err);
    let url = url.to_owned();
    if err.is_builder() {
        WebhookError::InvalidUrl(detail)
    } else if err.is_connect() {
        WebhookError::Connect { url, detail }
    } else {
        WebhookError::Request { url, detail }
    }
}

/// Shows a URL without userinfo, query and fragment.
fn redact(url: &Url) -> String {
    let mut shown = url.clone();
    // Both setters only fail on URLs that cannot have credentials (no host),
    // and then there is nothing to strip.
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.set_fragment(None);
    shown.to_string()
}

/// Joins an error and its sources with ": ", skipping repeated messages.
pub(crate) fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_strips_credentials_query_and_fragment() {
        let url = Url::parse("https://user:pw@biz.example:8443/auth?sig=secret#frag").unwrap();
        assert_eq!(redact(&url), "https://biz.example:8443/auth");
    }

    #[tokio::test]
    async fn post_json_refuses_non_http_urls() {
        let http = HttpClient::new().unwrap();
        for url in ["ftp://127.0.0.1/x", "not a url", "/relative"] {
            let err = http
                .post_json(url, &(), Duration::from_secs(1))
                .await
                .unwrap_err();
            assert!(matches!(err, WebhookError::InvalidUrl(_)), "{url}: {err}");
        }
    }
}
