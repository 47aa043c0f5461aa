//! The `txbox` command. See `txbox --help`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    txbox_cli::init_logging();
    let opt = <txbox_cli::Opt as clap::Parser>::parse();
    match txbox_cli::run(opt).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
