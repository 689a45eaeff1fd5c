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
    /// The source line the error points at, for display (a window of a long line).
    pub snippet: Option<String>,
    /// 1-based column of the caret within `snippet`.
    pub snippet_column: usize,
}

/// Characters of a long source line shown on each side of the error.
const SNIPPET_HALF: usize = 60;

/// A window of `line` around 1-based `column`, with the caret's column in it.
fn window(line: &str, column: usize) -> (String, usize) {
    let chars: Vec<char> = line.chars().collect();
    if chars.len() <= 2 * SNIPPET_HALF {
        return (line.to_string(), column);
    }
    let at = column.saturating_sub(1).min(chars.len());
    let start = at.saturating_sub(SNIPPET_HALF);
    let end = (at + SNIPPET_HALF).min(chars.len());
    let mut text: String = chars[start..end].iter().collect();
    let mut caret = at - start + 1;
    if start > 0 {
        text.insert_str(0, "...");
        caret += 3;
    }
    if end < chars.len() {
        text.push_str("...");
    }
    (text, caret)
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
            snippet_column: 0,
        }
    }

    /// An error at byte range `span` of `source`.
    pub fn at(file: &Path, source: &str, span: Option<Range<usize>>, key: impl Into<String>, message: impl Into<String>) -> Self {
        let (line, column, snippet, snippet_column) = match span {
            Some(span) => {
                let (l, c) = line_col(source, span.start);
                let (text, caret) = window(source.lines().nth(l - 1).unwrap_or(""), c);
                (l, c, Some(text), caret)
            }
            None => (0, 0, None, 0),
        };
        ConfigError {
            file: file.to_path_buf(),
            line,
            column,
            key: key.into(),
            message: message.into(),
            help: None,
            snippet,
            snippet_column,
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
            writeln!(f, "{pad} | {}^", " ".repeat(self.snippet_column.saturating_sub(1)))?;
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
