//! A small userspace TCP proxy between a node and nats-server (netem is not available on
//! these machines): adds latency to every chunk in both directions, and resets every open
//! connection on demand (RST, via SO_LINGER 0).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub(crate) struct Proxy {
    pub(crate) url: String,
    latency_ms: Arc<AtomicU64>,
    resets: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream` (`host:port`).
    pub(crate) async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy listen");
        let url = format!("nats://{}", listener.local_addr().unwrap());
        let latency_ms = Arc::new(AtomicU64::new(0));
        let (resets, _) = watch::channel(0u64);
        let (lat, rx) = (latency_ms.clone(), resets.subscribe());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, lat, mut rx) = (upstream.clone(), lat.clone(), rx.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    // Linger 0 closes with a reset and never blocks (the deprecation is
                    // about a positive linger blocking the thread on drop).
                    #[allow(deprecated)]
                    let _ = client.set_linger(Some(Duration::ZERO));
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    rx.mark_unchanged();
                    tokio::select! {
                        _ = pump(cr, sw, lat.clone()) => {}
                        _ = pump(sr, cw, lat) => {}
                        _ = rx.changed() => {}
                    }
                    // Dropping both halves closes both sockets; linger 0 makes it a reset.
                });
            }
        });
        Proxy {
            url,
            latency_ms,
            resets,
            task,
        }
    }

    pub(crate) fn set_latency(&self, d: Duration) {
        self.latency_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Cuts every connection open now (clients reconnect through the proxy).
    pub(crate) fn reset_all(&self) {
        self.resets.send_modify(|n| *n += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    latency_ms: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let ms = latency_ms.load(Ordering::Relaxed);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
