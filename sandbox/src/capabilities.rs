//! Dropping every capability (bounding, ambient, inheritable, permitted, effective) and
//! setting `no_new_privs`, each verified after the fact.

use caps::CapSet;
use nix::errno::Errno;

use crate::error::{Cause, Error};

/// Drops every capability from every set and checks that nothing is left. The bounding set
/// is walked by number up to what the kernel knows, so capabilities newer than the `caps`
/// crate are dropped too.
pub(crate) fn drop_all() -> Result<(), Error> {
    let fail = |detail: String| Error::DropCapabilities(Cause::msg(detail));
    for cap in 0..64 {
        // SAFETY: PR_CAPBSET_READ takes a capability number and reads process state only.
        let present = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) };
        if present < 0 {
            // EINVAL: past the last capability this kernel knows.
            break;
        }
        if present == 1 {
            // SAFETY: PR_CAPBSET_DROP takes a capability number; it only lowers privilege.
            let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
            if rc != 0 {
                return Err(Error::DropCapabilities(Cause::from(Errno::last())));
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| fail(format!("ambient: {e}")))?;
    // Effective first: capset refuses an effective set larger than the permitted one.
    for set in [CapSet::Effective, CapSet::Inheritable, CapSet::Permitted] {
        caps::clear(None, set).map_err(|e| fail(format!("{set:?}: {e}")))?;
    }
    for set in [
        CapSet::Effective,
        CapSet::Permitted,
        CapSet::Inheritable,
        CapSet::Ambient,
        CapSet::Bounding,
    ] {
        let left = caps::read(None, set).map_err(|e| fail(format!("reading {set:?}: {e}")))?;
        if !left.is_empty() {
            return Err(fail(format!("{set:?} still holds {left:?}")));
        }
    }
    Ok(())
}

/// Sets `no_new_privs` so no later `execve` can gain privileges (setuid, file caps), and
/// checks it took.
pub(crate) fn set_no_new_privs() -> Result<(), Error> {
    nix::sys::prctl::set_no_new_privs().map_err(|e| Error::NoNewPrivs(e.into()))?;
    match nix::sys::prctl::get_no_new_privs() {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::NoNewPrivs(Cause::msg(
            "prctl reported success but no_new_privs reads back 0",
        ))),
        Err(e) => Err(Error::NoNewPrivs(e.into())),
    }
}
