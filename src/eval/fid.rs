//! Fréchet Inception Distance: feature mean and covariance accumulated in f64 in one streaming
//! pass, the distance through a symmetric eigendecomposition in f64, and statistics files in
//! EDM's npz layout (`mu`, `sigma`).

use std::path::Path;

use anyhow::{Context, Result, bail};
use tch::{Kind, Tensor};

use crate::data::npy::{NpyArray, NpyData, read_npz, write_npz};

/// Running sums of features and their outer products (f64, on the features' device).
pub struct StatsAccumulator {
    sum: Option<Tensor>,
    outer: Option<Tensor>,
    pub count: i64,
}

impl Default for StatsAccumulator {
    fn default() -> Self {
        Self::new()
    }
}

impl StatsAccumulator {
    pub fn new() -> Self {
        StatsAccumulator {
            sum: None,
            outer: None,
            count: 0,
        }
    }

    pub fn add(&mut self, features: &Tensor) {
        let f = features.to_kind(Kind::Double);
        let s = f.sum_dim_intlist([0i64].as_slice(), false, Kind::Double);
        let o = f.transpose(0, 1).mm(&f);
        self.sum = Some(match self.sum.take() {
            None => s,
            Some(a) => a + s,
        });
        self.outer = Some(match self.outer.take() {
            None => o,
            Some(a) => a + o,
        });
        self.count += features.size()[0];
    }

    pub fn finish(&self) -> Result<FidStats> {
        let (Some(sum), Some(outer)) = (&self.sum, &self.outer) else {
            bail!("no features were accumulated")
        };
        if self.count < 2 {
            bail!("need at least 2 images for a covariance");
        }
        let n = self.count as f64;
        let mu = sum.to_device(tch::Device::Cpu) / n;
        let sigma = (outer.to_device(tch::Device::Cpu) - mu.outer(&mu) * n) / (n - 1.0);
        Ok(FidStats {
            mu: Vec::<f64>::try_from(&mu)?,
            sigma: Vec::<f64>::try_from(sigma.flatten(0, -1))?,
            dim: mu.size()[0] as usize,
            count: self.count,
        })
    }
}

/// Mean and (unbiased) covariance of a feature set.
#[derive(Debug, Clone, PartialEq)]
pub struct FidStats {
    pub mu: Vec<f64>,
    /// Row-major dim x dim.
    pub sigma: Vec<f64>,
    pub dim: usize,
    pub count: i64,
}

impl FidStats {
    /// EDM's layout: `mu` (dim,) and `sigma` (dim, dim), float64.
    pub fn save_npz(&self, path: &Path) -> Result<()> {
        let mu = NpyArray {
            shape: vec![self.dim],
            data: NpyData::F64(self.mu.clone()),
        };
        let sigma = NpyArray {
            shape: vec![self.dim, self.dim],
            data: NpyData::F64(self.sigma.clone()),
        };
        let count = NpyArray {
            shape: vec![1],
            data: NpyData::I64(vec![self.count]),
        };
        write_npz(path, &[("mu", &mu), ("sigma", &sigma), ("count", &count)])
    }

    pub fn load_npz(path: &Path) -> Result<Self> {
        let a = read_npz(path, &["mu", "sigma"]).with_context(|| format!("reading FID statistics {}", path.display()))?;
        let dim = a[0].numel();
        if a[1].shape != [dim, dim] {
            bail!("{}: sigma has shape {:?}, expected [{dim}, {dim}]", path.display(), a[1].shape);
        }
        let count = read_npz(path, &["count"])
            .ok()
            .and_then(|c| c[0].to_i64().ok())
            .map(|c| c[0])
            .unwrap_or(0);
        Ok(FidStats {
            mu: a[0].to_f64(),
            sigma: a[1].to_f64(),
            dim,
            count,
        })
    }
}

/// A square f64 matrix on the CPU (libtorch's LAPACK does the eigendecompositions).
fn mat(v: &[f64], n: usize) -> Tensor {
    Tensor::from_slice(v).reshape([n as i64, n as i64])
}

fn trace(m: &Tensor) -> f64 {
    m.trace().double_value(&[])
}

/// ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2).
pub fn frechet_distance(a: &FidStats, b: &FidStats) -> Result<f64> {
    FidReference::new(b)?.distance(a)
}

/// Reference statistics prepared for many distances (an FID curve against one reference): the
/// eigendecomposition of its covariance is done once.
pub struct FidReference {
    mu: Vec<f64>,
    trace: f64,
    /// A = U D^(1/2) for the reference covariance S = U D U^T.
    half: Tensor,
}

impl FidReference {
    pub fn new(reference: &FidStats) -> Result<Self> {
        let s = mat(&reference.sigma, reference.dim);
        let (d, u) = s
            .f_linalg_eigh("L")
            .map_err(|e| anyhow::anyhow!("eigendecomposition failed: {e}"))?;
        Ok(FidReference {
            mu: reference.mu.clone(),
            trace: trace(&s),
            half: u * d.clamp_min(0.0).sqrt().unsqueeze(0),
        })
    }

    /// FID of `other` against the reference. With S_ref = A A^T, S_ref^1/2 S S_ref^1/2 has the
    /// eigenvalues of A^T S A (they are similar), which needs two products and no eigenvectors.
    pub fn distance(&self, other: &FidStats) -> Result<f64> {
        let n = self.mu.len();
        if other.dim != n {
            bail!("feature dimensions differ: {} vs {n}", other.dim);
        }
        let d2: f64 = self.mu.iter().zip(&other.mu).map(|(x, y)| (x - y) * (x - y)).sum();
        let s = mat(&other.sigma, n);
        let m = self.half.tr().matmul(&s.matmul(&self.half));
        let m = (&m + m.tr()) * 0.5;
        let ev = m.f_linalg_eigvalsh("L").map_err(|e| anyhow::anyhow!("eigenvalues failed: {e}"))?;
        let tr_sqrt = ev.clamp_min(0.0).sqrt().sum(tch::Kind::Double).double_value(&[]);
        Ok(d2 + trace(&s) + self.trace - 2.0 * tr_sqrt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(mu: Vec<f64>, sigma: Vec<f64>) -> FidStats {
        let dim = mu.len();
        FidStats { mu, sigma, dim, count: 10 }
    }

    #[test]
    fn distance_of_gaussians_in_closed_form() {
        // Diagonal covariances: FID = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
        let a = stats(vec![0.0, 1.0, 2.0], vec![4.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 9.0]);
        let b = stats(vec![1.0, 1.0, 0.0], vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 4.0]);
        let expect = 1.0 + 4.0 + (2.0f64 - 1.0).powi(2) + 0.0 + (3.0f64 - 2.0).powi(2);
        assert!((frechet_distance(&a, &b).unwrap() - expect).abs() < 1e-9);
        assert!(frechet_distance(&a, &a).unwrap().abs() < 1e-9);
    }

    #[test]
    fn distance_with_non_commuting_covariances_matches_scipy_style_reference() {
        // S1 = [[2,1],[1,2]], S2 = [[1,0],[0,3]]: tr sqrt(S1 S2) computed independently from the
        // eigenvalues of S1 S2 (a 2x2 with real positive eigenvalues).
        let a = stats(vec![0.0, 0.0], vec![2.0, 1.0, 1.0, 2.0]);
        let b = stats(vec![0.0, 0.0], vec![1.0, 0.0, 0.0, 3.0]);
        let (p, q, r, s) = (2.0, 3.0, 1.0, 6.0); // S1 S2 = [[2,3],[1,6]]
        let tr = p + s;
        let det: f64 = p * s - q * r;
        let disc = (tr * tr / 4.0 - det).sqrt();
        let tr_sqrt = (tr / 2.0 + disc).sqrt() + (tr / 2.0 - disc).sqrt();
        let expect = 4.0 + 4.0 - 2.0 * tr_sqrt;
        assert!((frechet_distance(&a, &b).unwrap() - expect).abs() < 1e-9);
    }

    #[test]
    fn distance_is_symmetric_and_a_prepared_reference_gives_the_same_value() {
        let a = stats(vec![0.1, 0.2, -0.3], vec![2.0, 0.5, 0.1, 0.5, 1.0, -0.2, 0.1, -0.2, 0.7]);
        let b = stats(vec![-0.4, 0.0, 0.3], vec![1.0, -0.3, 0.4, -0.3, 1.5, 0.2, 0.4, 0.2, 0.9]);
        let ab = frechet_distance(&a, &b).unwrap();
        let ba = frechet_distance(&b, &a).unwrap();
        assert!((ab - ba).abs() < 1e-12, "{ab} vs {ba}");
        let r = FidReference::new(&b).unwrap();
        assert!((r.distance(&a).unwrap() - ab).abs() < 1e-12);
        assert!(r.distance(&b).unwrap().abs() < 1e-9, "a distribution is at distance 0 from itself");
        assert!(ab > 0.1);
    }

    #[test]
    fn distance_of_correlated_2d_gaussians_in_closed_form() {
        // For 2x2 PSD A, B: tr sqrt(A^(1/2) B A^(1/2)) = sqrt(tr(AB) + 2 sqrt(det A det B)).
        let (a_s, b_s) = ([2.0, 0.7, 0.7, 1.0], [1.5, -0.4, -0.4, 0.8]);
        let a = stats(vec![0.3, -1.0], a_s.to_vec());
        let b = stats(vec![-0.2, 0.5], b_s.to_vec());
        let tr_ab = a_s[0] * b_s[0] + a_s[1] * b_s[2] + a_s[2] * b_s[1] + a_s[3] * b_s[3];
        let det = |m: [f64; 4]| m[0] * m[3] - m[1] * m[2];
        let tr_sqrt = (tr_ab + 2.0 * (det(a_s) * det(b_s)).sqrt()).sqrt();
        let expect = 0.5f64.powi(2) + 1.5f64.powi(2) + (a_s[0] + a_s[3]) + (b_s[0] + b_s[3]) - 2.0 * tr_sqrt;
        let got = frechet_distance(&a, &b).unwrap();
        assert!((got - expect).abs() < 1e-12, "{got} vs {expect}");
    }

    #[test]
    fn streaming_stats_match_batch_stats_and_npz_round_trips() {
        tch::manual_seed(0);
        let f = Tensor::randn([100, 5], (Kind::Double, tch::Device::Cpu)) * 2.0 + 1.0;
        let mut acc = StatsAccumulator::new();
        for chunk in f.split(33, 0) {
            acc.add(&chunk);
        }
        let s = acc.finish().unwrap();
        let mu = f.mean_dim([0i64].as_slice(), false, Kind::Double);
        let centered = &f - &mu;
        let cov = centered.transpose(0, 1).mm(&centered) / 99.0;
        let cov: Vec<f64> = Vec::try_from(cov.flatten(0, -1)).unwrap();
        assert!(s.sigma.iter().zip(&cov).all(|(a, b)| (a - b).abs() < 1e-10));
        let dir = tempfile::tempdir().unwrap();
        s.save_npz(&dir.path().join("s.npz")).unwrap();
        assert_eq!(FidStats::load_npz(&dir.path().join("s.npz")).unwrap(), s);
    }
}
