//! A minimal gRPC server and client, and an HTTP/2 client, for the mini-cluster (HTTP/2 with length-prefixed
//! messages and `grpc-status` trailers), enough to show that gRPC crosses the waypoint
//! intact: frames, trailers and status.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::bookinfo::Received;
use crate::{InNetns, Pod};

/// One gRPC message frame (uncompressed).
pub fn frame(message: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + message.len());
    b.put_u8(0);
    b.put_u32(message.len() as u32);
    b.put_slice(message);
    b.freeze()
}

/// Serves gRPC on one accepted connection: every call gets `name` back with status 0.
pub async fn serve_connection(
    stream: tokio::net::TcpStream,
    name: String,
    record: impl Fn(Received) + Send + Sync + 'static,
) {
    let record = std::sync::Arc::new(record);
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (name, record) = (name.clone(), record.clone());
        async move {
            record(Received {
                method: req.method().to_string(),
                path: req.uri().path().to_string(),
                host: req.uri().authority().map(|a| a.to_string()).unwrap_or_default(),
                headers: req
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or_default().to_string()))
                    .collect(),
            });
            let _ = req.into_body().collect().await;
            let mut trailers = hyper::HeaderMap::new();
            trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
            let body = Full::new(frame(name.as_bytes()))
                .map_err(|never: Infallible| match never {})
                .with_trailers(async move { Some(Ok::<_, Infallible>(trailers)) });
            let mut resp = Response::new(body);
            resp.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/grpc"));
            Ok::<_, Infallible>(resp)
        }
    });
    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}

/// What a gRPC call returned.
#[derive(Debug, Clone)]
pub struct GrpcReply {
    pub http_status: u16,
    /// `grpc-status` from the trailers (or the headers, for a trailers-only answer).
    pub grpc_status: Option<String>,
    /// The first message of the answer.
    pub message: Vec<u8>,
}

/// An HTTP/2 (prior knowledge) connection to `addr`, made on the calling runtime.
async fn h2_connect(addr: SocketAddr) -> Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await.context("connect")?;
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Runs `work` on a runtime inside `pod`, with a 10 s limit.
fn in_pod<T: Send + 'static, F>(pod: &Pod, work: impl FnOnce() -> F + Send + 'static) -> Result<T>
where
    F: std::future::Future<Output = Result<T>>,
{
    pod.run_async(
        move || async move { tokio::time::timeout(Duration::from_secs(10), work()).await.context("timed out")? },
    )
}

/// One unary call from inside `pod` to `addr` over HTTP/2 (prior knowledge).
pub fn call(pod: &Pod, addr: SocketAddr, authority: &str, path: &str, message: &[u8]) -> Result<GrpcReply> {
    let (uri, message) = (format!("http://{authority}{path}"), message.to_vec());
    in_pod(pod, move || async move {
        let mut sender = h2_connect(addr).await?;
        let req = Request::post(uri)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(frame(&message)))?;
        let resp = sender.send_request(req).await?;
        let http_status = resp.status().as_u16();
        let header_status = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_string);
        let collected = resp.into_body().collect().await?;
        let trailer_status =
            collected.trailers().and_then(|t| t.get("grpc-status")).and_then(|v| v.to_str().ok()).map(str::to_string);
        let data = collected.to_bytes();
        let message = if data.len() >= 5 { data[5..].to_vec() } else { Vec::new() };
        Ok(GrpcReply { http_status, grpc_status: trailer_status.or(header_status), message })
    })
}

/// One HTTP/2 (prior knowledge) GET from inside `pod`: status and body.
pub fn h2_get(pod: &Pod, addr: SocketAddr, authority: &str, path: &str) -> Result<(u16, String)> {
    let uri = format!("http://{authority}{path}");
    in_pod(pod, move || async move {
        let mut sender = h2_connect(addr).await?;
        let resp = sender.send_request(Request::get(uri).body(Full::new(Bytes::new()))?).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    })
}
