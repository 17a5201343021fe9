//! JSON mode (`format: "json"`, `response_format: json_object`): constrains sampling so the
//! output is one JSON object. A byte-level pushdown automaton tracks where the output is
//! in the JSON grammar; before each sample, candidate tokens are tried in order of their
//! logits and only those whose text keeps the output a valid prefix survive (EOS only once
//! the object is complete).

use std::sync::Arc;

/// Most whitespace bytes in a row, so a model cannot pad forever.
const MAX_WS_RUN: u8 = 4;
/// Valid candidates kept per step (enough for top-k/top-p to choose among).
const KEEP: usize = 64;
/// Candidates examined first, by logit, before falling back to the whole vocabulary.
const FIRST_LOOK: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

impl Num {
    /// A number may end here.
    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::Exp)
    }

    fn next(self, b: u8) -> Option<Num> {
        use Num::*;
        Some(match (self, b) {
            (Minus, b'0') => Zero,
            (Minus, b'1'..=b'9') => Int,
            (Int, b'0'..=b'9') => Int,
            (Zero | Int, b'.') => Dot,
            (Dot | Frac, b'0'..=b'9') => Frac,
            (Zero | Int | Frac, b'e' | b'E') => E,
            (E, b'+' | b'-') => ESign,
            (E | ESign | Exp, b'0'..=b'9') => Exp,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pos {
    /// A value must start (after `:` or `,` in an array, or `[`).
    Value,
    /// Just after `[`: a value or `]`.
    ArrayStart,
    /// Just after `{`: a key or `}`.
    ObjectStart,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value: `,` or the closer, or the end at the top level.
    After,
    /// Inside a string; `key` if it is an object key. `esc`: after `\`; `hex`: \u digits
    /// still expected.
    Str {
        key: bool,
        esc: bool,
        hex: u8,
    },
    Number(Num),
    /// The rest of `true`, `false` or `null`.
    Literal(&'static [u8]),
    /// Before the top-level object.
    Start,
}

/// Where the output is in the grammar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonState {
    pos: Pos,
    /// Open containers, `{` or `[`.
    stack: Vec<u8>,
    ws_run: u8,
}

impl Default for JsonState {
    fn default() -> Self {
        JsonState {
            pos: Pos::Start,
            stack: Vec::new(),
            ws_run: 0,
        }
    }
}

impl JsonState {
    /// The top-level object is closed.
    pub fn is_complete(&self) -> bool {
        self.pos == Pos::After && self.stack.is_empty()
    }

    /// Takes one byte; `false` (state unspecified) if it cannot continue valid JSON.
    pub fn feed(&mut self, b: u8) -> bool {
        match self.pos {
            Pos::Str { key, esc, hex } => return self.string(b, key, esc, hex),
            Pos::Literal(rest) => {
                if rest.first() != Some(&b) {
                    return false;
                }
                self.pos = if rest.len() == 1 {
                    Pos::After
                } else {
                    Pos::Literal(&rest[1..])
                };
                return true;
            }
            Pos::Number(n) => {
                if let Some(next) = n.next(b) {
                    self.pos = Pos::Number(next);
                    return true;
                }
                if !n.complete() {
                    return false;
                }
                self.pos = Pos::After;
            }
            _ => {}
        }
        if matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
            // The answer starts with its `{`.
            if self.pos == Pos::Start {
                return false;
            }
            self.ws_run += 1;
            return self.ws_run <= MAX_WS_RUN;
        }
        self.ws_run = 0;
        match (self.pos, b) {
            (Pos::Start, b'{') => self.open(b'{'),
            (Pos::Start, _) => false,
            (Pos::Value | Pos::ArrayStart, _) if self.value_start(b) => true,
            (Pos::ArrayStart, b']') => self.close(b'['),
            (Pos::ObjectStart | Pos::Key, b'"') => {
                self.pos = Pos::Str {
                    key: true,
                    esc: false,
                    hex: 0,
                };
                true
            }
            (Pos::ObjectStart, b'}') => self.close(b'{'),
            (Pos::Colon, b':') => {
                self.pos = Pos::Value;
                true
            }
            (Pos::After, b',') => match self.stack.last() {
                Some(b'{') => {
                    self.pos = Pos::Key;
                    true
                }
                Some(_) => {
                    self.pos = Pos::Value;
                    true
                }
                None => false,
            },
            (Pos::After, b'}') => self.close(b'{'),
            (Pos::After, b']') => self.close(b'['),
            _ => false,
        }
    }

    fn value_start(&mut self, b: u8) -> bool {
        self.pos = match b {
            b'{' | b'[' => return self.open(b),
            b'"' => Pos::Str {
                key: false,
                esc: false,
                hex: 0,
            },
            b'-' => Pos::Number(Num::Minus),
            b'0' => Pos::Number(Num::Zero),
            b'1'..=b'9' => Pos::Number(Num::Int),
            b't' => Pos::Literal(b"rue"),
            b'f' => Pos::Literal(b"alse"),
            b'n' => Pos::Literal(b"ull"),
            _ => return false,
        };
        true
    }

    fn open(&mut self, b: u8) -> bool {
        // Deep nesting is a runaway model, not data.
        if self.stack.len() >= 64 {
            return false;
        }
        self.stack.push(b);
        self.pos = if b == b'{' {
            Pos::ObjectStart
        } else {
            Pos::ArrayStart
        };
        true
    }

    fn close(&mut self, opener: u8) -> bool {
        if self.stack.pop() != Some(opener) {
            return false;
        }
        self.pos = Pos::After;
        true
    }

    fn string(&mut self, b: u8, key: bool, esc: bool, hex: u8) -> bool {
        let str_pos = |esc, hex| Pos::Str { key, esc, hex };
        self.pos = if hex > 0 {
            if !b.is_ascii_hexdigit() {
                return false;
            }
            str_pos(false, hex - 1)
        } else if esc {
            match b {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => str_pos(false, 0),
                b'u' => str_pos(false, 4),
                _ => return false,
            }
        } else {
            match b {
                b'"' if key => Pos::Colon,
                b'"' => Pos::After,
                b'\\' => str_pos(true, 0),
                0..=0x1f => return false,
                _ => str_pos(false, 0),
            }
        };
        true
    }

    /// The state after `bytes`, if they keep the output valid.
    fn after(&self, bytes: &[u8]) -> Option<JsonState> {
        let mut s = self.clone();
        bytes.iter().all(|&b| s.feed(b)).then_some(s)
    }
}

/// The constraint for one sequence.
#[derive(Debug)]
pub struct JsonMode {
    state: JsonState,
    /// Each token's text; empty for special tokens, which JSON never allows.
    texts: Arc<Vec<Box<[u8]>>>,
    eos: Vec<u32>,
}

impl JsonMode {
    pub fn new(texts: Arc<Vec<Box<[u8]>>>, eos: Vec<u32>) -> Self {
        JsonMode {
            state: JsonState::default(),
            texts,
            eos,
        }
    }

    fn allowed(&self, id: usize) -> bool {
        if self.eos.contains(&(id as u32)) {
            return self.state.is_complete();
        }
        match self.texts.get(id) {
            Some(t) if !t.is_empty() => self.state.after(t).is_some(),
            _ => false,
        }
    }

    /// `logits` with every token that would break the JSON set to -inf. Looks at the best
    /// candidates first and stops once enough valid ones are found.
    pub fn mask(&self, logits: &[f32]) -> Vec<f32> {
        let mut out = vec![f32::NEG_INFINITY; logits.len()];
        let mut order: Vec<usize> = (0..logits.len()).collect();
        let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]);
        let first = FIRST_LOOK.min(order.len());
        if first < order.len() {
            order.select_nth_unstable_by(first, by_logit);
        }
        order[..first].sort_unstable_by(by_logit);
        let mut kept = 0;
        for &id in &order[..first] {
            if self.allowed(id) {
                out[id] = logits[id];
                kept += 1;
                if kept == KEEP {
                    return out;
                }
            }
        }
        if kept == 0 {
            // Rare: nothing near the top fits; search everything.
            for &id in &order[first..] {
                if self.allowed(id) {
                    out[id] = logits[id];
                }
            }
        }
        out
    }

    /// Moves past the sampled token.
    pub fn advance(&mut self, id: u32) {
        if let Some(s) = self
            .texts
            .get(id as usize)
            .and_then(|t| self.state.after(t))
        {
            self.state = s;
        }
    }

    pub fn is_complete(&self) -> bool {
        self.state.is_complete()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_prefix(s: &str) -> Option<JsonState> {
        JsonState::default().after(s.as_bytes())
    }

    #[test]
    fn accepts_objects_and_rejects_the_rest() {
        for ok in [
            r#"{}"#,
            r#"{"a": 1}"#,
            r#"{"a": [1, -2.5e3, 0, true, false, null, "x\"\u00e9"], "b": {"c": {}}}"#,
            "{ \"k\" : \"日本語 🎉\" }",
        ] {
            let s = valid_prefix(ok).unwrap_or_else(|| panic!("{ok}"));
            assert!(s.is_complete(), "{ok}");
        }
        for partial in [r#"{"a": [1, "#, r#"{"a": tr"#, r#"{"a": 1."#, "{"] {
            let s = valid_prefix(partial).unwrap_or_else(|| panic!("{partial}"));
            assert!(!s.is_complete(), "{partial}");
        }
        for bad in [
            "[1]",
            "hello",
            r#"{"a" 1}"#,
            r#"{"a": 01}"#,
            r#"{"a": 1,}"#,
            r#"{a: 1}"#,
            r#"{"a": tru}"#,
            r#"{"a": "\x"}"#,
            r#"{"a": 1]"#,
            "{\"a\": \"line\nbreak\"}",
            "{}}",
            "{      }",
        ] {
            assert!(valid_prefix(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn masking_keeps_only_tokens_that_continue_the_object() {
        let texts: Vec<Box<[u8]>> = ["{", "hello", "\"a\"", ":", " 1", "}", "", "\"a\": 1}"]
            .iter()
            .map(|t| t.as_bytes().into())
            .collect();
        let eos = 6;
        let mut m = JsonMode::new(Arc::new(texts), vec![eos]);
        let logits = vec![1.0, 9.0, 2.0, 3.0, 4.0, 5.0, 8.0, 0.5];
        let allowed = |m: &JsonMode| -> Vec<usize> {
            let row = m.mask(&logits);
            (0..row.len()).filter(|&i| row[i].is_finite()).collect()
        };
        assert_eq!(allowed(&m), vec![0]);
        m.advance(0);
        assert_eq!(allowed(&m), vec![2, 5, 7]);
        m.advance(7);
        assert!(m.is_complete());
        assert_eq!(allowed(&m), vec![eos as usize]);
    }
}
