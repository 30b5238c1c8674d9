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
//! `--query-memory`, which no query could ever hold anyway. Calls on
//! constants (the ones folded while planning) also add up across the
//! query: twenty `repeat`s of half the limit are refused too.
//!
//! Also checked: `array_resize` (the new length times the element),
//! `replace` and `regexp_replace` (every match, or every position for an
//! empty pattern, can grow by the replacement), ranges of dates and
//! timestamps, and `levenshtein`, whose time is the product of its
//! arguments' lengths ([`MAX_STEPS`]): a planning-time call cannot be
//! cancelled by the query timeout.

use arrow::array::{Array, ArrayRef, AsArray};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow::datatypes::{DataType, FieldRef, Int64Type, IntervalMonthDayNanoType, TimeUnit};
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
    /// `range`/`generate_series([start,] stop [, step])` over integers,
    /// dates or timestamps: one 8-byte element per step.
    Series,
    /// `array_resize(list, n [, fill])`: `n` elements per row.
    Resize,
    /// `replace(text, from, to)`: each match of `from` becomes `to`.
    Replace,
    /// `regexp_replace(text, pattern, replacement [, flags])`: at most one
    /// match per position, each `$group` copying at most the text.
    RegexpReplace,
    /// `levenshtein(a, b)`: `len(a) × len(b)` steps.
    Quadratic,
}

/// Most steps one `levenshtein` call (one batch of rows) may take, about a
/// second of one core.
pub const MAX_STEPS: i128 = 1 << 30;

const DAY_NS: i128 = 86_400_000_000_000;

/// Bookkeeping bytes of one list element beyond its value (offsets, the
/// indices the kernels build).
const ELEMENT_OVERHEAD: i128 = 16;

const WRAPPED: &[(&str, Growth)] = &[
    ("repeat", Growth::Repeat),
    ("lpad", Growth::Pad),
    ("rpad", Growth::Pad),
    ("array_repeat", Growth::ArrayRepeat),
    ("range", Growth::Series),
    ("generate_series", Growth::Series),
    ("array_resize", Growth::Resize),
    ("replace", Growth::Replace),
    ("regexp_replace", Growth::RegexpReplace),
    ("levenshtein", Growth::Quadratic),
];

/// Replaces the amplifying functions of `ctx` by checked wrappers that
/// refuse a call producing more than `limit` bytes.
pub fn register(ctx: &SessionContext, limit: usize) {
    let constants = Arc::new(AtomicU64::new(0));
    for (name, growth) in WRAPPED {
        let Ok(inner) = ctx.udf(name) else {
            continue; // not built in with this feature set
        };
        ctx.register_udf(ScalarUDF::new_from_impl(Checked {
            inner: inner.as_ref().clone(),
            growth: *growth,
            limit,
            constants: Constants(constants.clone()),
        }));
    }
}

/// A call refused for the size of its output: the same query fails again
/// whatever else runs.
#[derive(Debug, thiserror::Error)]
pub enum TooLarge {
    #[error("{function}(…) would produce {bytes} bytes, more than the {limit} bytes all queries may hold together (--query-memory)")]
    Bytes {
        function: String,
        bytes: i128,
        limit: usize,
    },
    #[error("the query's calls on constants would produce {bytes} bytes in all, more than the {limit} bytes all queries may hold together (--query-memory)")]
    Constants { bytes: u64, limit: usize },
    #[error("{function}(…) would take {steps} steps, more than {MAX_STEPS} per call")]
    Steps { function: String, steps: i128 },
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Checked {
    inner: ScalarUDF,
    growth: Growth,
    limit: usize,
    constants: Constants,
}

/// Bytes the query's calls on constants have produced so far, shared by
/// the wrappers of one query context.
#[derive(Debug)]
struct Constants(Arc<AtomicU64>);

impl PartialEq for Constants {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Constants {}

impl std::hash::Hash for Constants {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.0).hash(state)
    }
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

/// Whether every argument is a scalar: a call on constants (folded while
/// planning), made once for the whole query.
fn constant(args: &ScalarFunctionArgs) -> bool {
    args.args
        .iter()
        .all(|v| matches!(v, ColumnarValue::Scalar(_)))
}

/// The rows a call computes: one for a call on constants.
fn rows(args: &ScalarFunctionArgs) -> usize {
    match constant(args) {
        true => 1,
        false => args.number_rows,
    }
}

/// Bytes per list element: its value's and [`ELEMENT_OVERHEAD`].
fn per_element(value_bytes: Vec<i128>) -> Vec<i128> {
    value_bytes.iter().map(|b| b + ELEMENT_OVERHEAD).collect()
}

impl Checked {
    /// The bytes this call would produce, if it can tell.
    fn output_bytes(&self, args: &ScalarFunctionArgs) -> Result<Option<i128>> {
        let a = &args.args;
        let rows = rows(args);
        Ok(match self.growth {
            Growth::Repeat if a.len() == 2 => match (byte_lengths(&a[0])?, ints(&a[1])?) {
                (Some(len), Some(n)) => Some(sum_of_products(&len, &n, rows)),
                _ => None,
            },
            Growth::Pad if a.len() >= 2 => ints(&a[1])?.map(|n| sum_of_products(&[4], &n, rows)),
            Growth::ArrayRepeat if a.len() == 2 => match ints(&a[1])? {
                Some(n) => Some(sum_of_products(&per_element(row_bytes(&a[0])?), &n, rows)),
                None => None,
            },
            Growth::Series if (1..=3).contains(&a.len()) => {
                let mut ends = Vec::with_capacity(3);
                // Dates and timestamps step a day unless told otherwise.
                let mut unit = 1;
                for v in a {
                    match ints(v)? {
                        Some(x) => ends.push(x),
                        None => match (times_ns(v)?, steps_ns(v)?) {
                            (Some(x), _) => {
                                unit = DAY_NS;
                                ends.push(x)
                            }
                            (None, Some(x)) => ends.push(x),
                            (None, None) => return Ok(None),
                        },
                    }
                }
                let (start, stop, step) = match ends.as_slice() {
                    [stop] => (vec![0], stop.clone(), vec![unit]),
                    [start, stop] => (start.clone(), stop.clone(), vec![unit]),
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
            Growth::Resize if a.len() >= 2 => {
                let element = per_element(match a.get(2) {
                    Some(fill) => row_bytes(fill)?,
                    None => vec![8],
                });
                ints(&a[1])?.map(|n| sum_of_products(&element, &n, rows))
            }
            Growth::Replace if a.len() == 3 => {
                match (
                    byte_lengths(&a[0])?,
                    byte_lengths(&a[1])?,
                    byte_lengths(&a[2])?,
                ) {
                    (Some(text), Some(from), Some(to)) => Some(
                        (0..rows)
                            .map(|i| {
                                let (t, f, r) = (at(&text, i), at(&from, i), at(&to, i));
                                // An empty `from` matches between characters.
                                t + (t / f.max(1) + 1).saturating_mul(r)
                            })
                            .fold(0i128, i128::saturating_add),
                    ),
                    _ => None,
                }
            }
            Growth::RegexpReplace if a.len() >= 3 => {
                let dollars = |v: &ColumnarValue| -> Result<Option<Vec<i128>>> {
                    let a = values(v)?;
                    let Some(s) = a.as_string_opt::<i32>() else {
                        return Ok(None);
                    };
                    Ok(Some(
                        (0..s.len())
                            .map(|i| s.value(i).matches('$').count() as i128)
                            .collect(),
                    ))
                };
                match (byte_lengths(&a[0])?, byte_lengths(&a[2])?, dollars(&a[2])?) {
                    (Some(text), Some(repl), refs) => {
                        let refs = refs.unwrap_or_else(|| repl.clone());
                        Some(
                            (0..rows)
                                .map(|i| {
                                    let (t, r, d) = (at(&text, i), at(&repl, i), at(&refs, i));
                                    // Matches do not overlap, so all the
                                    // copies one `$group` makes add up to at
                                    // most the text.
                                    t + (t + 1).saturating_mul(r) + d.saturating_mul(t)
                                })
                                .fold(0i128, i128::saturating_add),
                        )
                    }
                    _ => None,
                }
            }
            _ => None,
        })
    }

    /// The steps this call would take, for [`Growth::Quadratic`].
    fn steps(&self, args: &ScalarFunctionArgs) -> Result<Option<i128>> {
        let a = &args.args;
        if self.growth != Growth::Quadratic || a.len() != 2 {
            return Ok(None);
        }
        Ok(match (byte_lengths(&a[0])?, byte_lengths(&a[1])?) {
            (Some(x), Some(y)) => Some(sum_of_products(&x, &y, rows(args))),
            _ => None,
        })
    }
}

/// A date or timestamp argument as ns since the epoch per row; None for
/// other types.
fn times_ns(v: &ColumnarValue) -> Result<Option<Vec<i128>>> {
    let a = values(v)?;
    if !matches!(
        a.data_type(),
        DataType::Date32 | DataType::Date64 | DataType::Timestamp(_, _)
    ) {
        return Ok(None);
    }
    let ns = arrow::compute::cast(&a, &DataType::Timestamp(TimeUnit::Nanosecond, None))?;
    ints(&ColumnarValue::Array(arrow::compute::cast(
        &ns,
        &DataType::Int64,
    )?))
}

/// An interval argument as its shortest length in ns per row (a month as
/// 28 days); None for other types. A step whose parts have mixed signs
/// counts as 1 ns: it could be nearly nothing.
fn steps_ns(v: &ColumnarValue) -> Result<Option<Vec<i128>>> {
    let a = values(v)?;
    if !matches!(a.data_type(), DataType::Interval(_)) {
        return Ok(None);
    }
    let a = arrow::compute::cast(
        &a,
        &DataType::Interval(arrow::datatypes::IntervalUnit::MonthDayNano),
    )?;
    let a = a.as_primitive::<IntervalMonthDayNanoType>();
    Ok(Some(
        a.values()
            .iter()
            .map(|i| {
                let parts = [
                    i.months as i128 * 28 * DAY_NS,
                    i.days as i128 * DAY_NS,
                    i.nanoseconds as i128,
                ];
                let mixed = parts.iter().any(|p| *p > 0) && parts.iter().any(|p| *p < 0);
                if mixed {
                    1
                } else {
                    parts.iter().sum::<i128>().abs().max(1)
                }
            })
            .collect(),
    ))
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
        let refuse = |e: TooLarge| Err(DataFusionError::External(Box::new(e)));
        if let Some(steps) = self.steps(&args)? {
            if steps > MAX_STEPS {
                let function = self.inner.name().to_string();
                return refuse(TooLarge::Steps { function, steps });
            }
        }
        if let Some(bytes) = self.output_bytes(&args)? {
            let limit = self.limit;
            if bytes > limit as i128 {
                let function = self.inner.name().to_string();
                return refuse(TooLarge::Bytes {
                    function,
                    bytes,
                    limit,
                });
            }
            if constant(&args) {
                let bytes = bytes.max(0) as u64;
                let total = self.constants.0.fetch_add(bytes, Ordering::Relaxed) + bytes;
                if total > limit as u64 {
                    return refuse(TooLarge::Constants {
                        bytes: total,
                        limit,
                    });
                }
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

    /// Runs `sql` in a context of its own, as every query has (the budget
    /// of constants is per query).
    async fn run(sql: &str) -> Result<usize> {
        let ctx = SessionContext::new();
        register(&ctx, 1 << 20);
        let batches = ctx.sql(sql).await?.collect().await?;
        Ok(batches.iter().map(|b| b.num_rows()).sum())
    }

    #[tokio::test]
    async fn amplifying_calls_over_the_limit_fail_before_they_allocate() {
        for sql in [
            "SELECT repeat('ab', 1073741823)",
            "SELECT lpad('x', 2000000000)",
            "SELECT rpad('x', 300000, 'y')",
            "SELECT array_repeat('abcd', 1000000)",
            "SELECT range(0, 1500000000)",
            "SELECT generate_series(1, 200000)",
            // Per batch, not per value: 4,000 rows of 1 KiB each.
            "SELECT repeat('x', 1024 + value % 2) FROM range(4000)",
            // Constants add up across the query: three calls of 400 KiB.
            "SELECT repeat('a', 409600), repeat('b', 409600), repeat('c', 409600)",
            // Empty elements still cost their offsets.
            "SELECT array_repeat('', 2147483647)",
            "SELECT array_resize(make_array(1), 2147483647, 7)",
            "SELECT array_resize(make_array(1), 1000000)",
            "SELECT replace(repeat('a', 100000), 'a', repeat('b', 100))",
            "SELECT replace(repeat('a', 1000), '', repeat('b', 2000))",
            "SELECT regexp_replace(repeat('a', 100000), 'a', 'bbbbbbbbbbbbbbbbbbbb', 'g')",
            "SELECT regexp_replace(repeat('a', 500000), 'a*', '$0$0$0', 'g')",
            "SELECT range(TIMESTAMP '2000-01-01', TIMESTAMP '2100-01-01', INTERVAL '1 nanosecond')",
            "SELECT range(DATE '2000-01-01', DATE '2100-01-01', INTERVAL '1 second')",
            "SELECT generate_series(TIMESTAMP '2000-01-01', TIMESTAMP '2000-01-02', INTERVAL '1 month -30 days')",
        ] {
            let err = run(sql).await.unwrap_err();
            assert!(
                matches!(err.find_root(), DataFusionError::External(e) if e.is::<TooLarge>()),
                "{sql}: {err}"
            );
            assert!(err.to_string().contains("--query-memory"), "{sql}: {err}");
        }
        // Work, not memory: the steps of a quadratic call are bounded.
        let sql = "SELECT levenshtein(repeat('a', 100000), repeat('b', 100000))";
        let err = run(sql).await.unwrap_err();
        assert!(
            matches!(err.find_root(), DataFusionError::External(e)
                if matches!(e.downcast_ref::<TooLarge>(), Some(TooLarge::Steps { .. }))),
            "{err}"
        );
        for sql in [
            "SELECT repeat('ab', 1000)",
            "SELECT lpad('x', 10)",
            "SELECT array_repeat(1, 100)",
            "SELECT range(0, 1000, 7)",
            "SELECT repeat(CAST(value AS VARCHAR), 3) FROM range(1000)",
            "SELECT repeat('a', 300000), repeat('b', 300000)",
            "SELECT array_resize(make_array(1, 2), 1000, 0)",
            "SELECT replace(repeat('ab', 1000), 'a', 'xyz')",
            "SELECT regexp_replace(repeat('ab', 1000), 'a', '[$0]', 'g')",
            "SELECT range(DATE '2000-01-01', DATE '2001-01-01', INTERVAL '1 day')",
            "SELECT range(TIMESTAMP '2000-01-01', TIMESTAMP '2000-01-02', INTERVAL '1 minute')",
            "SELECT levenshtein('kitten', 'sitting')",
        ] {
            run(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }
}
