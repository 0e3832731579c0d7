//! Image references (`name:tag`) and the image allow-list: which images
//! each task may run.
//!
//! Rules, following Docker's reference grammar where it is stricter than
//! the brief:
//!
//! - a name is `/`-separated components of `[a-z0-9._-]`, each starting and
//!   ending with a letter or digit and without `..`, optionally after a
//!   registry `host:port/` prefix (`localhost:5000/openzim/x`); a registry
//!   without a port (`ghcr.io/openzim/x`) is just a first component with
//!   dots; at most 255 bytes; uppercase is refused, as Docker does;
//! - a tag is 1 to 128 characters of `[A-Za-z0-9_.-]`, not starting with
//!   `.` or `-` (Docker refuses those too); a missing tag is `latest`;
//! - digests (`name@sha256:...`) are refused: a plan carries a tag only,
//!   and tags are what the dispatcher sends;
//! - names are matched as written: `docker.io/openzim/x` is not rewritten
//!   to `openzim/x`, so `openzim/*` does not allow it.
//!
//! Owns parsing references and matching them against the allow-list; it
//! must not pull or inspect images (the `docker` module does).

use std::fmt;
use std::str::FromStr;

use super::Offliner;
use super::error::{PlanError, shown};

/// Longest image name, in bytes (Docker's limit).
const MAX_NAME_LEN: usize = 255;

/// Longest tag, in characters (Docker's limit).
const MAX_TAG_LEN: usize = 128;

/// Longest allow-list pattern, in bytes.
const MAX_PATTERN_LEN: usize = 255;

/// A validated image reference. `Display` gives `name:tag`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// Repository path, e.g. `openzim/mwoffliner`, without tag.
    pub name: String,
    /// Tag, e.g. `1.9` or `latest`.
    pub tag: String,
}

impl ImageRef {
    /// Parses `name[:tag]`; the tag defaults to `latest`. Digests are refused.
    pub fn parse(s: &str) -> Result<ImageRef, PlanError> {
        if s.contains('@') {
            return Err(PlanError::ImageDigest { image: shown(s) });
        }
        let last_slash = s.rfind('/');
        match s.rfind(':') {
            // A ':' after the last '/' separates the tag; one before it is
            // a registry port.
            Some(colon) if last_slash.is_none_or(|slash| colon > slash) => {
                Self::from_parts(&s[..colon], &s[colon + 1..])
            }
            _ => Self::from_parts(s, "latest"),
        }
    }

    /// Validates a name and a tag given separately.
    pub(crate) fn from_parts(name: &str, tag: &str) -> Result<ImageRef, PlanError> {
        if name.contains('@') || tag.contains('@') {
            return Err(PlanError::ImageDigest {
                image: shown(&format!("{name}:{tag}")),
            });
        }
        validate_name(name).map_err(|reason| PlanError::InvalidImageName {
            name: shown(name),
            reason,
        })?;
        validate_tag(tag).map_err(|reason| PlanError::InvalidImageTag {
            tag: shown(tag),
            reason,
        })?;
        Ok(ImageRef {
            name: name.to_owned(),
            tag: tag.to_owned(),
        })
    }
}

impl FromStr for ImageRef {
    type Err = PlanError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.tag)
    }
}

const NAME_RULE: &str = "an image name is '/'-separated components of lowercase letters, \
     digits, '.', '_' and '-', each starting and ending with a letter or digit, with an \
     optional \"host:port/\" registry prefix and no tag";

fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("it is empty; {NAME_RULE}"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "it is {} bytes long, at most {MAX_NAME_LEN} are allowed",
            name.len()
        ));
    }
    let components: Vec<&str> = name.split('/').collect();
    for (index, component) in components.iter().enumerate() {
        if index == 0 && component.contains(':') {
            if components.len() == 1 {
                return Err(format!(
                    "a tag must not be part of the name (a registry \"host:port\" must \
                     be followed by '/' and a repository); {NAME_RULE}"
                ));
            }
            validate_registry(component)?;
        } else {
            validate_component(component)?;
        }
    }
    Ok(())
}

fn validate_registry(registry: &str) -> Result<(), String> {
    let (host, port) = registry.split_once(':').unwrap_or((registry, ""));
    validate_component(host)?;
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "registry {:?} has no valid port: a port is 1 to 5 digits",
            shown(registry)
        ));
    }
    Ok(())
}

fn validate_component(component: &str) -> Result<(), String> {
    if component.is_empty() {
        return Err(format!(
            "it has an empty component ('//' or a leading or trailing '/'); {NAME_RULE}"
        ));
    }
    if let Some(c) = component
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '-'))
    {
        let what = if c.is_ascii_uppercase() {
            "uppercase letter"
        } else {
            "character"
        };
        return Err(format!("it contains the {what} {c:?}; {NAME_RULE}"));
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = component.as_bytes();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(format!(
            "component {:?} does not start and end with a letter or digit; {NAME_RULE}",
            shown(component)
        ));
    }
    if component.contains("..") {
        return Err(format!("it contains \"..\"; {NAME_RULE}"));
    }
    Ok(())
}

const TAG_RULE: &str = "a tag is 1 to 128 characters of A-Z, a-z, 0-9, '_', '.' and '-', \
     not starting with '.' or '-'";

fn validate_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() {
        return Err(format!("it is empty; {TAG_RULE}"));
    }
    if let Some(c) = tag
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!("it contains the character {c:?}; {TAG_RULE}"));
    }
    if tag.len() > MAX_TAG_LEN {
        return Err(format!("it is {} characters long; {TAG_RULE}", tag.len()));
    }
    if tag.starts_with(['.', '-']) {
        return Err(format!("it starts with {:?}; {TAG_RULE}", &tag[..1]));
    }
    Ok(())
}

/// One piece of an allow-list pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    /// This exact byte.
    Byte(u8),
    /// `*`: any run of bytes without `/`.
    Star,
    /// `**`: any run of bytes.
    DoubleStar,
}

/// Which images each task may run (`IMAGE_ALLOWLIST`).
///
/// A task always may run its own image (SPEC §3: `offliner.mwoffliner` →
/// `openzim/mwoffliner`, ...), with any valid tag. The list widens that:
/// a comma-separated list of entries, each
///
/// - `TASK=PATTERN` (e.g. `offliner.youtube=myorg/youtube`): images this
///   task may run besides its own;
/// - `PATTERN` alone: images every task may run (the meaning the variable
///   had before tasks were told apart, so an existing setting such as
///   `openzim/*,myorg/*` keeps working, as wide as it was).
///
/// Patterns are globs matched against the whole image name (without
/// tag): `*` matches any run of characters except `/`, `**` any run
/// including `/` (`***` is the same as `**`). So `openzim/*` allows
/// `openzim/mwoffliner` but neither `openzim/a/b` nor
/// `ghcr.io/openzim/mwoffliner`; `**` allows every image. `Display` gives
/// the normalised spec, entries joined by `,` (empty for the default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    entries: Vec<Entry>,
}

/// One entry of an [`AllowList`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// The task it widens; `None`: every task.
    task: Option<Offliner>,
    pattern: String,
    tokens: Vec<Token>,
}

impl AllowList {
    /// Parses a comma-separated list of entries, e.g.
    /// `offliner.youtube=myorg/youtube,openzim/*`.
    ///
    /// Whitespace around an entry and around `=` is ignored, and so are
    /// empty items (a trailing comma); a spec with no entry at all is an
    /// error (unset the variable for the default). A pattern uses the
    /// image-name characters (`a-z 0-9 . _ - /`, `:` only for a registry
    /// port in the first component) and `*`.
    pub fn parse(spec: &str) -> Result<AllowList, PlanError> {
        let mut entries = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (task, pattern) = match item.split_once('=') {
                Some((task, pattern)) => {
                    let task = task.trim();
                    let offliner = Offliner::from_task_name(task).ok_or_else(|| {
                        PlanError::InvalidAllowPattern {
                            pattern: shown(item),
                            reason: format!(
                                "{:?} is not a task name; use one of {}",
                                shown(task),
                                Offliner::ALL.map(Offliner::task_name).join(", ")
                            ),
                        }
                    })?;
                    (Some(offliner), pattern.trim())
                }
                None => (None, item),
            };
            let tokens = compile(pattern).map_err(|reason| PlanError::InvalidAllowPattern {
                pattern: shown(item),
                reason,
            })?;
            entries.push(Entry {
                task,
                pattern: pattern.to_owned(),
                tokens,
            });
        }
        if entries.is_empty() {
            return Err(PlanError::EmptyAllowList { spec: shown(spec) });
        }
        Ok(AllowList { entries })
    }

    /// Whether `task` may run `image`: its own image, or one an entry for
    /// it or for every task matches (the tag is not looked at: any valid
    /// tag, as [`ImageRef`] bounds it).
    pub fn allows(&self, task: Offliner, image: &ImageRef) -> bool {
        let name = image.name.as_bytes();
        image.name == task.default_image_name()
            || self
                .entries
                .iter()
                .filter(|entry| entry.task.is_none_or(|t| t == task))
                .any(|entry| glob_match(&entry.tokens, name))
    }
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, entry) in self.entries.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            if let Some(task) = entry.task {
                write!(f, "{task}=")?;
            }
            f.write_str(&entry.pattern)?;
        }
        Ok(())
    }
}

fn compile(pattern: &str) -> Result<Vec<Token>, String> {
    if pattern.is_empty() {
        return Err("its pattern is empty".to_owned());
    }
    if pattern.len() > MAX_PATTERN_LEN {
        return Err(format!(
            "it is {} bytes long, at most {MAX_PATTERN_LEN} are allowed",
            pattern.len()
        ));
    }
    if let Some(c) = pattern
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '-' | '/' | ':' | '*'))
    {
        return Err(format!(
            "it contains {c:?}, but patterns use lowercase letters, digits, '.', '_', \
             '-', '/', ':' (registry port) and '*' only, as image names do"
        ));
    }
    let port_ok = match pattern.split_once('/') {
        Some((_, rest)) => !rest.contains(':'),
        None => !pattern.contains(':'),
    };
    if !port_ok {
        return Err(
            "it contains ':' outside a \"host:port/\" registry prefix; patterns match \
             the image name without its tag, so drop the \":tag\""
                .to_owned(),
        );
    }
    let mut tokens = Vec::with_capacity(pattern.len());
    let mut bytes = pattern.bytes().peekable();
    while let Some(b) = bytes.next() {
        let token = if b != b'*' {
            Token::Byte(b)
        } else if bytes.next_if_eq(&b'*').is_some() {
            Token::DoubleStar
        } else {
            Token::Star
        };
        // `***`, `****`, ...: a star next to `**` adds nothing.
        match (tokens.last_mut(), token) {
            (Some(Token::DoubleStar), Token::Star | Token::DoubleStar) => {}
            (Some(last @ Token::Star), Token::DoubleStar) => *last = Token::DoubleStar,
            _ => tokens.push(token),
        }
    }
    Ok(tokens)
}

/// Whether `tokens` matches all of `name`. Dynamic programming over
/// (token, position), so no pattern can take exponential time.
fn glob_match(tokens: &[Token], name: &[u8]) -> bool {
    let n = name.len();
    // `next[j]`: do the tokens after the current one match `name[j..]`?
    let mut next = vec![false; n + 1];
    next[n] = true;
    for token in tokens.iter().rev() {
        let mut current = vec![false; n + 1];
        for j in (0..=n).rev() {
            current[j] = match *token {
                Token::Byte(b) => j < n && name[j] == b && next[j + 1],
                Token::Star => next[j] || (j < n && name[j] != b'/' && current[j + 1]),
                Token::DoubleStar => next[j] || (j < n && current[j + 1]),
            };
        }
        next = current;
    }
    next[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(s: &str) -> ImageRef {
        ImageRef::parse(s).unwrap()
    }

    #[test]
    fn parse_splits_name_and_tag() {
        assert_eq!(
            image("openzim/mwoffliner:1.9"),
            ImageRef {
                name: "openzim/mwoffliner".into(),
                tag: "1.9".into()
            }
        );
        assert_eq!(image("openzim/mwoffliner").tag, "latest");
        assert_eq!(image("ubuntu").name, "ubuntu");
        assert_eq!(
            image("ghcr.io/openzim/youtube:dev").name,
            "ghcr.io/openzim/youtube"
        );
        assert_eq!(image("a_b.c-d/e__f:V1.2_rc-3").tag, "V1.2_rc-3");
    }

    #[test]
    fn parse_reads_a_registry_port_as_part_of_the_name() {
        let with_tag = image("localhost:5000/openzim/phet:2");
        assert_eq!(with_tag.name, "localhost:5000/openzim/phet");
        assert_eq!(with_tag.tag, "2");
        let without_tag = image("registry.local:443/openzim/phet");
        assert_eq!(without_tag.name, "registry.local:443/openzim/phet");
        assert_eq!(without_tag.tag, "latest");
    }

    #[test]
    fn display_is_name_colon_tag() {
        assert_eq!(image("openzim/phet").to_string(), "openzim/phet:latest");
        assert_eq!(
            image("localhost:5000/x:1").to_string(),
            "localhost:5000/x:1"
        );
        assert_eq!(
            "openzim/phet:3".parse::<ImageRef>().unwrap(),
            image("openzim/phet:3")
        );
    }

    #[test]
    fn parse_refuses_bad_names() {
        for bad in [
            "",
            ":1.0",
            "OpenZIM/mwoffliner",
            "openzim/../etc",
            "openzim/a..b",
            "openzim//mwoffliner",
            "/openzim/mwoffliner",
            "openzim/mwoffliner/",
            "openzim/mw offliner",
            "openzim/-mwoffliner",
            "openzim/mwoffliner_",
            "openzim/mwöffliner",
            "localhost:/x",
            "localhost:123456/x",
            "localhost:port/x",
            "openzim/mwoffliner\n",
            "openzim/mw;rm",
        ] {
            let err = ImageRef::parse(bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    PlanError::InvalidImageName { .. } | PlanError::InvalidImageTag { .. }
                ),
                "{bad:?} gave {err:?}"
            );
        }
        // Alone, "localhost:5000" is the image "localhost" with tag "5000";
        // as a name, a registry must be followed by a repository.
        assert_eq!(image("localhost:5000").to_string(), "localhost:5000");
        assert!(matches!(
            ImageRef::from_parts("localhost:5000", "latest"),
            Err(PlanError::InvalidImageName { .. })
        ));
        let long = format!("openzim/{}", "a".repeat(MAX_NAME_LEN));
        assert!(matches!(
            ImageRef::parse(&long),
            Err(PlanError::InvalidImageName { .. })
        ));
    }

    #[test]
    fn parse_refuses_bad_tags() {
        for bad in [
            "openzim/x:",
            "openzim/x:.hidden",
            "openzim/x:-rc",
            "openzim/x:a b",
            "openzim/x:a/b",
            "openzim/x:1:2",
            "openzim/x:é",
        ] {
            let err = ImageRef::parse(bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    PlanError::InvalidImageTag { .. } | PlanError::InvalidImageName { .. }
                ),
                "{bad:?} gave {err:?}"
            );
        }
        let max = format!("openzim/x:{}", "t".repeat(MAX_TAG_LEN));
        assert_eq!(image(&max).tag.len(), MAX_TAG_LEN);
        let too_long = format!("openzim/x:{}", "t".repeat(MAX_TAG_LEN + 1));
        assert!(matches!(
            ImageRef::parse(&too_long),
            Err(PlanError::InvalidImageTag { .. })
        ));
    }

    #[test]
    fn parse_refuses_digests() {
        let err = ImageRef::parse(
            "openzim/mwoffliner@sha256:0000000000000000000000000000000000000000000000000000000000000000",
        )
        .unwrap_err();
        assert!(matches!(err, PlanError::ImageDigest { .. }));
        assert!(err.to_string().contains("pin it by tag"), "{err}");
        assert!(matches!(
            ImageRef::from_parts("openzim/x", "1@sha256:00"),
            Err(PlanError::ImageDigest { .. })
        ));
    }

    #[test]
    fn name_errors_name_the_value_and_the_rule() {
        let err = ImageRef::parse("OpenZIM/x").unwrap_err().to_string();
        assert!(err.contains("\"OpenZIM/x\""), "{err}");
        assert!(err.contains("uppercase letter 'O'"), "{err}");
        let err = ImageRef::parse("openzim/x:a b").unwrap_err().to_string();
        assert!(err.contains("\"a b\""), "{err}");
        assert!(err.contains("1 to 128 characters"), "{err}");
    }

    /// Whether `spec` lets a task whose own image is not `name` run it.
    fn allows(spec: &str, name: &str) -> bool {
        let task = Offliner::ALL
            .into_iter()
            .find(|t| t.default_image_name() != image(name).name)
            .unwrap();
        AllowList::parse(spec).unwrap().allows(task, &image(name))
    }

    #[test]
    fn by_default_each_task_runs_its_own_image_only() {
        let allow = AllowList::default();
        assert_eq!(allow.to_string(), "");
        for task in Offliner::ALL {
            for other in Offliner::ALL {
                let own = image(&format!("{}:any-tag_1.0", other.default_image_name()));
                assert_eq!(allow.allows(task, &own), task == other, "{task} {own}");
            }
            for name in [
                "openzim/zimit",
                "openzim",
                "openzim/a/b",
                "evil/openzim",
                "openzimx/mwoffliner",
                "docker.io/openzim/mwoffliner",
                "localhost:5000/openzim/mwoffliner",
                "ubuntu",
            ] {
                if let Ok(image) = ImageRef::parse(name) {
                    assert!(!allow.allows(task, &image), "{task} {name}");
                }
            }
        }
    }

    #[test]
    fn a_task_entry_widens_that_task_only() {
        let allow = AllowList::parse("offliner.youtube = myorg/*, offliner.phet=openzim/phet-next")
            .unwrap();
        assert_eq!(
            allow.to_string(),
            "offliner.youtube=myorg/*,offliner.phet=openzim/phet-next"
        );
        let myorg = image("myorg/youtube:2");
        assert!(allow.allows(Offliner::Youtube, &myorg));
        assert!(!allow.allows(Offliner::Mwoffliner, &myorg));
        assert!(allow.allows(Offliner::Phet, &image("openzim/phet-next")));
        assert!(!allow.allows(Offliner::Youtube, &image("openzim/phet-next")));
        // Its own image stays allowed.
        assert!(allow.allows(Offliner::Youtube, &image("openzim/youtube")));
    }

    #[test]
    fn a_pattern_alone_widens_every_task_as_it_used_to() {
        let allow = AllowList::parse("openzim/*").unwrap();
        for task in Offliner::ALL {
            assert!(
                allow.allows(task, &image("openzim/mwoffliner:1.9")),
                "{task}"
            );
            assert!(allow.allows(task, &image("openzim/zimit")), "{task}");
            assert!(!allow.allows(task, &image("evil/x")), "{task}");
        }
    }

    #[test]
    fn unknown_task_names_are_errors() {
        for spec in [
            "youtube=myorg/*",
            "offliner.nope=x",
            "=x",
            "offliner.youtube=",
            "a=b=c",
        ] {
            let err = AllowList::parse(spec).unwrap_err();
            assert!(
                matches!(err, PlanError::InvalidAllowPattern { .. }),
                "{spec:?} gave {err:?}"
            );
        }
        let err = AllowList::parse("mwoffliner=x").unwrap_err().to_string();
        assert!(
            err.contains("offliner.mwoffliner, offliner.youtube"),
            "{err}"
        );
    }

    #[test]
    fn star_stays_within_one_segment_and_double_star_does_not() {
        assert!(allows("openzim/*", "openzim/x"));
        assert!(!allows("openzim/*", "openzim/x/y"));
        assert!(allows("openzim/**", "openzim/x/y"));
        assert!(allows("openzim/**", "openzim/x"));
        assert!(allows("*/mwoffliner", "anyone/mwoffliner"));
        assert!(!allows("*/mwoffliner", "a/b/mwoffliner"));
        assert!(allows("**/mwoffliner", "a/b/mwoffliner"));
        assert!(allows("ghcr.io/openzim/*", "ghcr.io/openzim/zimit"));
        assert!(allows("openzim/mw*er", "openzim/mwoffliner"));
        assert!(!allows("openzim/mw*er", "openzim/mwofflin"));
        assert!(allows("*", "ubuntu"));
        assert!(!allows("*", "library/ubuntu"));
        assert!(allows("**", "library/ubuntu"));
        assert!(allows("***", "a/b/c"));
        assert!(allows("openzim/*/**", "openzim/a/b/c"));
        assert!(!allows("openzim/*/**", "openzim/a"));
        assert!(allows("localhost:5000/*", "localhost:5000/x"));
    }

    #[test]
    fn patterns_match_the_whole_name_and_ignore_the_tag() {
        assert!(allows("openzim/phet", "openzim/phet:any-tag"));
        assert!(!allows("openzim/phet", "openzim/phet2"));
        assert!(!allows("openzim/phet", "x/openzim/phet"));
    }

    #[test]
    fn several_patterns_are_any_of() {
        let allow = AllowList::parse(" openzim/* , myorg/**,").unwrap();
        assert_eq!(allow.to_string(), "openzim/*,myorg/**");
        let task = Offliner::Phet;
        assert!(allow.allows(task, &image("openzim/x")));
        assert!(allow.allows(task, &image("myorg/a/b")));
        assert!(!allow.allows(task, &image("other/x")));
    }

    #[test]
    fn empty_spec_is_an_error() {
        for spec in ["", " ", ",", " , ,"] {
            let err = AllowList::parse(spec).unwrap_err();
            assert!(matches!(err, PlanError::EmptyAllowList { .. }), "{spec:?}");
            assert!(err.to_string().contains("IMAGE_ALLOWLIST"));
        }
    }

    #[test]
    fn bad_patterns_are_errors() {
        for spec in [
            "OpenZIM/*",
            "openzim/* x",
            "openzim/*:latest",
            "openzim:1",
            "openzim/x@sha256",
            "openzim/?",
            "openzim/[ab]",
        ] {
            let err = AllowList::parse(spec).unwrap_err();
            assert!(
                matches!(err, PlanError::InvalidAllowPattern { .. }),
                "{spec:?} gave {err:?}"
            );
        }
        let long = "a".repeat(MAX_PATTERN_LEN + 1);
        assert!(AllowList::parse(&long).is_err());
    }

    #[test]
    fn many_stars_do_not_take_exponential_time() {
        let pattern = "*a".repeat(100);
        let allow = AllowList::parse(&format!("{pattern}b")).unwrap();
        let name = ImageRef::from_parts(&"a".repeat(200), "latest").unwrap();
        assert!(!allow.allows(Offliner::Phet, &name));
    }
}
