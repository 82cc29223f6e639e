//! Mixture-of-experts routing in DeepSeek-V3 form, token dispatch (grouping token copies by
//! expert for the grouped matmul) and combine (weighted sum back per token).
//!
//! Owns gating numerics: sigmoid (or softmax) scores, `e_score_correction_bias` added for
//! selection only, group score = sum of the top-2 biased scores of each group, keep `topk_group`
//! of `n_group` groups, top-k experts among them, weights = unbiased scores (normalised if asked)
//! times `routed_scaling_factor`. Ties break toward the lower index. It must not know expert
//! weights, costs or devices.

use crate::npu::error::{Result, arg_err, check_len, shape_err};

/// How router logits become scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    /// DeepSeek-V3: `sigmoid(logit)`.
    Sigmoid,
    /// DeepSeek-V2 style: softmax over experts.
    Softmax,
}

/// Router configuration (names follow the DeepSeek-V3 config).
#[derive(Debug, Clone, PartialEq)]
pub struct GateConfig {
    /// Routed experts (`n_routed_experts`).
    pub n_routed_experts: usize,
    /// Experts per token (`num_experts_per_tok`).
    pub top_k: usize,
    /// Expert groups (`n_group`); must divide `n_routed_experts`.
    pub n_group: usize,
    /// Groups kept per token (`topk_group`).
    pub topk_group: usize,
    /// Normalise the selected weights to sum 1 (`norm_topk_prob`).
    pub norm_topk_prob: bool,
    /// Final multiplier (`routed_scaling_factor`).
    pub routed_scaling_factor: f32,
    /// Scoring function.
    pub scoring: ScoringFunc,
}

impl GateConfig {
    fn validate(&self) -> Result<()> {
        const OP: &str = "moe_gate";
        let c = self;
        if c.n_routed_experts == 0
            || c.n_group == 0
            || !c.n_routed_experts.is_multiple_of(c.n_group)
        {
            return Err(arg_err(
                OP,
                "n_group",
                format!(
                    "{} must be > 0 and divide n_routed_experts {}",
                    c.n_group, c.n_routed_experts
                ),
            ));
        }
        if c.topk_group == 0 || c.topk_group > c.n_group {
            return Err(arg_err(
                OP,
                "topk_group",
                format!("{} must be in 1..=n_group({})", c.topk_group, c.n_group),
            ));
        }
        let per_group = c.n_routed_experts / c.n_group;
        if c.top_k == 0 || c.top_k > c.topk_group * per_group {
            return Err(arg_err(
                OP,
                "top_k",
                format!(
                    "{} must be in 1..=topk_group x experts_per_group ({})",
                    c.top_k,
                    c.topk_group * per_group
                ),
            ));
        }
        if !c.routed_scaling_factor.is_finite() {
            return Err(arg_err(OP, "routed_scaling_factor", "must be finite"));
        }
        Ok(())
    }
}

/// Routing of a batch: for token `t`, slot `s`: expert `experts[t*top_k+s]` with weight
/// `weights[t*top_k+s]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Tokens routed.
    pub tokens: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Chosen experts, in selection order (highest biased score first).
    pub experts: Vec<u32>,
    /// Combine weights.
    pub weights: Vec<f32>,
}

impl Routing {
    /// Checks the slot arrays agree with `tokens x top_k` (the fields are public).
    fn validate(&self, op: &'static str) -> Result<()> {
        let slots = self.tokens * self.top_k;
        if self.top_k == 0 && self.tokens > 0 {
            return Err(arg_err(op, "routing.top_k", "must be > 0"));
        }
        check_len(
            op,
            "routing.experts",
            self.experts.len(),
            slots,
            "tokens x top_k",
        )?;
        check_len(
            op,
            "routing.weights",
            self.weights.len(),
            slots,
            "tokens x top_k",
        )
    }
}

/// Indices of the `k` largest values, largest first, ties to the lower index.
fn top_k_indices(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Routes `logits[tokens, n_routed_experts]` with `bias[n_routed_experts]`
/// (`e_score_correction_bias`; pass zeros when the model has none).
pub fn moe_gate(logits: &[f32], tokens: usize, bias: &[f32], cfg: &GateConfig) -> Result<Routing> {
    const OP: &str = "moe_gate";
    cfg.validate()?;
    let e = cfg.n_routed_experts;
    check_len(
        OP,
        "logits",
        logits.len(),
        tokens * e,
        &format!("tokens({tokens}) x n_routed_experts({e})"),
    )?;
    check_len(OP, "bias", bias.len(), e, "n_routed_experts")?;
    let per_group = e / cfg.n_group;
    let mut experts = Vec::with_capacity(tokens * cfg.top_k);
    let mut weights = Vec::with_capacity(tokens * cfg.top_k);
    let mut scores = vec![0.0f32; e];
    let mut biased = vec![0.0f32; e];
    for t in 0..tokens {
        let row = &logits[t * e..(t + 1) * e];
        match cfg.scoring {
            ScoringFunc::Sigmoid => {
                for (s, x) in scores.iter_mut().zip(row) {
                    *s = 1.0 / (1.0 + (-x).exp());
                }
            }
            ScoringFunc::Softmax => {
                let m = row.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
                let mut z = 0.0;
                for (s, x) in scores.iter_mut().zip(row) {
                    *s = (x - m).exp();
                    z += *s;
                }
                scores.iter_mut().for_each(|s| *s /= z);
            }
        }
        for ((b, s), c) in biased.iter_mut().zip(&scores).zip(bias) {
            *b = s + c;
        }
        let group_scores: Vec<f32> = biased
            .chunks(per_group)
            .map(|g| {
                top_k_indices(g, 2.min(per_group))
                    .iter()
                    .map(|&i| g[i])
                    .sum()
            })
            .collect();
        let kept = top_k_indices(&group_scores, cfg.topk_group);
        let mut masked = vec![f32::NEG_INFINITY; e];
        for g in kept {
            masked[g * per_group..(g + 1) * per_group]
                .copy_from_slice(&biased[g * per_group..(g + 1) * per_group]);
        }
        let chosen = top_k_indices(&masked, cfg.top_k);
        let mut w: Vec<f32> = chosen.iter().map(|&i| scores[i]).collect();
        if cfg.norm_topk_prob {
            let z: f32 = w.iter().sum::<f32>() + 1e-20;
            w.iter_mut().for_each(|x| *x /= z);
        }
        for (i, wi) in chosen.iter().zip(w) {
            experts.push(*i as u32);
            weights.push(wi * cfg.routed_scaling_factor);
        }
    }
    Ok(Routing {
        tokens,
        top_k: cfg.top_k,
        experts,
        weights,
    })
}

/// Token copies grouped by expert, ready for [`super::matmul::grouped_linear`].
#[derive(Debug, Clone, PartialEq)]
pub struct Dispatch {
    /// `[n_experts + 1]` row offsets of each expert's rows in `rows`.
    pub offsets: Vec<usize>,
    /// `[tokens * top_k, hidden]` token copies, expert-major.
    pub rows: Vec<f32>,
    /// For each row of `rows`, the routing slot `t * top_k + s` it came from.
    pub source: Vec<usize>,
    /// Hidden size.
    pub hidden: usize,
}

/// Groups the token rows of `x[tokens, hidden]` by expert (stable: token order within an expert).
pub fn moe_dispatch(
    x: &[f32],
    hidden: usize,
    routing: &Routing,
    n_experts: usize,
) -> Result<Dispatch> {
    const OP: &str = "moe_dispatch";
    routing.validate(OP)?;
    let t = routing.tokens;
    check_len(
        OP,
        "x",
        x.len(),
        t * hidden,
        &format!("routing.tokens({t}) x hidden({hidden})"),
    )?;
    if let Some(bad) = routing.experts.iter().find(|&&e| e as usize >= n_experts) {
        return Err(shape_err(
            OP,
            format!("routing names expert {bad} but n_experts is {n_experts}"),
        ));
    }
    let mut counts = vec![0usize; n_experts + 1];
    for &e in &routing.experts {
        counts[e as usize + 1] += 1;
    }
    for i in 1..=n_experts {
        counts[i] += counts[i - 1];
    }
    let offsets = counts.clone();
    let mut next = counts;
    let n = routing.experts.len();
    let mut rows = vec![0.0f32; n * hidden];
    let mut source = vec![0usize; n];
    for (slot, &e) in routing.experts.iter().enumerate() {
        let r = next[e as usize];
        next[e as usize] += 1;
        let tok = slot / routing.top_k;
        rows[r * hidden..(r + 1) * hidden].copy_from_slice(&x[tok * hidden..(tok + 1) * hidden]);
        source[r] = slot;
    }
    Ok(Dispatch {
        offsets,
        rows,
        source,
        hidden,
    })
}

/// `out[t] = sum_s weights[t, s] * expert_out[row of (t, s)]`, `expert_out` in dispatch order
/// with width `out_dim`.
pub fn moe_combine(
    expert_out: &[f32],
    out_dim: usize,
    dispatch: &Dispatch,
    routing: &Routing,
) -> Result<Vec<f32>> {
    const OP: &str = "moe_combine";
    let n = dispatch.source.len();
    check_len(
        OP,
        "expert_out",
        expert_out.len(),
        n * out_dim,
        &format!("dispatched rows({n}) x out_dim({out_dim})"),
    )?;
    routing.validate(OP)?;
    if dispatch.source.iter().any(|&slot| slot >= n) {
        return Err(shape_err(
            OP,
            format!("dispatch.source names a slot >= {n}"),
        ));
    }
    if routing.weights.len() != n {
        return Err(shape_err(
            OP,
            format!(
                "routing has {} slots, dispatch has {n} rows",
                routing.weights.len()
            ),
        ));
    }
    let mut out = vec![0.0f32; routing.tokens * out_dim];
    // Accumulate per token in slot order so the result does not depend on expert order.
    let mut row_of_slot = vec![0usize; n];
    for (r, &slot) in dispatch.source.iter().enumerate() {
        row_of_slot[slot] = r;
    }
    for (slot, &r) in row_of_slot.iter().enumerate() {
        let tok = slot / routing.top_k;
        super::simd::axpy(
            &mut out[tok * out_dim..(tok + 1) * out_dim],
            routing.weights[slot],
            &expert_out[r * out_dim..(r + 1) * out_dim],
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> GateConfig {
        GateConfig {
            n_routed_experts: 16,
            top_k: 3,
            n_group: 4,
            topk_group: 2,
            norm_topk_prob: true,
            routed_scaling_factor: 2.5,
            scoring: ScoringFunc::Sigmoid,
        }
    }

    /// Straightforward f64 DeepSeek-V3 routing: enumerate groups, sort, pick.
    fn reference(logits: &[f32], bias: &[f32], c: &GateConfig) -> (Vec<u32>, Vec<f64>) {
        let e = c.n_routed_experts;
        let pg = e / c.n_group;
        let s: Vec<f64> = logits
            .iter()
            .map(|&x| 1.0 / (1.0 + (-f64::from(x)).exp()))
            .collect();
        let b: Vec<f64> = s.iter().zip(bias).map(|(a, b)| a + f64::from(*b)).collect();
        let mut groups: Vec<(f64, usize)> = (0..c.n_group)
            .map(|g| {
                let mut v: Vec<f64> = b[g * pg..(g + 1) * pg].to_vec();
                v.sort_by(|x, y| y.total_cmp(x));
                (v[0] + v.get(1).copied().unwrap_or(0.0), g)
            })
            .collect();
        groups.sort_by(|x, y| y.0.total_cmp(&x.0));
        let mut cand: Vec<(f64, usize)> = groups[..c.topk_group]
            .iter()
            .flat_map(|&(_, g)| (g * pg..(g + 1) * pg).map(|i| (b[i], i)))
            .collect();
        cand.sort_by(|x, y| y.0.total_cmp(&x.0));
        let chosen: Vec<usize> = cand[..c.top_k].iter().map(|x| x.1).collect();
        let z: f64 = chosen.iter().map(|&i| s[i]).sum();
        let w = chosen
            .iter()
            .map(|&i| s[i] / z * f64::from(c.routed_scaling_factor))
            .collect();
        (chosen.iter().map(|&i| i as u32).collect(), w)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn gate_picks_reference_experts(logits in proptest::collection::vec(-4.0f32..4.0, 16 * 3),
                                        bias in proptest::collection::vec(-0.3f32..0.3, 16)) {
            let c = cfg();
            let r = moe_gate(&logits, 3, &bias, &c).unwrap();
            for t in 0..3 {
                let (ex, w) = reference(&logits[t * 16..(t + 1) * 16], &bias, &c);
                prop_assert_eq!(&r.experts[t * 3..(t + 1) * 3], &ex[..]);
                for (a, b) in r.weights[t * 3..(t + 1) * 3].iter().zip(&w) {
                    prop_assert!((f64::from(*a) - b).abs() < 1e-5);
                }
            }
        }
    }

    #[test]
    fn group_limit_excludes_strong_expert_in_weak_group() {
        let c = GateConfig {
            n_routed_experts: 8,
            top_k: 2,
            n_group: 4,
            topk_group: 1,
            norm_topk_prob: false,
            routed_scaling_factor: 1.0,
            scoring: ScoringFunc::Sigmoid,
        };
        // Group 0 = {0,1}: 3.0 and -3.0 (sum of top-2 small); group 1 = {2,3}: 2.0 and 2.0.
        let logits = [3.0, -3.0, 2.0, 2.1, -5.0, -5.0, -5.0, -5.0];
        let r = moe_gate(&logits, 1, &[0.0; 8], &c).unwrap();
        assert_eq!(r.experts, vec![3, 2]);
        // Bias changes selection but not the weights.
        let mut bias = [0.0; 8];
        bias[2] = 0.5;
        let r2 = moe_gate(&logits, 1, &bias, &c).unwrap();
        assert_eq!(r2.experts, vec![2, 3]);
        assert!((r2.weights[0] - 1.0 / (1.0 + (-2.0f32).exp())).abs() < 1e-7);
    }

    #[test]
    fn dispatch_then_combine_is_weighted_sum() {
        let c = cfg();
        let (t, h) = (5, 6);
        let logits: Vec<f32> = (0..t * 16)
            .map(|i| ((i * 37 % 29) as f32 - 14.0) / 5.0)
            .collect();
        let r = moe_gate(&logits, t, &[0.0; 16], &c).unwrap();
        let x: Vec<f32> = (0..t * h).map(|i| i as f32).collect();
        let d = moe_dispatch(&x, h, &r, 16).unwrap();
        assert_eq!(*d.offsets.last().unwrap(), t * 3);
        // Expert "f(x) = (e+1) * x" applied per row.
        let mut y = d.rows.clone();
        for e in 0..16 {
            for row in d.offsets[e]..d.offsets[e + 1] {
                y[row * h..(row + 1) * h]
                    .iter_mut()
                    .for_each(|v| *v *= (e + 1) as f32);
            }
        }
        let out = moe_combine(&y, h, &d, &r).unwrap();
        for tok in 0..t {
            for j in 0..h {
                let e: f32 = (0..3)
                    .map(|s| {
                        r.weights[tok * 3 + s]
                            * (r.experts[tok * 3 + s] + 1) as f32
                            * x[tok * h + j]
                    })
                    .sum();
                assert!((out[tok * h + j] - e).abs() < 1e-4 * (1.0 + e.abs()));
            }
        }
        assert!(moe_dispatch(&x, h, &r, 4).is_err());
        let mut bad = r.clone();
        bad.top_k = 0;
        assert!(moe_dispatch(&x, h, &bad, 16).is_err());
        assert!(moe_combine(&y, h, &d, &bad).is_err());
    }

    #[test]
    fn config_errors_name_the_field() {
        let mut c = cfg();
        c.n_group = 3;
        assert!(
            moe_gate(&[0.0; 16], 1, &[0.0; 16], &c)
                .unwrap_err()
                .to_string()
                .contains("n_group")
        );
        let mut c = cfg();
        c.top_k = 9;
        assert!(
            moe_gate(&[0.0; 16], 1, &[0.0; 16], &c)
                .unwrap_err()
                .to_string()
                .contains("top_k")
        );
    }
}
