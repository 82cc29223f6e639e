//! Ascend C style tiling: how a launch's work is cut into tiles that fit the on-chip buffers and
//! spread over cube and vector cores.
//!
//! Owns the choice of matmul base blocks (`baseM x baseN x baseK`, sized so that double-buffered
//! A/B stages fit L0A/L0B and the f32 accumulator fits L0C, padded to the cube fractal) and of
//! vector tiles sized to the Unified Buffer. It must not know numerics or timings: the cost
//! model turns tile counts into time.

use super::profile::DeviceProfile;

/// How one matmul `[m, k] x [k, n]` is cut for the cube cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatmulTiling {
    /// Rows of the output block one core computes at a time.
    pub base_m: usize,
    /// Columns of the output block.
    pub base_n: usize,
    /// Depth of one A/B stage moved into L0A/L0B.
    pub base_k: usize,
    /// Output blocks along m.
    pub tiles_m: usize,
    /// Output blocks along n.
    pub tiles_n: usize,
    /// K steps per output block.
    pub k_steps: usize,
    /// Output blocks in total (`tiles_m * tiles_n`).
    pub total_tiles: usize,
    /// Cube cores that get at least one block.
    pub cores_used: usize,
    /// Blocks on the busiest core (the wave count).
    pub tiles_per_core: usize,
    /// Bytes of one A + B stage (what the first, unoverlapped copy moves).
    pub stage_bytes: usize,
}

impl MatmulTiling {
    /// Flops the cube executes per output block, with m, n and k padded to the fractal.
    pub fn flops_per_tile(&self) -> f64 {
        2.0 * (self.base_m * self.base_n * self.base_k * self.k_steps) as f64
    }
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// Chooses the base blocks for `m x n x k` with `in_bytes` per input element.
///
/// Starts from the usual Ascend fp16 blocks (128 x 256 x 64; depth doubled for 1-byte inputs),
/// shrinks m and n to the (fractal-padded) problem, then halves k, then n, until the
/// double-buffered stages fit L0A/L0B and the f32 block fits L0C.
pub fn matmul_tiling(
    p: &DeviceProfile,
    m: usize,
    n: usize,
    k: usize,
    in_bytes: usize,
) -> MatmulTiling {
    let c = &p.compute;
    let (fm, fn_, fk) = (
        c.fractal_m as usize,
        c.fractal_n as usize,
        c.fractal_k as usize,
    );
    let buffers = if p.launch.double_buffer { 2 } else { 1 };
    let in_bytes = in_bytes.max(1);
    let mut base_m = 128.min(round_up(m.max(1), fm)).max(fm);
    let mut base_n = 256.min(round_up(n.max(1), fn_)).max(fn_);
    let mut base_k = (fk * 4 * 2 / in_bytes).min(round_up(k.max(1), fk)).max(fk);
    let l0a = p.memory.l0a_kib as usize * 1024;
    let l0b = p.memory.l0b_kib as usize * 1024;
    let l0c = p.memory.l0c_kib as usize * 1024;
    loop {
        let a_ok = base_m * base_k * in_bytes * buffers <= l0a;
        let b_ok = base_k * base_n * in_bytes * buffers <= l0b;
        let c_ok = base_m * base_n * 4 <= l0c;
        if a_ok && b_ok && c_ok {
            break;
        }
        if (!a_ok || !b_ok) && base_k > fk {
            base_k = round_up(base_k / 2, fk);
        } else if base_n > fn_ {
            base_n = round_up(base_n / 2, fn_);
        } else if base_m > fm {
            base_m = round_up(base_m / 2, fm);
        } else {
            // Smallest legal block: one fractal. Buffers smaller than that are not modelled.
            break;
        }
    }
    let tiles_m = m.max(1).div_ceil(base_m);
    let tiles_n = n.max(1).div_ceil(base_n);
    let k_steps = k.max(1).div_ceil(base_k);
    let total_tiles = tiles_m * tiles_n;
    let cores = c.cube_cores as usize;
    MatmulTiling {
        base_m,
        base_n,
        base_k,
        tiles_m,
        tiles_n,
        k_steps,
        total_tiles,
        cores_used: total_tiles.min(cores),
        tiles_per_core: total_tiles.div_ceil(cores),
        stage_bytes: (base_m + base_n) * base_k * in_bytes,
    }
}

/// How an elementwise / reduction launch is cut for the vector cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VectorTiling {
    /// Elements per tile (what one UB stage holds).
    pub tile_elems: usize,
    /// Tiles in total.
    pub total_tiles: usize,
    /// Vector cores that get at least one tile.
    pub cores_used: usize,
    /// Tiles on the busiest core.
    pub tiles_per_core: usize,
    /// Bytes of one tile's inputs (the first, unoverlapped copy).
    pub stage_bytes: usize,
}

/// Tiles `elements` for the vector cores; `live_bytes_per_elem` is what one element needs in UB
/// (inputs + outputs + temporaries), `in_bytes_per_elem` what is copied in from HBM.
///
/// Tiles are 32-byte aligned and never split a row of `row_len` elements when a row fits.
pub fn vector_tiling(
    p: &DeviceProfile,
    elements: usize,
    row_len: usize,
    live_bytes_per_elem: usize,
    in_bytes_per_elem: usize,
) -> VectorTiling {
    let buffers = if p.launch.double_buffer { 2 } else { 1 };
    let ub = p.memory.ub_kib as usize * 1024;
    let per_buffer = ub / buffers;
    let mut tile = (per_buffer / live_bytes_per_elem.max(1)) / 8 * 8;
    tile = tile.max(8);
    let row = row_len.max(1);
    if row <= tile {
        tile = tile / row * row;
    }
    let elements = elements.max(1);
    let tile = tile.min(elements);
    let total_tiles = elements.div_ceil(tile);
    let cores = p.compute.vector_cores as usize;
    VectorTiling {
        tile_elems: tile,
        total_tiles,
        cores_used: total_tiles.min(cores),
        tiles_per_core: total_tiles.div_ceil(cores),
        stage_bytes: tile * in_bytes_per_elem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_blocks_fit_buffers() {
        let p = DeviceProfile::builtin("ascend-910b").unwrap();
        let t = matmul_tiling(&p, 256, 4096, 4096, 2);
        assert_eq!((t.base_m, t.base_n, t.base_k), (128, 256, 64));
        assert_eq!((t.tiles_m, t.tiles_n, t.total_tiles), (2, 16, 32));
        assert_eq!((t.cores_used, t.tiles_per_core, t.k_steps), (24, 2, 64));
        let d = matmul_tiling(&p, 1, 4096, 4096, 2);
        assert_eq!(d.base_m, 16);
        let q = matmul_tiling(&p, 256, 4096, 4096, 1);
        assert_eq!(q.base_k, 128);
        for (m, n, k) in [(1, 1, 1), (17, 33, 5), (4096, 4096, 4096), (3, 100000, 7)] {
            let t = matmul_tiling(&p, m, n, k, 2);
            assert!(t.base_m * t.base_k * 2 * 2 <= 64 * 1024);
            assert!(t.base_n * t.base_k * 2 * 2 <= 64 * 1024);
            assert!(t.base_m * t.base_n * 4 <= 128 * 1024);
            assert!(t.total_tiles * t.base_m * t.base_n >= m * n);
        }
    }

    #[test]
    fn vector_tiles_fit_ub() {
        let p = DeviceProfile::builtin("ascend-910b").unwrap();
        let t = vector_tiling(&p, 32 * 7168, 7168, 12, 2);
        assert!(t.tile_elems * 12 * 2 <= 192 * 1024);
        assert_eq!(t.tile_elems % 7168, 0);
        assert!(t.total_tiles * t.tile_elems >= 32 * 7168);
    }
}
