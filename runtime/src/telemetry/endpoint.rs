//! The HTTP endpoint: `/metrics`, `/healthz` and `/readyz`, served by hyper's HTTP/1.1 server.
//!
//! GET and HEAD (hyper answers HEAD with the headers GET would have, and no body); the query
//! string is ignored; keep-alive for HTTP/1.1 clients, one request per connection for HTTP/1.0
//! ones that do not ask for more (hyper closes the connection after the response).

use std::convert::Infallible;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::health::Health;
use super::metrics::render;

/// The content type of the Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4";

/// A connection that has not sent a whole request head within this time is closed: one
/// opened and left silent, a request trickled in, or a kept-alive connection left idle.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `/metrics`, `/healthz` and `/readyz` on an already bound listener until the task
/// is dropped (connections already accepted run on in their own tasks until they close).
pub async fn serve(listener: TcpListener, health: Health) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                // E.g. out of file descriptors: wait instead of spinning on the error.
                tracing::debug!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let health = health.clone();
        let conn = http.serve_connection(
            TokioIo::new(sock),
            service_fn(move |req| {
                let response = respond(&req, &health);
                async move { Ok::<_, Infallible>(response) }
            }),
        );
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics endpoint: connection ended with an error");
            }
        });
    }
}

/// The answer to one request: by path (the query string ignored), for GET and HEAD only.
fn respond(req: &Request<Incoming>, health: &Health) -> Response<String> {
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n",
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => text(StatusCode::OK, PROMETHEUS_TEXT, render()),
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if health.is_ready() => text(StatusCode::OK, "text/plain", "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n"),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// A response with a text body; hyper adds its `Content-Length`.
fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<String>,
) -> Response<String> {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::serve;
    use crate::telemetry::Health;

    /// A response as read off the socket to EOF.
    struct Response {
        status: u16,
        head: String,
        body: String,
    }

    impl Response {
        fn header(&self, name: &str) -> Option<&str> {
            self.head.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim())
            })
        }
    }

    /// Serves on an ephemeral port; the address to talk to.
    async fn start(health: Health) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(serve(listener, health));
        addr
    }

    /// Writes `parts` one after the other (a pause between them, so that the server sees
    /// them as separate reads), then reads to EOF: the server must close the connection.
    async fn exchange(addr: &str, parts: &[&str]) -> String {
        let mut sock = TcpStream::connect(addr).await.unwrap();
        sock.set_nodelay(true).unwrap();
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            sock.write_all(part.as_bytes()).await.unwrap();
            sock.flush().await.unwrap();
        }
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut out))
            .await
            .expect("the server closes the connection after the response")
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    fn parse(raw: &str) -> Response {
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .expect("a complete response head");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status code");
        Response {
            status,
            head: head.to_string(),
            body: body.to_string(),
        }
    }

    async fn request(addr: &str, parts: &[&str]) -> Response {
        parse(&exchange(addr, parts).await)
    }

    fn get(method: &str, target: &str) -> String {
        format!("{method} {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    }

    #[tokio::test]
    async fn metrics_are_served_as_prometheus_text() {
        crate::telemetry::metrics::init();
        let addr = start(Health::default()).await;
        let r = request(&addr, &[&get("GET", "/metrics")]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4"));
        assert!(r.body.contains("\nchoreo_build_info{"), "{}", r.body);
        let len: usize = r.header("content-length").unwrap().parse().unwrap();
        assert_eq!(len, r.body.len());
    }

    #[tokio::test]
    async fn head_answers_the_headers_without_a_body() {
        crate::telemetry::metrics::init();
        let addr = start(Health::default()).await;
        for path in ["/metrics", "/healthz"] {
            let r = request(&addr, &[&get("HEAD", path)]).await;
            assert_eq!(r.status, 200, "{path}");
            assert_eq!(r.body, "", "HEAD {path} has no body");
            let got = request(&addr, &[&get("GET", path)]).await;
            assert!(!got.body.is_empty(), "{path}");
            assert_eq!(
                r.header("content-type"),
                got.header("content-type"),
                "{path}"
            );
            // The length GET would have, or none; the process metrics move between the two.
            if let Some(len) = r.header("content-length") {
                let len: usize = len.parse().unwrap();
                assert!(len > 0, "{path}");
                if path == "/healthz" {
                    assert_eq!(len, got.body.len());
                }
            }
        }
    }

    #[tokio::test]
    async fn a_query_string_is_ignored() {
        let addr = start(Health::default()).await;
        let r = request(&addr, &[&get("GET", "/metrics?x=1")]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4"));
        assert_eq!(
            request(&addr, &[&get("GET", "/healthz?a=b")]).await.status,
            200
        );
    }

    #[tokio::test]
    async fn a_request_split_across_writes_is_read_whole() {
        let addr = start(Health::default()).await;
        let whole = get("GET", "/metrics");
        let r = request(&addr, &[&whole[..8], &whole[8..]]).await;
        assert_eq!(r.status, 200, "{}", r.head);
        assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4"));
    }

    #[tokio::test]
    async fn an_http_1_0_request_is_answered_and_the_connection_closed() {
        // As the integration harness and simple scrapers ask: no Host, no Connection header.
        let addr = start(Health::default()).await;
        let r = request(&addr, &["GET /healthz HTTP/1.0\r\n\r\n"]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "ok\n");
    }

    #[tokio::test]
    async fn requests_on_one_kept_alive_connection_are_all_answered() {
        let addr = start(Health::default()).await;
        let keep = "GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n";
        let raw = exchange(&addr, &[&format!("{keep}{}", get("GET", "/metrics"))]).await;
        assert_eq!(raw.matches("HTTP/1.1 200 OK").count(), 2, "{raw}");
    }

    #[tokio::test]
    async fn readyz_follows_health_and_healthz_is_always_ok() {
        let health = Health::default();
        let addr = start(health.clone()).await;
        let r = request(&addr, &[&get("GET", "/readyz")]).await;
        assert_eq!((r.status, r.body.as_str()), (503, "not ready\n"));
        let r = request(&addr, &[&get("GET", "/healthz")]).await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
        health.set_ready(true);
        let r = request(&addr, &[&get("GET", "/readyz")]).await;
        assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
    }

    #[tokio::test]
    async fn a_method_other_than_get_or_head_is_not_allowed() {
        let addr = start(Health::default()).await;
        let r = request(
            &addr,
            &["POST /metrics HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"],
        )
        .await;
        assert_eq!(r.status, 405);
        assert_eq!(r.header("allow"), Some("GET, HEAD"));
    }

    #[tokio::test]
    async fn an_unknown_path_is_not_found() {
        let addr = start(Health::default()).await;
        for path in ["/", "/metrics/x", "/nope"] {
            assert_eq!(
                request(&addr, &[&get("GET", path)]).await.status,
                404,
                "{path}"
            );
        }
    }
}
