//! Per-session, per-destination counters: requests, refusals and bytes each way.
//!
//! The proxy counts into a session's [`Traffic`] as bytes flow (a long WebSocket shows up
//! while it is open, not only when it closes); the control API and `/metrics` read snapshots.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Destination hosts counted one by one in a session; requests to further hosts are counted
/// together under [`OTHER_HOSTS`], so a page cannot make the table grow without bound.
pub const MAX_TRACKED_HOSTS: usize = 1024;
/// The entry that counts every host beyond [`MAX_TRACKED_HOSTS`].
pub const OTHER_HOSTS: &str = "(other)";
/// The entry for requests that named no host at all (unparseable proxy requests).
pub const NO_HOST: &str = "(none)";

/// Live counters of one destination host.
#[derive(Debug, Default)]
pub struct HostCounters {
    requests: AtomicU64,
    refused: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
}

impl HostCounters {
    /// One request decided (allowed or refused).
    pub(crate) fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// One refusal. A refused request is also counted by [`HostCounters::request`]; an open
    /// tunnel closed later (held value, changed mandate) only here.
    pub(crate) fn refusal(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    fn sent(&self, n: usize) {
        self.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn received(&self, n: usize) {
        self.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn snapshot(&self) -> HostTraffic {
        HostTraffic {
            requests: self.requests.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
        }
    }
}

/// The counts of one destination host at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct HostTraffic {
    /// Requests (CONNECT or plain http) the proxy decided on.
    pub requests: u64,
    /// Of those, refused; plus tunnels closed later by a refusal.
    pub refused: u64,
    /// Bytes written to the destination (request heads and bodies, tunnel payload).
    pub bytes_sent: u64,
    /// Bytes read from the destination.
    pub bytes_received: u64,
}

/// One session's counters, by destination host as the audit log shows it (normalised, held
/// values redacted).
#[derive(Debug, Default)]
pub struct Traffic {
    hosts: Mutex<HashMap<String, Arc<HostCounters>>>,
    finished: AtomicBool,
    published: AtomicBool,
}

impl Traffic {
    /// The counters of `host`, created on first use; [`OTHER_HOSTS`]' once the table is full.
    pub fn host(&self, host: &str) -> Arc<HostCounters> {
        let key = if host.is_empty() { NO_HOST } else { host };
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = hosts.get(key) {
            return Arc::clone(c);
        }
        // The overflow entry is one of the MAX_TRACKED_HOSTS + 1 entries at most.
        let key = if hosts.len() >= MAX_TRACKED_HOSTS {
            OTHER_HOSTS
        } else {
            key
        };
        Arc::clone(hosts.entry(key.to_owned()).or_default())
    }

    /// The counts now, by host.
    pub fn snapshot(&self) -> BTreeMap<String, HostTraffic> {
        self.hosts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(h, c)| (h.clone(), c.snapshot()))
            .collect()
    }

    /// Marks the counts final: the proxy serving them has stopped (the session is ending).
    pub fn finish(&self) {
        self.finished.store(true, Ordering::Relaxed);
    }

    /// Whether [`Traffic::finish`] was called.
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Relaxed)
    }

    /// True exactly once: lets whoever publishes the counts elsewhere (the supervisor's
    /// `/metrics`) register them on first use without a lock on every request.
    pub fn first_publication(&self) -> bool {
        !self.published.swap(true, Ordering::Relaxed)
    }
}

/// A stream to a destination that counts what goes through it: writes as bytes sent, reads
/// as bytes received.
pub(crate) struct Counted<S> {
    inner: S,
    counters: Arc<HostCounters>,
}

impl<S> Counted<S> {
    pub(crate) fn new(inner: S, counters: Arc<HostCounters>) -> Self {
        Counted { inner, counters }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.counters.received(n);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.counters.sent(n);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            self.counters.sent(n);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn hosts_beyond_the_limit_share_one_entry() {
        let t = Traffic::default();
        for i in 0..MAX_TRACKED_HOSTS + 10 {
            t.host(&format!("h{i}.example")).request();
        }
        t.host("h0.example").request();
        let snap = t.snapshot();
        assert_eq!(snap.len(), MAX_TRACKED_HOSTS + 1);
        assert_eq!(
            snap["h0.example"].requests, 2,
            "a tracked host keeps its entry"
        );
        assert_eq!(snap[OTHER_HOSTS].requests, 10);
        assert_eq!(
            t.host("").snapshot().requests,
            10,
            "a full table has no room for the empty host either: it counts as (other)"
        );
        assert_eq!(t.snapshot().len(), MAX_TRACKED_HOSTS + 1);
        let fresh = Traffic::default();
        fresh.host("").refusal();
        assert_eq!(fresh.snapshot()[NO_HOST].refused, 1);
    }

    #[tokio::test]
    async fn counted_streams_count_both_ways() {
        let counters = Arc::new(HostCounters::default());
        let (near, mut far) = tokio::io::duplex(64);
        let mut s = Counted::new(near, Arc::clone(&counters));
        s.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        far.read_exact(&mut buf).await.unwrap();
        far.write_all(b"0123456789").await.unwrap();
        let mut back = [0u8; 10];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(
            counters.snapshot(),
            HostTraffic {
                requests: 0,
                refused: 0,
                bytes_sent: 5,
                bytes_received: 10
            }
        );
    }
}
