//! What the caller asks for: one program, the tree it sees, its limits, and which layers it
//! accepts to run without.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Everything needed to launch one sandboxed process tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Session id: names the cgroups and the hostname. `[A-Za-z0-9_.-]`, 1–64 characters.
    pub name: String,
    /// The program to execute, as seen inside the new root. Must lie under a `ro_binds` entry.
    pub program: PathBuf,
    /// Arguments after `argv[0]` (which is `program`).
    pub args: Vec<String>,
    /// The complete environment of the program; nothing is inherited.
    pub env: Vec<(String, String)>,
    /// uid inside the user namespace; must not be 0 (Chromium's own sandbox needs a non-root uid).
    pub inner_uid: u32,
    /// gid inside the user namespace.
    pub inner_gid: u32,
    /// Host (uid, gid) the session runs as. Applied only when the launcher is root; without it
    /// (or without root) the layer `per_session_uid` is missing and must be accepted as degraded.
    pub host_ids: Option<(u32, u32)>,
    /// Host paths bound read-only at the same place inside (read + execute for Landlock). A
    /// host symlink (e.g. usr-merged `/lib`) is recreated as the same symlink.
    pub ro_binds: Vec<PathBuf>,
    /// Extra symlinks (link, target) created in the new root.
    pub symlinks: Vec<(PathBuf, PathBuf)>,
    /// Files written into the new root before the program starts (e.g. managed policy,
    /// profile preferences). Files outside writable directories end up read-only; a file
    /// inside a `ro_binds` directory cannot be written at all (the bind is read-only).
    pub files: Vec<FileSpec>,
    /// Inside path of the profile: a private tmpfs, read-write, gone with the namespace.
    pub profile_dir: PathBuf,
    /// More private tmpfs directories, read-write (e.g. downloads).
    pub extra_writable: Vec<PathBuf>,
    /// Port of the TCP listener created inside the network namespace on 127.0.0.1.
    pub proxy_port: u16,
    /// Resource limits.
    pub limits: Limits,
    /// Layers the caller accepts to run without when the host cannot provide them. Only the
    /// layers whose [`Layer::degradable`] is true may appear here.
    pub accept_degraded: Vec<Layer>,
    /// Where the program's stdout and stderr go.
    #[serde(default)]
    pub output: Output,
}

/// A file to create inside the new root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Absolute path inside the sandbox; parent directories are created (0755).
    pub path: PathBuf,
    /// The bytes to write.
    pub contents: Vec<u8>,
    /// Permission bits (e.g. `0o644`).
    pub mode: u32,
}

/// Resource limits of one session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// cgroup memory limit (`memory.max` / `memory.limit_in_bytes`); tmpfs pages count too.
    pub memory_bytes: Option<u64>,
    /// cgroup task limit (`pids.max`): threads count, Chromium needs several hundred.
    pub pids: Option<u64>,
    /// `RLIMIT_NOFILE` (soft and hard), capped at the host's hard limit.
    pub nofile: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: None,
            pids: None,
            nofile: 8192,
        }
    }
}

/// Where the sandboxed program's stdout and stderr go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    /// The caller's stdout and stderr.
    #[default]
    Inherit,
    /// `/dev/null`.
    Null,
}

/// One isolation layer. `launch` fails when the host cannot provide a layer, unless the spec
/// lists it in `accept_degraded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Layer {
    /// New user namespace (required: every other layer is built on it).
    UserNs,
    /// New pid namespace (required: killing its init is how the session dies).
    PidNs,
    /// New network namespace with only `lo`. Degraded, the browser shares the host's network
    /// and the proxy listener is bound on the host's 127.0.0.1.
    NetNs,
    /// New mount namespace with `pivot_root` (required: the profile lives in it).
    MountNs,
    /// New IPC namespace.
    IpcNs,
    /// New UTS namespace (own hostname).
    UtsNs,
    /// Landlock filesystem restriction.
    Landlock,
    /// Per-session cgroup with memory and pids limits.
    Cgroup,
    /// Per-session host uid/gid (needs a root launcher and `host_ids`).
    PerSessionUid,
}

impl Layer {
    /// Every layer, in the order `probe` reports them.
    pub const ALL: [Layer; 9] = [
        Layer::UserNs,
        Layer::PidNs,
        Layer::NetNs,
        Layer::MountNs,
        Layer::IpcNs,
        Layer::UtsNs,
        Layer::Landlock,
        Layer::Cgroup,
        Layer::PerSessionUid,
    ];

    /// Whether a session can run without this layer at all. The user, pid and mount
    /// namespaces carry the others (uid mapping, kill-by-init, private root), so they cannot.
    pub fn degradable(self) -> bool {
        !matches!(self, Layer::UserNs | Layer::PidNs | Layer::MountNs)
    }

    /// The name used in errors, reports and serde.
    pub fn name(self) -> &'static str {
        match self {
            Layer::UserNs => "user_ns",
            Layer::PidNs => "pid_ns",
            Layer::NetNs => "net_ns",
            Layer::MountNs => "mount_ns",
            Layer::IpcNs => "ipc_ns",
            Layer::UtsNs => "uts_ns",
            Layer::Landlock => "landlock",
            Layer::Cgroup => "cgroup",
            Layer::PerSessionUid => "per_session_uid",
        }
    }
}

impl std::str::FromStr for Layer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Layer::ALL
            .iter()
            .copied()
            .find(|l| l.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Layer::ALL.iter().map(|l| l.name()).collect();
                format!(
                    "`{s}` is not a sandbox layer; the layers are {}",
                    names.join(", ")
                )
            })
    }
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Namespace inode numbers of a session, as seen in `/proc/PID/ns/*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NsIds {
    /// User namespace.
    pub user: u64,
    /// Pid namespace (the one the session's init is pid 1 of).
    pub pid: u64,
    /// Network namespace.
    pub net: u64,
    /// Mount namespace.
    pub mnt: u64,
}

impl Spec {
    /// A spec with safe defaults: inner uid/gid 1000, profile at `/profile`, proxy on 3128,
    /// no binds, no degraded layer accepted.
    pub fn new(name: impl Into<String>, program: impl Into<PathBuf>) -> Self {
        Spec {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            inner_uid: 1000,
            inner_gid: 1000,
            host_ids: None,
            ro_binds: Vec::new(),
            symlinks: Vec::new(),
            files: Vec::new(),
            profile_dir: PathBuf::from("/profile"),
            extra_writable: Vec::new(),
            proxy_port: 3128,
            limits: Limits::default(),
            accept_degraded: Vec::new(),
            output: Output::Inherit,
        }
    }

    /// Whether the caller accepts running without `layer`.
    pub fn accepts(&self, layer: Layer) -> bool {
        self.accept_degraded.contains(&layer)
    }

    /// Checks everything that can be checked without touching the kernel.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field: &str, reason: String| {
            Err(Error::InvalidSpec {
                field: field.to_string(),
                reason,
            })
        };
        if self.name.is_empty()
            || self.name.len() > 64
            || self.name.starts_with('.')
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return bad(
                "name",
                format!(
                    "{:?} must be 1-64 characters of [A-Za-z0-9_.-], not starting with '.'",
                    self.name
                ),
            );
        }
        if self.inner_uid == 0 {
            return bad(
                "inner_uid",
                "must not be 0: Chromium's own sandbox needs a non-root uid".into(),
            );
        }
        if let Some((uid, gid)) = self.host_ids {
            if uid == 0 || gid == 0 {
                return bad(
                    "host_ids",
                    "must not be root: pick a dedicated uid/gid range".into(),
                );
            }
        }
        check_inside_path("program", &self.program)?;
        check_inside_path("profile_dir", &self.profile_dir)?;
        if self.profile_dir == Path::new("/") {
            return bad("profile_dir", "must not be /".into());
        }
        for (i, path) in self.ro_binds.iter().enumerate() {
            check_inside_path(&format!("ro_binds[{i}]"), path)?;
            if reserved(path) {
                return bad(
                    &format!("ro_binds[{i}]"),
                    format!("{} is provided by the sandbox itself", path.display()),
                );
            }
        }
        for (i, (link, _)) in self.symlinks.iter().enumerate() {
            check_inside_path(&format!("symlinks[{i}]"), link)?;
        }
        for (i, file) in self.files.iter().enumerate() {
            check_inside_path(&format!("files[{i}].path"), &file.path)?;
            if file.mode & !0o7777 != 0 || file.mode & 0o6000 != 0 {
                return bad(
                    &format!("files[{i}].mode"),
                    format!(
                        "{:o} must be permission bits without setuid/setgid",
                        file.mode
                    ),
                );
            }
        }
        for (i, path) in self.extra_writable.iter().enumerate() {
            check_inside_path(&format!("extra_writable[{i}]"), path)?;
        }
        if self.limits.nofile < 64 {
            return bad("limits.nofile", "must be at least 64".into());
        }
        if self.limits.pids == Some(0) || self.limits.memory_bytes == Some(0) {
            return bad("limits", "a limit of 0 cannot run anything".into());
        }
        for (i, layer) in self.accept_degraded.iter().enumerate() {
            if !layer.degradable() {
                return bad(
                    &format!("accept_degraded[{i}]"),
                    format!("`{layer}` carries the other layers and cannot be degraded"),
                );
            }
        }
        for (i, (key, _)) in self.env.iter().enumerate() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return bad(
                    &format!("env[{i}]"),
                    format!("{key:?} is not a variable name"),
                );
            }
        }
        Ok(())
    }
}

/// Paths the sandbox builds itself and a bind must not shadow.
fn reserved(path: &Path) -> bool {
    ["/", "/proc", "/dev", "/tmp"]
        .iter()
        .any(|r| path == Path::new(r))
}

/// An inside path must be absolute and normal (no `..`), so it cannot climb out of the new
/// root while the launcher builds it.
fn check_inside_path(field: &str, path: &Path) -> Result<(), Error> {
    let ok = path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && !path.as_os_str().as_encoded_bytes().contains(&0);
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidSpec {
            field: field.to_string(),
            reason: format!("{} must be an absolute path without `..`", path.display()),
        })
    }
}

/// System paths a dynamically linked program usually needs, filtered to those present on this
/// host: the usr-merged tree and its compatibility links, the loader cache, fonts and their
/// cache, CA certificates and the time zone.
pub fn default_ro_binds() -> Vec<PathBuf> {
    [
        "/usr",
        "/bin",
        "/sbin",
        "/lib",
        "/lib64",
        "/lib32",
        "/libx32",
        "/etc/ld.so.cache",
        "/etc/fonts",
        "/var/cache/fontconfig",
        "/etc/ssl/certs",
        "/etc/localtime",
    ]
    .iter()
    .map(PathBuf::from)
    .filter(|p| p.symlink_metadata().is_ok())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Spec {
        Spec::new("s-1", "/usr/bin/true")
    }

    #[test]
    fn a_default_spec_is_valid() {
        valid().validate().unwrap();
    }

    #[test]
    fn names_that_could_escape_the_cgroup_directory_are_refused() {
        for name in ["", "..", "a/b", ".hidden", "x y", &"a".repeat(65)] {
            let mut spec = valid();
            spec.name = name.to_string();
            assert!(
                matches!(spec.validate(), Err(Error::InvalidSpec { ref field, .. }) if field == "name"),
                "{name:?}"
            );
        }
    }

    #[test]
    fn relative_or_climbing_paths_are_refused() {
        let mut spec = valid();
        spec.ro_binds = vec!["/usr/../etc".into()];
        assert!(
            matches!(spec.validate(), Err(Error::InvalidSpec { ref field, .. }) if field == "ro_binds[0]")
        );
        let mut spec = valid();
        spec.profile_dir = "profile".into();
        assert!(
            matches!(spec.validate(), Err(Error::InvalidSpec { ref field, .. }) if field == "profile_dir")
        );
    }

    #[test]
    fn root_inside_or_on_the_host_is_refused() {
        let mut spec = valid();
        spec.inner_uid = 0;
        assert!(spec.validate().is_err());
        let mut spec = valid();
        spec.host_ids = Some((0, 1000));
        assert!(spec.validate().is_err());
    }

    #[test]
    fn structural_layers_cannot_be_degraded() {
        let mut spec = valid();
        spec.accept_degraded = vec![Layer::Landlock, Layer::PidNs];
        assert!(
            matches!(spec.validate(), Err(Error::InvalidSpec { ref field, .. }) if field == "accept_degraded[1]")
        );
    }

    #[test]
    fn setuid_file_modes_are_refused() {
        let mut spec = valid();
        spec.files = vec![FileSpec {
            path: "/etc/x".into(),
            contents: vec![],
            mode: 0o4755,
        }];
        assert!(spec.validate().is_err());
    }

    #[test]
    fn layer_names_match_serde() {
        for layer in Layer::ALL {
            let json = serde_json::to_string(&layer).unwrap();
            assert_eq!(json, format!("\"{layer}\""));
        }
    }
}
