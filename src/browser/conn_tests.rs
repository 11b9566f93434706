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
