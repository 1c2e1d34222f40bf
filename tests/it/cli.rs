//! The `marketgate` command as a person meets it: an error is one clear line (a backtrace only
//! on request), a taken port is named, and `--help` says what a user needs.

use std::process::{Command, Output};

/// Runs the binary with `args` and `env` (and no inherited `MARKETGATE_*` variable: each is a
/// config override); waits for it to exit.
fn marketgate(args: &[&str], env: &[(&str, &str)]) -> Output {
    let binary = std::env::var("MARKETGATE_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_marketgate").to_owned());
    let mut cmd = Command::new(binary);
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("MARKETGATE_")) {
        cmd.env_remove(name);
    }
    cmd.args(args).envs(env.iter().copied());
    cmd.output().expect("the binary runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn a_config_error_is_reported_without_a_backtrace_even_with_rust_backtrace_set() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("serve.toml");
    std::fs::write(&config, "[gateway]\nlisten = \"nowhere\"\n").unwrap();
    let config = config.to_str().unwrap();

    let plain = marketgate(&["serve", "--config", config], &[("RUST_BACKTRACE", "1")]);
    assert_eq!(plain.status.code(), Some(1));
    let text = stderr(&plain);
    assert!(
        text.starts_with(
            "marketgate: error: invalid configuration:\n  - gateway.listen: 'nowhere'"
        ),
        "{text}"
    );
    assert!(
        !text.contains("acktrace"),
        "a backtrace nobody asked for:\n{text}"
    );
    assert_eq!(
        text.lines().count(),
        2,
        "one line and the one problem:\n{text}"
    );

    for asked in [
        marketgate(&["-v", "serve", "--config", config], &[]),
        marketgate(
            &["serve", "--config", config],
            &[("MARKETGATE_BACKTRACE", "1")],
        ),
    ] {
        let text = stderr(&asked);
        assert_eq!(asked.status.code(), Some(1));
        assert!(text.contains("gateway.listen: 'nowhere'"), "{text}");
        assert!(
            text.contains("Stack backtrace"),
            "asked for a backtrace:\n{text}"
        );
    }
}

#[test]
fn a_taken_port_is_named_with_its_key_and_variable() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[gateway]\nlisten = \"127.0.0.1:0\"\n[control]\nlisten = \"{addr}\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"cli-test-admin-token\"\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let output = marketgate(&["serve", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    let line = text
        .lines()
        .find(|l| l.starts_with("marketgate: error: "))
        .unwrap_or_else(|| panic!("no error line:\n{text}"));
    assert!(
        line.contains(&format!("cannot listen on {addr} (control.listen; ")),
        "{line}"
    );
    assert!(line.contains("MARKETGATE_CONTROL__LISTEN"), "{line}");
    assert!(
        line.ends_with("Address already in use (os error 98)"),
        "{line}"
    );
}

#[test]
fn help_tells_a_newcomer_the_ports_data_dir_credentials_and_where_keys_are() {
    let serve = stdout(&marketgate(&["serve", "--help"], &[]));
    for needed in [
        "127.0.0.1:8080",
        "127.0.0.1:8081",
        "127.0.0.1:8082",
        "./marketgate-data",
        "MARKETGATE_DATA_DIR",
        "trial-market-token",
        "trial-seller-token",
        "trial-admin-token",
        "MARKETGATE_SECTION__KEY",
        "docs/operations.md",
    ] {
        assert!(
            serve.contains(needed),
            "serve --help lacks {needed}:\n{serve}"
        );
    }
    for plane in ["proxy", "control"] {
        let help = stdout(&marketgate(&[plane, "--help"], &[]));
        for needed in [
            "admin.token",
            "MARKETGATE_ADMIN__TOKEN",
            "docs/operations.md",
        ] {
            assert!(
                help.contains(needed),
                "{plane} --help lacks {needed}:\n{help}"
            );
        }
    }
    let call = stdout(&marketgate(&["call", "--help"], &[]));
    assert!(call.contains("-H 'Host: "), "{call}");
    // Every option the help text names exists.
    for option in ["--host", "--domain"] {
        assert!(
            !call.contains(option),
            "call --help names {option}:\n{call}"
        );
    }
}
