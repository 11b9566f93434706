//! Router tests against a scripted fake browser on the other side of real pipes, and one smoke
//! test against real Chromium.

use super::*;
use crate::browser::pipe::FrameReader;
use serde_json::json;
use std::future::Future;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Hang guard for every await in these tests; never a timing assertion.
const HANG_GUARD: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(HANG_GUARD, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// The browser's side of the two pipes.
struct FakeBrowser {
    reader: FrameReader<pipe::Receiver>,
    writer: pipe::Sender,
}

impl FakeBrowser {
    async fn recv(&mut self) -> Value {
        let frame = within("a message on the pipe", self.reader.next_frame())
            .await
            .expect("pipe read failed")
            .expect("pipe closed");
        serde_json::from_slice(&frame).expect("the router wrote invalid JSON")
    }

    async fn send_raw(&mut self, text: &str) {
        let mut bytes = text.as_bytes().to_vec();
        bytes.push(0);
        within("a pipe write", write_frame(&mut self.writer, &bytes))
            .await
            .unwrap();
    }

    async fn send(&mut self, message: Value) {
        self.send_raw(&message.to_string()).await;
    }

    /// Proves that nothing else was written to the pipe since the last `recv`: the supervisor's
    /// next message must be the very next thing on it.
    async fn assert_quiet(&mut self, conn: &BrowserConn) {
        let call = tokio::spawn({
            let conn = conn.clone();
            async move { conn.call("Sentinel.ping", json!({}), None).await }
        });
        let message = self.recv().await;
        assert_eq!(
            message["method"], "Sentinel.ping",
            "unexpected message on the pipe: {message}"
        );
        self.send(json!({"id": message["id"], "result": {}})).await;
        within("the sentinel answer", call).await.unwrap().unwrap();
    }
}

fn start() -> (BrowserConn, FakeBrowser) {
    let (browser_reads, conn_writes) = std::io::pipe().unwrap();
    let (conn_reads, browser_writes) = std::io::pipe().unwrap();
    let conn = BrowserConn::start(OwnedFd::from(conn_writes), OwnedFd::from(conn_reads)).unwrap();
    let fake = FakeBrowser {
        reader: FrameReader::new(
            pipe::Receiver::from_owned_fd(OwnedFd::from(browser_reads)).unwrap(),
            MAX_INBOUND_MESSAGE,
        ),
        writer: pipe::Sender::from_owned_fd(OwnedFd::from(browser_writes)).unwrap(),
    };
    (conn, fake)
}

#[derive(Default)]
struct Recorder {
    denied: Mutex<Vec<(String, String, String)>>,
}

impl GateObserver for Recorder {
    fn denied(&self, agent: &str, method: &str, reason: &str) {
        self.denied
            .lock()
            .unwrap()
            .push((agent.to_owned(), method.to_owned(), reason.to_owned()));
    }
}

impl Recorder {
    fn take(&self) -> Vec<(String, String, String)> {
        std::mem::take(&mut *self.denied.lock().unwrap())
    }
}

/// Attaches an agent whose browser session the fake browser calls `root`.
async fn attach(
    conn: &BrowserConn,
    fake: &mut FakeBrowser,
    label: &str,
    root: &str,
) -> (AgentLink, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let (link, ()) = tokio::join!(conn.attach_agent(label, recorder.clone()), async {
        let message = fake.recv().await;
        assert_eq!(message["method"], "Target.attachToBrowserTarget");
        assert!(message.get("sessionId").is_none());
        fake.send(json!({"method": "Target.attachedToTarget", "params": {"sessionId": root, "targetInfo": {"targetId": "BROWSER", "type": "browser"}, "waitingForDebugger": false}})).await;
        fake.send(json!({"id": message["id"], "result": {"sessionId": root}}))
            .await;
    });
    (link.unwrap(), recorder)
}

async fn next_frame(link: &AgentLink) -> ToAgent {
    within("a frame for the agent", link.next_for_agent())
        .await
        .expect("agent link ended")
}

async fn next_json(link: &AgentLink) -> Value {
    match next_frame(link).await {
        ToAgent::Text(text) => {
            assert!(
                !text.contains("REAL-"),
                "a real session id leaked to the agent: {text}"
            );
            serde_json::from_str(&text).expect("the router sent invalid JSON to the agent")
        }
        close => panic!("expected a message, got {close:?}"),
    }
}

/// Has the agent's browser session announce a session of `target_type` with real id `real` on
/// the session `on` (`None`: the agent's own browser session `root`), and returns the alias.
async fn announce(
    fake: &mut FakeBrowser,
    link: &AgentLink,
    root: &str,
    on: Option<(&str, &str)>,
    real: &str,
    target_type: &str,
) -> String {
    let (parent_real, parent_alias) = on.unwrap_or((root, ""));
    fake.send(json!({"method": "Target.attachedToTarget", "sessionId": parent_real, "params": {"sessionId": real, "targetInfo": {"targetId": format!("TARGET-{}", real.trim_start_matches("REAL-")), "type": target_type, "futureField": [1]}, "waitingForDebugger": true}})).await;
    let event = next_json(link).await;
    assert_eq!(event["method"], "Target.attachedToTarget");
    match on {
        None => assert!(event.get("sessionId").is_none(), "{event}"),
        Some(_) => assert_eq!(event["sessionId"], parent_alias),
    }
    assert_eq!(event["params"]["targetInfo"]["futureField"], json!([1]));
    assert_eq!(event["params"]["targetInfo"]["type"], target_type);
    let alias = event["params"]["sessionId"].as_str().unwrap().to_owned();
    assert_ne!(alias, real);
    alias
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_using_the_same_ids_get_their_own_answers() {
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    let (b, _) = attach(&conn, &mut fake, "b", "REAL-ROOT-B").await;
    a.from_agent(r#"{"id":1,"method":"Browser.getVersion","params":{"expression":"'a'"}}"#);
    b.from_agent(r#"{"id":1,"method":"Browser.getVersion","params":{"expression":"'b'"}}"#);
    let to_a = fake.recv().await;
    let to_b = fake.recv().await;
    assert_eq!(to_a["sessionId"], "REAL-ROOT-A");
    assert_eq!(to_b["sessionId"], "REAL-ROOT-B");
    assert_eq!(to_a["params"]["expression"], "'a'");
    assert_ne!(to_a["id"], to_b["id"]);
    // Answer in the opposite order, with a member this router has never heard of.
    fake.send(json!({"id": to_b["id"], "result": {"v": "b"}, "sessionId": "REAL-ROOT-B", "newMember": true})).await;
    fake.send(json!({"id": to_a["id"], "result": {"v": "a"}, "sessionId": "REAL-ROOT-A"}))
        .await;
    assert_eq!(next_json(&a).await, json!({"id": 1, "result": {"v": "a"}}));
    assert_eq!(
        next_json(&b).await,
        json!({"id": 1, "result": {"v": "b"}, "newMember": true})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ids_are_aliased_both_ways_including_nested_sessions() {
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    let tab = announce(&mut fake, &a, "REAL-ROOT-A", None, "REAL-TAB", "tab").await;
    let page = announce(
        &mut fake,
        &a,
        "REAL-ROOT-A",
        Some(("REAL-TAB", &tab)),
        "REAL-PAGE",
        "page",
    )
    .await;
    assert_ne!(tab, page);

    a.from_agent(&json!({"id": 3, "method": "Runtime.evaluate", "sessionId": page, "params": {"expression": "1"}}).to_string());
    let forwarded = fake.recv().await;
    assert_eq!(forwarded["sessionId"], "REAL-PAGE");
    fake.send(json!({"id": forwarded["id"], "result": {"result": {"value": 1}}, "sessionId": "REAL-PAGE"})).await;
    assert_eq!(
        next_json(&a).await,
        json!({"id": 3, "result": {"result": {"value": 1}}, "sessionId": page})
    );

    fake.send(json!({"method": "Runtime.consoleAPICalled", "sessionId": "REAL-PAGE", "params": {"type": "log", "brandNew": {"x": 1}}})).await;
    assert_eq!(
        next_json(&a).await,
        json!({"method": "Runtime.consoleAPICalled", "sessionId": page, "params": {"type": "log", "brandNew": {"x": 1}}})
    );

    // Outside the Target domain, a `sessionId` param is not a CDP session: untouched.
    fake.send(json!({"method": "Network.deviceBoundSessionEventOccurred", "sessionId": "REAL-PAGE", "params": {"eventId": "e", "site": "https://a.test", "succeeded": true, "sessionId": "dbsc-1"}})).await;
    assert_eq!(next_json(&a).await["params"]["sessionId"], "dbsc-1");
    a.from_agent(&json!({"id": 30, "method": "Network.enable", "sessionId": page, "params": {"sessionId": "dbsc-1"}}).to_string());
    let forwarded = fake.recv().await;
    assert_eq!(forwarded["params"]["sessionId"], "dbsc-1");

    // Session ids inside params are translated too.
    a.from_agent(
        &json!({"id": 4, "method": "Target.detachFromTarget", "params": {"sessionId": page}})
            .to_string(),
    );
    let detach = fake.recv().await;
    assert_eq!(detach["params"]["sessionId"], "REAL-PAGE");
    assert_eq!(detach["sessionId"], "REAL-ROOT-A");
    // An alias the agent does not own inside params is answered like Chromium does.
    a.from_agent(
        r#"{"id":5,"method":"Target.detachFromTarget","params":{"sessionId":"REAL-TAB"}}"#,
    );
    assert_eq!(
        next_json(&a).await,
        json!({"id": 5, "error": {"code": -32602, "message": "No session with given id"}})
    );
    fake.assert_quiet(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attached_to_target_arrives_before_the_attach_answer_with_the_same_alias() {
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    a.from_agent(
        r#"{"id":7,"method":"Target.attachToTarget","params":{"targetId":"T1","flatten":true}}"#,
    );
    let attach = fake.recv().await;
    assert_eq!(attach["sessionId"], "REAL-ROOT-A");
    fake.send(json!({"method": "Target.attachedToTarget", "sessionId": "REAL-ROOT-A", "params": {"sessionId": "REAL-P1", "targetInfo": {"targetId": "T1", "type": "page"}, "waitingForDebugger": false}})).await;
    fake.send(
        json!({"id": attach["id"], "result": {"sessionId": "REAL-P1"}, "sessionId": "REAL-ROOT-A"}),
    )
    .await;
    let event = next_json(&a).await;
    assert_eq!(event["method"], "Target.attachedToTarget");
    let answer = next_json(&a).await;
    assert_eq!(answer["id"], 7);
    assert_eq!(answer["result"]["sessionId"], event["params"]["sessionId"]);

    // Same for the agent's own Target.attachToBrowserTarget.
    a.from_agent(r#"{"id":8,"method":"Target.attachToBrowserTarget"}"#);
    let attach = fake.recv().await;
    fake.send(json!({"method": "Target.attachedToTarget", "sessionId": "REAL-ROOT-A", "params": {"sessionId": "REAL-B2", "targetInfo": {"targetId": "B", "type": "browser"}, "waitingForDebugger": false}})).await;
    fake.send(
        json!({"id": attach["id"], "result": {"sessionId": "REAL-B2"}, "sessionId": "REAL-ROOT-A"}),
    )
    .await;
    let event = next_json(&a).await;
    let answer = next_json(&a).await;
    assert_eq!(answer["result"]["sessionId"], event["params"]["sessionId"]);
    // That second browser session is browser-kind: no Fetch there.
    a.from_agent(
        &json!({"id": 9, "method": "Fetch.enable", "sessionId": answer["result"]["sessionId"]})
            .to_string(),
    );
    assert_eq!(next_json(&a).await["error"]["code"], -32000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_answer_without_an_event_still_gets_an_alias() {
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    a.from_agent(
        r#"{"id":1,"method":"Target.attachToTarget","params":{"targetId":"T1","flatten":true}}"#,
    );
    let attach = fake.recv().await;
    fake.send(
        json!({"id": attach["id"], "result": {"sessionId": "REAL-P1"}, "sessionId": "REAL-ROOT-A"}),
    )
    .await;
    let alias = next_json(&a).await["result"]["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    // The kind is unknown without the event, so the session gets the narrowest allowlist.
    a.from_agent(
        &json!({"id": 2, "method": "Runtime.runIfWaitingForDebugger", "sessionId": alias})
            .to_string(),
    );
    assert_eq!(fake.recv().await["sessionId"], "REAL-P1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_session_ids_are_answered_locally_and_never_reach_the_pipe() {
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    let (b, _) = attach(&conn, &mut fake, "b", "REAL-ROOT-B").await;
    let page_a = announce(&mut fake, &a, "REAL-ROOT-A", None, "REAL-PAGE-A", "page").await;
    let not_found = json!({"code": -32001, "message": "Session with given id not found."});
    for (id, session) in [
        (1, page_a.as_str()),
        (2, "REAL-PAGE-A"),
        (3, "REAL-ROOT-A"),
        (4, "SUPERVISOR"),
    ] {
        b.from_agent(&json!({"id": id, "method": "Runtime.evaluate", "sessionId": session, "params": {"expression": "1"}}).to_string());
        assert_eq!(next_json(&b).await, json!({"id": id, "error": not_found}));
    }
    fake.assert_quiet(&conn).await;
    // The owner can still use it.
    a.from_agent(&json!({"id": 5, "method": "Runtime.evaluate", "sessionId": page_a}).to_string());
    assert_eq!(fake.recv().await["sessionId"], "REAL-PAGE-A");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_from_target_answers_what_is_pending_on_that_session() {
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    let tab = announce(&mut fake, &a, "REAL-ROOT-A", None, "REAL-TAB", "tab").await;
    let page = announce(
        &mut fake,
        &a,
        "REAL-ROOT-A",
        Some(("REAL-TAB", &tab)),
        "REAL-PAGE",
        "page",
    )
    .await;
    a.from_agent(&json!({"id": 10, "method": "Runtime.evaluate", "sessionId": page}).to_string());
    a.from_agent(
        &json!({"id": 11, "method": "Runtime.runIfWaitingForDebugger", "sessionId": tab})
            .to_string(),
    );
    a.from_agent(r#"{"id":12,"method":"Target.getTargets"}"#);
    let on_page = fake.recv().await;
    let _on_tab = fake.recv().await;
    let on_root = fake.recv().await;
    // Supervisor call pending on a session that is about to go.
    let sup = tokio::spawn({
        let conn = conn.clone();
        async move { conn.call("Page.enable", json!({}), Some("SUP-PAGE")).await }
    });
    assert_eq!(fake.recv().await["sessionId"], "SUP-PAGE");

    // The tab detaches: the event reaches the agent first, then both pending requests on the
    // tab and on its child page are answered; the root request stays pending.
    fake.send(json!({"method": "Target.detachedFromTarget", "sessionId": "REAL-ROOT-A", "params": {"sessionId": "REAL-TAB", "targetId": "T"}})).await;
    let event = next_json(&a).await;
    assert_eq!(
        event,
        json!({"method": "Target.detachedFromTarget", "params": {"sessionId": tab, "targetId": "T"}})
    );
    let mut answers = [next_json(&a).await, next_json(&a).await];
    answers.sort_by_key(|a| a["id"].as_i64());
    assert_eq!(
        answers[0],
        json!({"id": 10, "error": {"code": -32001, "message": "Session closed"}, "sessionId": page})
    );
    assert_eq!(
        answers[1],
        json!({"id": 11, "error": {"code": -32001, "message": "Session closed"}, "sessionId": tab})
    );

    // A late real answer is dropped: the next frame the agent gets is the root answer.
    fake.send(json!({"id": on_page["id"], "result": {}, "sessionId": "REAL-PAGE"}))
        .await;
    fake.send(
        json!({"id": on_root["id"], "result": {"targetInfos": []}, "sessionId": "REAL-ROOT-A"}),
    )
    .await;
    assert_eq!(
        next_json(&a).await,
        json!({"id": 12, "result": {"targetInfos": []}})
    );

    // Both aliases are forgotten.
    for (id, alias) in [(13, &page), (14, &tab)] {
        a.from_agent(&json!({"id": id, "method": "Page.enable", "sessionId": alias}).to_string());
        assert_eq!(next_json(&a).await["error"]["code"], -32001);
    }

    fake.send(json!({"method": "Target.detachedFromTarget", "params": {"sessionId": "SUP-PAGE"}}))
        .await;
    let err = within("the supervisor's answer", sup)
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, CdpError::Protocol { code: -32001, .. }),
        "{err}"
    );
    fake.assert_quiet(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_close_from_an_agent_closes_only_its_connection() {
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    let (b, _) = attach(&conn, &mut fake, "b", "REAL-ROOT-B").await;
    a.from_agent(r#"{"id":1,"method":"Browser.close"}"#);
    assert_eq!(next_json(&a).await, json!({"id": 1, "result": {}}));
    assert_eq!(
        next_frame(&a).await,
        ToAgent::Close {
            code: 1000,
            reason: BROWSER_CLOSE_REASON.to_owned()
        }
    );
    assert_eq!(
        within("the end of the link", a.next_for_agent()).await,
        None
    );
    // Frames after the close are ignored, and nothing reached the pipe.
    a.from_agent(r#"{"id":2,"method":"Browser.getVersion"}"#);
    fake.assert_quiet(&conn).await;
    // The other agent and the supervisor carry on.
    b.from_agent(r#"{"id":1,"method":"Browser.getVersion"}"#);
    let forwarded = fake.recv().await;
    assert_eq!(forwarded["sessionId"], "REAL-ROOT-B");
    fake.send(
        json!({"id": forwarded["id"], "result": {"product": "x"}, "sessionId": "REAL-ROOT-B"}),
    )
    .await;
    assert_eq!(
        next_json(&b).await,
        json!({"id": 1, "result": {"product": "x"}})
    );
    // Detaching the closed link still releases its browser session.
    let detach = tokio::spawn(a.detach());
    let message = fake.recv().await;
    assert_eq!(message["method"], "Target.detachFromTarget");
    assert_eq!(message["params"]["sessionId"], "REAL-ROOT-A");
    fake.send(json!({"id": message["id"], "result": {}})).await;
    within("detach", detach).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_agent_input_is_answered_like_chromium_and_the_link_stays_open() {
    let (conn, mut fake) = start();
    let (a, recorder) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    let cases: &[(&str, Value)] = &[
        ("garbage", json!({"error": {"code": -32700}})),
        ("", json!({"error": {"code": -32700}})),
        (
            "[1,2]",
            json!({"error": {"code": -32600, "message": "Message must be an object"}}),
        ),
        (
            "\"str\"",
            json!({"error": {"code": -32600, "message": "Message must be an object"}}),
        ),
        (
            r#"{"method":"Browser.getVersion"}"#,
            json!({"error": {"code": -32600, "message": "Message must have integer 'id' property"}}),
        ),
        (
            r#"{"id":"1","method":"Browser.getVersion"}"#,
            json!({"error": {"code": -32600, "message": "Message must have integer 'id' property"}}),
        ),
        (
            r#"{"id":2.5,"method":"Browser.getVersion"}"#,
            json!({"error": {"code": -32600, "message": "Message must have integer 'id' property"}}),
        ),
        (
            r#"{"id":2147483648,"method":"Browser.getVersion"}"#,
            json!({"error": {"code": -32600, "message": "Message must have integer 'id' property"}}),
        ),
        (
            r#"{"id":3}"#,
            json!({"id": 3, "error": {"code": -32600, "message": "Message must have string 'method' property"}}),
        ),
        (
            r#"{"id":4,"method":5}"#,
            json!({"id": 4, "error": {"code": -32600, "message": "Message must have string 'method' property"}}),
        ),
        (
            r#"{"id":5,"method":"X.y","sessionId":5}"#,
            json!({"id": 5, "error": {"code": -32600, "message": "Message may have string 'sessionId' property"}}),
        ),
        (
            r#"{"id":6,"method":"X.y","extra":1}"#,
            json!({"id": 6, "error": {"code": -32600, "message": "Message has property other than 'id', 'method', 'sessionId', 'params'"}}),
        ),
        (
            r#"{"id":7,"method":"X.y","params":"s"}"#,
            json!({"id": 7, "error": {"code": -32600, "message": "Message may have object 'params' property"}}),
        ),
        (
            r#"{"id":8,"method":"X.y","params":[1]}"#,
            json!({"id": 8, "error": {"code": -32602, "message": "Invalid parameters"}}),
        ),
        (
            r#"{"id":9,"method":"X.y","params":{"s":"\ud800"}}"#,
            json!({"id": 9, "error": {"code": -32602, "message": "Invalid parameters"}}),
        ),
    ];
    for (frame, expected) in cases {
        a.from_agent(frame);
        let mut answer = next_json(&a).await;
        // Only the parse error's text comes from the JSON parser; compare the rest exactly.
        if expected["error"]["message"].is_null() {
            answer["error"].as_object_mut().unwrap().remove("message");
        }
        if expected["error"]["code"] == -32602 {
            assert!(answer["error"]["data"].is_string(), "{answer}");
            answer["error"].as_object_mut().unwrap().remove("data");
        }
        assert_eq!(&answer, expected, "for {frame:?}");
    }

    // Oversized: refused with its id, reported, and never forwarded.
    let padding = "x".repeat(MAX_AGENT_MESSAGE);
    a.from_agent(&format!(
        r#"{{"id":20,"method":"Runtime.evaluate","params":{{"expression":"{padding}"}}}}"#
    ));
    drop(padding);
    let answer = next_json(&a).await;
    assert_eq!(answer["id"], 20);
    assert_eq!(answer["error"]["code"], -32000);
    assert!(answer["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("chaperone: Runtime.evaluate refused: "));
    assert_eq!(recorder.take().len(), 1);
    fake.assert_quiet(&conn).await;

    // Still open: the next request goes to the browser, whose error passes through; null
    // params are treated as absent.
    a.from_agent(r#"{"id":21,"method":"Browser.getVersion","params":null}"#);
    let forwarded = fake.recv().await;
    assert_eq!(forwarded["method"], "Browser.getVersion");
    assert!(forwarded.get("params").is_none());
    fake.send(json!({"id": forwarded["id"], "error": {"code": -32601, "message": "'No.such' wasn't found"}, "sessionId": "REAL-ROOT-A"})).await;
    assert_eq!(
        next_json(&a).await,
        json!({"id": 21, "error": {"code": -32601, "message": "'No.such' wasn't found"}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_32000_reported_and_never_forwarded() {
    let (conn, mut fake) = start();
    let (a, recorder) = attach(&conn, &mut fake, "agent-7", "REAL-ROOT-A").await;
    let page = announce(&mut fake, &a, "REAL-ROOT-A", None, "REAL-PAGE", "page").await;
    let refused = [
        json!({"id": 1, "method": "Target.setAutoAttach", "params": {"autoAttach": true, "waitForDebuggerOnStart": false, "flatten": false}}),
        json!({"id": 2, "method": "Target.setAutoAttach", "params": {"autoAttach": true, "waitForDebuggerOnStart": false}}),
        json!({"id": 3, "method": "Target.attachToTarget", "params": {"targetId": "T"}}),
        json!({"id": 4, "method": "Target.sendMessageToTarget", "params": {"message": "{}", "sessionId": page}}),
        json!({"id": 5, "method": "Target.exposeDevToolsProtocol", "params": {"targetId": "T"}}),
        json!({"id": 6, "method": "Fetch.enable", "params": {"patterns": [{"urlPattern": "*"}]}}),
        json!({"id": 7, "method": "Fetch.enable"}),
        json!({"id": 8, "method": "Target.setAutoAttach", "sessionId": page, "params": {"autoAttach": true, "waitForDebuggerOnStart": false, "flatten": false}}),
        json!({"id": 9, "method": "Target.getTargetInfo", "params": {"sessionId": page}}),
    ];
    for request in &refused {
        a.from_agent(&request.to_string());
        let answer = next_json(&a).await;
        let method = request["method"].as_str().unwrap();
        assert_eq!(answer["id"], request["id"]);
        assert_eq!(answer.get("sessionId"), request.get("sessionId"));
        assert_eq!(answer["error"]["code"], -32000, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("chaperone: {method} refused: ")),
            "{message}"
        );
        let lower = message.to_lowercase();
        assert!(!lower.contains("wasn't found") && !lower.contains("not supported"));
        let denied = recorder.take();
        assert_eq!(denied.len(), 1);
        assert_eq!(
            (denied[0].0.as_str(), denied[0].1.as_str()),
            ("agent-7", method)
        );
        assert!(message.ends_with(&denied[0].2));
    }
    fake.assert_quiet(&conn).await;

    // Page-level Fetch is what Playwright's route() needs: forwarded.
    a.from_agent(&json!({"id": 20, "method": "Fetch.enable", "sessionId": page, "params": {"patterns": [{"urlPattern": "*"}]}}).to_string());
    let forwarded = fake.recv().await;
    assert_eq!(forwarded["method"], "Fetch.enable");
    assert_eq!(forwarded["sessionId"], "REAL-PAGE");
    assert_eq!(forwarded["params"]["patterns"][0]["urlPattern"], "*");
    assert!(recorder.take().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisor_traffic_never_reaches_agents() {
    let (conn, mut fake) = start();
    let mut events = conn.supervisor_events();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    // The attach itself is visible to the supervisor.
    assert_eq!(
        within("event", events.recv()).await.unwrap()["method"],
        "Target.attachedToTarget"
    );

    fake.send(
        json!({"method": "Target.targetCreated", "params": {"targetInfo": {"targetId": "S"}}}),
    )
    .await;
    fake.send(json!({"method": "Target.attachedToTarget", "params": {"sessionId": "SUP-1", "targetInfo": {"targetId": "S", "type": "page"}, "waitingForDebugger": false}})).await;
    fake.send(json!({"method": "Fetch.requestPaused", "sessionId": "SUP-1", "params": {"requestId": "r"}})).await;
    fake.send(json!({"method": "Page.loadEventFired", "sessionId": "REAL-ROOT-A", "params": {"timestamp": 1}})).await;
    for method in [
        "Target.targetCreated",
        "Target.attachedToTarget",
        "Fetch.requestPaused",
    ] {
        assert_eq!(
            within("event", events.recv()).await.unwrap()["method"],
            method
        );
    }
    assert_eq!(
        next_json(&a).await,
        json!({"method": "Page.loadEventFired", "params": {"timestamp": 1}})
    );

    // The supervisor's own calls, typed and untyped, on the root and on its sessions.
    let typed = tokio::spawn({
        let conn = conn.clone();
        async move {
            conn.execute(
                chromiumoxide::cdp::browser_protocol::browser::GetVersionParams {},
                None,
            )
            .await
        }
    });
    let message = fake.recv().await;
    assert_eq!(message["method"], "Browser.getVersion");
    assert!(message.get("sessionId").is_none());
    fake.send(json!({"id": message["id"], "result": {"protocolVersion": "1.3", "product": "Chrome/156", "revision": "@r", "userAgent": "UA", "jsVersion": "15", "fieldFromTheFuture": 1}})).await;
    let version = within("typed call", typed).await.unwrap().unwrap();
    assert_eq!(version.product, "Chrome/156");

    let untyped = tokio::spawn({
        let conn = conn.clone();
        async move {
            conn.call(
                "Runtime.evaluate",
                json!({"expression": "1"}),
                Some("SUP-1"),
            )
            .await
        }
    });
    let message = fake.recv().await;
    assert_eq!(message["sessionId"], "SUP-1");
    fake.send(json!({"id": message["id"], "error": {"code": -32000, "message": "nope", "data": "why"}, "sessionId": "SUP-1"})).await;
    let err = within("untyped call", untyped).await.unwrap().unwrap_err();
    assert!(
        matches!(&err, CdpError::Protocol { code: -32000, message, data: Some(data), .. } if message == "nope" && data == "why"),
        "{err}"
    );

    // The agent saw nothing but its own event: the next thing it gets is this marker.
    fake.send(json!({"method": "Marker.event", "sessionId": "REAL-ROOT-A", "params": {}}))
        .await;
    assert_eq!(next_json(&a).await["method"], "Marker.event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_pass_through_raw_including_text_serde_json_cannot_decode() {
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    a.from_agent(r#"{"id":1,"method":"Browser.getVersion","params":{"expression":"'\\ud800'"}}"#);
    let forwarded = fake.recv().await;
    let id = forwarded["id"].as_u64().unwrap();
    fake.send_raw(&format!(r#"{{"id":{id},"result":{{"result":{{"type":"string","value":"\ud800"}}}},"sessionId":"REAL-ROOT-A"}}"#)).await;
    fake.send_raw(r#"{"method":"Runtime.consoleAPICalled","params":{"args":[{"value":"\udfff x"}]},"sessionId":"REAL-ROOT-A"}"#).await;
    assert_eq!(
        next_frame(&a).await,
        ToAgent::Text(
            r#"{"id":1,"result":{"result":{"type":"string","value":"\ud800"}}}"#.to_owned()
        )
    );
    assert_eq!(
        next_frame(&a).await,
        ToAgent::Text(
            r#"{"method":"Runtime.consoleAPICalled","params":{"args":[{"value":"\udfff x"}]}}"#
                .to_owned()
        )
    );
    // Garbage from the browser is dropped without disturbing what follows.
    fake.send_raw("not json").await;
    fake.send_raw("[]").await;
    fake.send(json!({"method": "Marker.event", "sessionId": "REAL-ROOT-A"}))
        .await;
    assert_eq!(next_json(&a).await["method"], "Marker.event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_eof_answers_everything_pending_and_closes_agents() {
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    a.from_agent(r#"{"id":1,"method":"Browser.getVersion","params":{"expression":"1"}}"#);
    let call = tokio::spawn({
        let conn = conn.clone();
        async move { conn.call("Browser.getVersion", json!({}), None).await }
    });
    fake.recv().await;
    fake.recv().await;
    // The browser dies in the middle of a message.
    fake.writer.write_all(br#"{"id":1,"res"#).await.unwrap();
    drop(fake);
    let answer = next_json(&a).await;
    assert_eq!(answer["id"], 1);
    assert_eq!(answer["error"]["code"], -32000);
    assert!(matches!(
        next_frame(&a).await,
        ToAgent::Close { code: 1001, .. }
    ));
    assert_eq!(
        within("the end of the link", a.next_for_agent()).await,
        None
    );
    let err = within("the pending call", call).await.unwrap().unwrap_err();
    assert!(matches!(err, CdpError::Closed { .. }), "{err}");
    within("closed()", conn.closed()).await;
    let reason = conn.close_reason().unwrap();
    assert!(reason.contains("in the middle of a"), "{reason}");
    // After the close, calls and attaches fail at once, and agent frames are ignored.
    assert!(matches!(
        conn.call("Browser.getVersion", json!({}), None).await,
        Err(CdpError::Closed { .. })
    ));
    assert!(matches!(
        conn.attach_agent("b", Arc::new(gate::NoObserver)).await,
        Err(CdpError::Closed { .. })
    ));
    a.from_agent(r#"{"id":2,"method":"Browser.getVersion"}"#);
    within("detach", a.detach()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_link_detaches_its_session_and_forgets_it() {
    let (conn, mut fake) = start();
    let mut events = conn.supervisor_events();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    within("event", events.recv()).await.unwrap();
    drop(a);
    let message = fake.recv().await;
    assert_eq!(message["method"], "Target.detachFromTarget");
    assert_eq!(message["params"]["sessionId"], "REAL-ROOT-A");
    fake.send(
        json!({"method": "Target.detachedFromTarget", "params": {"sessionId": "REAL-ROOT-A"}}),
    )
    .await;
    fake.send(json!({"id": message["id"], "result": {}})).await;
    assert_eq!(
        within("event", events.recv()).await.unwrap()["method"],
        "Target.detachedFromTarget"
    );
    // The session is forgotten: a stray event on it now counts as the supervisor's.
    fake.send(json!({"method": "Stray.event", "sessionId": "REAL-ROOT-A"}))
        .await;
    assert_eq!(
        within("event", events.recv()).await.unwrap()["method"],
        "Stray.event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_connection_closes_agents_and_the_pipe() {
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    drop(conn);
    assert!(matches!(
        next_frame(&a).await,
        ToAgent::Close { code: 1001, .. }
    ));
    // The browser sees end of file on its command pipe.
    assert!(within("EOF", fake.reader.next_frame())
        .await
        .unwrap()
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_agent_is_closed_instead_of_buffering_without_bound() {
    let outbox = Outbox::with_limit(100);
    // One message over the limit passes when nothing else waits (a big screenshot).
    assert!(outbox.push_text("x".repeat(150)));
    assert_eq!(outbox.recv().await, Some(ToAgent::Text("x".repeat(150))));
    assert!(outbox.push_text("x".repeat(60)));
    assert!(!outbox.push_text("x".repeat(60)));
    // The backlog is discarded: the Close comes next, not after the queued data.
    assert!(!outbox.push_text("late".to_owned()));
    assert!(matches!(
        outbox.recv().await,
        Some(ToAgent::Close { code: 1008, .. })
    ));
    assert_eq!(outbox.recv().await, None);
}

// ---- Parking and replay (AG-374 4.5, 4.9) ----

/// A park buffer large enough for every test that does not test its limit.
const BUDGET: usize = 1 << 20;

/// A browser's answer to a request the router forwarded, on the same session.
async fn answer(fake: &mut FakeBrowser, request: &Value, result: Value) {
    let mut message = json!({"id": request["id"], "result": result});
    if let Some(session) = request.get("sessionId") {
        message["sessionId"] = session.clone();
    }
    fake.send(message).await;
}

/// The agent sends `frame`, which must be forwarded; returns what reached the pipe.
async fn forwarded(fake: &mut FakeBrowser, link: &AgentLink, frame: &str) -> Value {
    assert_eq!(link.from_agent(frame), None);
    fake.recv().await
}

async fn expect_detach(fake: &mut FakeBrowser, root: &str) {
    let message = fake.recv().await;
    assert_eq!(message["method"], "Target.detachFromTarget", "{message}");
    assert_eq!(message["params"]["sessionId"], root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_link_keeps_its_session_and_buffers_events_in_order() {
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    let page = announce(&mut fake, &a, "REAL-ROOT-A", None, "REAL-PAGE", "page").await;
    let parked = a.park(BUDGET).unwrap();
    for n in 0..3 {
        fake.send(json!({"method": "Runtime.consoleAPICalled", "sessionId": "REAL-PAGE", "params": {"n": n}})).await;
    }
    fake.send(json!({"method": "Target.targetInfoChanged", "sessionId": "REAL-ROOT-A", "params": {"targetInfo": {"targetId": "T"}}})).await;
    // Nothing was detached: the supervisor's sentinel is the next thing on the pipe (and, being
    // answered after the events, proves they were routed).
    fake.assert_quiet(&conn).await;
    assert!(parked.is_intact());
    assert_eq!(
        parked.summary(),
        ParkSummary {
            in_flight: 0,
            answered_during_gap: 0,
            events_buffered: 4,
            buffer_overflowed: false
        }
    );
    let a = parked.resume();
    for n in 0..3 {
        assert_eq!(
            next_json(&a).await,
            json!({"method": "Runtime.consoleAPICalled", "sessionId": page, "params": {"n": n}})
        );
    }
    assert_eq!(
        next_json(&a).await,
        json!({"method": "Target.targetInfoChanged", "params": {"targetInfo": {"targetId": "T"}}})
    );
    // The same root session and the same aliases.
    let sent = forwarded(
        &mut fake,
        &a,
        &json!({"id": 1, "method": "Runtime.evaluate", "sessionId": page}).to_string(),
    )
    .await;
    assert_eq!(sent["sessionId"], "REAL-PAGE");
    let sent = forwarded(&mut fake, &a, r#"{"id":2,"method":"Browser.getVersion"}"#).await;
    assert_eq!(sent["sessionId"], "REAL-ROOT-A");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_during_the_gap_are_replayed_only_on_identical_resend_continue() {
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    let page = announce(&mut fake, &a, "REAL-ROOT-A", None, "REAL-PAGE", "page").await;
    let eval = json!({"id": 7, "method": "Runtime.evaluate", "sessionId": page, "params": {"expression": "1+1"}}).to_string();
    let sent = forwarded(&mut fake, &a, &eval).await;
    let parked = a.park(BUDGET).unwrap();
    answer(&mut fake, &sent, json!({"result": {"value": 2}})).await;
    fake.assert_quiet(&conn).await;
    assert_eq!(parked.summary().answered_during_gap, 1);
    assert_eq!(parked.summary().in_flight, 0);
    let a = parked.resume();
    // Nothing is flushed: the agent's next frame is the answer to what it sends next.
    let version = forwarded(&mut fake, &a, r#"{"id":1,"method":"Browser.getVersion"}"#).await;
    answer(&mut fake, &version, json!({"product": "Fake"})).await;
    assert_eq!(
        next_json(&a).await,
        json!({"id": 1, "result": {"product": "Fake"}})
    );
    // The identical re-send gets the stored reply, and nothing is written to the pipe.
    assert_eq!(a.from_agent(&eval), None);
    assert_eq!(
        next_json(&a).await,
        json!({"id": 7, "result": {"result": {"value": 2}}, "sessionId": page})
    );
    fake.assert_quiet(&conn).await;
    // A reply is given once; the same bytes again are a new command.
    let again = forwarded(&mut fake, &a, &eval).await;
    assert_eq!(again["params"]["expression"], "1+1");
    assert_eq!(
        a.reconciliation().unwrap(),
        json!({"mode": "continue", "replayed": [{"id": 7, "method": "Runtime.evaluate"}], "joined": 0, "unclaimed": 0, "superseded": 0, "lost": 0, "delivered": 0, "in_flight": 0})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_during_the_gap_are_replayed_only_on_identical_resend_reattach() {
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    let create = r#"{"id":7,"method":"Target.createTarget","params":{"url":"about:blank"}}"#;
    let sent = forwarded(&mut fake, &a, create).await;
    let parked = a.park(BUDGET).unwrap();
    answer(&mut fake, &sent, json!({"targetId": "T-NEW"})).await;
    // The attach below is routed after the answer, so the answer is in the book by then.
    let (b, _) = attach(&conn, &mut fake, "b", "REAL-ROOT-B").await;
    assert_eq!(parked.summary().answered_during_gap, 1);
    assert_eq!(b.reconciliation(), None);
    parked.drain_into(&b);
    // Nothing runs on the drained link any more: it is detached at once.
    expect_detach(&mut fake, "REAL-ROOT-A").await;
    // A fresh conversation on a fresh session, with nothing flushed into it.
    let version = forwarded(&mut fake, &b, r#"{"id":1,"method":"Browser.getVersion"}"#).await;
    assert_eq!(version["sessionId"], "REAL-ROOT-B");
    answer(&mut fake, &version, json!({})).await;
    assert_eq!(next_json(&b).await, json!({"id": 1, "result": {}}));
    // The identical re-send gets the stored reply; the target is not created twice.
    assert_eq!(b.from_agent(create), None);
    assert_eq!(
        next_json(&b).await,
        json!({"id": 7, "result": {"targetId": "T-NEW"}})
    );
    fake.assert_quiet(&conn).await;
    let summary = b.reconciliation().unwrap();
    assert_eq!(summary["mode"], "reattach");
    assert_eq!(
        summary["replayed"],
        json!([{"id": 7, "method": "Target.createTarget"}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_command_resent_after_resume_is_joined_answered_once_and_written_once() {
    // Continue mode.
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    let create = r#"{"id":5,"method":"Target.createTarget","params":{"url":"about:blank"}}"#;
    let sent = forwarded(&mut fake, &a, create).await;
    let a = a.park(BUDGET).unwrap().resume();
    assert_eq!(a.from_agent(create), None);
    fake.assert_quiet(&conn).await;
    answer(&mut fake, &sent, json!({"targetId": "T5"})).await;
    assert_eq!(
        next_json(&a).await,
        json!({"id": 5, "result": {"targetId": "T5"}})
    );
    // Exactly once: the next frame answers the next command.
    let next = forwarded(&mut fake, &a, r#"{"id":6,"method":"Browser.getVersion"}"#).await;
    answer(&mut fake, &next, json!({})).await;
    assert_eq!(next_json(&a).await, json!({"id": 6, "result": {}}));
    assert_eq!(a.reconciliation().unwrap()["joined"], 1);

    // Reattach mode.
    let (c, _) = attach(&conn, &mut fake, "c", "REAL-ROOT-C").await;
    let sent = forwarded(&mut fake, &c, create).await;
    let parked = c.park(BUDGET).unwrap();
    let (d, _) = attach(&conn, &mut fake, "d", "REAL-ROOT-D").await;
    parked.drain_into(&d);
    // Still attached: a command runs on it.
    fake.assert_quiet(&conn).await;
    assert_eq!(d.from_agent(create), None);
    fake.assert_quiet(&conn).await;
    answer(&mut fake, &sent, json!({"targetId": "T5"})).await;
    assert_eq!(
        next_json(&d).await,
        json!({"id": 5, "result": {"targetId": "T5"}})
    );
    expect_detach(&mut fake, "REAL-ROOT-C").await;
    let next = forwarded(&mut fake, &d, r#"{"id":6,"method":"Browser.getVersion"}"#).await;
    assert_eq!(next["sessionId"], "REAL-ROOT-D");
    answer(&mut fake, &next, json!({})).await;
    assert_eq!(next_json(&d).await, json!({"id": 6, "result": {}}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_racing_a_delivered_answer_is_answered_again_not_run_again() {
    // Continue mode: the answer arrives after the resumption and is delivered as usual, while
    // the agent, not having read it yet, re-sends the command.
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    let order = r#"{"id":9,"method":"Target.createTarget","params":{"url":"about:blank"}}"#;
    let sent = forwarded(&mut fake, &a, order).await;
    let a = a.park(BUDGET).unwrap().resume();
    answer(&mut fake, &sent, json!({"targetId": "T9"})).await;
    let first = next_json(&a).await;
    assert_eq!(first, json!({"id": 9, "result": {"targetId": "T9"}}));
    assert_eq!(a.from_agent(order), None);
    fake.assert_quiet(&conn).await;
    assert_eq!(next_json(&a).await, first);
    let ops = a.reconciliation().unwrap();
    assert_eq!(ops["replayed"][0]["id"], 9, "{ops}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reattached_conversation_runs_its_own_session_setup_again() {
    // The drop came while the client's start-up command was in flight; the new conversation
    // sends the same bytes at the same id and needs it run on its own browser session.
    let (conn, mut fake) = start();
    let (c, _) = attach(&conn, &mut fake, "c", "REAL-ROOT-C").await;
    let setup = r#"{"id":1,"method":"Target.setAutoAttach","params":{"autoAttach":true,"waitForDebuggerOnStart":true,"flatten":true}}"#;
    let old = forwarded(&mut fake, &c, setup).await;
    let parked = c.park(BUDGET).unwrap();
    let (d, _) = attach(&conn, &mut fake, "d", "REAL-ROOT-D").await;
    parked.drain_into(&d);
    answer(&mut fake, &old, json!({})).await;
    assert_eq!(d.from_agent(setup), None);
    // The drained link's detach (its last command is settled) and the new command, in
    // whichever order the router got to them.
    let (first, second) = (fake.recv().await, fake.recv().await);
    let (detach, again) = if first["method"] == "Target.detachFromTarget" {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(detach["params"]["sessionId"], "REAL-ROOT-C", "{detach}");
    assert_eq!(again["method"], "Target.setAutoAttach", "{again}");
    assert_eq!(again["sessionId"], "REAL-ROOT-D");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_params_with_the_same_id_are_forwarded() {
    // Continue mode: the same conversation reused the id, so the old command is superseded
    // and its late answer dropped.
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    let old = forwarded(
        &mut fake,
        &a,
        r#"{"id":4,"method":"Browser.getVersion","params":{"n":1}}"#,
    )
    .await;
    let a = a.park(BUDGET).unwrap().resume();
    let new = forwarded(
        &mut fake,
        &a,
        r#"{"id":4,"method":"Browser.getVersion","params":{"n":2}}"#,
    )
    .await;
    assert_eq!(new["params"]["n"], 2);
    assert_ne!(new["id"], old["id"]);
    answer(&mut fake, &old, json!({"v": "old"})).await;
    answer(&mut fake, &new, json!({"v": "new"})).await;
    assert_eq!(
        next_json(&a).await,
        json!({"id": 4, "result": {"v": "new"}})
    );
    assert_eq!(a.reconciliation().unwrap()["superseded"], 1);

    // Reattach mode: a new conversation reuses ids; the entry is left alone and the original
    // command can still claim its reply.
    let (c, _) = attach(&conn, &mut fake, "c", "REAL-ROOT-C").await;
    let original = r#"{"id":4,"method":"Browser.getVersion","params":{"n":1}}"#;
    let old = forwarded(&mut fake, &c, original).await;
    let parked = c.park(BUDGET).unwrap();
    let (d, _) = attach(&conn, &mut fake, "d", "REAL-ROOT-D").await;
    parked.drain_into(&d);
    let new = forwarded(
        &mut fake,
        &d,
        r#"{"id":4,"method":"Browser.getVersion","params":{"n":2}}"#,
    )
    .await;
    assert_eq!(new["sessionId"], "REAL-ROOT-D");
    answer(&mut fake, &new, json!({"v": "new"})).await;
    assert_eq!(
        next_json(&d).await,
        json!({"id": 4, "result": {"v": "new"}})
    );
    answer(&mut fake, &old, json!({"v": "old"})).await;
    expect_detach(&mut fake, "REAL-ROOT-C").await;
    assert_eq!(d.from_agent(original), None);
    assert_eq!(
        next_json(&d).await,
        json!({"id": 4, "result": {"v": "old"}})
    );
    fake.assert_quiet(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_link_detaches_when_its_last_pending_is_settled() {
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    let first = r#"{"id":1,"method":"Browser.getVersion","params":{"n":1}}"#;
    let second = r#"{"id":2,"method":"Browser.getVersion","params":{"n":2}}"#;
    let sent1 = forwarded(&mut fake, &a, first).await;
    let sent2 = forwarded(&mut fake, &a, second).await;
    let parked = a.park(BUDGET).unwrap();
    let (b, _) = attach(&conn, &mut fake, "b", "REAL-ROOT-B").await;
    parked.drain_into(&b);
    answer(&mut fake, &sent1, json!({"n": 1})).await;
    // One request still runs on the drained link: it stays attached.
    fake.assert_quiet(&conn).await;
    answer(&mut fake, &sent2, json!({"n": 2})).await;
    expect_detach(&mut fake, "REAL-ROOT-A").await;
    // Both answers wait for the successor, which never saw them unasked.
    assert_eq!(b.from_agent(second), None);
    assert_eq!(next_json(&b).await, json!({"id": 2, "result": {"n": 2}}));
    assert_eq!(b.from_agent(first), None);
    assert_eq!(next_json(&b).await, json!({"id": 1, "result": {"n": 1}}));
    fake.assert_quiet(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_successor_detaches_the_draining_link() {
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    forwarded(&mut fake, &a, r#"{"id":1,"method":"Browser.getVersion"}"#).await;
    let parked = a.park(BUDGET).unwrap();
    let (b, _) = attach(&conn, &mut fake, "b", "REAL-ROOT-B").await;
    parked.drain_into(&b);
    fake.assert_quiet(&conn).await;
    drop(b);
    let mut detached = Vec::new();
    for _ in 0..2 {
        let message = fake.recv().await;
        assert_eq!(message["method"], "Target.detachFromTarget");
        detached.push(message["params"]["sessionId"].as_str().unwrap().to_owned());
    }
    detached.sort();
    assert_eq!(detached, ["REAL-ROOT-A", "REAL-ROOT-B"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_buffer_overflow_makes_the_park_not_intact() {
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    let parked = a.park(200).unwrap();
    for _ in 0..2 {
        fake.send(json!({"method": "Target.targetInfoChanged", "sessionId": "REAL-ROOT-A", "params": {"pad": "x".repeat(150)}})).await;
    }
    fake.assert_quiet(&conn).await;
    assert!(!parked.is_intact());
    let summary = parked.summary();
    assert!(summary.buffer_overflowed);
    assert_eq!(summary.events_buffered, 0);
    // Resumed anyway, the link only says why it ends.
    let a = parked.resume();
    match next_frame(&a).await {
        ToAgent::Close { code, reason } => {
            assert_eq!(code, 1008);
            assert!(reason.contains("parked"), "{reason}");
        }
        other => panic!("expected a Close, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaperone_methods_become_local_calls_only_on_browser_sessions() {
    let (conn, mut fake) = start();
    let (a, recorder) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    // The root session.
    let call = a
        .from_agent(r#"{"id":1,"method":"Chaperone.getResumeTicket","params":{"x":1}}"#)
        .unwrap();
    assert_eq!(
        call,
        LocalCall {
            id: 1,
            session: None,
            method: "Chaperone.getResumeTicket".to_owned(),
            params: json!({"x": 1}),
        }
    );
    a.answer_local(&call, Ok(json!({"ticket": "T"})));
    assert_eq!(
        next_json(&a).await,
        json!({"id": 1, "result": {"ticket": "T"}})
    );

    // A second browser session (Playwright's newBrowserCDPSession).
    let attach = forwarded(
        &mut fake,
        &a,
        r#"{"id":2,"method":"Target.attachToBrowserTarget"}"#,
    )
    .await;
    fake.send(json!({"method": "Target.attachedToTarget", "sessionId": "REAL-ROOT-A", "params": {"sessionId": "REAL-B2", "targetInfo": {"targetId": "B", "type": "browser"}, "waitingForDebugger": false}})).await;
    answer(&mut fake, &attach, json!({"sessionId": "REAL-B2"})).await;
    next_json(&a).await;
    let browser = next_json(&a).await["result"]["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let call = a
        .from_agent(
            &json!({"id": 3, "method": "Chaperone.getResumeTicket", "sessionId": browser})
                .to_string(),
        )
        .unwrap();
    assert_eq!(call.session.as_deref(), Some(browser.as_str()));
    assert_eq!(call.params, json!({}));
    a.answer_local(&call, Err("no ticket for you".to_owned()));
    assert_eq!(
        next_json(&a).await,
        json!({"id": 3, "error": {"code": -32000, "message": "no ticket for you"}, "sessionId": browser})
    );

    // A page session: refused, reported, never forwarded.
    let page = announce(&mut fake, &a, "REAL-ROOT-A", None, "REAL-PAGE", "page").await;
    let on_page =
        json!({"id": 4, "method": "Chaperone.getResumeTicket", "sessionId": page}).to_string();
    assert_eq!(a.from_agent(&on_page), None);
    assert_eq!(
        next_json(&a).await,
        json!({"id": 4, "error": {"code": -32000, "message": CHAPERONE_BROWSER_ONLY}, "sessionId": page})
    );
    let denied = recorder.take();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].1, "Chaperone.getResumeTicket");

    // Chaperone.reconcile is the router's own, on any browser-kind session.
    for (id, session) in [(5, None), (6, Some(browser.as_str()))] {
        let mut frame = json!({"id": id, "method": "Chaperone.reconcile"});
        if let Some(session) = session {
            frame["sessionId"] = json!(session);
        }
        assert_eq!(a.from_agent(&frame.to_string()), None);
        let mut expected = json!({"id": id, "result": {"operations": [], "eventsBuffered": 0, "bufferOverflowed": false}});
        if let Some(session) = session {
            expected["sessionId"] = json!(session);
        }
        assert_eq!(next_json(&a).await, expected);
    }
    // An unknown alias is answered like any other.
    assert_eq!(
        a.from_agent(r#"{"id":7,"method":"Chaperone.reconcile","sessionId":"NOPE"}"#),
        None
    );
    assert_eq!(next_json(&a).await["error"]["code"], -32001);
    fake.assert_quiet(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_and_replayed_replies_are_scrubbed_of_held_values() {
    const SECRET: &str = "SECRET-VALUE-5be0c1";
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    let held = || gate::Held::new(&[SECRET], Vec::new(), Vec::new(), FILES_DIR);
    conn.held().set(held());
    let call = a.from_agent(r#"{"id":1,"method":"Chaperone.x"}"#).unwrap();
    a.answer_local(&call, Ok(json!({"echo": SECRET})));
    let reply = next_json(&a).await;
    assert_eq!(reply["id"], 1);
    assert!(!reply.to_string().contains(SECRET), "{reply}");

    // A reply stored while the value was not yet held is scrubbed when it is replayed.
    conn.held().set(gate::Held::nothing(FILES_DIR));
    let version = r#"{"id":2,"method":"Browser.getVersion"}"#;
    let sent = forwarded(&mut fake, &a, version).await;
    let parked = a.park(BUDGET).unwrap();
    answer(&mut fake, &sent, json!({"product": SECRET})).await;
    fake.assert_quiet(&conn).await;
    conn.held().set(held());
    let a = parked.resume();
    assert_eq!(a.from_agent(version), None);
    let reply = next_json(&a).await;
    assert_eq!(reply["id"], 2);
    assert!(!reply.to_string().contains(SECRET), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaperone_reconcile_lists_every_outcome() {
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    let frame = |id: i64, n: Value| {
        json!({"id": id, "method": "Browser.getVersion", "params": {"n": n}}).to_string()
    };
    let mut sent = vec![Value::Null];
    for id in 1..=6 {
        sent.push(forwarded(&mut fake, &a, &frame(id, json!(id))).await);
    }
    // 200 bytes hold the small replies, not the big one.
    let parked = a.park(200).unwrap();
    answer(&mut fake, &sent[1], json!({})).await;
    answer(&mut fake, &sent[2], json!({"big": "x".repeat(400)})).await;
    answer(&mut fake, &sent[4], json!({"v": 4})).await;
    fake.assert_quiet(&conn).await;
    let summary = parked.summary();
    assert_eq!((summary.in_flight, summary.answered_during_gap), (3, 3));
    let a = parked.resume();
    // 4: claimed; 5: joined; 6: superseded; 2: lost, refused rather than run again.
    assert_eq!(a.from_agent(&frame(4, json!(4))), None);
    assert_eq!(next_json(&a).await, json!({"id": 4, "result": {"v": 4}}));
    assert_eq!(a.from_agent(&frame(5, json!(5))), None);
    let new6 = forwarded(&mut fake, &a, &frame(6, json!("other"))).await;
    assert_eq!(a.from_agent(&frame(2, json!(2))), None);
    let lost = next_json(&a).await;
    assert_eq!(lost["id"], 2);
    assert_eq!(lost["error"]["code"], -32000);
    assert!(
        lost["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already ran"),
        "{lost}"
    );
    fake.assert_quiet(&conn).await;

    let op = |id: i64, outcome: &str| json!({"id": id, "sessionId": null, "method": "Browser.getVersion", "outcome": outcome});
    assert_eq!(
        a.from_agent(r#"{"id":100,"method":"Chaperone.reconcile"}"#),
        None
    );
    assert_eq!(
        next_json(&a).await,
        json!({"id": 100, "result": {"operations": [op(1, "answered"), op(2, "lost"), op(3, "in_flight"), op(4, "claimed"), op(5, "joined"), op(6, "superseded")], "eventsBuffered": 0, "bufferOverflowed": false}})
    );
    assert_eq!(
        a.reconciliation().unwrap(),
        json!({"mode": "continue", "replayed": [{"id": 4, "method": "Browser.getVersion"}], "joined": 1, "unclaimed": 1, "superseded": 1, "lost": 1, "delivered": 0, "in_flight": 1})
    );

    // What still runs is answered normally; the superseded command's answer is dropped.
    answer(&mut fake, &sent[6], json!({"v": "old 6"})).await;
    answer(&mut fake, &sent[3], json!({"v": 3})).await;
    answer(&mut fake, &sent[5], json!({"v": 5})).await;
    answer(&mut fake, &new6, json!({"v": "new 6"})).await;
    assert_eq!(next_json(&a).await, json!({"id": 3, "result": {"v": 3}}));
    assert_eq!(next_json(&a).await, json!({"id": 5, "result": {"v": 5}}));
    assert_eq!(
        next_json(&a).await,
        json!({"id": 6, "result": {"v": "new 6"}})
    );
    assert_eq!(
        a.from_agent(r#"{"id":101,"method":"Chaperone.reconcile"}"#),
        None
    );
    assert_eq!(
        next_json(&a).await["result"]["operations"][2]["outcome"],
        "delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_queued_but_unsent_at_park_time_are_kept_for_replay() {
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    let version = r#"{"id":9,"method":"Browser.getVersion"}"#;
    let sent = forwarded(&mut fake, &a, version).await;
    answer(&mut fake, &sent, json!({"product": "Fake"})).await;
    // A refusal the router made itself: nothing ran, so it is simply dropped.
    assert_eq!(a.from_agent(r#"{"id":10,"method":"Browser.crash"}"#), None);
    fake.assert_quiet(&conn).await;
    let parked = a.park(BUDGET).unwrap();
    assert_eq!(parked.summary().answered_during_gap, 1);
    let a = parked.resume();
    fake.send(json!({"method": "Marker.event", "sessionId": "REAL-ROOT-A"}))
        .await;
    assert_eq!(next_json(&a).await["method"], "Marker.event");
    assert_eq!(a.from_agent(version), None);
    assert_eq!(
        next_json(&a).await,
        json!({"id": 9, "result": {"product": "Fake"}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_parked_link_detaches_it_and_a_closed_link_cannot_park() {
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    assert!(a.id().get() > 0);
    let parked = a.park(BUDGET).unwrap();
    fake.assert_quiet(&conn).await;
    drop(parked);
    expect_detach(&mut fake, "REAL-ROOT-A").await;

    let (b, _) = attach(&conn, &mut fake, "b", "REAL-ROOT-B").await;
    assert_eq!(b.from_agent(r#"{"id":1,"method":"Browser.close"}"#), None);
    let b = b.park(BUDGET).unwrap_err();
    drop(b);
    expect_detach(&mut fake, "REAL-ROOT-B").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_kept_for_a_parked_link_include_session_closed() {
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    let page = announce(&mut fake, &a, "REAL-ROOT-A", None, "REAL-PAGE", "page").await;
    let eval = json!({"id": 3, "method": "Runtime.evaluate", "sessionId": page}).to_string();
    forwarded(&mut fake, &a, &eval).await;
    let parked = a.park(BUDGET).unwrap();
    fake.send(json!({"method": "Target.detachedFromTarget", "sessionId": "REAL-ROOT-A", "params": {"sessionId": "REAL-PAGE"}})).await;
    fake.assert_quiet(&conn).await;
    assert_eq!(parked.summary().answered_during_gap, 1);
    let a = parked.resume();
    // The event first; the answer only on the re-send, which never reaches the pipe.
    assert_eq!(next_json(&a).await["method"], "Target.detachedFromTarget");
    assert_eq!(a.from_agent(&eval), None);
    assert_eq!(
        next_json(&a).await,
        json!({"id": 3, "error": {"code": -32001, "message": "Session closed"}, "sessionId": page})
    );
    fake.assert_quiet(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gap_carries_what_the_first_left_unclaimed() {
    let (conn, mut fake) = start();
    let (a, _) = attach(&conn, &mut fake, "a", "REAL-ROOT-A").await;
    let first = r#"{"id":1,"method":"Target.createTarget","params":{"url":"about:blank"}}"#;
    let second = r#"{"id":2,"method":"Target.createTarget","params":{"url":"data:,2"}}"#;
    let sent1 = forwarded(&mut fake, &a, first).await;
    let sent2 = forwarded(&mut fake, &a, second).await;
    let parked_a = a.park(BUDGET).unwrap();
    answer(&mut fake, &sent1, json!({"targetId": "T1"})).await;
    let (b, _) = attach(&conn, &mut fake, "b", "REAL-ROOT-B").await;
    parked_a.drain_into(&b);
    // The successor drops too, before re-sending anything.
    let parked_b = b.park(BUDGET).unwrap();
    assert_eq!(
        parked_b.summary(),
        ParkSummary {
            in_flight: 1,
            answered_during_gap: 1,
            events_buffered: 0,
            buffer_overflowed: false
        }
    );
    answer(&mut fake, &sent2, json!({"targetId": "T2"})).await;
    expect_detach(&mut fake, "REAL-ROOT-A").await;
    let (c, _) = attach(&conn, &mut fake, "c", "REAL-ROOT-C").await;
    parked_b.drain_into(&c);
    expect_detach(&mut fake, "REAL-ROOT-B").await;
    assert_eq!(c.from_agent(second), None);
    assert_eq!(
        next_json(&c).await,
        json!({"id": 2, "result": {"targetId": "T2"}})
    );
    assert_eq!(c.from_agent(first), None);
    assert_eq!(
        next_json(&c).await,
        json!({"id": 1, "result": {"targetId": "T1"}})
    );
    fake.assert_quiet(&conn).await;
}

#[test]
fn close_reasons_fit_a_close_frame() {
    let long = "é".repeat(100);
    let reason = close_reason(&long);
    assert!(reason.len() <= 123 && long.starts_with(&reason));
    assert!(BROWSER_CLOSE_REASON.len() <= 123);
}

/// Real Chromium through the pipe. Chromium refuses to run its sandbox as root, so as root it
/// runs as `nobody` (never with `--no-sandbox`). The pipe ends are the child's stdin and stdout,
/// moved to fds 3 and 4 by the shell before it execs Chromium, so no unsafe `pre_exec` is needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_real_chromium_through_the_router() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    const CHROMIUM: &str = "/usr/lib/chromium/chromium";
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is not installed"
    );
    let profile = tempfile::tempdir().unwrap();
    std::fs::set_permissions(profile.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let (browser_reads, conn_writes) = std::io::pipe().unwrap();
    let (conn_reads, browser_writes) = std::io::pipe().unwrap();
    let script = format!(
        "exec {CHROMIUM} --headless --remote-debugging-pipe --user-data-dir=\"$0\" --no-first-run \
         --disable-background-networking --disable-component-update --disable-sync \
         3<&0 4>&1 </dev/null >/dev/null"
    );
    let mut command = if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--init-groups", "bash"]);
        c
    } else {
        Command::new("bash")
    };
    let mut child = command
        .arg("-c")
        .arg(&script)
        .arg(profile.path())
        .env("HOME", profile.path())
        .stdin(Stdio::from(browser_reads))
        .stdout(Stdio::from(browser_writes))
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning chromium");

    let outcome = tokio::time::timeout(Duration::from_secs(90), async {
        let conn =
            BrowserConn::start(OwnedFd::from(conn_writes), OwnedFd::from(conn_reads)).unwrap();
        let version = conn
            .execute(
                chromiumoxide::cdp::browser_protocol::browser::GetVersionParams {},
                None,
            )
            .await
            .expect("Browser.getVersion");
        assert!(version.product.contains("Chrome/"), "{version:?}");

        let recorder = Arc::new(Recorder::default());
        let link = conn
            .attach_agent("smoke", recorder.clone())
            .await
            .expect("attach_agent");
        let mut next_id = 0;
        let mut request = |method: &str, session: Option<&str>, params: Value| {
            next_id += 1;
            let mut message = json!({"id": next_id, "method": method, "params": params});
            if let Some(session) = session {
                message["sessionId"] = json!(session);
            }
            link.from_agent(&message.to_string());
            next_id
        };
        // Reads frames until the answer to `id`, returning it and the events seen before it.
        async fn answer(link: &AgentLink, id: i64) -> (Value, Vec<Value>) {
            let mut events = Vec::new();
            loop {
                let frame = match next_frame(link).await {
                    ToAgent::Text(text) => serde_json::from_str::<Value>(&text).unwrap(),
                    close => panic!("unexpected {close:?}"),
                };
                if frame["id"] == id {
                    return (frame, events);
                }
                events.push(frame);
            }
        }

        let id = request(
            "Target.createBrowserContext",
            None,
            json!({"disposeOnDetach": true}),
        );
        let (context, _) = answer(&link, id).await;
        let context_id = context["result"]["browserContextId"]
            .as_str()
            .expect("browserContextId")
            .to_owned();
        let id = request(
            "Target.createTarget",
            None,
            json!({"url": "about:blank", "browserContextId": context_id}),
        );
        let (created, _) = answer(&link, id).await;
        let target_id = created["result"]["targetId"]
            .as_str()
            .expect("targetId")
            .to_owned();
        let id = request(
            "Target.attachToTarget",
            None,
            json!({"targetId": target_id, "flatten": true}),
        );
        let (attached, events) = answer(&link, id).await;
        let session = attached["result"]["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_owned();
        let announced = events
            .iter()
            .find(|e| {
                e["method"] == "Target.attachedToTarget"
                    && e["params"]["targetInfo"]["targetId"] == target_id
            })
            .expect("attachedToTarget before the attach answer");
        assert_eq!(announced["params"]["sessionId"], session);
        assert!(announced.get("sessionId").is_none());

        let id = request(
            "Runtime.evaluate",
            Some(&session),
            json!({"expression": "1+1"}),
        );
        let (evaluated, _) = answer(&link, id).await;
        assert_eq!(evaluated["result"]["result"]["value"], 2, "{evaluated}");
        assert_eq!(evaluated["sessionId"], session);

        // An id the agent never received is refused locally.
        let id = request(
            "Runtime.evaluate",
            Some("0123456789ABCDEF0123456789ABCDEF"),
            json!({"expression": "1"}),
        );
        let (unknown, _) = answer(&link, id).await;
        assert_eq!(unknown["error"]["code"], -32001);
        let targets = conn
            .call("Target.getTargets", json!({}), None)
            .await
            .unwrap();
        assert!(targets["targetInfos"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["targetId"] == target_id && t["attached"] == true));

        let id = request("Fetch.enable", None, json!({}));
        let (refused, _) = answer(&link, id).await;
        assert_eq!(refused["error"]["code"], -32000);
        assert_eq!(recorder.take().len(), 1);

        let id = request("Browser.close", None, json!({}));
        let (closed, _) = answer(&link, id).await;
        assert_eq!(closed["result"], json!({}));
        assert!(matches!(
            next_frame(&link).await,
            ToAgent::Close { code: 1000, .. }
        ));

        // The browser is still the supervisor's.
        let version = conn
            .call("Browser.getVersion", json!({}), None)
            .await
            .expect("browser survived Browser.close");
        assert!(version["product"].is_string());
        let contexts = conn
            .call("Target.getBrowserContexts", json!({}), None)
            .await
            .unwrap();
        assert!(contexts["browserContextIds"]
            .as_array()
            .unwrap()
            .contains(&json!(context_id)));

        // Detaching disposes the agent's disposeOnDetach context.
        link.detach().await.expect("detach");
        let contexts = conn
            .call("Target.getBrowserContexts", json!({}), None)
            .await
            .unwrap();
        assert!(
            !contexts["browserContextIds"]
                .as_array()
                .unwrap()
                .contains(&json!(context_id)),
            "{contexts}"
        );

        let closed = conn.clone();
        drop(conn);
        // Dropping the last clone closes the pipe: Chromium exits on end of file.
        drop(closed);
    })
    .await;

    // Give Chromium a bounded chance to exit on its own, then make sure it is gone.
    let mut exited = false;
    for _ in 0..100 {
        if child.try_wait().unwrap().is_some() {
            exited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
    }
    outcome.expect("smoke test timed out");
    assert!(
        exited,
        "chromium did not exit within 10 s of its command pipe closing"
    );
}
