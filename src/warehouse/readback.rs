//! Reading back what the warehouse holds, to vouch for it: how many of the
//! first bytes of a remote file equal the local file's, read in pieces
//! over SFTP and compared byte for byte with the same range read locally
//! ([`read_local_range`]), in file order, stopping at the first
//! difference. At most [`IN_FLIGHT`] pieces are asked at a time, so memory
//! stays bounded (2 × 16 × 255 KiB) whatever the file's size, and a
//! foreign file costs a few pieces, not its size.
//!
//! The cost: the bytes compared come down once, over one SFTP channel, so
//! at most its 2 MiB window per round trip (about 40 MB/s at 50 ms, 14 MB/s
//! at 150 ms; 60 to 80 MB/s measured on loopback, debug build). It is paid
//! only when the warehouse holds something of the file that the worker
//! cannot otherwise vouch for: a `.tmp` without this file's journal, or a
//! final file of the same size (a redelivered task whose upload had
//! ended: its 10 GB ZIM comes down once). A genuine prefix is read back
//! whole, with no cap: that costs one download of it, less than sending it
//! again over a volunteer's slower uplink. A normal upload (nothing there)
//! reads nothing back.
//!
//! Owns the remote reads, the comparison and the one function that reads
//! the local bytes for it. It must not write, truncate or rename anything
//! in the warehouse, nor decide what the answer means (`upload` does).

use std::fs::File;
use std::future::Future;
use std::io;
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;

use super::session::Sftp;
use super::{UploadItem, WarehouseError};

/// Pieces asked at a time: 4 MiB of 255 KiB reads, as much as the uploads
/// keep in flight per stream (`STREAM_IN_FLIGHT`), enough to fill the SSH
/// channel's window at any round trip.
const IN_FLIGHT: usize = 16;

/// `len` bytes of the local file at `offset`, read through the
/// descriptor the upload opened (never by path: see [`crate::taskfs`]).
/// The only place the read-back reads local bytes.
pub(super) async fn read_local_range(
    source: &Arc<File>,
    offset: u64,
    len: usize,
) -> io::Result<Vec<u8>> {
    let file = Arc::clone(source);
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        let mut data = vec![0u8; len];
        file.read_exact_at(&mut data, offset)?;
        Ok(data)
    })
    .await
    .map_err(|e| io::Error::other(e.to_string()))?
}

/// How many of the first `len` bytes of the remote file at `path` equal
/// `item`'s local bytes: `len` when they all do, else the offset of the
/// first byte that differs (or that the remote file lacks).
pub(super) async fn matching_prefix(
    sftp: &Sftp,
    path: &str,
    item: &UploadItem,
    source: &Arc<File>,
    len: u64,
) -> Result<u64, WarehouseError> {
    if len == 0 {
        return Ok(0);
    }
    let remote_failed = |operation: &'static str| {
        move |e: russh_sftp::client::error::Error| WarehouseError::Sftp {
            operation,
            path: path.to_owned(),
            detail: e.to_string(),
        }
    };
    let handle = sftp
        .open_for_read(path)
        .await
        .map_err(remote_failed("open for reading back"))?;
    let compared = common_prefix_len(
        len,
        sftp.read_len(),
        |offset, want| {
            let handle = handle.as_str();
            async move {
                read_remote(sftp, handle, offset, want)
                    .await
                    .map_err(remote_failed("read back"))
            }
        },
        |offset, want| async move {
            read_local_range(source, offset, want)
                .await
                .map_err(|e| WarehouseError::Local {
                    path: item.local.clone(),
                    detail: format!("cannot read it to compare with the warehouse's copy: {e}"),
                })
        },
    )
    .await;
    // Nothing was written through it: a handle that does not close loses
    // nothing.
    let _ = sftp.close(&handle).await;
    compared
}

/// Up to `want` bytes at `offset`, fewer only at the end of the file: a
/// server may answer a read with less than was asked.
async fn read_remote(
    sftp: &Sftp,
    handle: &str,
    offset: u64,
    want: usize,
) -> Result<Vec<u8>, russh_sftp::client::error::Error> {
    let mut data = Vec::with_capacity(want);
    while data.len() < want {
        let ask = u32::try_from(want - data.len()).unwrap_or(u32::MAX);
        let got = sftp.read(handle, offset + data.len() as u64, ask).await?;
        if got.is_empty() {
            break;
        }
        data.extend_from_slice(&got[..got.len().min(want - data.len())]);
    }
    Ok(data)
}

/// The comparison itself, apart from where the bytes come from: pieces of
/// `piece` bytes over `0..len`, [`IN_FLIGHT`] at a time, each read from
/// both sides; returns `len`, or the offset of the first difference.
async fn common_prefix_len<R, RF, L, LF>(
    len: u64,
    piece: u32,
    read_remote: R,
    read_local: L,
) -> Result<u64, WarehouseError>
where
    R: Fn(u64, usize) -> RF,
    RF: Future<Output = Result<Vec<u8>, WarehouseError>>,
    L: Fn(u64, usize) -> LF,
    LF: Future<Output = Result<Vec<u8>, WarehouseError>>,
{
    let piece = u64::from(piece.max(1));
    let mut next = 0u64;
    let mut in_flight = FuturesOrdered::new();
    let compare = |offset: u64| {
        let want = usize::try_from(piece.min(len - offset)).expect("a piece fits in memory");
        let (remote, local) = (read_remote(offset, want), read_local(offset, want));
        async move {
            let (remote, local) = futures_util::future::join(remote, local).await;
            let (remote, local) = (remote?, local?);
            Ok::<_, WarehouseError>((offset, want, equal_prefix(&remote, &local)))
        }
    };
    loop {
        while next < len && in_flight.len() < IN_FLIGHT {
            in_flight.push_back(compare(next));
            next += piece;
        }
        let Some(done) = in_flight.next().await else {
            return Ok(len);
        };
        let (offset, want, same) = done?;
        if same < want {
            return Ok(offset + same as u64);
        }
    }
}

/// How many leading bytes `a` and `b` share: compared a block at a time
/// (`memcmp`), then byte by byte in the first block that differs.
fn equal_prefix(a: &[u8], b: &[u8]) -> usize {
    const BLOCK: usize = 4096;
    let len = a.len().min(b.len());
    let (a, b) = (&a[..len], &b[..len]);
    let same_blocks = a
        .chunks(BLOCK)
        .zip(b.chunks(BLOCK))
        .take_while(|(x, y)| x == y)
        .count();
    let start = same_blocks * BLOCK;
    if start >= len {
        return len;
    }
    start
        + a[start..]
            .iter()
            .zip(&b[start..])
            .take_while(|(x, y)| x == y)
            .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn equal_prefixes() {
        for (a, b, same) in [
            (&b""[..], &b""[..], 0),
            (b"abc", b"abc", 3),
            (b"abc", b"abd", 2),
            (b"xbc", b"abc", 0),
            (b"ab", b"abc", 2),
            (b"abc", b"ab", 2),
        ] {
            assert_eq!(equal_prefix(a, b), same, "{a:?} {b:?}");
        }
        // Across blocks: every position of a difference, and none.
        let a = noise(3 * 4096 + 17, 5);
        for at in [0, 1, 4095, 4096, 4097, 8191, 3 * 4096, 3 * 4096 + 16] {
            let mut b = a.clone();
            b[at] ^= 1;
            assert_eq!(equal_prefix(&a, &b), at, "{at}");
            assert_eq!(equal_prefix(&a[..at], &b), at, "{at}");
        }
        assert_eq!(equal_prefix(&a, &a), a.len());
        assert_eq!(equal_prefix(&a, &a[..5000]), 5000);
    }

    /// Compares `remote` with `local` over `len` bytes in pieces of
    /// `piece`, the remote side answering at most `short` bytes per read
    /// (a server's short reads, then the rest read again); returns the
    /// answer and the bytes read from the remote side.
    async fn compare(
        remote: &[u8],
        local: &[u8],
        len: u64,
        piece: u32,
        short: usize,
    ) -> (u64, u64) {
        let read = Cell::new(0u64);
        let answer =
            common_prefix_len(
                len,
                piece,
                |offset, want| {
                    let read = &read;
                    async move {
                        // What `read_remote` does with a server that answers
                        // `short` bytes at a time.
                        let mut data = Vec::new();
                        while data.len() < want {
                            let at = offset as usize + data.len();
                            let end = remote.len().min(at + short).min(offset as usize + want);
                            if at >= end {
                                break;
                            }
                            data.extend_from_slice(&remote[at..end]);
                        }
                        read.set(read.get() + data.len() as u64);
                        Ok(data)
                    }
                },
                |offset, want| async move {
                    Ok(local[offset as usize..offset as usize + want].to_vec())
                },
            )
            .await
            .unwrap();
        (answer, read.get())
    }

    fn noise(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[tokio::test]
    async fn the_answer_is_the_first_difference_exactly() {
        let local = noise(10_000, 1);
        let differs_at = |at: usize| {
            let mut r = local.clone();
            r[at] ^= 0x80;
            r
        };
        // (remote, bytes compared, piece, short reads, expected)
        let cases: Vec<(Vec<u8>, u64, u32, usize, u64)> = vec![
            (local.clone(), 10_000, 1000, 1000, 10_000),
            (local.clone(), 10_000, 1000, 333, 10_000),
            (local.clone(), 9_999, 4096, 4096, 9_999),
            (local.clone(), 0, 1000, 1000, 0),
            (differs_at(0), 10_000, 1000, 1000, 0),
            (differs_at(999), 10_000, 1000, 1000, 999),
            (differs_at(1000), 10_000, 1000, 7, 1000),
            (differs_at(7777), 10_000, 1000, 1000, 7777),
            (differs_at(9_999), 10_000, 1000, 1000, 9_999),
            // Past what is compared, a difference does not count.
            (differs_at(9_999), 9_999, 1000, 1000, 9_999),
            // A remote file shorter than asked ends the match.
            (local[..4321].to_vec(), 10_000, 1000, 1000, 4321),
            (Vec::new(), 10_000, 1000, 1000, 0),
            // Longer: only the bytes compared count.
            (
                [local.clone(), noise(50, 9)].concat(),
                10_000,
                1000,
                1000,
                10_000,
            ),
        ];
        for (i, (remote, len, piece, short, expected)) in cases.into_iter().enumerate() {
            let (answer, _) = compare(&remote, &local, len, piece, short).await;
            assert_eq!(answer, expected, "case {i}");
        }
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_config::config())]

        /// Against the obvious answer: whatever the remote file (this
        /// one, cut, longer, a byte changed anywhere), the piece size and
        /// the server's short reads, the answer is the length of the
        /// common prefix within the bytes compared.
        #[test]
        fn the_answer_is_the_common_prefix(
            local in proptest::collection::vec(proptest::num::u8::ANY, 0..3000),
            change in proptest::option::of((0usize..3000, 1u8..=255)),
            cut in proptest::option::of(0usize..3000),
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..50),
            compared in 0usize..3000,
            piece in 1u32..600,
            short in 1usize..700,
        ) {
            let mut remote = local.clone();
            if let Some((at, flip)) = change && at < remote.len() {
                remote[at] ^= flip;
            }
            if let Some(cut) = cut {
                remote.truncate(cut);
            }
            remote.extend_from_slice(&tail);
            let len = compared.min(local.len());
            let expected = local[..len]
                .iter()
                .zip(&remote)
                .take_while(|(a, b)| a == b)
                .count() as u64;
            let (answer, _) = futures_util::FutureExt::now_or_never(compare(
                &remote, &local, len as u64, piece, short,
            ))
            .expect("in-memory reads are ready at once");
            proptest::prop_assert_eq!(answer, expected);
        }
    }

    #[tokio::test]
    async fn a_foreign_file_costs_a_bounded_read_not_its_size() {
        let local = noise(1 << 20, 1);
        let foreign = noise(1 << 20, 2);
        let (answer, read) = compare(&foreign, &local, 1 << 20, 1024, 1024).await;
        assert_eq!(answer, 0);
        // At most the pieces in flight when the first one came back.
        assert!(read <= (IN_FLIGHT as u64) * 1024, "{read} bytes read");
    }
}
