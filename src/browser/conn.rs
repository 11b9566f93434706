//! One CDP connection to Chromium over its pipe, shared by the supervisor and any number of
//! agent connections.
//!
//! # Routing model
//! The supervisor talks on the root session (no `sessionId`) and on sessions it attaches itself.
//! Each agent connection gets its own browser-level session (`Target.attachToBrowserTarget`,
//! sent by [`BrowserConn::attach_agent`]); agent messages without `sessionId` travel on it, and
//! every session announced on an agent-owned session becomes owned by that agent. Anything else
//! belongs to the supervisor, and nothing that belongs to the supervisor ever reaches an agent.
//!
//! Agents see their own ids: request ids are remapped to ids unique on the pipe, session ids are
//! replaced by per-agent aliases in both directions, so an agent can neither name nor learn a
//! session it does not own. Every agent request gets exactly one answer: from the browser, or
//! from the router when it refuses the request, when the session closes first, or when the
//! browser goes away.
//!
//! # Ordering
//! One reader task routes the browser's messages in pipe order into per-agent queues, so each
//! agent sees them in pipe order (Puppeteer needs `Target.attachedToTarget` before the
//! `attachToTarget` answer). Agent messages are checked, registered and queued for the writer
//! task under one lock, so they reach the pipe in the order [`AgentLink::from_agent`] was called
//! and an answer can never arrive before its pending entry exists.
//!
//! # Raw pass-through
//! Messages are never decoded into typed CDP structures. Only the members the router rewrites
//! are parsed (see the private `envelope` module); everything else is copied as raw JSON text, so fields
//! added or renamed by a newer Chromium pass untouched.
//!
//! # Parking and replay (AG-374 4.5, 4.9)
//! When an agent's websocket drops, its link can be parked ([`AgentLink::park`]) instead of
//! detached: its browser session stays attached, so commands in flight keep running. Their
//! answers go into a replay book instead of the agent's queue. The next connection either takes
//! the same link over ([`ParkedLink::resume`], continue mode) or gets a fresh browser session
//! that consults the parked link's book ([`ParkedLink::drain_into`], reattach mode). Either way
//! an identical re-send (same id, session, method and params bytes) of a command that ran during
//! the gap is answered from the book, or joined if it is still running, and never reaches the
//! browser a second time. Stored replies are only ever given on such a re-send: clients start a
//! new conversation on reconnect and treat a reply to an id they never sent as a protocol error.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tokio::net::unix::pipe;
use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use super::envelope::{ObjWriter, RawObject};
use super::pipe::{write_frame, FrameReader, MAX_INBOUND_MESSAGE};
use crate::gate::{self, GateObserver, Held, HeldCell, SessionKind};

/// The directory inside the sandbox that downloads and file uploads are confined to.
pub const FILES_DIR: &str = "/home/chaperone/Downloads";

/// Largest frame accepted from an agent. Larger frames are refused with `-32000`.
pub const MAX_AGENT_MESSAGE: usize = 64 * 1024 * 1024;

/// Bytes that may wait in one agent's outgoing queue. An agent that reads slower than its
/// browser produces is closed (code 1008) instead of growing the supervisor's memory without
/// bound. A single message larger than this still passes when the queue is empty.
pub const MAX_AGENT_BACKLOG: usize = 512 * 1024 * 1024;

/// Bytes that may wait for the pipe writer. Beyond it, agent requests are refused with
/// `-32000` until the browser catches up; the supervisor's own calls are never refused.
pub const MAX_PIPE_BACKLOG: usize = 512 * 1024 * 1024;

/// Capacity of the [`BrowserConn::supervisor_events`] channel; a receiver that falls further
/// behind loses the oldest events (`RecvError::Lagged`).
pub const SUPERVISOR_EVENT_CAPACITY: usize = 4096;

/// Chromium's error for a `sessionId` unknown to the connection.
const SESSION_NOT_FOUND: (i64, &str) = (-32001, "Session with given id not found.");
/// What a request still pending on a session gets when the session detaches.
const SESSION_CLOSED: (i64, &str) = (-32001, "Session closed");
/// The answer to a `Chaperone.*` command on a session that is not browser-kind.
const CHAPERONE_BROWSER_ONLY: &str =
    "chaperone: Chaperone.* commands are only answered on a browser session";
/// Reason of the Close frame that answers an agent's `Browser.close`.
const BROWSER_CLOSE_REASON: &str =
    "Browser.close ends this connection; the browser belongs to the supervisor";

/// Why a CDP call failed.
#[derive(Debug, thiserror::Error)]
pub enum CdpError {
    /// The browser answered with an error.
    #[error("the browser answered {method} with error {code}: {message}{}", fmt_data(.data))]
    Protocol {
        /// The CDP method called.
        method: String,
        /// CDP error code (`-32601` unknown method, `-32602` bad params, `-32001` no session…).
        code: i64,
        /// Chromium's message.
        message: String,
        /// Chromium's `data` member, if any (often names the bad parameter).
        data: Option<String>,
    },
    /// The pipe is closed: the browser exited or crashed, or its messages could not be read.
    #[error(
        "{method}: the CDP pipe to the browser is closed ({reason}); the browser is gone, end \
         the session"
    )]
    Closed {
        /// The CDP method called.
        method: String,
        /// Why the pipe closed.
        reason: String,
    },
    /// The parameters could not be serialised.
    #[error("{method}: encoding the parameters failed: {source}")]
    Encode {
        /// The CDP method called.
        method: String,
        /// The serialisation error.
        source: serde_json::Error,
    },
    /// The answer was not valid JSON or did not match the expected type.
    #[error("{method}: the browser's answer does not match the expected type: {source}")]
    Decode {
        /// The CDP method called.
        method: String,
        /// The deserialisation error.
        source: serde_json::Error,
    },
}

fn fmt_data(data: &Option<String>) -> String {
    data.as_deref()
        .map(|d| format!(" ({d})"))
        .unwrap_or_default()
}

/// A frame for an agent's websocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToAgent {
    /// A CDP message as JSON text.
    Text(String),
    /// Close the websocket with this code and reason (at most 123 bytes, so it fits a close
    /// frame). Nothing follows it.
    Close {
        /// WebSocket close code.
        code: u16,
        /// Human-readable reason.
        reason: String,
    },
}

/// Identifies one agent connection on a [`BrowserConn`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AgentId(u64);

impl AgentId {
    /// The number behind the id, unique per [`BrowserConn`] (for tickets and audit records).
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "agent-{}", self.0)
    }
}

/// A `Chaperone.*` command the router does not forward: the endpoint answers it with
/// [`AgentLink::answer_local`]. Only produced for browser-kind sessions.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalCall {
    /// The agent's own request id.
    pub id: i64,
    /// The session alias the agent sent it on; `None` for its root browser session.
    pub session: Option<String>,
    /// The method, e.g. `Chaperone.getResumeTicket`.
    pub method: String,
    /// The params object; an empty object when the agent sent none.
    pub params: Value,
}

/// What a parked link holds, for the endpoint's decisions and the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ParkSummary {
    /// Requests still running in the browser.
    pub in_flight: usize,
    /// Requests answered since the link was parked (or answered before it but never sent),
    /// whose replies wait in the replay book (or were dropped over its budget).
    pub answered_during_gap: usize,
    /// Events waiting to be delivered on resume.
    pub events_buffered: usize,
    /// Whether more events arrived than the buffer holds; the park is then not intact.
    pub buffer_overflowed: bool,
}

/// The connection to one browser's CDP pipe. Cheap to clone. Dropping the last clone closes the
/// pipe (Chromium exits when its fd 3 reaches end of file) and closes every agent link.
#[derive(Clone)]
pub struct BrowserConn {
    inner: Arc<ConnInner>,
}

struct ConnInner {
    shared: Arc<Shared>,
    reader: AbortHandle,
}

impl Drop for ConnInner {
    fn drop(&mut self) {
        self.shared
            .shutdown("the supervisor dropped its connection to the browser");
        self.reader.abort();
    }
}

impl fmt::Debug for BrowserConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrowserConn")
            .field("close_reason", &self.close_reason())
            .finish_non_exhaustive()
    }
}

impl BrowserConn {
    /// Starts the reader and writer tasks on the current tokio runtime. `to_browser` is the
    /// write end of the pipe Chromium reads as fd 3, `from_browser` the read end of the pipe it
    /// writes as fd 4; both are switched to non-blocking mode. The caller keeps them out of the
    /// browser (close-on-exec) so that the browser sees end of file when this side closes.
    pub fn start(to_browser: OwnedFd, from_browser: OwnedFd) -> std::io::Result<BrowserConn> {
        let sender = pipe::Sender::from_owned_fd(to_browser)?;
        let receiver = pipe::Receiver::from_owned_fd(from_browser)?;
        let (to_pipe, pipe_rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(SUPERVISOR_EVENT_CAPACITY);
        let held = Arc::new(HeldCell::new(Held::nothing(FILES_DIR)));
        let shared = Arc::new(Shared {
            router: Mutex::new(Router {
                held: held.clone(),
                to_pipe: Some(to_pipe),
                close_reason: None,
                next_id: 1,
                pending: HashMap::new(),
                sessions: HashMap::new(),
                agents: HashMap::new(),
                next_agent: 1,
                books: HashMap::new(),
                next_book: 1,
            }),
            closed: CancellationToken::new(),
            events,
            sink: OnceLock::new(),
            held,
            pipe_backlog: AtomicUsize::new(0),
        });
        tokio::spawn(write_loop(shared.clone(), sender, pipe_rx));
        let reader = tokio::spawn(read_loop(shared.clone(), receiver)).abort_handle();
        Ok(BrowserConn {
            inner: Arc::new(ConnInner { shared, reader }),
        })
    }

    /// Sends one of the supervisor's own commands on the root session (`session: None`) or on
    /// the given real session id, and waits for the answer's `result`. Use the root or sessions
    /// the supervisor attached itself: a session announced on an agent-owned session belongs to
    /// that agent. A call on a session that detaches first fails with `-32001 Session closed`.
    pub async fn call(
        &self,
        method: &str,
        params: Value,
        session: Option<&str>,
    ) -> Result<Value, CdpError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut router = self.inner.shared.lock();
            if let Some(reason) = &router.close_reason {
                return Err(CdpError::Closed {
                    method: method.to_owned(),
                    reason: reason.clone(),
                });
            }
            let pipe_id = router.alloc_id();
            let mut w = ObjWriter::with_capacity(64 + method.len());
            w.int("id", pipe_id.into());
            w.string("method", method);
            if let Some(session) = session {
                w.string("sessionId", session);
            }
            if !params.is_null() {
                w.raw("params", &params.to_string());
            }
            router.pending.insert(
                pipe_id,
                Pending::Supervisor {
                    method: method.to_owned(),
                    session: session.map(str::to_owned),
                    tx,
                },
            );
            router.send(&self.inner.shared, w.finish());
        }
        rx.await.unwrap_or_else(|_| {
            Err(CdpError::Closed {
                method: method.to_owned(),
                reason: self
                    .close_reason()
                    .unwrap_or_else(|| "the connection was dropped".to_owned()),
            })
        })
    }

    /// [`call`](Self::call) with one of chromiumoxide's typed commands, for messages the
    /// supervisor builds and reads itself.
    pub async fn execute<C: chromiumoxide::types::Command>(
        &self,
        cmd: C,
        session: Option<&str>,
    ) -> Result<C::Response, CdpError> {
        let method = cmd.identifier();
        let params = serde_json::to_value(&cmd).map_err(|source| CdpError::Encode {
            method: method.to_string(),
            source,
        })?;
        let result = self.call(&method, params, session).await?;
        C::response_from_value(result).map_err(|source| CdpError::Decode {
            method: method.to_string(),
            source,
        })
    }

    /// Events on the root session and on sessions no agent owns, in pipe order.
    pub fn supervisor_events(&self) -> broadcast::Receiver<Arc<Value>> {
        self.inner.shared.events.subscribe()
    }

    /// Delivers the supervisor's events whose method `wanted` accepts to an unbounded channel,
    /// in pipe order and without loss (unlike [`supervisor_events`](Self::supervisor_events)):
    /// for the credential broker, which must answer every paused request. Only the first call
    /// installs a sink; later calls get `None`.
    pub fn supervisor_sink(
        &self,
        wanted: fn(&str) -> bool,
    ) -> Option<mpsc::UnboundedReceiver<Arc<Value>>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner.shared.sink.set(Sink { wanted, tx }).ok()?;
        Some(rx)
    }

    /// What the gate keeps from agents on this connection; the broker updates it.
    pub fn held(&self) -> Arc<HeldCell> {
        self.inner.shared.held.clone()
    }

    /// Resolves once the pipe is closed (browser exited or crashed, or its stream was invalid).
    pub async fn closed(&self) {
        self.inner.shared.closed.cancelled().await
    }

    /// Why the pipe closed, once it has.
    pub fn close_reason(&self) -> Option<String> {
        self.inner.shared.lock().close_reason.clone()
    }

    /// Opens a new agent connection: attaches a browser-level session for it
    /// (`Target.attachToBrowserTarget`) and registers that session as the agent's. `label` names
    /// the agent in logs and in `observer` calls; `observer` hears of every refused message.
    pub async fn attach_agent(
        &self,
        label: &str,
        observer: Arc<dyn GateObserver>,
    ) -> Result<AgentLink, CdpError> {
        const METHOD: &str = "Target.attachToBrowserTarget";
        let shared = &self.inner.shared;
        let outbox = Arc::new(Outbox::default());
        let label: Arc<str> = Arc::from(label);
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut router = shared.lock();
            if let Some(reason) = &router.close_reason {
                return Err(CdpError::Closed {
                    method: METHOD.to_owned(),
                    reason: reason.clone(),
                });
            }
            let id = AgentId(router.next_agent);
            router.next_agent += 1;
            router.agents.insert(
                id,
                Agent {
                    label: label.clone(),
                    outbox: outbox.clone(),
                    aliases: HashMap::new(),
                    root: None,
                    open: false,
                    detaching: false,
                    mode: Mode::Live,
                    book: None,
                    overflowed: false,
                },
            );
            let pipe_id = router.alloc_id();
            router
                .pending
                .insert(pipe_id, Pending::Attach { agent: id, tx });
            router.send(
                shared,
                format!("{{\"id\":{pipe_id},\"method\":\"{METHOD}\"}}"),
            );
            id
        };
        // If this future is dropped before the answer, the reader sees the closed channel and
        // detaches the session right away, so no browser session is left without an owner.
        match rx.await {
            Ok(Ok(())) => Ok(AgentLink {
                shared: shared.clone(),
                id,
                label,
                outbox,
                observer,
                detached: false,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(CdpError::Closed {
                method: METHOD.to_owned(),
                reason: self
                    .close_reason()
                    .unwrap_or_else(|| "the connection was dropped".to_owned()),
            }),
        }
    }
}

/// One agent connection multiplexed onto a [`BrowserConn`]. Dropping it detaches the agent's
/// browser session like [`detach`](Self::detach), without waiting for the answer.
pub struct AgentLink {
    shared: Arc<Shared>,
    id: AgentId,
    label: Arc<str>,
    outbox: Arc<Outbox>,
    observer: Arc<dyn GateObserver>,
    detached: bool,
}

impl fmt::Debug for AgentLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentLink")
            .field("id", &self.id)
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl AgentLink {
    /// This connection's id.
    pub fn id(&self) -> AgentId {
        self.id
    }

    /// The label given to [`BrowserConn::attach_agent`].
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Handles one text frame from the agent: forwards it to the browser or answers it locally
    /// (bad input, refusal, unknown session, `Browser.close`, a replayed answer,
    /// `Chaperone.reconcile`). Never blocks and never panics.
    ///
    /// A `Chaperone.*` command other than `Chaperone.reconcile` sent on a browser-kind session
    /// (the root session, or an alias of kind browser such as Playwright's
    /// `newBrowserCDPSession`) is returned for the caller to answer with
    /// [`answer_local`](Self::answer_local). On any other session kind it is refused with
    /// `-32000`. No `Chaperone.*` frame ever reaches the browser.
    pub fn from_agent(&self, frame: &str) -> Option<LocalCall> {
        let outcome = self.shared.agent_frame(self.id, frame);
        if let Some(denied) = outcome.denied {
            tracing::info!(agent = %self.label, method = %denied.method, reason = %denied.reason, "cdp request refused");
            self.observer
                .denied(&self.label, &denied.method, &denied.reason);
        }
        outcome.local
    }

    /// Answers a [`LocalCall`]. The answer goes through the agent's queue, so
    /// [`next_for_agent`](Self::next_for_agent) still scrubs it, and carries the call's alias as
    /// `sessionId` like any answer. `Err(message)` becomes `{"code":-32000,"message":message}`.
    /// Does nothing once the connection is closing.
    pub fn answer_local(&self, call: &LocalCall, result: Result<Value, String>) {
        let text = match result {
            Ok(result) => {
                let result = result.to_string();
                let mut w = ObjWriter::with_capacity(64 + result.len());
                w.int("id", call.id);
                w.raw("result", &result);
                if let Some(alias) = &call.session {
                    w.string("sessionId", alias);
                }
                w.finish()
            }
            Err(message) => error_answer(
                Some(call.id),
                call.session.as_deref(),
                -32000,
                &message,
                None,
            ),
        };
        let mut router = self.shared.lock();
        if let Some(agent) = router.agents.get_mut(&self.id) {
            if agent.mode == Mode::Live {
                agent.push(text, Some(Answers::Local));
            }
        }
    }

    /// Parks the link, for a client whose websocket dropped: the agent's CDP sessions stay
    /// attached in the browser, so its commands in flight keep running; their answers (and
    /// answers queued but never sent) are kept in a replay book of at most `buffer_limit` bytes
    /// of replies; events are buffered in the queue, in pipe order, up to `buffer_limit` bytes
    /// (beyond it the buffer is dropped and the park is no longer
    /// [intact](ParkedLink::is_intact)). Answers the router made itself are dropped: nothing ran,
    /// so a re-send is simply checked again.
    ///
    /// Take [`reconciliation`](Self::reconciliation) first: the park starts a new book, and
    /// replies of the previous one nobody claimed are carried into it.
    ///
    /// `Err(self)` if the link is closed or closing. Dropping the [`ParkedLink`] detaches it
    /// like dropping an `AgentLink` does.
    pub fn park(mut self, buffer_limit: usize) -> Result<ParkedLink, AgentLink> {
        if !self.shared.park(self.id, &self.outbox, buffer_limit) {
            return Err(self);
        }
        // The agent is the ParkedLink's now; this handle must not detach it when dropped.
        self.detached = true;
        Ok(ParkedLink {
            shared: self.shared.clone(),
            id: self.id,
            label: self.label.clone(),
            outbox: self.outbox.clone(),
            observer: self.observer.clone(),
            released: false,
        })
    }

    /// A summary of the replay book this link consults (after [`ParkedLink::resume`] or
    /// [`ParkedLink::drain_into`]), for the audit record `session.reconciled`:
    /// `{"mode":"continue"|"reattach","replayed":[{"id","method"}],"joined":n,"unclaimed":n,
    /// "superseded":n,"lost":n,"delivered":n,"in_flight":n}`. `replayed` are the stored replies
    /// given on an identical re-send, `unclaimed` the stored replies nobody asked for,
    /// `delivered` the commands (continue mode) answered normally after the resume, `in_flight`
    /// those still running. Never params or results. `None` when the link has no book.
    pub fn reconciliation(&self) -> Option<Value> {
        let router = self.shared.lock();
        let book = router
            .agents
            .get(&self.id)
            .and_then(|a| a.book)
            .and_then(|b| router.books.get(&b))?;
        Some(book.reconciliation())
    }

    /// The next frame for the agent, in order. After a [`ToAgent::Close`] it returns `None`.
    /// Cancel-safe, so it can sit in a `select!` next to the websocket read.
    ///
    /// This is the last point before the wire: every text frame is searched for held values
    /// (raw or encoded) here, outside the router's lock, and any found is replaced.
    pub async fn next_for_agent(&self) -> Option<ToAgent> {
        let next = self.outbox.recv().await;
        match next {
            Some(ToAgent::Text(text)) => {
                let held = self.shared.held.get();
                match gate::scrub::scrub_text(&text, &held) {
                    None => Some(ToAgent::Text(text)),
                    Some(scrubbed) if scrubbed.starts_with('{') => Some(ToAgent::Text(scrubbed)),
                    // A frame the scrubber could not take apart still showed a held value:
                    // nothing of it may go out, and dropping it silently would leave the
                    // agent waiting for an answer forever. End the connection, loudly.
                    Some(_) => {
                        tracing::error!(agent = %self.label, "a frame for the agent carried a held value that could not be removed; closing the connection");
                        self.outbox.close(1011, UNSCRUBBABLE_REASON);
                        Some(ToAgent::Close {
                            code: 1011,
                            reason: UNSCRUBBABLE_REASON.to_owned(),
                        })
                    }
                }
            }
            other => other,
        }
    }

    /// Detaches the agent's browser session (`Target.detachFromTarget`), which detaches every
    /// session it opened and disposes its `disposeOnDetach` browser contexts, and forgets all
    /// its sessions. Requests still pending are not answered: the connection is going away.
    pub async fn detach(mut self) -> Result<(), CdpError> {
        self.detached = true;
        match self.shared.begin_detach(self.id, true) {
            Some(rx) => rx.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl Drop for AgentLink {
    fn drop(&mut self) {
        if !self.detached {
            self.shared.begin_detach(self.id, false);
        }
    }
}

/// An agent link whose client went away, kept so that the agent can resume without any command
/// running twice. See [`AgentLink::park`]. Dropping it detaches the agent's browser session.
pub struct ParkedLink {
    shared: Arc<Shared>,
    id: AgentId,
    label: Arc<str>,
    outbox: Arc<Outbox>,
    observer: Arc<dyn GateObserver>,
    /// Set once resumed or drained, when the agent is no longer this handle's to detach.
    released: bool,
}

impl fmt::Debug for ParkedLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParkedLink")
            .field("id", &self.id)
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl ParkedLink {
    /// The parked connection's id (the id its [`AgentLink`] had).
    pub fn id(&self) -> AgentId {
        self.id
    }

    /// Whether the park still holds everything: browser session attached, connection to the
    /// browser up, and no event dropped because the buffer overflowed. Continue mode needs it.
    pub fn is_intact(&self) -> bool {
        let router = self.shared.lock();
        router.close_reason.is_none()
            && router.agents.get(&self.id).is_some_and(|a| {
                a.mode == Mode::Parked
                    && a.open
                    && !a.detaching
                    && !a.overflowed
                    && a.root.is_some()
            })
    }

    /// What the park holds now.
    pub fn summary(&self) -> ParkSummary {
        let router = self.shared.lock();
        let agent = router.agents.get(&self.id);
        let book = agent
            .and_then(|a| a.book)
            .and_then(|b| router.books.get(&b));
        let count = |f: fn(&Outcome) -> bool| {
            book.map_or(0, |b| b.entries.values().filter(|e| f(&e.state)).count())
        };
        ParkSummary {
            in_flight: count(|o| matches!(o, Outcome::InFlight)),
            answered_during_gap: count(|o| {
                matches!(o, Outcome::Answered(_) | Outcome::Lost { .. })
            }),
            events_buffered: self.outbox.texts_queued(),
            buffer_overflowed: agent.is_some_and(|a| a.overflowed),
        }
    }

    /// Continue mode: the same link goes live again, with the same root session and aliases.
    /// The buffered events come first, in order; commands still in flight are answered normally
    /// when the browser replies. Stored replies are never sent unasked, only on an identical
    /// re-send. Check [`is_intact`](Self::is_intact) first: a link whose buffer overflowed comes
    /// back closed (its next frame is a Close).
    pub fn resume(mut self) -> AgentLink {
        {
            let mut guard = self.shared.lock();
            let router = &mut *guard;
            if let Some(agent) = router.agents.get_mut(&self.id) {
                if agent.mode == Mode::Parked {
                    agent.mode = Mode::Live;
                }
                if let Some(book) = agent.book.and_then(|b| router.books.get_mut(&b)) {
                    book.opened(
                        BookMode::Continue,
                        self.outbox.texts_queued(),
                        agent.overflowed,
                    );
                }
            }
        }
        self.outbox.unpark();
        self.released = true;
        AgentLink {
            shared: self.shared.clone(),
            id: self.id,
            label: self.label.clone(),
            outbox: self.outbox.clone(),
            observer: self.observer.clone(),
            detached: false,
        }
    }

    /// Reattach mode: `successor`, a fresh link with its own browser session, consults this
    /// link's replay book. This link drains: its events are dropped, its remaining answers go to
    /// the book, and its browser session is detached once its last request in flight is settled,
    /// or as soon as the successor closes.
    pub fn drain_into(mut self, successor: &AgentLink) {
        self.released = true;
        self.shared.drain_into(self.id, &self.outbox, successor.id);
    }
}

impl Drop for ParkedLink {
    fn drop(&mut self) {
        if !self.released {
            self.shared.begin_detach(self.id, false);
        }
    }
}

/// State shared by the connection handle, the agent links and the I/O tasks.
struct Shared {
    router: Mutex<Router>,
    closed: CancellationToken,
    events: broadcast::Sender<Arc<Value>>,
    sink: OnceLock<Sink>,
    held: Arc<HeldCell>,
    /// Bytes queued for the writer and not yet written.
    pipe_backlog: AtomicUsize,
}

/// The routing tables. Only ever locked for non-blocking work, never across an await.
struct Router {
    /// The same cell as [`Shared::held`], for the scrubbers that run inside the router.
    held: Arc<HeldCell>,
    /// `None` once the connection is closed; dropping it ends the writer task.
    to_pipe: Option<mpsc::UnboundedSender<Vec<u8>>>,
    close_reason: Option<String>,
    next_id: u32,
    pending: HashMap<u32, Pending>,
    /// Agent-owned sessions by their real id. Sessions absent here belong to the supervisor.
    sessions: HashMap<String, Session>,
    agents: HashMap<AgentId, Agent>,
    next_agent: u64,
    /// Replay books by id; a book lives as long as an agent names it in [`Agent::book`].
    books: HashMap<u64, ReplayBook>,
    next_book: u64,
}

struct Session {
    agent: AgentId,
    /// What the agent calls this session; `None` for the agent's own browser session, which the
    /// agent addresses by omitting `sessionId`.
    alias: Option<String>,
    kind: SessionKind,
    /// Real id of the session it was announced on; `None` for the agent's browser session.
    parent: Option<String>,
}

struct Agent {
    label: Arc<str>,
    outbox: Arc<Outbox>,
    /// Alias → real session id.
    aliases: HashMap<String, String>,
    /// Real id of the agent's browser session, once attached.
    root: Option<String>,
    /// Whether messages are still delivered to and accepted from the agent.
    open: bool,
    detaching: bool,
    mode: Mode,
    /// The replay book this agent stores answers in (parked, draining) or consults (live).
    book: Option<u64>,
    /// Whether events were dropped because the parked buffer overflowed.
    overflowed: bool,
}

/// Where an agent's answers go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// To the agent's queue.
    Live,
    /// Into its replay book; events are buffered in its queue.
    Parked,
    /// Into its replay book, for `successor` to claim; events are dropped. The agent's browser
    /// session is detached when its last request is settled or when `successor` goes.
    Draining { successor: AgentId },
}

enum Pending {
    Supervisor {
        method: String,
        session: Option<String>,
        tx: oneshot::Sender<Result<Value, CdpError>>,
    },
    Agent {
        /// Who gets the answer: the sender, or a successor that joined the request.
        agent: AgentId,
        /// The sender, whose session the request runs on; a draining agent stays attached
        /// until none of these is left.
        origin: AgentId,
        /// The agent's own request id.
        id: i64,
        /// Real id of the session the request went to.
        session: String,
        alias: Option<String>,
        kind: SessionKind,
        method: String,
        /// See [`request_digest`].
        digest: Digest,
    },
    Attach {
        agent: AgentId,
        tx: oneshot::Sender<Result<(), CdpError>>,
    },
    Detach {
        agent: AgentId,
        tx: Option<oneshot::Sender<Result<(), CdpError>>>,
    },
}

/// Close reason when a frame carries a held value the scrubber cannot remove.
const UNSCRUBBABLE_REASON: &str =
    "chaperone: a message carried a credential value that could not be removed";

/// See [`BrowserConn::supervisor_sink`].
struct Sink {
    wanted: fn(&str) -> bool,
    tx: mpsc::UnboundedSender<Arc<Value>>,
}

/// A refused agent request, reported to the [`GateObserver`] outside the router lock.
struct Denied {
    method: String,
    reason: String,
}

/// What handling an agent frame leaves for [`AgentLink::from_agent`] to do outside the lock.
#[derive(Default)]
struct FrameOutcome {
    denied: Option<Denied>,
    local: Option<LocalCall>,
}

impl FrameOutcome {
    fn denied(denied: Option<Denied>) -> FrameOutcome {
        FrameOutcome {
            denied,
            local: None,
        }
    }
}

/// SHA-256 of `method ‖ 0 ‖ sessionId-or-empty ‖ 0 ‖ raw params text` of an agent request, as
/// the agent wrote it: a re-send is the same command only if its bytes are the same.
type Digest = [u8; 32];

fn request_digest(method: &str, session: Option<&str>, raw_params: &str) -> Digest {
    let mut hash = Sha256::new();
    hash.update(method.as_bytes());
    hash.update([0]);
    hash.update(session.unwrap_or_default().as_bytes());
    hash.update([0]);
    hash.update(raw_params.as_bytes());
    hash.finalize().into()
}

/// The request an answer in an agent's queue belongs to, so that parking can keep it.
struct Tag {
    id: i64,
    alias: Option<String>,
    digest: Digest,
    method: String,
}

/// What a queued frame answers; events answer nothing.
enum Answers {
    /// An answer the router made without the browser (refusal, policy answer, local call):
    /// nothing ran, so a re-send after a reconnect is simply checked again.
    Local,
    /// An answer to a request that reached the browser.
    Request(Box<Tag>),
}

/// How a replay book is being used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BookMode {
    /// Its agent is parked; nobody consults it yet.
    Parked,
    /// The parked link itself was resumed.
    Continue,
    /// A fresh link consults it; the parked link drains.
    Reattach,
}

/// Whether a browser-session command configures the CDP session it is sent on rather than
/// the browser: a new conversation needs it run on its own session.
fn session_scoped(method: &str) -> bool {
    matches!(
        method,
        "Target.setAutoAttach"
            | "Target.setDiscoverTargets"
            | "Target.attachToTarget"
            | "Target.attachToBrowserTarget"
            | "Target.autoAttachRelated"
    ) || method.ends_with(".enable")
        || method.ends_with(".disable")
}

/// What became of a request in flight when its agent was parked.
#[derive(Debug)]
enum Outcome {
    /// Still running in the browser.
    InFlight,
    /// Answered during the gap; the reply waits for an identical re-send.
    Answered(String),
    /// Answered after a continue-mode resume, to the agent, as usual. The reply is kept (when
    /// it fits the budget) for an identical re-send the agent may have sent before it read it.
    Delivered(Option<String>),
    /// Re-sent identically while still running: the re-send gets the one answer.
    Joined,
    /// Its stored reply was given on an identical re-send.
    Claimed,
    /// The agent used the id for another command (continue mode): the answer is dropped.
    Superseded,
    /// Answered during the gap, but the reply did not fit the book's budget. `told` once an
    /// identical re-send was refused for it.
    Lost { told: bool },
}

impl Outcome {
    fn name(&self) -> &'static str {
        match self {
            Outcome::InFlight => "in_flight",
            Outcome::Answered(_) => "answered",
            Outcome::Delivered(_) => "delivered",
            Outcome::Joined => "joined",
            Outcome::Claimed => "claimed",
            Outcome::Superseded => "superseded",
            Outcome::Lost { .. } => "lost",
        }
    }
}

struct Entry {
    digest: Digest,
    method: String,
    /// The request on the pipe; `None` for an answer that was already in the agent's queue.
    pipe_id: Option<u32>,
    state: Outcome,
}

/// What an agent request matched in the replay book.
enum Replay {
    /// Nothing: route it as usual.
    Forward,
    /// Its reply, kept while the connection was parked.
    Reply(String),
    /// The still-running request on this pipe id; its answer is the re-send's.
    Join(u32),
    /// It ran, but its reply was dropped: refuse it rather than run it twice.
    Lost,
}

/// The requests a parked agent had in flight and what became of them (AG-374 4.5, 4.9), by the
/// agent's (id, session alias). Entries exist only for requests in flight at park time, so
/// their number is bounded by the router's own pending table; stored reply bytes are bounded by
/// `budget`.
struct ReplayBook {
    mode: BookMode,
    entries: HashMap<(i64, Option<String>), Entry>,
    bytes: usize,
    budget: usize,
    /// Events waiting in the parked queue when the book was opened (delivered first in continue
    /// mode, dropped in reattach mode).
    events_buffered: usize,
    overflowed: bool,
}

impl ReplayBook {
    fn new(budget: usize) -> ReplayBook {
        ReplayBook {
            mode: BookMode::Parked,
            entries: HashMap::new(),
            bytes: 0,
            budget,
            events_buffered: 0,
            overflowed: false,
        }
    }

    /// Records a request still running. A client that reused an id while it was still pending
    /// keeps only its first request here.
    fn in_flight(
        &mut self,
        pipe_id: u32,
        id: i64,
        alias: Option<String>,
        digest: Digest,
        method: String,
    ) {
        self.entries.entry((id, alias)).or_insert(Entry {
            digest,
            method,
            pipe_id: Some(pipe_id),
            state: Outcome::InFlight,
        });
    }

    /// Records a reply the agent never received.
    fn answered(&mut self, tag: Tag, text: String) {
        let Tag {
            id,
            alias,
            digest,
            method,
        } = tag;
        let state = self.keep(text);
        self.entries.entry((id, alias)).or_insert(Entry {
            digest,
            method,
            pipe_id: None,
            state,
        });
    }

    fn lost(&mut self, id: i64, alias: Option<String>, digest: Digest, method: String) {
        self.entries.entry((id, alias)).or_insert(Entry {
            digest,
            method,
            pipe_id: None,
            state: Outcome::Lost { told: false },
        });
    }

    /// `Answered(text)` if it fits the budget, else `Lost`.
    fn keep(&mut self, text: String) -> Outcome {
        if self.bytes + text.len() > self.budget {
            tracing::warn!(
                bytes = text.len(),
                budget = self.budget,
                "a reply kept for a parked connection does not fit its replay buffer; dropped"
            );
            return Outcome::Lost { told: false };
        }
        self.bytes += text.len();
        Outcome::Answered(text)
    }

    /// Stores the answer to `pipe_id` for a parked or draining agent.
    fn store(&mut self, pipe_id: Option<u32>, id: i64, alias: &Option<String>, text: String) {
        let key = (id, alias.clone());
        let Some(entry) = self.entries.get(&key).filter(|e| e.pipe_id == pipe_id) else {
            tracing::debug!(id, "dropping an answer the replay book does not track");
            return;
        };
        if matches!(entry.state, Outcome::InFlight) {
            let state = self.keep(text);
            if let Some(entry) = self.entries.get_mut(&key) {
                entry.state = state;
            }
        }
    }

    /// Whether the answer to `pipe_id` goes to a live agent consulting this book.
    fn on_live_answer(
        &mut self,
        pipe_id: Option<u32>,
        id: i64,
        alias: &Option<String>,
        text: &str,
    ) -> bool {
        let key = (id, alias.clone());
        let Some(entry) = self
            .entries
            .get_mut(&key)
            .filter(|e| e.pipe_id.is_some() && e.pipe_id == pipe_id)
        else {
            return true;
        };
        match entry.state {
            Outcome::InFlight => {
                let kept = match self.keep(text.to_string()) {
                    Outcome::Answered(t) => Some(t),
                    _ => None,
                };
                if let Some(entry) = self.entries.get_mut(&key) {
                    entry.state = Outcome::Delivered(kept);
                }
                true
            }
            Outcome::Superseded => false,
            _ => true,
        }
    }

    /// Checks a request of the agent consulting this book against it.
    fn on_request(&mut self, id: i64, alias: &Option<String>, digest: &Digest) -> Replay {
        let key = (id, alias.clone());
        let Some(entry) = self.entries.get_mut(&key) else {
            return Replay::Forward;
        };
        // A reattached conversation has a browser session of its own: what configures the
        // CDP session itself (auto-attach, discovery, attaching, domain enables) must run on
        // the new one, even when an identical command was in flight on the old one.
        if self.mode == BookMode::Reattach && alias.is_none() && session_scoped(&entry.method) {
            return Replay::Forward;
        }
        if entry.digest == *digest {
            let (state, replay) = match std::mem::replace(&mut entry.state, Outcome::Claimed) {
                Outcome::Answered(text) | Outcome::Delivered(Some(text)) => {
                    self.bytes -= text.len();
                    (Outcome::Claimed, Replay::Reply(text))
                }
                Outcome::InFlight => match entry.pipe_id {
                    Some(pipe_id) => (Outcome::Joined, Replay::Join(pipe_id)),
                    None => (Outcome::InFlight, Replay::Forward),
                },
                Outcome::Lost { told: false } => (Outcome::Lost { told: true }, Replay::Lost),
                // Delivered, but too large to keep: the re-send raced it; refused, not run.
                Outcome::Delivered(None) => (Outcome::Lost { told: true }, Replay::Lost),
                // Settled: a later identical request is a new command.
                settled => (settled, Replay::Forward),
            };
            entry.state = state;
            replay
        } else {
            // Continue mode is the same conversation: the agent gave up on the old command and
            // reused its id. A reattached conversation starts its ids anew, so only an
            // identical command says anything about the old one.
            if self.mode == BookMode::Continue
                && matches!(entry.state, Outcome::InFlight | Outcome::Answered(_))
            {
                if let Outcome::Answered(text) =
                    std::mem::replace(&mut entry.state, Outcome::Superseded)
                {
                    self.bytes -= text.len();
                }
            }
            Replay::Forward
        }
    }

    /// The book is taken into use.
    fn opened(&mut self, mode: BookMode, events_buffered: usize, overflowed: bool) {
        self.mode = mode;
        self.events_buffered = events_buffered;
        self.overflowed = overflowed;
    }

    /// Entries in a stable order: by id, then alias.
    fn sorted(&self) -> Vec<(&(i64, Option<String>), &Entry)> {
        let mut entries: Vec<_> = self.entries.iter().collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        entries
    }

    /// The result of `Chaperone.reconcile`.
    fn reconcile_result(book: Option<&ReplayBook>) -> Value {
        let Some(book) = book else {
            return json!({"operations": [], "eventsBuffered": 0, "bufferOverflowed": false});
        };
        let operations: Vec<Value> = book
            .sorted()
            .into_iter()
            .map(|((id, alias), e)| {
                json!({"id": id, "sessionId": alias, "method": e.method, "outcome": e.state.name()})
            })
            .collect();
        json!({
            "operations": operations,
            "eventsBuffered": book.events_buffered,
            "bufferOverflowed": book.overflowed,
        })
    }

    /// See [`AgentLink::reconciliation`].
    fn reconciliation(&self) -> Value {
        let count = |f: fn(&Outcome) -> bool| self.entries.values().filter(|e| f(&e.state)).count();
        let replayed: Vec<Value> = self
            .sorted()
            .into_iter()
            .filter(|(_, e)| matches!(e.state, Outcome::Claimed))
            .map(|((id, _), e)| json!({"id": id, "method": e.method}))
            .collect();
        json!({
            "mode": match self.mode {
                BookMode::Continue => "continue",
                BookMode::Reattach => "reattach",
                BookMode::Parked => "parked",
            },
            "replayed": replayed,
            "joined": count(|o| matches!(o, Outcome::Joined)),
            "unclaimed": count(|o| matches!(o, Outcome::Answered(_))),
            "superseded": count(|o| matches!(o, Outcome::Superseded)),
            "lost": count(|o| matches!(o, Outcome::Lost { .. })),
            "delivered": count(|o| matches!(o, Outcome::Delivered(_))),
            "in_flight": count(|o| matches!(o, Outcome::InFlight)),
        })
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Router> {
        // A panic while holding the lock leaves tables that are still structurally valid
        // (every mutation is a single insert or remove), so keep routing rather than cascade.
        self.router.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the connection once: answers everything pending, closes every agent, stops the
    /// writer and wakes [`BrowserConn::closed`].
    fn shutdown(&self, reason: &str) {
        let mut guard = self.lock();
        let router = &mut *guard;
        if router.close_reason.is_some() {
            return;
        }
        tracing::warn!(reason, "cdp pipe closed");
        router.close_reason = Some(reason.to_owned());
        router.to_pipe = None;
        let agent_message = format!("chaperone: the browser is gone ({reason})");
        let pending: Vec<(u32, Pending)> = router.pending.drain().collect();
        for (pipe_id, pending) in pending {
            match pending {
                Pending::Supervisor { method, tx, .. } => {
                    let _ = tx.send(Err(CdpError::Closed {
                        method,
                        reason: reason.to_owned(),
                    }));
                }
                Pending::Agent {
                    agent,
                    id,
                    alias,
                    method,
                    digest,
                    ..
                } => {
                    let answer =
                        error_answer(Some(id), alias.as_deref(), -32000, &agent_message, None);
                    let tag = Tag {
                        id,
                        alias,
                        digest,
                        method,
                    };
                    router.deliver_answer(Some(pipe_id), agent, tag, answer);
                }
                Pending::Attach { tx, .. } => {
                    let _ = tx.send(Err(CdpError::Closed {
                        method: "Target.attachToBrowserTarget".to_owned(),
                        reason: reason.to_owned(),
                    }));
                }
                // The browser is gone, and the agent's contexts with it.
                Pending::Detach { tx, .. } => {
                    if let Some(tx) = tx {
                        let _ = tx.send(Ok(()));
                    }
                }
            }
        }
        for agent in router.agents.values_mut() {
            if agent.open {
                agent.open = false;
                agent
                    .outbox
                    .close(1001, &format!("chaperone: the browser is gone: {reason}"));
            }
        }
        router.sessions.clear();
        drop(guard);
        self.closed.cancel();
    }

    /// Handles one frame from an agent: what to report, and a call for the endpoint, if any.
    fn agent_frame(&self, agent_id: AgentId, frame: &str) -> FrameOutcome {
        let request = match parse_agent_request(frame) {
            Ok(request) => request,
            Err(local) => {
                let mut router = self.lock();
                let Some(agent) = router.agents.get_mut(&agent_id).filter(|a| a.is_live()) else {
                    return FrameOutcome::default();
                };
                agent.push(local.answer, Some(Answers::Local));
                return FrameOutcome::denied(local.denied);
            }
        };
        let mut guard = self.lock();
        let router = &mut *guard;
        let Some(agent) = router.agents.get_mut(&agent_id).filter(|a| a.is_live()) else {
            return FrameOutcome::default();
        };
        let id = request.id;
        let method = request.method;
        let digest = request.digest;

        // Replay, before the alias is resolved: in reattach mode the alias the request names
        // may belong to the drained link.
        if let Some(book) = agent.book.and_then(|b| router.books.get_mut(&b)) {
            match book.on_request(id, &request.session, &digest) {
                Replay::Forward => {}
                Replay::Reply(text) => {
                    tracing::info!(agent = %agent.label, id, method = %method, "replaying a reply kept while the connection was parked");
                    let tag = Tag {
                        id,
                        alias: request.session,
                        digest,
                        method,
                    };
                    agent.push(text, Some(Answers::Request(Box::new(tag))));
                    return FrameOutcome::default();
                }
                Replay::Join(pipe_id) => {
                    tracing::info!(agent = %agent.label, id, method = %method, "joining a command still running since the connection was parked");
                    // Only the very request the book tracks: a pipe id can be reused once its
                    // request is settled, and then it names someone else's request.
                    match router.pending.get_mut(&pipe_id) {
                        Some(Pending::Agent {
                            agent: to,
                            id: pending_id,
                            digest: pending_digest,
                            ..
                        }) if *pending_id == id && *pending_digest == digest => {
                            *to = agent_id;
                        }
                        _ => {
                            let message = format!(
                                "chaperone: {method} was running when the connection dropped and \
                                 its answer can no longer be followed, so it is not run again"
                            );
                            let answer = error_answer(
                                Some(id),
                                request.session.as_deref(),
                                -32000,
                                &message,
                                None,
                            );
                            agent.push(answer, Some(Answers::Local));
                        }
                    }
                    return FrameOutcome::default();
                }
                Replay::Lost => {
                    let message = format!(
                        "chaperone: {method} already ran before the connection dropped; its reply \
                         did not fit the replay buffer, so it is not run again"
                    );
                    let answer =
                        error_answer(Some(id), request.session.as_deref(), -32000, &message, None);
                    agent.push(answer, Some(Answers::Local));
                    return FrameOutcome::default();
                }
            }
        }

        // Resolve the session. Unknown aliases are answered exactly like Chromium answers an
        // unknown id, and never reach the pipe.
        let (real, alias, kind) = match request.session {
            None => match agent.root.clone() {
                Some(root) => (root, None, SessionKind::Browser),
                None => return FrameOutcome::default(),
            },
            Some(alias) => match agent.aliases.get(&alias) {
                Some(real) => {
                    let kind = router
                        .sessions
                        .get(real)
                        .map_or(SessionKind::Other, |s| s.kind);
                    (real.clone(), Some(alias), kind)
                }
                None => {
                    let (code, message) = SESSION_NOT_FOUND;
                    agent.push(
                        error_answer(Some(id), None, code, message, None),
                        Some(Answers::Local),
                    );
                    return FrameOutcome::default();
                }
            },
        };
        let answer_error = |agent: &mut Agent, code: i64, message: &str, data: Option<&str>| {
            agent.push(
                error_answer(Some(id), alias.as_deref(), code, message, data),
                Some(Answers::Local),
            );
        };
        let answer_result = |agent: &mut Agent, result: &str| {
            let mut w = ObjWriter::with_capacity(64 + result.len());
            w.int("id", id);
            w.raw("result", result);
            if let Some(alias) = &alias {
                w.string("sessionId", alias);
            }
            agent.push(w.finish(), Some(Answers::Local));
        };

        let mut params = match request.params {
            Params::Absent => None,
            Params::Object(value) => Some(value),
            Params::Invalid(data) => {
                answer_error(agent, -32602, "Invalid parameters", Some(&data));
                return FrameOutcome::default();
            }
        };

        // The supervisor's own domain: never forwarded, and only on sessions that stand for the
        // agent's browser connection, since its answers are about that connection.
        if method.starts_with("Chaperone.") {
            if kind != SessionKind::Browser {
                answer_error(agent, -32000, CHAPERONE_BROWSER_ONLY, None);
                return FrameOutcome::denied(Some(Denied {
                    method,
                    reason: "Chaperone.* commands are only answered on a browser session"
                        .to_owned(),
                }));
            }
            if method == "Chaperone.reconcile" {
                let book = agent.book.and_then(|b| router.books.get(&b));
                let result = ReplayBook::reconcile_result(book);
                answer_result(agent, &result.to_string());
                return FrameOutcome::default();
            }
            return FrameOutcome {
                denied: None,
                local: Some(LocalCall {
                    id,
                    session: alias,
                    method,
                    params: params.unwrap_or_else(|| Value::Object(serde_json::Map::new())),
                }),
            };
        }

        if method == "Browser.close" {
            answer_result(agent, "{}");
            agent.open = false;
            agent.outbox.close(1000, BROWSER_CLOSE_REASON);
            return FrameOutcome::default();
        }

        let held = self.held.get();
        let absent = params.is_none();
        let mut checked_params = params
            .take()
            .unwrap_or_else(|| Value::Object(serde_json::Map::new()));
        let checked = match gate::policy::check(kind, &method, &mut checked_params, &held) {
            Ok(checked) => checked,
            Err(refusal) => {
                answer_error(agent, -32000, &refusal.message(&method), None);
                return FrameOutcome::denied(Some(Denied {
                    reason: refusal.reason().to_owned(),
                    method,
                }));
            }
        };
        // Parts of the request the gate dropped (a write over a held cookie) are audited like
        // refusals, though the rest of the request goes ahead.
        let dropped = (!checked.dropped.is_empty()).then(|| Denied {
            method: method.clone(),
            reason: checked.dropped.join("; "),
        });
        if let gate::policy::Verdict::Answer(result) = checked.verdict {
            answer_result(agent, &result.to_string());
            return FrameOutcome::denied(dropped);
        }
        let untouched = checked_params.as_object().is_some_and(|p| p.is_empty());
        params = (!(absent && untouched)).then_some(checked_params);

        // CDP session ids inside params must be translated like the envelope's. In the Target
        // domain only detachFromTarget takes one; any other Target command carrying one is
        // refused rather than forwarded with an id the router cannot vouch for. Other domains
        // use `sessionId` for unrelated things (device-bound sessions) and pass untouched.
        if let Some(session_param) = params
            .as_mut()
            .filter(|_| method.starts_with("Target."))
            .and_then(|p| p.as_object_mut())
            .and_then(|p| p.get_mut("sessionId"))
        {
            if method != "Target.detachFromTarget" {
                let reason = "chaperone only translates session ids inside params for \
                              Target.detachFromTarget";
                let refusal = gate::Refusal::new(reason);
                answer_error(agent, -32000, &refusal.message(&method), None);
                return FrameOutcome::denied(Some(Denied {
                    reason: reason.to_owned(),
                    method,
                }));
            }
            match session_param.as_str().and_then(|a| agent.aliases.get(a)) {
                Some(real) => *session_param = Value::String(real.clone()),
                None => {
                    answer_error(agent, -32602, "No session with given id", None);
                    return FrameOutcome::default();
                }
            }
        }

        let backlog = self.pipe_backlog.load(Ordering::Relaxed);
        if backlog > MAX_PIPE_BACKLOG {
            let message = gate::Refusal::new(format!(
                "the browser is not keeping up ({backlog} bytes are waiting to be written); \
                 retry later"
            ))
            .message(&method);
            answer_error(agent, -32000, &message, None);
            return FrameOutcome::default();
        }

        let pipe_id = router.alloc_id();
        let params_text = params.as_ref().map(Value::to_string);
        let mut w = ObjWriter::with_capacity(
            64 + method.len() + real.len() + params_text.as_ref().map_or(0, String::len),
        );
        w.int("id", pipe_id.into());
        w.string("method", &method);
        w.string("sessionId", &real);
        if let Some(params) = &params_text {
            w.raw("params", params);
        }
        router.pending.insert(
            pipe_id,
            Pending::Agent {
                agent: agent_id,
                origin: agent_id,
                id,
                session: real,
                alias,
                kind,
                method,
                digest,
            },
        );
        router.send(self, w.finish());
        FrameOutcome::denied(dropped)
    }

    /// Starts detaching an agent's browser session. Returns a receiver for the answer when
    /// `want_answer`, or `None` if there is nothing to wait for.
    fn begin_detach(
        &self,
        agent_id: AgentId,
        want_answer: bool,
    ) -> Option<oneshot::Receiver<Result<(), CdpError>>> {
        let (tx, rx) = if want_answer {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let mut router = self.lock();
        if router.start_detach(self, agent_id, tx) {
            rx
        } else {
            None
        }
    }

    /// Parks an agent (see [`AgentLink::park`]); `false` if it is closed or closing.
    fn park(&self, agent_id: AgentId, outbox: &Outbox, buffer_limit: usize) -> bool {
        let mut guard = self.lock();
        let router = &mut *guard;
        if router.close_reason.is_some() {
            return false;
        }
        // The queue can be closed behind the router's back (an unscrubbable frame), so ask it.
        let Some(agent) = router
            .agents
            .get(&agent_id)
            .filter(|a| a.is_live() && !a.detaching && a.root.is_some())
            .filter(|_| !outbox.is_closing())
        else {
            return false;
        };
        let previous = agent.book;
        // Requests whose id the agent reused for another command (continue mode): their answers
        // are dropped, and they must not take the key of the command that replaced them.
        let superseded: HashSet<u32> = previous
            .and_then(|b| router.books.get(&b))
            .map(|b| {
                b.entries
                    .values()
                    .filter(|e| matches!(e.state, Outcome::Superseded))
                    .filter_map(|e| e.pipe_id)
                    .collect()
            })
            .unwrap_or_default();
        let mut book = ReplayBook::new(buffer_limit);
        // The requests still running: their answers go into the book from now on.
        for (pipe_id, pending) in &router.pending {
            if superseded.contains(pipe_id) {
                continue;
            }
            if let Pending::Agent {
                agent,
                id,
                alias,
                method,
                digest,
                ..
            } = pending
            {
                if *agent == agent_id {
                    book.in_flight(*pipe_id, *id, alias.clone(), *digest, method.clone());
                }
            }
        }
        // Answers queued but never sent: from the agent's side they are still in flight.
        for (tag, text) in outbox.take_answers() {
            book.answered(tag, text);
        }
        // What the book this agent consulted still holds for it: unclaimed replies, and
        // commands a drained predecessor still runs, whose answers must now come here.
        if let Some(old) = previous.and_then(|b| router.books.get(&b)) {
            for ((id, alias), entry) in &old.entries {
                match &entry.state {
                    Outcome::Answered(text) => book.answered(
                        Tag {
                            id: *id,
                            alias: alias.clone(),
                            digest: entry.digest,
                            method: entry.method.clone(),
                        },
                        text.clone(),
                    ),
                    Outcome::Lost { told: false } => {
                        book.lost(*id, alias.clone(), entry.digest, entry.method.clone())
                    }
                    Outcome::InFlight => {
                        let Some(pipe_id) = entry.pipe_id else {
                            continue;
                        };
                        if let Some(Pending::Agent { agent, .. }) = router.pending.get_mut(&pipe_id)
                        {
                            if *agent != agent_id {
                                *agent = agent_id;
                                book.in_flight(
                                    pipe_id,
                                    *id,
                                    alias.clone(),
                                    entry.digest,
                                    entry.method.clone(),
                                );
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        let book_id = router.next_book;
        router.next_book += 1;
        router.books.insert(book_id, book);
        if let Some(agent) = router.agents.get_mut(&agent_id) {
            agent.mode = Mode::Parked;
            agent.book = Some(book_id);
            tracing::info!(agent = %agent.label, "agent connection parked");
        }
        outbox.park(buffer_limit);
        router.prune_books();
        true
    }

    /// Drains a parked agent into `successor` (see [`ParkedLink::drain_into`]).
    fn drain_into(&self, parked: AgentId, outbox: &Outbox, successor: AgentId) {
        let mut guard = self.lock();
        let router = &mut *guard;
        let successor_live = router
            .agents
            .get(&successor)
            .is_some_and(|a| a.is_live() && !a.detaching);
        let mut book_id = None;
        if let Some(agent) = router.agents.get_mut(&parked) {
            if agent.mode == Mode::Parked {
                agent.mode = Mode::Draining { successor };
            }
            agent.open = false;
            book_id = agent.book;
            if let Some(book) = agent.book.and_then(|b| router.books.get_mut(&b)) {
                book.opened(BookMode::Reattach, outbox.texts_queued(), agent.overflowed);
            }
        }
        // Nobody will read the parked queue again.
        outbox.discard();
        if let Some(agent) = router.agents.get_mut(&successor) {
            if book_id.is_some() {
                agent.book = book_id;
            }
        }
        router.prune_books();
        if successor_live {
            router.settle(self, parked);
        } else {
            router.start_detach(self, parked, None);
        }
    }

    /// Routes one message from the browser.
    fn route_from_browser(&self, frame: Vec<u8>) {
        let text = match String::from_utf8(frame) {
            Ok(text) => text,
            Err(e) => {
                tracing::error!(error = %e, "dropping a message from the browser that is not UTF-8");
                return;
            }
        };
        let message = match RawObject::parse(&text) {
            Ok(message) => message,
            Err(e) => {
                tracing::error!(error = %e, "dropping a message from the browser that is not a JSON object");
                return;
            }
        };
        if let Some(id) = message.get("id") {
            self.route_answer(&message, id);
        } else if let Some(method) = message.get_str("method") {
            if let Some(event) = self.route_event(&message, &method) {
                self.to_supervisor(&text, &method, event);
            }
        } else {
            tracing::warn!("dropping a message from the browser with neither id nor method");
        }
    }

    fn route_answer(&self, message: &RawObject<'_>, id: &RawValue) {
        let Ok(pipe_id) = serde_json::from_str::<u32>(id.get()) else {
            tracing::warn!(
                id = id.get(),
                "dropping an answer with an id the router never sent"
            );
            return;
        };
        let mut guard = self.lock();
        let router = &mut *guard;
        let Some(pending) = router.pending.remove(&pipe_id) else {
            // Already answered locally (session closed) or abandoned by a detached agent.
            tracing::debug!(pipe_id, "dropping an answer nobody is waiting for");
            return;
        };
        match pending {
            Pending::Supervisor { method, tx, .. } => {
                drop(guard);
                // The caller may have given up waiting; nothing else wants the answer.
                let _ = tx.send(supervisor_result(message, method));
            }
            Pending::Agent {
                agent,
                origin,
                id,
                session,
                alias,
                kind,
                method,
                digest,
            } => {
                let text = router.answer_text(
                    message,
                    agent,
                    id,
                    &session,
                    alias.as_deref(),
                    kind,
                    &method,
                );
                if let Some(text) = text {
                    let tag = Tag {
                        id,
                        alias,
                        digest,
                        method,
                    };
                    router.deliver_answer(Some(pipe_id), agent, tag, text);
                }
                router.settle(self, origin);
            }
            Pending::Attach { agent, tx } => {
                let result = message
                    .get("result")
                    .and_then(|r| RawObject::parse(r.get()).ok())
                    .and_then(|r| r.get_str("sessionId"));
                let Some(real) = result else {
                    router.agents.remove(&agent);
                    let _ = tx.send(Err(error_of_answer(
                        message,
                        "Target.attachToBrowserTarget",
                    )));
                    return;
                };
                let Some(record) = router.agents.get_mut(&agent) else {
                    return;
                };
                record.root = Some(real.clone());
                record.open = true;
                router.sessions.insert(
                    real,
                    Session {
                        agent,
                        alias: None,
                        kind: SessionKind::Browser,
                        parent: None,
                    },
                );
                if tx.send(Ok(())).is_err() {
                    drop(guard);
                    self.begin_detach(agent, false);
                }
            }
            Pending::Detach { agent, tx } => {
                router.forget_agent(self, agent);
                if let Some(tx) = tx {
                    let result = if message.get("error").is_some() {
                        Err(error_of_answer(message, "Target.detachFromTarget"))
                    } else {
                        Ok(())
                    };
                    let _ = tx.send(result);
                }
            }
        }
    }

    /// Routes an event. Returns `Some` when the event is the supervisor's.
    fn route_event(&self, message: &RawObject<'_>, method: &str) -> Option<SupervisorEvent> {
        let session = message.get_str("sessionId");
        let mut guard = self.lock();
        let router = &mut *guard;
        let owner = session.as_deref().and_then(|s| router.sessions.get(s));
        let Some(owner) = owner else {
            if method == "Target.detachedFromTarget" {
                if let Some(detached) = detached_session(message) {
                    router.session_detached(self, &detached);
                }
            }
            return Some(SupervisorEvent);
        };
        let agent_id = owner.agent;
        let alias = owner.alias.clone();
        let kind = owner.kind;
        let real = session.unwrap_or_default();
        let delivered =
            router.event_for_agent(message, method, agent_id, &real, alias.as_deref(), kind);
        if let Some(text) = delivered {
            if let Some(agent) = router.agents.get_mut(&agent_id) {
                agent.deliver(text);
            }
        }
        if method == "Target.detachedFromTarget" {
            if let Some(detached) = detached_session(message) {
                router.session_detached(self, &detached);
            }
        }
        None
    }

    fn to_supervisor(&self, text: &str, method: &str, _: SupervisorEvent) {
        if let Some(sink) = self.sink.get().filter(|s| (s.wanted)(method)) {
            match serde_json::from_str::<Value>(text) {
                Ok(event) => {
                    let _ = sink.tx.send(Arc::new(event));
                }
                Err(e) => {
                    tracing::error!(error = %e, method, "a broker event serde_json cannot represent was dropped")
                }
            }
        }
        if self.events.receiver_count() == 0 {
            return;
        }
        match serde_json::from_str::<Value>(text) {
            Ok(event) => {
                let _ = self.events.send(Arc::new(event));
            }
            Err(e) => {
                tracing::warn!(error = %e, "dropping a supervisor event serde_json cannot represent")
            }
        }
    }
}

/// Marker: the event belongs to the supervisor.
struct SupervisorEvent;

impl Router {
    /// A pipe id not in use. Chromium accepts only 32-bit signed ids.
    fn alloc_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = if id >= i32::MAX as u32 { 1 } else { id + 1 };
            if !self.pending.contains_key(&id) {
                return id;
            }
        }
    }

    /// Queues `message` for the writer. Callers have checked that the connection is open; if the
    /// writer died meanwhile, its shutdown answers the pending entry the caller registered.
    fn send(&mut self, shared: &Shared, message: String) {
        let mut bytes = message.into_bytes();
        bytes.push(0);
        let len = bytes.len();
        match &self.to_pipe {
            Some(to_pipe) => {
                shared.pipe_backlog.fetch_add(len, Ordering::Relaxed);
                if to_pipe.send(bytes).is_err() {
                    shared.pipe_backlog.fetch_sub(len, Ordering::Relaxed);
                    tracing::error!("the pipe writer is gone; message dropped");
                }
            }
            None => tracing::debug!("connection closed; message dropped"),
        }
    }

    /// Removes an agent with all its sessions and the requests whose answers were its, and lets
    /// go of what only it kept: agents draining into it, and replay books.
    fn forget_agent(&mut self, shared: &Shared, agent: AgentId) {
        self.agents.remove(&agent);
        self.sessions.retain(|_, s| s.agent != agent);
        let mut origins = HashSet::new();
        self.pending.retain(|_, p| match p {
            Pending::Agent {
                agent: a, origin, ..
            } if *a == agent => {
                origins.insert(*origin);
                false
            }
            _ => true,
        });
        self.release_drained(shared, agent);
        for origin in origins {
            self.settle(shared, origin);
        }
        self.prune_books();
    }

    /// Sends `Target.detachFromTarget` for an agent's browser session (once), or forgets the
    /// agent at once when there is nothing to detach. `false` if no detach was sent.
    fn start_detach(
        &mut self,
        shared: &Shared,
        agent_id: AgentId,
        tx: Option<oneshot::Sender<Result<(), CdpError>>>,
    ) -> bool {
        if self.close_reason.is_some() {
            self.forget_agent(shared, agent_id);
            return false;
        }
        let Some(agent) = self.agents.get_mut(&agent_id) else {
            return false;
        };
        if agent.detaching {
            return false;
        }
        agent.open = false;
        agent.detaching = true;
        let Some(root) = agent.root.clone() else {
            self.forget_agent(shared, agent_id);
            return false;
        };
        let pipe_id = self.alloc_id();
        let mut w = ObjWriter::with_capacity(128);
        w.int("id", pipe_id.into());
        w.string("method", "Target.detachFromTarget");
        let mut params = ObjWriter::with_capacity(64);
        params.string("sessionId", &root);
        w.raw("params", &params.finish());
        self.pending.insert(
            pipe_id,
            Pending::Detach {
                agent: agent_id,
                tx,
            },
        );
        self.send(shared, w.finish());
        // A drained link stays attached only for the successor's sake.
        self.release_drained(shared, agent_id);
        true
    }

    /// Detaches the agents draining into `successor`, which is going away.
    fn release_drained(&mut self, shared: &Shared, successor: AgentId) {
        let drained: Vec<AgentId> = self
            .agents
            .iter()
            .filter(|(_, a)| a.mode == Mode::Draining { successor })
            .map(|(id, _)| *id)
            .collect();
        for agent in drained {
            self.start_detach(shared, agent, None);
        }
    }

    /// Detaches a draining agent once no request runs on its sessions any more.
    fn settle(&mut self, shared: &Shared, origin: AgentId) {
        let draining = self
            .agents
            .get(&origin)
            .is_some_and(|a| matches!(a.mode, Mode::Draining { .. }) && !a.detaching);
        if !draining {
            return;
        }
        let running = self
            .pending
            .values()
            .any(|p| matches!(p, Pending::Agent { origin: o, .. } if *o == origin));
        if !running {
            self.start_detach(shared, origin, None);
        }
    }

    /// Drops the replay books no agent names any more.
    fn prune_books(&mut self) {
        let named: HashSet<u64> = self.agents.values().filter_map(|a| a.book).collect();
        self.books.retain(|id, _| named.contains(id));
    }

    /// Gives an agent its answer to a request that reached the browser (`pipe_id`), or that the
    /// router answered because its session or the browser went away: into its queue when it is
    /// live, unless the replay book says the answer was superseded; into its book when it is
    /// parked or draining.
    fn deliver_answer(&mut self, pipe_id: Option<u32>, recipient: AgentId, tag: Tag, text: String) {
        let Some(agent) = self.agents.get_mut(&recipient) else {
            return;
        };
        let book = agent.book.and_then(|b| self.books.get_mut(&b));
        match agent.mode {
            Mode::Live => {
                let deliver =
                    book.is_none_or(|b| b.on_live_answer(pipe_id, tag.id, &tag.alias, &text));
                if deliver {
                    agent.push(text, Some(Answers::Request(Box::new(tag))));
                }
            }
            Mode::Parked | Mode::Draining { .. } => match book {
                Some(book) => book.store(pipe_id, tag.id, &tag.alias, text),
                None => {
                    tracing::debug!(agent = %agent.label, "dropping an answer for a parked agent without a book")
                }
            },
        }
    }

    /// Builds the agent's copy of an answer, or `None` to drop it.
    #[allow(clippy::too_many_arguments)]
    fn answer_text(
        &mut self,
        message: &RawObject<'_>,
        agent_id: AgentId,
        id: i64,
        session: &str,
        alias: Option<&str>,
        kind: SessionKind,
        method: &str,
    ) -> Option<String> {
        // A parked or draining agent is not open to messages, but its answers are kept.
        if !self
            .agents
            .get(&agent_id)
            .is_some_and(|a| a.open || a.mode != Mode::Live)
        {
            return None;
        }
        let mut result_text = None;
        if let Some(result) = message.get("result") {
            if matches!(
                method,
                "Target.attachToTarget" | "Target.attachToBrowserTarget"
            ) {
                result_text = self.attach_result(result, agent_id, session, method);
                result_text.as_ref()?;
            }
            if gate::scrub::reply_needs_scrub(kind, method) {
                let text = result_text.as_deref().unwrap_or(result.get());
                match serde_json::from_str::<Value>(text) {
                    Ok(mut value) => {
                        gate::scrub::scrub_reply(kind, method, &mut value, &self.held.get());
                        result_text = Some(value.to_string());
                    }
                    Err(e) => {
                        tracing::error!(error = %e, method, "answer cannot be scrubbed; refusing it");
                        let message = format!(
                            "chaperone: {method} refused: the answer contains text the gate \
                             cannot inspect"
                        );
                        return Some(error_answer(Some(id), alias, -32000, &message, None));
                    }
                }
            }
        }
        let capacity = message
            .members
            .iter()
            .map(|(_, v)| v.get().len() + 16)
            .sum::<usize>();
        let mut w = ObjWriter::with_capacity(capacity);
        let mut wrote_session = false;
        for (key, value) in &message.members {
            match key.as_ref() {
                "id" => w.int("id", id),
                "sessionId" => {
                    if let Some(alias) = alias {
                        w.string("sessionId", alias);
                        wrote_session = true;
                    }
                }
                "result" => w.raw("result", result_text.as_deref().unwrap_or(value.get())),
                other => w.raw(other, value.get()),
            }
        }
        if let (Some(alias), false) = (alias, wrote_session) {
            w.string("sessionId", alias);
        }
        Some(w.finish())
    }

    /// Rewrites the real `sessionId` in an attach answer to the agent's alias, registering the
    /// session if its `attachedToTarget` event did not.
    fn attach_result(
        &mut self,
        result: &RawValue,
        agent_id: AgentId,
        parent: &str,
        method: &str,
    ) -> Option<String> {
        let object = RawObject::parse(result.get()).ok()?;
        let Some(real) = object.get_str("sessionId") else {
            return Some(result.get().to_owned());
        };
        let kind = if method == "Target.attachToBrowserTarget" {
            SessionKind::Browser
        } else {
            SessionKind::Other
        };
        let alias = self.register_session(agent_id, &real, kind, parent)?;
        let mut w = ObjWriter::with_capacity(result.get().len() + 16);
        for (key, value) in &object.members {
            if key == "sessionId" {
                w.string("sessionId", &alias);
            } else {
                w.raw(key, value.get());
            }
        }
        Some(w.finish())
    }

    /// Makes `real` a session of `agent_id` and returns its alias (the existing one if it is
    /// already the agent's). `None` if another agent owns it.
    fn register_session(
        &mut self,
        agent_id: AgentId,
        real: &str,
        kind: SessionKind,
        parent: &str,
    ) -> Option<String> {
        if let Some(existing) = self.sessions.get(real) {
            return if existing.agent == agent_id {
                existing.alias.clone()
            } else {
                tracing::error!("a session announced to one agent is owned by another");
                None
            };
        }
        let agent = self.agents.get_mut(&agent_id)?;
        let alias = loop {
            let candidate = format!("{:032X}", rand::random::<u128>());
            if !agent.aliases.contains_key(&candidate) {
                break candidate;
            }
        };
        agent.aliases.insert(alias.clone(), real.to_owned());
        self.sessions.insert(
            real.to_owned(),
            Session {
                agent: agent_id,
                alias: Some(alias.clone()),
                kind,
                parent: Some(parent.to_owned()),
            },
        );
        Some(alias)
    }

    /// Builds the agent's copy of an event on one of its sessions, or `None` to drop it.
    fn event_for_agent(
        &mut self,
        message: &RawObject<'_>,
        method: &str,
        agent_id: AgentId,
        real: &str,
        alias: Option<&str>,
        kind: SessionKind,
    ) -> Option<String> {
        let mut params_text: Option<String> = None;
        if let Some(params) = message.get("params") {
            // Only the Target domain's `sessionId` params are CDP sessions (attachedToTarget,
            // detachedFromTarget, receivedMessageFromTarget); elsewhere the name means something
            // else (Network's device-bound sessions) and passes untouched.
            let target_domain = method.starts_with("Target.");
            if let Some(object) = RawObject::parse(params.get())
                .ok()
                .filter(|_| target_domain)
            {
                if let Some(inner_real) = object.get_str("sessionId") {
                    // attachedToTarget announces a new session: register it before the event
                    // is queued so the agent can use the alias the moment it sees it.
                    let inner_alias = if method == "Target.attachedToTarget" {
                        let inner_kind = object
                            .get("targetInfo")
                            .and_then(|t| serde_json::from_str::<TargetType>(t.get()).ok())
                            .map_or(SessionKind::Other, |t| {
                                SessionKind::from_target_type(&t.kind)
                            });
                        self.register_session(agent_id, &inner_real, inner_kind, real)
                    } else {
                        self.sessions
                            .get(&inner_real)
                            .filter(|s| s.agent == agent_id)
                            .and_then(|s| s.alias.clone())
                    };
                    let Some(inner_alias) = inner_alias else {
                        tracing::warn!(
                            method,
                            "dropping an event naming a session the agent does not own"
                        );
                        return None;
                    };
                    let mut w = ObjWriter::with_capacity(params.get().len() + 16);
                    for (key, value) in &object.members {
                        if key == "sessionId" {
                            w.string("sessionId", &inner_alias);
                        } else {
                            w.raw(key, value.get());
                        }
                    }
                    params_text = Some(w.finish());
                }
            }
            if gate::scrub::event_needs_scrub(kind, method) {
                let text = params_text.as_deref().unwrap_or(params.get());
                match serde_json::from_str::<Value>(text) {
                    Ok(mut value) => {
                        gate::scrub::scrub_event(kind, method, &mut value, &self.held.get());
                        params_text = Some(value.to_string());
                    }
                    Err(e) => {
                        tracing::error!(error = %e, method, "event cannot be scrubbed; dropping it");
                        return None;
                    }
                }
            }
        }
        if !self.agents.get(&agent_id).is_some_and(|a| a.open) {
            return None;
        }
        let capacity = message
            .members
            .iter()
            .map(|(_, v)| v.get().len() + 16)
            .sum::<usize>();
        let mut w = ObjWriter::with_capacity(capacity);
        for (key, value) in &message.members {
            match key.as_ref() {
                "sessionId" => {
                    if let Some(alias) = alias {
                        w.string("sessionId", alias);
                    }
                }
                "params" => w.raw("params", params_text.as_deref().unwrap_or(value.get())),
                other => w.raw(other, value.get()),
            }
        }
        Some(w.finish())
    }

    /// Forgets a detached session and every session announced on it, and answers the requests
    /// still pending on them so each gets exactly one answer (a late real answer is dropped).
    fn session_detached(&mut self, shared: &Shared, real: &str) {
        let mut gone = vec![real.to_owned()];
        let mut i = 0;
        while i < gone.len() {
            let children: Vec<String> = self
                .sessions
                .iter()
                .filter(|(_, s)| s.parent.as_deref() == Some(gone[i].as_str()))
                .map(|(k, _)| k.clone())
                .collect();
            gone.extend(children);
            i += 1;
        }
        for session in &gone {
            let Some(record) = self.sessions.remove(session) else {
                continue;
            };
            let Some(agent) = self.agents.get_mut(&record.agent) else {
                continue;
            };
            match record.alias {
                Some(alias) => {
                    agent.aliases.remove(&alias);
                }
                None => {
                    // The agent's own browser session is gone (not by its own detach): nothing
                    // it sends can be routed any more.
                    agent.root = None;
                    if agent.open {
                        agent.open = false;
                        agent
                            .outbox
                            .close(1011, "the agent's browser session was detached");
                    }
                }
            }
        }
        let stale: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, p)| match p {
                Pending::Supervisor {
                    session: Some(s), ..
                } => gone.contains(s),
                Pending::Agent { session, .. } => gone.contains(session),
                _ => false,
            })
            .map(|(id, _)| *id)
            .collect();
        let (code, message) = SESSION_CLOSED;
        let mut origins = HashSet::new();
        for pipe_id in stale {
            match self.pending.remove(&pipe_id) {
                Some(Pending::Supervisor { method, tx, .. }) => {
                    let _ = tx.send(Err(CdpError::Protocol {
                        method,
                        code,
                        message: message.to_owned(),
                        data: None,
                    }));
                }
                Some(Pending::Agent {
                    agent,
                    origin,
                    id,
                    alias,
                    method,
                    digest,
                    ..
                }) => {
                    let answer = error_answer(Some(id), alias.as_deref(), code, message, None);
                    let tag = Tag {
                        id,
                        alias,
                        digest,
                        method,
                    };
                    self.deliver_answer(Some(pipe_id), agent, tag, answer);
                    origins.insert(origin);
                }
                _ => {}
            }
        }
        for origin in origins {
            self.settle(shared, origin);
        }
    }
}

impl Agent {
    /// Whether the agent's client is connected and may send.
    fn is_live(&self) -> bool {
        self.open && self.mode == Mode::Live
    }

    /// Queues an event for the agent unless it is closing.
    fn deliver(&mut self, text: String) {
        self.push(text, None);
    }

    /// Queues a message unless the agent is closing; closes it if its queue overflows.
    /// `answers` says what request it answers (`None` for an event).
    fn push(&mut self, text: String, answers: Option<Answers>) {
        if self.open && !self.outbox.push(text, answers) {
            if self.mode == Mode::Parked {
                tracing::warn!(agent = %self.label, "more events arrived than a parked connection may buffer; the park is no longer intact");
                self.overflowed = true;
            } else {
                tracing::warn!(agent = %self.label, "agent reads too slowly; closing its connection");
            }
            self.open = false;
        }
    }
}

/// `targetInfo.type`, read without decoding the rest of `targetInfo`.
#[derive(Deserialize)]
struct TargetType {
    #[serde(rename = "type")]
    kind: String,
}

/// `params.sessionId` of a `Target.detachedFromTarget` event.
fn detached_session(message: &RawObject<'_>) -> Option<String> {
    let params = RawObject::parse(message.get("params")?.get()).ok()?;
    params.get_str("sessionId")
}

/// The supervisor's view of an answer.
fn supervisor_result(message: &RawObject<'_>, method: String) -> Result<Value, CdpError> {
    if message.get("error").is_some() {
        return Err(error_of_answer(message, &method));
    }
    match message.get("result") {
        Some(result) => {
            serde_json::from_str(result.get()).map_err(|source| CdpError::Decode { method, source })
        }
        None => Ok(Value::Object(serde_json::Map::new())),
    }
}

/// The error member of an answer as a [`CdpError`].
fn error_of_answer(message: &RawObject<'_>, method: &str) -> CdpError {
    #[derive(Deserialize)]
    struct ErrorMember {
        code: i64,
        message: String,
        data: Option<Value>,
    }
    let error = message
        .get("error")
        .and_then(|e| serde_json::from_str::<ErrorMember>(e.get()).ok());
    match error {
        Some(e) => CdpError::Protocol {
            method: method.to_owned(),
            code: e.code,
            message: e.message,
            data: e.data.map(|d| match d {
                Value::String(s) => s,
                other => other.to_string(),
            }),
        },
        None => CdpError::Protocol {
            method: method.to_owned(),
            code: -32603,
            message: "the browser's answer has neither a result nor a readable error".to_owned(),
            data: None,
        },
    }
}

/// A CDP error answer as JSON text.
fn error_answer(
    id: Option<i64>,
    session_alias: Option<&str>,
    code: i64,
    message: &str,
    data: Option<&str>,
) -> String {
    let mut error = ObjWriter::with_capacity(32 + message.len());
    error.int("code", code);
    error.string("message", message);
    if let Some(data) = data {
        error.string("data", data);
    }
    let mut w = ObjWriter::with_capacity(64 + message.len());
    if let Some(id) = id {
        w.int("id", id);
    }
    w.raw("error", &error.finish());
    if let Some(alias) = session_alias {
        w.string("sessionId", alias);
    }
    w.finish()
}

/// A well-formed agent request.
struct AgentRequest {
    id: i64,
    method: String,
    session: Option<String>,
    params: Params,
    digest: Digest,
}

enum Params {
    Absent,
    Object(Value),
    /// Present but unusable; the text is the `data` of the `-32602` answer.
    Invalid(String),
}

/// A request answered without consulting the browser.
struct LocalAnswer {
    answer: String,
    denied: Option<Denied>,
}

impl LocalAnswer {
    fn invalid(id: Option<i64>, code: i64, message: &str) -> LocalAnswer {
        LocalAnswer {
            answer: error_answer(id, None, code, message, None),
            denied: None,
        }
    }
}

/// Validates an agent frame the way Chromium validates a message (same codes and texts), so a
/// client sees the same errors with or without chaperone in between.
fn parse_agent_request(frame: &str) -> Result<AgentRequest, LocalAnswer> {
    if frame.len() > MAX_AGENT_MESSAGE {
        #[derive(Deserialize)]
        struct Head {
            id: Option<Value>,
            method: Option<Value>,
        }
        let head = serde_json::from_str::<Head>(frame).ok();
        let id = head.as_ref().and_then(|h| h.id.as_ref()).and_then(int32_id);
        let method = head
            .as_ref()
            .and_then(|h| h.method.as_ref())
            .and_then(Value::as_str)
            .unwrap_or("message")
            .to_owned();
        let reason = format!(
            "it is {} bytes, more than the {MAX_AGENT_MESSAGE}-byte limit",
            frame.len()
        );
        let refusal = gate::Refusal::new(reason.clone());
        return Err(LocalAnswer {
            answer: error_answer(id, None, -32000, &refusal.message(&method), None),
            denied: Some(Denied { method, reason }),
        });
    }
    let object = match RawObject::parse(frame) {
        Ok(object) => object,
        Err(e) => {
            return Err(
                if serde_json::from_str::<serde::de::IgnoredAny>(frame).is_ok() {
                    LocalAnswer::invalid(None, -32600, "Message must be an object")
                } else {
                    LocalAnswer::invalid(None, -32700, &format!("JSON: {e}"))
                },
            );
        }
    };
    let id = object
        .get("id")
        .and_then(|raw| serde_json::from_str::<i64>(raw.get()).ok())
        .filter(|id| i32::try_from(*id).is_ok())
        .ok_or_else(|| {
            LocalAnswer::invalid(None, -32600, "Message must have integer 'id' property")
        })?;
    let method = object
        .get("method")
        .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
        .ok_or_else(|| {
            LocalAnswer::invalid(
                Some(id),
                -32600,
                "Message must have string 'method' property",
            )
        })?;
    let session = match object.get("sessionId") {
        None => None,
        Some(raw) => Some(serde_json::from_str::<String>(raw.get()).map_err(|_| {
            LocalAnswer::invalid(
                Some(id),
                -32600,
                "Message may have string 'sessionId' property",
            )
        })?),
    };
    if object
        .members
        .iter()
        .any(|(k, _)| !matches!(k.as_ref(), "id" | "method" | "sessionId" | "params"))
    {
        return Err(LocalAnswer::invalid(
            Some(id),
            -32600,
            "Message has property other than 'id', 'method', 'sessionId', 'params'",
        ));
    }
    let digest = request_digest(
        &method,
        session.as_deref(),
        object.get("params").map_or("", |raw| raw.get()),
    );
    let params = match object.get("params").map(|raw| raw.get().trim_start()) {
        None => Params::Absent,
        Some(text) if text.starts_with("null") => Params::Absent,
        Some(text) if text.starts_with('{') => match serde_json::from_str::<Value>(text) {
            Ok(value) => Params::Object(value),
            Err(e) => Params::Invalid(format!(
                "Failed to deserialize params - chaperone cannot inspect them: {e}"
            )),
        },
        Some(text) if text.starts_with('[') => {
            Params::Invalid("Failed to deserialize params - params must be an object".to_owned())
        }
        Some(_) => {
            return Err(LocalAnswer::invalid(
                Some(id),
                -32600,
                "Message may have object 'params' property",
            ))
        }
    };
    Ok(AgentRequest {
        id,
        method,
        session,
        params,
        digest,
    })
}

fn int32_id(value: &Value) -> Option<i64> {
    value.as_i64().filter(|id| i32::try_from(*id).is_ok())
}

/// The queue of frames for one agent.
struct Outbox {
    state: Mutex<OutboxState>,
    notify: Notify,
    /// Bytes that may wait before the agent is closed; the park's buffer limit while parked.
    limit: AtomicUsize,
    /// Whether the link is parked, which only changes the words of an overflow.
    parked: AtomicBool,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox::with_limit(MAX_AGENT_BACKLOG)
    }
}

#[derive(Default)]
struct OutboxState {
    queue: VecDeque<Queued>,
    bytes: usize,
    closing: bool,
}

struct Queued {
    frame: ToAgent,
    /// `None` for events and Close frames.
    answers: Option<Answers>,
}

impl Outbox {
    fn with_limit(limit: usize) -> Outbox {
        Outbox {
            state: Mutex::default(),
            notify: Notify::new(),
            limit: AtomicUsize::new(limit),
            parked: AtomicBool::new(false),
        }
    }

    fn state(&self) -> MutexGuard<'_, OutboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an event; `false` if the agent is closing or this message closed it.
    #[cfg(test)]
    fn push_text(&self, text: String) -> bool {
        self.push(text, None)
    }

    /// Queues a message; `false` if the agent is closing or this message closed it.
    fn push(&self, text: String, answers: Option<Answers>) -> bool {
        let mut state = self.state();
        if state.closing {
            return false;
        }
        let limit = self.limit.load(Ordering::Relaxed);
        if state.bytes > 0 && state.bytes + text.len() > limit {
            let waiting = state.bytes + text.len();
            state.queue.clear();
            state.bytes = 0;
            state.closing = true;
            let reason = if self.parked.load(Ordering::Relaxed) {
                format!(
                    "chaperone: more than {limit} bytes of events arrived while the connection \
                     was parked"
                )
            } else {
                format!("chaperone: the agent read too slowly ({waiting} bytes waiting)")
            };
            state.queue.push_back(Queued {
                frame: ToAgent::Close {
                    code: 1008,
                    reason: close_reason(&reason),
                },
                answers: None,
            });
            drop(state);
            self.notify.notify_one();
            return false;
        }
        state.bytes += text.len();
        state.queue.push_back(Queued {
            frame: ToAgent::Text(text),
            answers,
        });
        drop(state);
        self.notify.notify_one();
        true
    }

    /// Queues the final Close frame (once).
    fn close(&self, code: u16, reason: &str) {
        let mut state = self.state();
        if state.closing {
            return;
        }
        state.closing = true;
        state.queue.push_back(Queued {
            frame: ToAgent::Close {
                code,
                reason: close_reason(reason),
            },
            answers: None,
        });
        drop(state);
        self.notify.notify_one();
    }

    /// Whether the final Close frame is queued.
    fn is_closing(&self) -> bool {
        self.state().closing
    }

    /// Starts buffering for a parked link: at most `limit` bytes.
    fn park(&self, limit: usize) {
        self.parked.store(true, Ordering::Relaxed);
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Back to a live link's limit.
    fn unpark(&self) {
        self.parked.store(false, Ordering::Relaxed);
        self.limit.store(MAX_AGENT_BACKLOG, Ordering::Relaxed);
    }

    /// Takes every answer out of the queue, keeping events in order. Returns the answers to
    /// requests that reached the browser; the router's own answers are dropped.
    fn take_answers(&self) -> Vec<(Tag, String)> {
        let mut state = self.state();
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(state.queue.len());
        let mut bytes = state.bytes;
        for queued in state.queue.drain(..) {
            match queued {
                Queued {
                    frame: ToAgent::Text(text),
                    answers: Some(answers),
                } => {
                    bytes -= text.len();
                    if let Answers::Request(tag) = answers {
                        taken.push((*tag, text));
                    }
                }
                other => kept.push_back(other),
            }
        }
        state.queue = kept;
        state.bytes = bytes;
        taken
    }

    /// How many text frames wait.
    fn texts_queued(&self) -> usize {
        self.state()
            .queue
            .iter()
            .filter(|q| matches!(q.frame, ToAgent::Text(_)))
            .count()
    }

    /// Drops everything queued: nobody will read it.
    fn discard(&self) {
        let mut state = self.state();
        state.queue.clear();
        state.bytes = 0;
    }

    async fn recv(&self) -> Option<ToAgent> {
        loop {
            {
                let mut state = self.state();
                if let Some(Queued { frame, .. }) = state.queue.pop_front() {
                    if let ToAgent::Text(text) = &frame {
                        state.bytes -= text.len();
                    }
                    return Some(frame);
                }
                if state.closing {
                    return None;
                }
            }
            // notify_one stores a permit when nobody waits, so a push between the check above
            // and this await is not lost.
            self.notify.notified().await;
        }
    }
}

/// A close reason trimmed to the 123 bytes a WebSocket close frame can carry.
pub(crate) fn close_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

async fn read_loop(shared: Arc<Shared>, receiver: pipe::Receiver) {
    let mut reader = FrameReader::new(receiver, MAX_INBOUND_MESSAGE);
    let reason = loop {
        match reader.next_frame().await {
            Ok(Some(frame)) => shared.route_from_browser(frame),
            Ok(None) => break "the browser closed its end of the pipe".to_owned(),
            Err(e) => break e.to_string(),
        }
    };
    shared.shutdown(&reason);
}

async fn write_loop(
    shared: Arc<Shared>,
    mut sender: pipe::Sender,
    mut queue: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    while let Some(message) = queue.recv().await {
        let result = write_frame(&mut sender, &message).await;
        shared
            .pipe_backlog
            .fetch_sub(message.len(), Ordering::Relaxed);
        if let Err(e) = result {
            shared.shutdown(&format!(
                "writing to the browser's pipe (its fd 3) failed: {e}"
            ));
            return;
        }
    }
}

#[cfg(test)]
#[path = "conn_tests.rs"]
mod tests;
