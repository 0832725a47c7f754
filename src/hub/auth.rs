//! Bearer tokens: the hub keeps only their SHA-256 and the datasets they open.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::config::{TokenAccess, TokenConfig};
use crate::proto::Access;

/// What a valid token allows.
#[derive(Clone, Debug)]
pub struct Grant {
    pub name: String,
    datasets: Vec<String>,
    pub access: Access,
}

impl Grant {
    pub fn allows(&self, dataset: &str) -> bool {
        self.datasets.iter().any(|d| d == "*" || d == dataset)
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
        let token = authorization?.strip_prefix("Bearer ")?.trim();
        self.by_hash.get(&hash_token(token))
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
