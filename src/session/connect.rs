//! Opening the WebSocket to the hub: bearer token and dataset headers,
//! rustls for `wss://`, size limits, connect timeout.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::SessionError;
use crate::proto::{DATASET_HEADER, MAX_FRAME_BYTES};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Time allowed for TCP, TLS and the WebSocket upgrade together.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub fn ws_config() -> WebSocketConfig {
    let mut c = WebSocketConfig::default();
    c.max_message_size = Some(MAX_FRAME_BYTES);
    c.max_frame_size = Some(MAX_FRAME_BYTES);
    c
}

pub async fn connect(url: &str, token: &str, dataset: &str) -> Result<Ws, SessionError> {
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
    let fut = tokio_tungstenite::connect_async_with_config(req, Some(ws_config()), true);
    match tokio::time::timeout(CONNECT_TIMEOUT, fut).await {
        Err(_) => Err(SessionError::Retry(format!(
            "connecting to {url} timed out after {CONNECT_TIMEOUT:?}"
        ))),
        Ok(Ok((ws, _))) => Ok(ws),
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
        Ok(Err(e)) => Err(SessionError::Retry(format!("cannot connect to {url}: {e}"))),
    }
}
