/// The variables configuration loading reads.
fn config_names() -> Vec<&'static str> {
    super::vars::TABLE
        .iter()
        .filter(|i| i.by == super::vars::ReadBy::Config)
        .map(|i| i.name)
        .collect()
}

mod proptests {
    use super::super::*;
    use super::config_names;
    use crate::proptest_config::{config, text};
    use proptest::prelude::*;
    use std::os::unix::ffi::OsStringExt as _;

    /// A value: tricky text, numbers, paths, URLs, or bytes that are not UTF-8.
    fn value() -> impl Strategy<Value = OsString> {
        prop_oneof![
            text().prop_map(OsString::from),
            any::<i64>().prop_map(|n| OsString::from(n.to_string())),
            any::<f64>().prop_map(|n| OsString::from(n.to_string())),
            proptest::sample::select(vec![
                "",
                " ",
                "0",
                "-1",
                "18446744073709551616",
                "1e309",
                "NaN",
                "/",
                "/srv/zim",
                "relative",
                "default",
                "default,small",
                "always",
                "amqp://u:p@h:1/v",
                "amqps://h",
                "http://x",
                "json",
                "docker",
                "simulate",
                "openzim/*",
                "127.0.0.1:0",
                "[::1]:9",
                "node1",
                "default_node_name",
            ])
            .prop_map(OsString::from),
            proptest::collection::vec(any::<u8>(), 0..16).prop_map(OsString::from_vec),
        ]
    }

    /// Known names (as-is or in the wrong case) and unknown ones.
    fn name() -> impl Strategy<Value = OsString> {
        prop_oneof![
            4 => proptest::sample::select(config_names()).prop_map(OsString::from),
            1 => proptest::sample::select(config_names())
                .prop_map(|n| OsString::from(n.to_lowercase())),
            1 => proptest::collection::vec(any::<u8>(), 0..8).prop_map(OsString::from_vec),
        ]
    }

    fn base() -> Vec<(OsString, OsString)> {
        [
            ("USERNAME", "alice"),
            ("PASSWORD", "pass"),
            ("WORKING_DIR", "/srv/zim"),
            ("NODE_NAME", "node1"),
            ("QUEUES", "default"),
            ("TASK_RUNNER", "simulate"),
        ]
        .into_iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)))
        .collect()
    }

    fn check(result: Result<Config, ConfigError>) -> Result<(), TestCaseError> {
        if let Err(error) = result {
            prop_assert!(
                error.var == "environment" || config_names().contains(&error.var),
                "{}",
                error
            );
            prop_assert!(!error.problem.is_empty());
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn any_environment_gives_a_config_or_a_config_error(
            vars in proptest::collection::vec((name(), value()), 0..12),
        ) {
            check(Config::from_vars(vars))?;
        }

        #[test]
        fn any_value_of_a_valid_environment_gives_a_config_or_a_config_error(
            extra in proptest::collection::vec(
                (proptest::sample::select(config_names()), value()),
                1..4,
            ),
        ) {
            let mut vars = base();
            vars.retain(|(k, _)| !extra.iter().any(|(e, _)| k == e));
            vars.extend(extra.into_iter().map(|(k, v)| (OsString::from(k), v)));
            check(Config::from_vars(vars))?;
        }
    }
}

mod unit {
    use super::super::*;
    use crate::config::load::PIDBOX_SUFFIX;
    use crate::config::vars::{self, ReadBy, TABLE, Unset};
    use lapin::uri::AMQPScheme;

    /// The README's Environment table lists exactly the variables of the
    /// table, in its order, each with what unset means: a new one cannot go
    /// undocumented, nor a removed one stay documented, nor a default
    /// change in one place only.
    #[test]
    fn the_readme_documents_every_variable_and_no_other() {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("\n## Environment\n")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("the README has an Environment section");
        let rows: Vec<(&str, &str)> = section
            .lines()
            .filter_map(|line| line.strip_prefix("| `"))
            .filter_map(|line| {
                let (name, rest) = line.split_once('`')?;
                let unset = rest.trim_end_matches('|').rsplit(" | ").next()?;
                Some((name, unset.trim()))
            })
            .collect();
        let documented: Vec<&str> = rows.iter().map(|(name, _)| *name).collect();
        let defined: Vec<&str> = TABLE.iter().map(|info| info.name).collect();
        assert_eq!(documented, defined);
        for ((name, column), info) in rows.iter().zip(TABLE) {
            let starts = match info.unset {
                Unset::Required => "required".to_owned(),
                Unset::Value(v) => format!("`{v}`"),
                Unset::Means(m) => m.to_owned(),
            };
            assert!(
                column.starts_with(&starts),
                "{name}: the README says {column:?}, the table {starts:?}"
            );
        }
    }

    /// Every default is a value its own parser takes.
    #[test]
    fn every_default_parses() {
        for info in TABLE.iter().filter(|i| i.by == ReadBy::Config) {
            if let Unset::Value(v) = info.unset {
                let vars = with(&[(info.name, v)]);
                load(&vars).unwrap_or_else(|e| panic!("{}={v}: {e}", info.name));
            }
        }
    }

    fn base() -> Vec<(&'static str, &'static str)> {
        vec![
            ("USERNAME", "alice"),
            ("PASSWORD", "s3cr3t pass"),
            ("WORKING_DIR", "/srv/zim"),
            ("NODE_NAME", "node1"),
            ("QUEUES", "default, small"),
            ("TASK_RUNNER", "simulate"),
        ]
    }

    fn load(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(
            vars.iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        )
    }

    fn with<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut vars: Vec<_> = base()
            .into_iter()
            .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
            .collect();
        vars.extend_from_slice(extra);
        vars
    }

    #[test]
    fn seed_variables_with_defaults() {
        let c = load(&base()).unwrap();
        assert_eq!(c.hostname(), "alice@node1");
        assert_eq!(c.broker.queues, vec![QueueName::Default, QueueName::Small]);
        assert_eq!(c.pipeline.zim_dir, PathBuf::from("/zim_files"));
        assert_eq!(c.pipeline.working_dir, PathBuf::from("/srv/zim"));
        assert_eq!(c.worker.runner, RunnerKind::Simulate);
        assert_eq!(c.pipeline.pull_policy, PullPolicy::Always);
        assert_eq!(c.pipeline.idle_timeout, Duration::from_secs(7200));
        assert_eq!(
            c.dispatcher.url,
            vars::DISPATCHER_URL.default_value().unwrap()
        );
        assert!(c.worker.concurrency >= 1);
        let uri = c.broker.url.uri();
        assert_eq!(uri.scheme, AMQPScheme::AMQPS);
        assert_eq!(uri.authority.host, "farm.openzim.org");
        assert_eq!(uri.authority.port, 5671);
        assert_eq!(uri.authority.userinfo.password, "s3cr3t pass");
        assert_eq!(uri.vhost, "zimfarm");
        assert_eq!(c.warehouse.port, 1522);
        assert_eq!(
            Some(c.warehouse.host.as_str()),
            vars::WAREHOUSE_HOST.default_value()
        );
        assert_eq!(c.warehouse.username, "alice");
        assert_eq!(
            c.warehouse.ssh_key,
            PathBuf::from(vars::SSH_KEY.default_value().unwrap())
        );
        assert_eq!(
            c.warehouse.known_hosts,
            PathBuf::from(vars::WAREHOUSE_KNOWN_HOSTS.default_value().unwrap())
        );
        assert!(c.warehouse.host_key_pins.is_empty());
        assert_eq!(
            Some(c.warehouse.upload_retries.to_string().as_str()),
            vars::UPLOAD_RETRIES.default_value()
        );
        assert_eq!(c.warehouse.upload_streams, UploadStreams::Auto);
    }

    #[test]
    fn warehouse_variables() {
        let pin = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s";
        let pins = format!("{pin}, SHA256:{}", "A".repeat(43));
        let mut vars = base();
        vars.extend([
            ("WAREHOUSE_HOST", "127.0.0.1"),
            ("WAREHOUSE_PORT", "2222"),
            ("WAREHOUSE_KNOWN_HOSTS", "/etc/kh"),
            ("WAREHOUSE_HOST_KEY", pins.as_str()),
            ("UPLOAD_RETRIES", "0"),
            ("UPLOAD_STREAMS", "16"),
        ]);
        let c = load(&vars).unwrap();
        assert_eq!(c.warehouse.upload_streams, UploadStreams::Fixed(16));
        assert_eq!(c.warehouse.port, 2222);
        assert_eq!(c.warehouse.known_hosts, PathBuf::from("/etc/kh"));
        assert_eq!(c.warehouse.host_key_pins.len(), 2);
        assert_eq!(c.warehouse.host_key_pins[0], pin);
        assert_eq!(c.warehouse.upload_retries, 0);
        for auto in ["auto", " AUTO ", ""] {
            let mut vars = base();
            vars.push(("UPLOAD_STREAMS", auto));
            assert_eq!(
                load(&vars).unwrap().warehouse.upload_streams,
                UploadStreams::Auto
            );
        }
        for (var, value) in [
            ("WAREHOUSE_HOST_KEY", "MD5:aa:bb"),
            ("WAREHOUSE_HOST_KEY", "SHA256:short"),
            ("WAREHOUSE_KNOWN_HOSTS", "relative/kh"),
            ("UPLOAD_RETRIES", "-1"),
            ("UPLOAD_RETRIES", "many"),
            ("UPLOAD_STREAMS", "0"),
            ("UPLOAD_STREAMS", "17"),
            ("UPLOAD_STREAMS", "fast"),
        ] {
            let mut vars = base();
            vars.push((var, value));
            let e = load(&vars).unwrap_err();
            assert_eq!(e.var, var, "{value}: {e}");
        }
    }

    #[test]
    fn secrets_never_print() {
        let c = load(&base()).unwrap();
        let shown = format!("{c:?} {}", c.broker.url);
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("***"));
    }

    #[test]
    fn missing_required_names_the_variable() {
        for var in ["USERNAME", "PASSWORD", "WORKING_DIR", "NODE_NAME", "QUEUES"] {
            let vars: Vec<_> = base().into_iter().filter(|(k, _)| *k != var).collect();
            let err = load(&vars).unwrap_err();
            assert_eq!(err.var, var);
            assert!(err.to_string().contains(var), "{err}");
        }
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases: &[(&'static str, &'static str)] = &[
            ("NODE_NAME", "default_node_name"),
            ("NODE_NAME", "bad name"),
            ("NODE_NAME", "-x"),
            ("CONCURRENCY", "0"),
            ("CONCURRENCY", "two"),
            ("QUEUES", "huge"),
            ("QUEUES", " , "),
            ("WORKING_DIR", "relative/dir"),
            ("ZIM_DIR", "zim"),
            ("BROKER_URL", "http://x"),
            ("BROKER_URL", "amqp://u:p@host:notaport/v"),
            ("DISPATCHER_URL", "ftp://x"),
            ("RABBIT_PORT", "70000"),
            ("WAREHOUSE_PORT", "0"),
            ("WAREHOUSE_HOST", "bad host"),
            ("LOG_FORMAT", "xml"),
            ("TASK_RUNNER", "podman"),
            ("PULL_POLICY", "sometimes"),
            ("IDLE_TIMEOUT", "0"),
            ("MIN_FREE_DISK_MB", "lots"),
            ("KEPT_DIR_MAX_AGE", "a week"),
            ("CONTAINER_MEMORY_MB", "1"),
            ("CONTAINER_CPUS", "-1"),
            ("CONTAINER_LOG_MAX_MB", "-1"),
            ("CONTAINER_LOG_MAX_MB", "2000000"),
            ("IMAGE_ALLOWLIST", " , "),
            ("SHUTDOWN_GRACE", "-1"),
            ("USERNAME", "a@b"),
            ("METRICS_ADDR", "localhost:9090"),
            ("METRICS_ADDR", "0.0.0.0"),
            ("METRICS_ADDR", "0.0.0.0:99999"),
            ("WORKING_DIR", "/srv/a:b"),
            ("CONTROL_POLICY", "open"),
            ("CONTROL_POLICY", "Celery"),
            ("NODE_NAME", "node1\nINFO forged"),
            ("CONTAINER_PIDS", "0"),
            ("CONTAINER_PIDS", "63"),
            ("REDIS_MEMORY_MB", "0"),
            ("SCRAPER_NETWORK", "-net"),
            ("SCRAPER_NETWORK", "my net"),
        ];
        for (var, value) in cases {
            let err = load(&with(&[(var, value)])).unwrap_err();
            assert_eq!(&err.var, var, "{var}={value}: {err}");
        }
    }

    #[test]
    fn control_policy_is_node_unless_celery_is_asked() {
        let policy = |vars: &[(&str, &str)]| load(&with(vars)).unwrap().worker.control_policy;
        assert_eq!(policy(&[]), ControlPolicy::Node);
        assert_eq!(policy(&[("CONTROL_POLICY", "node")]), ControlPolicy::Node);
        assert_eq!(
            policy(&[("CONTROL_POLICY", " celery ")]),
            ControlPolicy::Celery
        );
        let err = load(&with(&[("CONTROL_POLICY", "all")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("CONTROL_POLICY is \"all\""), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }

    #[test]
    fn broker_url_overrides_and_keeps_password_out_of_errors() {
        let c = load(&with(&[(
            "BROKER_URL",
            "amqp://bob:p%40ss@127.0.0.1:5672/test",
        )]))
        .unwrap();
        assert_eq!(c.broker.url.uri().authority.userinfo.password, "p@ss");
        assert_eq!(c.broker.url.vhost(), "test");
        assert!(!c.broker.url.is_tls());
        let err = load(&with(&[("BROKER_URL", "amqp://bob:topsecret@h:99999/v")])).unwrap_err();
        assert!(!err.to_string().contains("topsecret"));
    }

    #[test]
    fn docker_log_copy_is_bounded_unless_zero() {
        let limit = |c: Config| c.pipeline.container_log_limit;
        assert_eq!(
            limit(load(&base()).unwrap()),
            Some(LogLimit {
                file_bytes: 10 << 20,
                files: 5
            })
        );
        let one = limit(load(&with(&[("CONTAINER_LOG_MAX_MB", "1")])).unwrap()).unwrap();
        assert_eq!(one.files, 5);
        assert!(one.file_bytes * 5 <= 1 << 20 && one.file_bytes > 200 << 10);
        assert_eq!(
            limit(load(&with(&[("CONTAINER_LOG_MAX_MB", "0")])).unwrap()),
            None
        );
    }

    #[test]
    fn the_box_has_limits_by_default_and_no_way_to_turn_pids_off() {
        let c = load(&base()).unwrap().pipeline;
        assert_eq!(c.container_pids, 4096);
        assert_eq!(c.redis_memory, 4096 << 20);
        assert_eq!(c.scraper_network, None);
        let err = load(&with(&[("CONTAINER_PIDS", "0")])).unwrap_err();
        assert!(err.to_string().contains("CONTAINER_PIDS"), "{err}");
        let c = load(&with(&[("SCRAPER_NETWORK", "my-scrapers.1")])).unwrap();
        assert_eq!(c.pipeline.scraper_network.as_deref(), Some("my-scrapers.1"));
    }

    #[test]
    fn metrics_addr_is_optional() {
        assert_eq!(load(&base()).unwrap().worker.metrics_addr, None);
        let c = load(&with(&[("METRICS_ADDR", "127.0.0.1:9090")])).unwrap();
        assert_eq!(
            c.worker.metrics_addr,
            Some("127.0.0.1:9090".parse().unwrap())
        );
        let c = load(&with(&[("METRICS_ADDR", "[::]:9100")])).unwrap();
        assert_eq!(c.worker.metrics_addr, Some("[::]:9100".parse().unwrap()));
    }

    #[test]
    fn queues_are_deduplicated() {
        let c = load(&with(&[("QUEUES", "small,small,debug")])).unwrap();
        assert_eq!(c.broker.queues, vec![QueueName::Small, QueueName::Debug]);
    }

    #[test]
    fn non_utf8_value_is_an_error() {
        use std::os::unix::ffi::OsStringExt;
        let mut vars: Vec<(OsString, OsString)> = base()
            .into_iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect();
        vars.push((
            OsString::from("NODE_NAME"),
            OsString::from_vec(vec![0xff, 0xfe]),
        ));
        let err = Config::from_vars(vars).unwrap_err();
        assert_eq!(err.var, "NODE_NAME");
    }

    #[test]
    fn dir_lengths_up_to_the_limit_are_taken() {
        let longest = format!("/{}", "d".repeat(MAX_DIR_LEN - 1));
        let c = load(&with(&[("WORKING_DIR", &longest), ("ZIM_DIR", &longest)])).unwrap();
        assert_eq!(c.pipeline.zim_dir.as_os_str().len(), MAX_DIR_LEN);
        let over = format!("/{}", "d".repeat(MAX_DIR_LEN));
        for var in ["WORKING_DIR", "ZIM_DIR"] {
            let err = load(&with(&[(var, &over)])).unwrap_err();
            assert_eq!(err.var, var);
            let text = err.to_string();
            assert!(
                text.contains(&MAX_DIR_LEN.to_string()) && !text.contains('\n'),
                "{text}"
            );
        }
    }

    #[test]
    fn pidbox_queue_name_fits_an_amqp_short_string() {
        let node = "p".repeat(63);
        let fits = "u".repeat(AMQP_NAME_MAX - 1 - 63 - PIDBOX_SUFFIX.len());
        let c = load(&with(&[("NODE_NAME", &node), ("USERNAME", &fits)])).unwrap();
        assert_eq!(
            crate::broker::control_queue_name(&c.hostname()).len(),
            AMQP_NAME_MAX
        );
        let over = format!("{fits}u");
        let err = load(&with(&[("NODE_NAME", &node), ("USERNAME", &over)])).unwrap_err();
        assert_eq!(err.var, "USERNAME");
        assert!(err.to_string().contains("255"), "{err}");
    }
}
