fn main() {
    std::process::exit(simulate::cli::main());
}
