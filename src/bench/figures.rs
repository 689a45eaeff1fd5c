//! A bench's figures as they are measured: each one is logged when it arrives and handed to an
//! optional sink (the CLI rewrites the `--out` file), so a bench stopped by a time limit, a lost
//! machine or a failing later row still leaves every figure measured before it.

use serde_json::{Map, Value};

/// Called with all figures so far after each new one; an error is logged, not fatal (the
/// command still writes the whole set at the end).
pub type FigureSink<'a> = &'a mut dyn FnMut(&Map<String, Value>) -> anyhow::Result<()>;

pub struct Figures<'a> {
    map: Map<String, Value>,
    sink: Option<FigureSink<'a>>,
}

impl<'a> Figures<'a> {
    pub fn new(sink: Option<FigureSink<'a>>) -> Self {
        Self { map: Map::new(), sink }
    }

    /// Records `key` = `value`, logs it and passes everything so far to the sink.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        let (key, value) = (key.into(), value.into());
        tracing::info!("{key} = {}", short(&value));
        self.map.insert(key, value);
        if let Some(Err(e)) = self.sink.as_mut().map(|sink| sink(&self.map)) {
            tracing::warn!("could not save the figures so far: {e:#}");
        }
    }

    /// The figures for derived entries (added after the measured ones, without the sink).
    pub fn map_mut(&mut self) -> &mut Map<String, Value> {
        &mut self.map
    }

    pub fn into_value(self) -> Value {
        Value::Object(self.map)
    }
}

/// Floats to four decimals for the log line; the JSON keeps them whole.
fn short(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if v.is_f64() => format!("{x:.4}"),
        _ => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_insert_reaches_the_sink_with_all_figures_so_far() {
        let mut seen: Vec<Vec<String>> = Vec::new();
        let mut sink = |m: &Map<String, Value>| {
            seen.push(m.keys().cloned().collect());
            Ok(())
        };
        let mut f = Figures::new(Some(&mut sink));
        f.insert("a_img_s", 1.5);
        f.insert("b_img_s", 2.5);
        let v = f.into_value();
        assert_eq!(v["b_img_s"], 2.5);
        assert_eq!(seen, vec![vec!["a_img_s".to_string()], vec!["a_img_s".into(), "b_img_s".into()]]);
    }

    #[test]
    fn a_failing_sink_does_not_lose_figures() {
        let mut sink = |_: &Map<String, Value>| anyhow::bail!("disk full");
        let mut f = Figures::new(Some(&mut sink));
        f.insert("x", 3);
        f.insert("y", 4);
        assert_eq!(f.into_value(), serde_json::json!({"x": 3, "y": 4}));
    }
}
