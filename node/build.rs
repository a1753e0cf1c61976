//! Links the `shoal` binary with packed relative relocations (`DT_RELR`,
//! glibc 2.36+, binutils 2.38+): the position-independent binary's
//! relocation table shrinks from about 800 KB to 10 KB, and the pages the
//! loader reads to apply it at start-up are no longer part of the node's
//! resident memory (about 2 MB less idle RSS; docs/PROXY.md, "Memory").
//! A linker or libc without it ignores the option (GNU ld warns about an
//! unknown `-z` keyword and links as before).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bin=shoal=-Wl,-z,pack-relative-relocs");
    }
}
