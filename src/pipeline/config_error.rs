//! Errors in a pipeline file, located by file, line, column and key path.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in a pipeline file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line and column; 0 when the error has no position (e.g. a missing file).
    pub line: usize,
    pub column: usize,
    /// Dotted key path, e.g. `stages.data.seed`; empty for whole-file errors.
    pub key: String,
    pub message: String,
    pub help: Option<String>,
    /// The source line the error points at, for display.
    pub snippet: Option<String>,
}

impl ConfigError {
    pub fn whole_file(file: &Path, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            line: 0,
            column: 0,
            key: String::new(),
            message: message.into(),
            help: None,
            snippet: None,
        }
    }

    /// An error at byte range `span` of `source`.
    pub fn at(file: &Path, source: &str, span: Option<Range<usize>>, key: impl Into<String>, message: impl Into<String>) -> Self {
        let (line, column, snippet) = match span {
            Some(span) => {
                let (l, c) = line_col(source, span.start);
                let text = source.lines().nth(l - 1).unwrap_or("").to_string();
                (l, c, Some(text))
            }
            None => (0, 0, None),
        };
        ConfigError {
            file: file.to_path_buf(),
            line,
            column,
            key: key.into(),
            message: message.into(),
            help: None,
            snippet,
        }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// 1-based (line, column) of a byte offset.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map(|s| s.chars().count()).unwrap_or(0) + 1;
    (line, col)
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "error: {}", self.message)?;
        if self.line > 0 {
            writeln!(f, "  --> {}:{}:{}", self.file.display(), self.line, self.column)?;
        } else {
            writeln!(f, "  --> {}", self.file.display())?;
        }
        if let Some(snippet) = &self.snippet {
            let num = self.line.to_string();
            let pad = " ".repeat(num.len());
            writeln!(f, "{pad} |")?;
            writeln!(f, "{num} | {snippet}")?;
            writeln!(f, "{pad} | {}^", " ".repeat(self.column.saturating_sub(1)))?;
        }
        if !self.key.is_empty() {
            writeln!(f, "  = key: {}", self.key)?;
        }
        if let Some(help) = &self.help {
            writeln!(f, "  = help: {help}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The closest candidate to `word`, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}
