//! The model catalog: TOML files that map Ollama-style names (`qwen2.5:0.5b`) to where
//! their weights come from (a Hugging Face repository, revision and extra files) and their
//! default options (the `params` layer of the pulled model).
//!
//! The built-in files in `models/` are compiled in; `WICK_CATALOG` names a directory of
//! further `*.toml` files (or one file) that is read at every pull, so users add or change
//! entries without recompiling or restarting. An entry in a later file replaces an entry of
//! the same name in an earlier one; built-in files come first, user files after them in
//! file name order.
//!
//! ```toml
//! use = "fallback"            # default for the file's entries ("always" if left out)
//!
//! [[model]]
//! name = "qwen2.5:0.5b"       # any model name; plain names mean registry.ollama.ai/library
//! source = "hf"               # the only kind so far, and the default
//! repo = "Qwen/Qwen2.5-0.5B-Instruct"
//! revision = "main"           # branch, tag or commit (default "main")
//! files = ["chat_template.jinja"]  # optional: files beyond config, tokenizer and weights
//! parameters = { temperature = 0.7, stop = ["<|im_end|>"] }
//! ```
//!
//! When an entry applies (see `sources`): `use = "always"` pulls from the entry's source
//! without asking any registry; `use = "fallback"` (every built-in entry) asks the registry
//! first, exactly as Ollama does, and uses the entry only when the registry does not have
//! the name or cannot be reached. A name with no entry is pulled as before.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use super::ModelName;

/// The built-in catalog files, compiled in.
const BUILTIN: &[(&str, &str)] = &[
    (
        "models/qwen2.5.toml",
        include_str!("../../models/qwen2.5.toml"),
    ),
    ("models/qwen3.toml", include_str!("../../models/qwen3.toml")),
    (
        "models/llama3.toml",
        include_str!("../../models/llama3.toml"),
    ),
    (
        "models/smollm2.toml",
        include_str!("../../models/smollm2.toml"),
    ),
    (
        "models/mistral.toml",
        include_str!("../../models/mistral.toml"),
    ),
];

/// A catalog file that cannot be used; the pull that read it fails with this.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("catalog {file}: {msg}")]
    Parse { file: String, msg: String },
    #[error("catalog {file}: model {name:?}: {msg}")]
    Entry {
        file: String,
        name: String,
        msg: String,
    },
}

/// When an entry is used instead of the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Use {
    /// Always: the registry is not asked.
    Always,
    /// Only when the registry does not have the name or cannot be reached.
    Fallback,
}

/// Where the files of a Hugging Face model come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfSource {
    /// `owner/name`.
    pub repo: String,
    /// Branch, tag or commit.
    pub revision: String,
    /// Files wanted beyond the ones every model needs (config, tokenizer, weights).
    pub files: Vec<String>,
}

/// One catalog entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: ModelName,
    pub source: HfSource,
    pub use_: Use,
    /// Default options, written as the model's `params` layer.
    pub parameters: Option<Map<String, Value>>,
    /// The file it came from (`models/…` for built-in entries).
    pub file: String,
}

/// Every entry of the built-in and the user's catalog files.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    entries: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(rename = "use")]
    use_: Option<Use>,
    #[serde(default)]
    model: Vec<EntryDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryDoc {
    name: String,
    source: Option<String>,
    repo: String,
    revision: Option<String>,
    #[serde(default)]
    files: Vec<String>,
    #[serde(rename = "use")]
    use_: Option<Use>,
    parameters: Option<toml::Table>,
}

impl Catalog {
    /// The compiled-in entries only.
    pub fn builtin() -> Result<Catalog, CatalogError> {
        let mut c = Catalog::default();
        for (file, text) in BUILTIN {
            c.add_file(file, text)?;
        }
        Ok(c)
    }

    /// The built-in entries, then those of `user` (a directory of `*.toml` files, or one
    /// file) when given.
    pub fn load(user: Option<&Path>) -> Result<Catalog, CatalogError> {
        let mut c = Catalog::builtin()?;
        let Some(user) = user else {
            return Ok(c);
        };
        let io = |source| CatalogError::Io {
            path: user.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(user).map_err(io)?;
        let files = if meta.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(user)
                .map_err(io)?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "toml") && p.is_file())
                .collect();
            files.sort();
            files
        } else {
            vec![user.to_path_buf()]
        };
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|source| CatalogError::Io {
                path: f.clone(),
                source,
            })?;
            c.add_file(&f.display().to_string(), &text)?;
        }
        Ok(c)
    }

    /// Parses one file's entries; an entry replaces an earlier one of the same name.
    fn add_file(&mut self, file: &str, text: &str) -> Result<(), CatalogError> {
        let doc: FileDoc = toml::from_str(text).map_err(|e| CatalogError::Parse {
            file: file.to_string(),
            msg: e.to_string().trim_end().to_string(),
        })?;
        let mut seen: Vec<ModelName> = Vec::new();
        for e in doc.model {
            let entry = Entry::from_doc(e, doc.use_, file)?;
            if seen.iter().any(|n| same_name(n, &entry.name)) {
                return Err(CatalogError::Entry {
                    file: file.to_string(),
                    name: entry.name.display_short(),
                    msg: "defined twice in this file".into(),
                });
            }
            seen.push(entry.name.clone());
            self.entries
                .retain(|old| !same_name(&old.name, &entry.name));
            self.entries.push(entry);
        }
        Ok(())
    }

    /// The entry for `name`, if any (names compare ignoring ASCII case, as the store does).
    pub fn find(&self, name: &ModelName) -> Option<&Entry> {
        self.entries.iter().find(|e| same_name(&e.name, name))
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }
}

impl Entry {
    fn from_doc(e: EntryDoc, file_use: Option<Use>, file: &str) -> Result<Entry, CatalogError> {
        let bad = |msg: String| CatalogError::Entry {
            file: file.to_string(),
            name: e.name.clone(),
            msg,
        };
        let name = ModelName::parse(&e.name).map_err(|_| bad("invalid model name".into()))?;
        match e.source.as_deref() {
            None | Some("hf") => {}
            Some(other) => return Err(bad(format!("unknown source {other:?} (only \"hf\")"))),
        }
        if !valid_repo(&e.repo) {
            return Err(bad(format!(
                "repo {:?} is not a Hugging Face repository id (owner/name)",
                e.repo
            )));
        }
        let revision = e.revision.clone().unwrap_or_else(|| "main".into());
        if !valid_revision(&revision) {
            return Err(bad(format!(
                "revision {revision:?} is not a usable revision"
            )));
        }
        if let Some(f) = e.files.iter().find(|f| !valid_file_name(f)) {
            return Err(bad(format!(
                "file {f:?} is not a plain file name at the top of the repository"
            )));
        }
        let parameters = match &e.parameters {
            None => None,
            Some(t) => Some(parameters_json(t).map_err(bad)?),
        };
        Ok(Entry {
            name,
            source: HfSource {
                repo: e.repo.clone(),
                revision,
                files: e.files.clone(),
            },
            use_: e.use_.or(file_use).unwrap_or(Use::Always),
            parameters,
            file: file.to_string(),
        })
    }
}

/// The parameters as the JSON of a `params` layer; `stop` is always a list there.
fn parameters_json(t: &toml::Table) -> Result<Map<String, Value>, String> {
    let mut map = match serde_json::to_value(t) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err("parameters must be a table".into()),
        Err(e) => return Err(format!("parameters: {e}")),
    };
    if let Some(Value::String(s)) = map.get("stop").cloned() {
        map.insert("stop".into(), Value::Array(vec![Value::String(s)]));
    }
    Ok(map)
}

fn same_name(a: &ModelName, b: &ModelName) -> bool {
    a.host.eq_ignore_ascii_case(&b.host)
        && a.namespace.eq_ignore_ascii_case(&b.namespace)
        && a.model.eq_ignore_ascii_case(&b.model)
        && a.tag.eq_ignore_ascii_case(&b.tag)
}

/// `owner/name`, each part of the characters Hugging Face allows (and so safe in a URL).
pub fn valid_repo(repo: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['.', '-'])
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(repo.split_once('/'), Some((o, n)) if part(o) && part(n))
}

/// A branch, tag or commit: nothing that would change the URL it is put into.
pub fn valid_revision(rev: &str) -> bool {
    !rev.is_empty()
        && rev.len() <= 200
        && !rev.contains("..")
        && rev
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

/// A file at the top of a repository, usable as a name in a directory of links: no
/// separators, no `..`, not hidden.
pub fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
}

/// A model file's name: a plain name, or one folder deep (`1_Pooling/config.json`, the
/// pooling config of a sentence-transformers model, which Ollama's CLI sends under that
/// name). Each part is a [`valid_file_name`].
pub fn valid_model_file(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    parts.len() <= 2 && parts.iter().all(|p| valid_file_name(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_files_may_be_one_folder_deep() {
        assert!(valid_model_file("config.json"));
        assert!(valid_model_file("1_Pooling/config.json"));
        for bad in [
            "a/b/c.json",
            "../config.json",
            "1_Pooling/../x",
            "/etc/passwd",
            ".hidden/x.json",
            "dir/",
            "a\\b",
        ] {
            assert!(!valid_model_file(bad), "{bad}");
        }
    }

    #[test]
    fn builtin_catalog_parses_and_covers_the_families() {
        let c = Catalog::builtin().unwrap();
        for name in [
            "qwen2.5:0.5b",
            "qwen2.5:1.5b",
            "qwen3:0.6b",
            "llama3.2:1b",
            "llama3.2:3b",
            "llama3.1:8b",
            "smollm2:135m",
            "smollm2:360m",
            "mistral:7b",
        ] {
            let e = c
                .find(&ModelName::parse(name).unwrap())
                .unwrap_or_else(|| panic!("{name} is not in the catalog"));
            // Built-in entries never take a name away from registry.ollama.ai.
            assert_eq!(e.use_, Use::Fallback, "{name}");
            assert!(valid_repo(&e.source.repo), "{name}");
        }
        assert!(c.find(&ModelName::parse("QWEN2.5:0.5B").unwrap()).is_some());
        assert!(c
            .find(&ModelName::parse("qwen2.5:72b-nope").unwrap())
            .is_none());
    }

    #[test]
    fn user_files_add_and_replace_entries() {
        let dir = std::env::temp_dir().join(format!("wick-catalog-{}", super::super::nanos()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("mine.toml"),
            r#"
[[model]]
name = "qwen2.5:0.5b"
repo = "me/my-qwen"
revision = "v2"
parameters = { temperature = 0.1, stop = "<|im_end|>" }

[[model]]
name = "tiny:1"
repo = "me/tiny"
use = "fallback"
"#,
        )
        .unwrap();
        std::fs::write(dir.join("notes.txt"), "not a catalog").unwrap();
        let c = Catalog::load(Some(&dir)).unwrap();
        let e = c.find(&ModelName::parse("qwen2.5:0.5b").unwrap()).unwrap();
        assert_eq!(e.source.repo, "me/my-qwen");
        assert_eq!(e.source.revision, "v2");
        assert_eq!(e.use_, Use::Always);
        let p = e.parameters.as_ref().unwrap();
        assert_eq!(p["stop"], serde_json::json!(["<|im_end|>"]));
        let t = c.find(&ModelName::parse("tiny:1").unwrap()).unwrap();
        assert_eq!(t.use_, Use::Fallback);
        assert_eq!(t.source.revision, "main");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_entries_are_refused_with_their_file() {
        let mut c = Catalog::default();
        for (text, want) in [
            ("[[model]]\nname = \"a\"\nrepo = \"../x\"\n", "repo"),
            ("[[model]]\nname = \"a b\"\nrepo = \"o/n\"\n", "invalid model name"),
            (
                "[[model]]\nname = \"a\"\nrepo = \"o/n\"\nfiles = [\"../etc/passwd\"]\n",
                "plain file name",
            ),
            (
                "[[model]]\nname = \"a\"\nrepo = \"o/n\"\nrevision = \"x?y\"\n",
                "revision",
            ),
            ("[[model]]\nname = \"a\"\nrepo = \"o/n\"\nsource = \"s3\"\n", "source"),
            ("[[model]]\nname = \"a\"\nrepo = \"o/n\"\nrepoo = 1\n", "unknown field"),
            (
                "[[model]]\nname = \"a\"\nrepo = \"o/n\"\n[[model]]\nname = \"A\"\nrepo = \"o/m\"\n",
                "twice",
            ),
        ] {
            let err = c.add_file("t.toml", text).unwrap_err().to_string();
            assert!(err.starts_with("catalog t.toml"), "{err}");
            assert!(err.contains(want), "{err} should mention {want}");
        }
        assert!(Catalog::load(Some(Path::new("/nonexistent/wick-catalog"))).is_err());
    }
}
