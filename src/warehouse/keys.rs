//! The worker's SSH identity (SSH_KEY) and the trust it puts in the
//! warehouse's host key (a known_hosts file and pinned fingerprints).
//!
//! Owns key parsing, fingerprints and the host-key verdict. It must not
//! open connections: the session code asks it whether a key is trusted.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use russh::keys::ssh_key::{self, HashAlg};
use russh::keys::{Algorithm, PrivateKey, PublicKey, PublicKeyBase64};
use thiserror::Error;

use super::known_hosts::{self, Recorded};

/// Why SSH_KEY cannot be used. Found at start-up, not at the first upload.
#[derive(Debug, Error)]
pub enum KeyError {
    #[error(
        "SSH_KEY {path} does not exist: mount your private key there \
         (docker run -v /path/to/id_rsa:{path}:ro) or point SSH_KEY at it"
    )]
    Missing { path: PathBuf },
    #[error("SSH_KEY {path} cannot be read: {source}; check its permissions")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "SSH_KEY {path} is protected by a passphrase, which the worker cannot ask for: \
         give it a copy without one (ssh-keygen -p -N '' -f COPY)"
    )]
    Encrypted { path: PathBuf },
    #[error(
        "SSH_KEY {path} is not a private key the worker can use ({detail}); \
         use an RSA key (PEM, PKCS#8 or OpenSSH format) or an ed25519 key"
    )]
    Unsupported { path: PathBuf, detail: String },
}

/// The private key the worker logs in to the warehouse with. Its `Debug`
/// shows the file, the type and the public fingerprint, never the key.
#[derive(Clone)]
pub struct ClientKey {
    key: Arc<PrivateKey>,
    path: PathBuf,
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ClientKey({}, {}, {})",
            self.path.display(),
            self.algorithm(),
            self.sha256_fingerprint()
        )
    }
}

impl ClientKey {
    /// Reads and parses the key file.
    pub async fn load(path: &Path) -> Result<Self, KeyError> {
        let text = match tokio::fs::read(path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KeyError::Missing {
                    path: path.to_owned(),
                });
            }
            Err(source) => {
                return Err(KeyError::Unreadable {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Self::parse(&text, path)
    }

    /// Parses key text (PEM PKCS#1, PKCS#8 or OpenSSH format).
    pub fn parse(text: &[u8], path: &Path) -> Result<Self, KeyError> {
        let unsupported = |detail: String| KeyError::Unsupported {
            path: path.to_owned(),
            detail,
        };
        let text = std::str::from_utf8(text)
            .map_err(|_| unsupported("the file is not text".to_owned()))?;
        if text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
            return Err(KeyError::Encrypted {
                path: path.to_owned(),
            });
        }
        let key = match russh::keys::decode_secret_key(text, None) {
            Ok(key) => key,
            Err(russh::keys::Error::KeyIsEncrypted) => {
                return Err(KeyError::Encrypted {
                    path: path.to_owned(),
                });
            }
            Err(russh::keys::Error::CouldNotReadKey) if text.trim_start().starts_with("ssh-") => {
                return Err(unsupported(
                    "this is a public key; SSH_KEY needs the private one".to_owned(),
                ));
            }
            Err(e) => return Err(unsupported(e.to_string())),
        };
        match key.algorithm() {
            Algorithm::Rsa { .. } | Algorithm::Ed25519 => {}
            Algorithm::Ecdsa { .. } => {}
            other => return Err(unsupported(format!("{other} keys are not supported"))),
        }
        Ok(Self {
            key: Arc::new(key),
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `ssh-rsa`, `ssh-ed25519`...
    pub fn algorithm(&self) -> String {
        self.key.algorithm().to_string()
    }

    pub fn is_rsa(&self) -> bool {
        self.key.algorithm().is_rsa()
    }

    /// The public key blob, base64, as the dispatcher's keys API takes it.
    pub fn public_key_base64(&self) -> String {
        self.key.public_key().public_key_base64()
    }

    /// MD5 of the public key blob, lowercase hex without colons: the
    /// fingerprint the dispatcher lists for registered keys.
    pub fn md5_fingerprint(&self) -> String {
        <md5::Md5 as md5::Digest>::digest(self.key.public_key().public_key_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// `SHA256:...`, as `ssh-keygen -lf` prints it.
    pub fn sha256_fingerprint(&self) -> String {
        self.key
            .public_key()
            .fingerprint(HashAlg::Sha256)
            .to_string()
    }

    pub(crate) fn private(&self) -> Arc<PrivateKey> {
        self.key.clone()
    }
}

/// Why the warehouse's host key was refused.
#[derive(Debug, Clone, Error)]
pub enum HostKeyError {
    #[error(
        "the warehouse {host}:{port} presented a host key that is not trusted here: \
         {algorithm} {fingerprint}. If that is the warehouse's key (ask the Zimfarm admins, \
         or compare with `ssh-keyscan -p {port} {host} | ssh-keygen -lf -`), pin it with \
         WAREHOUSE_HOST_KEY={fingerprint} or add the warehouse's line to {known_hosts}"
    )]
    Unknown {
        host: String,
        port: u16,
        algorithm: String,
        fingerprint: String,
        known_hosts: String,
    },
    #[error(
        "the warehouse {host}:{port} presented the host key {algorithm} {fingerprint}, which is \
         NOT the key recorded at line {line} of {known_hosts}: refusing to connect (the \
         connection may be intercepted). If the warehouse's key really changed, remove that line \
         and pin the new key with WAREHOUSE_HOST_KEY={fingerprint}"
    )]
    Changed {
        host: String,
        port: u16,
        algorithm: String,
        fingerprint: String,
        known_hosts: String,
        line: usize,
    },
    #[error(
        "the warehouse {host}:{port} presented the host key {fingerprint}, which line {line} of \
         {known_hosts} marks as @revoked: refusing to connect"
    )]
    Revoked {
        host: String,
        port: u16,
        fingerprint: String,
        known_hosts: String,
        line: usize,
    },
    #[error("cannot read WAREHOUSE_KNOWN_HOSTS {known_hosts}: {detail}")]
    KnownHosts { known_hosts: String, detail: String },
}

/// What the worker trusts as the warehouse's host key.
#[derive(Debug, Clone)]
pub struct HostKeyTrust {
    host: String,
    port: u16,
    known_hosts: PathBuf,
    pins: Vec<String>,
}

impl HostKeyTrust {
    pub fn new(host: &str, port: u16, known_hosts: &Path, pins: &[String]) -> Self {
        Self {
            host: host.to_owned(),
            port,
            known_hosts: known_hosts.to_owned(),
            pins: pins.to_vec(),
        }
    }

    /// The keys known_hosts records for this host (none when the file is
    /// missing). Reads a file: call it off the runtime.
    fn recorded(&self) -> Result<Vec<Recorded>, HostKeyError> {
        match std::fs::read(&self.known_hosts) {
            Ok(bytes) => Ok(known_hosts::keys_for(
                &String::from_utf8_lossy(&bytes),
                &self.host,
                self.port,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(HostKeyError::KnownHosts {
                known_hosts: self.known_hosts.display().to_string(),
                detail: e.to_string(),
            }),
        }
    }

    /// Host-key algorithms to ask the server for, most wanted first: those
    /// known_hosts has for this host (so the server shows a key we can
    /// check), then russh's defaults. Reads a file: call it off the runtime.
    pub fn preferred_algorithms(&self) -> Vec<Algorithm> {
        let mut algorithms: Vec<Algorithm> = Vec::new();
        for recorded in self.recorded().unwrap_or_default() {
            if recorded.revoked {
                continue;
            }
            let alg = recorded.key.algorithm();
            if alg.clone().is_rsa() {
                for hash in [Some(HashAlg::Sha512), Some(HashAlg::Sha256)] {
                    let rsa = Algorithm::Rsa { hash };
                    if !algorithms.contains(&rsa) {
                        algorithms.push(rsa);
                    }
                }
            } else if !algorithms.contains(&alg) {
                algorithms.push(alg);
            }
        }
        for alg in russh::Preferred::DEFAULT.key.iter() {
            if !algorithms.contains(alg) {
                algorithms.push(alg.clone());
            }
        }
        algorithms
    }

    /// Whether the server's key is trusted: a pinned fingerprint, or the key
    /// known_hosts records for this host. Reads a file: call it off the
    /// runtime.
    pub fn check(&self, key: &PublicKey) -> Result<(), HostKeyError> {
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let recorded = self.recorded()?;
        let algorithm = key.algorithm().to_string();
        let known_hosts = self.known_hosts.display().to_string();
        if let Some(r) = recorded
            .iter()
            .find(|r| r.revoked && r.key.key_data() == key.key_data())
        {
            return Err(HostKeyError::Revoked {
                host: self.host.clone(),
                port: self.port,
                fingerprint,
                known_hosts,
                line: r.line,
            });
        }
        if self.pins.contains(&fingerprint) {
            return Ok(());
        }
        let mut changed = None;
        for r in recorded.iter().filter(|r| !r.revoked) {
            if r.key.key_data() == key.key_data() {
                return Ok(());
            }
            if r.key.algorithm() == key.algorithm() && changed.is_none() {
                changed = Some(r.line);
            }
        }
        Err(match changed {
            Some(line) => HostKeyError::Changed {
                host: self.host.clone(),
                port: self.port,
                algorithm,
                fingerprint,
                known_hosts,
                line,
            },
            None => HostKeyError::Unknown {
                host: self.host.clone(),
                port: self.port,
                algorithm,
                fingerprint,
                known_hosts,
            },
        })
    }
}

/// Parses an OpenSSH public key line (`ssh-ed25519 AAAA... comment`).
pub fn parse_public_key_line(line: &str) -> Result<PublicKey, ssh_key::Error> {
    PublicKey::from_openssh(line.trim())
}

#[cfg(test)]
mod proptests {
    use super::*;
    use crate::proptest_config::{config, text};
    use proptest::prelude::*;

    /// Key-file-shaped text: PEM and OpenSSH armour around random or
    /// base64 bodies, encryption markers, public key lines.
    fn key_text() -> impl Strategy<Value = Vec<u8>> {
        let armour = proptest::sample::select(vec![
            "OPENSSH PRIVATE KEY",
            "RSA PRIVATE KEY",
            "PRIVATE KEY",
            "EC PRIVATE KEY",
            "ENCRYPTED PRIVATE KEY",
            "DSA PRIVATE KEY",
        ]);
        let body = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300)
                .prop_map(|b| data_encoding::BASE64.encode(&b)),
            Just(
                "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW".to_owned()
            ),
            text(),
        ];
        prop_oneof![
            (armour, body, any::<bool>()).prop_map(|(armour, body, proc)| {
                let proc = if proc {
                    "Proc-Type: 4,ENCRYPTED\n\n"
                } else {
                    ""
                };
                format!("-----BEGIN {armour}-----\n{proc}{body}\n-----END {armour}-----\n")
                    .into_bytes()
            }),
            text().prop_map(|t| format!("ssh-ed25519 {t}").into_bytes()),
            proptest::collection::vec(any::<u8>(), 0..200),
        ]
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn key_files_give_a_key_or_a_typed_error(text in key_text()) {
            match ClientKey::parse(&text, Path::new("/keys/id")) {
                Ok(key) => prop_assert!(!key.md5_fingerprint().is_empty()),
                Err(error) => prop_assert!(error.to_string().contains("/keys/id")),
            }
        }

        #[test]
        fn public_key_lines_never_panic(line in text(), blob in proptest::collection::vec(any::<u8>(), 0..120)) {
            let _ = parse_public_key_line(&line);
            let _ = parse_public_key_line(&format!("ssh-ed25519 {}", data_encoding::BASE64.encode(&blob)));
            let _ = parse_public_key_line(&format!("ssh-rsa {} c", data_encoding::BASE64.encode(&blob)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Test keys made with ssh-keygen for these tests only; they guard nothing.
    const ED25519: &str = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
QyNTUxOQAAACBh+5jlz5RJ4+MutvKgrI879cybp9a4HGoRCXGMblN71AAAAJhLSTReS0k0
XgAAAAtzc2gtZWQyNTUxOQAAACBh+5jlz5RJ4+MutvKgrI879cybp9a4HGoRCXGMblN71A
AAAEAERXiIQEp/aIorJpHZsDG6nG6gAhKiahj2MMgQxKfeVGH7mOXPlEnj4y628qCsjzv1
zJun1rgcahEJcYxuU3vUAAAAEXRlc3RAemltZmFybS10ZXN0AQIDBA==
-----END OPENSSH PRIVATE KEY-----
";
    const ED25519_PUB: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGH7mOXPlEnj4y628qCsjzv1zJun1rgcahEJcYxuU3vU test@zimfarm-test";

    fn path() -> PathBuf {
        PathBuf::from("/keys/id")
    }

    #[test]
    fn ed25519_key_and_its_fingerprints() {
        let key = ClientKey::parse(ED25519.as_bytes(), &path()).unwrap();
        assert_eq!(key.algorithm(), "ssh-ed25519");
        let public = parse_public_key_line(ED25519_PUB).unwrap();
        assert_eq!(
            key.sha256_fingerprint(),
            public.fingerprint(HashAlg::Sha256).to_string()
        );
        let blob_b64 = ED25519_PUB.split(' ').nth(1).unwrap();
        assert_eq!(key.public_key_base64(), blob_b64);
        // `ssh-keygen -l -E md5` of the same key, without the colons.
        assert_eq!(key.md5_fingerprint(), "58e42c1dff744f825d31a92a7a4d9db0");
        let shown = format!("{key:?}");
        assert!(shown.contains("ssh-ed25519") && shown.contains("SHA256:"));
        assert!(!shown.contains("b3BlbnNzaC1rZXkt"), "{shown}");
    }

    #[test]
    fn bad_key_files_say_what_is_wrong() {
        let e = ClientKey::parse(ED25519_PUB.as_bytes(), &path()).unwrap_err();
        assert!(e.to_string().contains("public key"), "{e}");
        let e = ClientKey::parse(b"hello", &path()).unwrap_err();
        assert!(matches!(e, KeyError::Unsupported { .. }), "{e}");
        let e = ClientKey::parse(&[0xff, 0xfe], &path()).unwrap_err();
        assert!(e.to_string().contains("not text"), "{e}");
        let e = ClientKey::parse(
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
            &path(),
        )
        .unwrap_err();
        assert!(matches!(e, KeyError::Encrypted { .. }), "{e}");
    }

    #[tokio::test]
    async fn missing_key_file_names_the_variable() {
        let e = ClientKey::load(Path::new("/nonexistent/id_rsa"))
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("SSH_KEY") && text.contains("/nonexistent/id_rsa"),
            "{text}"
        );
    }

    #[test]
    fn host_key_trust_by_pin_known_hosts_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let kh = dir.path().join("known_hosts");
        let key = parse_public_key_line(ED25519_PUB).unwrap();
        let fp = key.fingerprint(HashAlg::Sha256).to_string();

        // Nothing known: refused, and the message shows how to pin.
        let trust = HostKeyTrust::new("127.0.0.1", 2222, &kh, &[]);
        let e = trust.check(&key).unwrap_err();
        assert!(matches!(e, HostKeyError::Unknown { .. }));
        assert!(
            e.to_string().contains(&format!("WAREHOUSE_HOST_KEY={fp}")),
            "{e}"
        );

        // Pinned.
        let trust = HostKeyTrust::new("127.0.0.1", 2222, &kh, std::slice::from_ref(&fp));
        trust.check(&key).unwrap();

        // In known_hosts, under [host]:port.
        std::fs::write(&kh, format!("[127.0.0.1]:2222 {ED25519_PUB}\n")).unwrap();
        let trust = HostKeyTrust::new("127.0.0.1", 2222, &kh, &[]);
        trust.check(&key).unwrap();
        assert_eq!(trust.preferred_algorithms()[0], Algorithm::Ed25519);
        // Another port is another host.
        let trust = HostKeyTrust::new("127.0.0.1", 2223, &kh, &[]);
        assert!(matches!(
            trust.check(&key),
            Err(HostKeyError::Unknown { .. })
        ));

        // A different key of the same type for this host: changed.
        let other =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAYHefqnkxcjBYUgL5RMARCj7ujB766GuZbUV5U0ze8J";
        std::fs::write(&kh, format!("# comment\n[127.0.0.1]:2222 {other}\n")).unwrap();
        let trust = HostKeyTrust::new("127.0.0.1", 2222, &kh, &[]);
        match trust.check(&key) {
            Err(e @ HostKeyError::Changed { line: 2, .. }) => {
                assert!(e.to_string().contains("NOT the key"), "{e}");
            }
            other => panic!("expected a changed key at line 2, got {other:?}"),
        }
        // An explicit pin wins over a stale known_hosts line.
        let trust = HostKeyTrust::new("127.0.0.1", 2222, &kh, &[fp]);
        trust.check(&key).unwrap();
    }
}
