fn main() {
    eprintln!("simulate: not built yet; see the simulate issue");
    std::process::exit(64);
}
