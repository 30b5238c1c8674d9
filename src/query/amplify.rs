//! Functions whose output can be far larger than their input, checked before
//! they allocate.
//!
//! `SELECT repeat('ab', 1073741823)` is one short line that asks for 2 GiB,
//! and DataFusion evaluates constant calls while it plans, before any memory
//! is accounted to the query's pool: a handful of such requests would take
//! the whole server down. Each function of [`WRAPPED`] is replaced (per query
//! context, under the same names and aliases) by a wrapper that first works
//! out from its arguments an upper bound of the bytes the call would produce
//! ([`Growth`] says how for each), and refuses the call ([`TooLarge`],
//! `422`) when that alone is more than `--query-memory`, which no query could
//! ever hold anyway. A call whose output has no bound known before it runs
//! (`array_to_string` over a type it has no text width for) is measured
//! after, and checked the same way before its value goes on.
//!
//! Calls on constants (the ones folded while planning, outside any operator
//! that accounts for memory) add up across the query: twenty `repeat`s of
//! half the limit are refused too. Each also reserves its bound in the
//! query's memory pool while it runs, and keeps what it made reserved until
//! the query ends (the value stays in the plan), so that running queries add
//! up: a refusal there is the pool's, `429` when other queries hold the
//! memory (see [`super::pool`]). Calls on columns reserve nothing: their
//! output goes to operators that account for what they keep (sorts,
//! aggregations, the result), and a reservation per batch would fail queries
//! whose sorts hold their fair part of the pool.
//!
//! The SQL planner calls some of these functions without the registry (`[…]`
//! is `make_array`, `||` on lists `array_concat`, `array_append` or
//! `array_prepend`, `OVERLAY(… PLACING …)` is `overlay`): an analyzer rule
//! ([`Wrap`]) puts the wrappers in their place. `||` on text is an operator,
//! not a function; the rule wraps each of its operands in a checked identity
//! ([`Growth::Operand`]), as the operator copies them. Operands that are not
//! constant are unwrapped again by the optimizer: their copies are made per
//! batch, of values the query already holds, where the timeout can stop it.
//!
//! `levenshtein` costs time rather than memory: the product of its
//! arguments' lengths in steps, at most [`MAX_STEPS`] per call and as many
//! for all of a query's calls on constants together (a call made while
//! planning cannot be cancelled by the query timeout).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, GenericListArray, OffsetSizeTrait};
use arrow::datatypes::{DataType, FieldRef, Int64Type, IntervalMonthDayNanoType, TimeUnit};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode};
use datafusion::common::{DataFusionError, Result, ScalarValue};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool, MemoryReservation};
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::{
    BinaryExpr, ColumnarValue, Documentation, Expr, LogicalPlan, Operator, ReturnFieldArgs,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::optimizer::AnalyzerRule;
use datafusion::prelude::SessionContext;

/// How a function's output size follows from its arguments: an upper bound,
/// per row, summed over the rows of the call.
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
    /// `regexp_replace(text, pattern, replacement [, flags])`: the text, and
    /// at most one match per position (`t + 1`), each writing the
    /// replacement's literal bytes and, per group reference (`$1`,
    /// `${name}`, `\1`), the group's text. As matches do not overlap, a
    /// reference copies at most `t` bytes over all of them, and it takes
    /// two bytes of the replacement or more: `t + (t + 1)·r` bounds it all.
    RegexpReplace,
    /// `levenshtein(a, b)`: `len(a) × len(b)` steps, one integer out.
    Quadratic,
    /// `to_char(value, format)`: a format specifier (`%` and at least one
    /// more byte) writes at most 64 bytes (the longest, `%+`, RFC 3339 with
    /// nanoseconds, offset and a six-digit year, is 38), any other byte
    /// itself: `32 × len(format)`; a duration ignores the format, so 64 more.
    ToChar,
    /// `array_to_string(list, delimiter [, null_string])`: each element at
    /// every depth writes at most one delimiter and either the null string or
    /// its text ([`text_of`]).
    Join,
    /// `string_to_array(text, delimiter [, null_string])`: the text, cut into
    /// at most `len(text) / len(delimiter) + 1` elements (one per character
    /// for a null delimiter), each costing [`ELEMENT_OVERHEAD`] beyond its
    /// bytes (a Utf8View element is a 16-byte view).
    Split,
    /// `array_replace[_n|_all](list, from, to [, n])`: the list, and each of
    /// its elements may become a copy of `to`.
    ArrayReplace,
    /// `concat`, `make_array`, `array_concat`/`append`/`prepend`: a copy of
    /// every argument, each an element.
    Sum,
    /// `concat_ws(separator, text…)`: the texts, a separator between each two.
    ConcatWs,
    /// `translate(text, from, to)`: each character (a byte or more) becomes
    /// at most one character of at most 4 bytes.
    Translate,
    /// `overlay(text, placing, from [, for])`: a prefix and a suffix of the
    /// text (overlapping when `for` is negative) around `placing`.
    Overlay,
    /// An operand of `||` on text ([`Operand`]): the operator copies it.
    Operand,
}

/// Most steps one `levenshtein` call (one batch of rows) may take, and all
/// of a query's calls on constants together: about a second of one core.
pub const MAX_STEPS: i128 = 1 << 30;

const DAY_NS: i128 = 86_400_000_000_000;

/// Bookkeeping bytes of one list element beyond its value (offsets, the
/// indices the kernels build, a string view).
const ELEMENT_OVERHEAD: i128 = 16;

/// The checked built-ins, by their names (their aliases follow).
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
    ("to_char", Growth::ToChar),
    ("array_to_string", Growth::Join),
    ("string_to_array", Growth::Split),
    ("array_replace", Growth::ArrayReplace),
    ("array_replace_n", Growth::ArrayReplace),
    ("array_replace_all", Growth::ArrayReplace),
    ("concat", Growth::Sum),
    ("make_array", Growth::Sum),
    ("array_concat", Growth::Sum),
    ("array_append", Growth::Sum),
    ("array_prepend", Growth::Sum),
    ("concat_ws", Growth::ConcatWs),
    ("translate", Growth::Translate),
    ("overlay", Growth::Overlay),
];

/// Replaces the amplifying functions of `ctx` by checked wrappers that
/// refuse a call producing more than `limit` bytes, and hold what calls on
/// constants make in the context's memory pool.
pub fn register(ctx: &SessionContext, limit: usize) {
    let budget = Shared(Arc::new(Budget::new(
        limit,
        ctx.runtime_env().memory_pool.clone(),
    )));
    let checked = |inner: ScalarUDF, growth: Growth| {
        Arc::new(ScalarUDF::new_from_impl(Checked {
            inner,
            growth,
            budget: budget.clone(),
        }))
    };
    let mut wrapped = HashMap::new();
    for (name, growth) in WRAPPED {
        let Ok(inner) = ctx.udf(name) else {
            continue; // not built in with this feature set
        };
        let udf = checked(inner.as_ref().clone(), *growth);
        ctx.register_udf(udf.as_ref().clone());
        wrapped.insert(inner.name().to_string(), udf);
    }
    let operand = checked(ScalarUDF::new_from_impl(Operand::new()), Growth::Operand);
    ctx.add_analyzer_rule(Arc::new(Wrap { wrapped, operand }));
}

/// A call refused for the size of its output or its work: the same query
/// fails again whatever else runs.
#[derive(Debug, thiserror::Error)]
pub enum TooLarge {
    #[error("{call} would produce {bytes} bytes, more than the {limit} bytes all queries may hold together (--query-memory)")]
    Bytes {
        call: String,
        bytes: i128,
        limit: usize,
    },
    #[error("{call} would bring the query's calls on constants to {bytes} bytes in all, more than the {limit} bytes all queries may hold together (--query-memory)")]
    Constants {
        call: String,
        bytes: u64,
        limit: usize,
    },
    #[error("{call} would take {steps} steps, more than {MAX_STEPS} per call")]
    Steps { call: String, steps: i128 },
    #[error("{call} would bring the query's calls on constants to {steps} steps in all, more than {MAX_STEPS} (they run while the query is planned, where the time limit cannot stop them)")]
    ConstantSteps { call: String, steps: u64 },
}

fn refusal(e: TooLarge) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Checked {
    inner: ScalarUDF,
    growth: Growth,
    budget: Shared,
}

/// One query's account of its checked calls, shared by the wrappers of its
/// context.
#[derive(Debug)]
struct Budget {
    /// `--query-memory`.
    limit: usize,
    /// Bytes made by the query's calls on constants (while a call runs, its
    /// upper bound instead).
    bytes: AtomicU64,
    /// Steps taken by the query's calls on constants.
    steps: AtomicU64,
    /// The query's memory pool.
    pool: Arc<dyn MemoryPool>,
    /// What the calls on constants made, held until the query's context is
    /// dropped: their values live in its plan until then.
    held: MemoryReservation,
}

impl Budget {
    fn new(limit: usize, pool: Arc<dyn MemoryPool>) -> Self {
        let held = MemoryConsumer::new("calls on constants").register(&pool);
        Self {
            limit,
            bytes: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            pool,
            held,
        }
    }
}

/// The query's [`Budget`], compared by identity (a wrapper equals another
/// only in the same query).
#[derive(Debug, Clone)]
struct Shared(Arc<Budget>);

impl PartialEq for Shared {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Shared {}

impl std::hash::Hash for Shared {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.0).hash(state)
    }
}

/// Bytes a call on constants was let make: counted in the query's
/// [`Budget`] and reserved in its pool while the call runs.
struct Admitted<'a> {
    budget: &'a Budget,
    /// The call's own reservation, named after it (a refusal says so).
    _call: MemoryReservation,
    /// The bound the call was admitted with.
    bound: u64,
}

impl Admitted<'_> {
    /// Ends the call, which `made` that many bytes (None: it failed): what
    /// it made stays counted and held until the query ends; the call's own
    /// reservation goes with `self`.
    fn settle(self, made: Option<u64>) {
        let made = made.unwrap_or(0);
        let bytes = &self.budget.bytes;
        if made >= self.bound {
            bytes.fetch_add(made - self.bound, Ordering::Relaxed);
        } else {
            bytes.fetch_sub(self.bound - made, Ordering::Relaxed);
        }
        // Grown before the call's reservation is freed: the bytes are never
        // unaccounted in between.
        self.budget
            .held
            .grow(usize::try_from(made).unwrap_or(usize::MAX));
    }
}

/// Bytes a call's value takes.
fn made(v: &ColumnarValue) -> u64 {
    let bytes = match v {
        ColumnarValue::Array(a) => a.get_array_memory_size(),
        ColumnarValue::Scalar(s) => s.size(),
    };
    bytes as u64
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

/// Bytes of a text or binary scalar (0 for null); None for other types.
/// Read in place: the scalar may be the large value being checked.
fn scalar_bytes(s: &ScalarValue) -> Option<i128> {
    if let Some(text) = s.try_as_str() {
        return Some(text.map_or(0, str::len) as i128);
    }
    match s {
        ScalarValue::Binary(b)
        | ScalarValue::LargeBinary(b)
        | ScalarValue::BinaryView(b)
        | ScalarValue::FixedSizeBinary(_, b) => Some(b.as_ref().map_or(0, Vec::len) as i128),
        _ => None,
    }
}

/// Byte length of each row of a text or binary argument; None for others.
fn byte_lengths(v: &ColumnarValue) -> Result<Option<Vec<i128>>> {
    let a = match v {
        ColumnarValue::Scalar(s) => return Ok(scalar_bytes(s).map(|n| vec![n])),
        ColumnarValue::Array(a) => a,
    };
    let lengths = match a.data_type() {
        DataType::Utf8
        | DataType::LargeUtf8
        | DataType::Utf8View
        | DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView => arrow::compute::kernels::length::length(a)?,
        _ => return Ok(None),
    };
    ints(&ColumnarValue::Array(lengths))
}

/// Bytes per row of any argument: text/binary lengths, the width of a
/// fixed-width type, else a scalar's size or its share of the array's
/// memory.
fn row_bytes(v: &ColumnarValue) -> Result<Vec<i128>> {
    if let Some(lengths) = byte_lengths(v)? {
        return Ok(lengths);
    }
    let (per_row, rows) = match (v.data_type().primitive_width(), v) {
        (Some(width), ColumnarValue::Scalar(_)) => (width, 1),
        (Some(width), ColumnarValue::Array(a)) => (width, a.len()),
        (None, ColumnarValue::Scalar(s)) => (s.size(), 1),
        (None, ColumnarValue::Array(a)) => (a.get_array_memory_size() / a.len().max(1), a.len()),
    };
    Ok(vec![per_row.max(1) as i128; rows])
}

/// Elements per row of a list argument; None for other types.
fn list_lengths(v: &ColumnarValue) -> Result<Option<Vec<i128>>> {
    let a = values(v)?;
    if !matches!(
        a.data_type(),
        DataType::List(_) | DataType::LargeList(_) | DataType::FixedSizeList(..)
    ) {
        return Ok(None);
    }
    ints(&ColumnarValue::Array(
        arrow::compute::kernels::length::length(&a)?,
    ))
}

/// The elements of a list array's rows as one array (the part of its
/// values the rows use); None if it is not a list.
fn elements(a: &ArrayRef) -> Option<ArrayRef> {
    fn used<O: OffsetSizeTrait>(list: &GenericListArray<O>) -> ArrayRef {
        let offsets = list.value_offsets();
        let first = offsets.first().map_or(0, |o| o.as_usize());
        let last = offsets.last().map_or(0, |o| o.as_usize());
        list.values().slice(first, last.saturating_sub(first))
    }
    match a.data_type() {
        DataType::List(_) => Some(used(a.as_list::<i32>())),
        DataType::LargeList(_) => Some(used(a.as_list::<i64>())),
        // A sliced fixed-size list slices its values.
        DataType::FixedSizeList(..) => Some(a.as_fixed_size_list().values().clone()),
        _ => None,
    }
}

/// Most bytes `array_to_string` writes for one value of a type that is not
/// text: integers 20 (`-9223372036854775808`), floats as Rust prints them
/// without an exponent (`f64`: 327 for `-5e-324`), dates, times and
/// intervals cast to text, decimals up to 76 digits with a scale down to
/// -128; None for types whose text has no such bound (structs, maps,
/// dictionaries).
fn text_width(data_type: &DataType) -> Option<i128> {
    use DataType::*;
    Some(match data_type {
        Null => 0,
        Boolean => 5,
        Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 | UInt64 => 20,
        Float16 | Float32 => 48,
        Float64 => 330,
        Date32 | Date64 | Time32(_) | Time64(_) | Timestamp(..) | Duration(_) | Interval(_) => 128,
        Decimal32(..) | Decimal64(..) | Decimal128(..) | Decimal256(..) => 256,
        _ => return None,
    })
}

/// What `array_to_string` writes at most for `array`, the elements of lists:
/// `(slots, bytes)`, each element at every depth a slot (it writes at most
/// one delimiter and either the null string or its text), `bytes` the text
/// of the leaves. None for leaves of a type without a [`text_width`].
fn text_of(array: &ArrayRef) -> Result<Option<(i128, i128)>> {
    let slots = array.len() as i128;
    if let Some(inner) = elements(array) {
        return Ok(text_of(&inner)?.map(|(s, bytes)| (slots.saturating_add(s), bytes)));
    }
    let bytes = match byte_lengths(&ColumnarValue::Array(array.clone()))? {
        Some(lengths) => lengths.iter().fold(0i128, |acc, n| acc.saturating_add(*n)),
        None => match text_width(array.data_type()) {
            Some(width) => slots.saturating_mul(width),
            None => return Ok(None),
        },
    };
    Ok(Some((slots, bytes)))
}

/// Row `i` of an argument's values; one value stands for every row.
fn at(v: &[i128], i: usize) -> i128 {
    match v.len() {
        0 => 0,
        1 => v[0],
        _ => v.get(i).copied().unwrap_or(0),
    }
}

/// The largest of an argument's values (0 for none).
fn widest(v: &[i128]) -> i128 {
    v.iter().copied().max().unwrap_or(0).max(0)
}

/// Σ over `rows` rows of `f(row)`, saturating.
fn total(rows: usize, f: impl Fn(usize) -> i128) -> i128 {
    (0..rows).map(f).fold(0i128, i128::saturating_add)
}

/// Σ over `rows` rows of `a[i] × b[i]`.
fn sum_of_products(a: &[i128], b: &[i128], rows: usize) -> i128 {
    total(rows, |i| at(a, i).max(0).saturating_mul(at(b, i).max(0)))
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
    value_bytes
        .iter()
        .map(|b| b.saturating_add(ELEMENT_OVERHEAD))
        .collect()
}

impl Checked {
    /// The call as messages name it.
    fn call(&self) -> String {
        match self.growth {
            Growth::Operand => "||".to_string(),
            _ => format!("{}(…)", self.inner.name()),
        }
    }

    /// An upper bound of the bytes this call would produce, if it can tell.
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
            Growth::Series if (1..=3).contains(&a.len()) => return series_bytes(a, rows),
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
                    (Some(text), Some(from), Some(to)) => Some(total(rows, |i| {
                        let (t, f, r) = (at(&text, i), at(&from, i), at(&to, i));
                        // An empty `from` matches between characters.
                        t.saturating_add((t / f.max(1) + 1).saturating_mul(r))
                    })),
                    _ => None,
                }
            }
            Growth::RegexpReplace if a.len() >= 3 => {
                match (byte_lengths(&a[0])?, byte_lengths(&a[2])?) {
                    (Some(text), Some(repl)) => Some(total(rows, |i| {
                        let (t, r) = (at(&text, i), at(&repl, i));
                        t.saturating_add((t + 1).saturating_mul(r))
                    })),
                    _ => None,
                }
            }
            Growth::Quadratic => Some(8 * rows as i128),
            Growth::ToChar if a.len() == 2 => byte_lengths(&a[1])?
                .map(|format| total(rows, |i| at(&format, i).saturating_mul(32) + 64)),
            Growth::Join if a.len() >= 2 => return join_bytes(a, rows),
            Growth::Split if a.len() >= 2 => match (byte_lengths(&a[0])?, byte_lengths(&a[1])?) {
                (Some(text), Some(delimiter)) => Some(total(rows, |i| {
                    let (t, d) = (at(&text, i), at(&delimiter, i));
                    t.saturating_add((t / d.max(1) + 1).saturating_mul(ELEMENT_OVERHEAD))
                })),
                _ => None,
            },
            Growth::ArrayReplace if a.len() >= 3 => match list_lengths(&a[0])? {
                Some(n) => {
                    let (list, to) = (row_bytes(&a[0])?, per_element(row_bytes(&a[2])?));
                    Some(total(rows, |i| {
                        at(&list, i).saturating_add(at(&n, i).max(0).saturating_mul(at(&to, i)))
                    }))
                }
                None => None,
            },
            Growth::Sum => {
                let mut sum = 0i128;
                for v in a {
                    sum = sum.saturating_add(sum_of_products(
                        &per_element(row_bytes(v)?),
                        &[1],
                        rows,
                    ));
                }
                Some(sum)
            }
            Growth::ConcatWs if !a.is_empty() => return concat_ws_bytes(a, rows),
            Growth::Translate if !a.is_empty() => {
                byte_lengths(&a[0])?.map(|text| sum_of_products(&text, &[4], rows))
            }
            Growth::Overlay if a.len() >= 2 => match (byte_lengths(&a[0])?, byte_lengths(&a[1])?) {
                (Some(text), Some(placing)) => Some(total(rows, |i| {
                    at(&text, i)
                        .saturating_mul(2)
                        .saturating_add(at(&placing, i))
                })),
                _ => None,
            },
            Growth::Operand if a.len() == 1 => {
                Some(sum_of_products(&row_bytes(&a[0])?, &[1], rows))
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

    /// Lets the call take `steps`: at most [`MAX_STEPS`], and on constants
    /// at most what the query's earlier calls on constants left of it.
    fn take_steps(&self, steps: i128, constant: bool) -> Result<()> {
        if steps > MAX_STEPS {
            let call = self.call();
            return Err(refusal(TooLarge::Steps { call, steps }));
        }
        if !constant {
            return Ok(());
        }
        let taken = &self.budget.0.steps;
        charge(taken, steps.max(0) as u64, MAX_STEPS as u64).map_err(|total| {
            let call = self.call();
            refusal(TooLarge::ConstantSteps { call, steps: total })
        })
    }

    /// Lets the call make up to `bytes`: no more than `--query-memory`, and
    /// on constants (then `Some`) no more than what the query's earlier
    /// calls on constants left of it, reserved in the pool (whose refusal
    /// tells whether other queries hold the memory).
    fn admit(&self, bytes: i128, constant: bool) -> Result<Option<Admitted<'_>>> {
        let budget = &*self.budget.0;
        let limit = budget.limit;
        if bytes > limit as i128 {
            let call = self.call();
            return Err(refusal(TooLarge::Bytes { call, bytes, limit }));
        }
        if !constant {
            return Ok(None);
        }
        let bound = bytes.max(0) as u64;
        charge(&budget.bytes, bound, limit as u64).map_err(|total| {
            let call = self.call();
            refusal(TooLarge::Constants {
                call,
                bytes: total,
                limit,
            })
        })?;
        let name = format!("{} on constants", self.call());
        let call = MemoryConsumer::new(name).register(&budget.pool);
        if let Err(e) = call.try_grow(bound as usize) {
            budget.bytes.fetch_sub(bound, Ordering::Relaxed);
            return Err(e);
        }
        Ok(Some(Admitted {
            budget,
            _call: call,
            bound,
        }))
    }
}

/// Bytes of `range`/`generate_series([start,] stop [, step])`
/// ([`Growth::Series`]).
fn series_bytes(a: &[ColumnarValue], rows: usize) -> Result<Option<i128>> {
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
    Ok(Some(total(rows, |i| {
        let step = at(&step, i).abs().max(1);
        let n = (at(&stop, i) - at(&start, i)).abs() / step + 1;
        n.saturating_mul(8)
    })))
}

/// Bytes of `array_to_string(list, delimiter [, null_string])`
/// ([`Growth::Join`]).
fn join_bytes(a: &[ColumnarValue], rows: usize) -> Result<Option<i128>> {
    let text = match elements(&values(&a[0])?) {
        Some(elements) => text_of(&elements)?,
        None => None,
    };
    // A constant list beside other arguments is joined per row.
    let copies = match &a[0] {
        ColumnarValue::Scalar(_) => rows as i128,
        ColumnarValue::Array(_) => 1,
    };
    let text = text.map(|(s, b)| (s.saturating_mul(copies), b.saturating_mul(copies)));
    let null = match a.get(2) {
        Some(v) => byte_lengths(v)?,
        None => Some(vec![0]),
    };
    Ok(match (text, byte_lengths(&a[1])?, null) {
        (Some((slots, text)), Some(delimiter), Some(null)) => {
            let slot = widest(&delimiter).saturating_add(widest(&null));
            Some(slots.saturating_mul(slot).saturating_add(text))
        }
        _ => None,
    })
}

/// Bytes of `concat_ws(separator, text…)` ([`Growth::ConcatWs`]).
fn concat_ws_bytes(a: &[ColumnarValue], rows: usize) -> Result<Option<i128>> {
    let Some(separator) = byte_lengths(&a[0])? else {
        return Ok(None);
    };
    let separators = (a.len() as i128 - 2).max(0);
    let mut sum = sum_of_products(&separator, &[separators], rows);
    for v in &a[1..] {
        let Some(text) = byte_lengths(v)? else {
            return Ok(None);
        };
        sum = sum.saturating_add(sum_of_products(&text, &[1], rows));
    }
    Ok(Some(sum))
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

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        self.inner.schema_name(args)
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

    /// The inner function's simplifications are not used: they build calls
    /// of the unchecked built-ins. An operand of `||` that is not constant
    /// loses its check (see the module doc); a constant one has been folded
    /// already, or failed its check and stays to fail at execution.
    fn simplify(&self, mut args: Vec<Expr>, _info: &SimplifyContext) -> Result<ExprSimplifyResult> {
        if self.growth == Growth::Operand
            && args.len() == 1
            && !matches!(args[0], Expr::Literal(..))
        {
            if let Some(operand) = args.pop() {
                return Ok(ExprSimplifyResult::Simplified(operand));
            }
        }
        Ok(ExprSimplifyResult::Original(args))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let constant = constant(&args);
        if let Some(steps) = self.steps(&args)? {
            self.take_steps(steps, constant)?;
        }
        let Some(bound) = self.output_bytes(&args)? else {
            // No bound before the call: what it made must pass before it
            // goes on.
            let out = self.inner.invoke_with_args(args)?;
            let bytes = made(&out);
            if let Some(admitted) = self.admit(bytes as i128, constant)? {
                admitted.settle(Some(bytes));
            }
            return Ok(out);
        };
        let admitted = self.admit(bound, constant)?;
        let out = self.inner.invoke_with_args(args);
        if let Some(admitted) = admitted {
            admitted.settle(out.as_ref().ok().map(made));
        }
        out
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }
}

/// The identity, wrapped ([`Growth::Operand`]) around each operand of `||`
/// on text: the operator copies what it returns. Named as its operand, so
/// the `||` keeps its column name.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Operand(Signature);

impl Operand {
    fn new() -> Self {
        Self(Signature::any(1, Volatility::Immutable))
    }
}

fn no_operand() -> DataFusionError {
    DataFusionError::Internal("concat_operand takes one argument".to_string())
}

impl ScalarUDFImpl for Operand {
    fn name(&self) -> &str {
        "concat_operand"
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        let [operand] = args else {
            return Err(no_operand());
        };
        Ok(operand.schema_name().to_string())
    }

    fn signature(&self) -> &Signature {
        &self.0
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        arg_types.first().cloned().ok_or_else(no_operand)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        args.arg_fields.first().cloned().ok_or_else(no_operand)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        args.args.into_iter().next().ok_or_else(no_operand)
    }
}

/// The analyzer rule that puts the checked wrappers where the SQL planner
/// called a built-in directly, and checks the operands of `||` on text
/// (see the module doc). It runs after type coercion, so the wrappers see
/// the same argument types as the built-ins they replace.
#[derive(Debug)]
struct Wrap {
    /// The wrappers, by their built-in's name.
    wrapped: HashMap<String, Arc<ScalarUDF>>,
    /// The checked [`Operand`].
    operand: Arc<ScalarUDF>,
}

impl Wrap {
    fn rewrite(&self, expr: Expr) -> Result<Transformed<Expr>> {
        Ok(match expr {
            Expr::ScalarFunction(f) if !f.func.inner().is::<Checked>() => {
                match self.wrapped.get(f.func.name()) {
                    Some(checked) => Transformed::yes(Expr::ScalarFunction(
                        ScalarFunction::new_udf(checked.clone(), f.args),
                    )),
                    None => Transformed::no(Expr::ScalarFunction(f)),
                }
            }
            Expr::BinaryExpr(BinaryExpr { left, op, right }) if op == Operator::StringConcat => {
                Transformed::yes(Expr::BinaryExpr(BinaryExpr {
                    left: Box::new(self.operand(*left)),
                    op,
                    right: Box::new(self.operand(*right)),
                }))
            }
            expr => Transformed::no(expr),
        })
    }

    /// `expr` as a checked operand of `||` (once: the rule may run again on
    /// the same plan).
    fn operand(&self, expr: Expr) -> Expr {
        if matches!(&expr, Expr::ScalarFunction(f) if f.func == self.operand) {
            return expr;
        }
        Expr::ScalarFunction(ScalarFunction::new_udf(self.operand.clone(), vec![expr]))
    }
}

impl AnalyzerRule for Wrap {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        plan.transform_up_with_subqueries(|plan| {
            plan.map_expressions(|expr| expr.transform_up(|expr| self.rewrite(expr)))
        })
        .data()
    }

    fn name(&self) -> &str {
        "lakewriter_checked_calls"
    }
}

/// Adds `n` to a per-query counter unless that takes it past `cap`; the
/// total it would have reached when it does.
fn charge(counter: &AtomicU64, n: u64, cap: u64) -> Result<(), u64> {
    let total = counter.fetch_add(n, Ordering::Relaxed).saturating_add(n);
    if total > cap {
        counter.fetch_sub(n, Ordering::Relaxed);
        return Err(total);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use datafusion::execution::runtime_env::RuntimeEnvBuilder;
    use datafusion::prelude::SessionConfig;

    use super::super::pool::{QueryPool, SharedPool};
    use super::*;

    async fn collect(
        ctx: &SessionContext,
        sql: &str,
    ) -> Result<Vec<arrow::record_batch::RecordBatch>> {
        ctx.sql(sql).await?.collect().await
    }

    /// Runs `sql` in a context of its own, as every query has (the budget
    /// of constants is per query).
    async fn run(sql: &str) -> Result<usize> {
        let ctx = SessionContext::new();
        register(&ctx, 1 << 20);
        let batches = collect(&ctx, sql).await?;
        Ok(batches.iter().map(|b| b.num_rows()).sum())
    }

    /// Whether `err` is a refusal of ours, and which.
    fn too_large(err: &DataFusionError) -> Option<&TooLarge> {
        match err.find_root() {
            DataFusionError::External(e) => e.downcast_ref::<TooLarge>(),
            _ => None,
        }
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
            // A group written the PostgreSQL way is a reference too.
            "SELECT regexp_replace(repeat('a', 100000), '(a*)', '\\1\\1\\1\\1\\1\\1', 'g')",
            "SELECT range(TIMESTAMP '2000-01-01', TIMESTAMP '2100-01-01', INTERVAL '1 nanosecond')",
            "SELECT range(DATE '2000-01-01', DATE '2100-01-01', INTERVAL '1 second')",
            "SELECT generate_series(TIMESTAMP '2000-01-01', TIMESTAMP '2000-01-02', INTERVAL '1 month -30 days')",
            // A format of 100,000 specifiers, once and per row.
            "SELECT to_char(TIMESTAMP '2000-01-01', repeat('%c', 100000))",
            "SELECT date_format(to_timestamp(value), repeat('%Y', 1000)) FROM range(1000)",
            // Elements × separator.
            "SELECT array_to_string(range(1000), repeat('x', 2000))",
            "SELECT array_join([[1, 2], [3, NULL]], '-', repeat('n', 400000))",
            // One element, of 16 bytes beyond its text, per delimiter.
            "SELECT string_to_array(repeat('a,', 100000), ',')",
            "SELECT string_to_list(repeat('ab', 50000), CAST(NULL AS VARCHAR))",
            "SELECT array_replace_all(array_repeat('a', 1000), 'a', repeat('b', 2000))",
            // Copies of constants count too.
            "SELECT concat_ws(',', repeat('a', 300000), repeat('b', 300000))",
            "SELECT concat_ws(repeat('x', 400000), 'a', 'b', 'c', 'd')",
            "SELECT concat(repeat('a', 400000), repeat('b', 400000))",
            "SELECT repeat('a', 300000) || repeat('b', 300000) || 'c'",
            "SELECT [repeat('a', 300000)] || [repeat('b', 300000)]",
            "SELECT make_array(repeat('a', 300000), repeat('b', 300000))",
            "SELECT translate(repeat('a', 300000), 'a', 'é')",
            "SELECT overlay(repeat('a', 400000) placing repeat('b', 400000) from 1)",
        ] {
            let err = run(sql).await.unwrap_err();
            assert!(too_large(&err).is_some(), "{sql}: {err}");
            assert!(err.to_string().contains("--query-memory"), "{sql}: {err}");
        }
        // Each refusal names the call and the limit.
        let err = run("SELECT to_char(TIMESTAMP '2000-01-01', repeat('%c', 100000))")
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("to_char(…) would produce"),
            "{err}"
        );
        assert!(err.to_string().contains("1048576 bytes"), "{err}");
        // An operand of `||` bigger than the limit (the query's text).
        let sql = format!("SELECT '{}' || 'x'", "a".repeat(1_100_000));
        let err = run(&sql).await.unwrap_err();
        assert!(
            matches!(too_large(&err), Some(TooLarge::Bytes { call, .. }) if call == "||"),
            "{err}"
        );
        // Work, not memory: the steps of a quadratic call are bounded.
        let sql = "SELECT levenshtein(repeat('a', 100000), repeat('b', 100000))";
        let err = run(sql).await.unwrap_err();
        assert!(
            matches!(too_large(&err), Some(TooLarge::Steps { .. })),
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
            "SELECT to_char(TIMESTAMP '2000-01-01 12:00:00', '%Y-%m-%d %H:%M:%S')",
            "SELECT to_char(to_timestamp(value), '%Y-%m-%dT%H:%M:%S%.f') FROM range(1000)",
            "SELECT array_to_string(make_array(1, 2, 3), ',')",
            "SELECT array_to_string([[1.5, 2.0], [3.0]], '-', 'null')",
            "SELECT array_join(make_array('a', NULL, 'c'), ', ', '?')",
            "SELECT array_to_string(range(value), ',') FROM range(100)",
            "SELECT string_to_array('a,b,c', ',')",
            "SELECT string_to_array(CAST(value AS VARCHAR), '1') FROM range(1000)",
            "SELECT array_replace_all(make_array(1, 2, 1), 1, 3)",
            "SELECT concat_ws('-', 'a', 'b', NULL, 'c')",
            "SELECT concat_ws(',', CAST(value AS VARCHAR), 'x') FROM range(1000)",
            "SELECT concat('a', 1, NULL, 'b')",
            "SELECT 'a' || 'b' || CAST(value AS VARCHAR) FROM range(1000)",
            "SELECT 'x' || NULL",
            "SELECT [1, 2] || [3], make_array(value, value + 1) FROM range(1000)",
            "SELECT translate('abc', 'a', 'x'), overlay('Txxxxas' placing 'hom' from 2 for 4)",
        ] {
            run(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }

    #[tokio::test]
    async fn checked_calls_answer_as_the_built_ins() {
        let sql = "SELECT 'a' || CAST(value AS VARCHAR) || 'b', concat_ws('-', 'x', 'y'), \
            array_to_string([value, NULL], ',', '?'), [value] || [2], \
            overlay('Txxxxas' placing 'hom' from 2 for 4) \
            FROM range(3) WHERE 'v' || CAST(value AS VARCHAR) <> 'v1'";
        let checked = SessionContext::new();
        register(&checked, 1 << 20);
        let got = collect(&checked, sql).await.unwrap();
        let want = collect(&SessionContext::new(), sql).await.unwrap();
        assert_eq!(got[0].schema(), want[0].schema());
        assert_eq!(
            arrow::util::pretty::pretty_format_batches(&got)
                .unwrap()
                .to_string(),
            arrow::util::pretty::pretty_format_batches(&want)
                .unwrap()
                .to_string(),
        );
    }

    #[tokio::test]
    async fn the_steps_of_calls_on_constants_add_up_per_query() {
        // 24,000² steps each: the first runs, the second would bring the
        // query past MAX_STEPS.
        let one = "levenshtein(repeat('a', 24000), repeat('b', 24000))";
        let err = run(&format!("SELECT {one} AS a, {one} AS b"))
            .await
            .unwrap_err();
        assert!(
            matches!(too_large(&err), Some(TooLarge::ConstantSteps { .. })),
            "{err}"
        );
        assert!(err.to_string().contains("levenshtein(…)"), "{err}");
        let small = "levenshtein(repeat('a', 1000), repeat('b', 1000))";
        run(&format!("SELECT {small} AS a, {small} AS b"))
            .await
            .unwrap();
    }

    /// A context as the query engine makes one: its own view of a pool all
    /// queries share.
    fn context_in(shared: &Arc<SharedPool>) -> (SessionContext, Arc<QueryPool>) {
        let pool = Arc::new(QueryPool::new(shared.clone()));
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(pool.clone())
            .build_arc()
            .unwrap();
        let ctx = SessionContext::new_with_config_rt(SessionConfig::new(), runtime);
        register(&ctx, 1 << 20);
        (ctx, pool)
    }

    #[tokio::test]
    async fn calls_on_constants_hold_what_they_made_until_the_query_ends() {
        let shared = Arc::new(SharedPool::new(1 << 20, true));
        let (first, _) = context_in(&shared);
        collect(&first, "SELECT repeat('a', 600000)").await.unwrap();
        // Its value is in the plan until the query's context goes.
        assert!(shared.reserved() >= 600000, "{}", shared.reserved());
        // Alone the second query would fit: refused by the pool, retryable.
        let (second, pool) = context_in(&shared);
        let err = collect(&second, "SELECT repeat('b', 600000)")
            .await
            .unwrap_err();
        assert!(
            matches!(err.find_root(), DataFusionError::ResourcesExhausted(_)),
            "{err}"
        );
        assert!(err.to_string().contains("repeat(…) on constants"), "{err}");
        assert!(err.to_string().contains("--query-memory"), "{err}");
        assert!(pool.crowded_out());
        drop(first);
        assert_eq!(shared.reserved(), 0);
        collect(&second, "SELECT repeat('b', 600000)")
            .await
            .unwrap();
        // What a call on constants holds is what it made, not its bound:
        // 100 specifiers could write 6,400 bytes, these write 400.
        let (third, _) = context_in(&shared);
        drop(second);
        collect(
            &third,
            "SELECT to_char(DATE '2000-01-01', repeat('%Y', 100))",
        )
        .await
        .unwrap();
        assert!(shared.reserved() < 1000, "{}", shared.reserved());
    }
}
