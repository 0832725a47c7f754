//! Opening the WebSocket to the hub: bearer token and dataset headers,
//! rustls for `wss://`, size limits, connect timeout.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::SessionError;
use crate::counted::{Counted, Progress};
use crate::proto::{DATASET_HEADER, MAX_FRAME_BYTES};

pub type Ws = WebSocketStream<MaybeTlsStream<Counted<TcpStream>>>;

/// Time allowed for TCP, TLS and the WebSocket upgrade together.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub fn ws_config() -> WebSocketConfig {
    let mut c = WebSocketConfig::default();
    c.max_message_size = Some(MAX_FRAME_BYTES);
    c.max_frame_size = Some(MAX_FRAME_BYTES);
    c
}

/// Whether `url` sends the token in clear to another machine (plain `ws://`
/// to a host that is not loopback): worth a warning, since anyone on the
/// path can read the token and every row.
pub fn token_in_clear(url: &str) -> bool {
    let Ok(req) = url.into_client_request() else {
        return false;
    };
    let uri = req.uri();
    uri.scheme_str() == Some("ws") && !uri.host().map(crate::tls::is_loopback).unwrap_or(true)
}

/// Opens the WebSocket; the [`Progress`] counts the bytes written to it.
pub async fn connect(
    url: &str,
    token: &str,
    dataset: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<(Ws, Progress), SessionError> {
    let mut req = url
        .into_client_request()
        .map_err(|e| SessionError::Fatal(format!("hub.url {url:?} is not usable: {e}")))?;
    let bearer = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
        SessionError::Fatal("the token contains characters not allowed in an HTTP header".into())
    })?;
    req.headers_mut().insert("authorization", bearer);
    if let Ok(v) = HeaderValue::from_str(dataset) {
        req.headers_mut().insert(DATASET_HEADER, v);
    }
    let uri = req.uri().clone();
    let host = uri
        .host()
        .ok_or_else(|| SessionError::Fatal(format!("hub.url {url:?} has no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let secure = uri.scheme_str() == Some("wss");
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    // Built per attempt: a renewed CA file is picked up on the next one.
    let connector = if secure {
        let config = crate::tls::client_config(ca_file)
            .map_err(|e| SessionError::Fatal(format!("cannot connect to {url} with TLS: {e}")))?;
        Some(tokio_tungstenite::Connector::Rustls(config))
    } else {
        None
    };
    let fut = async move {
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(tokio_tungstenite::tungstenite::Error::Io)?;
        tcp.set_nodelay(true)
            .map_err(tokio_tungstenite::tungstenite::Error::Io)?;
        let (stream, progress) = Counted::new(tcp);
        let (ws, resp) = tokio_tungstenite::client_async_tls_with_config(
            req,
            stream,
            Some(ws_config()),
            connector,
        )
        .await?;
        Ok((ws, progress, resp))
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, fut).await {
        Err(_) => Err(SessionError::Retry(format!(
            "connecting to {url} timed out after {CONNECT_TIMEOUT:?}"
        ))),
        Ok(Ok((ws, progress, _))) => Ok((ws, progress)),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).trim().to_owned())
                .unwrap_or_default();
            match resp.status() {
                StatusCode::UNAUTHORIZED => Err(SessionError::Unauthorized(format!(
                    "hub refuses token (HTTP 401): {body}; check hub.token_file and the hub's [[token]] entries"
                ))),
                StatusCode::FORBIDDEN => Err(SessionError::Fatal(format!("hub refuses dataset (HTTP 403): {body}"))),
                s => Err(SessionError::Retry(format!("hub answered HTTP {s} at the upgrade: {body}"))),
            }
        }
        Ok(Err(e)) => match tls_failure(&e) {
            Some(why) => Err(SessionError::Retry(format!(
                "TLS with {url} failed: {why}; check that the hub's certificate is valid for this host name and signed by a CA this machine trusts (or set hub.ca_file)"
            ))),
            None => Err(SessionError::Retry(format!("cannot connect to {url}: {e}"))),
        },
    }
}

/// The TLS failure behind a connection error, if that is what it was
/// (rustls reports through the I/O error of the stream).
fn tls_failure(e: &tokio_tungstenite::tungstenite::Error) -> Option<String> {
    use tokio_tungstenite::tungstenite::Error;
    match e {
        Error::Tls(t) => Some(t.to_string()),
        Error::Io(io) => io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .map(|t| t.to_string()),
        _ => None,
    }
}
