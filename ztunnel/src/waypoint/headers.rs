//! The request and response headers the waypoint reads and rewrites as Envoy does: framing
//! checks against request smuggling, hop-by-hop headers, a route's `headers` operations,
//! `x-request-id`, CORS, and the few lookups every part of the request path shares.
use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request};

use crate::routing::{self, spec::HeaderOperations};

/// Names the waypoint sets on every request, made once: a name inserted from a `&str` that is
/// not one of the standard headers is copied into a new allocation each time.
pub(super) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(super) static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Requests whose framing is ambiguous are refused (request smuggling): both
/// `Content-Length` and `Transfer-Encoding`, or several `Content-Length`s.
pub(super) fn framing(h: &HeaderMap) -> Result<(), &'static str> {
    let lengths = h.get_all(header::CONTENT_LENGTH).iter().count();
    if lengths > 1 {
        return Err("duplicate Content-Length");
    }
    if lengths == 1 && h.contains_key(header::TRANSFER_ENCODING) {
        return Err("both Content-Length and Transfer-Encoding");
    }
    Ok(())
}

pub(super) fn strip_hop_by_hop(h: &mut HeaderMap) {
    // The headers `Connection` names go too (taken out first: they are read while removing),
    // but not the trace context: by now it is this hop's own, written when the request came in.
    if let header::Entry::Occupied(e) = h.entry(header::CONNECTION) {
        let connection: Vec<HeaderValue> = e.remove_entry_mult().1.collect();
        for name in connection.iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')) {
            let name = name.trim();
            let trace_context = [&crate::spans::TRACEPARENT, &crate::spans::TRACESTATE];
            if !trace_context.iter().any(|t| name.eq_ignore_ascii_case(t.as_str())) {
                h.remove(name);
            }
        }
    }
    for n in ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "host"] {
        h.remove(n);
    }
}

/// `set`, then `add`, then `remove`, as Envoy orders them.
pub(super) fn apply(h: &mut HeaderMap, ops: Option<&HeaderOperations>) {
    let Some(ops) = ops else { return };
    let pair = |k: &str, v: &str| Some((HeaderName::from_bytes(k.as_bytes()).ok()?, HeaderValue::from_str(v).ok()?));
    for (k, v) in ops.set.iter().filter_map(|(k, v)| pair(k, v)) {
        h.insert(k, v);
    }
    for (k, v) in ops.add.iter().filter_map(|(k, v)| pair(k, v)) {
        h.append(k, v);
    }
    for k in &ops.remove {
        h.remove(k.as_str());
    }
}

/// Gives the request an `x-request-id` if it has none (the `traceparent` is already this
/// hop's span, set when the request came in).
pub(super) fn request_id(h: &mut HeaderMap) {
    if !h.contains_key(&X_REQUEST_ID) {
        let mut id = [0u8; 32];
        crate::spans::lower_hex(fastrand::u128(..), &mut id);
        // Owned by its `Bytes` from the start, so the copies a send and its retries make
        // share it (a value made from a slice is copied again on its first clone).
        if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(id)) {
            h.insert(X_REQUEST_ID.clone(), v);
        }
    }
}

pub(super) fn is_preflight<B>(req: &Request<B>) -> bool {
    req.method() == Method::OPTIONS && req.headers().contains_key("access-control-request-method")
}

pub(super) fn cors_headers(h: &mut HeaderMap, c: &routing::Cors, origin: &str, preflight: bool) {
    let mut set = |k: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    };
    set("access-control-allow-origin", origin.to_string());
    if c.policy.allow_credentials == Some(true) {
        set("access-control-allow-credentials", "true".into());
    }
    if !c.policy.expose_headers.is_empty() {
        set("access-control-expose-headers", c.policy.expose_headers.join(","));
    }
    if preflight {
        if !c.policy.allow_methods.is_empty() {
            set("access-control-allow-methods", c.policy.allow_methods.join(","));
        }
        if !c.policy.allow_headers.is_empty() {
            set("access-control-allow-headers", c.policy.allow_headers.join(","));
        }
        if let Some(age) = c.policy.max_age.as_deref().and_then(|a| routing::duration(a).ok()) {
            set("access-control-max-age", age.as_secs().to_string());
        }
    }
}

pub(super) fn is_grpc(h: &HeaderMap) -> bool {
    header_str(h, "content-type").is_some_and(|c| c.starts_with("application/grpc"))
}

pub(super) fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// `:authority`, else `Host`, else the address the client dialled.
pub(super) fn authority_of<B>(req: &Request<B>, vip: SocketAddr) -> String {
    req.uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| header_str(req.headers(), "host").map(str::to_string))
        .unwrap_or_else(|| vip.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_stripped() {
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("keep-alive, X-Secret-Hop"));
        h.append("connection", HeaderValue::from_static("x-other ,bad name,"));
        for n in ["keep-alive", "x-secret-hop", "x-other", "te", "upgrade", "host", "x-kept", "proxy-connection"] {
            h.insert(n, HeaderValue::from_static("v"));
        }
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn connection_cannot_strip_the_trace_context_this_hop_wrote() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("TraceParent, tracestate, x-hop"));
        h.insert("traceparent", HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
        h.insert("tracestate", HeaderValue::from_static("a=1"));
        h.insert("x-hop", HeaderValue::from_static("v"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["traceparent", "tracestate"]);
    }

    #[test]
    fn a_request_without_an_id_gets_32_hex_digits_and_one_with_an_id_keeps_it() {
        let mut h = HeaderMap::new();
        request_id(&mut h);
        let id = h["x-request-id"].to_str().unwrap().to_string();
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{id}");
        let mut again = HeaderMap::new();
        request_id(&mut again);
        assert_ne!(again["x-request-id"], id.as_str(), "ids are random");
        request_id(&mut h);
        assert_eq!(h["x-request-id"], id.as_str());
    }
}
