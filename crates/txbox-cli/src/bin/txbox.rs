//! The `txbox` command. See `txbox --help`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let opt = <txbox_cli::Opt as clap::Parser>::parse();
    txbox_cli::init_logging(opt.log_format);
    match txbox_cli::run(opt).await {
        Ok(outcome) => outcome.exit_code(),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
