//! RS256 JWTs: issue for API keys, verify locally or against a remote JWKS.
//!
//! Signing keys (RSA 2048) live in the `keys` column family under
//! `s/<kid>` → version byte `1` + JSON [`StoredKey`] (PKCS#1 PEM). The newest
//! key signs; a rotated-out key keeps verifying (and stays in the JWKS) until
//! every token it signed has expired.
//!
//! Verification accepts only RS256 with a known `kid`, checks `exp`, `nbf`,
//! `iss`, `aud` (5 s leeway) and requires `exp`, `iss`, `aud`, `sub`. With a
//! remote JWKS, an unknown `kid` triggers a refetch at most once per
//! `refetch_interval`, so random kids cannot hammer the provider.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parking_lot::RwLock;
use rocksdb::DB;
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
use rsa::traits::PublicKeyParts;
use serde::{Deserialize, Serialize};

use crate::flush::now_ms;
use crate::wal::CF_KEYS;

pub const ISSUER: &str = "lakewriter";
pub const AUDIENCE: &str = "lakewriter";
const VERSION: u8 = 1;
const LEEWAY_SECS: u64 = 5;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    /// API key id the token was issued for.
    pub sub: String,
    pub tenant: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<String>>,
    pub iat: u64,
    pub exp: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("key store: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("signing key: {0}")]
    Key(String),
    #[error("invalid token: {0}")]
    Invalid(String),
}

#[derive(Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    pem: String,
    created_at_ms: u64,
    #[serde(default)]
    retired_at_ms: Option<u64>,
}

struct SigningKey {
    kid: String,
    enc: EncodingKey,
    dec: DecodingKey,
    n: String,
    e: String,
    retired_at_ms: Option<u64>,
}

impl SigningKey {
    fn from_stored(s: &StoredKey) -> Result<Self, Error> {
        let private =
            rsa::RsaPrivateKey::from_pkcs1_pem(&s.pem).map_err(|e| Error::Key(e.to_string()))?;
        let n = URL_SAFE_NO_PAD.encode(private.n().to_bytes_be());
        let e = URL_SAFE_NO_PAD.encode(private.e().to_bytes_be());
        let enc =
            EncodingKey::from_rsa_pem(s.pem.as_bytes()).map_err(|e| Error::Key(e.to_string()))?;
        let dec =
            DecodingKey::from_rsa_components(&n, &e).map_err(|e| Error::Key(e.to_string()))?;
        Ok(Self {
            kid: s.kid.clone(),
            enc,
            dec,
            n,
            e,
            retired_at_ms: s.retired_at_ms,
        })
    }
}

/// Keys fetched from `--jwks-url`.
struct Remote {
    url: String,
    client: reqwest::Client,
    keys: RwLock<HashMap<String, DecodingKey>>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    refetch_interval: Duration,
}

pub struct Jwt {
    db: Arc<DB>,
    keys: RwLock<Vec<Arc<SigningKey>>>,
    ttl: Duration,
    remote: Option<Remote>,
}

impl Jwt {
    /// Loads the signing keys, creating the first one on a fresh store.
    pub fn open(
        db: Arc<DB>,
        ttl: Duration,
        jwks_url: Option<String>,
        refetch_interval: Duration,
    ) -> Result<Self, Error> {
        let remote = jwks_url.map(|url| Remote {
            url,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
            keys: RwLock::default(),
            last_fetch: tokio::sync::Mutex::new(None),
            refetch_interval,
        });
        let jwt = Self {
            db,
            keys: RwLock::default(),
            ttl,
            remote,
        };
        jwt.reload()?;
        if jwt.keys.read().is_empty() {
            jwt.rotate()?;
        }
        Ok(jwt)
    }

    fn reload(&self) -> Result<(), Error> {
        let cf = self
            .db
            .cf_handle(CF_KEYS)
            .expect("keys column family exists");
        let mut keys = Vec::new();
        for item in self.db.prefix_iterator_cf(&cf, b"s/") {
            let (k, v) = item?;
            if !k.starts_with(b"s/") {
                break;
            }
            if v.first() != Some(&VERSION) {
                return Err(Error::Key("unknown signing key version".into()));
            }
            let stored: StoredKey =
                serde_json::from_slice(&v[1..]).map_err(|e| Error::Key(e.to_string()))?;
            keys.push((
                stored.created_at_ms,
                Arc::new(SigningKey::from_stored(&stored)?),
            ));
        }
        keys.sort_by_key(|(t, _)| *t);
        *self.keys.write() = keys.into_iter().map(|(_, k)| k).collect();
        Ok(())
    }

    /// Adds a new signing key and retires the current one; returns the new kid.
    pub fn rotate(&self) -> Result<String, Error> {
        let mut rng = rand08::rngs::OsRng;
        let private =
            rsa::RsaPrivateKey::new(&mut rng, 2048).map_err(|e| Error::Key(e.to_string()))?;
        let pem = private
            .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
            .map_err(|e| Error::Key(e.to_string()))?;
        let now = now_ms();
        let kid = ulid::Ulid::new().to_string().to_lowercase();
        let cf = self
            .db
            .cf_handle(CF_KEYS)
            .expect("keys column family exists");
        let mut batch = rocksdb::WriteBatch::default();
        for old in self
            .keys
            .read()
            .iter()
            .filter(|k| k.retired_at_ms.is_none())
        {
            if let Some(v) = self.db.get_cf(&cf, format!("s/{}", old.kid))? {
                let mut stored: StoredKey =
                    serde_json::from_slice(&v[1..]).map_err(|e| Error::Key(e.to_string()))?;
                stored.retired_at_ms = Some(now);
                batch.put_cf(&cf, format!("s/{}", old.kid), encode_stored(&stored));
            }
        }
        let stored = StoredKey {
            kid: kid.clone(),
            pem: pem.to_string(),
            created_at_ms: now,
            retired_at_ms: None,
        };
        batch.put_cf(&cf, format!("s/{kid}"), encode_stored(&stored));
        let mut sync = rocksdb::WriteOptions::default();
        sync.set_sync(true);
        self.db.write_opt(batch, &sync)?;
        self.reload()?;
        Ok(kid)
    }

    fn live_keys(&self) -> Vec<Arc<SigningKey>> {
        let horizon = now_ms().saturating_sub(self.ttl.as_millis() as u64 + LEEWAY_SECS * 1000);
        self.keys
            .read()
            .iter()
            .filter(|k| k.retired_at_ms.is_none_or(|r| r > horizon))
            .cloned()
            .collect()
    }

    /// Signs a token for `claims` (iss/aud/iat/exp are set here).
    pub fn issue(&self, mut claims: Claims) -> Result<(String, u64), Error> {
        let key = self
            .keys
            .read()
            .last()
            .cloned()
            .ok_or_else(|| Error::Key("no signing key".into()))?;
        let now = now_ms() / 1000;
        claims.iss = ISSUER.into();
        claims.aud = AUDIENCE.into();
        claims.iat = now;
        claims.exp = now + self.ttl.as_secs().max(1);
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(key.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &key.enc)
            .map_err(|e| Error::Key(e.to_string()))?;
        Ok((token, claims.exp))
    }

    /// The public keys as a JWKS document.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<_> = self
            .live_keys()
            .iter()
            .map(|k| serde_json::json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": k.kid, "n": k.n, "e": k.e}))
            .collect();
        serde_json::json!({ "keys": keys })
    }

    /// The key for `kid` and whether it is one of ours.
    async fn decoding_key(&self, kid: &str) -> Option<(DecodingKey, bool)> {
        if let Some(k) = self.live_keys().iter().find(|k| k.kid == kid) {
            return Some((k.dec.clone(), true));
        }
        self.remote_key(kid).await.map(|k| (k, false))
    }

    async fn remote_key(&self, kid: &str) -> Option<DecodingKey> {
        let remote = self.remote.as_ref()?;
        if let Some(k) = remote.keys.read().get(kid) {
            return Some(k.clone());
        }
        let mut last = remote.last_fetch.lock().await;
        if last.is_some_and(|t| t.elapsed() < remote.refetch_interval) {
            return remote.keys.read().get(kid).cloned();
        }
        *last = Some(Instant::now());
        match fetch_jwks(&remote.client, &remote.url).await {
            Ok(keys) => *remote.keys.write() = keys,
            Err(e) => tracing::warn!(url = %remote.url, error = %e, "JWKS fetch failed"),
        }
        remote.keys.read().get(kid).cloned()
    }

    /// Verifies a token; returns its claims and whether one of our own keys
    /// signed it. The error says why it was refused.
    pub async fn verify(&self, token: &str) -> Result<(Claims, bool), Error> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Error::Invalid("malformed token".into()))?;
        if header.alg != Algorithm::RS256 {
            return Err(Error::Invalid(format!(
                "algorithm {:?} is not accepted (RS256 only)",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| Error::Invalid("token has no kid".into()))?;
        let (key, local) = self
            .decoding_key(&kid)
            .await
            .ok_or_else(|| Error::Invalid("unknown signing key (kid)".into()))?;
        let mut v = Validation::new(Algorithm::RS256);
        v.set_issuer(&[ISSUER]);
        v.set_audience(&[AUDIENCE]);
        v.validate_nbf = true;
        v.leeway = LEEWAY_SECS;
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key, &v)
            .map_err(|e| Error::Invalid(describe(&e)))?;
        Ok((data.claims, local))
    }
}

fn encode_stored(s: &StoredKey) -> Vec<u8> {
    let mut v = vec![VERSION];
    v.extend(serde_json::to_vec(s).expect("StoredKey serializes"));
    v
}

fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "token expired".into(),
        K::ImmatureSignature => "token not yet valid (nbf)".into(),
        K::InvalidIssuer => "wrong issuer".into(),
        K::InvalidAudience => "wrong audience".into(),
        K::InvalidSignature => "bad signature".into(),
        K::MissingRequiredClaim(c) => format!("missing claim {c}"),
        _ => "malformed token".into(),
    }
}

async fn fetch_jwks(
    client: &reqwest::Client,
    url: &str,
) -> Result<HashMap<String, DecodingKey>, String> {
    let doc: serde_json::Value = client
        .get(url)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let mut out = HashMap::new();
    for k in doc["keys"].as_array().into_iter().flatten() {
        let (Some(kid), Some(n), Some(e)) = (k["kid"].as_str(), k["n"].as_str(), k["e"].as_str())
        else {
            continue;
        };
        if k["kty"].as_str() != Some("RSA") {
            continue;
        }
        if let Ok(key) = DecodingKey::from_rsa_components(n, e) {
            out.insert(kid.to_string(), key);
        }
    }
    Ok(out)
}
