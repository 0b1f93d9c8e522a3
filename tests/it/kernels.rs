//! Int8 kernels: lossless GGUF block conversion (against candle's
//! dequantization), every available tier bit-identical to the scalar
//! reference, results close to the f32 product, and matmul rows independent of
//! batch size, tiling and thread count.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use cantante::llm::kernels::blocks::{block_quantizer, quantize_block};
use cantante::llm::kernels::{matmul, scalar, Packing, QActs, QMatrix, ScaleKind, Tier, QK, TILE};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn randn(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            // Mix of scales so blocks differ in range; a few exact zeros.
            let x: f32 = rng.random_range(-1.0..1.0);
            if rng.random_ratio(1, 50) {
                0.0
            } else {
                x * 10f32.powi(rng.random_range(-2..2))
            }
        })
        .collect()
}

const FORMATS: [GgmlDType; 8] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

fn qmatrix(rng: &mut ChaCha8Rng, dt: GgmlDType, rows: usize, cols: usize) -> (QMatrix, Vec<f32>) {
    let v = randn(rng, rows * cols);
    let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, dt).unwrap();
    let reference = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    (QMatrix::from_qtensor(&q).unwrap(), reference)
}

#[test]
fn gguf_blocks_convert_losslessly() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for dt in FORMATS {
        let (m, reference) = qmatrix(&mut rng, dt, 6, 512);
        assert_eq!(m.dequantize(), reference, "{dt:?}");
        let k_quant = matches!(dt, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K);
        assert_eq!(m.sub.is_some(), dt == GgmlDType::Q6K, "{dt:?}");
        // Bit widths are kept: 4-, 5-, 6- and 8-bit values stay that wide.
        let packing = match dt {
            GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K => Packing::U4,
            GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q5K => Packing::U5,
            GgmlDType::Q6K => Packing::U6,
            _ => Packing::I8,
        };
        assert_eq!(m.packing, packing, "{dt:?}");
        // Scales keep their storage too: bytes per 256 values (rows padded to
        // 8) equal the file's, Q4_K/Q5_K within 4 (a u8 scale and min per
        // block instead of 6 bits, f16 super-block factors as in the file),
        // Q6_K 224 (the file: 210; an f16 scale per 32 values, not per 256).
        let blocks = 8 * 512 / 32;
        assert_eq!(m.qs.len(), blocks * packing.bytes());
        let (kind, per_block) = match dt {
            GgmlDType::Q8_0 => (ScaleKind::F16, 8 * 34),
            GgmlDType::Q4_0 => (ScaleKind::F16, 8 * 18),
            GgmlDType::Q4_1 => (ScaleKind::F16, 8 * 20),
            GgmlDType::Q5_0 => (ScaleKind::F16, 8 * 22),
            GgmlDType::Q5_1 => (ScaleKind::F16, 8 * 24),
            GgmlDType::Q4K => (ScaleKind::Super, 148),
            GgmlDType::Q5K => (ScaleKind::Super, 180),
            GgmlDType::Q6K => (ScaleKind::F16, 224),
            _ => unreachable!(),
        };
        assert_eq!(m.d.kind(), kind, "{dt:?}");
        assert_eq!(m.bytes(), blocks / 8 * per_block, "{dt:?}");
        assert_eq!(
            m.m.is_some(),
            matches!(dt, GgmlDType::Q4_1 | GgmlDType::Q5_1) || (k_quant && dt != GgmlDType::Q6K),
            "{dt:?}"
        );
    }
    // Types without a lossless path (f32 here) become Q8_0-style blocks.
    let v = randn(&mut rng, 4 * 64);
    let t = Tensor::from_vec(v.clone(), (4, 64), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
    let m = QMatrix::from_qtensor(&q).unwrap();
    assert_eq!(m, QMatrix::quantize_f32(&v, 4, 64));
    for (a, b) in m.dequantize().iter().zip(&v) {
        assert!((a - b).abs() <= 1.0 / 127.0 * 10.0 + 1e-6);
    }
}

#[test]
fn concat_stacks_rows_exactly() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for dt in FORMATS {
        // Whole tiles first (the fast path), then a part-filled tile last; and
        // a part-filled tile in the middle (the block-by-block path).
        for sizes in [[16, 8, 13], [16, 5, 8]] {
            let parts: Vec<_> = sizes
                .iter()
                .map(|&r| qmatrix(&mut rng, dt, r, 512).0)
                .collect();
            let refs: Vec<&QMatrix> = parts.iter().collect();
            let cat = QMatrix::concat(&refs).unwrap();
            assert_eq!(cat.rows, sizes.iter().sum::<usize>());
            let mut r0 = 0;
            for p in &parts {
                for r in 0..p.rows {
                    for b in 0..p.blocks_per_row() {
                        assert_eq!(cat.block(r0 + r, b), p.block(r, b), "{dt:?} {sizes:?}");
                    }
                }
                r0 += p.rows;
            }
            // Padding rows stay zero, so both paths build the same matrix.
            let mut slow = parts[0].clone();
            for p in &parts[1..] {
                slow = QMatrix::concat(&[&slow, p]).unwrap();
            }
            assert_eq!(cat, slow, "{dt:?} {sizes:?}");
        }
    }
}

#[test]
fn every_tier_matches_the_scalar_reference_bit_for_bit() {
    let tiers = Tier::available();
    assert!(tiers.contains(&Tier::Scalar));
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    // 896 = 28 blocks (the default model's width): a part-filled last group
    // of 5-bit high bits; K formats need whole 256-value super-blocks.
    let shapes = FORMATS.iter().flat_map(|&dt| {
        let k_quant = matches!(dt, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K);
        let widths: &[usize] = if k_quant { &[768] } else { &[768, 896] };
        widths.iter().map(move |&k| (dt, k))
    });
    for (dt, k) in shapes {
        let (w, wf) = qmatrix(&mut rng, dt, 13, k);
        let x = randn(&mut rng, 11 * k);
        let mut acts = QActs::default();
        acts.quantize(&x, 11, k);
        let rows: Vec<_> = (0..11).map(|r| acts.row(r)).collect();
        for c in 0..w.rows {
            let want: Vec<f32> = rows.iter().map(|a| scalar::dot(&w, c, a)).collect();
            // 1–3 rows, 4-row groups and the unpack-once path (≥ 8 rows, with
            // 512-bit pairs and an odd last row).
            for n in [1, 2, 4, 5, 9, 10, 11] {
                for &tier in &tiers {
                    let mut got = vec![[0f32; TILE]; n];
                    tier.tile_rows(&w, c / TILE, &rows[..n], &mut got);
                    let got: Vec<f32> = got.iter().map(|o| o[c % TILE]).collect();
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got),
                        bits(&want[..n]),
                        "{dt:?} tier {tier:?} row {c}, {n} activation rows"
                    );
                }
            }
            // Semantics: close to the f32 product of the stored weights and the input.
            for (r, &got) in want.iter().enumerate() {
                let exact: f32 = (0..k).map(|e| wf[c * k + e] * x[r * k + e]).sum();
                let scale: f32 = (0..k).map(|e| (wf[c * k + e] * x[r * k + e]).abs()).sum();
                assert!(
                    (got - exact).abs() <= 0.02 * scale + 1e-5,
                    "{dt:?}: {got} vs {exact} (scale {scale})"
                );
            }
        }
    }
}

#[test]
fn every_tier_quantizes_activations_like_the_scalar_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut blocks: Vec<Vec<f32>> = (0..2000).map(|_| randn(&mut rng, QK)).collect();
    // amax 127 makes d = 1, so these land exactly on ties and near-ties of
    // the rounding (half away from zero), both signs.
    let ties: Vec<f32> = (0..QK)
        .map(|j| match j % 8 {
            0 => 127.0,
            1 => 2.5,
            2 => -3.5,
            3 => 0.5,
            4 => -0.5,
            5 => 0.499_999_97,
            6 => -126.5,
            _ => j as f32 - 16.5,
        })
        .collect();
    blocks.push(ties);
    blocks.push(vec![0.0; QK]);
    blocks.push(vec![-1e-30; QK]);
    let mut odd = randn(&mut rng, QK);
    odd[3] = f32::NAN;
    odd[20] = 3e38;
    blocks.push(odd);
    for tier in Tier::available() {
        let quantize = block_quantizer(tier);
        for x in &blocks {
            let (mut want, mut got) = ([0i8; QK], [0i8; QK]);
            let (d0, h0) = quantize_block(x, &mut want);
            let (d1, h1) = quantize(x, &mut got);
            assert_eq!(d0.to_bits(), d1.to_bits(), "{} d of {x:?}", tier.name());
            assert_eq!((want, h0), (got, h1), "{} values of {x:?}", tier.name());
        }
    }
}

#[test]
fn matmul_rows_do_not_depend_on_batch_tiling_or_thread_split() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let t = 70; // crosses the row pairs and the 64-row tile
    let x = randn(&mut rng, t * 512);
    let mut acts = QActs::default();
    acts.quantize(&x, t, 512);
    for (dt, tier) in FORMATS
        .iter()
        .flat_map(|&dt| Tier::available().into_iter().map(move |t| (dt, t)))
    {
        let (w, _) = qmatrix(&mut rng, dt, 96, 512);
        let mut full = vec![0f32; t * w.rows];
        matmul(tier, &w, &acts, &mut full, w.rows);
        // Alone (one part on one thread) equals inside the batch (split over the team).
        for r in [0, 3, 4, 63, 64, 69] {
            let mut one = QActs::default();
            one.quantize(&x[r * 512..(r + 1) * 512], 1, 512);
            let mut out = vec![0f32; w.rows];
            matmul(tier, &w, &one, &mut out, w.rows);
            assert_eq!(
                out,
                full[r * w.rows..(r + 1) * w.rows],
                "tier {tier:?} row {r}"
            );
        }
        // And equals the tiles computed one by one on this thread.
        let rows: Vec<_> = (0..t).map(|r| acts.row(r)).collect();
        for tile in 0..w.rows / TILE {
            let mut o = vec![[0f32; TILE]; t];
            tier.tile_rows(&w, tile, &rows, &mut o);
            for (r, o) in o.iter().enumerate() {
                assert_eq!(
                    &o[..],
                    &full[r * w.rows + tile * TILE..r * w.rows + (tile + 1) * TILE]
                );
            }
        }
        // Writing into a wider output leaves the other columns alone.
        let mut wide = vec![7f32; 2 * (w.rows + 5)];
        let mut two = QActs::default();
        two.quantize(&x[..2 * 512], 2, 512);
        matmul(tier, &w, &two, &mut wide, w.rows + 5);
        assert_eq!(&wide[..w.rows], &full[..w.rows]);
        assert_eq!(&wide[w.rows..w.rows + 5], &[7.0; 5]);
    }
}

#[test]
fn team_runs_every_part_once_and_survives_a_panicking_part() {
    use cantante::llm::team;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits: Vec<AtomicUsize> = (0..37).map(|_| AtomicUsize::new(0)).collect();
    for _ in 0..50 {
        team::run(hits.len(), &|p| {
            hits[p].fetch_add(1, Ordering::Relaxed);
        });
    }
    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 50));
    let r = std::panic::catch_unwind(|| {
        team::run(8, &|p| {
            if p == 5 {
                panic!("part 5 fails");
            }
        })
    });
    assert!(r.is_err(), "a panicking part must surface in the caller");
    // The team still works after a panic.
    let n = AtomicUsize::new(0);
    team::for_ranges(1000, 10, &|r| {
        n.fetch_add(r.len(), Ordering::Relaxed);
    });
    assert_eq!(n.load(Ordering::Relaxed), 1000);
}
