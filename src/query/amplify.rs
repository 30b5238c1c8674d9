//! Functions whose output can be far larger than their input, checked before
//! they allocate.
//!
//! `SELECT repeat('ab', 1073741823)` is one short line that asks for 2 GiB,
//! and DataFusion evaluates constant calls while it plans, before any memory
//! is accounted to the query's pool: a handful of such requests would take
//! the whole server down. Each of `repeat`, `lpad`/`rpad`, `array_repeat` and
//! the list-building `range`/`generate_series` is replaced (per query
//! context, under the same names and aliases) by a wrapper that first works
//! out how many bytes the call would produce from its arguments, and refuses
//! the call ([`TooLarge`], `422`) when that alone is more than
//! `--query-memory`, which no query could ever hold anyway.

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, FieldRef, Int64Type};
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::{
    ColumnarValue, Documentation, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl,
    Signature,
};
use datafusion::prelude::SessionContext;

/// How a function's output size follows from its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    /// `repeat(text, n)`: `len(text) × n` bytes.
    Repeat,
    /// `lpad`/`rpad(text, n [, fill])`: `n` characters, up to 4 bytes each.
    Pad,
    /// `array_repeat(element, n)`: `n` copies of the element.
    ArrayRepeat,
    /// `range`/`generate_series([start,] stop [, step])` over integers: one
    /// 8-byte element per step.
    Series,
}

const WRAPPED: &[(&str, Growth)] = &[
    ("repeat", Growth::Repeat),
    ("lpad", Growth::Pad),
    ("rpad", Growth::Pad),
    ("array_repeat", Growth::ArrayRepeat),
    ("range", Growth::Series),
    ("generate_series", Growth::Series),
];

/// Replaces the amplifying functions of `ctx` by checked wrappers that
/// refuse a call producing more than `limit` bytes.
pub fn register(ctx: &SessionContext, limit: usize) {
    for (name, growth) in WRAPPED {
        let Ok(inner) = ctx.udf(name) else {
            continue; // not built in with this feature set
        };
        ctx.register_udf(ScalarUDF::new_from_impl(Checked {
            inner: inner.as_ref().clone(),
            growth: *growth,
            limit,
        }));
    }
}

/// A call refused for the size of its output: the same query fails again
/// whatever else runs.
#[derive(Debug, thiserror::Error)]
#[error("{function}(…) would produce {bytes} bytes, more than the {limit} bytes all queries may hold together (--query-memory)")]
pub struct TooLarge {
    function: String,
    bytes: i128,
    limit: usize,
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Checked {
    inner: ScalarUDF,
    growth: Growth,
    limit: usize,
}

/// One value per row of an argument: a scalar as a one-row array (never
/// expanded to the batch), an array as it is.
fn values(v: &ColumnarValue) -> Result<ArrayRef> {
    match v {
        ColumnarValue::Array(a) => Ok(a.clone()),
        ColumnarValue::Scalar(s) => s.to_array_of_size(1),
    }
}

/// An argument as int64 per row (nulls as 0); None if it is not an integer.
fn ints(v: &ColumnarValue) -> Result<Option<Vec<i128>>> {
    let a = values(v)?;
    if !a.data_type().is_integer() {
        return Ok(None);
    }
    let a = arrow::compute::cast(&a, &DataType::Int64)?;
    let a = a.as_primitive::<Int64Type>();
    Ok(Some(
        (0..a.len())
            .map(|i| if a.is_null(i) { 0 } else { a.value(i) as i128 })
            .collect(),
    ))
}

/// Byte length of each row of a text or binary argument; None for others.
fn byte_lengths(v: &ColumnarValue) -> Result<Option<Vec<i128>>> {
    let a = values(v)?;
    let lengths = match a.data_type() {
        DataType::Utf8
        | DataType::LargeUtf8
        | DataType::Utf8View
        | DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView => arrow::compute::kernels::length::length(&a)?,
        _ => return Ok(None),
    };
    ints(&ColumnarValue::Array(lengths))
}

/// Bytes per row of any argument: text/binary lengths, else its share of
/// the array's memory.
fn row_bytes(v: &ColumnarValue) -> Result<Vec<i128>> {
    if let Some(lengths) = byte_lengths(v)? {
        return Ok(lengths);
    }
    let a = values(v)?;
    let per_row = (a.get_array_memory_size() / a.len().max(1)).max(1) as i128;
    Ok(vec![per_row; a.len()])
}

/// Row `i` of an argument's values; one value stands for every row.
fn at(v: &[i128], i: usize) -> i128 {
    match v.len() {
        0 => 0,
        1 => v[0],
        _ => v.get(i).copied().unwrap_or(0),
    }
}

/// Σ over `rows` rows of `a[i] × b[i]`.
fn sum_of_products(a: &[i128], b: &[i128], rows: usize) -> i128 {
    (0..rows)
        .map(|i| at(a, i).max(0).saturating_mul(at(b, i).max(0)))
        .fold(0i128, |acc, x| acc.saturating_add(x))
}

impl Checked {
    /// The bytes this call would produce, if it can tell.
    fn output_bytes(&self, args: &ScalarFunctionArgs) -> Result<Option<i128>> {
        let a = &args.args;
        let all_scalar = a.iter().all(|v| matches!(v, ColumnarValue::Scalar(_)));
        let rows = if all_scalar { 1 } else { args.number_rows };
        Ok(match self.growth {
            Growth::Repeat if a.len() == 2 => match (byte_lengths(&a[0])?, ints(&a[1])?) {
                (Some(len), Some(n)) => Some(sum_of_products(&len, &n, rows)),
                _ => None,
            },
            Growth::Pad if a.len() >= 2 => ints(&a[1])?.map(|n| sum_of_products(&[4], &n, rows)),
            Growth::ArrayRepeat if a.len() == 2 => match ints(&a[1])? {
                Some(n) => Some(sum_of_products(&row_bytes(&a[0])?, &n, rows)),
                None => None,
            },
            Growth::Series if (1..=3).contains(&a.len()) => {
                let mut ends = Vec::with_capacity(3);
                for v in a {
                    match ints(v)? {
                        Some(x) => ends.push(x),
                        None => return Ok(None), // dates and timestamps: not checked
                    }
                }
                let (start, stop, step) = match ends.as_slice() {
                    [stop] => (vec![0], stop.clone(), vec![1]),
                    [start, stop] => (start.clone(), stop.clone(), vec![1]),
                    [start, stop, step] => (start.clone(), stop.clone(), step.clone()),
                    _ => return Ok(None),
                };
                let total = (0..rows)
                    .map(|i| {
                        let step = at(&step, i).abs().max(1);
                        (at(&stop, i) - at(&start, i)).abs() / step + 1
                    })
                    .fold(0i128, |acc, x| acc.saturating_add(x.saturating_mul(8)));
                Some(total)
            }
            _ => None,
        })
    }
}

impl ScalarUDFImpl for Checked {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        if let Some(bytes) = self.output_bytes(&args)? {
            if bytes > self.limit as i128 {
                return Err(DataFusionError::External(Box::new(TooLarge {
                    function: self.inner.name().to_string(),
                    bytes,
                    limit: self.limit,
                })));
            }
        }
        self.inner.invoke_with_args(args)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(ctx: &SessionContext, sql: &str) -> Result<usize> {
        let batches = ctx.sql(sql).await?.collect().await?;
        Ok(batches.iter().map(|b| b.num_rows()).sum())
    }

    #[tokio::test]
    async fn amplifying_calls_over_the_limit_fail_before_they_allocate() {
        let ctx = SessionContext::new();
        register(&ctx, 1 << 20);
        for sql in [
            "SELECT repeat('ab', 1073741823)",
            "SELECT lpad('x', 2000000000)",
            "SELECT rpad('x', 300000, 'y')",
            "SELECT array_repeat('abcd', 1000000)",
            "SELECT range(0, 1500000000)",
            "SELECT generate_series(1, 200000)",
            // Per batch, not per value: 4,000 rows of 1 KiB each.
            "SELECT repeat('x', 1024 + value % 2) FROM range(4000)",
        ] {
            let err = run(&ctx, sql).await.unwrap_err();
            assert!(
                matches!(err.find_root(), DataFusionError::External(e) if e.is::<TooLarge>()),
                "{sql}: {err}"
            );
            assert!(err.to_string().contains("--query-memory"), "{sql}: {err}");
        }
        for sql in [
            "SELECT repeat('ab', 1000)",
            "SELECT lpad('x', 10)",
            "SELECT array_repeat(1, 100)",
            "SELECT range(0, 1000, 7)",
            "SELECT repeat(CAST(value AS VARCHAR), 3) FROM range(1000)",
        ] {
            run(&ctx, sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }
}
