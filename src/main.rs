use clap::Parser;

fn main() {
    let cli = steerling::cli::Cli::parse();
    steerling::cli::init_logging();
    if let Err(e) = steerling::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
