//! Per-session cgroups with memory and pids limits, on cgroup v1 (one hierarchy per
//! controller under `/sys/fs/cgroup/<controller>`) or v2 (unified at `/sys/fs/cgroup`).
//!
//! The launcher creates `<hierarchy>/chaperone/<session>` and moves itself in while it is still
//! root, before anything of the session exists, so every later process is inside. The caller
//! removes the directories after the session is gone ([`cleanup_cgroups`]).

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC, CGROUP_SUPER_MAGIC};
use nix::unistd::{access, AccessFlags};
use serde::{Deserialize, Serialize};

use crate::error::{Cause, Error};
use crate::spec::Limits;

pub(crate) const ROOT: &str = "/sys/fs/cgroup";
/// Directory grouping all sessions inside each hierarchy.
const PARENT: &str = "chaperone";

/// Which cgroup interface the host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupVersion {
    /// One hierarchy per controller.
    V1,
    /// The unified hierarchy.
    V2,
}

/// What `probe` found about cgroups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupReport {
    /// `None` when no usable hierarchy is mounted at `/sys/fs/cgroup`.
    pub version: Option<CgroupVersion>,
    /// Controllers available (v1: mounted hierarchies; v2: `cgroup.controllers`).
    pub controllers: Vec<String>,
    /// Whether the memory and pids hierarchies are there and writable by the launcher.
    pub usable: bool,
    /// Why not, when `usable` is false.
    pub detail: String,
}

fn is_fs(path: &Path, magic: nix::sys::statfs::FsType) -> bool {
    statfs(path)
        .map(|s| s.filesystem_type() == magic)
        .unwrap_or(false)
}

/// The cgroup version mounted at `/sys/fs/cgroup`, if any.
pub(crate) fn version() -> Option<CgroupVersion> {
    let root = Path::new(ROOT);
    if is_fs(root, CGROUP2_SUPER_MAGIC) {
        Some(CgroupVersion::V2)
    } else if is_fs(&root.join("memory"), CGROUP_SUPER_MAGIC)
        || is_fs(&root.join("pids"), CGROUP_SUPER_MAGIC)
    {
        Some(CgroupVersion::V1)
    } else {
        None
    }
}

/// Controllers named in a v2 `cgroup.controllers` text.
pub fn parse_controllers(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_string).collect()
}

/// Inspects the host's cgroups without changing anything.
pub(crate) fn report() -> CgroupReport {
    let root = Path::new(ROOT);
    match version() {
        None => CgroupReport {
            version: None,
            controllers: Vec::new(),
            usable: false,
            detail: format!("no cgroup v1 memory/pids or cgroup v2 hierarchy at {ROOT}"),
        },
        Some(CgroupVersion::V2) => {
            let controllers = fs::read_to_string(root.join("cgroup.controllers"))
                .map(|t| parse_controllers(&t))
                .unwrap_or_default();
            let missing: Vec<&str> = ["memory", "pids"]
                .into_iter()
                .filter(|c| !controllers.iter().any(|have| have == c))
                .collect();
            let writable = access(root, AccessFlags::W_OK).is_ok();
            let detail = if !missing.is_empty() {
                format!("controllers {missing:?} not offered by {ROOT}")
            } else if !writable {
                format!("{ROOT} is not writable (run as root or delegate a subtree)")
            } else {
                String::new()
            };
            CgroupReport {
                version: Some(CgroupVersion::V2),
                controllers,
                usable: detail.is_empty(),
                detail,
            }
        }
        Some(CgroupVersion::V1) => {
            let mut controllers: Vec<String> = fs::read_dir(root)
                .map(|dir| {
                    dir.filter_map(|e| e.ok())
                        .filter(|e| is_fs(&e.path(), CGROUP_SUPER_MAGIC))
                        .filter_map(|e| e.file_name().to_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            controllers.sort();
            let mut problems = Vec::new();
            for needed in ["memory", "pids"] {
                let dir = root.join(needed);
                if !controllers.iter().any(|c| c == needed) {
                    problems.push(format!("no v1 `{needed}` hierarchy at {}", dir.display()));
                } else if access(&dir, AccessFlags::W_OK).is_err() {
                    problems.push(format!("{} is not writable (run as root)", dir.display()));
                }
            }
            CgroupReport {
                version: Some(CgroupVersion::V1),
                controllers,
                usable: problems.is_empty(),
                detail: problems.join("; "),
            }
        }
    }
}

fn create(path: &Path, created: &mut Vec<PathBuf>) -> Result<(), Error> {
    fs::create_dir(path).map_err(|e| Error::CgroupCreate {
        path: path.to_path_buf(),
        cause: if e.kind() == ErrorKind::AlreadyExists {
            Cause::msg(
                "it already exists: a session with this name is running or was not cleaned up",
            )
        } else {
            e.into()
        },
    })?;
    created.push(path.to_path_buf());
    Ok(())
}

fn ensure_dir(path: &Path) -> Result<(), Error> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::CgroupCreate {
            path: path.to_path_buf(),
            cause: e.into(),
        }),
    }
}

fn write_limit(path: PathBuf, value: &str) -> Result<(), Error> {
    fs::write(&path, value).map_err(|e| Error::CgroupLimit {
        path,
        cause: e.into(),
    })
}

fn join(dir: &Path) -> Result<(), Error> {
    let pid = std::process::id().to_string();
    fs::write(dir.join("cgroup.procs"), pid).map_err(|e| Error::CgroupJoin {
        path: dir.to_path_buf(),
        cause: e.into(),
    })
}

/// Creates the session's cgroups, writes the limits and moves the calling process in. Every
/// directory created is pushed onto `created` as soon as it exists, so a failure half-way
/// still lets the caller remove what was made.
pub(crate) fn create_and_join(
    name: &str,
    limits: &Limits,
    created: &mut Vec<PathBuf>,
) -> Result<(), Error> {
    let root = Path::new(ROOT);
    match version() {
        None => Err(Error::CgroupCreate {
            path: root.to_path_buf(),
            cause: Cause::msg("no cgroup v1 memory/pids or cgroup v2 hierarchy is mounted"),
        }),
        Some(CgroupVersion::V2) => {
            let parent = root.join(PARENT);
            ensure_dir(&parent)?;
            // Controllers must be enabled at every level above the session's cgroup.
            for dir in [root, parent.as_path()] {
                write_limit(dir.join("cgroup.subtree_control"), "+memory +pids")?;
            }
            let dir = parent.join(name);
            create(&dir, created)?;
            if let Some(bytes) = limits.memory_bytes {
                write_limit(dir.join("memory.max"), &bytes.to_string())?;
                // Swap would let the session exceed its memory limit on disk.
                if dir.join("memory.swap.max").exists() {
                    write_limit(dir.join("memory.swap.max"), "0")?;
                }
            }
            if let Some(pids) = limits.pids {
                write_limit(dir.join("pids.max"), &pids.to_string())?;
            }
            join(&dir)
        }
        Some(CgroupVersion::V1) => {
            let plan: [(&str, Option<(&str, u64)>); 2] = [
                (
                    "memory",
                    limits.memory_bytes.map(|b| ("memory.limit_in_bytes", b)),
                ),
                ("pids", limits.pids.map(|p| ("pids.max", p))),
            ];
            for (controller, limit) in plan {
                let hierarchy = root.join(controller);
                if !is_fs(&hierarchy, CGROUP_SUPER_MAGIC) {
                    return Err(Error::CgroupCreate {
                        path: hierarchy,
                        cause: Cause::msg("this cgroup v1 controller is not mounted"),
                    });
                }
                let parent = hierarchy.join(PARENT);
                ensure_dir(&parent)?;
                let dir = parent.join(name);
                create(&dir, created)?;
                if let Some((file, value)) = limit {
                    write_limit(dir.join(file), &value.to_string())?;
                    // With swap accounting, memory+swap gets the same limit: no swap at all,
                    // as memory.swap.max = 0 on v2.
                    let memsw = dir.join("memory.memsw.limit_in_bytes");
                    if controller == "memory" && memsw.exists() {
                        write_limit(memsw, &value.to_string())?;
                    }
                }
                join(&dir)?;
            }
            Ok(())
        }
    }
}

/// Host pids listed in a `cgroup.procs` text.
pub fn parse_procs(text: &str) -> Vec<i32> {
    text.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Removes the session's cgroup directories. A directory that is already gone is fine; one
/// that still holds processes is reported with their pids (kill the session and wait for
/// [`crate::processes_in`] to be empty first).
pub fn cleanup_cgroups(paths: &[PathBuf]) -> Result<(), Error> {
    for path in paths {
        match fs::remove_dir(path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                let pids = fs::read_to_string(path.join("cgroup.procs"))
                    .map(|t| parse_procs(&t))
                    .unwrap_or_default();
                return Err(Error::CgroupBusy {
                    path: path.clone(),
                    pids,
                });
            }
            Err(e) => {
                return Err(Error::CgroupRemove {
                    path: path.clone(),
                    cause: e.into(),
                })
            }
        }
    }
    Ok(())
}

/// Removes session cgroups that a supervisor killed with SIGKILL could not remove: empty
/// directories under `chaperone/` older than `min_age`. The age keeps a sweep from racing a
/// launch that has created its cgroup but not joined it yet; a cgroup with processes is never
/// removed (the kernel refuses). Returns the directories removed.
pub fn sweep_stale_cgroups(min_age: std::time::Duration) -> Vec<PathBuf> {
    let root = Path::new(ROOT);
    let parents: Vec<PathBuf> = match version() {
        Some(CgroupVersion::V2) => vec![root.join(PARENT)],
        Some(CgroupVersion::V1) => ["memory", "pids"]
            .iter()
            .map(|c| root.join(c).join(PARENT))
            .collect(),
        None => Vec::new(),
    };
    let mut removed = Vec::new();
    for parent in parents {
        let Ok(entries) = fs::read_dir(&parent) else {
            continue;
        };
        for e in entries.flatten() {
            let dir = e.path();
            let is_session = e.file_type().is_ok_and(|t| t.is_dir())
                && e.file_name().to_string_lossy().starts_with("chaperone-");
            let old_enough = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= min_age);
            let empty = fs::read_to_string(dir.join("cgroup.procs"))
                .is_ok_and(|t| parse_procs(&t).is_empty());
            if is_session && old_enough && empty && fs::remove_dir(&dir).is_ok() {
                removed.push(dir);
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controllers_and_procs_parse() {
        assert_eq!(
            parse_controllers("cpuset cpu io memory hugetlb pids rdma misc\n"),
            vec!["cpuset", "cpu", "io", "memory", "hugetlb", "pids", "rdma", "misc"]
        );
        assert_eq!(parse_procs("12\n345\n\n"), vec![12, 345]);
        assert!(parse_procs("").is_empty());
    }

    #[test]
    fn cleanup_of_missing_cgroups_succeeds() {
        cleanup_cgroups(&[PathBuf::from(
            "/sys/fs/cgroup/pids/chaperone/does-not-exist",
        )])
        .unwrap();
    }
}
