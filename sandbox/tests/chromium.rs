//! Integration tests against the real kernel and the real Chromium. `harness = false`: the
//! test binary doubles as the sandbox launcher, so `main` must call
//! `run_launcher_if_requested()` before anything else.
//!
//! Run as root (per-session host uids and cgroups need it):
//! `cargo test -p chaperone-sandbox --test chromium [-- FILTER]`.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chaperone_sandbox::posture::{
    cmdline_of, interfaces_of, namespaces_of, status_of, tcp_listeners_of,
};
use chaperone_sandbox::{
    cleanup_cgroups, default_ro_binds, launch, probe, processes_in, run_launcher_if_requested,
    Error, FileSpec, Launched, Layer, Limits, Spec,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/lib/chromium/chromium";
/// Hang guard for anything that waits on the browser.
const PATIENCE: Duration = Duration::from_secs(30);

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), rand_suffix())
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish() % 1_000_000
}

/// A spec for a small program, with the host ids a root test run gives each session.
fn base_spec(name: &str, program: &str, host_uid: u32) -> Spec {
    let mut spec = Spec::new(name, program);
    spec.ro_binds = default_ro_binds();
    spec.env = vec![
        ("PATH".into(), "/usr/bin:/bin".into()),
        ("HOME".into(), "/profile".into()),
        ("TMPDIR".into(), "/profile".into()),
    ];
    spec.limits = Limits {
        memory_bytes: Some(2 << 30),
        pids: Some(2048),
        nofile: 4096,
    };
    if is_root() {
        spec.host_ids = Some((host_uid, host_uid));
    } else {
        spec.accept_degraded = vec![Layer::PerSessionUid, Layer::Cgroup];
    }
    spec
}

/// Reads everything the program writes to its fd 4, bounded by `PATIENCE`.
fn read_all(fd: &OwnedFd) -> String {
    let deadline = Instant::now() + PATIENCE;
    let mut out = Vec::new();
    let mut file = File::from(fd.try_clone().unwrap());
    loop {
        assert!(
            Instant::now() < deadline,
            "program output did not end: {out:?}"
        );
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(1000u16)).unwrap() == 0 {
            continue;
        }
        let mut buf = [0u8; 4096];
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            return String::from_utf8_lossy(&out).into_owned();
        }
        out.extend_from_slice(&buf[..n]);
    }
}

fn wait_gone(launched: &Launched) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = processes_in(&launched.ns);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes survived the kill: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = Instant::now() + PATIENCE;
    while launched.reap().unwrap().is_none() {
        assert!(Instant::now() < deadline, "launcher was not reaped");
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        match cleanup_cgroups(&launched.cgroups) {
            Ok(()) => break,
            Err(Error::CgroupBusy { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("cgroup cleanup: {e}"),
        }
    }
    for path in &launched.cgroups {
        assert!(!path.exists(), "{} still exists", path.display());
    }
}

// ---------------------------------------------------------------------------------------------
// A small program: what the sandbox looks like from inside.

fn sandboxed_shell_sees_only_what_it_was_given() {
    let secret_dir = PathBuf::from(format!("/var/tmp/chaperone-secret-{}", std::process::id()));
    std::fs::create_dir_all(&secret_dir).unwrap();
    let secret = secret_dir.join("secret.txt");
    std::fs::write(&secret, "do not read").unwrap();

    let script = format!(
        r#"
say() {{ echo "$*" >&4; }}
say "uid=$(id -u) gid=$(id -g)"
say "hostname=$(cat /proc/sys/kernel/hostname)"
if cat /etc/shadow >/dev/null 2>&1; then say shadow=readable; else say shadow=denied; fi
if cat {secret} >/dev/null 2>&1; then say secret=readable; else say secret=denied; fi
if ls / >/dev/null 2>&1; then say rootdir=listable; else say rootdir=denied; fi
if ls /usr/bin >/dev/null 2>&1; then say usr=listable; else say usr=denied; fi
if (echo x > /usr/chaperone-probe) 2>/dev/null; then say usr=writable; else say usr=readonly; fi
if (echo x > /etc/chaperone/new) 2>/dev/null; then say etc=writable; else say etc=readonly; fi
if (echo kept > /profile/f) 2>/dev/null && [ "$(cat /profile/f)" = kept ]; then say profile=writable; else say profile=broken; fi
if (echo x > /tmp/t) 2>/dev/null; then say tmp=writable; else say tmp=broken; fi
if (cp /usr/bin/true /tmp/t2 && /tmp/t2) 2>/dev/null; then say tmpexec=allowed; else say tmpexec=denied; fi
say "file=$(cat /etc/chaperone/hello.txt)"
say "core=$(ulimit -c) nofile=$(ulimit -n)"
grep -E '^(CapEff|CapBnd|CapPrm|NoNewPrivs)' /proc/self/status | tr -d '\t' | while read l; do say "$l"; done
say "ifaces=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ',')"
say "shm=$(stat -f -c %T /dev/shm) root=$(stat -f -c %T /) profilefs=$(stat -f -c %T /profile)"
exit 7
"#,
        secret = secret.display()
    );
    let name = unique("shell");
    let mut spec = base_spec(&name, "/usr/bin/sh", 201100);
    spec.args = vec!["-c".into(), script];
    spec.limits.nofile = 1024;
    spec.files = vec![FileSpec {
        path: "/etc/chaperone/hello.txt".into(),
        contents: b"hello".to_vec(),
        mode: 0o644,
    }];
    let launched = launch(&spec).unwrap();
    let out = read_all(&launched.cdp_from_browser);
    let lines: Vec<&str> = out.lines().collect();
    let has = |line: &str| assert!(lines.contains(&line), "missing {line:?} in:\n{out}");
    has("uid=1000 gid=1000");
    has(&format!("hostname={name}"));
    has("shadow=denied");
    has("secret=denied");
    has("rootdir=denied");
    has("usr=listable");
    has("usr=readonly");
    has("etc=readonly");
    has("profile=writable");
    has("tmp=writable");
    has("tmpexec=denied");
    has("file=hello");
    has("core=0 nofile=1024");
    has("CapEff:0000000000000000");
    has("CapPrm:0000000000000000");
    has("CapBnd:0000000000000000");
    has("NoNewPrivs:1");
    has("ifaces=lo,");
    has("shm=tmpfs root=tmpfs profilefs=tmpfs");

    let deadline = Instant::now() + PATIENCE;
    let code = loop {
        if let Some(code) = launched.reap().unwrap() {
            break code;
        }
        assert!(Instant::now() < deadline, "launcher did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        code, 7,
        "the program's exit code travels out through init and launcher"
    );
    wait_gone(&launched);
    std::fs::remove_dir_all(&secret_dir).unwrap();
}

fn failing_steps_are_named_and_leave_nothing_behind() {
    let name = unique("fail-exec");
    let spec = base_spec(&name, "/usr/bin/does-not-exist", 201101);
    match launch(&spec) {
        Err(Error::Exec { program, .. }) => {
            assert_eq!(program, Path::new("/usr/bin/does-not-exist"))
        }
        other => panic!("expected Exec error, got {other:?}"),
    }
    if is_root() {
        for controller in ["memory", "pids"] {
            let dir = Path::new("/sys/fs/cgroup")
                .join(controller)
                .join("chaperone")
                .join(&name);
            assert!(!dir.exists(), "{} left behind", dir.display());
        }
    }

    let mut spec = base_spec(&unique("fail-bind"), "/usr/bin/true", 201101);
    spec.ro_binds.push("/nonexistent-chaperone-path".into());
    match launch(&spec) {
        Err(Error::BindMount { path, .. }) => {
            assert_eq!(path, Path::new("/nonexistent-chaperone-path"))
        }
        other => panic!("expected BindMount error, got {other:?}"),
    }

    // Not accepting a missing per-session uid is refused before anything runs.
    let mut spec = base_spec(&unique("fail-uid"), "/usr/bin/true", 201101);
    spec.host_ids = None;
    spec.accept_degraded.retain(|l| *l == Layer::Cgroup);
    match launch(&spec) {
        Err(Error::LayerUnavailable { layer, .. }) => assert_eq!(layer, Layer::PerSessionUid),
        other => panic!("expected LayerUnavailable(per_session_uid), got {other:?}"),
    }
}

/// What a supervisor killed with SIGKILL leaves: empty session cgroups. The next one sweeps
/// them, and never one that still holds a process.
fn stale_cgroups_are_swept() {
    let parent = Path::new("/sys/fs/cgroup/pids/chaperone");
    if !nix::unistd::geteuid().is_root() || !Path::new("/sys/fs/cgroup/pids/cgroup.procs").exists()
    {
        println!("    (needs root and cgroup v1 pids; not applicable here)");
        return;
    }
    std::fs::create_dir_all(parent).unwrap();
    let stale = parent.join(unique("chaperone-stale"));
    let busy = parent.join(unique("chaperone-busy"));
    std::fs::create_dir(&stale).unwrap();
    std::fs::create_dir(&busy).unwrap();
    let mut sleeper = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    std::fs::write(busy.join("cgroup.procs"), sleeper.id().to_string()).unwrap();
    let removed = chaperone_sandbox::sweep_stale_cgroups(Duration::ZERO);
    assert!(removed.contains(&stale), "{removed:?}");
    assert!(!stale.exists());
    assert!(busy.exists(), "a cgroup with a process was removed");
    // A fresh one is left alone when the sweep asks for age.
    let fresh = parent.join(unique("chaperone-fresh"));
    std::fs::create_dir(&fresh).unwrap();
    assert!(!chaperone_sandbox::sweep_stale_cgroups(Duration::from_secs(3600)).contains(&fresh));
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    for d in [&busy, &fresh] {
        for _ in 0..100 {
            if std::fs::remove_dir(d).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!d.exists(), "{}", d.display());
    }
}

fn probe_reports_every_layer() {
    let report = probe();
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.layers.len(), Layer::ALL.len());
    for layer in [
        Layer::UserNs,
        Layer::PidNs,
        Layer::NetNs,
        Layer::MountNs,
        Layer::IpcNs,
        Layer::UtsNs,
    ] {
        let l = report.layer(layer).unwrap();
        assert!(l.available, "{layer}: {}", l.detail);
    }
    assert!(report.userns_depth >= 3, "depth {}", report.userns_depth);
    assert_eq!(report.landlock_abi, chaperone_sandbox::landlock_abi());
    assert_eq!(
        report.layer(Layer::Landlock).unwrap().available,
        report.landlock_abi >= 1
    );
    assert_eq!(report.root, is_root());
    assert_eq!(
        report.layer(Layer::PerSessionUid).unwrap().available,
        is_root()
    );
    if is_root() {
        assert!(report.cgroup.usable, "{}", report.cgroup.detail);
    }
    println!("    probe: {}", serde_json::to_string(&report).unwrap());
}

// ---------------------------------------------------------------------------------------------
// Chromium.

/// A CDP client over the pipe pair, for tests only.
struct Pipe {
    to: File,
    from: OwnedFd,
    buf: Vec<u8>,
    next_id: u64,
}

impl Pipe {
    fn new(launched: &Launched) -> Self {
        Pipe {
            to: File::from(launched.cdp_to_browser.try_clone().unwrap()),
            from: launched.cdp_from_browser.try_clone().unwrap(),
            buf: Vec::new(),
            next_id: 1,
        }
    }

    fn send(&mut self, method: &str, params: Value, session: Option<&str>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).unwrap();
        id
    }

    fn next_message(&mut self, deadline: Instant) -> Value {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == 0) {
                let msg: Vec<u8> = self.buf.drain(..=pos).collect();
                return serde_json::from_slice(&msg[..msg.len() - 1]).unwrap();
            }
            assert!(Instant::now() < deadline, "no CDP message in time");
            let mut fds = [PollFd::new(self.from.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::from(500u16)).unwrap() == 0 {
                continue;
            }
            let mut chunk = [0u8; 65536];
            let n = nix::unistd::read(&self.from, &mut chunk).unwrap();
            assert!(n > 0, "browser closed the CDP pipe");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn call(&mut self, method: &str, params: Value, session: Option<&str>) -> Value {
        let id = self.send(method, params, session);
        let deadline = Instant::now() + PATIENCE;
        loop {
            let msg = self.next_message(deadline);
            if msg["id"] == json!(id) {
                assert!(msg.get("error").is_none(), "{method}: {msg}");
                return msg["result"].clone();
            }
        }
    }
}

fn chromium_spec(name: &str, host_uid: u32, proxy_port: u16) -> Spec {
    let mut spec = base_spec(name, CHROMIUM, host_uid);
    spec.proxy_port = proxy_port;
    spec.args = [
        "--headless",
        "--remote-debugging-pipe",
        "--user-data-dir=/profile",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-features=NetworkTimeServiceQuerying",
        "--component-updater=url-source=http://127.0.0.1:1",
        "--gaia-url=http://127.0.0.1:1",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--proxy-server=http://127.0.0.1:{proxy_port}")])
    .collect();
    spec.files = vec![FileSpec {
        path: "/etc/chromium/policies/managed/chaperone-test.json".into(),
        contents: br#"{"MetricsReportingEnabled": false}"#.to_vec(),
        mode: 0o644,
    }];
    spec
}

/// Accepts proxy connections until one asks for `host`, answering each with a small page.
fn serve_proxy_until(listener: &OwnedFd, host: &str) -> String {
    let proxy = std::net::TcpListener::from(listener.try_clone().unwrap());
    let deadline = Instant::now() + PATIENCE;
    loop {
        assert!(Instant::now() < deadline, "no proxy request for {host}");
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(500u16)).unwrap() == 0 {
            continue;
        }
        let mut stream = match proxy.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => panic!("accept: {e}"),
        };
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let body = "<p>proxied</p>";
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        if head.contains(host) {
            return head;
        }
    }
}

/// Posture of every process of a running Chromium session, as the kernel reports it.
fn check_posture(launched: &Launched, expected_host_uid: Option<u32>) {
    let me = namespaces_of(std::process::id() as i32).unwrap();
    let pids = processes_in(&launched.ns);
    assert!(
        pids.contains(&launched.launcher_pid) && pids.contains(&launched.init_pid),
        "{pids:?}"
    );
    let browser_side: Vec<i32> = pids
        .iter()
        .copied()
        .filter(|&p| p != launched.launcher_pid)
        .collect();
    assert!(
        browser_side.len() >= 3,
        "expected init, browser and children: {pids:?}"
    );
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    let mut nested_user_ns = 0;
    let mut checked = 0;
    let mut renderers_with_seccomp = 0;
    let session = launched
        .cgroups
        .first()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut renderers = 0;
    for &pid in &pids {
        // Chromium starts and ends helper processes all the time; one that exited between
        // the scan and this read is skipped (the counts below keep the check meaningful).
        let (Ok(ns), Ok(status), Ok(cmd), Ok(ifaces), Ok(listeners)) = (
            namespaces_of(pid),
            status_of(pid),
            cmdline_of(pid),
            interfaces_of(pid),
            tcp_listeners_of(pid),
        ) else {
            continue;
        };
        if status.uid == [0; 4] && cmd.is_empty() {
            continue; // zombie
        }
        checked += 1;
        let cmd = cmd.join(" ");
        assert_ne!(ns.user, me.user, "user ns of {pid} ({cmd})");
        assert_ne!(ns.net, me.net, "net ns of {pid} ({cmd})");
        assert_ne!(ns.mnt, me.mnt, "mnt ns of {pid} ({cmd})");
        if pid != launched.launcher_pid {
            // The launcher is the parent of the namespace init, so it sits in the host's.
            assert_ne!(ns.pid, me.pid, "pid ns of {pid} ({cmd})");
        }
        if ns.user == launched.ns.user {
            assert_eq!(status.cap_eff, 0, "CapEff of {pid} ({cmd})");
            assert_eq!(status.cap_prm, 0, "CapPrm of {pid} ({cmd})");
        } else {
            // Chromium's zygote is the init of a user namespace Chromium nested below ours and
            // keeps CAP_SYS_ADMIN there to give each renderer its own pid namespace; such
            // capabilities are worth nothing in our namespace or on the host.
            assert_eq!(
                status.cap_eff & !CAP_SYS_ADMIN,
                0,
                "CapEff of {pid} ({cmd})"
            );
            nested_user_ns += 1;
        }
        assert!(status.no_new_privs, "NoNewPrivs of {pid} ({cmd})");
        if let Some(uid) = expected_host_uid {
            assert_eq!(status.uid, [uid; 4], "host uid of {pid} ({cmd})");
        }
        assert_eq!(ifaces, vec!["lo"], "interfaces of {pid} ({cmd})");
        if ns.net == launched.ns.net {
            assert_eq!(
                listeners,
                vec![(IpAddr::V4(Ipv4Addr::LOCALHOST), launched.proxy_port)],
                "listeners in the session netns"
            );
        } else {
            assert!(
                listeners.is_empty(),
                "listeners of {pid} ({cmd}): {listeners:?}"
            );
        }
        if cmd.contains("--type=renderer") {
            renderers += 1;
            if status.seccomp == 2 {
                renderers_with_seccomp += 1;
            }
        }
        if pid != launched.launcher_pid && pid != launched.init_pid {
            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            // An exiting process leaves its cgroups early in its exit, while it still shows as
            // running (it then shows the root everywhere); it is a zombie or gone moments
            // later. Only a process that stays alive outside the session's cgroup escaped.
            let exiting = || {
                (0..100).any(|_| {
                    let ended =
                        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |st| {
                            st.rsplit(')')
                                .next()
                                .and_then(|rest| rest.trim_start().chars().next())
                                .is_some_and(|state| matches!(state, 'Z' | 'X'))
                        });
                    if !ended {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    ended
                })
            };
            if !launched.cgroups.is_empty()
                && !cgroup.is_empty()
                && !cgroup.contains(&format!("/chaperone/{session}\n"))
            {
                assert!(exiting(), "cgroup of {pid}: {cgroup}");
            }
        }
    }
    assert!(checked >= 4, "only {checked} of {pids:?} could be checked");
    assert!(renderers >= 1, "no renderer among {pids:?}");
    assert!(
        nested_user_ns >= 1,
        "Chromium's own namespace sandbox is not in use"
    );
    assert_eq!(
        renderers_with_seccomp, renderers,
        "every renderer runs under Chromium's seccomp"
    );

    // The browser's view of its own filesystem: tmpfs root and profile, nothing of the host.
    let browser = pids
        .iter()
        .copied()
        .find(|&p| {
            cmdline_of(p)
                .map(|c| {
                    c.first().map(String::as_str) == Some(CHROMIUM)
                        && !c.iter().any(|a| a.starts_with("--type="))
                })
                .unwrap_or(false)
        })
        .expect("browser process");
    let mountinfo = std::fs::read_to_string(format!("/proc/{browser}/mountinfo")).unwrap();
    let fs_of = |point: &str| {
        mountinfo.lines().rev().find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            (f.get(4) == Some(&point)).then(|| f[sep + 1].to_string())
        })
    };
    assert_eq!(fs_of("/").as_deref(), Some("tmpfs"), "{mountinfo}");
    assert_eq!(fs_of("/profile").as_deref(), Some("tmpfs"), "{mountinfo}");
    assert!(!mountinfo.contains(" /oldroot"), "{mountinfo}");
    assert!(
        !Path::new("/profile").exists(),
        "the profile must not exist on the host"
    );

    if let (Some(bytes), true) = (Some(2u64 << 30), is_root()) {
        let mem = launched
            .cgroups
            .iter()
            .find(|p| p.starts_with("/sys/fs/cgroup/memory"))
            .unwrap();
        let limit: u64 = std::fs::read_to_string(mem.join("memory.limit_in_bytes"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(limit, bytes);
        let memsw = mem.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            let with_swap: u64 = std::fs::read_to_string(memsw)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert_eq!(with_swap, bytes, "swap must not extend the memory limit");
        }
        let pids_cg = launched
            .cgroups
            .iter()
            .find(|p| p.starts_with("/sys/fs/cgroup/pids"))
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(pids_cg.join("pids.max"))
                .unwrap()
                .trim(),
            "2048"
        );
        let procs = std::fs::read_to_string(pids_cg.join("cgroup.procs")).unwrap();
        assert!(
            procs.contains(&browser.to_string()),
            "browser {browser} not in {procs}"
        );
    }
}

fn chromium_runs_fully_isolated_and_is_purged() {
    let a_uid = 201200;
    let b_uid = 201201;
    let spec_a = chromium_spec(&unique("chromium-a"), a_uid, 3128);
    let spec_b = chromium_spec(&unique("chromium-b"), b_uid, 3128);
    let a = launch(&spec_a).unwrap();
    let b = launch(&spec_b).unwrap();
    assert!(a
        .degraded
        .iter()
        .all(|l| spec_a.accept_degraded.contains(l)));
    let mut pa = Pipe::new(&a);
    let mut pb = Pipe::new(&b);

    let version = pa.call("Browser.getVersion", json!({}), None);
    assert!(
        version["product"].as_str().unwrap_or("").contains("Chrome"),
        "{version}"
    );
    pb.call("Browser.getVersion", json!({}), None);

    // A page: create, attach (flattened), evaluate.
    let target = pa.call(
        "Target.createTarget",
        json!({"url": "data:text/html,<p>hi</p>"}),
        None,
    );
    let target_id = target["targetId"].as_str().unwrap().to_string();
    let attached = pa.call(
        "Target.attachToTarget",
        json!({"targetId": target_id, "flatten": true}),
        None,
    );
    let session = attached["sessionId"].as_str().unwrap().to_string();
    let two = pa.call(
        "Runtime.evaluate",
        json!({"expression": "1+1"}),
        Some(&session),
    );
    assert_eq!(two["result"]["value"], json!(2), "{two}");

    // The browser's only way out is the listener we hold.
    pa.send(
        "Target.createTarget",
        json!({"url": "http://chaperone.test/"}),
        None,
    );
    let head = serve_proxy_until(&a.proxy_listener, "chaperone.test");
    assert!(
        head.starts_with("GET http://chaperone.test/ HTTP/1.1\r\n"),
        "{head}"
    );

    if is_root() {
        check_posture(&a, Some(a_uid));
        check_posture(&b, Some(b_uid));
    } else {
        check_posture(&a, None);
    }
    assert_ne!(a.ns, b.ns);
    let a_pids = processes_in(&a.ns);
    assert!(
        processes_in(&b.ns).iter().all(|p| !a_pids.contains(p)),
        "sessions share processes"
    );

    a.kill().unwrap();
    b.kill().unwrap();
    wait_gone(&a);
    wait_gone(&b);
}

// ---------------------------------------------------------------------------------------------
// Lifetime: the sandbox outlives the thread that launched it, and dies with the process.

fn echo_spec(name: &str, host_uid: u32) -> Spec {
    let mut spec = base_spec(name, "/usr/bin/sh", host_uid);
    // Answers one line read from fd 3 on fd 4, then waits to be killed.
    spec.args = vec![
        "-c".into(),
        "read line <&3; echo \"echo:$line\" >&4; exec sleep 1000".into(),
    ];
    spec
}

fn round_trip(launched: &Launched, text: &str) -> String {
    let mut to = File::from(launched.cdp_to_browser.try_clone().unwrap());
    writeln!(to, "{text}").unwrap();
    let mut from = Pipe::new(launched);
    let deadline = Instant::now() + PATIENCE;
    let mut line = Vec::new();
    while !line.ends_with(b"\n") {
        assert!(Instant::now() < deadline, "no answer");
        let mut fds = [PollFd::new(from.from.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(500u16)).unwrap() == 0 {
            continue;
        }
        let mut byte = [0u8; 1];
        let n = nix::unistd::read(&from.from, &mut byte).unwrap();
        assert_eq!(n, 1, "the sandbox closed its pipe: it died");
        line.push(byte[0]);
    }
    from.buf.clear();
    String::from_utf8(line).unwrap().trim_end().to_string()
}

fn sandbox_outlives_the_thread_that_launched_it() {
    // tokio's blocking pool threads exit when idle; PR_SET_PDEATHSIG follows the parent
    // *thread*, so a launcher forked from such a thread would die with it.
    let name = unique("thread");
    let spec = echo_spec(&name, 201400);
    let launched = std::thread::spawn(move || launch(&spec).unwrap())
        .join()
        .unwrap();
    // Let the thread's exit (and any parent-death signal it would trigger) complete.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !processes_in(&launched.ns).is_empty(),
        "sandbox died with the launching thread"
    );
    assert_eq!(round_trip(&launched, "ping"), "echo:ping");
    launched.kill().unwrap();
    wait_gone(&launched);
}

/// A purge check that runs while the next session starts must not mistake the new session
/// for the old one: the old one's namespace ids stay its own while its handle lives, although
/// the kernel reuses a freed namespace's id at once.
fn a_purged_sandboxs_ids_are_not_reused_while_its_handle_lives() {
    // As the supervisor does: the browser's pipes and the proxy listener (which would keep
    // the network namespace, and with it the user namespace, alive) are gone by the time the
    // purge is checked; only the handle is left.
    let launched = launch(&echo_spec(&unique("old"), 201402)).unwrap();
    // The handle holds the session's user and pid namespaces themselves, not just their ids.
    let pinned: Vec<u64> = launched
        .ns_pins
        .iter()
        .map(|fd| nix::sys::stat::fstat(fd).unwrap().st_ino)
        .collect();
    assert_eq!(pinned, [launched.ns.user, launched.ns.pid]);
    let (old, io) = launched.into_parts();
    drop(io);
    let old_ns = old.ns;
    old.kill().unwrap();
    assert!(old.wait_exit(PATIENCE), "the old launcher did not exit");
    let deadline = Instant::now() + PATIENCE;
    while !processes_in(&old_ns).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the old sandbox survived its kill"
        );
        let _ = old.reap();
        std::thread::sleep(Duration::from_millis(20));
    }
    // The kernel hands a freed namespace's id to the next namespace it creates (not always at
    // once: it frees them from deferred work); the pins make that impossible while the old
    // handle lives.
    let newer: Vec<Launched> = (0..3)
        .map(|i| launch(&echo_spec(&unique("new"), 201403 + i)).unwrap())
        .collect();
    for n in &newer {
        assert_eq!(round_trip(n, "ping"), "echo:ping");
        assert_ne!(
            n.ns.user, old_ns.user,
            "a newer sandbox got the old user namespace id"
        );
        assert_ne!(
            n.ns.pid, old_ns.pid,
            "a newer sandbox got the old pid namespace id"
        );
    }
    assert_eq!(
        processes_in(&old_ns),
        Vec::<i32>::new(),
        "the old sandbox's check saw the newer sandboxes' processes"
    );
    for n in &newer {
        n.kill().unwrap();
        wait_gone(n);
    }
    drop(old);
}

const ROLE_ENV: &str = "CHAPERONE_SANDBOX_TEST_ROLE";

/// Child role: launch a sandbox, print its namespace ids and cgroups, then wait to be killed.
fn act_as_supervisor() -> ! {
    let launched = launch(&echo_spec(&unique("orphan"), 201401)).unwrap();
    println!(
        "{}",
        json!({"ns": launched.ns, "cgroups": launched.cgroups})
    );
    std::io::stdout().flush().unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn sandbox_dies_with_its_supervisor() {
    let mut supervisor = std::process::Command::new("/proc/self/exe")
        .env(ROLE_ENV, "supervisor")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(supervisor.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let info: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    let ns: chaperone_sandbox::NsIds = serde_json::from_value(info["ns"].clone()).unwrap();
    let cgroups: Vec<PathBuf> = serde_json::from_value(info["cgroups"].clone()).unwrap();
    assert!(!processes_in(&ns).is_empty(), "the sandbox is running");
    supervisor.kill().unwrap();
    supervisor.wait().unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = processes_in(&ns);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sandbox survived its supervisor: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = Instant::now() + PATIENCE;
    while let Err(e) = cleanup_cgroups(&cgroups) {
        assert!(Instant::now() < deadline, "{e}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    run_launcher_if_requested();
    if std::env::var(ROLE_ENV).as_deref() == Ok("supervisor") {
        act_as_supervisor();
    }
    let tests: &[(&str, fn())] = &[
        ("probe_reports_every_layer", probe_reports_every_layer),
        ("stale_cgroups_are_swept", stale_cgroups_are_swept),
        (
            "sandboxed_shell_sees_only_what_it_was_given",
            sandboxed_shell_sees_only_what_it_was_given,
        ),
        (
            "failing_steps_are_named_and_leave_nothing_behind",
            failing_steps_are_named_and_leave_nothing_behind,
        ),
        (
            "sandbox_outlives_the_thread_that_launched_it",
            sandbox_outlives_the_thread_that_launched_it,
        ),
        (
            "sandbox_dies_with_its_supervisor",
            sandbox_dies_with_its_supervisor,
        ),
        (
            "chromium_runs_fully_isolated_and_is_purged",
            chromium_runs_fully_isolated_and_is_purged,
        ),
        (
            "a_purged_sandboxs_ids_are_not_reused_while_its_handle_lives",
            a_purged_sandboxs_ids_are_not_reused_while_its_handle_lives,
        ),
    ];
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mut failed = Vec::new();
    let mut ran = 0;
    for (name, test) in tests {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        println!("test {name} ...");
        let start = Instant::now();
        match std::panic::catch_unwind(test) {
            Ok(()) => println!("test {name} ... ok ({:?})", start.elapsed()),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed.push(*name);
            }
        }
    }
    // The closing line test runners and CI read.
    println!("\n{} passed, {} failed", ran - failed.len(), failed.len());
    if !failed.is_empty() {
        println!("failed: {failed:?}");
    }
    if !failed.is_empty() {
        std::process::exit(1);
    }
}
