//! The waypoint's access log: one line per request, in a format the operator chooses with
//! Envoy's command operators (`%RESPONSE_CODE%`, `%REQ(USER-AGENT)%`, ...), defaulting to
//! Istio's own default text format so existing log parsers and habits carry over. With
//! `LOG_FORMAT=json` the line is a JSON object with the keys of Istio's default JSON format.
//!
//! Every value is escaped before it is written (control characters, quotes, backslashes),
//! because most of them (path, authority, headers) are chosen by the client: a request must
//! not be able to forge a second log line or close a quoted field.
use std::borrow::Cow;
use std::sync::Arc;
use std::time::SystemTime;

use http::HeaderMap;

use super::log_writer::LineWriter;

/// Istio's default text access-log format (meshConfig `accessLogFormat` unset).
pub const ISTIO_DEFAULT_FORMAT: &str = concat!(
    "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% ",
    "%RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% ",
    "\"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% ",
    "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" ",
    "\"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% ",
    "%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% ",
    "%REQUESTED_SERVER_NAME% %ROUTE_NAME%"
);

/// A format that could not be compiled.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FormatError {
    #[error("unknown access-log operator %{0}%")]
    Unknown(String),
    #[error("unterminated %{0} in the access-log format")]
    Unterminated(String),
    #[error("%{0}% needs a header name, as in %{0}(USER-AGENT)%")]
    MissingHeader(String),
}

/// What one request turned into; the format picks from it.
#[derive(Debug, Clone, Default)]
pub struct Record {
    pub start: Option<SystemTime>,
    pub method: String,
    pub path: String,
    pub authority: String,
    pub protocol: &'static str,
    pub response_code: u16,
    pub response_flags: String,
    /// Why the waypoint answered itself (`via_upstream` when the upstream did).
    pub response_code_details: &'static str,
    pub upstream_host: String,
    pub upstream_cluster: String,
    pub route_name: String,
    pub source_principal: Arc<str>,
    pub downstream_remote: Arc<str>,
    pub downstream_local: Arc<str>,
    pub traceparent: String,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration_ms: u64,
    /// The request headers the format names (and `x-request-id`), captured on arrival.
    pub request_headers: HeaderMap,
    /// The response headers the format names.
    pub response_headers: HeaderMap,
}

#[derive(Debug, Clone, PartialEq)]
enum Field {
    StartTime,
    /// Header alternatives in order (`X?Y`), lower case; `:method`, `:path`, `:authority`.
    Req(Vec<String>),
    Resp(Vec<String>),
    Protocol,
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    BytesReceived,
    BytesSent,
    Duration,
    UpstreamHost,
    UpstreamCluster,
    RouteName,
    DownstreamRemoteAddress,
    DownstreamLocalAddress,
    DownstreamPeerUriSan,
    TraceParent,
    /// Known to Envoy, never set by this proxy: always `-`.
    Unset,
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Field(Field),
}

/// A compiled format.
#[derive(Debug, Clone, PartialEq)]
pub struct LogFormat {
    pieces: Vec<Piece>,
}

impl Default for LogFormat {
    fn default() -> Self {
        LogFormat::parse(ISTIO_DEFAULT_FORMAT).expect("Istio's default format compiles")
    }
}

fn headers_of(op: &str, arg: Option<&str>) -> Result<Vec<String>, FormatError> {
    let arg = arg.filter(|a| !a.is_empty()).ok_or_else(|| FormatError::MissingHeader(op.to_string()))?;
    // `%REQ(X?Y):10%`-style length limits are accepted and ignored.
    Ok(arg.split('?').map(|h| h.trim().to_ascii_lowercase()).collect())
}

fn field(op: &str) -> Result<Field, FormatError> {
    let (name, arg) = match op.split_once('(') {
        Some((n, rest)) => (n, Some(rest.split_once(')').map(|(a, _)| a).unwrap_or(rest))),
        None => (op, None),
    };
    Ok(match name {
        "START_TIME" => Field::StartTime,
        "REQ" => Field::Req(headers_of(name, arg)?),
        "RESP" => Field::Resp(headers_of(name, arg)?),
        "PROTOCOL" => Field::Protocol,
        "RESPONSE_CODE" => Field::ResponseCode,
        "RESPONSE_FLAGS" => Field::ResponseFlags,
        "RESPONSE_CODE_DETAILS" => Field::ResponseCodeDetails,
        "BYTES_RECEIVED" => Field::BytesReceived,
        "BYTES_SENT" => Field::BytesSent,
        "DURATION" => Field::Duration,
        "UPSTREAM_HOST" => Field::UpstreamHost,
        "UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW" => Field::UpstreamCluster,
        "ROUTE_NAME" => Field::RouteName,
        "DOWNSTREAM_REMOTE_ADDRESS" | "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" | "DOWNSTREAM_PEER_ADDRESS" => {
            Field::DownstreamRemoteAddress
        }
        "DOWNSTREAM_LOCAL_ADDRESS" => Field::DownstreamLocalAddress,
        "DOWNSTREAM_PEER_URI_SAN" => Field::DownstreamPeerUriSan,
        "TRACEPARENT" => Field::TraceParent,
        "CONNECTION_TERMINATION_DETAILS"
        | "UPSTREAM_TRANSPORT_FAILURE_REASON"
        | "UPSTREAM_LOCAL_ADDRESS"
        | "REQUESTED_SERVER_NAME" => Field::Unset,
        other => return Err(FormatError::Unknown(other.to_string())),
    })
}

impl LogFormat {
    /// Compiles `format`; `%%` is not special, text between operators is copied as is.
    pub fn parse(format: &str) -> Result<Self, FormatError> {
        let mut pieces = Vec::new();
        let mut rest = format;
        while let Some(at) = rest.find('%') {
            if at > 0 {
                pieces.push(Piece::Text(rest[..at].to_string()));
            }
            let after = &rest[at + 1..];
            // An operator runs to the next `%` that is not inside parentheses.
            let mut depth = 0usize;
            let end = after.char_indices().find(|&(_, c)| {
                match c {
                    '(' => depth += 1,
                    ')' => depth = depth.saturating_sub(1),
                    '%' if depth == 0 => return true,
                    _ => {}
                }
                false
            });
            let Some((end, _)) = end else {
                return Err(FormatError::Unterminated(after.to_string()));
            };
            pieces.push(Piece::Field(field(&after[..end])?));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        Ok(LogFormat { pieces })
    }

    /// The line for `r` (no trailing newline).
    pub fn render(&self, r: &Record) -> String {
        let mut out = String::with_capacity(256);
        self.render_into(r, &mut out);
        out
    }

    /// Appends the line for `r` to `out`: each value is escaped straight into it, with no
    /// string of its own (this runs once per request).
    pub fn render_into(&self, r: &Record, out: &mut String) {
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Field(f) => write_value(out, f, r),
            }
        }
    }
}

/// `-` for an empty value, as Envoy writes it.
pub(super) fn dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// The first of `names` that has a value: a header of `h`, or a request pseudo-header
/// from `req` (`None` for response headers, which have none).
fn header<'a>(h: &'a HeaderMap, req: Option<&'a Record>, names: &[String]) -> Cow<'a, str> {
    for n in names {
        let v = match (n.as_str(), req) {
            (":method", Some(r)) => Some(Cow::Borrowed(r.method.as_str())),
            (":path", Some(r)) => Some(Cow::Borrowed(r.path.as_str())),
            (":authority" | "host", Some(r)) => Some(Cow::Borrowed(r.authority.as_str())),
            (":scheme", Some(_)) => Some(Cow::Borrowed("http")),
            (name, _) if name.starts_with(':') => None,
            (name, _) => h.get(name).map(|v| String::from_utf8_lossy(v.as_bytes())),
        };
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            return v;
        }
    }
    Cow::Borrowed("-")
}

fn write_value(out: &mut String, f: &Field, r: &Record) {
    use std::fmt::Write;
    let text = match f {
        Field::StartTime => {
            match r.start {
                Some(t) => write_rfc3339_millis(out, t),
                None => out.push('-'),
            }
            return;
        }
        Field::ResponseCode => return write!(out, "{}", r.response_code).unwrap_or(()),
        Field::BytesReceived => return write!(out, "{}", r.bytes_received).unwrap_or(()),
        Field::BytesSent => return write!(out, "{}", r.bytes_sent).unwrap_or(()),
        Field::Duration => return write!(out, "{}", r.duration_ms).unwrap_or(()),
        Field::Req(names) => header(&r.request_headers, Some(r), names),
        Field::Resp(names) => header(&r.response_headers, None, names),
        Field::Protocol => Cow::Borrowed(dash(r.protocol)),
        Field::ResponseFlags => Cow::Borrowed(dash(&r.response_flags)),
        Field::ResponseCodeDetails => Cow::Borrowed(dash(r.response_code_details)),
        Field::UpstreamHost => Cow::Borrowed(dash(&r.upstream_host)),
        Field::UpstreamCluster => Cow::Borrowed(dash(&r.upstream_cluster)),
        Field::RouteName => Cow::Borrowed(dash(&r.route_name)),
        Field::DownstreamRemoteAddress => Cow::Borrowed(dash(&r.downstream_remote)),
        Field::DownstreamLocalAddress => Cow::Borrowed(dash(&r.downstream_local)),
        Field::DownstreamPeerUriSan => Cow::Borrowed(dash(&r.source_principal)),
        Field::TraceParent => Cow::Borrowed(dash(&r.traceparent)),
        Field::Unset => Cow::Borrowed("-"),
    };
    escape_into(out, &text);
}

/// Copies `v` with control characters, `"` and `\` escaped, so a value cannot end its field
/// or the line.
fn escape_into(out: &mut String, v: &str) {
    if !v.chars().any(|c| c == '"' || c == '\\' || c.is_control()) {
        out.push_str(v);
        return;
    }
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
}

/// `2026-12-02T11:33:45.123Z`, Envoy's `%START_TIME%`.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let mut out = String::with_capacity(24);
    write_rfc3339_millis(&mut out, t);
    out
}

fn write_rfc3339_millis(out: &mut String, t: SystemTime) {
    use std::fmt::Write;
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        d.subsec_millis()
    );
}

/// How the waypoint writes its access log, fixed at start: a text format, or Istio's JSON
/// (`LOG_FORMAT=json`). It also says which headers a request must keep for its line.
#[derive(Debug, Clone)]
pub struct AccessLogger {
    /// `None`: JSON.
    text: Option<LogFormat>,
    request_headers: Vec<http::HeaderName>,
    response_headers: Vec<http::HeaderName>,
    /// Where lines go: stdout, in batches.
    lines: Arc<LineWriter>,
}

impl AccessLogger {
    /// Text lines in `format` (Istio's default when `None`), or JSON when `json`.
    pub fn new(format: Option<&str>, json: bool) -> Result<Self, FormatError> {
        let text = if json {
            None
        } else {
            Some(match format {
                Some(f) => LogFormat::parse(f)?,
                None => LogFormat::default(),
            })
        };
        let (mut req, mut resp) = (Vec::new(), Vec::new());
        match &text {
            Some(f) => {
                for p in &f.pieces {
                    match p {
                        Piece::Field(Field::Req(n)) => req.extend(n.iter().filter(|h| !h.starts_with(':')).cloned()),
                        Piece::Field(Field::Resp(n)) => resp.extend(n.iter().filter(|h| !h.starts_with(':')).cloned()),
                        _ => {}
                    }
                }
            }
            None => {
                req.extend(["x-envoy-original-path", "x-forwarded-for", "user-agent", "x-request-id"].map(String::from))
            }
        }
        req.sort();
        req.dedup();
        resp.sort();
        resp.dedup();
        // Parsed once here, not per request; a name that is not a valid header is never present.
        let names = |v: Vec<String>| v.iter().filter_map(|n| http::HeaderName::from_bytes(n.as_bytes()).ok()).collect();
        let (req, resp) = (names(req), names(resp));
        Ok(AccessLogger { text, request_headers: req, response_headers: resp, lines: Arc::new(LineWriter::stdout()) })
    }

    /// The request headers the line will need, copied (only those).
    pub fn capture_request(&self, h: &HeaderMap) -> HeaderMap {
        capture(h, &self.request_headers)
    }

    /// The response headers the line will need, copied (only those).
    pub fn capture_response(&self, h: &HeaderMap) -> HeaderMap {
        capture(h, &self.response_headers)
    }

    /// Writes `r`'s line to stdout, as it is (no log prefix, as Envoy writes it), when the
    /// `access` target is on at info (`RUST_LOG`, the admin `/logging` endpoint). Lines are
    /// batched: see [`LineWriter`] and [`AccessLogger::writer`].
    pub fn emit(&self, r: &Record) {
        if !tracing::enabled!(target: "access", tracing::Level::INFO) {
            return;
        }
        match &self.text {
            Some(f) => {
                let reused = LINE.try_with(|line| {
                    let mut line = line.borrow_mut();
                    line.clear();
                    f.render_into(r, &mut line);
                    self.lines.push(&line);
                });
                // The thread's buffer is gone while the thread ends: render on the side.
                if reused.is_err() {
                    self.lines.push(&f.render(r));
                }
            }
            None => self.lines.push(&render_json(r)),
        }
    }

    /// The batching writer, for the task that flushes it on time.
    pub fn writer(&self) -> Arc<LineWriter> {
        self.lines.clone()
    }
}

thread_local! {
    /// Each serving thread renders its lines into one reused string.
    static LINE: std::cell::RefCell<String> = std::cell::RefCell::new(String::with_capacity(512));
}

fn capture(h: &HeaderMap, names: &[http::HeaderName]) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in names {
        for v in h.get_all(name) {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

/// The line in Istio's default JSON format (plus the source principal and traceparent).
pub fn render_json(r: &Record) -> String {
    let req = |n: &str| header(&r.request_headers, Some(r), &[n.to_string()]);
    serde_json::json!({
        "start_time": r.start.map(rfc3339_millis),
        "method": r.method,
        "path": header(&r.request_headers, Some(r), &["x-envoy-original-path".into(), ":path".into()]),
        "protocol": r.protocol,
        "response_code": r.response_code,
        "response_flags": dash(&r.response_flags),
        "response_code_details": dash(r.response_code_details),
        "connection_termination_details": null,
        "upstream_transport_failure_reason": null,
        "bytes_received": r.bytes_received,
        "bytes_sent": r.bytes_sent,
        "duration": r.duration_ms,
        "upstream_service_time": null,
        "x_forwarded_for": req("x-forwarded-for"),
        "user_agent": req("user-agent"),
        "request_id": req("x-request-id"),
        "authority": r.authority,
        "upstream_host": dash(&r.upstream_host),
        "upstream_cluster": dash(&r.upstream_cluster),
        "upstream_local_address": null,
        "downstream_local_address": dash(&r.downstream_local),
        "downstream_remote_address": dash(&r.downstream_remote),
        "requested_server_name": null,
        "route_name": dash(&r.route_name),
        "downstream_peer_uri_san": &*r.source_principal,
        "traceparent": r.traceparent,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        let mut h = HeaderMap::new();
        h.insert("user-agent", "curl/8.0".parse().unwrap());
        h.insert("x-request-id", "abc".parse().unwrap());
        Record {
            start: Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_764_675_225_123)),
            method: "GET".into(),
            path: "/reviews/0".into(),
            authority: "reviews:9080".into(),
            protocol: "HTTP/1.1",
            response_code: 200,
            response_code_details: "via_upstream",
            upstream_host: "10.0.0.7:9080".into(),
            upstream_cluster: "reviews.default.svc.cluster.local".into(),
            downstream_remote: "10.0.0.2:40000".into(),
            downstream_local: "10.96.0.30:9080".into(),
            bytes_received: 0,
            bytes_sent: 11,
            duration_ms: 3,
            request_headers: h,
            ..Default::default()
        }
    }

    #[test]
    fn istio_default_format_renders_every_field_in_istios_order() {
        let line = LogFormat::default().render(&record());
        assert_eq!(
            line,
            "[2025-12-02T11:33:45.123Z] \"GET /reviews/0 HTTP/1.1\" 200 - via_upstream - \"-\" 0 11 3 - \"-\" \
             \"curl/8.0\" \"abc\" \"reviews:9080\" \"10.0.0.7:9080\" reviews.default.svc.cluster.local - \
             10.96.0.30:9080 10.0.0.2:40000 - -"
        );
    }

    #[test]
    fn custom_format_picks_headers_with_fallbacks() {
        let f = LogFormat::parse("%REQ(X-MISSING?USER-AGENT)% %RESPONSE_CODE% %RESP(X-SERVED)%").unwrap();
        let mut r = record();
        r.response_headers.insert("x-served", "v1".parse().unwrap());
        assert_eq!(f.render(&r), "curl/8.0 200 v1");
    }

    #[test]
    fn client_chosen_values_cannot_forge_a_line_or_close_a_quote() {
        let f = LogFormat::parse("\"%REQ(:PATH)%\" \"%REQ(USER-AGENT)%\"").unwrap();
        let mut r = record();
        r.path = "/a\"\n[forged] \"GET".into();
        r.request_headers.insert("user-agent", http::HeaderValue::from_bytes(b"x\\\"y").unwrap());
        let line = f.render(&r);
        assert!(!line.contains('\n'), "{line}");
        assert_eq!(line, "\"/a\\\"\\n[forged] \\\"GET\" \"x\\\\\\\"y\"");
    }

    #[test]
    fn unknown_or_broken_operators_are_refused_by_name() {
        assert_eq!(LogFormat::parse("%NOPE%"), Err(FormatError::Unknown("NOPE".into())));
        assert!(matches!(LogFormat::parse("%RESPONSE_CODE"), Err(FormatError::Unterminated(_))));
        assert_eq!(LogFormat::parse("%REQ()%"), Err(FormatError::MissingHeader("REQ".into())));
    }

    #[test]
    fn json_line_has_istios_default_keys() {
        let v: serde_json::Value = serde_json::from_str(&render_json(&record())).unwrap();
        for k in [
            "start_time",
            "method",
            "path",
            "protocol",
            "response_code",
            "response_flags",
            "bytes_received",
            "bytes_sent",
            "duration",
            "x_forwarded_for",
            "user_agent",
            "request_id",
            "authority",
            "upstream_host",
            "upstream_cluster",
            "downstream_local_address",
            "downstream_remote_address",
            "route_name",
        ] {
            assert!(v.get(k).is_some(), "missing {k}: {v}");
        }
        assert_eq!(v["user_agent"], "curl/8.0");
        assert_eq!(v["start_time"], "2025-12-02T11:33:45.123Z");
    }

    #[test]
    fn start_time_is_rfc3339_utc_with_millis() {
        assert_eq!(rfc3339_millis(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339_millis(leap), "2000-02-29T00:00:00.000Z");
    }
}
