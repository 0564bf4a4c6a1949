//! Sending a routed request: each attempt picks an endpoint of the destination cluster under
//! its circuit breakers and outlier state, and Envoy's `retry_on` conditions decide whether a
//! failure or a status is tried again; mirrors get fire-and-forget copies.
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use tracing::debug;

use super::headers::header_str;
use super::http::{local, Body, Outcome, Tunnel, MIRROR_TIMEOUT};
use super::lb::RequestView;
use super::outlier::Outcome as OutlierOutcome;
use super::traffic::Cluster;
use super::upstream::{self, SendError};
use crate::routing::spec::Destination;
use crate::routing::Retries;

/// A request ready to send (again).
pub(super) struct Send<'a> {
    pub(super) t: &'a Tunnel,
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
    pub(super) h2: bool,
}

impl Send<'_> {
    pub(super) fn request(&self, authority: &str) -> Option<Request<Full<Bytes>>> {
        let uri = upstream_uri(self.h2, authority, &self.path)?;
        let mut req =
            Request::builder().method(self.method.clone()).uri(uri).body(Full::new(self.body.clone())).ok()?;
        *req.headers_mut() = self.headers.clone();
        if !self.h2 {
            req.headers_mut().insert(header::HOST, HeaderValue::from_str(authority).ok()?);
        } else {
            req.headers_mut().remove(header::HOST);
        }
        *req.version_mut() = if self.h2 { Version::HTTP_2 } else { Version::HTTP_11 };
        Some(req)
    }

    /// Sends with the retry policy: each attempt picks an endpoint of `cluster` (by its load
    /// balancer, among the endpoints outlier detection has not ejected) under its
    /// connection-pool limits; a retriable failure or status is tried again (after a short,
    /// growing back-off, while the retry budget allows) until attempts run out.
    pub(super) async fn attempts(
        &self,
        cluster: &Cluster,
        authority: &str,
        retries: &Retries,
        out: &mut Outcome,
    ) -> Response<Body> {
        let policy = RetryOn::parse(&retries.retry_on);
        let tries = 1 + retries.attempts;
        let svc = cluster.service.hostname.as_str();
        let (_request, _connection) = match cluster.admit().await {
            Ok(p) => p,
            Err(overflow) => {
                debug!(%overflow, service = %svc, "circuit breaker");
                out.flag("UO");
                return local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                );
            }
        };
        let mut _retry = None;
        for attempt in 0..tries {
            if attempt > 0 {
                self.t.shared.requests.retried(svc);
                tokio::time::sleep(Duration::from_millis(25 * (1 << attempt.min(4)) as u64)).await;
            }
            let view = RequestView { headers: &self.headers, path: &self.path, source: self.t.peer_addr, target: None };
            let Some(chosen) = cluster.pick(&view) else {
                out.flag("UH");
                return local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
            };
            let ep = chosen.endpoint.clone();
            out.upstream = Some(ep.clone());
            let Some(req) = self.request(authority) else {
                return local(StatusCode::BAD_REQUEST, "request cannot be forwarded");
            };
            let per_connection = cluster.breaker.max_requests_per_connection();
            let sent = self.t.shared.upstreams.send(&ep, req, self.h2, self.t.local_ip, per_connection);
            let result = match retries.per_try_timeout {
                Some(d) => tokio::time::timeout(d, sent).await.unwrap_or(Err(SendError::PerTryTimeout(d))),
                None => sent.await,
            };
            cluster.record(
                ep.addr,
                match &result {
                    Ok(r) => OutlierOutcome::Response(r.status().as_u16()),
                    Err(SendError::Connect(..)) => OutlierOutcome::ConnectFailure,
                    Err(SendError::PerTryTimeout(_)) => OutlierOutcome::Timeout,
                    Err(SendError::Reset(_)) => OutlierOutcome::Reset,
                },
            );
            // A retry needs room in the cluster's retry budget (`maxRetries`); without it the
            // answer so far stands.
            let mut last = attempt + 1 == tries;
            if !last {
                match cluster.breaker.retry() {
                    Ok(p) => _retry = Some(p),
                    Err(_) => last = true,
                }
            }
            let cookie = chosen.set_cookie.clone();
            match result {
                Ok(resp) if policy.retries_response(&resp) && !last => {}
                Ok(resp) => {
                    if attempt > 0 && policy.retries_response(&resp) {
                        out.flag("URX");
                    }
                    let mut resp = resp.map(|b| b.boxed());
                    if let Some(v) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
                        resp.headers_mut().append(header::SET_COOKIE, v);
                    }
                    return resp;
                }
                Err(e) => {
                    debug!(error = %e, attempt, upstream = %ep.addr, "upstream attempt failed");
                    if last || !policy.retries_error(&e) {
                        out.flag(if attempt > 0 {
                            "URX"
                        } else if matches!(e, SendError::PerTryTimeout(_)) {
                            "UT"
                        } else {
                            "UF"
                        });
                        return local(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "upstream connect error or disconnect/reset before headers",
                        );
                    }
                }
            }
        }
        unreachable!("the last attempt always returns")
    }
}

/// The upstream request's URI: origin-form for HTTP/1.1 (the `Host` header carries the
/// authority), absolute for HTTP/2, put together from parts, so nothing in the authority can
/// become part of the path.
fn upstream_uri(h2: bool, authority: &str, path: &str) -> Option<Uri> {
    if h2 {
        Uri::builder().scheme("http").authority(authority).path_and_query(path).build().ok()
    } else {
        path.parse().ok()
    }
}

/// A fire-and-forget copy to a mirror target, with `-shadow` appended to the host.
pub(super) fn mirror(
    t: &Tunnel,
    snap: &crate::state::Snapshot,
    m: &Destination,
    send: &Send<'_>,
    authority: &str,
    namespace: &str,
    table: &super::routes::RouteTable,
) {
    let Some(svc) = snap.service_by_host(&m.host, namespace) else {
        return debug!(host = %m.host, "mirror target unknown");
    };
    let subset = m.subset.as_ref().and_then(|s| table.subset_labels(&m.host, s));
    let port = m.port.as_ref().map(|p| p.number as u16).unwrap_or_else(|| t.default_port(&svc));
    let Some(ep) = upstream::pick(snap, &svc, port, t.vip.ip(), subset) else {
        return debug!(host = %m.host, "mirror target has no endpoint");
    };
    let shadow = match authority.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => format!("{h}-shadow:{p}"),
        _ => format!("{authority}-shadow"),
    };
    let Some(req) = send.request(&shadow) else { return };
    // Copies are bounded: past MAX_MIRRORS in flight they are skipped, and each gets
    // MIRROR_TIMEOUT, so a slow mirror target cannot pile up bodies in the waypoint.
    let Ok(permit) = t.shared.mirrors.clone().try_acquire_owned() else {
        return debug!(host = %m.host, "mirror skipped: too many in flight");
    };
    let (shared, h2, local_ip) = (t.shared.clone(), send.h2, t.local_ip);
    tokio::spawn(async move {
        let copy = async {
            match shared.upstreams.send(&ep, req, h2, local_ip, None).await {
                Ok(resp) => {
                    let _ = resp.into_body().collect().await;
                }
                Err(e) => debug!(error = %e, "mirror failed"),
            }
        };
        let _ = tokio::time::timeout(MIRROR_TIMEOUT, copy).await;
        drop(permit);
    });
}

/// Envoy's `retry_on` conditions.
struct RetryOn {
    any_5xx: bool,
    gateway: bool,
    reset: bool,
    connect: bool,
    retriable_4xx: bool,
    /// `retriable-status-codes`: Istio lists 503 there.
    status_503: bool,
    /// Status codes named by number.
    codes: Vec<u16>,
    /// gRPC status codes (bit n: code n).
    grpc: u32,
}

impl RetryOn {
    fn parse(s: &str) -> Self {
        let mut r = RetryOn {
            any_5xx: false,
            gateway: false,
            reset: false,
            connect: false,
            retriable_4xx: false,
            status_503: false,
            codes: vec![],
            grpc: 0,
        };
        for tok in s.split(',').map(str::trim) {
            match tok {
                "5xx" => r.any_5xx = true,
                "gateway-error" => r.gateway = true,
                "reset" => r.reset = true,
                "connect-failure" | "refused-stream" => r.connect = true,
                "retriable-4xx" => r.retriable_4xx = true,
                // Istio sets 503 as the retriable status code.
                "retriable-status-codes" => r.status_503 = true,
                "cancelled" => r.grpc |= 1 << 1,
                "deadline-exceeded" => r.grpc |= 1 << 4,
                "resource-exhausted" => r.grpc |= 1 << 8,
                "internal" => r.grpc |= 1 << 13,
                "unavailable" => r.grpc |= 1 << 14,
                n => {
                    if let Ok(code) = n.parse() {
                        r.codes.push(code)
                    }
                }
            }
        }
        r
    }

    fn retries_response<B>(&self, resp: &Response<B>) -> bool {
        let s = resp.status().as_u16();
        (self.any_5xx && s >= 500)
            || (self.gateway && matches!(s, 502..=504))
            || (self.retriable_4xx && s == 409)
            || (self.status_503 && s == 503)
            || self.codes.contains(&s)
            || header_str(resp.headers(), "grpc-status")
                .and_then(|g| g.parse::<u32>().ok())
                .is_some_and(|g| g < 32 && self.grpc & (1 << g) != 0)
    }

    fn retries_error(&self, e: &SendError) -> bool {
        match e {
            SendError::Connect(..) => self.connect || self.any_5xx || self.gateway || self.reset,
            SendError::Reset(_) | SendError::PerTryTimeout(_) => self.any_5xx || self.gateway || self.reset,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::DEFAULT_RETRY_ON;

    fn response(status: u16, grpc: Option<&str>) -> Response<()> {
        let mut r = Response::builder().status(status);
        if let Some(g) = grpc {
            r = r.header("grpc-status", g);
        }
        r.body(()).unwrap()
    }

    #[test]
    fn an_authority_cannot_reach_the_upstream_path() {
        let ok = upstream_uri(true, "reviews:9080", "/pkg.Svc/Public").unwrap();
        assert_eq!(ok.to_string(), "http://reviews:9080/pkg.Svc/Public");
        assert_eq!(upstream_uri(false, "reviews:9080", "/a?b=c").unwrap().to_string(), "/a?b=c");
        // Parsed as one string, this would have asked the upstream for /pkg.Svc/Admin.
        for bad in ["reviews/pkg.Svc/Admin#", "reviews/pkg.Svc/Admin?", "reviews /x", ""] {
            assert!(upstream_uri(true, bad, "/pkg.Svc/Public").is_none(), "{bad:?}");
        }
    }

    #[test]
    fn istios_default_retry_on_retries_503_and_grpc_unavailable_or_cancelled_only() {
        let p = RetryOn::parse(DEFAULT_RETRY_ON);
        assert!(p.retries_response(&response(503, None)));
        assert!(!p.retries_response(&response(500, None)));
        assert!(!p.retries_response(&response(502, None)));
        assert!(p.retries_response(&response(200, Some("14"))));
        assert!(p.retries_response(&response(200, Some("1"))));
        assert!(!p.retries_response(&response(200, Some("2"))));
        assert!(!p.retries_response(&response(200, Some("4"))));
        assert!(!p.retries_response(&response(200, Some("99"))));
        assert!(!p.retries_response(&response(200, Some("fourteen"))));
    }

    #[test]
    fn retry_on_takes_status_codes_by_number_and_grpc_names() {
        let p = RetryOn::parse("409, 429,deadline-exceeded,resource-exhausted,internal");
        assert!(p.retries_response(&response(409, None)));
        assert!(p.retries_response(&response(429, None)));
        assert!(!p.retries_response(&response(503, None)));
        for g in ["4", "8", "13"] {
            assert!(p.retries_response(&response(200, Some(g))), "{g}");
        }
        assert!(!p.retries_response(&response(200, Some("14"))));
    }
}
