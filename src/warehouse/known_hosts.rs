//! A reader for OpenSSH `known_hosts` files: the lines that name a host
//! (plain, `[host]:port`, wildcards, negations, hashed `|1|` entries) and
//! their keys, with `@revoked` honoured and `@cert-authority` ignored.
//!
//! Written here rather than taken from russh, whose reader splits on single
//! spaces, gives up on the whole file at one bad line and numbers lines
//! without their comments. It owns parsing only: no I/O, no verdicts.

use data_encoding::BASE64;
use hmac::{Hmac, KeyInit, Mac};
use russh::keys::PublicKey;
use sha1::Sha1;

/// One key recorded for the host asked about.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// 1-based line number in the file.
    pub line: usize,
    pub key: PublicKey,
    /// From a `@revoked` line: this key must never be trusted.
    pub revoked: bool,
}

/// The keys `text` records for `host` at `port`. Lines that cannot be
/// parsed are skipped (OpenSSH does the same).
pub fn keys_for(text: &str, host: &str, port: u16) -> Vec<Recorded> {
    let name = if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    };
    let mut found = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let Some(mut first) = fields.next() else {
            continue;
        };
        let mut revoked = false;
        if first.starts_with('@') {
            match first {
                "@revoked" => revoked = true,
                _ => continue, // @cert-authority: host certificates are not used
            }
            let Some(next) = fields.next() else { continue };
            first = next;
        }
        let (Some(key_type), Some(blob)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !hosts_match(first, &name) {
            continue;
        }
        let Ok(key) = PublicKey::from_openssh(&format!("{key_type} {blob}")) else {
            continue;
        };
        found.push(Recorded {
            line: index + 1,
            key,
            revoked,
        });
    }
    found
}

/// OpenSSH's rule: some pattern matches and no negated pattern does.
fn hosts_match(patterns: &str, name: &str) -> bool {
    if let Some(hashed) = patterns.strip_prefix("|1|") {
        return hashed_match(hashed, name);
    }
    let mut matched = false;
    for pattern in patterns.split(',') {
        if let Some(negated) = pattern.strip_prefix('!') {
            if glob(negated, name) {
                return false;
            }
        } else if glob(pattern, name) {
            matched = true;
        }
    }
    matched
}

/// `|1|<salt>|<hmac-sha1(salt, name)>`, both base64.
fn hashed_match(hashed: &str, name: &str) -> bool {
    let Some((salt, hash)) = hashed.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (
        BASE64.decode(salt.as_bytes()),
        BASE64.decode(hash.as_bytes()),
    ) else {
        return false;
    };
    let Ok(mac) = <Hmac<Sha1> as KeyInit>::new_from_slice(&salt) else {
        return false;
    };
    mac.chain_update(name.as_bytes())
        .verify_slice(&hash)
        .is_ok()
}

/// `*` and `?` wildcards, case-insensitive like host names.
fn glob(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.to_ascii_lowercase().chars().collect();
    let n: Vec<char> = name.to_ascii_lowercase().chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod proptests {
    use super::*;
    use crate::proptest_config::{config, text};
    use proptest::prelude::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGH7mOXPlEnj4y628qCsjzv1zJun1rgcahEJcYxuU3vU";

    fn hashed(salt: &[u8], name: &str) -> String {
        let mac = <Hmac<Sha1> as KeyInit>::new_from_slice(salt)
            .expect("HMAC takes any key length")
            .chain_update(name.as_bytes())
            .finalize()
            .into_bytes();
        format!("|1|{}|{}", BASE64.encode(salt), BASE64.encode(&mac))
    }

    /// known_hosts-shaped lines: markers, plain/ported/wildcard/negated/
    /// hashed host fields, good and bad key types and base64, comments.
    fn line() -> impl Strategy<Value = String> {
        let marker =
            proptest::sample::select(vec!["", "", "@revoked ", "@cert-authority ", "@", "@x "]);
        let host = prop_oneof![
            Just("wh.example".to_owned()),
            Just("[wh.example]:1522".to_owned()),
            Just("*.example,!bad.example".to_owned()),
            Just("|1|".to_owned()),
            Just("|1|!!|??".to_owned()),
            proptest::collection::vec(any::<u8>(), 0..40)
                .prop_map(|salt| hashed(&salt, "[wh.example]:1522")),
            text(),
        ];
        let key_type = proptest::sample::select(vec![
            "ssh-ed25519",
            "ssh-rsa",
            "ecdsa-sha2-nistp256",
            "",
            "ssh-ed25519 ssh-ed25519",
        ]);
        let blob = prop_oneof![
            Just(KEY.split(' ').nth(1).unwrap_or_default().to_owned()),
            Just("AAAA".to_owned()),
            Just("!!notbase64".to_owned()),
            proptest::collection::vec(any::<u8>(), 0..80).prop_map(|b| BASE64.encode(&b)),
            text(),
        ];
        let sep = proptest::sample::select(vec![" ", "\t", "  ", " \t "]);
        (marker, host, sep.clone(), key_type, sep, blob, text()).prop_map(
            |(marker, host, s1, key_type, s2, blob, comment)| {
                format!("{marker}{host}{s1}{key_type}{s2}{blob} {comment}")
            },
        )
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn any_lines_give_keys_from_real_lines_only(
            lines in proptest::collection::vec(prop_oneof![line(), text()], 0..8),
            host in prop_oneof![Just("wh.example".to_owned()), text()],
            port in prop_oneof![Just(22_u16), Just(1522), any::<u16>()],
        ) {
            let file = lines.join("\n");
            let found = keys_for(&file, &host, port);
            let count = file.lines().count();
            prop_assert!(found.len() <= count);
            for r in &found {
                prop_assert!(r.line >= 1 && r.line <= count);
            }
        }

        #[test]
        fn a_hashed_entry_for_the_host_is_found(
            salt in proptest::collection::vec(any::<u8>(), 1..64),
            before in proptest::collection::vec(line(), 0..4),
            revoked in any::<bool>(),
        ) {
            let marker = if revoked { "@revoked " } else { "" };
            let entry = format!("{marker}{} {KEY}", hashed(&salt, "[wh.example]:1522"));
            let prefix: String = before.iter().map(|l| format!("{l}\n")).collect();
            let found = keys_for(&format!("{prefix}{entry}"), "wh.example", 1522);
            let last = found.last().expect("the hashed entry is found");
            prop_assert_eq!(last.line, prefix.lines().count() + 1);
            prop_assert_eq!(last.revoked, revoked);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGH7mOXPlEnj4y628qCsjzv1zJun1rgcahEJcYxuU3vU";
    const B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAYHefqnkxcjBYUgL5RMARCj7ujB766GuZbUV5U0ze8J";

    #[test]
    fn plain_ported_wildcard_and_negated_hosts() {
        let text = format!(
            "# comment\n\n[wh.example]:1522 {A}\nwh.example {B}\n\
             *.farm.example,!bad.farm.example\t{A} comment here\n\
             garbage line\n[wh.example]:1522 ssh-ed25519 !!notbase64\n"
        );
        let found = keys_for(&text, "wh.example", 1522);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].line, 3);
        let found = keys_for(&text, "wh.example", 22);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].line, 4);
        assert_eq!(keys_for(&text, "w.farm.example", 22).len(), 1);
        assert_eq!(keys_for(&text, "W.FARM.example", 22)[0].line, 5);
        assert!(keys_for(&text, "bad.farm.example", 22).is_empty());
        assert!(keys_for(&text, "other", 1522).is_empty());
    }

    #[test]
    fn hashed_hosts_and_markers() {
        // Made with `ssh-keygen -H` for the name [127.0.0.1]:2222.
        let salt = BASE64.encode(b"0123456789abcdefghij");
        let mac = <Hmac<Sha1> as KeyInit>::new_from_slice(b"0123456789abcdefghij")
            .unwrap()
            .chain_update(b"[127.0.0.1]:2222")
            .finalize()
            .into_bytes();
        let hashed = format!("|1|{salt}|{}", BASE64.encode(&mac));
        let text = format!("{hashed} {A}\n@revoked [127.0.0.1]:2222 {B}\n@cert-authority * {B}\n");
        let found = keys_for(&text, "127.0.0.1", 2222);
        assert_eq!(found.len(), 2);
        assert!(!found[0].revoked);
        assert!(found[1].revoked);
        assert!(keys_for(&text, "127.0.0.1", 2223).is_empty());
    }

    #[test]
    fn globs() {
        assert!(glob("*", "x"));
        assert!(glob("a?c", "abc"));
        assert!(glob("*.b.*", "a.b.c"));
        assert!(!glob("a*d", "abc"));
        assert!(glob("[h]:1*", "[h]:1522"));
    }
}
