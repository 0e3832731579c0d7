//! Revoke benchmark: 50,000 ids revoked through the worker's registry (the
//! path `revoke` takes, under the registry's lock), then the same 50,000
//! again, then 50,000 new ones. Prints the time of each round and per id:
//! the three should be close (revoking ids already revoked was quadratic).
//!
//! Needs no service: `cargo bench --bench revoke`.

use std::time::Instant;

use zimfarm_worker::worker::registry::{REVOKES_MAX, Registry};

fn round(registry: &Registry, ids: &[String], what: &str) {
    let start = Instant::now();
    registry.revoke(ids, None);
    let took = start.elapsed();
    println!(
        "{what:<28} {:>5} ids  {:>8.2} ms  {:>6.0} ns/id",
        ids.len(),
        took.as_secs_f64() * 1e3,
        took.as_secs_f64() * 1e9 / ids.len() as f64
    );
}

fn main() {
    let registry = Registry::default();
    let ids: Vec<String> = (0..REVOKES_MAX).map(|i| format!("{i:024x}")).collect();
    let new: Vec<String> = (0..REVOKES_MAX).map(|i| format!("new{i:021x}")).collect();
    round(&registry, &ids, "revoke 50,000 ids");
    round(&registry, &ids, "revoke the same ids again");
    round(&registry, &new, "revoke 50,000 new ids");
    let kept = registry.revoked().len();
    println!("revoked ids kept: {kept} (at most {REVOKES_MAX})");
    assert!(kept <= REVOKES_MAX);
}
