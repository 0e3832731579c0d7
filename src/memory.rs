//! How the process's memory goes back to the system: the two allocator
//! settings the worker changes, at start, before any thread exists.
//!
//! Owns those settings only. It must not allocate on anyone's behalf nor
//! cap memory (CONTAINER_MEMORY_MB caps the scrapers, not the worker).
//!
//! glibc's malloc serves a request of 128 KiB or more with its own mmap,
//! but after the first such block is freed it raises that threshold to the
//! block's size ("dynamic mmap threshold"), so from then on the upload's
//! 256 KiB chunks (64 in flight per upload, read on blocking threads) come
//! from the heap arenas and stay in them once freed. Measured with the
//! soak (`scripts/soak.sh`, no faults, 150 s, two Docker workers with two
//! slots): idle RSS 20 → 28 and 20 → 42 MiB, and 19 → 73 MiB over 600 s
//! with faults; with the threshold pinned at 128 KiB, 16 → 17 and 16 → 18
//! MiB (pinning it turns the dynamic adjustment off). Each thread that
//! allocates may also get an arena of its own (up to 8 per core), each
//! keeping what was freed in it; the worker's threads are the runtime's
//! one, lapin's and the short-lived blocking ones, so two arenas are
//! plenty: with both, 16.5 → 17.1 and 16.3 → 16.7 MiB.

/// The size from which blocks are mmapped and unmapped when freed: glibc's
/// own default, kept fixed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 128 * 1024;
/// At most this many malloc arenas.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENA_MAX: libc::c_int = 2;

/// Pins glibc's mmap threshold and caps its arenas (see the module doc),
/// each unless the operator set it in `GLIBC_TUNABLES`. Call first thing
/// in `main`.
pub fn return_large_blocks_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        for (name, param, value) in [
            ("mmap_threshold", libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            ("arena_max", libc::M_ARENA_MAX, ARENA_MAX),
        ] {
            if !tunables.contains(name) {
                // SAFETY: mallopt only changes allocator parameters; it
                // is called before any other thread exists.
                unsafe {
                    libc::mallopt(param, value);
                }
            }
        }
    }
}
