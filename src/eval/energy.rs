//! The energy distance between two 2-D point sets (the toy pipelines' sample quality).

/// 2 E|X - Y| - E|X - X'| - E|Y - Y'|.
pub fn energy_distance(a: &[[f32; 2]], b: &[[f32; 2]]) -> f64 {
    let mean = |p: &[[f32; 2]], q: &[[f32; 2]]| {
        let mut s = 0.0f64;
        for x in p {
            for y in q {
                s += (((x[0] - y[0]) as f64).powi(2) + ((x[1] - y[1]) as f64).powi(2)).sqrt();
            }
        }
        s / (p.len() * q.len()).max(1) as f64
    };
    2.0 * mean(a, b) - mean(a, a) - mean(b, b)
}
