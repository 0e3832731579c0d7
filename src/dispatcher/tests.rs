//! Tests of the dispatcher client: token answers, key lists, URLs and
//! messages that never show a secret.

use std::time::Duration;

use serde_json::Value;

use super::error::{BODY_QUOTE_CHARS, oauth2_error, quote_body};
use super::token::{DEFAULT_EXPIRES_IN, MIN_REFRESH_DELAY, TokenAnswer, refresh_delay};
use super::*;

mod proptests {
    use super::*;
    use crate::proptest_config::{config, json, text};
    use proptest::prelude::*;

    const TOKEN_KEYS: &[&str] = &[
        "access_token",
        "token_type",
        "expires_in",
        "refresh_token",
        "error",
        "error_description",
    ];
    const KEY_KEYS: &[&str] = &["name", "fingerprint", "key", "type", "added", "last_used"];

    /// Objects with the given keys, each present or not, of any type.
    fn object(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
        proptest::collection::vec((proptest::sample::select(keys), json(keys)), 0..8).prop_map(
            |fields| Value::Object(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()),
        )
    }

    fn body(keys: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            json(keys).prop_map(|v| v.to_string().into_bytes()),
            object(keys).prop_map(|v| v.to_string().into_bytes()),
            proptest::collection::vec(object(keys), 0..4)
                .prop_map(|v| Value::Array(v).to_string().into_bytes()),
        ]
    }

    #[test]
    fn negative_zero_expires_in_is_zero() {
        let answer = TokenAnswer::parse(br#"{"access_token": "a", "expires_in": -0.0}"#)
            .expect("-0.0 is in range");
        assert_eq!(answer.expires_in, Duration::ZERO);
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn token_answers_never_panic_nor_quote_a_token(body in body(TOKEN_KEYS)) {
            match TokenAnswer::parse(&body) {
                Ok(answer) => {
                    prop_assert!(!answer.access_token.expose().is_empty());
                    prop_assert!(answer.expires_in < Duration::from_secs(1_000_000_000));
                }
                Err(message) => {
                    // The message is one of the fixed texts: no value in it.
                    prop_assert!(message.starts_with("the token answer"));
                }
            }
            let error = oauth2_error(&body);
            prop_assert!(error.chars().count() <= BODY_QUOTE_CHARS * 2 + 3);
        }

        #[test]
        fn valid_token_answer_reads_back(
            access in "[!-~]{1,64}",
            refresh in proptest::option::of("[!-~]{1,64}"),
            expires_in in 0..1_000_000_000_u64,
            as_string in any::<bool>(),
        ) {
            let expires: Value = if as_string { expires_in.to_string().into() } else { expires_in.into() };
            let body = serde_json::json!({
                "access_token": access,
                "token_type": "Bearer",
                "expires_in": expires,
                "refresh_token": refresh,
            });
            let answer = TokenAnswer::parse(body.to_string().as_bytes())
                .map_err(TestCaseError::fail)?;
            prop_assert_eq!(answer.access_token.expose(), access.as_str());
            prop_assert_eq!(answer.refresh_token.as_ref().map(Secret::expose), refresh.as_deref());
            prop_assert_eq!(answer.expires_in, Duration::from_secs(expires_in));
        }

        #[test]
        fn key_lists_never_panic(body in body(KEY_KEYS), md5 in text()) {
            if let Ok(keys) = serde_json::from_slice::<Vec<RegisteredKey>>(&body) {
                for key in keys {
                    let _ = key.matches_fingerprint(&md5);
                    prop_assert!(key.matches_fingerprint(&key.fingerprint.clone()));
                }
            }
            let quoted = quote_body(&body);
            prop_assert!(quoted.chars().count() <= BODY_QUOTE_CHARS + 1);
        }
    }
}

mod units {
    use super::*;

    #[test]
    fn endpoints_keep_the_base_path_and_encode_the_username() {
        let d = Dispatcher::new("https://farm.example/api/", "a b/c", Secret::new("pw")).unwrap();
        assert_eq!(
            d.inner.token_url.as_str(),
            "https://farm.example/api/auth/oauth2"
        );
        assert_eq!(
            d.inner.keys_url.as_str(),
            "https://farm.example/api/users/a%20b%2Fc/keys"
        );
        let d = Dispatcher::new("http://127.0.0.1:8080", "bob", Secret::new("pw")).unwrap();
        assert_eq!(
            d.inner.token_url.as_str(),
            "http://127.0.0.1:8080/auth/oauth2"
        );
        assert_eq!(d.url(), "http://127.0.0.1:8080/");
    }

    #[test]
    fn bad_urls_are_refused() {
        for url in ["farm.openzim.org/api", "ftp://farm.example/", "mailto:x@y"] {
            let e = Dispatcher::new(url, "bob", Secret::new("pw")).unwrap_err();
            assert!(
                matches!(e, DispatcherError::InvalidUrl { .. }),
                "{url}: {e}"
            );
            assert!(e.to_string().starts_with("DISPATCHER_URL"), "{e}");
        }
    }

    #[test]
    fn debug_and_messages_show_no_secret() {
        let d = Dispatcher::new(
            "https://user:hunter2@farm.example/api",
            "bob",
            Secret::new("s3cr3t"),
        )
        .unwrap();
        let debug = format!("{d:?}");
        assert!(
            !debug.contains("s3cr3t") && !debug.contains("hunter2"),
            "{debug}"
        );
        assert!(debug.contains("bob"), "{debug}");
        assert_eq!(d.url(), "https://farm.example/api");
    }

    #[test]
    fn refresh_happens_at_80_percent_and_never_in_a_busy_loop() {
        assert_eq!(
            refresh_delay(Duration::from_secs(5)),
            Duration::from_secs(4)
        );
        assert_eq!(
            refresh_delay(Duration::from_secs(3600)),
            Duration::from_secs(2880)
        );
        assert_eq!(refresh_delay(Duration::ZERO), MIN_REFRESH_DELAY);
    }

    #[test]
    fn token_answers_are_read_without_quoting_tokens() {
        let t = TokenAnswer::parse(
            br#"{"access_token":"AT","token_type":"bearer","expires_in":3600,"refresh_token":"RT"}"#,
        )
        .ok()
        .unwrap();
        assert_eq!(t.access_token.expose(), "AT");
        assert_eq!(t.refresh_token.as_ref().map(Secret::expose), Some("RT"));
        assert_eq!(t.expires_in, Duration::from_secs(3600));

        let t = TokenAnswer::parse(br#"{"access_token":"AT"}"#)
            .ok()
            .unwrap();
        assert!(t.refresh_token.is_none());
        assert_eq!(t.expires_in, DEFAULT_EXPIRES_IN);

        for bad in [
            &br#"{"token_type":"bearer","refresh_token":"SECRET-RT"}"#[..],
            br#"{"access_token":"SECRET-AT","token_type":"mac"}"#,
            br#"{"access_token":"SECRET-AT","expires_in":"SECRET-X"}"#,
            br#"{"access_token":"SECRET-AT","refresh_token":["SECRET-RT"]}"#,
            b"SECRET-AT",
        ] {
            let detail = TokenAnswer::parse(bad).err().unwrap();
            assert!(!detail.contains("SECRET"), "{detail}");
        }
    }

    #[test]
    fn registered_keys_tolerate_missing_and_extra_fields() {
        let keys: Vec<RegisteredKey> = serde_json::from_str(
            r#"[{"name":"laptop","fingerprint":"0a1b","key":"AAAA","type":"RSA",
                 "added":"2019-05-01T10:00:00Z","last_used":null,"pkcs8_key":"-----BEGIN"},
                {"fingerprint":"ff00","added":{"$date":1556704800000}}]"#,
        )
        .unwrap();
        assert_eq!(keys[0].key_type.as_deref(), Some("RSA"));
        assert_eq!(keys[0].last_used, None);
        assert_eq!(keys[1].name, "");
        assert_eq!(keys[1].added.as_deref(), Some(r#"{"$date":1556704800000}"#));
        assert!(keys[0].matches_fingerprint("MD5:0A:1B"));
        assert!(keys[0].matches_fingerprint("0a1b"));
        assert!(!keys[0].matches_fingerprint("0a1c"));
    }

    #[test]
    fn messages_say_what_to_do() {
        let e = DispatcherError::BadCredentials {
            username: "bob".into(),
        };
        assert_eq!(
            e.to_string(),
            "the dispatcher refused USERNAME/PASSWORD for bob: check them \
             (they are your Zimfarm account's)"
        );
        assert!(!e.is_transient());
        let e = DispatcherError::Unreachable {
            url: "http://x/".into(),
            detail: "connection refused".into(),
        };
        assert!(e.to_string().contains("check DISPATCHER_URL"), "{e}");
        assert!(e.is_transient());
        assert!(
            DispatcherError::Http {
                status: 503,
                url: String::new(),
                body: String::new()
            }
            .is_transient()
        );
    }

    #[test]
    fn bodies_are_quoted_short() {
        assert_eq!(quote_body(b"  "), "(empty answer)");
        let long = "é".repeat(1000);
        let q = quote_body(long.as_bytes());
        assert_eq!(q.chars().count(), BODY_QUOTE_CHARS + 1);
        assert_eq!(
            oauth2_error(br#"{"error":"invalid_grant","error_description":"Username or password is invalid."}"#),
            "invalid_grant: Username or password is invalid."
        );
    }
}
