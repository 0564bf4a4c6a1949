//! The HTTP client the OTLP exporter posts with: hyper HTTP/1.1 on a single-thread tokio
//! runtime of its own thread (`ztunnel-otlp`). The SDK's batch processor runs the export on its
//! own thread and waits on the future we return, which only waits for a task on that runtime,
//! so exporting needs no runtime of the caller and never touches the proxies' runtime.
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use opentelemetry_http::{HttpClient, HttpError};

/// Collector answers larger than this are an error (they are a status and a few bytes).
const MAX_RESPONSE: usize = 64 * 1024;
/// One export attempt, connect to last byte.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub(super) struct ExportClient {
    rt: tokio::runtime::Handle,
}

impl ExportClient {
    /// Starts the export thread; it lives as long as the process.
    pub(super) fn start() -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = rt.handle().clone();
        std::thread::Builder::new().name("ztunnel-otlp".into()).spawn(move || {
            rt.block_on(std::future::pending::<()>());
        })?;
        Ok(ExportClient { rt: handle })
    }
}

async fn post(request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
    let uri = request.uri().clone();
    let host = uri.host().ok_or("OTLP endpoint has no host")?.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(80);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    let _ = tcp.set_nodelay(true);
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let (mut parts, body) = request.into_parts();
    if !parts.headers.contains_key(http::header::HOST) {
        let authority = uri.authority().map(|a| a.as_str().to_string()).unwrap_or(host);
        parts.headers.insert(http::header::HOST, authority.parse()?);
    }
    // HTTP/1.1 wants origin-form on the wire.
    parts.uri = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").parse()?;
    let resp = send.send_request(Request::from_parts(parts, Full::new(body))).await?;
    let (parts, body) = resp.into_parts();
    let body = Limited::new(body, MAX_RESPONSE).collect().await?.to_bytes();
    Ok(Response::from_parts(parts, body))
}

#[async_trait::async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        // The timer is made on the export runtime: the caller (the SDK's thread) has none.
        let task = self.rt.spawn(async move { tokio::time::timeout(EXPORT_TIMEOUT, post(request)).await });
        match task.await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("OTLP export timed out".into()),
            Err(e) => Err(Box::new(e)),
        }
    }
}
