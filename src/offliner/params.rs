//! Reading a task's parameters from its `args` and `kwargs`.
//!
//! The parameters are `flags`, `image` and `warehouse_path`, by name in
//! `kwargs` or in that order in `args`; or the older form, `kwargs`
//! `offliner = {"image_tag": ..., "flags": ...}` plus `warehouse_path`.
//! Decisions where the contract is silent:
//!
//! - a parameter given both by name and by position is an error, as Python
//!   would raise for the task function ("got multiple values");
//! - more than three positional arguments is an error, for the same reason;
//! - a `null` parameter is the same as a missing one (`flags` → none,
//!   `image` → the task's default image, `warehouse_path` → an error);
//! - `queue`, `simulate` and any other unknown kwargs are ignored, and so
//!   are unknown keys inside `image` and `offliner`, so the dispatcher can
//!   add fields without breaking older workers;
//! - the older `offliner` form together with `flags` or `image` is an
//!   error: which one was meant can't be known.
//!
//! Owns where each parameter is read from, its JSON type and the
//! warehouse path's normal form; it must not judge an image or a flag
//! (`image` and `flags` do).

use serde_json::{Map, Value};

use super::error::{PlanError, json_kind, shown, shown_json};
use crate::celery::TaskRequest;

/// Longest warehouse path, in bytes.
const MAX_WAREHOUSE_PATH_LEN: usize = 255;

/// The parameter names, in positional order.
const POSITIONAL: [&str; 3] = ["flags", "image", "warehouse_path"];

/// The image a task asks for: name and tag as given, unvalidated.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ImageParam<'a> {
    /// `None`: the task's default image.
    pub name: Option<&'a str>,
    /// `None`: `latest`.
    pub tag: Option<&'a str>,
}

/// A task's parameters, shape-checked but not yet validated.
#[derive(Debug, PartialEq)]
pub(crate) struct Params<'a> {
    /// `None`: no flags were given.
    pub flags: Option<&'a Map<String, Value>>,
    pub image: ImageParam<'a>,
    /// Already validated and normalised (see [`normalise_warehouse_path`]).
    pub warehouse_path: String,
}

impl<'a> Params<'a> {
    pub(crate) fn from_request(request: &'a TaskRequest) -> Result<Self, PlanError> {
        if request.args.len() > POSITIONAL.len() {
            return Err(PlanError::TooManyArgs {
                count: request.args.len(),
            });
        }
        let flags = parameter(request, 0)?;
        let image = parameter(request, 1)?;
        let warehouse_path = parameter(request, 2)?;
        let older = request.kwargs.get("offliner").filter(|v| !v.is_null());

        let (flags, image) = match older {
            None => (
                flags.map(|v| object("flags", v)).transpose()?,
                image.map(image_param).transpose()?.unwrap_or_default(),
            ),
            Some(older) => {
                if flags.is_some() {
                    return Err(PlanError::MixedForms { newer: "flags" });
                }
                if image.is_some() {
                    return Err(PlanError::MixedForms { newer: "image" });
                }
                older_form(older)?
            }
        };
        let warehouse_path = warehouse_path.ok_or(PlanError::MissingWarehousePath)?;
        Ok(Params {
            flags,
            image,
            warehouse_path: normalise_warehouse_path(warehouse_path)?,
        })
    }
}

/// The parameter at `position` (named `POSITIONAL[position]`), from kwargs
/// or args; `None` when absent or null.
fn parameter(request: &TaskRequest, position: usize) -> Result<Option<&Value>, PlanError> {
    let name = POSITIONAL[position];
    match (request.kwargs.get(name), request.args.get(position)) {
        (Some(_), Some(_)) => Err(PlanError::GivenTwice {
            name,
            position: position + 1,
        }),
        (Some(value), None) | (None, Some(value)) => Ok(Some(value).filter(|v| !v.is_null())),
        (None, None) => Ok(None),
    }
}

fn wrong_type(parameter: &'static str, expected: &'static str, value: &Value) -> PlanError {
    PlanError::WrongType {
        parameter,
        expected,
        found: json_kind(value),
        value: shown_json(value),
    }
}

fn object<'a>(
    parameter: &'static str,
    value: &'a Value,
) -> Result<&'a Map<String, Value>, PlanError> {
    value
        .as_object()
        .ok_or_else(|| wrong_type(parameter, "an object", value))
}

/// `value` as a string; `None` when absent or null.
fn optional_str<'a>(
    parameter: &'static str,
    value: Option<&'a Value>,
) -> Result<Option<&'a str>, PlanError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(wrong_type(parameter, "a string", other)),
    }
}

/// `image` = `{"name": ..., "tag": ...}`, both optional.
fn image_param(value: &Value) -> Result<ImageParam<'_>, PlanError> {
    let image = value
        .as_object()
        .ok_or_else(|| wrong_type("image", "an object {\"name\", \"tag\"}", value))?;
    Ok(ImageParam {
        name: optional_str("image.name", image.get("name"))?,
        tag: optional_str("image.tag", image.get("tag"))?,
    })
}

/// The flags (if any) and the image a task asks for.
type FlagsAndImage<'a> = (Option<&'a Map<String, Value>>, ImageParam<'a>);

/// `offliner` = `{"image_tag": ..., "flags": ...}`, both optional.
fn older_form(value: &Value) -> Result<FlagsAndImage<'_>, PlanError> {
    let older = value
        .as_object()
        .ok_or_else(|| wrong_type("offliner", "an object {\"image_tag\", \"flags\"}", value))?;
    let flags = match older.get("flags") {
        None | Some(Value::Null) => None,
        Some(flags) => Some(object("offliner.flags", flags)?),
    };
    let image = ImageParam {
        name: None,
        tag: optional_str("offliner.image_tag", older.get("image_tag"))?,
    };
    Ok((flags, image))
}

/// Checks a warehouse path and drops one trailing `/`: `/wikipedia/` →
/// `/wikipedia`.
///
/// It must start with `/`, have components of `[A-Za-z0-9._-]` that are not
/// `.` or `..` and not empty, and be at most 255 bytes. `/` alone is
/// refused: it is the warehouse root (`/zim/`), where only directories
/// belong, and the dispatcher always names one (`/wikipedia`, `/other`, ...).
pub(crate) fn normalise_warehouse_path(value: &Value) -> Result<String, PlanError> {
    let path = value
        .as_str()
        .ok_or_else(|| wrong_type("warehouse_path", "a string", value))?;
    let invalid = |reason: String| PlanError::InvalidWarehousePath {
        path: shown(path),
        reason,
    };
    if path.len() > MAX_WAREHOUSE_PATH_LEN {
        return Err(invalid(format!(
            "it is {} bytes long, at most {MAX_WAREHOUSE_PATH_LEN} are allowed",
            path.len()
        )));
    }
    let Some(relative) = path.strip_prefix('/') else {
        return Err(invalid(
            "it must start with '/', e.g. \"/wikipedia\"".to_owned(),
        ));
    };
    if relative.is_empty() {
        return Err(invalid(
            "it names the warehouse root, where only directories belong: name a \
             directory, e.g. \"/wikipedia\""
                .to_owned(),
        ));
    }
    let relative = relative.strip_suffix('/').unwrap_or(relative);
    for component in relative.split('/') {
        if component.is_empty() {
            return Err(invalid("it has an empty component ('//')".to_owned()));
        }
        if component == "." || component == ".." {
            return Err(invalid(format!(
                "it has a {component:?} component; name directories directly"
            )));
        }
        if let Some(c) = component
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(invalid(format!(
                "it contains {c:?}, but directory names may only hold A-Z, a-z, 0-9, \
                 '.', '_' and '-'"
            )));
        }
    }
    Ok(format!("/{relative}"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn path(s: &str) -> Result<String, PlanError> {
        normalise_warehouse_path(&json!(s))
    }

    #[test]
    fn good_warehouse_paths_are_normalised() {
        assert_eq!(path("/wikipedia").unwrap(), "/wikipedia");
        assert_eq!(path("/wikipedia/").unwrap(), "/wikipedia");
        assert_eq!(path("/a/b.c/d_e-F9").unwrap(), "/a/b.c/d_e-F9");
        assert_eq!(path("/.hidden/..x/...").unwrap(), "/.hidden/..x/...");
        let longest = format!("/{}", "a".repeat(MAX_WAREHOUSE_PATH_LEN - 1));
        assert_eq!(path(&longest).unwrap(), longest);
    }

    #[test]
    fn bad_warehouse_paths_are_refused() {
        for (bad, rule) in [
            ("", "start with '/'"),
            ("wikipedia", "start with '/'"),
            ("./wikipedia", "start with '/'"),
            ("/", "warehouse root"),
            ("//", "empty component"),
            ("/a//b", "empty component"),
            ("/a//", "empty component"),
            ("/.", "\".\" component"),
            ("/a/./b", "\".\" component"),
            ("/..", "\"..\" component"),
            ("/a/../../etc", "\"..\" component"),
            ("/a b", "' '"),
            ("/a\u{0}b", "'\\0'"),
            ("/a\nb", "'\\n'"),
            ("/a\tb", "'\\t'"),
            ("/a\u{7f}", "'\\u{7f}'"),
            ("/wikipédia", "'é'"),
            ("/a;b", "';'"),
            ("/a$(id)", "'$'"),
            ("/a\\b", "'\\\\'"),
            ("/a:b", "':'"),
        ] {
            let err = path(bad).unwrap_err();
            assert!(
                matches!(err, PlanError::InvalidWarehousePath { .. }),
                "{bad:?} gave {err:?}"
            );
            let text = err.to_string();
            assert!(text.contains(rule), "{bad:?}: {text}");
            assert!(text.contains(&format!("{:?}", shown(bad))), "{text}");
        }
        let too_long = format!("/{}", "a".repeat(MAX_WAREHOUSE_PATH_LEN));
        let err = path(&too_long).unwrap_err().to_string();
        assert!(err.contains("256 bytes long"), "{err}");
    }

    #[test]
    fn warehouse_path_must_be_a_string() {
        let err = normalise_warehouse_path(&json!(["/wikipedia"])).unwrap_err();
        assert_eq!(
            err,
            PlanError::WrongType {
                parameter: "warehouse_path",
                expected: "a string",
                found: "a list",
                value: r#"["/wikipedia"]"#.into(),
            }
        );
    }
}
