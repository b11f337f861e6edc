use std::process::ExitCode;

use clap::Parser;
use kube_prefetch::cli::{Cli, init_logging, run_command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    match run_command(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("kube-prefetch: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
