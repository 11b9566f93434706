//! Resource limits of the sandboxed program. No core dumps (they would write browser memory,
//! cookies included, to disk) and a bounded descriptor table. Memory is limited by the cgroup,
//! never by `RLIMIT_AS`: V8 reserves large virtual ranges and crashes under it.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

use crate::error::Error;

/// The `RLIMIT_NOFILE` value to set: the request, but never above the current hard limit
/// (raising it needs `CAP_SYS_RESOURCE` in the host namespace, which the launcher lacks).
pub fn nofile_limit(requested: u64, current_hard: u64) -> u64 {
    requested.min(current_hard)
}

fn set(resource: Resource, name: &str, value: u64) -> Result<(), Error> {
    setrlimit(resource, value, value).map_err(|e| Error::Rlimit {
        resource: name.to_string(),
        cause: e.into(),
    })
}

/// Applies `RLIMIT_CORE` = 0 and `RLIMIT_NOFILE` (soft = hard).
pub(crate) fn apply(nofile: u64) -> Result<(), Error> {
    set(Resource::RLIMIT_CORE, "RLIMIT_CORE", 0)?;
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| Error::Rlimit {
        resource: "RLIMIT_NOFILE".into(),
        cause: e.into(),
    })?;
    set(
        Resource::RLIMIT_NOFILE,
        "RLIMIT_NOFILE",
        nofile_limit(nofile, hard),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nofile_never_exceeds_the_hard_limit() {
        assert_eq!(nofile_limit(8192, 20000), 8192);
        assert_eq!(nofile_limit(65536, 20000), 20000);
        assert_eq!(nofile_limit(1024, u64::MAX), 1024);
    }
}
