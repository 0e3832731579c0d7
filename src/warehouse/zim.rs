//! The ZIM format's own integrity check, computed while a file streams by.
//!
//! A ZIM file stores, at the header's `checksumPos`, the MD5 of every byte
//! before it; the 16 digest bytes end the file. [`ZimChecksum`] takes the
//! file's bytes in order, in pieces of any size, and says at the end whether
//! they match. It owns nothing but that arithmetic: no I/O, no network.

use md5::{Digest, Md5};
use thiserror::Error;

/// The ZIM header's magic number (little-endian u32 at offset 0).
const MAGIC: u32 = 0x044D_495A;
/// Header length up to and including `checksumPos` (u64 at offset 72).
const HEADER_LEN: usize = 80;
const CHECKSUM_POS_OFFSET: usize = 72;
const DIGEST_LEN: u64 = 16;

/// Why a file is not an intact ZIM.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ZimError {
    #[error("is {size} bytes, too short for a ZIM header ({HEADER_LEN} bytes)")]
    TooShort { size: u64 },
    #[error("does not start with the ZIM magic number (found {found:#010x})")]
    BadMagic { found: u32 },
    #[error(
        "has its checksum at byte {checksum_pos} but is {size} bytes long \
         (expected {expected}): the file is truncated or has trailing data"
    )]
    BadLength {
        checksum_pos: u64,
        size: u64,
        expected: u64,
    },
    #[error("fails its MD5 checksum (stored {stored}, computed {computed}): the file is corrupt")]
    Mismatch { stored: String, computed: String },
}

/// The streaming MD5 check of one ZIM file.
pub struct ZimChecksum {
    md5: Md5,
    /// The first bytes, until the header is complete.
    header: Vec<u8>,
    /// Bytes seen so far.
    pos: u64,
    /// From the header, once read.
    checksum_pos: Option<u64>,
    /// The digest bytes stored in the file, as they arrive.
    stored: Vec<u8>,
    bad_magic: Option<u32>,
}

impl Default for ZimChecksum {
    fn default() -> Self {
        Self::new()
    }
}

impl ZimChecksum {
    pub fn new() -> Self {
        Self {
            md5: Md5::new(),
            header: Vec::with_capacity(HEADER_LEN),
            pos: 0,
            checksum_pos: None,
            stored: Vec::with_capacity(DIGEST_LEN as usize),
            bad_magic: None,
        }
    }

    /// Bytes fed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Feeds the next bytes of the file.
    pub fn update(&mut self, mut data: &[u8]) {
        if self.checksum_pos.is_none() && self.bad_magic.is_none() {
            let want = HEADER_LEN - self.header.len();
            let take = want.min(data.len());
            self.header.extend_from_slice(&data[..take]);
            // Header bytes always precede checksumPos (it points past the
            // header), so they are hashed as they come.
            self.md5.update(&data[..take]);
            self.pos += take as u64;
            data = &data[take..];
            if self.header.len() == HEADER_LEN {
                self.read_header();
            }
        }
        if data.is_empty() {
            return;
        }
        let Some(checksum_pos) = self.checksum_pos else {
            // Not a ZIM: count the rest for the error message only.
            self.pos += data.len() as u64;
            return;
        };
        let end = self.pos + data.len() as u64;
        // The part before checksumPos is hashed.
        if self.pos < checksum_pos {
            let n = (checksum_pos - self.pos).min(data.len() as u64) as usize;
            self.md5.update(&data[..n]);
            self.pos += n as u64;
            data = &data[n..];
        }
        // The digest bytes are kept for the comparison.
        let digest_end = checksum_pos + DIGEST_LEN;
        if !data.is_empty() && self.pos < digest_end {
            let n = (digest_end - self.pos).min(data.len() as u64) as usize;
            self.stored.extend_from_slice(&data[..n]);
        }
        self.pos = end;
    }

    fn read_header(&mut self) {
        let magic = u32::from_le_bytes(self.header[0..4].try_into().expect("4 bytes"));
        if magic != MAGIC {
            self.bad_magic = Some(magic);
            return;
        }
        let pos = u64::from_le_bytes(
            self.header[CHECKSUM_POS_OFFSET..CHECKSUM_POS_OFFSET + 8]
                .try_into()
                .expect("8 bytes"),
        );
        // A checksumPos inside the header cannot be right; treat it as a
        // length error at the end rather than hashing nonsense.
        self.checksum_pos = Some(pos.max(HEADER_LEN as u64));
    }

    /// Whether the bytes fed were an intact ZIM file.
    pub fn finish(self) -> Result<(), ZimError> {
        let size = self.pos;
        if self.header.len() < HEADER_LEN {
            return Err(ZimError::TooShort { size });
        }
        if let Some(found) = self.bad_magic {
            return Err(ZimError::BadMagic { found });
        }
        let checksum_pos = self.checksum_pos.expect("header was read");
        let expected = checksum_pos + DIGEST_LEN;
        if size != expected {
            return Err(ZimError::BadLength {
                checksum_pos,
                size,
                expected,
            });
        }
        let computed = self.md5.finalize();
        if computed[..] != self.stored[..] {
            return Err(ZimError::Mismatch {
                stored: hex(&self.stored),
                computed: hex(&computed),
            });
        }
        Ok(())
    }
}

/// Reads `file` whole, from its first byte whatever its position
/// (blocking), and says whether it is an intact ZIM: the outer error is
/// the read's, the inner the verdict.
pub fn check_file(file: &std::fs::File) -> std::io::Result<Result<(), ZimError>> {
    use std::os::unix::fs::FileExt;
    let mut checksum = ZimChecksum::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        match file.read_at(&mut buf, at) {
            Ok(0) => break,
            Ok(n) => {
                checksum.update(&buf[..n]);
                at += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(checksum.finish())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether a file of this name is checked as a ZIM.
pub fn is_zim_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() > 4 && b[b.len() - 4..].eq_ignore_ascii_case(b".zim")
}

/// Builds a minimal well-formed ZIM-shaped file: a header whose
/// `checksumPos` is `size - 16`, `body` bytes of filler, and the right MD5.
/// Not a readable ZIM archive; enough for this check (benchmarks, tests).
pub fn synthetic_zim(
    size: u64,
    mut filler: impl FnMut(&mut [u8]),
) -> impl Iterator<Item = Vec<u8>> {
    assert!(
        size >= HEADER_LEN as u64 + DIGEST_LEN,
        "too small for a ZIM"
    );
    let checksum_pos = size - DIGEST_LEN;
    let mut header = vec![0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    header[4..6].copy_from_slice(&6u16.to_le_bytes());
    header[CHECKSUM_POS_OFFSET..].copy_from_slice(&checksum_pos.to_le_bytes());
    let mut md5 = Md5::new();
    md5.update(&header);
    let mut pos = HEADER_LEN as u64;
    let mut first = Some(header);
    let mut done = false;
    std::iter::from_fn(move || {
        if let Some(h) = first.take() {
            return Some(h);
        }
        if done {
            return None;
        }
        if pos < checksum_pos {
            let n = (checksum_pos - pos).min(1 << 20) as usize;
            let mut chunk = vec![0u8; n];
            filler(&mut chunk);
            md5.update(&chunk);
            pos += n as u64;
            return Some(chunk);
        }
        done = true;
        let digest = std::mem::replace(&mut md5, Md5::new()).finalize();
        Some(digest.to_vec())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make(size: u64) -> Vec<u8> {
        let mut n = 0u8;
        synthetic_zim(size, |c| {
            for b in c {
                n = n.wrapping_mul(31).wrapping_add(7);
                *b = n;
            }
        })
        .flatten()
        .collect()
    }

    fn check(data: &[u8], piece: usize) -> Result<(), ZimError> {
        let mut z = ZimChecksum::new();
        for chunk in data.chunks(piece.max(1)) {
            z.update(chunk);
        }
        z.finish()
    }

    #[test]
    fn intact_file_passes_in_any_piece_size() {
        let data = make(5000);
        for piece in [1, 7, 16, 79, 80, 81, 4096, 10_000] {
            assert_eq!(check(&data, piece), Ok(()), "piece size {piece}");
        }
    }

    #[test]
    fn a_flipped_byte_anywhere_fails() {
        let data = make(3000);
        for at in [0usize, 5, 72, 100, 2000, 2983, 2990, 2999] {
            let mut bad = data.clone();
            bad[at] ^= 0x10;
            assert!(check(&bad, 333).is_err(), "flip at {at}");
        }
    }

    #[test]
    fn truncated_and_extended_files_fail() {
        let data = make(3000);
        assert!(matches!(
            check(&data[..2990], 100),
            Err(ZimError::BadLength { .. })
        ));
        let mut longer = data.clone();
        longer.push(0);
        assert!(matches!(
            check(&longer, 100),
            Err(ZimError::BadLength { .. })
        ));
        assert!(matches!(
            check(&data[..40], 100),
            Err(ZimError::TooShort { size: 40 })
        ));
        assert!(matches!(check(b"", 1), Err(ZimError::TooShort { size: 0 })));
    }

    #[test]
    fn not_a_zim_fails_with_its_magic() {
        let data = vec![b'x'; 500];
        assert!(matches!(check(&data, 64), Err(ZimError::BadMagic { .. })));
    }

    #[test]
    fn zim_names() {
        assert!(is_zim_name("wikipedia_en_all.zim"));
        assert!(is_zim_name("A.ZIM"));
        assert!(!is_zim_name(".zim"));
        assert!(!is_zim_name("x.zim.tmp"));
        assert!(!is_zim_name("log.gz"));
        assert!(is_zim_name("ünïcode.zim"));
        assert!(!is_zim_name("zïm"));
    }
}
