//! Authentication and tenancy.
//!
//! Every write and read carries a credential that names its tenant:
//! - gRPC metadata `x-junjo-api-key`, `x-api-key`, or `authorization: Bearer <key or JWT>`;
//! - HTTP `X-API-Key` or `Authorization: Bearer <key or JWT>`.
//!
//! API keys ([`apikeys`]) are stored as SHA-256 hashes; JWTs ([`jwt`]) are RS256
//! tokens issued for a key (`POST /api/v1/otel/token`, `AuthService/GetToken`)
//! or by a remote identity provider (`--jwks-url`). A [`Principal`] is what a
//! credential proves: tenant, scopes (`read`, `write`, `admin` ⊇ all) and an
//! optional endpoint allow-list. The tenant always comes from the credential.
//!
//! Verified keys and tokens are cached briefly (keys: [`KEY_CACHE_TTL`], so a
//! deleted key stops working within that time on every node; this node drops
//! its cache at once) so credential checks stay off the ingest profile.
//!
//! `--no-auth` turns all of this off (every request is tenant `default` with
//! every scope): for local experiments and the auth-off benchmark only.

pub mod apikeys;
pub mod jwt;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rocksdb::DB;
use serde::Serialize;

use crate::error::{ApiError, ErrorKind};
use crate::flush::now_ms;
use crate::ingest::names;
use apikeys::{ApiKeys, KeyRecord};

pub const KEY_CACHE_TTL: Duration = Duration::from_secs(2);
pub const DEFAULT_TENANT: &str = "default";
pub const SCOPES: &[&str] = &["read", "write", "admin"];

/// What a credential proves.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Principal {
    pub tenant: String,
    pub key_id: String,
    pub scopes: Vec<String>,
    pub endpoints: Option<Vec<String>>,
}

impl Principal {
    pub fn has(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope || s == "admin")
    }

    pub fn require(&self, scope: &str) -> Result<(), ApiError> {
        // Administration (keys, every table, other tenants for `default`)
        // reaches past any allow-list: a limited credential has none of it
        // (keys are refused this at creation; tokens of other issuers may
        // still claim it).
        if scope == "admin" && self.endpoints.is_some() {
            return Err(ApiError::new(
                ErrorKind::Forbidden,
                "a credential limited to some endpoints cannot use the \"admin\" scope",
            ));
        }
        if self.has(scope) {
            return Ok(());
        }
        Err(ApiError::new(
            ErrorKind::Forbidden,
            format!("credential lacks the {scope:?} scope"),
        ))
    }

    /// Requires `scope` and, when the key has an allow-list, that `endpoint` is on it.
    pub fn require_endpoint(&self, scope: &str, endpoint: &str) -> Result<(), ApiError> {
        self.require(scope)?;
        match &self.endpoints {
            Some(list) if !list.iter().any(|e| e == endpoint) => Err(ApiError::new(
                ErrorKind::Forbidden,
                format!("credential may not access endpoint {endpoint:?}"),
            )),
            _ => Ok(()),
        }
    }

    fn everything() -> Self {
        Self {
            tenant: DEFAULT_TENANT.into(),
            key_id: "no-auth".into(),
            scopes: vec!["admin".into()],
            endpoints: None,
        }
    }
}

/// A presented credential.
#[derive(Debug, Clone)]
pub enum Credential {
    ApiKey(String),
    Bearer(String),
    /// A credential header that is present but unusable (empty, not visible
    /// ASCII, another scheme than Bearer): refused with this reason, never
    /// read as "no credential" (which the internal port treats as trusted).
    Malformed(String),
}

impl Credential {
    /// `get(name)`: `None` if the header is absent, `Some(None)` if its value
    /// is not visible ASCII. `None` only when no credential header is present.
    fn from_pairs<'a>(mut get: impl FnMut(&str) -> Option<Option<&'a str>>) -> Option<Self> {
        let malformed = |m: String| Some(Self::Malformed(m));
        for h in ["x-junjo-api-key", "x-api-key"] {
            match get(h).map(|v| v.map(str::trim)) {
                None => {}
                Some(None) => return malformed(format!("the {h} header is not visible ASCII")),
                Some(Some("")) => return malformed(format!("the {h} header is empty")),
                Some(Some(v)) => return Some(Self::ApiKey(v.to_string())),
            }
        }
        let Some(auth) = get("authorization")? else {
            return malformed("the authorization header is not visible ASCII".into());
        };
        // The scheme name is case-insensitive (RFC 9110, 11.1).
        let (scheme, token) = auth.trim().split_once(' ').unwrap_or((auth.trim(), ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            // Named only when it is a known scheme: anything else may be a
            // bare key, which error messages (clients log them) must not echo.
            const KNOWN: [&str; 7] = [
                "basic",
                "digest",
                "negotiate",
                "ntlm",
                "token",
                "apikey",
                "hoba",
            ];
            let known = KNOWN.iter().any(|k| scheme.eq_ignore_ascii_case(k));
            let scheme = match known {
                true => format!("the {scheme:?} scheme"),
                false => "no known scheme".into(),
            };
            return malformed(format!(
                "the authorization header uses {scheme}; send 'Bearer <API key or token>'"
            ));
        }
        match token.trim() {
            "" => malformed("the authorization header has no bearer token".into()),
            t => Some(Self::Bearer(t.to_string())),
        }
    }

    pub fn from_grpc(md: &tonic::metadata::MetadataMap) -> Option<Self> {
        Self::from_pairs(|k| md.get(k).map(|v| v.to_str().ok()))
    }

    pub fn from_http(h: &http::HeaderMap) -> Option<Self> {
        Self::from_pairs(|k| h.get(k).map(|v| v.to_str().ok()))
    }
}

/// The id prefix of the key `LAKEWRITER_BOOTSTRAP_API_KEY` sets (a new id
/// per key, so the tokens of a replaced one die with it).
pub const BOOTSTRAP_ID: &str = "bootstrap";

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub disabled: bool,
    pub bootstrap_api_key: Option<String>,
    pub jwks_url: Option<String>,
    pub token_ttl: Duration,
    pub jwks_refetch_interval: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            disabled: false,
            bootstrap_api_key: None,
            jwks_url: None,
            token_ttl: Duration::from_secs(3600),
            jwks_refetch_interval: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Keys(#[from] apikeys::Error),
    #[error(transparent)]
    Jwt(#[from] jwt::Error),
    #[error("writing the admin key file {path}: {source}")]
    AdminFile {
        path: String,
        source: std::io::Error,
    },
}

impl crate::error::Classify for Error {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Internal
    }
}

/// Verified credentials by hash or token, bounded (cleared when full).
///
/// A check reads the key store after [`Cache::since`] and caches what it
/// found with [`Cache::put`]; a deletion changes the store, then
/// [`Cache::purge`]s. `put` caches nothing when a purge ran in between:
/// else a check that read the store just before a deletion would cache,
/// just after its purge, a credential the deletion has revoked.
struct Cache<V>(Mutex<Entries<V>>);

struct Entries<V> {
    map: HashMap<String, V>,
    /// Purges so far.
    purges: u64,
}

impl<V: Clone> Cache<V> {
    const MAX: usize = 10_000;

    fn get(&self, key: &str) -> Option<V> {
        self.0.lock().map.get(key).cloned()
    }

    /// Call before reading the key store; pass to [`Cache::put`].
    fn since(&self) -> u64 {
        self.0.lock().purges
    }

    /// Caches `value` unless a purge ran after `since`.
    fn put(&self, since: u64, key: String, value: V) {
        let mut entries = self.0.lock();
        if entries.purges != since {
            return;
        }
        if entries.map.len() >= Self::MAX {
            entries.map.clear();
        }
        entries.map.insert(key, value);
    }

    /// Drops the entries `revoked` picks; checks under way cache nothing.
    fn purge(&self, mut revoked: impl FnMut(&V) -> bool) {
        let mut entries = self.0.lock();
        entries.purges = entries.purges.wrapping_add(1);
        entries.map.retain(|_, v| !revoked(v));
    }
}

impl<V> Default for Cache<V> {
    fn default() -> Self {
        Self(Mutex::new(Entries {
            map: HashMap::new(),
            purges: 0,
        }))
    }
}

pub struct Auth {
    db: Arc<DB>,
    pub jwt: jwt::Jwt,
    disabled: bool,
    key_cache: Cache<(Principal, Instant)>,
    token_cache: Cache<(Principal, u64)>,
}

fn unauthenticated(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::Unauthenticated, msg)
}

impl Auth {
    /// Opens the key store, creating the bootstrap admin key when needed.
    pub fn open(db: Arc<DB>, cfg: &AuthConfig, data_dir: &Path) -> Result<Self, Error> {
        let jwt = jwt::Jwt::open(
            db.clone(),
            cfg.token_ttl,
            cfg.jwks_url.clone(),
            cfg.jwks_refetch_interval,
        )?;
        let auth = Self {
            db,
            jwt,
            disabled: cfg.disabled,
            key_cache: Cache::default(),
            token_cache: Cache::default(),
        };
        auth.bootstrap(cfg.bootstrap_api_key.as_deref(), data_dir)?;
        Ok(auth)
    }

    /// Stores `LAKEWRITER_BOOTSTRAP_API_KEY`, revoking the one set before,
    /// or creates and prints an admin key when there is no key at all.
    fn bootstrap(&self, key: Option<&str>, data_dir: &Path) -> Result<(), Error> {
        let keys = ApiKeys::new(&self.db);
        let admin = |id: &str| KeyRecord {
            id: id.into(),
            tenant: DEFAULT_TENANT.into(),
            name: "bootstrap admin".into(),
            scopes: vec!["admin".into()],
            endpoints: None,
            created_at: now_ms() / 1000,
            hash: String::new(),
        };
        if let Some(key) = key {
            if keys.lookup(key)?.is_none() {
                let id = format!(
                    "{BOOTSTRAP_ID}-{}",
                    ulid::Ulid::new().to_string().to_lowercase()
                );
                keys.insert(key, admin(&id))?;
                tracing::info!(
                    %id,
                    "bootstrap admin key from LAKEWRITER_BOOTSTRAP_API_KEY stored (as a hash)"
                );
            }
            // A bootstrap key set before is revoked, with its tokens (after
            // the insert: a crash in between leaves it to the next start).
            let hash = apikeys::hash_hex(key);
            for old in keys.list()? {
                if old.id.starts_with(BOOTSTRAP_ID) && old.hash != hash {
                    keys.delete(&old.id)?;
                    tracing::warn!(id = %old.id, "the previous bootstrap admin key is revoked");
                }
            }
            return Ok(());
        }
        if !keys.is_empty()? {
            return Ok(());
        }
        let key = apikeys::generate_key();
        let path = data_dir.join("admin-api-key");
        write_secret(&path, &key).map_err(|source| Error::AdminFile {
            path: path.display().to_string(),
            source,
        })?;
        keys.insert(&key, admin(&ulid::Ulid::new().to_string().to_lowercase()))?;
        println!(
            "lakewriter: created the admin API key (shown once, also in {}):\n{key}",
            path.display()
        );
        Ok(())
    }

    pub fn keys(&self) -> ApiKeys<'_> {
        ApiKeys::new(&self.db)
    }

    /// Checks a credential; `None` is UNAUTHENTICATED unless auth is disabled.
    pub async fn authenticate(&self, cred: Option<Credential>) -> Result<Principal, ApiError> {
        if self.disabled {
            return Ok(Principal::everything());
        }
        match cred {
            None => Err(unauthenticated(
                "missing credential: send x-junjo-api-key, x-api-key or authorization: Bearer",
            )),
            Some(Credential::ApiKey(k)) => self.check_key(&k),
            // A JWT is three dot-separated parts; anything else is an API
            // key (a bootstrap key need not start with `lw_`).
            Some(Credential::Bearer(t))
                if t.starts_with(apikeys::KEY_PREFIX) || t.split('.').count() != 3 =>
            {
                self.check_key(&t)
            }
            Some(Credential::Bearer(t)) => self.check_token(&t).await,
            Some(Credential::Malformed(reason)) => Err(unauthenticated(reason)),
        }
    }

    fn check_key(&self, key: &str) -> Result<Principal, ApiError> {
        let hash = apikeys::hash_hex(key);
        if let Some((p, at)) = self.key_cache.get(&hash) {
            if at.elapsed() < KEY_CACHE_TTL {
                return Ok(p);
            }
        }
        let since = self.key_cache.since();
        let rec = self
            .keys()
            .lookup(key)
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        let rec = rec.ok_or_else(|| unauthenticated("invalid API key"))?;
        let p = Principal {
            tenant: rec.tenant,
            key_id: rec.id,
            scopes: rec.scopes,
            endpoints: rec.endpoints,
        };
        self.key_cache.put(since, hash, (p.clone(), Instant::now()));
        Ok(p)
    }

    async fn check_token(&self, token: &str) -> Result<Principal, ApiError> {
        let now = now_ms() / 1000;
        if let Some((p, exp)) = self.token_cache.get(token) {
            if exp > now {
                return Ok(p);
            }
        }
        let since = self.token_cache.since();
        let (claims, local) = self
            .jwt
            .verify(token)
            .await
            .map_err(|e| unauthenticated(e.to_string()))?;
        // Our own tokens die with the API key they were issued for.
        let key_exists = self
            .keys()
            .exists_id(&claims.sub)
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        if local && !key_exists {
            return Err(unauthenticated(
                "the API key this token was issued for was deleted",
            ));
        }
        if !names::is_valid(&claims.tenant) {
            return Err(unauthenticated(
                "token tenant claim is not a valid tenant name",
            ));
        }
        let p = Principal {
            tenant: claims.tenant,
            key_id: claims.sub,
            scopes: claims.scopes,
            endpoints: claims.endpoints,
        };
        self.token_cache
            .put(since, token.to_string(), (p.clone(), claims.exp));
        Ok(p)
    }

    /// Exchanges an API key for a JWT: `(token, expires_at)`.
    pub fn issue_token(&self, api_key: &str) -> Result<(String, u64), ApiError> {
        let p = self.check_key(api_key)?;
        let claims = jwt::Claims {
            iss: String::new(),
            aud: String::new(),
            sub: p.key_id,
            tenant: p.tenant,
            scopes: p.scopes,
            endpoints: p.endpoints,
            iat: 0,
            exp: 0,
        };
        self.jwt
            .issue(claims)
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))
    }

    /// Whether an API key is valid (for `InternalAuthService/ValidateApiKey`).
    pub fn is_valid_key(&self, key: &str) -> bool {
        self.check_key(key).is_ok()
    }

    /// Creates a key; returns the record and the key (shown once).
    pub fn create_key(
        &self,
        tenant: &str,
        name: &str,
        scopes: Vec<String>,
        endpoints: Option<Vec<String>>,
    ) -> Result<(KeyRecord, String), ApiError> {
        names::validate("tenant", tenant)?;
        if scopes.is_empty() || scopes.iter().any(|s| !SCOPES.contains(&s.as_str())) {
            return Err(ApiError::invalid(format!(
                "scopes must be a non-empty subset of {SCOPES:?}"
            )));
        }
        for e in endpoints.iter().flatten() {
            names::validate("endpoint", e)?;
        }
        if endpoints.is_some() && scopes.iter().any(|s| s == "admin") {
            return Err(ApiError::invalid(
                "an admin key manages keys and every table of its tenant: it cannot have an endpoint allow-list",
            ));
        }
        if name.len() > 200 {
            return Err(ApiError::invalid("name is longer than 200 bytes"));
        }
        let key = apikeys::generate_key();
        let rec = KeyRecord {
            id: ulid::Ulid::new().to_string().to_lowercase(),
            tenant: tenant.into(),
            name: name.into(),
            scopes,
            endpoints,
            created_at: now_ms() / 1000,
            hash: String::new(),
        };
        let rec = self
            .keys()
            .insert(&key, rec)
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        Ok((rec, key))
    }

    /// Deletes a key; it stops working on this node at once, also for
    /// checks under way (see [`Cache`]).
    pub fn delete_key(&self, id: &str) -> Result<bool, ApiError> {
        let gone = self
            .keys()
            .delete(id)
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        self.key_cache.purge(|_| true);
        self.token_cache.purge(|(p, _)| p.key_id == id);
        Ok(gone.is_some())
    }
}

fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(headers: &[(&'static str, &[u8])]) -> Option<Credential> {
        let mut map = http::HeaderMap::new();
        for (k, v) in headers {
            map.append(*k, http::HeaderValue::from_bytes(v).unwrap());
        }
        Credential::from_http(&map)
    }

    fn malformed(headers: &[(&'static str, &[u8])]) -> String {
        match parse(headers) {
            Some(Credential::Malformed(m)) => m,
            other => panic!("{headers:?} gave {other:?}"),
        }
    }

    #[test]
    fn credential_headers() {
        assert!(parse(&[]).is_none());
        assert!(parse(&[("x-other", b"k")]).is_none());
        assert!(
            matches!(parse(&[("x-junjo-api-key", b" k1 "), ("x-api-key", b"k2")]),
            Some(Credential::ApiKey(k)) if k == "k1")
        );
        assert!(matches!(parse(&[("authorization", b"bEaReR  tok ")]),
            Some(Credential::Bearer(t)) if t == "tok"));
        // Present but unusable: refused with a reason, never "no credential".
        assert!(malformed(&[("authorization", b"Basic dXNlcjpwdw==")]).contains("\"Basic\" scheme"));
        assert!(malformed(&[("authorization", b"Bearer ")]).contains("no bearer token"));
        // A key without a scheme is not echoed back.
        let m = malformed(&[("authorization", b"lw_secret_key_0123456789")]);
        assert!(
            m.contains("uses no known scheme") && !m.contains("lw_secret"),
            "{m}"
        );
        assert!(malformed(&[("authorization", b"Bearer")]).contains("no bearer token"));
        assert!(malformed(&[("x-api-key", b"  ")]).contains("x-api-key header is empty"));
        assert!(malformed(&[("x-junjo-api-key", b"k\xff")]).contains("not visible ASCII"));
        assert!(malformed(&[("authorization", b"Bearer \xfe")]).contains("not visible ASCII"));
    }

    /// Administration reaches past an allow-list: a limited credential (a
    /// token of another issuer may claim both) has none of it.
    #[test]
    fn a_limited_credential_cannot_administer() {
        let p = Principal {
            tenant: "acme".into(),
            key_id: "k".into(),
            scopes: vec!["admin".into()],
            endpoints: Some(vec!["orders".into()]),
        };
        assert_eq!(p.require("admin").unwrap_err().kind, ErrorKind::Forbidden);
        assert!(p.require_endpoint("write", "orders").is_ok());
        assert!(p.require_endpoint("write", "spans").is_err());
        let unlimited = Principal {
            endpoints: None,
            ..p
        };
        assert!(unlimited.require("admin").is_ok());
    }

    /// A new LAKEWRITER_BOOTSTRAP_API_KEY replaces the old one: the old key
    /// (and its tokens) stop working, and the id names one key.
    #[tokio::test]
    async fn a_new_bootstrap_key_revokes_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let wal = crate::wal::Wal::open(dir.path(), 8).unwrap();
        let open = |key: &str| {
            let cfg = AuthConfig {
                bootstrap_api_key: Some(key.into()),
                ..Default::default()
            };
            Auth::open(wal.db().clone(), &cfg, dir.path()).unwrap()
        };
        let (old, new) = ("lw_bootstrap-old-0123456789", "lw_bootstrap-new-0123456789");
        let auth = open(old);
        let (token, _) = auth.issue_token(old).unwrap();
        assert!(auth
            .authenticate(Some(Credential::Bearer(token.clone())))
            .await
            .is_ok());
        drop(auth);
        // Started again with the same key: nothing changes.
        let auth = open(old);
        assert_eq!(auth.keys().list().unwrap().len(), 1);
        drop(auth);
        let auth = open(new);
        for cred in [Credential::ApiKey(old.into()), Credential::Bearer(token)] {
            let err = auth.authenticate(Some(cred)).await.unwrap_err();
            assert_eq!(err.kind, ErrorKind::Unauthenticated, "{}", err.message);
        }
        let p = auth
            .authenticate(Some(Credential::ApiKey(new.into())))
            .await
            .unwrap();
        assert!(p.key_id.starts_with(BOOTSTRAP_ID), "{}", p.key_id);
        let listed = auth.keys().list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].hash, apikeys::hash_hex(new));
    }

    /// A check that read the key store just before a deletion caches
    /// nothing once the deletion has purged: the key and its tokens stop at
    /// once, not when the cache entry would expire.
    #[tokio::test]
    async fn a_check_under_way_caches_nothing_a_deletion_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let wal = crate::wal::Wal::open(dir.path(), 8).unwrap();
        let cfg = AuthConfig {
            bootstrap_api_key: Some("lw_bootstrap-for-this-test".into()),
            ..Default::default()
        };
        let auth = Auth::open(wal.db().clone(), &cfg, dir.path()).unwrap();
        let (rec, key) = auth
            .create_key("acme", "ci", vec!["read".into()], None)
            .unwrap();
        let (token, _) = auth.issue_token(&key).unwrap();
        let bearer = || Some(Credential::Bearer(token.clone()));
        let p = auth.authenticate(bearer()).await.unwrap();
        assert_eq!(p.key_id, rec.id);
        assert!(auth.token_cache.get(&token).is_some());

        // Both checks read the store while the key was there; the deletion
        // then purges before they cache what they found.
        let (key_since, token_since) = (auth.key_cache.since(), auth.token_cache.since());
        assert!(auth.delete_key(&rec.id).unwrap());
        let hash = apikeys::hash_hex(&key);
        auth.key_cache
            .put(key_since, hash.clone(), (p.clone(), Instant::now()));
        auth.token_cache
            .put(token_since, token.clone(), (p.clone(), u64::MAX));
        assert!(auth.key_cache.get(&hash).is_none());
        assert!(auth.token_cache.get(&token).is_none());
        for cred in [Some(Credential::ApiKey(key.clone())), bearer()] {
            let err = auth.authenticate(cred).await.unwrap_err();
            assert_eq!(err.kind, ErrorKind::Unauthenticated, "{}", err.message);
        }
        // A check that starts after the purge caches again.
        let since = auth.token_cache.since();
        auth.token_cache.put(since, "t".into(), (p, 1));
        assert!(auth.token_cache.get("t").is_some());
    }
}
