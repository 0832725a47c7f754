//! Bearer tokens: the hub keeps only their SHA-256 and the datasets they open.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::config::{TokenAccess, TokenConfig};
use crate::proto::Access;

/// What a valid token allows.
#[derive(Clone, Debug)]
pub struct Grant {
    pub name: String,
    /// The SHA-256 the token is known by: a session keeps it so that a
    /// reload can tell whether its token is still listed.
    pub sha256: String,
    datasets: Vec<String>,
    pub access: Access,
}

impl Grant {
    pub fn allows(&self, dataset: &str) -> bool {
        self.datasets.iter().any(|d| d == "*" || d == dataset)
    }

    /// The datasets it opens, as configured (`*` for all).
    pub fn datasets(&self) -> &[String] {
        &self.datasets
    }
}

/// The tokens of `hub.toml`, indexed by hash.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    by_hash: HashMap<String, Grant>,
}

/// Lowercase hex SHA-256 of a token's UTF-8 bytes.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Tokens {
    pub fn new(tokens: &[TokenConfig]) -> Tokens {
        Tokens {
            by_hash: tokens
                .iter()
                .map(|t| {
                    (
                        t.sha256.clone(),
                        Grant {
                            name: t.name.clone(),
                            sha256: t.sha256.clone(),
                            datasets: t.datasets.clone(),
                            access: match t.access {
                                TokenAccess::ReadWrite => Access::ReadWrite,
                                TokenAccess::ReadOnly => Access::ReadOnly,
                            },
                        },
                    )
                })
                .collect(),
        }
    }

    /// Checks an `Authorization` header value.
    pub fn check(&self, authorization: Option<&str>) -> Option<&Grant> {
        // The scheme is case-insensitive (RFC 9110, section 11.1).
        let (scheme, token) = authorization?.trim_start().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let token = token.trim();
        self.by_hash.get(&hash_token(token))
    }

    /// The grant of the token with this SHA-256, if it is listed.
    pub fn by_hash(&self, sha256: &str) -> Option<&Grant> {
        self.by_hash.get(sha256)
    }
}

/// A fresh random token: 32 random bytes as lowercase hex.
pub fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("tth_{}", hex::encode(bytes))
}

/// The `[[token]]` block to paste into `hub.toml` for a token.
pub fn token_block(name: &str, token: &str, dataset: &str, read_only: bool) -> String {
    format!(
        "[[token]]\nname = {name:?}\nsha256 = \"{}\"\ndatasets = [{dataset:?}]\naccess = \"{}\"\n",
        hash_token(token),
        if read_only { "read_only" } else { "read_write" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_matched_without_regard_to_case() {
        let token = new_token();
        let tokens = Tokens::new(&[TokenConfig {
            name: "t".into(),
            sha256: hash_token(&token),
            datasets: vec!["*".into()],
            access: TokenAccess::ReadWrite,
        }]);
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            assert!(
                tokens.check(Some(&format!("{scheme} {token}"))).is_some(),
                "{scheme}"
            );
        }
        assert!(tokens.check(Some(&format!("Basic {token}"))).is_none());
        assert!(tokens.check(Some(&token)).is_none());
        assert!(tokens.check(Some("Bearer wrong")).is_none());
        assert!(tokens.check(None).is_none());
    }
}
