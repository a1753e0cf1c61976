// glibc malloc was the largest single user-space cost of a node on the
// request path in `bench proxy` (see docs/PROXY.md, "Cost per request").
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(node::cli::main());
}
