//! What a bare `cargo test` says about the integration tests it did not
//! build: those that need the test services (RabbitMQ, sshd, Docker with
//! the stand-in images, the Python venv of `tests/py`) are built only with
//! the `services` feature, which `scripts/test.sh` turns on after preparing
//! the machine. Without it, one ignored test names them, once, in the
//! test run's own output (`... ignored, <reason>`); with it, this file has
//! nothing to say and every one of them runs, failing loudly if a service
//! is missing.

/// The test targets that need the services, as the `ignore` reason below
/// names them; `names_every_target_that_needs_the_services` keeps it in
/// step with Cargo.toml.
const NEED_SERVICES: &str = "ack_timeout box_bounds box_files box_net container_limits control \
                             disk farm farm_silence full_nodes limits monitor operator pipeline \
                             prefetch progress redelivery restart sshd_fixture warehouse \
                             worker_core";

#[cfg(not(feature = "services"))]
#[test]
#[ignore = "not built without the services: ack_timeout box_bounds box_files box_net \
            container_limits control disk farm farm_silence full_nodes limits monitor operator \
            pipeline prefetch progress redelivery restart sshd_fixture warehouse worker_core need \
            RabbitMQ, sshd, Docker and tests/py's venv; run them with scripts/test.sh (cargo test --features \
            services)"]
fn integration_tests_need_scripts_test_sh() {
    panic!(
        "these integration tests were not built: {NEED_SERVICES}; \
         run scripts/test.sh (cargo test --features services)"
    );
}

/// The `[[test]]` targets of Cargo.toml with `required-features =
/// ["services"]`, in file order.
fn gated_targets() -> Vec<String> {
    let manifest = include_str!("../Cargo.toml");
    let mut names = Vec::new();
    let mut name = None;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            name = None;
        }
        if let Some(n) = line.strip_prefix("name = ") {
            name = Some(n.trim_matches('"').to_owned());
        }
        if line == r#"required-features = ["services"]"# {
            names.extend(name.take());
        }
    }
    names
}

#[test]
fn names_every_target_that_needs_the_services() {
    let mut gated = gated_targets();
    gated.sort();
    let named: Vec<&str> = NEED_SERVICES.split_whitespace().collect();
    assert_eq!(gated, named, "NEED_SERVICES and Cargo.toml's [[test]]s");
    let reason = include_str!("without_services.rs")
        .split("#[ignore = \"")
        .nth(1)
        .and_then(|r| r.split("\"]").next())
        .expect("the ignore reason")
        .split_whitespace()
        .filter(|word| *word != "\\")
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        reason.contains(&named.join(" ")),
        "the ignore reason names every gated target: {reason}"
    );
}
