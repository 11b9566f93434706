//! What this host can provide, layer by layer, for `chaperone doctor`. The checks run in a
//! launcher process (single-threaded, so it may fork test children), the same way a launch
//! would, so the answer reflects what a launch will meet.

use nix::sched::CloneFlags;
use serde::{Deserialize, Serialize};

use crate::cgroup::{self, CgroupReport};
use crate::landlock::kernel_abi;
use crate::namespaces::{try_unshare_in_child, userns_depth, NS_LAYERS};
use crate::spec::Layer;

/// User-namespace levels Chromium's own sandbox creates below the session's.
pub const CHROMIUM_USERNS_LEVELS: u32 = 2;

/// Availability of one layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerReport {
    /// The layer.
    pub layer: Layer,
    /// Whether a launch on this host can apply it.
    pub available: bool,
    /// Why not (or a short note when it is).
    pub detail: String,
}

/// Everything `probe` found out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReport {
    /// Whether the launcher runs as root with `CAP_SETUID`/`CAP_SETGID`, i.e. can give each
    /// session its own host uid/gid.
    pub root: bool,
    /// One entry per [`Layer::ALL`].
    pub layers: Vec<LayerReport>,
    /// Landlock ABI version of the kernel (0: none).
    pub landlock_abi: i32,
    /// cgroup version, controllers and usability.
    pub cgroup: CgroupReport,
    /// How many user namespaces can be nested below the launcher (checked up to 8). A
    /// session needs 1 + [`CHROMIUM_USERNS_LEVELS`].
    pub userns_depth: u32,
    /// Set when the probe itself could not run (the launcher failed to start).
    pub error: Option<String>,
}

impl HostReport {
    /// The entry for `layer`.
    pub fn layer(&self, layer: Layer) -> Option<&LayerReport> {
        self.layers.iter().find(|l| l.layer == layer)
    }

    /// Layers this host cannot provide.
    pub fn missing(&self) -> Vec<Layer> {
        self.layers
            .iter()
            .filter(|l| !l.available)
            .map(|l| l.layer)
            .collect()
    }

    /// A report saying every layer is unknown because the probe could not run.
    pub(crate) fn failed(error: String) -> Self {
        HostReport {
            root: false,
            layers: Layer::ALL
                .iter()
                .map(|&layer| LayerReport {
                    layer,
                    available: false,
                    detail: format!("not probed: {error}"),
                })
                .collect(),
            landlock_abi: 0,
            cgroup: CgroupReport {
                version: None,
                controllers: Vec::new(),
                usable: false,
                detail: "not probed".into(),
            },
            userns_depth: 0,
            error: Some(error),
        }
    }
}

/// Whether the calling process can switch to arbitrary host ids.
pub(crate) fn can_switch_ids() -> bool {
    nix::unistd::geteuid().is_root()
        && caps::has_cap(None, caps::CapSet::Effective, caps::Capability::CAP_SETUID)
            .unwrap_or(false)
        && caps::has_cap(None, caps::CapSet::Effective, caps::Capability::CAP_SETGID)
            .unwrap_or(false)
}

/// Runs the checks in the current (single-threaded launcher) process.
pub(crate) fn local() -> HostReport {
    let root = can_switch_ids();
    let landlock_abi = kernel_abi();
    let cgroup = cgroup::report();
    let depth = userns_depth(8).unwrap_or(0);
    let mut layers = Vec::new();
    for (layer, flag) in NS_LAYERS {
        let extra = if layer == Layer::UserNs {
            CloneFlags::empty()
        } else {
            flag
        };
        let (available, detail) = match try_unshare_in_child(extra) {
            Ok(()) => (true, String::new()),
            Err(errno) => (false, format!("unshare(user_ns|{layer}) failed: {errno}")),
        };
        layers.push(LayerReport {
            layer,
            available,
            detail,
        });
    }
    if let Some(user) = layers.iter_mut().find(|l| l.layer == Layer::UserNs) {
        if user.available && depth < 1 + CHROMIUM_USERNS_LEVELS {
            user.available = false;
            user.detail = format!(
                "only {depth} nested user namespaces possible; Chromium's sandbox needs {}",
                1 + CHROMIUM_USERNS_LEVELS
            );
        }
    }
    layers.push(LayerReport {
        layer: Layer::Landlock,
        available: landlock_abi >= 1,
        detail: if landlock_abi >= 1 {
            format!("ABI {landlock_abi}")
        } else {
            "the kernel has no Landlock (or it is not in the lsm= list)".into()
        },
    });
    layers.push(LayerReport {
        layer: Layer::Cgroup,
        available: cgroup.usable,
        detail: cgroup.detail.clone(),
    });
    layers.push(LayerReport {
        layer: Layer::PerSessionUid,
        available: root,
        detail: if root {
            String::new()
        } else {
            "the launcher is not root: every session shares the supervisor's uid".into()
        },
    });
    HostReport {
        root,
        layers,
        landlock_abi,
        cgroup,
        userns_depth: depth,
        error: None,
    }
}

impl std::fmt::Display for HostReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(e) = &self.error {
            writeln!(f, "probe failed: {e}")?;
        }
        writeln!(
            f,
            "launcher: {}",
            if self.root {
                "root (each session gets its own host uid)"
            } else {
                "not root (sessions share this user's uid)"
            }
        )?;
        writeln!(f, "landlock ABI: {}", self.landlock_abi)?;
        writeln!(
            f,
            "user namespace nesting available: {} (a session needs {})",
            self.userns_depth,
            1 + CHROMIUM_USERNS_LEVELS
        )?;
        writeln!(f, "cgroup: {}", self.cgroup.detail)?;
        for l in &self.layers {
            let mark = if l.available { "ok     " } else { "MISSING" };
            writeln!(f, "  {mark} {:<16} {}", l.layer.name(), l.detail)?;
        }
        Ok(())
    }
}
