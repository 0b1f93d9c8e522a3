fn main() {
    std::process::exit(cantante::cli::main());
}
