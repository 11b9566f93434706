//! Landlock: a second, independent limit on what the program may touch, below the mount tree.
//! Even a path that is visible inside the new root is denied unless a rule grants it.
//!
//! Rules derived from the spec: read + execute under every `ro_binds` entry; read of the spec's
//! files (and listing their directories); full read-write (no execute, no device creation) in
//! the profile, `extra_writable`, `/tmp` and `/dev/shm`; read and write in `/proc` (Chromium
//! writes its own `uid_map` when it nests namespaces); the `/dev` nodes. Where the kernel
//! offers them, TCP binding is denied and TCP connections are allowed only to the proxy port,
//! and signals and abstract sockets cannot reach outside the sandbox.

use std::path::{Path, PathBuf};

use ::landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath, PathFd,
    Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use crate::error::{Cause, Error};
use crate::spec::Spec;

/// The newest ABI whose rights were checked against Chromium: handling rights of a newer ABI
/// could deny something Chromium needs.
const FS_ABI: ABI = ABI::V6;

/// The Landlock ABI the running kernel offers (0 when Landlock is missing or disabled).
pub fn kernel_abi() -> i32 {
    // SAFETY: with a null attribute, size 0 and LANDLOCK_CREATE_RULESET_VERSION the syscall
    // only returns the ABI version (or -1); it reads no memory.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    if v < 0 {
        0
    } else {
        i32::try_from(v).unwrap_or(i32::MAX)
    }
}

/// Access granted to one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grant {
    pub path: PathBuf,
    pub access: BitFlags<AccessFs>,
}

fn read_exec() -> BitFlags<AccessFs> {
    AccessFs::from_read(FS_ABI)
}

fn read_write() -> BitFlags<AccessFs> {
    AccessFs::from_all(FS_ABI) & !(AccessFs::Execute | AccessFs::MakeChar | AccessFs::MakeBlock)
}

/// The filesystem grants for `spec`, in the order they are added.
pub(crate) fn grants(spec: &Spec) -> Vec<Grant> {
    let mut out = Vec::new();
    let mut grant = |path: &Path, access: BitFlags<AccessFs>| {
        out.push(Grant {
            path: path.to_path_buf(),
            access,
        })
    };
    for path in &spec.ro_binds {
        grant(path, read_exec());
    }
    let writable: Vec<&Path> = [Path::new("/tmp"), Path::new("/dev/shm"), &spec.profile_dir]
        .into_iter()
        .chain(spec.extra_writable.iter().map(PathBuf::as_path))
        .collect();
    for path in &writable {
        grant(path, read_write());
    }
    for file in &spec.files {
        if writable.iter().any(|w| file.path.starts_with(w)) {
            continue;
        }
        grant(&file.path, AccessFs::ReadFile.into());
        if let Some(parent) = file.path.parent() {
            grant(parent, AccessFs::ReadFile | AccessFs::ReadDir);
        }
    }
    grant(
        Path::new("/proc"),
        AccessFs::ReadFile | AccessFs::ReadDir | AccessFs::WriteFile,
    );
    for dev in ["/dev/null", "/dev/full"] {
        grant(
            Path::new(dev),
            AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate,
        );
    }
    for dev in ["/dev/zero", "/dev/random", "/dev/urandom"] {
        grant(Path::new(dev), AccessFs::ReadFile.into());
    }
    out
}

fn ruleset_err(path: Option<&Path>, e: impl std::fmt::Display) -> Error {
    Error::LandlockRuleset {
        path: path.map(Path::to_path_buf),
        cause: Cause::msg(e.to_string()),
    }
}

/// Restricts the calling process (and everything it executes) to `spec`'s grants. Runs inside
/// the new root, after `no_new_privs`. Fails if the kernel enforces nothing.
pub(crate) fn restrict(spec: &Spec) -> Result<(), Error> {
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(FS_ABI))
        .map_err(|e| ruleset_err(None, e))?
        .handle_access(AccessNet::from_all(ABI::V4))
        .map_err(|e| ruleset_err(None, e))?
        .scope(Scope::from_all(ABI::V6))
        .map_err(|e| ruleset_err(None, e))?
        .create()
        .map_err(|e| ruleset_err(None, e))?;
    for grant in grants(spec) {
        let fd = PathFd::new(&grant.path).map_err(|e| ruleset_err(Some(&grant.path), e))?;
        let is_dir = std::fs::metadata(&grant.path)
            .map(|m| m.is_dir())
            .map_err(|e| ruleset_err(Some(&grant.path), e))?;
        // Rights that only make sense on directories are refused on files.
        let access = if is_dir {
            grant.access
        } else {
            grant.access & AccessFs::from_file(FS_ABI)
        };
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| ruleset_err(Some(&grant.path), e))?;
    }
    if spec.proxy_port != 0 {
        ruleset = ruleset
            .add_rule(NetPort::new(spec.proxy_port, AccessNet::ConnectTcp))
            .map_err(|e| ruleset_err(None, e))?;
    }
    let status = ruleset
        .restrict_self()
        .map_err(|e| Error::LandlockRestrict(Cause::msg(e.to_string())))?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err(Error::LandlockRestrict(Cause::msg(
            "the kernel accepted the ruleset but enforces none of it",
        )));
    }
    if !status.no_new_privs {
        return Err(Error::LandlockRestrict(Cause::msg(
            "no_new_privs is not set after restrict_self",
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::FileSpec;

    fn grant_for<'a>(grants: &'a [Grant], path: &str) -> Option<&'a Grant> {
        grants.iter().find(|g| g.path == Path::new(path))
    }

    #[test]
    fn system_binds_are_read_and_execute_only() {
        let mut spec = Spec::new("s", "/usr/bin/true");
        spec.ro_binds = vec!["/usr".into()];
        let grants = grants(&spec);
        let usr = grant_for(&grants, "/usr").unwrap();
        assert!(usr.access.contains(AccessFs::Execute | AccessFs::ReadFile));
        assert!(!usr.access.intersects(AccessFs::from_write(FS_ABI)));
    }

    #[test]
    fn writable_dirs_cannot_execute_or_make_devices() {
        let mut spec = Spec::new("s", "/usr/bin/true");
        spec.extra_writable = vec!["/downloads".into()];
        let grants = grants(&spec);
        for path in ["/profile", "/tmp", "/dev/shm", "/downloads"] {
            let g = grant_for(&grants, path).unwrap();
            assert!(
                g.access.contains(AccessFs::WriteFile | AccessFs::MakeReg),
                "{path}"
            );
            assert!(
                !g.access
                    .intersects(AccessFs::Execute | AccessFs::MakeChar | AccessFs::MakeBlock),
                "{path}"
            );
        }
    }

    #[test]
    fn spec_files_outside_writable_dirs_are_read_only() {
        let mut spec = Spec::new("s", "/usr/bin/true");
        spec.files = vec![
            FileSpec {
                path: "/etc/chromium/policies/managed/p.json".into(),
                contents: b"{}".to_vec(),
                mode: 0o644,
            },
            FileSpec {
                path: "/profile/Default/Preferences".into(),
                contents: b"{}".to_vec(),
                mode: 0o600,
            },
        ];
        let grants = grants(&spec);
        let policy = grant_for(&grants, "/etc/chromium/policies/managed/p.json").unwrap();
        assert_eq!(policy.access, BitFlags::from(AccessFs::ReadFile));
        assert!(grant_for(&grants, "/etc/chromium/policies/managed").is_some());
        assert!(grant_for(&grants, "/profile/Default/Preferences").is_none());
    }

    #[test]
    fn proc_is_writable_but_root_is_not_granted() {
        let grants = grants(&Spec::new("s", "/usr/bin/true"));
        assert!(grant_for(&grants, "/proc")
            .unwrap()
            .access
            .contains(AccessFs::WriteFile));
        assert!(grant_for(&grants, "/").is_none());
        assert!(grant_for(&grants, "/dev").is_none());
    }
}
