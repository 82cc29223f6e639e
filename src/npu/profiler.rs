//! The profiler: records every launch's cost, keeps per-operator and per-step totals, and
//! renders them as a text table and as a Chrome trace (JSON that opens in Perfetto).
//!
//! Owns accumulation, the bounded trace buffer and the two output formats. It must not know how
//! costs are computed or what a step means to the caller: the caller decides when a step ends by
//! calling [`Profiler::take_step`].

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::time::Instant;

use serde::Serialize;

use super::cost::LaunchCost;

/// Totals of one operator over the profiler's life (or since [`Profiler::reset`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OpTotals {
    /// Launches.
    pub launches: u64,
    /// Emulated device time, µs.
    pub device_us: f64,
    /// Host CPU (wall) time spent computing the results, µs.
    pub cpu_us: f64,
    /// Useful flops.
    pub flops: f64,
    /// HBM bytes read + written.
    pub bytes: u64,
    /// Energy, J.
    pub energy_j: f64,
    /// Largest workspace of one launch, bytes.
    pub peak_workspace_bytes: u64,
}

impl OpTotals {
    fn add(&mut self, c: &LaunchCost, cpu_us: f64) {
        self.launches += 1;
        self.device_us += c.device_us;
        self.cpu_us += cpu_us;
        self.flops += c.flops;
        self.bytes += c.bytes_read + c.bytes_written;
        self.energy_j += c.energy_j;
        self.peak_workspace_bytes = self.peak_workspace_bytes.max(c.workspace_bytes);
    }
}

/// One launch as kept for the trace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LaunchRecord {
    /// Cost of the launch.
    pub cost: LaunchCost,
    /// Start on the emulated device timeline, µs since the profiler started.
    pub device_start_us: f64,
    /// Start on the host, µs since the profiler started.
    pub cpu_start_us: f64,
    /// Host time spent, µs.
    pub cpu_us: f64,
}

/// Accumulates launch costs.
#[derive(Debug)]
pub struct Profiler {
    origin: Instant,
    device_clock_us: f64,
    per_op: BTreeMap<&'static str, OpTotals>,
    step: OpTotals,
    trace: VecDeque<LaunchRecord>,
    trace_capacity: usize,
    dropped: u64,
}

/// Default number of launches kept for the trace.
pub const DEFAULT_TRACE_CAPACITY: usize = 65_536;

impl Default for Profiler {
    fn default() -> Self {
        Self::new(DEFAULT_TRACE_CAPACITY)
    }
}

impl Profiler {
    /// A profiler that keeps the last `trace_capacity` launches for the trace (0: none).
    pub fn new(trace_capacity: usize) -> Self {
        Self {
            origin: Instant::now(),
            device_clock_us: 0.0,
            per_op: BTreeMap::new(),
            step: OpTotals::default(),
            trace: VecDeque::new(),
            trace_capacity,
            dropped: 0,
        }
    }

    /// Records one launch that started on the host at `cpu_start` and took `cpu_us`.
    pub fn record(&mut self, cost: LaunchCost, cpu_start: Instant, cpu_us: f64) {
        self.per_op.entry(cost.op).or_default().add(&cost, cpu_us);
        self.step.add(&cost, cpu_us);
        let device_start_us = self.device_clock_us;
        self.device_clock_us += cost.device_us;
        if self.trace_capacity == 0 {
            return;
        }
        if self.trace.len() == self.trace_capacity {
            self.trace.pop_front();
            self.dropped += 1;
        }
        let cpu_start_us = cpu_start
            .saturating_duration_since(self.origin)
            .as_secs_f64()
            * 1e6;
        self.trace.push_back(LaunchRecord {
            cost,
            device_start_us,
            cpu_start_us,
            cpu_us,
        });
    }

    /// Totals since the last `take_step` (device time, energy, ...), and starts a new step.
    pub fn take_step(&mut self) -> OpTotals {
        std::mem::take(&mut self.step)
    }

    /// Totals since the last `take_step`, without resetting them.
    pub fn step_snapshot(&self) -> OpTotals {
        self.step.clone()
    }

    /// Per-operator totals, sorted by operator name.
    pub fn per_op(&self) -> &BTreeMap<&'static str, OpTotals> {
        &self.per_op
    }

    /// Sum over all operators.
    pub fn grand_total(&self) -> OpTotals {
        let mut t = OpTotals::default();
        for o in self.per_op.values() {
            t.launches += o.launches;
            t.device_us += o.device_us;
            t.cpu_us += o.cpu_us;
            t.flops += o.flops;
            t.bytes += o.bytes;
            t.energy_j += o.energy_j;
            t.peak_workspace_bytes = t.peak_workspace_bytes.max(o.peak_workspace_bytes);
        }
        t
    }

    /// Launches kept for the trace, oldest first.
    pub fn launches(&self) -> impl Iterator<Item = &LaunchRecord> {
        self.trace.iter()
    }

    /// Clears everything.
    pub fn reset(&mut self) {
        *self = Self::new(self.trace_capacity);
    }

    /// Per-operator table, busiest (by device time) first, with a total line.
    pub fn table(&self) -> String {
        let mut rows: Vec<_> = self.per_op.iter().collect();
        rows.sort_by(|a, b| b.1.device_us.total_cmp(&a.1.device_us));
        let total = self.grand_total();
        let mut s = String::new();
        // Writing to a String cannot fail; the results are ignored on purpose.
        let _ = writeln!(
            s,
            "{:<24} {:>8} {:>12} {:>6} {:>12} {:>10} {:>12} {:>12} {:>10} {:>10}",
            "op",
            "launches",
            "device_us",
            "dev%",
            "cpu_us",
            "TFLOP/s",
            "GB",
            "energy_mJ",
            "avg_W",
            "ws_KiB"
        );
        let line = |s: &mut String, name: &str, o: &OpTotals| {
            let pct = if total.device_us > 0.0 {
                100.0 * o.device_us / total.device_us
            } else {
                0.0
            };
            let tflops = if o.device_us > 0.0 {
                o.flops / (o.device_us * 1e-6) / 1e12
            } else {
                0.0
            };
            let watts = if o.device_us > 0.0 {
                o.energy_j / (o.device_us * 1e-6)
            } else {
                0.0
            };
            let _ = writeln!(
                s,
                "{:<24} {:>8} {:>12.2} {:>6.1} {:>12.1} {:>10.2} {:>12.4} {:>12.4} {:>10.1} {:>10.1}",
                name,
                o.launches,
                o.device_us,
                pct,
                o.cpu_us,
                tflops,
                o.bytes as f64 / 1e9,
                o.energy_j * 1e3,
                watts,
                o.peak_workspace_bytes as f64 / 1024.0
            );
        };
        for (name, o) in rows {
            line(&mut s, name, o);
        }
        line(&mut s, "TOTAL", &total);
        s
    }

    /// Chrome trace JSON: process 1 is the emulated device timeline (launches back to back),
    /// process 2 is host CPU time. Opens in Perfetto or chrome://tracing.
    pub fn chrome_trace_json(&self) -> String {
        let mut events = Vec::with_capacity(self.trace.len() * 2 + 4);
        for (pid, name) in [(1, "emulated device"), (2, "host cpu")] {
            events.push(serde_json::json!({
                "name": "process_name", "ph": "M", "pid": pid, "tid": 1,
                "args": { "name": name }
            }));
        }
        for r in &self.trace {
            let c = &r.cost;
            let args = serde_json::json!({
                "flops": c.flops, "cube_flops": c.cube_flops, "vector_ops": c.vector_ops,
                "bytes_read": c.bytes_read, "bytes_written": c.bytes_written,
                "tiles_per_core": c.tiles_per_core, "cores_used": c.cores_used,
                "mte_us": c.mte_us, "cube_us": c.cube_us, "vector_us": c.vector_us,
                "fill_us": c.fill_us, "energy_mj": c.energy_j * 1e3, "avg_w": c.avg_watts(),
                "workspace_bytes": c.workspace_bytes,
            });
            events.push(serde_json::json!({
                "name": c.op, "cat": "npu", "ph": "X", "pid": 1, "tid": 1,
                "ts": r.device_start_us, "dur": c.device_us, "args": args,
            }));
            events.push(serde_json::json!({
                "name": c.op, "cat": "cpu", "ph": "X", "pid": 2, "tid": 1,
                "ts": r.cpu_start_us, "dur": r.cpu_us,
            }));
        }
        serde_json::json!({
            "traceEvents": events,
            "displayTimeUnit": "ns",
            "otherData": { "dropped_launches": self.dropped },
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(op: &'static str, us: f64) -> LaunchCost {
        LaunchCost {
            op,
            flops: 1e6,
            cube_flops: 1e6,
            vector_ops: 0.0,
            bytes_read: 100,
            bytes_written: 50,
            tiles_per_core: 1,
            cores_used: 1,
            mte_us: 0.0,
            cube_us: us,
            vector_us: 0.0,
            fill_us: 0.0,
            busy_us: us,
            device_us: us,
            energy_j: us * 1e-4,
            workspace_bytes: 10,
        }
    }

    #[test]
    fn step_totals_reset_but_op_totals_do_not() {
        let mut p = Profiler::new(2);
        p.record(cost("a", 2.0), Instant::now(), 1.0);
        p.record(cost("b", 3.0), Instant::now(), 1.0);
        let s = p.take_step();
        assert_eq!(s.launches, 2);
        assert!((s.device_us - 5.0).abs() < 1e-12);
        p.record(cost("a", 4.0), Instant::now(), 1.0);
        assert_eq!(p.step_snapshot().launches, 1);
        assert_eq!(p.per_op()["a"].launches, 2);
        assert_eq!(p.grand_total().bytes, 450);
        // Capacity 2: the oldest launch left the trace.
        assert_eq!(p.launches().count(), 2);
        let t = p.table();
        assert!(t.contains("TOTAL") && t.lines().count() == 4, "{t}");
    }

    #[test]
    fn chrome_trace_is_valid_json_with_back_to_back_device_events() {
        let mut p = Profiler::default();
        p.record(cost("a", 2.0), Instant::now(), 1.0);
        p.record(cost("b", 3.0), Instant::now(), 1.0);
        let v: serde_json::Value = serde_json::from_str(&p.chrome_trace_json()).unwrap();
        let ev = v["traceEvents"].as_array().unwrap();
        let dev: Vec<_> = ev
            .iter()
            .filter(|e| e["pid"] == 1 && e["ph"] == "X")
            .collect();
        assert_eq!(dev.len(), 2);
        assert_eq!(dev[1]["ts"].as_f64().unwrap(), 2.0);
    }
}
