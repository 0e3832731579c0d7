//! Tests of [`super::plan`] and the task table.

use proptest::prelude::*;
use serde_json::{Map, Value, json};

use super::*;
use crate::celery::{Protocol, TimeLimit};

const ID: &str = "5f2a9c0e8b1d4e3f7a6b5c4d";
const REDIS: &str = "redis:///run/redis/redis.sock";

fn request(name: &str, args: Value, kwargs: Value) -> TaskRequest {
    TaskRequest {
        id: ID.into(),
        name: name.into(),
        args: args.as_array().cloned().expect("args is a list"),
        kwargs: kwargs.as_object().cloned().expect("kwargs is an object"),
        retries: 0,
        eta: None,
        expires: None,
        time_limit: TimeLimit::default(),
        root_id: None,
        parent_id: None,
        argsrepr: "()".into(),
        kwargsrepr: "{}".into(),
        origin: None,
        reply_to: None,
        correlation_id: None,
        protocol: Protocol::V2,
    }
}

fn plan_of(name: &str, args: Value, kwargs: Value) -> Result<TaskPlan, PlanError> {
    plan(&request(name, args, kwargs), &AllowList::default(), REDIS)
}

fn named(name: &str, kwargs: Value) -> Result<TaskPlan, PlanError> {
    plan_of(name, json!([]), kwargs)
}

fn image(name: &str, tag: &str) -> ImageRef {
    ImageRef {
        name: name.into(),
        tag: tag.into(),
    }
}

#[test]
fn task_names_round_trip() {
    for o in Offliner::ALL {
        assert_eq!(Offliner::from_task_name(o.task_name()), Some(o));
        assert_eq!(o.to_string(), o.task_name());
    }
    assert_eq!(Offliner::from_task_name("offliner.unknown"), None);
    assert_eq!(Offliner::from_task_name("celery.ping"), None);
}

#[test]
fn task_ids() {
    for good in [
        ID,
        "0b6c1a0e-6f1d-4a0b-9c57-7d8f1f2b3c4d",
        "a",
        "A_b-9",
        &"x".repeat(64),
    ] {
        assert_eq!(validate_task_id(good), Ok(()), "{good:?}");
    }
    for bad in [
        "",
        "../etc",
        "a/b",
        "a.b",
        ".",
        "a b",
        "a\nb",
        "a\u{0}",
        "tâche",
        "$(id)",
        &"x".repeat(65),
    ] {
        assert_eq!(
            validate_task_id(bad),
            Err(PlanError::InvalidTaskId { id: shown(bad) }),
            "{bad:?}"
        );
    }
}

#[test]
fn invalid_task_id_is_checked_first() {
    let mut bad = request("offliner.nope", json!([1, 2, 3, 4]), json!({}));
    bad.id = "../../etc".into();
    let err = plan(&bad, &AllowList::default(), REDIS).unwrap_err();
    assert!(matches!(err, PlanError::InvalidTaskId { .. }), "{err:?}");
    assert!(err.to_string().contains("\"../../etc\""), "{err}");
}

#[test]
fn unknown_task_is_refused() {
    let err = named("offliner.zimit", json!({"warehouse_path": "/x"})).unwrap_err();
    assert_eq!(
        err,
        PlanError::UnknownTask {
            name: "offliner.zimit".into()
        }
    );
    assert!(err.to_string().contains("offliner.mwoffliner"), "{err}");
}

#[test]
fn mwoffliner_plan() {
    let plan = named(
        "offliner.mwoffliner",
        json!({
            "flags": {"adminEmail": "contact@kiwix.org", "mwUrl": "https://en.wikipedia.org", "verbose": true},
            "image": {"name": "openzim/mwoffliner", "tag": "1.9"},
            "warehouse_path": "/wikipedia",
            "queue": "large",
        }),
    )
    .unwrap();
    assert_eq!(
        plan,
        TaskPlan {
            task_id: ID.into(),
            offliner: Offliner::Mwoffliner,
            image: image("openzim/mwoffliner", "1.9"),
            argv: vec![
                "mwoffliner".into(),
                "--adminEmail=contact@kiwix.org".into(),
                "--mwUrl=https://en.wikipedia.org".into(),
                "--verbose".into(),
                "--outputDirectory=/output".into(),
                format!("--redis={REDIS}"),
            ],
            output_dir: "/output",
            warehouse_path: "/wikipedia".into(),
            needs_redis: true,
            writes_progress: false,
        }
    );
}

#[test]
fn youtube_plan() {
    let plan = named(
        "offliner.youtube",
        json!({
            "flags": {"api-key": "k", "id": "UC123", "type": "channel"},
            "image": {"name": "openzim/youtube", "tag": "2.0"},
            "warehouse_path": "/videos/",
        }),
    )
    .unwrap();
    assert_eq!(
        plan,
        TaskPlan {
            task_id: ID.into(),
            offliner: Offliner::Youtube,
            image: image("openzim/youtube", "2.0"),
            argv: vec![
                "youtube2zim".into(),
                "--api-key=k".into(),
                "--id=UC123".into(),
                "--type=channel".into(),
                "--output=/output".into(),
                "--stats-filename=/output/.zimfarm-progress.json".into(),
            ],
            output_dir: "/output",
            warehouse_path: "/videos".into(),
            needs_redis: false,
            writes_progress: true,
        }
    );
}

#[test]
fn gutenberg_plan_has_a_fixed_command_and_ignores_flags() {
    let plan = named(
        "offliner.gutenberg",
        json!({
            "flags": {"languages": "fr", "bad key; rm": {"nested": true}},
            "warehouse_path": "/gutenberg",
        }),
    )
    .unwrap();
    assert_eq!(
        plan,
        TaskPlan {
            task_id: ID.into(),
            offliner: Offliner::Gutenberg,
            image: image("openzim/gutenberg", "latest"),
            argv: [
                "gutenberg2zim",
                "--complete",
                "--formats",
                "all",
                "--one-language-one-zim",
                "/output",
            ]
            .map(String::from)
            .to_vec(),
            output_dir: "/output",
            warehouse_path: "/gutenberg".into(),
            needs_redis: false,
            writes_progress: false,
        }
    );
}

#[test]
fn phet_plan_runs_the_image_command() {
    let plan = named(
        "offliner.phet",
        json!({"flags": {}, "image": {"name": "openzim/phet", "tag": "3"}, "warehouse_path": "/phet"}),
    )
    .unwrap();
    assert_eq!(
        plan,
        TaskPlan {
            task_id: ID.into(),
            offliner: Offliner::Phet,
            image: image("openzim/phet", "3"),
            argv: vec![],
            output_dir: "/phet/dist",
            warehouse_path: "/phet".into(),
            needs_redis: false,
            writes_progress: false,
        }
    );
}

#[test]
fn ignored_flags_must_still_be_an_object() {
    for task in ["offliner.gutenberg", "offliner.phet"] {
        let err = named(task, json!({"flags": "x", "warehouse_path": "/x"})).unwrap_err();
        assert!(
            matches!(
                err,
                PlanError::WrongType {
                    parameter: "flags",
                    ..
                }
            ),
            "{err:?}"
        );
    }
}

#[test]
fn positional_parameters() {
    let plan = plan_of(
        "offliner.youtube",
        json!([{"id": "UC1"}, {"name": "openzim/youtube", "tag": "dev"}, "/videos"]),
        json!({}),
    )
    .unwrap();
    assert_eq!(plan.image, image("openzim/youtube", "dev"));
    assert_eq!(
        plan.argv,
        [
            "youtube2zim",
            "--id=UC1",
            "--output=/output",
            "--stats-filename=/output/.zimfarm-progress.json"
        ]
    );
    assert_eq!(plan.warehouse_path, "/videos");
}

#[test]
fn positional_and_named_parameters_mix() {
    let plan = plan_of(
        "offliner.youtube",
        json!([{"id": "UC1"}]),
        json!({"warehouse_path": "/videos", "image": {"tag": "dev"}}),
    )
    .unwrap();
    assert_eq!(plan.image, image("openzim/youtube", "dev"));
    assert_eq!(
        plan.argv,
        [
            "youtube2zim",
            "--id=UC1",
            "--output=/output",
            "--stats-filename=/output/.zimfarm-progress.json"
        ]
    );
    assert_eq!(plan.warehouse_path, "/videos");
}

#[test]
fn positional_nulls_are_defaults() {
    let plan = plan_of(
        "offliner.youtube",
        json!([null, null, "/videos"]),
        json!({}),
    )
    .unwrap();
    assert_eq!(plan.image, image("openzim/youtube", "latest"));
    assert_eq!(
        plan.argv,
        [
            "youtube2zim",
            "--output=/output",
            "--stats-filename=/output/.zimfarm-progress.json"
        ]
    );
}

#[test]
fn a_parameter_given_twice_is_an_error() {
    for (args, kwargs, name, position) in [
        (
            json!([{}]),
            json!({"flags": {}, "warehouse_path": "/x"}),
            "flags",
            1,
        ),
        (
            json!([{}, {}]),
            json!({"image": {}, "warehouse_path": "/x"}),
            "image",
            2,
        ),
        (
            json!([{}, {}, "/x"]),
            json!({"warehouse_path": "/x"}),
            "warehouse_path",
            3,
        ),
        // Even null, as Python would have it.
        (
            json!([null]),
            json!({"flags": null, "warehouse_path": "/x"}),
            "flags",
            1,
        ),
    ] {
        let err = plan_of("offliner.youtube", args, kwargs).unwrap_err();
        assert_eq!(err, PlanError::GivenTwice { name, position });
        assert!(err.to_string().contains(name), "{err}");
    }
}

#[test]
fn too_many_positional_arguments() {
    let err = plan_of(
        "offliner.youtube",
        json!([{}, {}, "/x", "extra"]),
        json!({}),
    )
    .unwrap_err();
    assert_eq!(err, PlanError::TooManyArgs { count: 4 });
}

#[test]
fn older_form() {
    let plan = named(
        "offliner.mwoffliner",
        json!({
            "offliner": {"image_tag": "1.8.2", "flags": {"mwUrl": "https://fr.wikipedia.org"}},
            "warehouse_path": "/wikipedia",
        }),
    )
    .unwrap();
    assert_eq!(plan.image, image("openzim/mwoffliner", "1.8.2"));
    assert_eq!(
        plan.argv,
        [
            "mwoffliner",
            "--mwUrl=https://fr.wikipedia.org",
            "--outputDirectory=/output",
            &format!("--redis={REDIS}"),
        ]
    );
    assert_eq!(plan.warehouse_path, "/wikipedia");
}

#[test]
fn older_form_defaults() {
    let plan = named(
        "offliner.youtube",
        json!({"offliner": {"extra": 1}, "warehouse_path": "/v"}),
    )
    .unwrap();
    assert_eq!(plan.image, image("openzim/youtube", "latest"));
    assert_eq!(
        plan.argv,
        [
            "youtube2zim",
            "--output=/output",
            "--stats-filename=/output/.zimfarm-progress.json"
        ]
    );
    let plan = named(
        "offliner.youtube",
        json!({"offliner": {"image_tag": null, "flags": null}, "warehouse_path": "/v"}),
    )
    .unwrap();
    assert_eq!(plan.image, image("openzim/youtube", "latest"));
    // A null `offliner` is no older form at all.
    let plan = named(
        "offliner.youtube",
        json!({"offliner": null, "image": {"tag": "x"}, "warehouse_path": "/v"}),
    )
    .unwrap();
    assert_eq!(plan.image.tag, "x");
}

#[test]
fn older_form_with_positional_warehouse_path() {
    let plan = plan_of(
        "offliner.youtube",
        json!([null, null, "/v"]),
        json!({"offliner": {"image_tag": "1"}}),
    )
    .unwrap();
    assert_eq!(plan.image, image("openzim/youtube", "1"));
    assert_eq!(plan.warehouse_path, "/v");
}

#[test]
fn older_and_newer_forms_do_not_mix() {
    let err = named(
        "offliner.youtube",
        json!({"offliner": {"image_tag": "1"}, "flags": {}, "warehouse_path": "/v"}),
    )
    .unwrap_err();
    assert_eq!(err, PlanError::MixedForms { newer: "flags" });
    let err = plan_of(
        "offliner.youtube",
        json!([null, {"tag": "2"}]),
        json!({"offliner": {"image_tag": "1"}, "warehouse_path": "/v"}),
    )
    .unwrap_err();
    assert_eq!(err, PlanError::MixedForms { newer: "image" });
    assert!(err.to_string().contains("one form or the other"), "{err}");
}

#[test]
fn wrong_parameter_types() {
    for (kwargs, parameter, found) in [
        (
            json!({"flags": [], "warehouse_path": "/v"}),
            "flags",
            "a list",
        ),
        (
            json!({"image": "openzim/youtube:1", "warehouse_path": "/v"}),
            "image",
            "a string",
        ),
        (
            json!({"image": {"name": 1}, "warehouse_path": "/v"}),
            "image.name",
            "a number",
        ),
        (
            json!({"image": {"tag": 1.9}, "warehouse_path": "/v"}),
            "image.tag",
            "a number",
        ),
        (json!({"warehouse_path": 7}), "warehouse_path", "a number"),
        (
            json!({"offliner": "1.9", "warehouse_path": "/v"}),
            "offliner",
            "a string",
        ),
        (
            json!({"offliner": {"image_tag": true}, "warehouse_path": "/v"}),
            "offliner.image_tag",
            "a boolean",
        ),
        (
            json!({"offliner": {"flags": ["x"]}, "warehouse_path": "/v"}),
            "offliner.flags",
            "a list",
        ),
    ] {
        let err = named("offliner.youtube", kwargs.clone()).unwrap_err();
        match &err {
            PlanError::WrongType {
                parameter: p,
                found: f,
                ..
            } => assert_eq!((*p, *f), (parameter, found), "{kwargs}"),
            other => panic!("{kwargs} gave {other:?}"),
        }
        assert!(err.to_string().contains(&format!("`{parameter}`")), "{err}");
    }
}

#[test]
fn wrong_type_quotes_the_value() {
    let err = named(
        "offliner.youtube",
        json!({"image": {"tag": 1.9}, "warehouse_path": "/v"}),
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "parameter `image.tag` must be a string, but it is a number: 1.9"
    );
}

#[test]
fn missing_warehouse_path() {
    for kwargs in [
        json!({}),
        json!({"warehouse_path": null}),
        json!({"flags": {}, "image": {}}),
    ] {
        assert_eq!(
            named("offliner.youtube", kwargs),
            Err(PlanError::MissingWarehousePath)
        );
    }
    assert_eq!(
        plan_of("offliner.youtube", json!([{}, {}]), json!({})),
        Err(PlanError::MissingWarehousePath)
    );
}

#[test]
fn bad_warehouse_path_through_plan() {
    let err = named("offliner.youtube", json!({"warehouse_path": "/../etc"})).unwrap_err();
    assert!(
        matches!(err, PlanError::InvalidWarehousePath { .. }),
        "{err:?}"
    );
    let err = named("offliner.youtube", json!({"warehouse_path": "/"})).unwrap_err();
    assert!(
        matches!(err, PlanError::InvalidWarehousePath { .. }),
        "{err:?}"
    );
}

#[test]
fn extra_kwargs_are_ignored() {
    let plan = named(
        "offliner.youtube",
        json!({
            "warehouse_path": "/v",
            "queue": "small",
            "simulate": {"sleep": 3},
            "something_new": [1, 2],
            "image": {"name": "openzim/youtube", "tag": "1", "digest": "ignored"},
        }),
    )
    .unwrap();
    assert_eq!(plan.image, image("openzim/youtube", "1"));
    assert_eq!(
        plan.argv,
        [
            "youtube2zim",
            "--output=/output",
            "--stats-filename=/output/.zimfarm-progress.json"
        ]
    );
}

#[test]
fn image_defaults() {
    let plan = named("offliner.youtube", json!({"warehouse_path": "/v"})).unwrap();
    assert_eq!(plan.image, image("openzim/youtube", "latest"));
    let plan = named(
        "offliner.youtube",
        json!({"image": {"name": "openzim/youtube"}, "warehouse_path": "/v"}),
    )
    .unwrap();
    assert_eq!(plan.image, image("openzim/youtube", "latest"));
    let plan = named(
        "offliner.youtube",
        json!({"image": {"name": null, "tag": null}, "warehouse_path": "/v"}),
    )
    .unwrap();
    assert_eq!(plan.image, image("openzim/youtube", "latest"));
}

#[test]
fn image_outside_the_allow_list_is_refused() {
    let kwargs = json!({"image": {"name": "evil/miner", "tag": "1"}, "warehouse_path": "/v"});
    let err = named("offliner.youtube", kwargs.clone()).unwrap_err();
    assert_eq!(
        err,
        PlanError::ImageNotAllowed {
            image: "evil/miner:1".into(),
            task: "offliner.youtube",
            own: "openzim/youtube",
            allow_list: String::new(),
        }
    );
    let text = err.to_string();
    assert!(text.contains("\"evil/miner:1\""), "{text}");
    assert!(text.contains("(openzim/youtube)"), "{text}");
    assert!(text.contains("\"offliner.youtube=myorg/*\""), "{text}");
    assert!(text.contains("IMAGE_ALLOWLIST"), "{text}");

    let wider = AllowList::parse("openzim/*,evil/*").unwrap();
    let plan = plan(
        &request("offliner.youtube", json!([]), kwargs),
        &wider,
        REDIS,
    )
    .unwrap();
    assert_eq!(plan.image, image("evil/miner", "1"));
}

#[test]
fn a_task_runs_no_other_task_image_by_default() {
    // Before images were tied to tasks, any openzim/* image ran for any
    // task: a youtube task could run openzim/zimit or mwoffliner's image.
    for (task, other) in [
        ("offliner.youtube", "openzim/mwoffliner"),
        ("offliner.mwoffliner", "openzim/youtube"),
        ("offliner.gutenberg", "openzim/zimit"),
        ("offliner.phet", "openzim/gutenberg"),
    ] {
        let kwargs = json!({"image": {"name": other, "tag": "1"}, "warehouse_path": "/v"});
        assert!(
            matches!(named(task, kwargs), Err(PlanError::ImageNotAllowed { .. })),
            "{task} ran {other}"
        );
    }
    for task in Offliner::ALL {
        let kwargs = json!({"image": {"name": task.default_image_name(), "tag": "v2.0_rc-1"}, "warehouse_path": "/v"});
        let plan = named(task.task_name(), kwargs).unwrap();
        assert_eq!(plan.image, image(task.default_image_name(), "v2.0_rc-1"));
    }
    let only_youtube = AllowList::parse("offliner.youtube=openzim/youtube-next").unwrap();
    let kwargs = json!({"image": {"name": "openzim/youtube-next"}, "warehouse_path": "/v"});
    assert!(
        plan(
            &request("offliner.youtube", json!([]), kwargs.clone()),
            &only_youtube,
            REDIS
        )
        .is_ok()
    );
    assert!(
        plan(
            &request("offliner.phet", json!([]), kwargs),
            &only_youtube,
            REDIS
        )
        .is_err()
    );
}

#[test]
fn invalid_images_are_refused_before_the_allow_list() {
    let everything = AllowList::parse("**").unwrap();
    for (image, expected) in [
        (json!({"name": "OpenZIM/youtube"}), "name"),
        (json!({"name": "openzim/../youtube"}), "name"),
        (json!({"name": "openzim/youtube:1"}), "name"),
        (json!({"name": "openzim/youtube", "tag": "a b"}), "tag"),
        (json!({"name": "openzim/youtube", "tag": ""}), "tag"),
        (json!({"name": "openzim/youtube@sha256:00"}), "digest"),
    ] {
        let req = request(
            "offliner.youtube",
            json!([]),
            json!({"image": image, "warehouse_path": "/v"}),
        );
        let err = plan(&req, &everything, REDIS).unwrap_err();
        let kind = match err {
            PlanError::InvalidImageName { .. } => "name",
            PlanError::InvalidImageTag { .. } => "tag",
            PlanError::ImageDigest { .. } => "digest",
            ref other => panic!("{image} gave {other:?}"),
        };
        assert_eq!(kind, expected, "{image}");
    }
}

#[test]
fn hostile_flag_values_stay_single_arguments() {
    let values = [
        "two words",
        "\"double\" and 'single' quotes",
        "a; rm -rf /",
        "$(reboot)",
        "`id`",
        "line\nbreak",
        "Wikipédia – 維基百科 🚀",
        "--outputDirectory=/etc",
    ];
    for value in values {
        let plan = named(
            "offliner.mwoffliner",
            json!({"flags": {"customZimTitle": value}, "warehouse_path": "/w"}),
        )
        .unwrap();
        assert_eq!(plan.argv.len(), 4, "{value:?}");
        assert_eq!(plan.argv[1], format!("--customZimTitle={value}"));
        assert_eq!(plan.argv[2], "--outputDirectory=/output");
    }
}

#[test]
fn lists_and_numbers_through_plan() {
    let plan = named(
        "offliner.mwoffliner",
        json!({
            "flags": {"format": ["nopic", "nodet"], "requestTimeout": 60, "speed": 0.5},
            "warehouse_path": "/w",
        }),
    )
    .unwrap();
    assert_eq!(
        plan.argv[1..4],
        ["--format=nopic", "--format=nodet", "--requestTimeout=60"]
    );
    assert_eq!(plan.argv[4], "--speed=0.5");
}

#[test]
fn flag_errors_through_plan() {
    let err = named(
        "offliner.youtube",
        json!({"flags": {"--id": "x"}, "warehouse_path": "/v"}),
    )
    .unwrap_err();
    assert_eq!(err, PlanError::InvalidFlagName { key: "--id".into() });
    let err = named(
        "offliner.youtube",
        json!({"flags": {"id": {"a": 1}}, "warehouse_path": "/v"}),
    )
    .unwrap_err();
    assert!(
        matches!(err, PlanError::UnsupportedFlagValue { .. }),
        "{err:?}"
    );
}

#[test]
fn reserved_flags_are_refused() {
    for (task, key) in [
        ("offliner.mwoffliner", "outputDirectory"),
        ("offliner.mwoffliner", "output-directory"),
        ("offliner.mwoffliner", "redis"),
        ("offliner.youtube", "output"),
    ] {
        let err = named(
            task,
            json!({"flags": {key: "/etc"}, "warehouse_path": "/v"}),
        )
        .unwrap_err();
        assert_eq!(
            err,
            PlanError::ReservedFlag {
                key: key.into(),
                task: Offliner::from_task_name(task).unwrap().task_name(),
            }
        );
        assert!(err.to_string().contains(&format!("{key:?}")), "{err}");
    }
    // What is reserved for one offliner is an ordinary flag for another.
    let plan = named(
        "offliner.youtube",
        json!({"flags": {"redis": "x"}, "warehouse_path": "/v"}),
    )
    .unwrap();
    assert_eq!(plan.argv[1], "--redis=x");
}

#[test]
fn redis_url_is_checked_for_mwoffliner_only() {
    for bad in ["", "redis://x\n--evil", "a\u{0}"] {
        let req = request(
            "offliner.mwoffliner",
            json!([]),
            json!({"warehouse_path": "/w"}),
        );
        let err = plan(&req, &AllowList::default(), bad).unwrap_err();
        assert_eq!(err, PlanError::InvalidRedisUrl { url: shown(bad) });
    }
    let req = request(
        "offliner.youtube",
        json!([]),
        json!({"warehouse_path": "/v"}),
    );
    assert!(plan(&req, &AllowList::default(), "").is_ok());
}

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        prop_oneof![
            Just("/wikipedia"),
            Just("/"),
            Just("openzim/mwoffliner"),
            Just("latest"),
            Just("1.9"),
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((any_key(), inner), 0..6)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ]
    })
}

/// Mostly keys the planner looks at, sometimes anything.
fn any_key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "flags",
            "image",
            "warehouse_path",
            "offliner",
            "queue",
            "simulate",
            "name",
            "tag",
            "image_tag",
            "mwUrl",
            "redis",
        ])
        .prop_map(String::from),
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(crate::proptest_config::config())]

    #[test]
    fn plan_never_panics(
        task in prop::sample::select(vec![
            "offliner.mwoffliner", "offliner.youtube", "offliner.gutenberg", "offliner.phet", "x",
        ]),
        kwargs in prop::collection::vec((any_key(), any_json()), 0..6),
        args in prop::collection::vec(any_json(), 0..4),
    ) {
        let kwargs: Map<String, Value> = kwargs.into_iter().collect();
        let req = request(task, Value::Array(args), Value::Object(kwargs));
        let everything = AllowList::parse("**").unwrap();
        if let Ok(plan) = plan(&req, &everything, REDIS) {
            prop_assert!(plan.argv.iter().all(|arg| !arg.contains('\0')));
            prop_assert!(plan.warehouse_path.starts_with('/'));
            prop_assert!(!plan.warehouse_path.ends_with('/'));
            prop_assert!(!plan.warehouse_path.split('/').any(|c| c == ".."));
            prop_assert_eq!(ImageRef::parse(&plan.image.to_string()), Ok(plan.image.clone()));
        }
    }

    #[test]
    fn a_task_runs_its_own_image_with_any_valid_tag_and_no_other_by_default(
        task in prop::sample::select(Offliner::ALL.to_vec()),
        name in "[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,2}",
        tag in any::<String>(),
    ) {
        let kwargs = |name: &str| json!({"image": {"name": name, "tag": tag}, "warehouse_path": "/v"});
        let own = named(task.task_name(), kwargs(task.default_image_name()));
        let tag_ok = !tag.is_empty()
            && tag.len() <= 128
            && tag.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            && !tag.starts_with(['.', '-']);
        prop_assert_eq!(own.is_ok(), tag_ok, "{:?}", own);
        if name != task.default_image_name() {
            prop_assert!(named(task.task_name(), kwargs(&name)).is_err());
        }
    }

    #[test]
    fn plan_never_panics_on_arbitrary_strings(
        id in any::<String>(),
        name in any::<String>(),
        warehouse_path in any::<String>(),
        image_name in any::<String>(),
        tag in any::<String>(),
        spec in any::<String>(),
    ) {
        let mut req = request(
            "offliner.youtube",
            json!([]),
            json!({"warehouse_path": warehouse_path, "image": {"name": image_name, "tag": tag}}),
        );
        req.id = id;
        let _ = plan(&req, &AllowList::default(), REDIS);
        req.name = name;
        let _ = plan(&req, &AllowList::default(), REDIS);
        if let Ok(allow) = AllowList::parse(&spec) {
            let _ = plan(&req, &allow, REDIS);
        }
    }
}

fn flag_key() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9][A-Za-z0-9_-]{0,63}",
        any_key(),
        Just(String::new()),
        Just("-x".to_owned()),
        "[a-z]{65}",
    ]
}

proptest! {
    #![proptest_config(crate::proptest_config::config())]

    #[test]
    fn flags_give_one_option_each_or_a_typed_error(
        flags in prop::collection::vec((flag_key(), any_json()), 0..6),
    ) {
        let flags: Map<String, Value> = flags.into_iter().collect();
        match flags_to_argv(&flags) {
            Ok(argv) => {
                for arg in &argv {
                    let name = arg.strip_prefix("--").expect("an option");
                    let name = name.split_once('=').map_or(name, |(name, _)| name);
                    prop_assert!(flags.contains_key(name), "{}", arg);
                    prop_assert!(!arg.contains('\0'));
                }
            }
            Err(error) => prop_assert!(!error.to_string().is_empty()),
        }
    }

    #[test]
    fn string_flags_come_out_as_they_went_in(
        flags in prop::collection::btree_map("[A-Za-z0-9][A-Za-z0-9_-]{0,63}", "[^\u{0}]{0,40}", 0..6),
    ) {
        let map: Map<String, Value> =
            flags.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))).collect();
        let argv = flags_to_argv(&map).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let expected: Vec<String> = flags.iter().map(|(k, v)| format!("--{k}={v}")).collect();
        prop_assert_eq!(argv, expected);
    }

    #[test]
    fn image_refs_parse_or_fail_typed_and_display_round_trips(
        s in prop_oneof![
            any::<String>(),
            "[a-z0-9./:@_-]{0,40}",
            ("[a-z]{1,8}/[a-z0-9-]{1,12}", "[A-Za-z0-9._-]{1,20}").prop_map(|(n, t)| format!("{n}:{t}")),
        ],
    ) {
        if let Ok(image) = ImageRef::parse(&s) {
            prop_assert_eq!(ImageRef::parse(&image.to_string()), Ok(image.clone()));
            prop_assert!(!image.name.is_empty() && !image.tag.is_empty());
        }
    }

    #[test]
    fn warehouse_paths_are_clean_or_refused(
        path in prop_oneof![
            any::<String>(),
            "[/a-z._-]{0,30}",
            prop::collection::vec(prop_oneof![Just(".."), Just("."), Just(""), Just("wikipedia"), Just("a-b_c.d")], 0..5)
                .prop_map(|parts| format!("/{}", parts.join("/"))),
        ],
        other in any_json(),
    ) {
        if let Ok(clean) = params::normalise_warehouse_path(&Value::from(path.as_str())) {
            prop_assert!(clean.starts_with('/') && clean.len() > 1);
            prop_assert!(!clean.ends_with('/'));
            prop_assert!(clean[1..].split('/').all(|c| !c.is_empty() && c != "." && c != ".."));
            prop_assert_eq!(params::normalise_warehouse_path(&Value::from(clean.as_str())).ok(), Some(clean.clone()));
        }
        let _ = params::normalise_warehouse_path(&other);
    }
}
