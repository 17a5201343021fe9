//! Ollama model names: `[scheme://][host/][namespace/]model[:tag]`, their defaults
//! (`registry.ollama.ai`, `library`, `latest`), the characters each part may hold, and the
//! short display form that `/api/tags` shows.

use std::fmt;
use std::path::{Path, PathBuf};

use super::StoreError;

pub const DEFAULT_HOST: &str = "registry.ollama.ai";
pub const DEFAULT_NAMESPACE: &str = "library";
pub const DEFAULT_TAG: &str = "latest";

/// A fully qualified model name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelName {
    pub host: String,
    pub namespace: String,
    pub model: String,
    pub tag: String,
}

impl ModelName {
    /// Parses a name and fills in the defaults. Anything that could escape the store
    /// directory (`..`, absolute paths, odd characters) fails the character rules.
    pub fn parse(s: &str) -> Result<ModelName, StoreError> {
        let invalid = || StoreError::InvalidName(s.to_string());
        let rest = s
            .strip_prefix("https://")
            .or_else(|| s.strip_prefix("http://"))
            .unwrap_or(s);
        // The tag is cut at the last ':' only when it comes after the last '/', so a
        // registry port (`localhost:5000/ns/m`) is not a tag.
        let last_slash = rest.rfind('/');
        let (path, tag) = match rest.rfind(':') {
            Some(c) if last_slash.is_none_or(|sl| c > sl) => (&rest[..c], Some(&rest[c + 1..])),
            _ => (rest, None),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let (host, namespace, model) = match parts.as_slice() {
            [m] => (None, None, *m),
            [ns, m] => (None, Some(*ns), *m),
            [h, ns, m] => (Some(*h), Some(*ns), *m),
            _ => return Err(invalid()),
        };
        let name = ModelName {
            host: host.unwrap_or(DEFAULT_HOST).to_string(),
            namespace: namespace.unwrap_or(DEFAULT_NAMESPACE).to_string(),
            model: model.to_string(),
            tag: tag.unwrap_or(DEFAULT_TAG).to_string(),
        };
        let ok = valid_part(&name.host, 350, &['_', '-', '.', ':'])
            && valid_part(&name.namespace, 80, &['_', '-'])
            && valid_part(&name.model, 80, &['_', '-', '.'])
            && valid_part(&name.tag, 80, &['_', '-', '.']);
        if ok {
            Ok(name)
        } else {
            Err(invalid())
        }
    }

    /// The shortest form: `model:tag` for the default host and `library`, `ns/model:tag` for
    /// the default host, else everything.
    pub fn display_short(&self) -> String {
        if self.host == DEFAULT_HOST {
            if self.namespace == DEFAULT_NAMESPACE {
                format!("{}:{}", self.model, self.tag)
            } else {
                format!("{}/{}:{}", self.namespace, self.model, self.tag)
            }
        } else {
            self.to_string()
        }
    }

    /// The manifest's path relative to `manifests/`.
    pub fn manifest_rel_path(&self) -> PathBuf {
        Path::new(&self.host)
            .join(&self.namespace)
            .join(&self.model)
            .join(&self.tag)
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}:{}",
            self.host, self.namespace, self.model, self.tag
        )
    }
}

/// A part starts with an ASCII letter, digit or `_`, continues with those or `extra`, and is
/// 1 to `max` bytes long.
fn valid_part(s: &str, max: usize, extra: &[char]) -> bool {
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    s.len() <= max
        && (first.is_ascii_alphanumeric() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(s: &str) -> String {
        ModelName::parse(s)
            .map(|n| n.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn defaults_fill_in() {
        assert_eq!(
            full("llama3.1"),
            "registry.ollama.ai/library/llama3.1:latest"
        );
        assert_eq!(
            full("smollm2:135m"),
            "registry.ollama.ai/library/smollm2:135m"
        );
        assert_eq!(full("me/m:t"), "registry.ollama.ai/me/m:t");
        assert_eq!(full("hf.co/user/repo:Q4_K_M"), "hf.co/user/repo:Q4_K_M");
        assert_eq!(full("localhost:5000/ns/m"), "localhost:5000/ns/m:latest");
        assert_eq!(full("https://h.example/ns/m:1"), "h.example/ns/m:1");
    }

    #[test]
    fn short_forms() {
        let short = |s: &str| ModelName::parse(s).map(|n| n.display_short());
        assert_eq!(short("llama3.2").ok().as_deref(), Some("llama3.2:latest"));
        assert_eq!(short("ns/m:t").ok().as_deref(), Some("ns/m:t"));
        assert_eq!(short("hf.co/u/r:q").ok().as_deref(), Some("hf.co/u/r:q"));
    }

    #[test]
    fn rejects_bad_names() {
        for bad in [
            "",
            "../../etc/passwd",
            "..",
            "/etc/passwd",
            "a/b/c/d",
            "model:",
            "mo del",
            "m:t/x",
            "ns.with.dot/m",
            ".hidden",
            "a:b:c",
            "model\u{e9}",
        ] {
            assert!(ModelName::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
