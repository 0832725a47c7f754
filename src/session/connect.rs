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

/// Opens the WebSocket; the [`Progress`] counts the bytes written to it.
pub async fn connect(
    url: &str,
    token: &str,
    dataset: &str,
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
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("wss") {
            443
        } else {
            80
        });
    let fut = async move {
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(tokio_tungstenite::tungstenite::Error::Io)?;
        tcp.set_nodelay(true)
            .map_err(tokio_tungstenite::tungstenite::Error::Io)?;
        let (stream, progress) = Counted::new(tcp);
        let (ws, resp) =
            tokio_tungstenite::client_async_tls_with_config(req, stream, Some(ws_config()), None)
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
        Ok(Err(e)) => Err(SessionError::Retry(format!("cannot connect to {url}: {e}"))),
    }
}
