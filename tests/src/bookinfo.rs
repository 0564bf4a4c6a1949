//! In-process stand-ins for Istio's Bookinfo sample (`productpage`, `details`, `reviews` v1/v2/v3,
//! `ratings`) and its `tcp-echo` sample, running inside mini-cluster pods.
//!
//! Why: Istio's traffic-management tasks (route to v1, user `jason` to v2, 50/50, v3, delays,
//! aborts, timeouts, TCP shifting, mirroring) are defined against these apps' HTTP APIs, headers,
//! timeouts and retries. Reproducing that behaviour in-process lets end-to-end tests and the demo
//! run the same tasks against the mesh and judge them by counting answers, without containers.
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;

use crate::{InNetns, Pod};

/// The port every Bookinfo service listens on and is addressed by (`Host: reviews:9080`).
///
/// Why: routing rules and the `Host` headers the apps send name it.
pub const BOOKINFO_PORT: u16 = 9080;

/// The port Istio's tcp-echo sample listens on.
///
/// Why: the TCP traffic-shifting task addresses it.
pub const TCP_ECHO_PORT: u16 = 9000;

/// What productpage shows when details did not answer 200 (the real app's wording).
///
/// Why: tests recognise a failed details call by it.
pub const DETAILS_UNAVAILABLE: &str = "Sorry, product details are currently unavailable for this book.";

/// What productpage shows when reviews did not answer 200 within its timeout and retry (the real
/// app's wording).
///
/// Why: the fault-injection and timeout tasks are judged by it.
pub const REVIEWS_UNAVAILABLE: &str = "Sorry, product reviews are currently unavailable for this book.";

/// What reviews v2/v3 put in place of a rating when ratings failed (the real app's wording).
///
/// Why: tests of faults on ratings recognise them by it.
pub const RATINGS_UNAVAILABLE: &str = "Ratings service is currently unavailable";

/// How many requests [`App::received`] keeps (the oldest are forgotten first).
const RECEIVED_CAP: usize = 10_000;
/// Largest request or response body read; the apps never need more.
const MAX_BODY: usize = 1 << 20;
/// productpage's timeout per call to details and to reviews (real app: `timeout=3.0`).
const PRODUCTPAGE_CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How many times productpage tries reviews (real app: one retry, "bug introduced explicitly for
/// illustration in fault injection task").
const PRODUCTPAGE_REVIEWS_TRIES: usize = 2;
/// reviews v2's timeout towards ratings (real app: 10 s for black stars).
const REVIEWS_V2_RATINGS_TIMEOUT: Duration = Duration::from_secs(10);
/// reviews v3's timeout towards ratings (real app: 2.5 s for red stars; the fault-injection task
/// points at it).
const REVIEWS_V3_RATINGS_TIMEOUT: Duration = Duration::from_millis(2500);
/// How long a server waits for a request's headers before closing an idle connection.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Headers productpage and reviews copy from their incoming request onto their outgoing calls:
/// the real apps' `headers_to_propagate` list plus single-header `b3`. Any other `x-b3-*` header
/// is forwarded too.
const PROPAGATED_HEADERS: &[&str] = &[
    "end-user",
    "x-request-id",
    "x-ot-span-context",
    "x-datadog-trace-id",
    "x-datadog-parent-id",
    "x-datadog-sampling-priority",
    "traceparent",
    "tracestate",
    "x-cloud-trace-context",
    "grpc-trace-bin",
    "b3",
    "sw8",
    "user-agent",
    "cookie",
    "authorization",
    "jwt",
];

/// Header names (lower-case) and values, in order; repeated names appear repeatedly.
///
/// Why: tests compare headers as plain strings, without an HTTP library.
pub type HeaderList = Vec<(String, String)>;

/// Which sample app an [`App`] plays.
///
/// Why: each Istio task needs a particular service graph; the roles are its building blocks.
#[derive(Debug, Clone)]
pub enum Role {
    /// GET /productpage (also `/productpage?u=normal` etc.): calls details GET /details/0 and reviews GET /reviews/0.
    ProductPage {
        /// Where details is reached (a service address when the mesh routes it).
        details: SocketAddr,
        /// Where reviews is reached (a service address when the mesh routes it).
        reviews: SocketAddr,
    },
    /// GET /details/<id>: the book's fixed details.
    Details,
    /// version 1, 2 or 3; v2 and v3 call ratings GET /ratings/0.
    Reviews {
        /// 1 (no stars), 2 (black stars) or 3 (red stars).
        version: u8,
        /// Where ratings is reached (a service address when the mesh routes it).
        ratings: SocketAddr,
    },
    /// GET /ratings/<id>: fixed ratings for the two reviewers.
    Ratings,
    /// Istio's tcp-echo: for each line received on a connection, answers "<prefix> <line>\n" (v1 prefix "one", v2 "two").
    TcpEcho {
        /// "one" for tcp-echo v1, "two" for v2.
        prefix: String,
    },
    /// Answers every HTTP request 200 with body "<name>\n" — a generic backend for routing tests.
    Echo {
        /// What the body names (e.g. a version), so answers can be counted per backend.
        name: String,
    },
    /// Answers every HTTP request `status` with body "<name>\n" after `delay`: a failing or
    /// slow backend for outlier-detection and circuit-breaking tests.
    Answer { name: String, status: u16, delay: Duration },
    /// A gRPC server (HTTP/2 only): every unary call is answered with one message holding
    /// `name`, and `grpc-status: 0` in the trailers (see [`crate::grpc_app`]).
    Grpc {
        /// What the answer message holds.
        name: String,
    },
}

/// One request as an app saw it.
///
/// Why: mirroring and header-manipulation tests check what reached which backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// HTTP method; `"LINE"` for a line received by a tcp-echo app.
    pub method: String,
    /// The request target as sent (path and query, like HTTP/2's `:path`); for tcp-echo the line
    /// without its newline.
    pub path: String,
    /// The `Host` header, or the request target's authority when there is none (empty for tcp-echo).
    pub host: String,
    /// Every header in arrival order, names lower-case (values that are not UTF-8 are shown lossily).
    pub headers: Vec<(String, String)>,
}

impl Received {
    /// The first value of header `name` (any case).
    ///
    /// Why: most checks look at one header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A running sample app in a pod; stops (listener and open connections closed) when dropped.
///
/// Why: tests set up a service graph for a task and tear it down by scope.
pub struct App {
    received: Arc<Mutex<VecDeque<Received>>>,
    accepted: Arc<std::sync::atomic::AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the serving thread shares with its [`App`] and connection tasks.
struct Shared {
    role: Role,
    received: Arc<Mutex<VecDeque<Received>>>,
    accepted: Arc<std::sync::atomic::AtomicU64>,
}

impl Shared {
    fn record(&self, r: Received) {
        let mut q = self.received.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= RECEIVED_CAP {
            q.pop_front();
        }
        q.push_back(r);
    }
}

impl App {
    /// Listens on `[::]:port` (dual-stack) inside `pod` and serves `role` there until dropped.
    ///
    /// Why: the app's listener and every call it makes to other services belong to the pod's
    /// network namespace, so the mesh captures both directions as it would for a real pod.
    pub fn start(pod: &Pod, port: u16, role: Role) -> Result<App> {
        if let Role::Reviews { version, .. } = role {
            if !(1..=3).contains(&version) {
                bail!("App::start: reviews version must be 1, 2 or 3, got {version}");
            }
        }
        let listener = pod
            .run(move || -> std::io::Result<std::net::TcpListener> {
                let l = std::net::TcpListener::bind(("::", port))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .with_context(|| format!("binding [::]:{port} in pod {}", pod.name()))?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("building app runtime")?;
        let received = Arc::new(Mutex::new(VecDeque::new()));
        let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let shared = Arc::new(Shared { role, received: received.clone(), accepted: accepted.clone() });
        let (stop_tx, stop_rx) = oneshot::channel();
        // The thread joins the pod's netns first, so the outgoing sockets it creates are the pod's.
        let thread = pod.spawn_thread(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("mesh-tests: bookinfo app on port {port}: {e}");
                        return;
                    }
                };
                tokio::select! {
                    _ = stop_rx => {}
                    _ = serve(listener, shared) => {}
                }
            });
            // Dropping the runtime here drops every connection task and in-flight call.
            drop(rt);
        });
        Ok(App { received, accepted, stop: Some(stop_tx), thread: Some(thread) })
    }

    /// Every HTTP request this app received, in order (for mirroring/header tests).
    ///
    /// Why: lets a test tell which backend saw which request and with which headers. Only the last
    /// 10000 are kept; a tcp-echo app lists each line it answered.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    /// How many connections this app has accepted.
    ///
    /// Why: connection reuse (or its limits) upstream of the app shows only here.
    pub fn connections(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                eprintln!("mesh-tests: a bookinfo app thread panicked");
            }
        }
    }
}

/// Accepts connections forever, each served on its own task.
async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                // e.g. EMFILE: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        shared.accepted.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Role::TcpEcho { prefix } = &shared.role {
                let _ = tcp_echo(stream, prefix, &shared).await;
                return;
            }
            if let Role::Grpc { name } = &shared.role {
                let name = name.clone();
                let record = shared.clone();
                crate::grpc_app::serve_connection(stream, name, move |r| record.record(r)).await;
                return;
            }
            let svc = hyper::service::service_fn(|req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// tcp-echo: answers each line with `"<prefix> <line>\n"`; a last line without newline is
/// answered too, then the connection ends.
async fn tcp_echo(stream: tokio::net::TcpStream, prefix: &str, shared: &Shared) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).await? == 0 {
            return w.shutdown().await;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.strip_suffix('\n').unwrap_or(&text);
        let text = text.strip_suffix('\r').unwrap_or(text);
        shared.record(Received {
            method: "LINE".into(),
            path: text.to_string(),
            host: String::new(),
            headers: Vec::new(),
        });
        w.write_all(tcp_echo_answer(prefix, text).as_bytes()).await?;
    }
}

fn tcp_echo_answer(prefix: &str, line: &str) -> String {
    format!("{prefix} {line}\n")
}

/// Records `req`, drains its body (so keep-alive stays usable) and answers per the app's role.
async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let host = parts
        .headers
        .get(HOST)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let target = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    shared.record(Received {
        method: parts.method.to_string(),
        path: target,
        host,
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect(),
    });
    if Limited::new(body, MAX_BODY).collect().await.is_err() {
        return reply(StatusCode::PAYLOAD_TOO_LARGE, "text/plain", "request body too large\n");
    }
    if let Role::Echo { name } = &shared.role {
        return reply(StatusCode::OK, "text/plain", format!("{name}\n"));
    }
    if let Role::Answer { name, status, delay } = &shared.role {
        tokio::time::sleep(*delay).await;
        let code = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return reply(code, "text/plain", format!("{name}\n"));
    }
    let path = parts.uri.path();
    let route = route(&shared.role, path);
    if route != Route::NotFound && parts.method != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "method not allowed\n");
    }
    let forward = forwarded_headers(&parts.headers);
    match (route, &shared.role) {
        (Route::Health, role) => health(role),
        (Route::ProductPage, Role::ProductPage { details, reviews }) => {
            let user = parts.headers.get("end-user").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            let page = product_page(*details, *reviews, &forward, user.as_deref()).await;
            reply(StatusCode::OK, "text/html; charset=utf-8", page)
        }
        (Route::Details(id), _) => reply(StatusCode::OK, "application/json", details_body(id)),
        (Route::Reviews(id), Role::Reviews { version, ratings }) => {
            let stars = match *version {
                1 => None,
                v => {
                    let timeout = if v == 2 { REVIEWS_V2_RATINGS_TIMEOUT } else { REVIEWS_V3_RATINGS_TIMEOUT };
                    let answer = call(*ratings, "ratings:9080", &format!("/ratings/{id}"), &forward, timeout).await;
                    Some(match answer {
                        Ok((200, body)) => parse_ratings(&body),
                        _ => (None, None),
                    })
                }
            };
            reply(StatusCode::OK, "application/json", reviews_body(*version, id, stars))
        }
        (Route::Ratings(id), _) => reply(StatusCode::OK, "application/json", ratings_body(id)),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn health(role: &Role) -> Response<Full<Bytes>> {
    match role {
        Role::ProductPage { .. } => reply(StatusCode::OK, "text/html; charset=utf-8", "Product page is healthy"),
        Role::Details => reply(StatusCode::OK, "application/json", r#"{"status":"Details is healthy"}"#),
        Role::Reviews { .. } => reply(StatusCode::OK, "application/json", r#"{"status":"Reviews is healthy"}"#),
        Role::Ratings => reply(StatusCode::OK, "application/json", r#"{"status":"Ratings is healthy"}"#),
        Role::TcpEcho { .. } | Role::Echo { .. } | Role::Answer { .. } | Role::Grpc { .. } => {
            reply(StatusCode::NOT_FOUND, "text/plain", "not found\n")
        }
    }
}

/// What an HTTP Bookinfo app does with a request path (query excluded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Health,
    ProductPage,
    Details(u64),
    Reviews(u64),
    Ratings(u64),
    NotFound,
}

fn route(role: &Role, path: &str) -> Route {
    if path == "/health" {
        return Route::Health;
    }
    let found = match role {
        Role::ProductPage { .. } => (path == "/productpage").then_some(Route::ProductPage),
        Role::Details => id_after(path, "/details/").map(Route::Details),
        Role::Reviews { .. } => id_after(path, "/reviews/").map(Route::Reviews),
        Role::Ratings => id_after(path, "/ratings/").map(Route::Ratings),
        Role::TcpEcho { .. } | Role::Echo { .. } | Role::Answer { .. } | Role::Grpc { .. } => None,
    };
    found.unwrap_or(Route::NotFound)
}

/// The numeric product id in `<prefix><id>` (nothing after it), as the real apps accept it.
fn id_after(path: &str, prefix: &str) -> Option<u64> {
    let id = path.strip_prefix(prefix)?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    id.parse().ok()
}

/// The incoming headers productpage and reviews pass on to the services they call.
fn forwarded_headers(h: &hyper::HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    h.iter()
        .filter(|(n, _)| PROPAGATED_HEADERS.contains(&n.as_str()) || n.as_str().starts_with("x-b3-"))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect()
}

/// productpage: details (one try), then reviews (two tries), each with a 3 s timeout and the
/// forwarded headers; a failure or non-200 answer shows the real app's "Sorry" text instead.
async fn product_page(
    details: SocketAddr,
    reviews: SocketAddr,
    forward: &[(HeaderName, HeaderValue)],
    user: Option<&str>,
) -> String {
    let details_body = match call(details, "details:9080", "/details/0", forward, PRODUCTPAGE_CALL_TIMEOUT).await {
        Ok((200, body)) => Some(body),
        _ => None,
    };
    let mut reviews_body = None;
    for _ in 0..PRODUCTPAGE_REVIEWS_TRIES {
        if let Ok((200, body)) = call(reviews, "reviews:9080", "/reviews/0", forward, PRODUCTPAGE_CALL_TIMEOUT).await {
            reviews_body = Some(body);
            break;
        }
    }
    productpage_body(user, details_body.as_deref(), reviews_body.as_deref())
}

/// The productpage HTML: one `details:`, `reviews:` and optional `user:` line each.
fn productpage_body(user: Option<&str>, details: Option<&str>, reviews: Option<&str>) -> String {
    let one_line = |s: &str| s.trim().replace(['\r', '\n'], " ");
    let mut page = String::from(
        "<!DOCTYPE html>\n<html>\n<head><title>Simple Bookstore App</title></head>\n<body>\n<pre>\n\
         title: The Comedy of Errors\n",
    );
    if let Some(u) = user {
        page.push_str(&format!("user: {}\n", one_line(u)));
    }
    page.push_str(&format!("details: {}\n", details.map(one_line).unwrap_or_else(|| DETAILS_UNAVAILABLE.into())));
    page.push_str(&format!("reviews: {}\n", reviews.map(one_line).unwrap_or_else(|| REVIEWS_UNAVAILABLE.into())));
    page.push_str("</pre>\n</body>\n</html>\n");
    page
}

fn details_body(id: u64) -> String {
    format!(
        r#"{{"id":{id},"author":"William Shakespeare","year":1595,"type":"paperback","pages":200,"publisher":"PublisherA","language":"English","ISBN-10":"1234567890","ISBN-13":"123-1234567890"}}"#
    )
}

fn ratings_body(id: u64) -> String {
    format!(r#"{{"id":{id},"ratings":{{"Reviewer1":5,"Reviewer2":4}}}}"#)
}

/// Reviewer1's and Reviewer2's stars from a ratings answer (`None` where missing, as the real
/// reviews app treats them).
fn parse_ratings(body: &str) -> (Option<i64>, Option<i64>) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
        return (None, None);
    };
    let stars = |who: &str| v.get("ratings").and_then(|r| r.get(who)).and_then(|s| s.as_i64());
    (stars("Reviewer1"), stars("Reviewer2"))
}

/// The reviews answer of version `version`; `stars` is `None` for v1 (no ratings call) and
/// otherwise each reviewer's stars, `None` meaning ratings failed for them.
fn reviews_body(version: u8, id: u64, stars: Option<(Option<i64>, Option<i64>)>) -> String {
    let color = if version == 3 { "red" } else { "black" };
    let rating = |s: Option<i64>| match s {
        Some(s) => format!(r#","rating":{{"stars":{s},"color":"{color}"}}"#),
        None => format!(r#","rating":{{"error":"{RATINGS_UNAVAILABLE}"}}"#),
    };
    let (r1, r2) = match stars {
        None => (String::new(), String::new()),
        Some((s1, s2)) => (rating(s1), rating(s2)),
    };
    format!(
        r#"{{"id":"{id}","podname":"reviews-v{version}","version":"v{version}","reviews":[{{"reviewer":"Reviewer1","text":"An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"{r1}}},{{"reviewer":"Reviewer2","text":"Absolutely fun and entertaining. The play lacks thematic depth when compared to other plays by Shakespeare."{r2}}}]}}"#
    )
}

/// Which reviews version served a productpage answer (or a reviews answer), `None` when reviews
/// was unavailable.
///
/// Why: Istio's routing tasks are judged by counting versions over many page loads.
pub fn reviews_version(productpage_body: &str) -> Option<u8> {
    if reviews_unavailable(productpage_body) {
        return None;
    }
    // Only the reviews line of a productpage answer; a bare reviews answer as a whole.
    let body = productpage_body.lines().find_map(|l| l.strip_prefix("reviews: ")).unwrap_or(productpage_body);
    const POD: &str = "\"podname\":\"reviews-v";
    if let Some(i) = body.find(POD) {
        let digits: String = body[i + POD.len()..].chars().take_while(|c| c.is_ascii_digit()).collect();
        if let Ok(v) = digits.parse() {
            return Some(v);
        }
    }
    if body.contains(r#""color":"red""#) {
        Some(3)
    } else if body.contains(r#""color":"black""#) {
        Some(2)
    } else {
        None
    }
}

/// Whether a productpage answer shows reviews as unavailable.
///
/// Why: the delay, abort and timeout tasks expect exactly this outcome.
pub fn reviews_unavailable(body: &str) -> bool {
    body.contains(REVIEWS_UNAVAILABLE)
}

/// The sending half of a client connection.
type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// Aborts a spawned task (here: a client connection driver) when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A fresh HTTP/1.1 client connection to `addr`, its driver running on the current runtime.
async fn connect(addr: SocketAddr) -> Result<(Sender, AbortOnDrop)> {
    let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("HTTP/1.1 handshake with {addr}"))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, AbortOnDrop(driver)))
}

fn get_request(path: &str, host: &str, headers: &[(HeaderName, HeaderValue)]) -> Result<Request<Empty<Bytes>>> {
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(HOST, host)
        .body(Empty::new())
        .with_context(|| format!("building GET {path} for host {host:?}"))?;
    for (n, v) in headers {
        req.headers_mut().append(n.clone(), v.clone());
    }
    Ok(req)
}

/// Sends `req` and reads the whole answer.
async fn exchange(sender: &mut Sender, req: Request<Empty<Bytes>>) -> Result<(u16, String, hyper::HeaderMap)> {
    sender.ready().await.context("connection not usable")?;
    let resp = sender.send_request(req).await.context("sending request")?;
    let (parts, body) = resp.into_parts();
    let body =
        Limited::new(body, MAX_BODY).collect().await.map_err(|e| anyhow!("reading response body: {e}"))?.to_bytes();
    Ok((parts.status.as_u16(), String::from_utf8_lossy(&body).into_owned(), parts.headers))
}

/// One GET on a fresh connection, everything within `timeout` (the apps' outgoing calls).
async fn call(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(HeaderName, HeaderValue)],
    timeout: Duration,
) -> Result<(u16, String)> {
    let req = get_request(path, host, headers)?;
    let once = async {
        let (mut sender, _driver) = connect(addr).await?;
        exchange(&mut sender, req).await
    };
    match tokio::time::timeout(timeout, once).await {
        Ok(r) => r.map(|(status, body, _)| (status, body)),
        Err(_) => bail!("GET {path} from {addr} timed out after {timeout:?}"),
    }
}

/// Client headers as typed header names and values (names lower-cased by the parser).
fn parse_headers(headers: &[(&str, &str)]) -> Result<Vec<(HeaderName, HeaderValue)>> {
    headers
        .iter()
        .map(|(n, v)| {
            let name = HeaderName::from_bytes(n.as_bytes()).with_context(|| format!("bad header name {n:?}"))?;
            let value = HeaderValue::from_str(v).with_context(|| format!("bad value {v:?} for header {n}"))?;
            Ok((name, value))
        })
        .collect()
}

/// `host`, or `addr` when `host` is empty (HTTP/1.1 needs a Host header).
fn host_or_addr(host: &str, addr: SocketAddr) -> String {
    if host.is_empty() {
        addr.to_string()
    } else {
        host.to_string()
    }
}

/// One HTTP/1.1 GET from inside `pod` to `url_addr`: status, body and response headers (names
/// lower-case). `host` is sent as the Host header (`url_addr` when empty); `timeout` bounds the
/// whole exchange.
///
/// Why: tests act as a client pod (the mesh captures its traffic) and look at what came back,
/// e.g. a productpage answer or a header a route added.
pub fn get(
    pod: &Pod,
    url_addr: SocketAddr,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<(u16, String, HeaderList)> {
    let headers = parse_headers(headers)?;
    let host = host_or_addr(host, url_addr);
    let path = path.to_string();
    pod.run_async(move || async move { get_here(url_addr, &path, &host, &headers, timeout).await })
}

/// [`get`] in the current runtime's network namespace.
async fn get_here(
    addr: SocketAddr,
    path: &str,
    host: &str,
    headers: &[(HeaderName, HeaderValue)],
    timeout: Duration,
) -> Result<(u16, String, HeaderList)> {
    let req = get_request(path, host, headers)?;
    let once = async {
        let (mut sender, _driver) = connect(addr).await?;
        exchange(&mut sender, req).await
    };
    let (status, body, resp_headers) = tokio::time::timeout(timeout, once)
        .await
        .map_err(|_| anyhow!("GET {path} from {addr} timed out after {timeout:?}"))?
        .with_context(|| format!("GET {path} from {addr}"))?;
    let resp_headers = resp_headers
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    Ok((status, body, resp_headers))
}

/// `n` HTTP/1.1 GETs from inside `pod` over one keep-alive connection (a new one whenever the
/// server closed it), each within `timeout`: status and body of each, in order.
///
/// Why: routing tasks are judged over many requests; reusing the connection is what browsers do
/// and checks that an L7 proxy routes per request, not per connection.
pub fn get_many(
    pod: &Pod,
    addr: SocketAddr,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    n: usize,
    timeout: Duration,
) -> Result<Vec<(u16, String)>> {
    let headers = parse_headers(headers)?;
    let host = host_or_addr(host, addr);
    let path = path.to_string();
    pod.run_async(move || async move { get_many_here(addr, &path, &host, &headers, n, timeout).await })
}

/// [`get_many`] in the current runtime's network namespace.
async fn get_many_here(
    addr: SocketAddr,
    path: &str,
    host: &str,
    headers: &[(HeaderName, HeaderValue)],
    n: usize,
    timeout: Duration,
) -> Result<Vec<(u16, String)>> {
    let mut out = Vec::with_capacity(n);
    // The connection, and whether it has not carried an answer yet.
    let mut conn: Option<(Sender, AbortOnDrop, bool)> = None;
    for i in 0..n {
        let one = async {
            loop {
                let reused = match &conn {
                    Some((sender, _, fresh)) if !sender.is_closed() => !*fresh,
                    _ => {
                        let (sender, driver) = connect(addr).await?;
                        conn = Some((sender, driver, true));
                        false
                    }
                };
                let (sender, _, fresh) = conn.as_mut().expect("connected above");
                match exchange(sender, get_request(path, host, headers)?).await {
                    Ok((status, body, _)) => {
                        *fresh = false;
                        return Ok::<_, anyhow::Error>((status, body));
                    }
                    // The server may close an idle kept-alive connection just as we reuse it:
                    // try once more on a new connection.
                    Err(_) if reused => conn = None,
                    Err(e) => return Err(e),
                }
            }
        };
        let answer = tokio::time::timeout(timeout, one)
            .await
            .map_err(|_| anyhow!("GET {path} #{i} from {addr} timed out after {timeout:?}"))?
            .with_context(|| format!("GET {path} #{i} from {addr}"))?;
        out.push(answer);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any_addr() -> SocketAddr {
        "127.0.0.1:9080".parse().unwrap()
    }

    #[test]
    fn ids_are_whole_numbers_after_the_prefix() {
        assert_eq!(id_after("/details/0", "/details/"), Some(0));
        assert_eq!(id_after("/details/42", "/details/"), Some(42));
        assert_eq!(id_after("/details/", "/details/"), None);
        assert_eq!(id_after("/details/x", "/details/"), None);
        assert_eq!(id_after("/details/-1", "/details/"), None);
        assert_eq!(id_after("/details/1/2", "/details/"), None);
        assert_eq!(id_after("/details", "/details/"), None);
        assert_eq!(id_after("/reviews/0", "/details/"), None);
        assert_eq!(id_after("/details/99999999999999999999999", "/details/"), None);
    }

    #[test]
    fn routes_follow_the_role() {
        let pp = Role::ProductPage { details: any_addr(), reviews: any_addr() };
        assert_eq!(route(&pp, "/productpage"), Route::ProductPage);
        assert_eq!(route(&pp, "/productpage/"), Route::NotFound);
        assert_eq!(route(&pp, "/"), Route::NotFound);
        assert_eq!(route(&pp, "/health"), Route::Health);
        assert_eq!(route(&Role::Details, "/details/3"), Route::Details(3));
        assert_eq!(route(&Role::Details, "/reviews/3"), Route::NotFound);
        let rv = Role::Reviews { version: 2, ratings: any_addr() };
        assert_eq!(route(&rv, "/reviews/0"), Route::Reviews(0));
        assert_eq!(route(&rv, "/ratings/0"), Route::NotFound);
        assert_eq!(route(&Role::Ratings, "/ratings/7"), Route::Ratings(7));
        assert_eq!(route(&Role::Ratings, "/ratings"), Route::NotFound);
    }

    #[test]
    fn bodies_are_the_real_apps_json() {
        let d: serde_json::Value = serde_json::from_str(&details_body(0)).unwrap();
        assert_eq!(d["id"], 0);
        assert_eq!(d["author"], "William Shakespeare");
        assert_eq!(d["ISBN-13"], "123-1234567890");
        let r: serde_json::Value = serde_json::from_str(&ratings_body(0)).unwrap();
        assert_eq!(r["ratings"]["Reviewer2"], 4);
        assert_eq!(parse_ratings(&ratings_body(0)), (Some(5), Some(4)));
        assert_eq!(parse_ratings("not json"), (None, None));
        assert_eq!(parse_ratings(r#"{"ratings":{"Reviewer1":3}}"#), (Some(3), None));
        for (v, stars) in [(1, None), (2, Some((Some(5), Some(4)))), (3, Some((Some(5), None)))] {
            let body = reviews_body(v, 0, stars);
            let j: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(j["podname"], format!("reviews-v{v}"));
            assert_eq!(j["reviews"][0]["reviewer"], "Reviewer1");
        }
    }

    #[test]
    fn reviews_markers_are_easy_to_count() {
        let v1 = reviews_body(1, 0, None);
        assert!(v1.contains("reviews-v1") && !v1.contains("\"color\""));
        assert!(reviews_body(2, 0, Some((Some(5), Some(4)))).contains(r#""color":"black""#));
        assert!(reviews_body(3, 0, Some((Some(5), Some(4)))).contains(r#""color":"red""#));
        let failed = reviews_body(2, 0, Some((None, None)));
        assert!(failed.contains(RATINGS_UNAVAILABLE) && !failed.contains("\"color\""));
    }

    #[test]
    fn reviews_version_reads_productpage_answers() {
        for v in 1..=3 {
            let stars = (v > 1).then_some((Some(5), Some(4)));
            let page = productpage_body(None, Some(&details_body(0)), Some(&reviews_body(v, 0, stars)));
            assert_eq!(reviews_version(&page), Some(v), "{page}");
            assert!(!reviews_unavailable(&page));
            // A bare reviews answer too.
            assert_eq!(reviews_version(&reviews_body(v, 0, stars)), Some(v));
        }
        // v2 whose ratings call failed is still v2.
        let page = productpage_body(Some("jason"), None, Some(&reviews_body(2, 0, Some((None, None)))));
        assert_eq!(reviews_version(&page), Some(2));
        assert!(page.lines().any(|l| l == "user: jason"));
        assert!(page.lines().any(|l| l == format!("details: {DETAILS_UNAVAILABLE}")));

        let down = productpage_body(Some("jason"), Some(&details_body(0)), None);
        assert!(reviews_unavailable(&down));
        assert_eq!(reviews_version(&down), None);
        assert!(down.lines().any(|l| l == format!("reviews: {REVIEWS_UNAVAILABLE}")));

        // Stars without a pod name still tell the colour apart; nothing known tells nothing.
        assert_eq!(reviews_version(r#"reviews: {"rating":{"stars":5,"color":"red"}}"#), Some(3));
        assert_eq!(reviews_version(r#"reviews: {"rating":{"stars":5,"color":"black"}}"#), Some(2));
        assert_eq!(reviews_version("reviews: something else"), None);
        assert_eq!(reviews_version(""), None);
    }

    #[test]
    fn productpage_keeps_one_line_per_part() {
        let page = productpage_body(Some("jason"), Some("a\nb"), Some("reviews-x\r\n"));
        assert!(page.lines().any(|l| l == "details: a b"));
        assert!(page.lines().any(|l| l == "reviews: reviews-x"));
        assert!(!productpage_body(None, None, None).contains("user:"));
    }

    #[test]
    fn forwarding_keeps_tracing_and_user_headers_only() {
        let mut h = hyper::HeaderMap::new();
        for (n, v) in [
            ("end-user", "jason"),
            ("x-request-id", "r1"),
            ("traceparent", "tp"),
            ("tracestate", "ts"),
            ("b3", "b"),
            ("x-b3-traceid", "t"),
            ("x-b3-somethingnew", "s"),
            ("host", "productpage:9080"),
            ("content-length", "0"),
            ("x-other", "o"),
        ] {
            h.insert(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        let mut names: Vec<String> = forwarded_headers(&h).into_iter().map(|(n, _)| n.to_string()).collect();
        names.sort();
        assert_eq!(
            names,
            ["b3", "end-user", "traceparent", "tracestate", "x-b3-somethingnew", "x-b3-traceid", "x-request-id"]
        );
    }

    #[test]
    fn client_helpers_check_their_input() {
        assert_eq!(host_or_addr("", any_addr()), "127.0.0.1:9080");
        assert_eq!(host_or_addr("reviews:9080", any_addr()), "reviews:9080");
        let h = parse_headers(&[("End-User", "jason")]).unwrap();
        assert_eq!(h[0].0.as_str(), "end-user");
        assert!(parse_headers(&[("bad name", "x")]).is_err());
        assert!(parse_headers(&[("x", "bad\nvalue")]).is_err());
        assert_eq!(tcp_echo_answer("one", "hello"), "one hello\n");
    }
}
