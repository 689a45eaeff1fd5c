//! Random streams that a resumed run reproduces: each training step seeds libtorch's generators
//! from (run seed, step) instead of continuing one stream from the start, so a run resumed at
//! step k draws exactly what an uninterrupted run draws from step k on.

/// The seed of step `step` (1-based) of a run seeded with `seed` (splitmix64 of the pair).
pub fn step_seed(seed: u64, step: u64) -> i64 {
    let mut z = seed ^ step.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as i64
}

/// Seeds libtorch's CPU and CUDA generators for one step (between CUDA-graph replays too: a
/// replay reads the generator's seed when it starts).
pub fn seed_step(seed: u64, step: u64) {
    tch::manual_seed(step_seed(seed, step));
}

#[cfg(test)]
mod tests {
    #[test]
    fn steps_and_runs_get_different_seeds() {
        use super::step_seed;
        let seeds: std::collections::HashSet<i64> = (0..3).flat_map(|s| (1..1000).map(move |k| step_seed(s, k))).collect();
        assert_eq!(seeds.len(), 3 * 999);
        assert_eq!(step_seed(7, 3), step_seed(7, 3));
    }
}
