fn main() {
    std::process::exit(node::cli::main());
}
