//! General output grammars (regex, Lark, JSON schema) enforced while
//! decoding: at every step the engine masks the tokens the grammar does not
//! allow, so the reply matches it by construction. Not in the paper or the
//! reference (they parse replies after the fact); this generalises the tag
//! guard ([`super::guard`]) for agents whose outputs must be JSON, a number
//! or a code block (`../shared/docs/attribution-and-constraints.md` §4).
//!
//! The grammar types ([`Grammar`], [`TaggedOutput`]) always exist, so
//! requests and setups parse in every build; enforcing them needs the
//! `grammar` cargo feature (llguidance, the library mistral.rs and vLLM use).
//! A build without it, or a backend that cannot constrain, answers a request
//! with a grammar with a clear error instead of ignoring it.
//!
//! Token masks are computed per request from its own decoded tokens only, and
//! masked sampling draws from the request's own RNG, so a reply still depends
//! only on its seed and history, alone or in any batch.

use serde::{Deserialize, Serialize};

/// A grammar a whole reply must match. In JSON and YAML it is a map with
/// exactly one of `regex`, `lark` or `json_schema`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "GrammarRepr", into = "GrammarRepr")]
pub enum Grammar {
    /// A regular expression (Rust `regex` syntax) matching the whole reply.
    Regex(String),
    /// A Lark grammar (llguidance's dialect: `start: …`, `/regex/`,
    /// `"literal"`, `name[lazy]: …`, `%json {…}`).
    Lark(String),
    /// A JSON schema the reply must be an instance of.
    JsonSchema(serde_json::Value),
}

/// The map form of a [`Grammar`] (YAML has no externally tagged enums).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrammarRepr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lark: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    json_schema: Option<serde_json::Value>,
}

impl TryFrom<GrammarRepr> for Grammar {
    type Error = String;
    fn try_from(r: GrammarRepr) -> Result<Self, String> {
        match (r.regex, r.lark, r.json_schema) {
            (Some(x), None, None) => Ok(Grammar::Regex(x)),
            (None, Some(x), None) => Ok(Grammar::Lark(x)),
            (None, None, Some(x)) => Ok(Grammar::JsonSchema(x)),
            _ => Err("a grammar takes exactly one of `regex`, `lark`, `json_schema`".into()),
        }
    }
}

impl From<Grammar> for GrammarRepr {
    fn from(g: Grammar) -> Self {
        let mut r = GrammarRepr {
            regex: None,
            lark: None,
            json_schema: None,
        };
        match g {
            Grammar::Regex(x) => r.regex = Some(x),
            Grammar::Lark(x) => r.lark = Some(x),
            Grammar::JsonSchema(x) => r.json_schema = Some(x),
        }
        r
    }
}

impl Grammar {
    /// This grammar as a Lark rule body (for composing it into a larger grammar).
    fn as_lark_body(&self) -> String {
        match self {
            Grammar::Regex(rx) => format!("/{}/", escape_slashes(rx)),
            Grammar::Lark(src) => format!("%lark {{\n{src}\n}}"),
            Grammar::JsonSchema(schema) => format!("%json {schema}"),
        }
    }

    /// Short name of the kind, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Grammar::Regex(_) => "regex",
            Grammar::Lark(_) => "lark",
            Grammar::JsonSchema(_) => "json_schema",
        }
    }

    /// A reply made of `<tag>…</tag>` sections in the order of `tags`, with
    /// free text before each opening tag; a tag with a grammar holds exactly
    /// a match of it, one without holds free text. The reply ends right
    /// after the last closing tag.
    pub fn tagged(tags: &[TaggedOutput]) -> Grammar {
        let mut start = Vec::new();
        let mut rules = Vec::new();
        for (i, t) in tags.iter().enumerate() {
            let name = &t.tag;
            rules.push(format!("t{i}_open[lazy]: /(?s:.*)/ \"<{name}>\""));
            start.push(format!("t{i}_open"));
            match &t.grammar {
                Some(g) => {
                    rules.push(format!("t{i}_body: {}", g.as_lark_body()));
                    start.push(format!("t{i}_body \"</{name}>\""));
                }
                None => {
                    rules.push(format!("t{i}_body[lazy]: /(?s:.*)/ \"</{name}>\""));
                    start.push(format!("t{i}_body"));
                }
            }
        }
        let mut src = format!("start: {}\n", start.join(" "));
        for r in rules {
            src.push_str(&r);
            src.push('\n');
        }
        Grammar::Lark(src)
    }
}

/// The request fields OpenAI-compatible servers read a grammar from:
/// `response_format` (`json_object`, `json_schema`; OpenAI, vLLM, SGLang,
/// llama.cpp), vLLM's `structured_outputs` / `guided_regex|grammar|json`
/// and SGLang's `regex`. Used by the client to send a grammar and by
/// `cantante serve` to read one back; `None` when the body has none, an
/// error naming the field when it is malformed or names two different ones.
pub fn from_openai_body(v: &serde_json::Value) -> Result<Option<Grammar>, String> {
    let mut found: Vec<(&str, Grammar)> = Vec::new();
    let s = |f: &str, x: &serde_json::Value| -> Result<Option<String>, String> {
        match x {
            serde_json::Value::Null => Ok(None),
            serde_json::Value::String(s) => Ok(Some(s.clone())),
            _ => Err(format!("`{f}` must be a string")),
        }
    };
    match &v["response_format"] {
        serde_json::Value::Null => {}
        rf => match rf["type"].as_str() {
            Some("text") => {}
            Some("json_object") => found.push((
                "response_format",
                Grammar::JsonSchema(serde_json::json!({"type": "object"})),
            )),
            Some("json_schema") => {
                let schema = &rf["json_schema"]["schema"];
                if !schema.is_object() && !schema.is_boolean() {
                    return Err("`response_format.json_schema.schema` must be a JSON schema".into());
                }
                found.push(("response_format", Grammar::JsonSchema(schema.clone())));
            }
            _ => {
                return Err(
                    "`response_format.type` must be \"text\", \"json_object\" or \"json_schema\""
                        .into(),
                )
            }
        },
    }
    let so = &v["structured_outputs"];
    if let Some(o) = so.as_object() {
        if let Some(k) = o
            .keys()
            .find(|k| !["regex", "grammar", "json"].contains(&k.as_str()))
        {
            return Err(format!(
                "`structured_outputs.{k}` is not supported (regex, grammar, json are)"
            ));
        }
    } else if !so.is_null() {
        return Err("`structured_outputs` must be an object".into());
    }
    for (f, x) in [
        ("structured_outputs.regex", &so["regex"]),
        ("guided_regex", &v["guided_regex"]),
        ("regex", &v["regex"]),
    ] {
        if let Some(rx) = s(f, x)? {
            found.push((f, Grammar::Regex(rx)));
        }
    }
    for (f, x) in [
        ("structured_outputs.grammar", &so["grammar"]),
        ("guided_grammar", &v["guided_grammar"]),
    ] {
        if let Some(src) = s(f, x)? {
            found.push((f, Grammar::Lark(src)));
        }
    }
    for (f, x) in [
        ("structured_outputs.json", &so["json"]),
        ("guided_json", &v["guided_json"]),
    ] {
        match x {
            serde_json::Value::Null => {}
            serde_json::Value::String(t) => found.push((
                f,
                Grammar::JsonSchema(
                    serde_json::from_str(t).map_err(|e| format!("`{f}`: not JSON: {e}"))?,
                ),
            )),
            x => found.push((f, Grammar::JsonSchema(x.clone()))),
        }
    }
    let Some((first, g)) = found.first().cloned() else {
        return Ok(None);
    };
    if let Some((other, _)) = found.iter().find(|(_, h)| *h != g) {
        return Err(format!(
            "`{first}` and `{other}` ask for different output grammars"
        ));
    }
    Ok(Some(g))
}

impl Grammar {
    /// Write this grammar into an OpenAI-compatible request body, in the
    /// fields the common servers read (see [`from_openai_body`]).
    pub fn to_openai_body(&self, body: &mut serde_json::Value) {
        match self {
            Grammar::JsonSchema(schema) => {
                body["response_format"] = serde_json::json!({
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": schema, "strict": true},
                });
            }
            Grammar::Regex(rx) => {
                body["structured_outputs"] = serde_json::json!({ "regex": rx });
                body["guided_regex"] = rx.clone().into();
                body["regex"] = rx.clone().into();
            }
            Grammar::Lark(src) => {
                body["structured_outputs"] = serde_json::json!({ "grammar": src });
                body["guided_grammar"] = src.clone().into();
            }
        }
    }
}

/// One tag of a [`Grammar::tagged`] reply.
#[derive(Debug, Clone, PartialEq)]
pub struct TaggedOutput {
    /// The tag name (an agent's output variable; letters, digits, `_`, `-`).
    pub tag: String,
    /// What the tag must hold; `None` for free text.
    pub grammar: Option<Grammar>,
}

/// `/` → `\/` where not already escaped (Lark regex literals end at `/`).
fn escape_slashes(rx: &str) -> String {
    let mut out = String::with_capacity(rx.len());
    let mut escaped = false;
    for c in rx.chars() {
        if c == '/' && !escaped {
            out.push('\\');
        }
        escaped = c == '\\' && !escaped;
        out.push(c);
    }
    out
}

pub use imp::{check, Compiler, Matcher};

#[cfg(feature = "grammar")]
mod imp {
    use super::Grammar;
    use crate::llm::tokenizer::Tokenizer;
    use crate::llm::{LlmError, Result};
    use llguidance::api::TopLevelGrammar;
    use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
    use llguidance::ParserFactory;
    use std::sync::Arc;

    /// The model's tokenizer seen as byte strings (llguidance's token trie).
    struct Env {
        trie: TokTrie,
        tokenizer: Tokenizer,
    }

    impl TokenizerEnv for Env {
        fn tok_trie(&self) -> &TokTrie {
            &self.trie
        }
        fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
            match std::str::from_utf8(s) {
                Ok(text) => self
                    .tokenizer
                    .encode(text)
                    .unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
                Err(_) => self.trie.greedy_tokenize(s),
            }
        }
    }

    /// Compile `g` with `factory`: the matcher, or llguidance's reason.
    fn compile(
        factory: &ParserFactory,
        g: &Grammar,
    ) -> std::result::Result<llguidance::Matcher, String> {
        let top = match g {
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Grammar::Lark(src) => TopLevelGrammar::from_lark(src.clone()),
            Grammar::JsonSchema(s) => TopLevelGrammar::from_json_schema(s.clone()),
        };
        let m = llguidance::Matcher::new(factory.create_parser(top));
        match m.get_error() {
            Some(e) => Err(e),
            None => Ok(m),
        }
    }

    /// Compiles grammars for one model's tokenizer (built once per engine).
    pub struct Compiler {
        factory: ParserFactory,
        eos: Vec<u32>,
    }

    impl Compiler {
        /// A compiler for `tokenizer`, whose replies end with any of `eos`,
        /// for logits of `n_logits` entries (the model's output width, which
        /// may exceed the tokenizer's vocabulary).
        pub fn new(tokenizer: &Tokenizer, eos: &[u32], n_logits: usize) -> Result<Self> {
            let err = |m: String| LlmError::Tokenizer(format!("grammar token table: {m}"));
            let json: serde_json::Value =
                serde_json::from_str(&tokenizer.to_json()?).map_err(|e| err(e.to_string()))?;
            // llguidance asserts on tokenizer shapes it does not know; keep a
            // panic there from taking the engine down.
            let mut words =
                std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
                    .map_err(|_| err("unsupported tokenizer layout".into()))?
                    .map_err(|e| err(e.to_string()))?;
            if words.len() > n_logits {
                return Err(err(format!(
                    "tokenizer has {} tokens but the model only {n_logits} logits",
                    words.len()
                )));
            }
            words.resize(n_logits, Vec::new());
            let first_eos = *eos
                .first()
                .ok_or_else(|| err("the model has no end-of-sequence token".into()))?;
            let info = TokRxInfo::new(n_logits as u32, first_eos);
            let trie = TokTrie::from(&info, &words).with_eos_tokens(eos);
            let env: TokEnv = Arc::new(Env {
                trie,
                tokenizer: tokenizer.clone(),
            });
            let mut factory = ParserFactory::new_simple(&env).map_err(|e| err(e.to_string()))?;
            factory.quiet();
            Ok(Self {
                factory,
                eos: eos.to_vec(),
            })
        }

        /// A matcher for one reply under `g`; a grammar that does not
        /// compile is an error naming what is wrong.
        pub fn matcher(&self, g: &Grammar) -> Result<Matcher> {
            let m = compile(&self.factory, g)
                .map_err(|e| LlmError::Other(format!("{} grammar: {e}", g.kind())))?;
            Ok(Matcher {
                m,
                eos: self.eos.clone(),
            })
        }
    }

    /// Whether `g` compiles (against a one-byte-per-token vocabulary, so
    /// no model is needed): setup validation reports a broken grammar
    /// before any model runs.
    pub fn check(g: &Grammar) -> std::result::Result<(), String> {
        static FACTORY: std::sync::OnceLock<std::result::Result<ParserFactory, String>> =
            std::sync::OnceLock::new();
        let factory = FACTORY
            .get_or_init(|| {
                let env = llguidance::toktrie::ApproximateTokEnv::single_byte_env();
                let mut f = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
                f.quiet();
                Ok(f)
            })
            .as_ref()?;
        compile(factory, g).map(drop)
    }

    /// The grammar state of one reply.
    pub struct Matcher {
        m: llguidance::Matcher,
        eos: Vec<u32>,
    }

    impl Matcher {
        fn error(&self) -> LlmError {
            LlmError::Other(format!(
                "grammar: {}",
                self.m
                    .get_error()
                    .unwrap_or_else(|| "no token allowed".into())
            ))
        }

        /// Set the logits of every token the grammar does not allow next to
        /// −∞ (end-of-sequence is allowed exactly when the reply so far is a
        /// complete match).
        pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
            let mask = self.m.compute_mask().map_err(|_| self.error())?;
            let eos_ok = self.eos.iter().any(|&e| mask.is_allowed(e));
            let eos_logits: Vec<f32> = self
                .eos
                .iter()
                .map(|&e| logits.get(e as usize).copied().unwrap_or(f32::NEG_INFINITY))
                .collect();
            let n = logits.len();
            logits[n.min(mask.len())..].fill(f32::NEG_INFINITY);
            mask.iter_unset_entries(|i| {
                if let Some(x) = logits.get_mut(i) {
                    *x = f32::NEG_INFINITY;
                }
            });
            // Every end-of-sequence token of the model ends the reply exactly
            // when the grammar allows its own.
            for (&e, &v) in self.eos.iter().zip(&eos_logits) {
                if let Some(x) = logits.get_mut(e as usize) {
                    *x = if eos_ok { v } else { f32::NEG_INFINITY };
                }
            }
            if logits.iter().any(|x| x.is_finite()) {
                Ok(())
            } else {
                Err(self.error())
            }
        }

        /// Advance past an emitted token (end-of-sequence tokens end the
        /// reply and are not fed to the grammar).
        pub fn consume(&mut self, token: u32) -> Result<()> {
            if self.eos.contains(&token) {
                return Ok(());
            }
            self.m.consume_token(token).map_err(|_| self.error())
        }

        /// Whether the grammar allows nothing more: the reply is complete.
        pub fn is_stopped(&self) -> bool {
            self.m.is_stopped()
        }
    }
}

#[cfg(not(feature = "grammar"))]
mod imp {
    use super::Grammar;
    use crate::llm::tokenizer::Tokenizer;
    use crate::llm::{LlmError, Result};

    /// Grammar compiler of a build without the `grammar` feature: every
    /// grammar is refused with a message saying how to enable it.
    pub struct Compiler;

    impl Compiler {
        /// Always succeeds (nothing to build).
        pub fn new(_: &Tokenizer, _: &[u32], _: usize) -> Result<Self> {
            Ok(Self)
        }
        /// Refuses: this build cannot enforce grammars.
        pub fn matcher(&self, g: &Grammar) -> Result<Matcher> {
            Err(LlmError::Unsupported(format!(
                "this build cannot enforce a {} grammar: rebuild with `--features grammar`",
                g.kind()
            )))
        }
    }

    /// Without the `grammar` feature nothing is checked (the engine
    /// refuses grammar requests instead).
    pub fn check(_: &Grammar) -> std::result::Result<(), String> {
        Ok(())
    }

    /// Uninhabited: no matcher exists without the `grammar` feature.
    pub enum Matcher {}

    impl Matcher {
        /// Unreachable.
        pub fn mask(&mut self, _: &mut [f32]) -> Result<()> {
            match *self {}
        }
        /// Unreachable.
        pub fn consume(&mut self, _: u32) -> Result<()> {
            match *self {}
        }
        /// Unreachable.
        pub fn is_stopped(&self) -> bool {
            match *self {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slashes_are_escaped_once() {
        assert_eq!(escape_slashes(r"a/b\/c"), r"a\/b\/c");
        assert_eq!(escape_slashes(r"\\/"), r"\\\/");
    }

    #[test]
    fn tagged_grammar_lists_tags_in_order() {
        let g = Grammar::tagged(&[
            TaggedOutput {
                tag: "plan".into(),
                grammar: None,
            },
            TaggedOutput {
                tag: "answer".into(),
                grammar: Some(Grammar::Regex("-?[0-9]+".into())),
            },
        ]);
        let Grammar::Lark(src) = g else {
            panic!("not lark")
        };
        assert!(src.starts_with("start: t0_open t0_body t1_open t1_body \"</answer>\""));
        assert!(src.contains("t1_body: /-?[0-9]+/"), "{src}");
        assert!(
            src.contains("t0_body[lazy]: /(?s:.*)/ \"</plan>\""),
            "{src}"
        );
    }

    #[test]
    fn openai_fields_round_trip() {
        let gs = [
            Grammar::Regex("[0-9]+".into()),
            Grammar::Lark("start: \"a\"".into()),
            Grammar::JsonSchema(serde_json::json!({"type": "integer"})),
        ];
        for g in gs {
            let mut body = serde_json::json!({"model": "m"});
            g.to_openai_body(&mut body);
            assert_eq!(from_openai_body(&body), Ok(Some(g)));
        }
        assert_eq!(from_openai_body(&serde_json::json!({})), Ok(None));
        let j = from_openai_body(&serde_json::json!({"response_format": {"type": "json_object"}}));
        assert_eq!(j.unwrap().unwrap().kind(), "json_schema");
        let two = serde_json::json!({"guided_regex": "a", "regex": "b"});
        assert!(from_openai_body(&two).unwrap_err().contains("different"));
        let bad = serde_json::json!({"response_format": {"type": "xml"}});
        assert!(from_openai_body(&bad).is_err());
        let bad = serde_json::json!({"guided_json": "{"});
        assert!(from_openai_body(&bad).unwrap_err().contains("guided_json"));
    }

    #[cfg(feature = "grammar")]
    fn tiny_compiler() -> (crate::llm::tokenizer::Tokenizer, Compiler, u32) {
        use crate::llm::gguf_tokenizer::{pre_tokenizer_for, tokenizer_json};
        let (tokens, types, merges) = crate::llm::tiny::tiny_vocab();
        let pre = pre_tokenizer_for("qwen2").unwrap_or_default();
        let json = tokenizer_json(&tokens, &types, &merges, pre).unwrap();
        let tok = crate::llm::tokenizer::Tokenizer::from_json_str(&json.to_string()).unwrap();
        let eos = tok.token_to_id("<|im_end|>").unwrap();
        // Two logits beyond the vocabulary, as models pad their output width.
        let c = Compiler::new(&tok, &[eos], tokens.len() + 2).unwrap();
        (tok, c, eos)
    }

    /// Feed `text` token by token; true if every token was allowed by the mask.
    #[cfg(feature = "grammar")]
    fn follows(
        m: &mut Matcher,
        tok: &crate::llm::tokenizer::Tokenizer,
        n: usize,
        text: &str,
    ) -> bool {
        for t in tok.encode(text).unwrap() {
            let mut logits = vec![0.0f32; n];
            m.mask(&mut logits).unwrap();
            if !logits[t as usize].is_finite() {
                return false;
            }
            m.consume(t).unwrap();
        }
        true
    }

    #[cfg(feature = "grammar")]
    #[test]
    fn tagged_grammar_accepts_prose_then_tags_and_stops_after_the_last() {
        let (tok, c, eos) = tiny_compiler();
        let n = tok.vocab_size() + 2;
        let g = Grammar::tagged(&[
            TaggedOutput {
                tag: "reason".into(),
                grammar: None,
            },
            TaggedOutput {
                tag: "answer".into(),
                grammar: Some(Grammar::Regex("-?[0-9]+".into())),
            },
        ]);
        let mut m = c.matcher(&g).unwrap();
        let reply = "Let me think: 6 * 7.\n<reason>six sevens</reason>\n<answer>42</answer>";
        assert!(follows(&mut m, &tok, n, reply));
        assert!(m.is_stopped(), "nothing may follow the last closing tag");
        // A letter inside the regex-constrained tag is masked out.
        let mut m = c.matcher(&g).unwrap();
        assert!(follows(&mut m, &tok, n, "<reason>x</reason><answer>4"));
        let mut logits = vec![0.0f32; n];
        m.mask(&mut logits).unwrap();
        assert!(!logits[tok.encode("a").unwrap()[0] as usize].is_finite());
        assert!(logits[tok.encode("2").unwrap()[0] as usize].is_finite());
        assert!(!logits[eos as usize].is_finite(), "no end before </answer>");
        // The padded logits beyond the vocabulary are never allowed.
        assert!(!logits[n - 1].is_finite());
    }

    #[cfg(feature = "grammar")]
    #[test]
    fn bad_grammars_are_errors_not_panics() {
        let (_, c, _) = tiny_compiler();
        let e = c.matcher(&Grammar::Lark("start: undefined_rule".into()));
        assert!(e.is_err());
        let e = c.matcher(&Grammar::Regex("(".into()));
        assert!(e.is_err());
        let e = c.matcher(&Grammar::JsonSchema(serde_json::json!({"type": 7})));
        assert!(e.is_err());
    }

    #[test]
    fn grammar_serde_is_tagged_by_kind() {
        let g: Grammar = serde_json::from_str(r#"{"regex": "[0-9]+"}"#).unwrap();
        assert_eq!(g, Grammar::Regex("[0-9]+".into()));
        let g: Grammar = serde_yaml::from_str("json_schema: {type: integer}").unwrap();
        assert_eq!(g.kind(), "json_schema");
        assert!(serde_json::from_str::<Grammar>(r#"{"ebnf": "x"}"#).is_err());
        assert!(serde_json::from_str::<Grammar>(r#"{"regex": "x", "lark": "y"}"#).is_err());
        let back: Grammar = serde_json::from_str(&serde_json::to_string(&g).unwrap()).unwrap();
        assert_eq!(back, g);
    }
}
