//! The `txbox-relay` command line, built with the relay's crash points, for
//! the crash tests of this package (a binary of another package is not
//! available to them). Same arguments and environment as `txbox-relay`;
//! the harness sets `FAILPOINTS` and SIGKILLs it at one.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    match txbox_relay::cli::main_with_args(std::env::args_os()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay-chaos: {e:#}");
            ExitCode::FAILURE
        }
    }
}
