//! API keys: `authorization: Bearer <key>` on gRPC metadata and HTTP/WS
//! requests. Keys are configured by their SHA-256 (hex), never in clear,
//! each with per-topic rights. Topic patterns are exact names, a prefix
//! ending in `*`, or `*`.

use std::collections::HashMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// What a key may do on a topic. `admin` includes `read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Right {
    /// Stream, latest, stats.
    Read,
    /// Manage subscriptions and topics.
    Admin,
}

impl Right {
    fn name(self) -> &'static str {
        match self {
            Right::Read => "read",
            Right::Admin => "administer",
        }
    }
}

/// One grant: a topic pattern and its rights.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Exact topic, `prefix*`, or `*`.
    pub topic: String,
    /// Rights on matching topics.
    pub rights: Vec<Right>,
}

/// One key.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Name, for logs.
    pub name: String,
    /// SHA-256 of the key, 64 hex digits (`printf %s KEY | sha256sum`).
    pub sha256: String,
    /// What it may do.
    pub grants: Vec<Grant>,
}

/// `[edge.auth]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Check keys (default off: allowed only on loopback addresses).
    pub enabled: bool,
    /// Serve a non-loopback address with auth off (refused unless set).
    pub allow_unauthenticated_remote: bool,
    /// Keys.
    pub keys: Vec<KeyConfig>,
}

/// The hex SHA-256 of a key, as the configuration holds it.
pub fn hash_key(key: &str) -> String {
    let d = Sha256::digest(key.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks keys and rights.
#[derive(Debug)]
pub struct Auth {
    enabled: bool,
    keys: HashMap<String, KeyConfig>,
}

impl Auth {
    /// From the validated configuration.
    ///
    /// # Errors
    /// A key whose hash is not 64 hex digits, or named twice.
    pub fn new(c: &AuthConfig) -> Result<Auth, String> {
        let mut keys = HashMap::new();
        for (i, k) in c.keys.iter().enumerate() {
            let h = k.sha256.to_ascii_lowercase();
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "edge.auth.keys[{i}].sha256: not 64 hex digits (give the SHA-256 of the key, never the key)"
                ));
            }
            if keys.insert(h, k.clone()).is_some() {
                return Err(format!("edge.auth.keys[{i}]: the same key twice"));
            }
        }
        Ok(Auth {
            enabled: c.enabled,
            keys,
        })
    }

    /// Whether keys are checked.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The key's name for an `authorization` header value, when auth is on.
    ///
    /// # Errors
    /// [`ApiError::Unauthenticated`] for a missing, malformed or unknown key.
    pub fn check_header(&self, value: Option<&str>) -> Result<Option<String>, ApiError> {
        if !self.enabled {
            return Ok(None);
        }
        let key = value
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or(ApiError::Unauthenticated)?;
        self.keys
            .get(&hash_key(key))
            .map(|k| Some(k.name.clone()))
            .ok_or(ApiError::Unauthenticated)
    }

    /// [`Auth::check_header`] on a gRPC request's metadata.
    ///
    /// # Errors
    /// As `check_header`.
    pub fn check_grpc<T>(&self, r: &tonic::Request<T>) -> Result<Option<String>, ApiError> {
        self.check_header(
            r.metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok()),
        )
    }

    /// [`Auth::check_header`] on HTTP headers.
    ///
    /// # Errors
    /// As `check_header`.
    pub fn check_http(&self, h: &axum::http::HeaderMap) -> Result<Option<String>, ApiError> {
        self.check_header(h.get("authorization").and_then(|v| v.to_str().ok()))
    }

    /// Whether the key (by name, from a check) may do `right` on `topic`.
    ///
    /// # Errors
    /// [`ApiError::PermissionDenied`].
    pub fn allow(&self, key: Option<&str>, topic: &str, right: Right) -> Result<(), ApiError> {
        if !self.enabled {
            return Ok(());
        }
        let denied = || ApiError::PermissionDenied {
            action: right.name(),
            topic: topic.to_string(),
        };
        let key = key.ok_or_else(denied)?;
        let k = self
            .keys
            .values()
            .find(|k| k.name == key)
            .ok_or_else(denied)?;
        let ok = k.grants.iter().any(|g| {
            let matches = g.topic == "*"
                || g.topic == topic
                || g.topic
                    .strip_suffix('*')
                    .is_some_and(|p| topic.starts_with(p));
            matches && g.rights.iter().any(|&r| r == right || r == Right::Admin)
        });
        if ok { Ok(()) } else { Err(denied()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_by_hash_and_rights_by_topic() {
        let auth = Auth::new(&AuthConfig {
            enabled: true,
            allow_unauthenticated_remote: false,
            keys: vec![KeyConfig {
                name: "reader".into(),
                sha256: hash_key("s3cret"),
                grants: vec![Grant {
                    topic: "market-data/*".into(),
                    rights: vec![Right::Read],
                }],
            }],
        })
        .expect("valid");
        assert!(matches!(
            auth.check_header(None),
            Err(ApiError::Unauthenticated)
        ));
        assert!(matches!(
            auth.check_header(Some("Bearer nope")),
            Err(ApiError::Unauthenticated)
        ));
        let k = auth.check_header(Some("Bearer s3cret")).expect("known");
        assert_eq!(k.as_deref(), Some("reader"));
        assert!(
            auth.allow(k.as_deref(), "market-data/x", Right::Read)
                .is_ok()
        );
        assert!(matches!(
            auth.allow(k.as_deref(), "market-data/x", Right::Admin),
            Err(ApiError::PermissionDenied { .. })
        ));
        assert!(auth.allow(k.as_deref(), "other", Right::Read).is_err());
        assert!(
            Auth::new(&AuthConfig {
                keys: vec![KeyConfig {
                    name: "x".into(),
                    sha256: "s3cret".into(),
                    grants: vec![]
                }],
                ..AuthConfig::default()
            })
            .is_err()
        );
    }
}
