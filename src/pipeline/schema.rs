//! The JSON schema of pipeline files, generated from the same types the parser uses.

use super::config::PipelineDocument;

pub const SCHEMA_PATH: &str = "schemas/pipeline.schema.json";

pub fn pipeline_schema() -> String {
    let schema = schemars::schema_for!(PipelineDocument);
    let mut text = serde_json::to_string_pretty(&schema).expect("schema serializes");
    text.push('\n');
    text
}
