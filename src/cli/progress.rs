//! Progress of pulls, creates and uploads as the CLI shows it: on a terminal, one
//! indicatif bar per phase on stderr (as `ollama pull` draws them); otherwise one plain line
//! per phase on stdout, which logs and scripts can read.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

/// Decimal sizes as Ollama prints them (`98 MB`, `4.7 GB`).
pub fn human_bytes(n: u64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < units.len() {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 || v >= 10.0 {
        format!("{v:.0} {}", units[i])
    } else {
        format!("{v:.1} {}", units[i])
    }
}

/// A bar for `total` bytes with `msg` before it; hidden when stderr is not a terminal.
pub fn byte_bar(msg: String, total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total).with_message(msg);
    // The template is a constant, so it always parses; the default style is the fallback.
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} {percent:>3}% ▕{wide_bar}▏ {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec} {eta}",
    ) {
        bar.set_style(style.progress_chars("██ "));
    }
    bar
}

fn spinner(msg: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner().with_message(msg);
    if let Ok(style) = ProgressStyle::with_template("{msg} {spinner}") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// Shows a status stream (`{"status", "total"?, "completed"?}` lines of pull and create).
pub struct Progress {
    tty: bool,
    status: String,
    bar: Option<ProgressBar>,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            status: String::new(),
            bar: None,
        }
    }

    pub fn show(&mut self, v: &Value) {
        let status = v["status"].as_str().unwrap_or_default().to_string();
        let total = v["total"].as_u64().unwrap_or(0);
        let done = v["completed"].as_u64().unwrap_or(0);
        let new = status != self.status;
        if self.tty {
            if new {
                self.end_bar();
                self.bar = Some(if total > 0 {
                    byte_bar(status.clone(), total)
                } else {
                    spinner(status.clone())
                });
            }
            if let Some(bar) = &self.bar {
                if total > 0 {
                    bar.set_length(total);
                    bar.set_position(done);
                }
            }
        } else if let Some(pct) = (done * 100).checked_div(total) {
            if new || done == total {
                println!(
                    "{status}: {pct:>3}% {} / {}",
                    human_bytes(done),
                    human_bytes(total)
                );
            }
        } else if new {
            println!("{status}");
        }
        let _ = std::io::stdout().flush();
        self.status = status;
    }

    fn end_bar(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }

    pub fn finish(&mut self) {
        self.end_bar();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_like_ollama() {
        assert_eq!(human_bytes(98_362_432), "98 MB");
        assert_eq!(human_bytes(4_661_224_676), "4.7 GB");
        assert_eq!(human_bytes(512), "512 B");
    }
}
