//! OTLP metrics → one table per data-point type.
//!
//! | OTLP data | table |
//! |---|---|
//! | Gauge | `metrics_gauge` |
//! | Sum | `metrics_sum` |
//! | Histogram | `metrics_histogram` |
//! | ExponentialHistogram | `metrics_exponential_histogram` |
//! | Summary | `metrics_summary` |
//!
//! Every table starts with the same columns (time, service, metric name /
//! description / unit, point attributes, resource, scope, flags); each adds
//! the fields of its point type, bucket arrays as Arrow lists. Columns are
//! documented in the README ("Tables").
//!
//! A point without a time, without a value, or with bucket counts that do not
//! fit its bounds is rejected alone and reported through OTLP
//! `partial_success`; absurd nesting fails the request.

use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, ListBuilder,
    StringBuilder, TimestampNanosecondBuilder, UInt32Builder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::{
    exemplar, exponential_histogram_data_point::Buckets, metric::Data, number_data_point,
    AggregationTemporality, Exemplar, ExponentialHistogramDataPoint, HistogramDataPoint, Metric,
    NumberDataPoint, SummaryDataPoint,
};

use super::json::{self, ValueError};
use super::otlp_trace::{non_empty, ns, resource_ctx, ts_type, Error};

pub const GAUGE: &str = "metrics_gauge";
pub const SUM: &str = "metrics_sum";
pub const HISTOGRAM: &str = "metrics_histogram";
pub const EXP_HISTOGRAM: &str = "metrics_exponential_histogram";
pub const SUMMARY: &str = "metrics_summary";
/// Every metrics table, in the order [`MetricRows::tables`] lists them.
pub const TABLES: [&str; 5] = [GAUGE, SUM, HISTOGRAM, EXP_HISTOGRAM, SUMMARY];
/// The WAL endpoint of a metrics export (it feeds all of [`TABLES`]).
pub const METRICS: &str = "metrics";

fn common_fields(exemplars: bool) -> Vec<Field> {
    let s = |n: &str| Field::new(n, DataType::Utf8, false);
    let ns = |n: &str| Field::new(n, DataType::Utf8, true);
    let mut f = vec![
        Field::new("timestamp", ts_type(), false),
        Field::new("start_timestamp", ts_type(), true),
        s("service_name"),
        s("metric_name"),
        ns("metric_description"),
        ns("metric_unit"),
        s("attributes_json"),
        s("resource_attributes_json"),
        ns("scope_name"),
        ns("scope_version"),
        Field::new("flags", DataType::UInt32, false),
    ];
    if exemplars {
        f.push(s("exemplars_json"));
    }
    f
}

fn list(item: DataType) -> DataType {
    DataType::List(Arc::new(Field::new_list_field(item, true)))
}

fn table_schema(exemplars: bool, extra: Vec<Field>) -> SchemaRef {
    let mut f = common_fields(exemplars);
    f.extend(extra);
    Arc::new(Schema::new(f))
}

fn temporality_field() -> Field {
    Field::new("aggregation_temporality", DataType::Utf8, false)
}

fn stats_fields() -> Vec<Field> {
    vec![
        Field::new("count", DataType::UInt64, false),
        Field::new("sum", DataType::Float64, true),
        Field::new("min", DataType::Float64, true),
        Field::new("max", DataType::Float64, true),
    ]
}

static GAUGE_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    table_schema(
        true,
        vec![
            Field::new("value", DataType::Float64, false),
            Field::new("value_int", DataType::Int64, true),
        ],
    )
});

static SUM_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    table_schema(
        true,
        vec![
            Field::new("value", DataType::Float64, false),
            Field::new("value_int", DataType::Int64, true),
            temporality_field(),
            Field::new("is_monotonic", DataType::Boolean, false),
        ],
    )
});

static HISTOGRAM_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut extra = stats_fields();
    extra.extend([
        Field::new("bucket_counts", list(DataType::UInt64), false),
        Field::new("explicit_bounds", list(DataType::Float64), false),
        temporality_field(),
    ]);
    table_schema(true, extra)
});

static EXP_HISTOGRAM_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut extra = stats_fields();
    extra.extend([
        Field::new("scale", DataType::Int32, false),
        Field::new("zero_count", DataType::UInt64, false),
        Field::new("zero_threshold", DataType::Float64, false),
        Field::new("positive_offset", DataType::Int32, false),
        Field::new("positive_bucket_counts", list(DataType::UInt64), false),
        Field::new("negative_offset", DataType::Int32, false),
        Field::new("negative_bucket_counts", list(DataType::UInt64), false),
        temporality_field(),
    ]);
    table_schema(true, extra)
});

static SUMMARY_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    table_schema(
        false,
        vec![
            Field::new("count", DataType::UInt64, false),
            Field::new("sum", DataType::Float64, false),
            Field::new("quantiles", list(DataType::Float64), false),
            Field::new("quantile_values", list(DataType::Float64), false),
        ],
    )
});

/// The schema of a metrics table.
pub fn schema(endpoint: &str) -> Option<SchemaRef> {
    Some(match endpoint {
        GAUGE => GAUGE_SCHEMA.clone(),
        SUM => SUM_SCHEMA.clone(),
        HISTOGRAM => HISTOGRAM_SCHEMA.clone(),
        EXP_HISTOGRAM => EXP_HISTOGRAM_SCHEMA.clone(),
        SUMMARY => SUMMARY_SCHEMA.clone(),
        _ => return None,
    })
}

/// Number of data points in a request.
pub fn count(req: &ExportMetricsServiceRequest) -> usize {
    req.resource_metrics
        .iter()
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .map(points)
        .sum()
}

/// Number of data points of one metric.
fn points(m: &Metric) -> usize {
    match &m.data {
        Some(Data::Gauge(g)) => g.data_points.len(),
        Some(Data::Sum(s)) => s.data_points.len(),
        Some(Data::Histogram(h)) => h.data_points.len(),
        Some(Data::ExponentialHistogram(h)) => h.data_points.len(),
        Some(Data::Summary(s)) => s.data_points.len(),
        None => 0,
    }
}

pub struct MetricRows {
    /// Non-empty tables only.
    pub tables: Vec<(&'static str, RecordBatch)>,
    pub points: usize,
    /// Points refused individually (reported via partial_success).
    pub rejected: u64,
    pub reject_reason: Option<String>,
}

/// What every point of one metric shares.
struct MetricCtx<'a> {
    service: &'a str,
    res_json: &'a str,
    scope_name: Option<&'a str>,
    scope_version: Option<&'a str>,
    name: &'a str,
    description: Option<&'a str>,
    unit: Option<&'a str>,
}

/// The per-point part of the common columns.
struct PointCommon<'a> {
    time: u64,
    start: u64,
    attrs: &'a [KeyValue],
    flags: u32,
    exemplars: &'a [Exemplar],
}

/// The common part of a data point (every point type names these fields alike).
macro_rules! point_common {
    ($p:expr, $exemplars:expr) => {
        PointCommon {
            time: $p.time_unix_nano,
            start: $p.start_time_unix_nano,
            attrs: &$p.attributes,
            flags: $p.flags,
            exemplars: $exemplars,
        }
    };
}

#[derive(Default)]
struct Common {
    timestamp: TimestampNanosecondBuilder,
    start: TimestampNanosecondBuilder,
    service_name: StringBuilder,
    metric_name: StringBuilder,
    description: StringBuilder,
    unit: StringBuilder,
    attributes_json: StringBuilder,
    resource_attributes_json: StringBuilder,
    scope_name: StringBuilder,
    scope_version: StringBuilder,
    flags: UInt32Builder,
    exemplars_json: StringBuilder,
    rows: usize,
}

impl Common {
    fn append(&mut self, m: &MetricCtx, p: &PointCommon) -> Result<(), ValueError> {
        let attrs = json::attrs_to_string(p.attrs)?;
        let exemplars = exemplars_json(p.exemplars)?;
        self.timestamp.append_value(ns(p.time));
        self.start
            .append_option((p.start != 0).then(|| ns(p.start)));
        self.service_name.append_value(m.service);
        self.metric_name.append_value(m.name);
        self.description.append_option(m.description);
        self.unit.append_option(m.unit);
        self.attributes_json.append_value(&attrs);
        self.resource_attributes_json.append_value(m.res_json);
        self.scope_name.append_option(m.scope_name);
        self.scope_version.append_option(m.scope_version);
        self.flags.append_value(p.flags);
        self.exemplars_json.append_value(&exemplars);
        self.rows += 1;
        Ok(())
    }

    fn finish(&mut self, exemplars: bool) -> Vec<ArrayRef> {
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(self.timestamp.finish().with_timezone("UTC")),
            Arc::new(self.start.finish().with_timezone("UTC")),
            Arc::new(self.service_name.finish()),
            Arc::new(self.metric_name.finish()),
            Arc::new(self.description.finish()),
            Arc::new(self.unit.finish()),
            Arc::new(self.attributes_json.finish()),
            Arc::new(self.resource_attributes_json.finish()),
            Arc::new(self.scope_name.finish()),
            Arc::new(self.scope_version.finish()),
            Arc::new(self.flags.finish()),
        ];
        if exemplars {
            cols.push(Arc::new(self.exemplars_json.finish()));
        }
        cols
    }
}

/// Exemplar ids are empty or of their OTLP length (as spans' and logs'
/// are; a point with one of another length is rejected).
fn exemplar_ids_ok(exemplars: &[Exemplar]) -> bool {
    exemplars
        .iter()
        .all(|e| matches!(e.trace_id.len(), 0 | 16) && matches!(e.span_id.len(), 0 | 8))
}

fn exemplars_json(exemplars: &[Exemplar]) -> Result<String, ValueError> {
    let mut s = String::from("[");
    for (i, e) in exemplars.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(
            "{{\"timeUnixNano\":{},\"value\":",
            e.time_unix_nano
        ));
        match e.value {
            Some(exemplar::Value::AsDouble(v)) => json::write_f64(&mut s, v),
            Some(exemplar::Value::AsInt(v)) => s.push_str(&v.to_string()),
            None => s.push_str("null"),
        }
        s.push_str(&format!(
            ",\"traceId\":\"{}\",\"spanId\":\"{}\",\"filteredAttributes\":",
            hex::encode(&e.trace_id),
            hex::encode(&e.span_id)
        ));
        json::write_attrs(&mut s, e.filtered_attributes.iter(), 1)?;
        s.push('}');
    }
    s.push(']');
    Ok(s)
}

fn temporality(t: i32) -> &'static str {
    match AggregationTemporality::try_from(t) {
        Ok(AggregationTemporality::Delta) => "DELTA",
        Ok(AggregationTemporality::Cumulative) => "CUMULATIVE",
        _ => "UNSPECIFIED",
    }
}

fn append_list<B, T>(b: &mut ListBuilder<B>, values: &[T])
where
    B: arrow::array::ArrayBuilder + Extend<Option<T>>,
    T: Copy,
{
    b.values().extend(values.iter().map(|v| Some(*v)));
    b.append(true);
}

#[derive(Default)]
struct Numbers {
    c: Common,
    value: Float64Builder,
    value_int: Int64Builder,
    temporality: StringBuilder,
    monotonic: BooleanBuilder,
}

impl Numbers {
    /// False when the point has no value (rejected).
    fn append(
        &mut self,
        m: &MetricCtx,
        p: &NumberDataPoint,
        sum: Option<(i32, bool)>,
    ) -> Result<bool, ValueError> {
        let (value, int) = match p.value {
            Some(number_data_point::Value::AsDouble(v)) => (v, None),
            Some(number_data_point::Value::AsInt(v)) => (v as f64, Some(v)),
            None => return Ok(false),
        };
        self.c.append(m, &point_common!(p, &p.exemplars))?;
        self.value.append_value(value);
        self.value_int.append_option(int);
        if let Some((t, mono)) = sum {
            self.temporality.append_value(temporality(t));
            self.monotonic.append_value(mono);
        }
        Ok(true)
    }

    fn finish(mut self, sum: bool) -> RecordBatch {
        let mut cols = self.c.finish(true);
        cols.push(Arc::new(self.value.finish()));
        cols.push(Arc::new(self.value_int.finish()));
        let schema = if sum {
            cols.push(Arc::new(self.temporality.finish()));
            cols.push(Arc::new(self.monotonic.finish()));
            SUM_SCHEMA.clone()
        } else {
            GAUGE_SCHEMA.clone()
        };
        RecordBatch::try_new(schema, cols).expect("number columns match their schema")
    }
}

#[derive(Default)]
struct Stats {
    count: UInt64Builder,
    sum: Float64Builder,
    min: Float64Builder,
    max: Float64Builder,
}

impl Stats {
    fn append(&mut self, count: u64, sum: Option<f64>, min: Option<f64>, max: Option<f64>) {
        self.count.append_value(count);
        self.sum.append_option(sum);
        self.min.append_option(min);
        self.max.append_option(max);
    }

    fn finish(&mut self, cols: &mut Vec<ArrayRef>) {
        cols.push(Arc::new(self.count.finish()));
        cols.push(Arc::new(self.sum.finish()));
        cols.push(Arc::new(self.min.finish()));
        cols.push(Arc::new(self.max.finish()));
    }
}

#[derive(Default)]
struct Histograms {
    c: Common,
    stats: Stats,
    bucket_counts: ListBuilder<UInt64Builder>,
    bounds: ListBuilder<Float64Builder>,
    temporality: StringBuilder,
}

impl Histograms {
    fn append(
        &mut self,
        m: &MetricCtx,
        p: &HistogramDataPoint,
        t: i32,
    ) -> Result<bool, ValueError> {
        let buckets_fit = p.bucket_counts.len() == p.explicit_bounds.len() + 1
            || (p.bucket_counts.is_empty() && p.explicit_bounds.is_empty());
        if !buckets_fit {
            return Ok(false);
        }
        self.c.append(m, &point_common!(p, &p.exemplars))?;
        self.stats.append(p.count, p.sum, p.min, p.max);
        append_list(&mut self.bucket_counts, &p.bucket_counts);
        append_list(&mut self.bounds, &p.explicit_bounds);
        self.temporality.append_value(temporality(t));
        Ok(true)
    }

    fn finish(mut self) -> RecordBatch {
        let mut cols = self.c.finish(true);
        self.stats.finish(&mut cols);
        cols.push(Arc::new(self.bucket_counts.finish()));
        cols.push(Arc::new(self.bounds.finish()));
        cols.push(Arc::new(self.temporality.finish()));
        RecordBatch::try_new(HISTOGRAM_SCHEMA.clone(), cols)
            .expect("histogram columns match their schema")
    }
}

#[derive(Default)]
struct ExpHistograms {
    c: Common,
    stats: Stats,
    scale: Int32Builder,
    zero_count: UInt64Builder,
    zero_threshold: Float64Builder,
    pos_offset: Int32Builder,
    pos_counts: ListBuilder<UInt64Builder>,
    neg_offset: Int32Builder,
    neg_counts: ListBuilder<UInt64Builder>,
    temporality: StringBuilder,
}

impl ExpHistograms {
    fn append(
        &mut self,
        m: &MetricCtx,
        p: &ExponentialHistogramDataPoint,
        t: i32,
    ) -> Result<(), ValueError> {
        self.c.append(m, &point_common!(p, &p.exemplars))?;
        self.stats.append(p.count, p.sum, p.min, p.max);
        self.scale.append_value(p.scale);
        self.zero_count.append_value(p.zero_count);
        self.zero_threshold.append_value(p.zero_threshold);
        let empty = Buckets::default();
        for (offset, counts, b) in [
            (&mut self.pos_offset, &mut self.pos_counts, &p.positive),
            (&mut self.neg_offset, &mut self.neg_counts, &p.negative),
        ] {
            let b = b.as_ref().unwrap_or(&empty);
            offset.append_value(b.offset);
            append_list(counts, &b.bucket_counts);
        }
        self.temporality.append_value(temporality(t));
        Ok(())
    }

    fn finish(mut self) -> RecordBatch {
        let mut cols = self.c.finish(true);
        self.stats.finish(&mut cols);
        cols.push(Arc::new(self.scale.finish()));
        cols.push(Arc::new(self.zero_count.finish()));
        cols.push(Arc::new(self.zero_threshold.finish()));
        cols.push(Arc::new(self.pos_offset.finish()));
        cols.push(Arc::new(self.pos_counts.finish()));
        cols.push(Arc::new(self.neg_offset.finish()));
        cols.push(Arc::new(self.neg_counts.finish()));
        cols.push(Arc::new(self.temporality.finish()));
        RecordBatch::try_new(EXP_HISTOGRAM_SCHEMA.clone(), cols)
            .expect("exponential histogram columns match their schema")
    }
}

#[derive(Default)]
struct Summaries {
    c: Common,
    count: UInt64Builder,
    sum: Float64Builder,
    quantiles: ListBuilder<Float64Builder>,
    values: ListBuilder<Float64Builder>,
}

impl Summaries {
    fn append(&mut self, m: &MetricCtx, p: &SummaryDataPoint) -> Result<(), ValueError> {
        self.c.append(m, &point_common!(p, &[]))?;
        self.count.append_value(p.count);
        self.sum.append_value(p.sum);
        let q: Vec<f64> = p.quantile_values.iter().map(|q| q.quantile).collect();
        let v: Vec<f64> = p.quantile_values.iter().map(|q| q.value).collect();
        append_list(&mut self.quantiles, &q);
        append_list(&mut self.values, &v);
        Ok(())
    }

    fn finish(mut self) -> RecordBatch {
        let mut cols = self.c.finish(false);
        cols.push(Arc::new(self.count.finish()));
        cols.push(Arc::new(self.sum.finish()));
        cols.push(Arc::new(self.quantiles.finish()));
        cols.push(Arc::new(self.values.finish()));
        RecordBatch::try_new(SUMMARY_SCHEMA.clone(), cols)
            .expect("summary columns match their schema")
    }
}

#[derive(Default)]
struct Builders {
    gauge: Numbers,
    sum: Numbers,
    histogram: Histograms,
    exp: ExpHistograms,
    summary: Summaries,
}

/// Validates and converts a whole request.
pub fn convert(req: &ExportMetricsServiceRequest) -> Result<MetricRows, Error> {
    let mut b = Builders::default();
    let mut rejected = 0u64;
    let mut no_time = 0u64;
    let mut repeated = 0;
    for (ri, rm) in req.resource_metrics.iter().enumerate() {
        let (service, res_json) = resource_ctx(rm.resource.as_ref(), || {
            format!("resource_metrics[{ri}].resource")
        })?;
        for (si, sm) in rm.scope_metrics.iter().enumerate() {
            let scope = sm.scope.as_ref();
            for (mi, metric) in sm.metrics.iter().enumerate() {
                let m = MetricCtx {
                    service,
                    res_json: &res_json,
                    scope_name: scope.map(|s| s.name.as_str()).and_then(non_empty),
                    scope_version: scope.map(|s| s.version.as_str()).and_then(non_empty),
                    name: &metric.name,
                    description: non_empty(&metric.description),
                    unit: non_empty(&metric.unit),
                };
                let nesting = |source| Error::Nesting {
                    at: format!("resource_metrics[{ri}].scope_metrics[{si}].metrics[{mi}]"),
                    source,
                };
                let shared = [m.res_json, m.name]
                    .into_iter()
                    .chain(
                        [m.scope_name, m.scope_version, m.description, m.unit]
                            .into_iter()
                            .flatten(),
                    )
                    .map(str::len)
                    .sum();
                json::repeat_bytes(&mut repeated, shared, points(metric)).map_err(nesting)?;
                let mut keep = |time: u64, ok: Result<bool, ValueError>| -> Result<(), Error> {
                    if time == 0 {
                        no_time += 1;
                    }
                    if !ok.map_err(nesting)? {
                        rejected += 1;
                    }
                    Ok(())
                };
                match &metric.data {
                    Some(Data::Gauge(g)) => {
                        for p in &g.data_points {
                            let ok = p.time_unix_nano != 0 && exemplar_ids_ok(&p.exemplars);
                            keep(
                                p.time_unix_nano,
                                ok_then(ok, || b.gauge.append(&m, p, None)),
                            )?;
                        }
                    }
                    Some(Data::Sum(s)) => {
                        let sum = Some((s.aggregation_temporality, s.is_monotonic));
                        for p in &s.data_points {
                            let ok = p.time_unix_nano != 0 && exemplar_ids_ok(&p.exemplars);
                            keep(p.time_unix_nano, ok_then(ok, || b.sum.append(&m, p, sum)))?;
                        }
                    }
                    Some(Data::Histogram(h)) => {
                        for p in &h.data_points {
                            let ok = p.time_unix_nano != 0 && exemplar_ids_ok(&p.exemplars);
                            let t = h.aggregation_temporality;
                            keep(
                                p.time_unix_nano,
                                ok_then(ok, || b.histogram.append(&m, p, t)),
                            )?;
                        }
                    }
                    Some(Data::ExponentialHistogram(h)) => {
                        for p in &h.data_points {
                            let ok = p.time_unix_nano != 0 && exemplar_ids_ok(&p.exemplars);
                            let t = h.aggregation_temporality;
                            keep(
                                p.time_unix_nano,
                                ok_then(ok, || b.exp.append(&m, p, t).map(|_| true)),
                            )?;
                        }
                    }
                    Some(Data::Summary(s)) => {
                        for p in &s.data_points {
                            let ok = p.time_unix_nano != 0;
                            keep(
                                p.time_unix_nano,
                                ok_then(ok, || b.summary.append(&m, p).map(|_| true)),
                            )?;
                        }
                    }
                    None => {}
                }
            }
        }
    }
    let reject_reason = (rejected > 0).then(|| {
        let other = rejected - no_time;
        let mut why = Vec::new();
        if no_time > 0 {
            why.push(format!("{no_time} without time_unix_nano"));
        }
        if other > 0 {
            why.push(format!(
                "{other} without a value, with bucket_counts not matching explicit_bounds, or with an exemplar trace_id/span_id not 16/8 bytes"
            ));
        }
        format!("{rejected} data point(s) rejected: {}", why.join(", "))
    });
    let mut tables = Vec::new();
    let sizes = [
        b.gauge.c.rows,
        b.sum.c.rows,
        b.histogram.c.rows,
        b.exp.c.rows,
        b.summary.c.rows,
    ];
    let points = sizes.iter().sum();
    let batches = [
        b.gauge.finish(false),
        b.sum.finish(true),
        b.histogram.finish(),
        b.exp.finish(),
        b.summary.finish(),
    ];
    for ((name, n), batch) in TABLES.into_iter().zip(sizes).zip(batches) {
        if n > 0 {
            tables.push((name, batch));
        }
    }
    Ok(MetricRows {
        tables,
        points,
        rejected,
        reject_reason,
    })
}

/// Runs `append` only for a point that passed the common checks.
fn ok_then(
    ok: bool,
    append: impl FnOnce() -> Result<bool, ValueError>,
) -> Result<bool, ValueError> {
    if ok {
        append()
    } else {
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, ListArray};
    use arrow::datatypes::{Float64Type, UInt64Type};
    use opentelemetry_proto::tonic::metrics::v1::{
        summary_data_point::ValueAtQuantile, ExponentialHistogram, Gauge, Histogram, Metric,
        ResourceMetrics, ScopeMetrics, Sum, Summary,
    };

    fn metric(name: &str, data: Data) -> Metric {
        Metric {
            name: name.into(),
            unit: "ms".into(),
            data: Some(data),
            ..Default::default()
        }
    }

    fn request(metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                scope_metrics: vec![ScopeMetrics {
                    metrics,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn num(time: u64, v: Option<number_data_point::Value>) -> NumberDataPoint {
        NumberDataPoint {
            time_unix_nano: time,
            value: v,
            ..Default::default()
        }
    }

    fn u64_list(b: &RecordBatch, col: &str, row: usize) -> Vec<u64> {
        let l = b.column_by_name(col).unwrap().as_any();
        let l = l.downcast_ref::<ListArray>().unwrap().value(row);
        l.as_primitive::<UInt64Type>().values().to_vec()
    }

    #[test]
    fn text_repeated_on_every_point_is_bounded() {
        use number_data_point::Value::AsInt;
        let gauge = |n: u64, description: &str| Metric {
            description: description.into(),
            ..metric(
                "g",
                Data::Gauge(Gauge {
                    data_points: (1..=n).map(|t| num(t, Some(AsInt(1)))).collect(),
                }),
            )
        };
        // A 1 MiB description over 300 points: 300 MiB of copies.
        let err = convert(&request(vec![gauge(300, &"d".repeat(1 << 20))]))
            .err()
            .expect("refused");
        assert!(err.to_string().contains("stored on every item"), "{err}");
        assert!(err
            .to_string()
            .starts_with("resource_metrics[0].scope_metrics[0].metrics[0]"));
        let ok = convert(&request(vec![gauge(20, &"d".repeat(1 << 20))])).unwrap();
        assert_eq!(
            ok.tables.iter().map(|(_, b)| b.num_rows()).sum::<usize>(),
            20
        );
    }

    #[test]
    fn an_exemplar_id_of_the_wrong_length_rejects_its_point() {
        use number_data_point::Value::AsInt;
        let ex = |trace: usize, span: usize| Exemplar {
            trace_id: vec![1; trace],
            span_id: vec![2; span],
            ..Default::default()
        };
        let point = |t, exemplars| NumberDataPoint {
            exemplars,
            ..num(t, Some(AsInt(1)))
        };
        let req = request(vec![metric(
            "g",
            Data::Gauge(Gauge {
                data_points: vec![
                    point(1, vec![ex(16, 8), ex(0, 0)]),
                    point(2, vec![ex(3, 8)]),
                    point(3, vec![ex(16, 9)]),
                ],
            }),
        )]);
        let rows = convert(&req).unwrap();
        assert_eq!((rows.points, rows.rejected), (1, 2));
        assert!(rows
            .reject_reason
            .unwrap()
            .contains("exemplar trace_id/span_id"));
    }

    #[test]
    fn every_point_type_lands_in_its_table() {
        use number_data_point::Value::{AsDouble, AsInt};
        let req = request(vec![
            metric(
                "g",
                Data::Gauge(Gauge {
                    data_points: vec![num(10, Some(AsDouble(1.5))), num(0, Some(AsInt(1)))],
                }),
            ),
            metric(
                "s",
                Data::Sum(Sum {
                    data_points: vec![num(11, Some(AsInt(i64::MAX))), num(12, None)],
                    aggregation_temporality: 2,
                    is_monotonic: true,
                }),
            ),
            metric(
                "h",
                Data::Histogram(Histogram {
                    data_points: vec![
                        HistogramDataPoint {
                            time_unix_nano: 13,
                            count: 3,
                            sum: Some(6.0),
                            bucket_counts: vec![1, 2, 0],
                            explicit_bounds: vec![1.0, 5.0],
                            ..Default::default()
                        },
                        HistogramDataPoint {
                            time_unix_nano: 13,
                            bucket_counts: vec![1],
                            explicit_bounds: vec![1.0, 5.0],
                            ..Default::default()
                        },
                    ],
                    aggregation_temporality: 1,
                }),
            ),
            metric(
                "e",
                Data::ExponentialHistogram(ExponentialHistogram {
                    data_points: vec![ExponentialHistogramDataPoint {
                        time_unix_nano: 14,
                        scale: -2,
                        positive: Some(Buckets {
                            offset: -3,
                            bucket_counts: vec![4, 5],
                        }),
                        ..Default::default()
                    }],
                    aggregation_temporality: 2,
                }),
            ),
            metric(
                "q",
                Data::Summary(Summary {
                    data_points: vec![SummaryDataPoint {
                        time_unix_nano: 15,
                        count: 2,
                        sum: 3.0,
                        quantile_values: vec![ValueAtQuantile {
                            quantile: 0.5,
                            value: 1.25,
                        }],
                        ..Default::default()
                    }],
                }),
            ),
        ]);
        assert_eq!(count(&req), 8);
        let rows = convert(&req).unwrap();
        assert_eq!(rows.rejected, 3);
        assert_eq!(
            rows.reject_reason.as_deref(),
            Some("3 data point(s) rejected: 1 without time_unix_nano, 2 without a value, with bucket_counts not matching explicit_bounds, or with an exemplar trace_id/span_id not 16/8 bytes")
        );
        let names: Vec<_> = rows.tables.iter().map(|t| t.0).collect();
        assert_eq!(names, TABLES);
        assert_eq!(rows.points, 5);
        let t = |n: &str| &rows.tables.iter().find(|t| t.0 == n).unwrap().1;
        let sum = t(SUM);
        assert_eq!(
            sum.column_by_name("value_int")
                .unwrap()
                .as_primitive::<arrow::datatypes::Int64Type>()
                .value(0),
            i64::MAX
        );
        assert_eq!(
            sum.column_by_name("aggregation_temporality")
                .unwrap()
                .as_string::<i32>()
                .value(0),
            "CUMULATIVE"
        );
        assert_eq!(u64_list(t(HISTOGRAM), "bucket_counts", 0), vec![1, 2, 0]);
        assert_eq!(
            u64_list(t(EXP_HISTOGRAM), "positive_bucket_counts", 0),
            vec![4, 5]
        );
        assert!(u64_list(t(EXP_HISTOGRAM), "negative_bucket_counts", 0).is_empty());
        let q = t(SUMMARY).column_by_name("quantile_values").unwrap();
        let q = q.as_any().downcast_ref::<ListArray>().unwrap().value(0);
        assert_eq!(q.as_primitive::<Float64Type>().value(0), 1.25);
        for (name, batch) in &rows.tables {
            assert_eq!(batch.schema(), schema(name).unwrap());
        }
    }
}
