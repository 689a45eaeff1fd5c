//! Kernel Inception Distance (Bińkowski et al. 2018) and improved precision/recall
//! (Kynkäänniemi et al. 2019) from Inception features; both need every feature vector, not only
//! the mean and covariance FID keeps.

use anyhow::{Result, bail};
use rand::{SeedableRng, seq::SliceRandom};
use tch::{Kind, Tensor};

/// KID: the unbiased MMD^2 with the kernel (x.y / d + 1)^3, averaged over `subsets` random
/// subsets of `subset_size` from each set (capped by the set sizes). Returns (mean, std).
pub fn kid(a: &Tensor, b: &Tensor, subsets: usize, subset_size: usize, seed: u64) -> Result<(f64, f64)> {
    let (na, nb) = (a.size()[0] as usize, b.size()[0] as usize);
    let m = subset_size.min(na).min(nb);
    if m < 2 || subsets == 0 {
        bail!("KID needs at least 2 features per set and one subset");
    }
    let d = a.size()[1] as f64;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let pick = |n: usize, rng: &mut rand_chacha::ChaCha8Rng| -> Tensor {
        let mut idx: Vec<i64> = (0..n as i64).collect();
        idx.shuffle(rng);
        idx.truncate(m);
        Tensor::from_slice(&idx)
    };
    let mut values = Vec::with_capacity(subsets);
    for _ in 0..subsets {
        let x = a.index_select(0, &pick(na, &mut rng).to_device(a.device())).to_kind(Kind::Double);
        let y = b.index_select(0, &pick(nb, &mut rng).to_device(b.device())).to_kind(Kind::Double);
        let k = |p: &Tensor, q: &Tensor| (p.matmul(&q.tr()) / d + 1.0).pow_tensor_scalar(3);
        let (kxx, kyy, kxy) = (k(&x, &x), k(&y, &y), k(&x, &y));
        let off_diag = |t: &Tensor| (t.sum(Kind::Double) - t.diagonal(0, 0, 1).sum(Kind::Double)).double_value(&[]);
        let mf = m as f64;
        let mmd = (off_diag(&kxx) + off_diag(&kyy)) / (mf * (mf - 1.0)) - 2.0 * kxy.mean(Kind::Double).double_value(&[]);
        values.push(mmd);
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
    Ok((mean, var.sqrt()))
}

/// Distance from each row of `x` to its k-th nearest neighbour among the other rows.
fn knn_radii(x: &Tensor, k: usize, chunk: i64) -> Tensor {
    let n = x.size()[0];
    let parts: Vec<Tensor> = (0..n)
        .step_by(chunk as usize)
        .map(|s| {
            let c = x.narrow(0, s, chunk.min(n - s));
            // The nearest row is the row itself (distance 0): take the (k + 1)-th smallest.
            let (vals, _) = Tensor::cdist(&c, x, 2.0, None).topk(k as i64 + 1, 1, false, true);
            vals.select(1, k as i64)
        })
        .collect();
    Tensor::cat(&parts, 0)
}

/// Fraction of `queries` that fall inside the k-NN ball of at least one row of `support`.
fn coverage(queries: &Tensor, support: &Tensor, radii: &Tensor, chunk: i64) -> f64 {
    let n = queries.size()[0];
    let mut inside = 0i64;
    for s in (0..n).step_by(chunk as usize) {
        let q = queries.narrow(0, s, chunk.min(n - s));
        let d = Tensor::cdist(&q, support, 2.0, None);
        inside += d.le_tensor(&radii.unsqueeze(0)).any_dim(1, false).sum(Kind::Int64).int64_value(&[]);
    }
    inside as f64 / n as f64
}

/// Improved precision (fake samples inside the real manifold) and recall (real samples inside
/// the fake manifold), manifolds as unions of k-NN balls (k = 3 in the paper).
pub fn precision_recall(real: &Tensor, fake: &Tensor, k: usize) -> Result<(f64, f64)> {
    if real.size()[0] as usize <= k || fake.size()[0] as usize <= k {
        bail!("precision/recall with k = {k} needs more than {k} features per set");
    }
    let (r, f) = (real.to_kind(Kind::Float), fake.to_kind(Kind::Float));
    let chunk = 1024;
    let (rr, rf) = (knn_radii(&r, k, chunk), knn_radii(&f, k, chunk));
    Ok((coverage(&f, &r, &rr, chunk), coverage(&r, &f, &rf, chunk)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn gauss(n: i64, d: i64, shift: f64, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn([n, d], (Kind::Float, Device::Cpu)) + shift
    }

    #[test]
    fn kid_separates_distributions() {
        let (same, _) = kid(&gauss(400, 8, 0.0, 3), &gauss(400, 8, 0.0, 4), 10, 200, 0).unwrap();
        let (diff, _) = kid(&gauss(400, 8, 0.0, 3), &gauss(400, 8, 1.0, 4), 10, 200, 0).unwrap();
        assert!(same.abs() < 0.05, "same distribution: {same}");
        assert!(diff > 10.0 * same.abs().max(0.01), "shifted: {diff} vs {same}");
    }

    #[test]
    fn kid_of_one_subset_is_the_unbiased_mmd() {
        let a = Tensor::from_slice(&[0.0f32, 1.0, 2.0]).reshape([3, 1]);
        let b = Tensor::from_slice(&[1.0f32, 3.0, 4.0]).reshape([3, 1]);
        let k = |x: f64, y: f64| (x * y + 1.0).powi(3);
        let (xa, xb) = ([0.0, 1.0, 2.0], [1.0, 3.0, 4.0]);
        let mut kxx = 0.0;
        let mut kyy = 0.0;
        let mut kxy = 0.0;
        for i in 0..3 {
            for j in 0..3 {
                if i != j {
                    kxx += k(xa[i], xa[j]);
                    kyy += k(xb[i], xb[j]);
                }
                kxy += k(xa[i], xb[j]);
            }
        }
        let expect = (kxx + kyy) / 6.0 - 2.0 * kxy / 9.0;
        let (got, _) = kid(&a, &b, 1, 3, 7).unwrap();
        assert!((got - expect).abs() < 1e-9 * expect.abs().max(1.0), "{got} vs {expect}");
    }

    #[test]
    fn precision_and_recall_see_mode_dropping_and_outliers() {
        let real = gauss(300, 4, 0.0, 5);
        let same = gauss(300, 4, 0.0, 6);
        let (p, r) = precision_recall(&real, &same, 3).unwrap();
        assert!(p > 0.8 && r > 0.8, "same distribution: {p} {r}");
        // A generator covering only a tight core of the real data: precise, low recall.
        let core = gauss(300, 4, 0.0, 7) * 0.2;
        let (p, r) = precision_recall(&real, &core, 3).unwrap();
        assert!(p > 0.95 && r < 0.5, "collapsed: {p} {r}");
        // Far away: neither.
        let (p, r) = precision_recall(&real, &(gauss(300, 4, 0.0, 8) + 20.0), 3).unwrap();
        assert_eq!((p, r), (0.0, 0.0));
    }
}
