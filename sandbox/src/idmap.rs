//! uid/gid maps of the new user namespace.
//!
//! The launcher maps exactly one id: the session's inner uid (1000) to the host uid the launcher
//! runs as. A single-line map of one's own id is what the kernel allows without privilege in
//! the parent namespace, so the same code works as root (after switching to the session's
//! host ids) and unprivileged. `setgroups` must be denied before `gid_map` in that case.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use crate::error::{Cause, Error};

/// One line of `uid_map` / `gid_map`: `inside outside count`.
pub fn map_line(inside: u32, outside: u32) -> String {
    format!("{inside} {outside} 1\n")
}

/// Parses a `uid_map`/`gid_map` text into `(inside, outside, count)` triples.
pub fn parse_map(text: &str) -> Option<Vec<(u32, u32, u32)>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let mut it = line.split_whitespace().map(|n| n.parse::<u32>().ok());
            let triple = (it.next()??, it.next()??, it.next()??);
            it.next().is_none().then_some(triple)
        })
        .collect()
}

/// Translates an id seen inside to the outside id, per a parsed map.
pub fn to_outside(map: &[(u32, u32, u32)], inside: u32) -> Option<u32> {
    map.iter().find_map(|&(first_in, first_out, count)| {
        let offset = inside.checked_sub(first_in)?;
        (offset < count).then(|| first_out + offset)
    })
}

fn write_proc(path: &Path, text: &str) -> Result<(), Cause> {
    // One write(2) call: the kernel accepts a map only if it arrives in a single write.
    let mut file = OpenOptions::new().write(true).open(path)?;
    let written = file.write(text.as_bytes())?;
    if written != text.len() {
        return Err(Cause::msg(format!(
            "short write to {}: {written} of {} bytes",
            path.display(),
            text.len()
        )));
    }
    Ok(())
}

/// Writes `setgroups` = deny, then the gid and uid maps of the calling process's (new) user
/// namespace, mapping `inner` to `outer`.
pub(crate) fn write_self_maps(
    inner_uid: u32,
    outer_uid: u32,
    inner_gid: u32,
    outer_gid: u32,
) -> Result<(), Error> {
    write_proc(Path::new("/proc/self/setgroups"), "deny").map_err(Error::WriteSetgroups)?;
    write_proc(
        Path::new("/proc/self/gid_map"),
        &map_line(inner_gid, outer_gid),
    )
    .map_err(Error::WriteGidMap)?;
    write_proc(
        Path::new("/proc/self/uid_map"),
        &map_line(inner_uid, outer_uid),
    )
    .map_err(Error::WriteUidMap)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_line_is_one_extent_of_one_id() {
        assert_eq!(map_line(1000, 201000), "1000 201000 1\n");
    }

    #[test]
    fn parse_map_reads_the_kernel_format() {
        let text = "      1000     201000          1\n";
        assert_eq!(parse_map(text), Some(vec![(1000, 201000, 1)]));
        let identity = "         0          0 4294967295\n";
        assert_eq!(parse_map(identity), Some(vec![(0, 0, u32::MAX)]));
        assert_eq!(parse_map("1 2\n"), None);
        assert_eq!(parse_map("1 2 3 4\n"), None);
        assert_eq!(parse_map("a b c\n"), None);
    }

    #[test]
    fn to_outside_respects_extent_bounds() {
        let map = vec![(1000, 201000, 1), (0, 300000, 10)];
        assert_eq!(to_outside(&map, 1000), Some(201000));
        assert_eq!(to_outside(&map, 1001), None);
        assert_eq!(to_outside(&map, 9), Some(300009));
        assert_eq!(to_outside(&map, 10), None);
    }
}
