fn main() -> std::process::ExitCode {
    dmdpipe::cli::main()
}
