//! `txbox-relay`: publishes committed outbox rows to Kafka. See
//! `txbox-relay --help` and the `txbox_relay` crate docs.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    match txbox_relay::cli::main_with_args(std::env::args_os()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("txbox-relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}
