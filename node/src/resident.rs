//! Keeping only the code a node runs resident.
//!
//! A node's resident memory is mostly the binary's own code pages, and the
//! kernel maps those in 64 KiB blocks around every page that faults
//! (fault-around), so a node soon has mapped most of the code it ever ran:
//! argument parsing, configuration, certificate loading, a peer's
//! handshake, a policy compile. Most of that does not run again.
//! [`release_clean_code`] unmaps the binary's clean, read-only file pages:
//! `MADV_DONTNEED` on a private file mapping only drops this process's
//! page-table entries; the pages stay in the page cache, and whatever runs
//! next faults its pages back in from there (a minor fault per 64 KiB). The
//! link order (`node/build.rs`, `node/hot-symbols.txt`) puts the code a
//! running node executes together at the start of `.text`, so what comes
//! back is about that code's size (1.8 MB), not the 10 MB the blocks around
//! it would span. Mappings holding a private copy of any page (relocated
//! data, a debugger's breakpoint) are left alone, since dropping a copied
//! page would lose what was written to it.
//!
//! `shoal node` and `shoal run` do this once ready, a few times in the
//! first seconds, and then every [`RELEASE_EVERY`]; `SHOAL_NO_CODE_RELEASE=1` turns it off.

use std::fs;

/// One mapping of the binary, from `/proc/self/smaps`.
#[derive(Debug, PartialEq)]
struct Mapping {
    start: usize,
    end: usize,
    perms: String,
    path: String,
    /// Pages of the mapping that are private copies (`Anonymous:`, kB);
    /// `None` if smaps did not say. (Not `Private_Dirty`: that also counts
    /// page-cache pages not yet written back, such as a just-linked
    /// binary's, which are the file's own and safe to drop.)
    anonymous_kb: Option<u64>,
}

/// Parses `/proc/PID/smaps` text into its mappings.
fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            )
        {
            let perms = fields.next().unwrap_or("").to_string();
            // offset, device, inode, then the path (which may hold spaces).
            let path = fields.skip(3).collect::<Vec<_>>().join(" ");
            out.push(Mapping {
                start,
                end,
                perms,
                path,
                anonymous_kb: None,
            });
            continue;
        }
        let Some(m) = out.last_mut() else { continue };
        let kb = || fields.clone().next().and_then(|v| v.parse::<u64>().ok());
        if first == "Anonymous:" {
            m.anonymous_kb = kb();
        }
    }
    out
}

/// The mappings of `exe` that can be dropped and faulted back unchanged:
/// private, not writable, and with no page copied.
fn releasable<'a>(maps: &'a [Mapping], exe: &str) -> impl Iterator<Item = &'a Mapping> {
    maps.iter().filter(move |m| {
        m.path == exe
            && m.perms.len() == 4
            && m.perms.starts_with('r')
            && m.perms.as_bytes()[1] == b'-'
            && m.perms.ends_with('p')
            && m.anonymous_kb == Some(0)
    })
}

#[allow(unsafe_code)]
/// Unmaps the binary's clean code and read-only data pages from this
/// process (they stay in the page cache). Returns the bytes of address
/// space released, or `None` where `/proc` is not there to say which.
pub fn release_clean_code() -> Option<usize> {
    let exe = fs::read_link("/proc/self/exe").ok()?;
    let exe = exe.to_str()?;
    let text = fs::read_to_string("/proc/self/smaps").ok()?;
    let maps = parse_smaps(&text);
    let mut released = 0;
    for m in releasable(&maps, exe) {
        // SAFETY: the range is a whole private, read-only file mapping of
        // the executable with no private (copied or written) pages, so
        // MADV_DONTNEED only drops page-table entries: every later access
        // faults the same bytes back in from the file.
        let rc = unsafe {
            libc::madvise(
                m.start as *mut libc::c_void,
                m.end - m.start,
                libc::MADV_DONTNEED,
            )
        };
        if rc == 0 {
            released += m.end - m.start;
        }
    }
    Some(released)
}

/// How often a node lets go of the code pages it mapped since the last
/// time: what it still runs faults straight back, and what ran once stops
/// counting as resident. A release costs well under a millisecond.
pub const RELEASE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The pause after the `n`th release. The first few are short: what runs
/// once runs in a node's first seconds (its first peer handshakes, the first
/// gossip rounds, a first policy compile), so a node is down to what it
/// keeps running a few seconds after start instead of after the first
/// [`RELEASE_EVERY`].
fn release_pause(n: usize) -> std::time::Duration {
    const EARLY: [u64; 3] = [1, 2, 4];
    EARLY
        .get(n)
        .map(|s| std::time::Duration::from_secs(*s))
        .unwrap_or(RELEASE_EVERY)
}

/// Releases the binary's clean pages now, again after 1, 3 and 7 s, and
/// then every [`RELEASE_EVERY`],
/// unless `SHOAL_NO_CODE_RELEASE` is set. For the long-running commands
/// (`shoal node`, `shoal run`); a library user's process is left alone.
pub fn spawn_code_release() {
    if std::env::var_os("SHOAL_NO_CODE_RELEASE").is_some() {
        return;
    }
    tokio::spawn(async {
        let mut pause = 0;
        loop {
            let released = release_clean_code();
            tracing::trace!(?released, "released clean code pages");
            tokio::time::sleep(release_pause(pause)).await;
            pause += 1;
        }
    });
}

/// Resident kB of `exe`'s mappings with permissions `perms`, from smaps.
#[cfg(test)]
fn resident_kb(exe: &str, perms: &str) -> u64 {
    let text = fs::read_to_string("/proc/self/smaps").unwrap();
    let mut total = 0;
    let mut counting = false;
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let p = f.next().unwrap_or("");
            counting = p == perms && line.ends_with(exe);
        } else if counting && first == "Rss:" {
            total += f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a0200000 r--p 00000000 fe:00 1234 /usr/bin/shoal
Size:               2048 kB
Anonymous:             0 kB
Private_Dirty:         0 kB
55d0a0200000-55d0a0c00000 r-xp 00200000 fe:00 1234 /usr/bin/shoal
Size:              10240 kB
Anonymous:             0 kB
Private_Dirty:         0 kB
55d0a0c00000-55d0a0d00000 r--p 00c00000 fe:00 1234 /usr/bin/shoal
Size:               1024 kB
Anonymous:           600 kB
Private_Dirty:       600 kB
55d0a0d00000-55d0a0d10000 rw-p 00d00000 fe:00 1234 /usr/bin/shoal
Anonymous:            64 kB
Private_Dirty:        64 kB
55d0a0e00000-55d0a0f00000 r-xp 00000000 fe:00 99 /usr/lib/libc.so.6
Anonymous:             0 kB
Private_Dirty:         0 kB
7ff000000000-7ff000100000 r-xp 00000000 fe:00 1234 /usr/bin/shoal
Anonymous:             4 kB
Private_Dirty:         4 kB
7ff000200000-7ff000300000 rw-p 00000000 00:00 0 
Anonymous:          1024 kB
";

    #[test]
    fn releases_come_early_then_settle_to_the_period() {
        let pauses: Vec<u64> = (0..6).map(|n| release_pause(n).as_secs()).collect();
        assert_eq!(pauses, vec![1, 2, 4, 10, 10, 10]);
    }

    #[test]
    fn only_the_binarys_clean_read_only_mappings_are_released() {
        let maps = parse_smaps(SMAPS);
        assert_eq!(maps.len(), 7);
        let picked: Vec<_> = releasable(&maps, "/usr/bin/shoal")
            .map(|m| (m.start, m.perms.as_str()))
            .collect();
        // The headers and read-only data, and the code; not the relocated
        // (RELRO) data, not the writable data, not libc, not a code
        // mapping holding a copied page (a breakpoint), not the heap.
        assert_eq!(
            picked,
            vec![(0x55d0a0000000, "r--p"), (0x55d0a0200000, "r-xp")]
        );
    }

    #[test]
    fn releasing_drops_this_processs_code_pages_and_it_keeps_running() {
        let exe = fs::read_link("/proc/self/exe").unwrap();
        let exe = exe.to_str().unwrap();
        let before = resident_kb(exe, "r-xp");
        let released = release_clean_code().expect("/proc is there");
        let after = resident_kb(exe, "r-xp");
        let maps = parse_smaps(&fs::read_to_string("/proc/self/smaps").unwrap());
        let mine: Vec<_> = maps.iter().filter(|m| m.path == exe).collect();
        assert!(released > 0, "nothing released of {exe}: {mine:?}");
        // Pages only come back as code runs, so without the release the
        // second reading could only be larger; with it, only what ran since
        // (reading smaps, this test, tests on other threads) is back.
        assert!(
            after < before,
            "text resident {before} kB before, {after} kB after the release"
        );
        // The code that was dropped runs again, faulted back in.
        let again = parse_smaps(&fs::read_to_string("/proc/self/smaps").unwrap());
        assert!(again.iter().any(|m| m.path == exe && m.perms == "r-xp"));
    }

    #[test]
    fn a_mapping_whose_counters_are_missing_or_unreadable_is_kept() {
        let text = "\
1000-2000 r-xp 00000000 fe:00 1 /bin/x
Anonymous:    garbage kB
Private_Dirty:         0 kB
3000-4000 r-xp 00000000 fe:00 1 /bin/x
5000-6000 r-xp 00000000 fe:00 1 /bin/x
Anonymous:             0 kB
Private_Dirty:         0 kB
";
        let maps = parse_smaps(text);
        assert_eq!(maps[0].anonymous_kb, None);
        let picked: Vec<_> = releasable(&maps, "/bin/x").map(|m| m.start).collect();
        assert_eq!(picked, vec![0x5000]);
    }
}
