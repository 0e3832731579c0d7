//! The dispatcher stand-in of the tests (`tests/common/dispatcher.rs`) as a
//! process, for demos: a Zimfarm dispatcher API on 127.0.0.1 with one user.
//!
//!     cargo run --example dispatcher_standin -- --user bob --password secret \
//!         --public-key ~/.ssh/id_rsa.pub
//!
//! The first line on stdout is `DISPATCHER_URL=http://127.0.0.1:<port>/api`;
//! it serves until SIGINT or SIGTERM, then prints its counters on stderr.

#[path = "../tests/common/dispatcher.rs"]
mod dispatcher;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use dispatcher::DispatcherStandin;

/// A stand-in for the Zimfarm dispatcher's HTTP API (OAuth2 and SSH keys).
#[derive(Parser)]
struct Args {
    /// Port on 127.0.0.1 (0: a free one).
    #[arg(long, env = "STANDIN_PORT", default_value_t = 0)]
    port: u16,
    /// The user's name.
    #[arg(long, env = "STANDIN_USER")]
    user: String,
    /// The user's password.
    #[arg(long, env = "STANDIN_PASSWORD", hide_env_values = true)]
    password: String,
    /// Lifetime of access tokens, in seconds.
    #[arg(long, env = "STANDIN_EXPIRES_IN", default_value_t = dispatcher::DEFAULT_EXPIRES_IN)]
    expires_in: u64,
    /// An OpenSSH public key file (`ssh-rsa AAAA... comment`) to register
    /// for the user at start.
    #[arg(long, env = "STANDIN_PUBLIC_KEY")]
    public_key: Option<PathBuf>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let standin = DispatcherStandin::with_port(args.port);
    standin.add_user(&args.user, &args.password);
    standin.set_expires_in(args.expires_in);
    if let Some(path) = &args.public_key {
        let line = match std::fs::read_to_string(path) {
            Ok(line) => line,
            Err(e) => {
                eprintln!("cannot read --public-key {}: {e}", path.display());
                return ExitCode::from(2);
            }
        };
        let name = line
            .split_whitespace()
            .nth(2)
            .unwrap_or("registered-at-start")
            .to_owned();
        match standin.register_key(&args.user, &name, line.trim()) {
            Ok(key) => eprintln!(
                "registered {} key {:?} for {} (MD5 {})",
                key.key_type, key.name, args.user, key.fingerprint
            ),
            Err(e) => {
                eprintln!("cannot register --public-key {}: {e}", path.display());
                return ExitCode::from(2);
            }
        }
    }
    if let Err(e) = standin.try_start() {
        eprintln!("cannot listen on 127.0.0.1:{}: {e}", standin.port());
        return ExitCode::from(1);
    }
    println!("DISPATCHER_URL={}", standin.url());
    let _ = std::io::stdout().flush();
    eprintln!(
        "dispatcher stand-in serving {} for user {} (tokens live {} s); Ctrl-C stops it",
        standin.url(),
        args.user,
        args.expires_in
    );

    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot watch SIGTERM: {e}");
            return ExitCode::from(1);
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    standin.stop();
    eprintln!("stopped; {:?}", standin.counters());
    ExitCode::SUCCESS
}
