//! Table schemas: fixed for the telemetry tables, evolving for DataRecord endpoints.
//!
//! A DataRecord table starts with `event_id` (utf8), `timestamp` (timestamp ns
//! UTC) and `version` (int64), then one nullable column per field in order of
//! first appearance. A batch may add columns; a field whose type differs from
//! the stored one is a conflict and the batch is rejected before anything is
//! written.
//!
//! Persistence: `schemas` CF, key `"{tenant}/{endpoint}"`, value: version byte
//! `1` + JSON `[{"name","type"}]` of the field columns. The write is not synced
//! on its own: it precedes the batch's WAL entry in RocksDB's single log, so the
//! entry's fsync makes both durable. A schema change whose batch is then
//! refused at commit (memtables over budget, shutdown) stays: a nullable
//! column with no values yet, whose type later batches must still match.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parking_lot::{Mutex, RwLock};
use rocksdb::{IteratorMode, DB};
use serde::{Deserialize, Serialize};

use crate::error::{Classify, ErrorKind};
use crate::memtable::TableId;
use crate::wal::CF_SCHEMAS;

const SCHEMA_VERSION: u8 = 1;
/// Most field columns a DataRecord table may have.
pub const MAX_COLUMNS: usize = 1_000;
/// The record's own columns; fields may not use these names.
pub const RESERVED: [&str; 3] = ["event_id", "timestamp", "version"];

/// The type of a DataRecord field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColType {
    String,
    Int64,
    Double,
    Bool,
    Bytes,
    Timestamp,
}

impl ColType {
    pub fn arrow(self) -> DataType {
        match self {
            Self::String => DataType::Utf8,
            Self::Int64 => DataType::Int64,
            Self::Double => DataType::Float64,
            Self::Bool => DataType::Boolean,
            Self::Bytes => DataType::Binary,
            Self::Timestamp => timestamp_type(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Int64 => "int64",
            Self::Double => "double",
            Self::Bool => "bool",
            Self::Bytes => "bytes",
            Self::Timestamp => "timestamp",
        }
    }

    pub fn of_arrow(dt: &DataType) -> Option<Self> {
        Some(match dt {
            DataType::Utf8 => Self::String,
            DataType::Int64 => Self::Int64,
            DataType::Float64 => Self::Double,
            DataType::Boolean => Self::Bool,
            DataType::Binary => Self::Bytes,
            DataType::Timestamp(TimeUnit::Nanosecond, _) => Self::Timestamp,
            _ => return None,
        })
    }
}

pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredColumn {
    name: String,
    #[serde(rename = "type")]
    ty: ColType,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("field `{field}`: existing type {existing}, incoming type {incoming}")]
    Conflict {
        field: String,
        existing: &'static str,
        incoming: &'static str,
    },
    #[error("endpoint {0:?} would have more than {MAX_COLUMNS} field columns")]
    TooManyColumns(String),
    #[error("schema storage: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("stored schema {key:?} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
}

impl Classify for Error {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Conflict { .. } | Self::TooManyColumns(_) => ErrorKind::InvalidInput,
            Self::Rocks(_) | Self::Corrupt { .. } => ErrorKind::Internal,
        }
    }
}

/// Schemas of every table.
pub struct Registry {
    db: Arc<DB>,
    records: RwLock<HashMap<TableId, SchemaRef>>,
    /// Serializes check-and-extend so two batches cannot add one column twice
    /// with different types.
    evolve: Mutex<()>,
}

impl Registry {
    pub fn open(db: Arc<DB>) -> Result<Self, Error> {
        let cf = db
            .cf_handle(CF_SCHEMAS)
            .expect("schemas column family exists");
        let mut records = HashMap::new();
        for item in db.iterator_cf(&cf, IteratorMode::Start) {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let corrupt = |reason: String| Error::Corrupt {
                key: key.clone(),
                reason,
            };
            let (tenant, endpoint) = key
                .split_once('/')
                .ok_or_else(|| corrupt("key is not tenant/endpoint".into()))?;
            let cols: Vec<StoredColumn> = match v.split_first() {
                Some((&SCHEMA_VERSION, json)) => {
                    serde_json::from_slice(json).map_err(|e| corrupt(e.to_string()))?
                }
                _ => return Err(corrupt("unknown schema version".into())),
            };
            records.insert(TableId::new(tenant, endpoint), record_schema(&cols));
        }
        Ok(Self {
            db,
            records: RwLock::new(records),
            evolve: Mutex::new(()),
        })
    }

    /// The table's schema; `None` for a DataRecord endpoint never written.
    pub fn get(&self, table: &TableId) -> Option<SchemaRef> {
        builtin(&table.endpoint).or_else(|| self.records.read().get(table).cloned())
    }

    /// Every DataRecord table of a tenant.
    pub fn record_tables_of(&self, tenant: &str) -> Vec<TableId> {
        self.records
            .read()
            .keys()
            .filter(|t| &*t.tenant == tenant)
            .cloned()
            .collect()
    }

    /// Checks `incoming` fields against the table's schema and adds the new
    /// ones. Returns the (possibly extended) schema. Nothing changes on error.
    pub fn evolve(
        &self,
        table: &TableId,
        incoming: &[(&str, ColType)],
    ) -> Result<SchemaRef, Error> {
        // Callers pass distinct names: more than the limit can never fit, and
        // `check` is quadratic in the names (a request may carry a million).
        if incoming.len() > MAX_COLUMNS {
            return Err(Error::TooManyColumns(table.endpoint.to_string()));
        }
        if let Some(current) = self.records.read().get(table) {
            if check(current, incoming)?.is_empty() {
                return Ok(current.clone());
            }
        }
        let _guard = self.evolve.lock();
        let current = self.records.read().get(table).cloned();
        let mut cols: Vec<StoredColumn> = current
            .as_ref()
            .map(|s| stored_columns(s))
            .unwrap_or_default();
        let added = match &current {
            Some(s) => check(s, incoming)?,
            None => check(&Schema::empty(), incoming)?,
        };
        if added.is_empty() {
            if let Some(s) = current {
                return Ok(s);
            }
        }
        cols.extend(added.iter().map(|(n, ty)| StoredColumn {
            name: n.to_string(),
            ty: *ty,
        }));
        if cols.len() > MAX_COLUMNS {
            return Err(Error::TooManyColumns(table.endpoint.to_string()));
        }
        let mut value = vec![SCHEMA_VERSION];
        value.extend(serde_json::to_vec(&cols).expect("columns serialize"));
        let cf = self
            .db
            .cf_handle(CF_SCHEMAS)
            .expect("schemas column family exists");
        self.db
            .put_cf(&cf, format!("{}/{}", table.tenant, table.endpoint), value)?;
        let schema = record_schema(&cols);
        self.records.write().insert(table.clone(), schema.clone());
        Ok(schema)
    }
}

/// New fields of `incoming` (deduplicated), or the first conflict.
fn check<'a>(
    current: &Schema,
    incoming: &[(&'a str, ColType)],
) -> Result<Vec<(&'a str, ColType)>, Error> {
    let mut added: Vec<(&str, ColType)> = Vec::new();
    for (name, ty) in incoming {
        let existing = match current.field_with_name(name) {
            Ok(f) => ColType::of_arrow(f.data_type()),
            Err(_) => added.iter().find(|(n, _)| n == name).map(|(_, t)| *t),
        };
        match existing {
            Some(e) if e != *ty => {
                return Err(Error::Conflict {
                    field: name.to_string(),
                    existing: e.name(),
                    incoming: ty.name(),
                })
            }
            Some(_) => {}
            None => added.push((name, *ty)),
        }
    }
    Ok(added)
}

fn stored_columns(schema: &Schema) -> Vec<StoredColumn> {
    schema.fields()[RESERVED.len()..]
        .iter()
        .map(|f| StoredColumn {
            name: f.name().clone(),
            ty: ColType::of_arrow(f.data_type()).expect("record columns have record types"),
        })
        .collect()
}

fn record_schema(cols: &[StoredColumn]) -> SchemaRef {
    let mut fields = vec![
        Field::new("event_id", DataType::Utf8, false),
        Field::new("timestamp", timestamp_type(), false),
        Field::new("version", DataType::Int64, false),
    ];
    fields.extend(cols.iter().map(|c| Field::new(&c.name, c.ty.arrow(), true)));
    Arc::new(Schema::new(fields))
}

/// Schemas of the tables lakewriter derives from telemetry.
pub fn builtin(endpoint: &str) -> Option<SchemaRef> {
    use crate::ingest::otlp_logs::{LOGS, LOGS_SCHEMA};
    use crate::ingest::otlp_metrics;
    use crate::ingest::otlp_trace::{SPANS, SPANS_SCHEMA, STATE_PATCHES, STATE_PATCHES_SCHEMA};
    match endpoint {
        SPANS => Some(SPANS_SCHEMA.clone()),
        STATE_PATCHES => Some(STATE_PATCHES_SCHEMA.clone()),
        LOGS => Some(LOGS_SCHEMA.clone()),
        _ => otlp_metrics::schema(endpoint),
    }
}

/// Every built-in table name.
pub const BUILTIN_TABLES: [&str; 8] = [
    "spans",
    "state_patches",
    "logs",
    "metrics_gauge",
    "metrics_sum",
    "metrics_histogram",
    "metrics_exponential_histogram",
    "metrics_summary",
];

/// Endpoint names DataRecord batches may not use (telemetry tables, now and later).
pub fn is_reserved_endpoint(endpoint: &str) -> bool {
    builtin(endpoint).is_some() || endpoint == "logs" || endpoint.starts_with("metrics")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let wal = crate::wal::Wal::open(dir.path(), 8).unwrap();
        let reg = Registry::open(wal.db().clone()).unwrap();
        (dir, reg)
    }

    #[test]
    fn every_builtin_table_has_a_schema_and_is_reserved() {
        for t in BUILTIN_TABLES {
            assert!(builtin(t).is_some(), "{t}");
            assert!(is_reserved_endpoint(t), "{t}");
        }
        assert!(builtin("metrics_other").is_none());
    }

    #[test]
    fn evolves_by_adding_and_rejects_conflicts() {
        let (_dir, reg) = open();
        let t = TableId::new("t", "orders");
        let s = reg
            .evolve(&t, &[("price", ColType::Double), ("sku", ColType::String)])
            .unwrap();
        assert_eq!(s.fields().len(), 5);
        let s = reg
            .evolve(&t, &[("sku", ColType::String), ("qty", ColType::Int64)])
            .unwrap();
        assert_eq!(s.field(5).name(), "qty");
        let err = reg
            .evolve(&t, &[("qty", ColType::Int64), ("price", ColType::String)])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "field `price`: existing type double, incoming type string"
        );
        // Conflicts inside one batch are caught too, and nothing was added.
        let err = reg
            .evolve(&t, &[("new", ColType::Bool), ("new", ColType::Int64)])
            .unwrap_err();
        assert!(err.to_string().contains("`new`"));
        assert_eq!(reg.get(&t).unwrap().fields().len(), 6);
        // Reopening sees the same schema.
        let again = Registry::open(reg.db.clone()).unwrap();
        assert_eq!(again.get(&t), reg.get(&t));
        assert!(reg.get(&TableId::new("t", "spans")).is_some());
        assert!(is_reserved_endpoint("metrics_sum") && !is_reserved_endpoint("orders"));
    }

    #[test]
    fn more_names_than_columns_are_refused_up_front() {
        let (_dir, reg) = open();
        let t = TableId::new("t", "wide");
        let names: Vec<String> = (0..=MAX_COLUMNS).map(|i| format!("f{i}")).collect();
        let incoming: Vec<(&str, ColType)> =
            names.iter().map(|n| (n.as_str(), ColType::Int64)).collect();
        let err = reg.evolve(&t, &incoming).unwrap_err();
        assert!(
            matches!(err, Error::TooManyColumns(ref e) if e == "wide"),
            "{err}"
        );
        assert!(reg.get(&t).is_none());
        reg.evolve(&t, &incoming[..MAX_COLUMNS]).unwrap();
    }
}
