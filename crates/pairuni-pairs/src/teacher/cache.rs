//! The SQLite cache of teacher exchanges: one row per reply, committed the moment it arrives (WAL journal,
//! synchronous=FULL), so a rerun or a resume after `kill -9` never pays for a call twice.

use crate::error::{PairsError, Result};
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A stored reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedReply {
    /// The assistant message text (or the whole HTTP body when it was not a chat-completions response).
    pub text: String,
    /// Whether `text` is the assistant message (false: the body did not have the chat-completions shape).
    pub well_formed: bool,
}

/// Thread-safe handle on the cache database.
pub struct TeacherCache {
    conn: Mutex<Connection>,
    path: PathBuf,
}

/// sha256 over length-prefixed parts, so ("ab","c") and ("a","bc") differ.
pub fn cache_key(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(h.finalize())
}

impl TeacherCache {
    /// Opens (creating if needed) the cache at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| PairsError::io(dir, e))?;
        }
        let wrap = |source| PairsError::Cache {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(wrap)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(wrap)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(wrap)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(wrap)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS exchanges (
                key TEXT PRIMARY KEY,
                model TEXT NOT NULL,
                template TEXT NOT NULL,
                reply TEXT NOT NULL,
                well_formed INTEGER NOT NULL,
                created_unix REAL NOT NULL
            );",
        )
        .map_err(wrap)?;
        Ok(Self {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }

    fn wrap(&self, source: rusqlite::Error) -> PairsError {
        PairsError::Cache {
            path: self.path.clone(),
            source,
        }
    }

    /// The stored reply for `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<CachedReply>> {
        let conn = self
            .conn
            .lock()
            .expect("cache lock is never poisoned by a panic inside");
        conn.query_row(
            "SELECT reply, well_formed FROM exchanges WHERE key = ?1",
            params![key],
            |r| {
                Ok(CachedReply {
                    text: r.get(0)?,
                    well_formed: r.get::<_, i64>(1)? != 0,
                })
            },
        )
        .optional()
        .map_err(|e| self.wrap(e))
    }

    /// Stores a reply (autocommit: durable when this returns).
    pub fn put(&self, key: &str, model: &str, template: &str, reply: &CachedReply) -> Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let conn = self
            .conn
            .lock()
            .expect("cache lock is never poisoned by a panic inside");
        conn.execute(
            "INSERT OR REPLACE INTO exchanges (key, model, template, reply, well_formed, created_unix)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![key, model, template, reply.text, reply.well_formed as i64, now],
        )
        .map_err(|e| self.wrap(e))?;
        Ok(())
    }

    /// Number of stored exchanges.
    pub fn len(&self) -> Result<usize> {
        let conn = self
            .conn
            .lock()
            .expect("cache lock is never poisoned by a panic inside");
        conn.query_row("SELECT COUNT(*) FROM exchanges", [], |r| r.get::<_, i64>(0))
            .map(|n| n as usize)
            .map_err(|e| self.wrap(e))
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_replies_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sqlite");
        let key = cache_key(&[b"m", b"v1", b"input"]);
        {
            let c = TeacherCache::open(&path).unwrap();
            assert_eq!(c.get(&key).unwrap(), None);
            c.put(
                &key,
                "m",
                "v1",
                &CachedReply {
                    text: "hello".into(),
                    well_formed: true,
                },
            )
            .unwrap();
        }
        let c = TeacherCache::open(&path).unwrap();
        assert_eq!(
            c.get(&key).unwrap(),
            Some(CachedReply {
                text: "hello".into(),
                well_formed: true
            })
        );
        assert_eq!(c.len().unwrap(), 1);
    }

    #[test]
    fn keys_are_length_prefixed() {
        assert_ne!(cache_key(&[b"ab", b"c"]), cache_key(&[b"a", b"bc"]));
        assert_eq!(cache_key(&[b"x"]).len(), 64);
    }
}
