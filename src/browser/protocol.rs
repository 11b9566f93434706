//! `/json/protocol`: the DevTools protocol description of the very Chromium we run.
//!
//! Chromium serves it from a brotli-compressed resource inside its `resources.pak`; over
//! `--remote-debugging-pipe` there is no way to ask for it. So the supervisor reads it from the
//! same file: version-5 pak, entries compressed with Chromium's brotli framing (two magic
//! bytes, six bytes of uncompressed size, then the brotli stream).

use std::io::Read;
use std::path::{Path, PathBuf};

/// Chromium's marker for a brotli-compressed pak entry.
const BROTLI_MAGIC: [u8; 2] = [0x1e, 0x9b];
const BROTLI_HEADER: usize = 8;

/// Why the protocol could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The pak file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The pak file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a pak this code understands.
    #[error("{0}: not a version-5 Chromium pak file")]
    Format(PathBuf),
    /// No entry holds the protocol.
    #[error("{0}: holds no DevTools protocol description")]
    Missing(PathBuf),
}

/// `resources.pak` next to the Chromium binary.
pub fn pak_for(chromium: &Path) -> PathBuf {
    chromium
        .parent()
        .unwrap_or(Path::new("/"))
        .join("resources.pak")
}

/// Finds and decompresses the protocol JSON in `pak`.
pub fn read_protocol(pak: &Path) -> Result<Vec<u8>, ProtocolError> {
    let data = std::fs::read(pak).map_err(|source| ProtocolError::Read {
        path: pak.to_path_buf(),
        source,
    })?;
    for entry in pak_entries(&data).ok_or_else(|| ProtocolError::Format(pak.to_path_buf()))? {
        if entry.len() <= BROTLI_HEADER || entry[..2] != BROTLI_MAGIC {
            continue;
        }
        let stream = &entry[BROTLI_HEADER..];
        // Look at the first bytes only; the protocol is the one entry that starts like this.
        let mut head = [0u8; 96];
        let mut rd = brotli_decompressor::Decompressor::new(stream, 4096);
        let Ok(n) = read_up_to(&mut rd, &mut head) else {
            continue;
        };
        let head = String::from_utf8_lossy(&head[..n]);
        let compact: String = head.chars().filter(|c| !c.is_whitespace()).collect();
        if !compact.starts_with("{\"version\":{\"major\":") {
            continue;
        }
        let mut out = Vec::new();
        if brotli_decompressor::Decompressor::new(stream, 4096)
            .read_to_end(&mut out)
            .is_ok()
            && serde_json::from_slice::<serde_json::Value>(&out)
                .is_ok_and(|v| v.get("domains").is_some_and(|d| d.is_array()))
        {
            return Ok(out);
        }
    }
    Err(ProtocolError::Missing(pak.to_path_buf()))
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The entries of a version-5 pak: header (version u32, encoding u8, 3 pad, resource count
/// u16, alias count u16), then (id u16, offset u32) per resource plus one end marker.
fn pak_entries(data: &[u8]) -> Option<Vec<&[u8]>> {
    let u16_at = |i: usize| Some(u16::from_le_bytes(data.get(i..i + 2)?.try_into().ok()?));
    let u32_at = |i: usize| Some(u32::from_le_bytes(data.get(i..i + 4)?.try_into().ok()?));
    if u32_at(0)? != 5 {
        return None;
    }
    let count = usize::from(u16_at(8)?);
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let at = 12 + 6 * i;
        let start = usize::try_from(u32_at(at + 2)?).ok()?;
        let end = usize::try_from(u32_at(at + 8)?).ok()?;
        out.push(data.get(start..end)?);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_not_a_pak() {
        assert!(pak_entries(b"nope").is_none());
        assert!(pak_entries(&[4, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]).is_none());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("resources.pak");
        std::fs::write(
            &p,
            [5u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 18, 0, 0, 0],
        )
        .unwrap();
        assert!(matches!(read_protocol(&p), Err(ProtocolError::Missing(_))));
    }

    #[test]
    fn the_installed_chromium_has_its_protocol() {
        let pak = pak_for(Path::new("/usr/lib/chromium/chromium"));
        let json = read_protocol(&pak).expect("the protocol of the installed Chromium");
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let domains: Vec<&str> = v["domains"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|d| d["domain"].as_str())
            .collect();
        for d in ["Target", "Page", "Runtime", "Network", "Fetch", "Browser"] {
            assert!(domains.contains(&d), "{d} missing");
        }
    }
}
