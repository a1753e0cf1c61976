//! Link options for the `shoal` binary.
//!
//! - Packed relative relocations (`DT_RELR`, glibc 2.36+, binutils 2.38+):
//!   the position-independent binary's relocation table shrinks from about
//!   800 KB to 10 KB, and the pages the loader reads to apply it at start-up
//!   are no longer part of the node's resident memory (about 2 MB less idle
//!   RSS; docs/PROXY.md, "Resident memory"). A linker or libc without it
//!   ignores the option (GNU ld warns about an unknown `-z` keyword).
//! - The code a running node executes first and together
//!   (`hot-symbols.txt`: every function that ran in two nodes after
//!   start-up, serving requests and gossiping, most instructions first;
//!   written by `node/proxy/bench/runtime-symbols.sh` with callgrind). The
//!   node periodically unmaps its clean code pages (`src/resident.rs`), and
//!   what faults back in is then about this code's size (1.8 MB) rather
//!   than the 10 MB it would be spread over (docs/PROXY.md, "Code layout").
//!   Only where the linker is LLD, which `--symbol-ordering-file` needs:
//!   rustc 1.90+ links x86_64-unknown-linux-gnu with its own LLD unless a
//!   linker is configured. Names the build no longer has are skipped, so a
//!   stale list costs nothing but its effect. `SHOAL_NO_SYMBOL_ORDER=1`
//!   turns it off.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=hot-symbols.txt");
    println!("cargo:rerun-if-env-changed=SHOAL_NO_SYMBOL_ORDER");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bin=shoal=-Wl,-z,pack-relative-relocs");
    }
    let order =
        Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default()).join("hot-symbols.txt");
    if links_with_rust_lld()
        && order.is_file()
        && std::env::var_os("SHOAL_NO_SYMBOL_ORDER").is_none()
    {
        println!(
            "cargo:rustc-link-arg-bin=shoal=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bin=shoal=-Wl,--no-warn-symbol-ordering");
    }
}

/// Whether rustc links this target with its own LLD: x86_64 Linux GNU,
/// rustc 1.90 or later, and no linker or linker features chosen by the
/// build's configuration.
fn links_with_rust_lld() -> bool {
    if std::env::var("TARGET").as_deref() != Ok("x86_64-unknown-linux-gnu") {
        return false;
    }
    if std::env::var_os("RUSTC_LINKER").is_some() {
        return false;
    }
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if ["linker", "link-self-contained", "fuse-ld"]
        .iter()
        .any(|f| flags.contains(f))
    {
        return false;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = Command::new(rustc).arg("--version").output() else {
        return false;
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let text = String::from_utf8_lossy(&out.stdout);
    let mut version = text
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (version.next().unwrap_or(0), version.next().unwrap_or(0));
    (major, minor) >= (1, 90)
}
