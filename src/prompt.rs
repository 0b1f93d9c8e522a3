//! Prompt templates: placeholder filling, per-field token caps, the optional
//! few-shot section, and the `<var>…</var>` tag protocol that agents answer in
//! (reference spec §1.4 steps 2 and 6, §1.5).
//!
//! # Template syntax
//!
//! Templates follow Python `str.format` with *safe* semantics:
//!
//! - `{name}` where `name` is an identifier (`[A-Za-z_][A-Za-z0-9_]*`) is a
//!   placeholder. It is replaced when the caller knows `name`, and left
//!   literally (`{name}`) otherwise.
//! - `{{` and `}}` are escaped braces and render as `{` and `}`. Prompts that
//!   show JSON (e.g. the tool-call syntax) must double their braces:
//!   `<tool_call>{{"name": "read_code", "arguments": {{}}}}</tool_call>`.
//! - Any other brace (an unknown single-brace group such as `{"a": 1}`,
//!   `{}`, `{0}`, a lone `}`) is kept literally.
//!
//! Rendering never fails: there is no "send the raw template on a formatting
//! error" path (a reference defect, §10.12).
//!
//! # Few-shot section
//!
//! A template may hold a `<few_shots_section>…{few_shots}…</few_shots_section>`
//! block. [`apply_few_shots`] fills it with the shots (joined by blank lines,
//! wrapper tags dropped) or removes it when there are none. A section is the
//! span between a closing tag and the *nearest* opening tag before it, and only
//! a section that actually contains the `{few_shots}` placeholder is removed, so
//! prose that merely mentions the tag is never eaten (a reference defect, §1.5).

use crate::llm::Llm;
use std::collections::BTreeMap;

/// Name of the few-shot placeholder and state variable.
pub const FEW_SHOTS: &str = "few_shots";
/// Opening tag of the optional few-shot block.
pub const FEW_SHOTS_OPEN: &str = "<few_shots_section>";
/// Closing tag of the optional few-shot block.
pub const FEW_SHOTS_CLOSE: &str = "</few_shots_section>";
/// Suffix appended to a field value cut by its token cap.
pub const TRUNCATION_SUFFIX: &str = " ... [truncated]";

/// One lexical piece of a template, with its byte range in the template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// Literal text, rendered as is.
    Text(usize, usize),
    /// An escaped brace (`{{` or `}}`), rendered as the single brace.
    Brace(usize, char),
    /// A `{identifier}` placeholder: whole range and the name's range.
    Var(usize, usize, usize, usize),
}

/// Whether `b` starts an identifier.
fn ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}
/// Whether `b` continues an identifier.
fn ident_cont(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Split a template into literal text, escaped braces and placeholders.
fn lex(t: &str) -> Vec<Piece> {
    let b = t.as_bytes();
    let mut out = Vec::new();
    let mut text_start = 0;
    let mut i = 0;
    let flush = |out: &mut Vec<Piece>, from: usize, to: usize| {
        if to > from {
            out.push(Piece::Text(from, to));
        }
    };
    while i < b.len() {
        match b[i] {
            b'{' if b.get(i + 1) == Some(&b'{') => {
                flush(&mut out, text_start, i);
                out.push(Piece::Brace(i, '{'));
                i += 2;
                text_start = i;
            }
            b'}' if b.get(i + 1) == Some(&b'}') => {
                flush(&mut out, text_start, i);
                out.push(Piece::Brace(i, '}'));
                i += 2;
                text_start = i;
            }
            b'{' if b.get(i + 1).is_some_and(|&c| ident_start(c)) => {
                let mut j = i + 2;
                while j < b.len() && ident_cont(b[j]) {
                    j += 1;
                }
                if b.get(j) == Some(&b'}') {
                    flush(&mut out, text_start, i);
                    out.push(Piece::Var(i, j + 1, i + 1, j));
                    i = j + 1;
                    text_start = i;
                } else {
                    // `{abc` not closed right away (e.g. `{a.b}`, `{x:>3}`): literal.
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    flush(&mut out, text_start, b.len());
    out
}

/// Escape `text` so that it renders verbatim inside a template (`{` → `{{`, `}` → `}}`).
pub fn escape(text: &str) -> String {
    text.replace('{', "{{").replace('}', "}}")
}

/// Fill placeholders from a lookup function: `{name}` becomes `lookup(name)`
/// when that is `Some`, and stays literal otherwise; `{{`/`}}` collapse.
/// Never fails. Values are inserted verbatim (braces in them are not
/// interpreted).
pub fn fill_with(template: &str, lookup: &mut dyn FnMut(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len());
    for p in lex(template) {
        match p {
            Piece::Text(s, e) => out.push_str(&template[s..e]),
            Piece::Brace(_, c) => out.push(c),
            Piece::Var(s, e, ns, ne) => match lookup(&template[ns..ne]) {
                Some(v) => out.push_str(&v),
                None => out.push_str(&template[s..e]),
            },
        }
    }
    out
}

/// Fill placeholders from a map (see [`fill_with`]).
pub fn fill(template: &str, vars: &BTreeMap<String, String>) -> String {
    fill_with(template, &mut |name| vars.get(name).cloned())
}

/// The placeholder names of a template, unique, in order of first appearance.
/// Escaped groups (`{{name}}`) are not placeholders.
pub fn placeholders(template: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for p in lex(template) {
        if let Piece::Var(_, _, ns, ne) = p {
            let name = &template[ns..ne];
            if !out.iter().any(|n| n == name) {
                out.push(name.to_string());
            }
        }
    }
    out
}

/// How many times `{name}` is written in the template (escaped groups
/// `{{name}}` do not count).
pub fn placeholder_count(template: &str, name: &str) -> usize {
    lex(template)
        .into_iter()
        .filter(|p| matches!(p, Piece::Var(_, _, ns, ne) if &template[*ns..*ne] == name))
        .count()
}

/// The input variables (other than `few_shots`, which is optional) that have
/// no `{var}` placeholder in the template, in `input_vars` order.
pub fn missing_placeholders<S: AsRef<str>>(template: &str, input_vars: &[S]) -> Vec<String> {
    let present = placeholders(template);
    input_vars
        .iter()
        .map(AsRef::as_ref)
        .filter(|v| *v != FEW_SHOTS && !present.iter().any(|p| p == v))
        .map(str::to_string)
        .collect()
}

/// The output variables whose opening tag `<var>` is never mentioned in `text`
/// (a prompt must tell the model about every output tag), in `output_vars` order.
pub fn missing_output_tags<S: AsRef<str>>(text: &str, output_vars: &[S]) -> Vec<String> {
    output_vars
        .iter()
        .map(AsRef::as_ref)
        .filter(|v| !text.contains(&format!("<{v}>")))
        .map(str::to_string)
        .collect()
}

/// Whether `text` mentions the opening tag `<var>` of every output variable.
pub fn output_tags_present<S: AsRef<str>>(text: &str, output_vars: &[S]) -> bool {
    missing_output_tags(text, output_vars).is_empty()
}

/// The content of the first `<var>…</var>` in `reply` (non-greedy, across
/// newlines), trimmed; `None` when there is no complete tag pair.
pub fn extract_tag(reply: &str, var: &str) -> Option<String> {
    let open = format!("<{var}>");
    let close = format!("</{var}>");
    let start = reply.find(&open)? + open.len();
    let len = reply[start..].find(&close)?;
    Some(reply[start..start + len].trim().to_string())
}

/// Byte ranges `(open_start, open_end, close_start, close_end)` of the
/// few-shot sections: each closing tag paired with the nearest opening tag
/// before it (and after the previous section).
fn few_shot_sections(t: &str) -> Vec<(usize, usize, usize, usize)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(c) = t[pos..].find(FEW_SHOTS_CLOSE).map(|c| c + pos) {
        if let Some(o) = t[pos..c].rfind(FEW_SHOTS_OPEN).map(|o| o + pos) {
            out.push((o, o + FEW_SHOTS_OPEN.len(), c, c + FEW_SHOTS_CLOSE.len()));
        }
        pos = c + FEW_SHOTS_CLOSE.len();
    }
    out
}

/// Number of `\n` at the end of `s`, ignoring spaces and tabs.
fn trailing_newlines(s: &str) -> usize {
    s.trim_end_matches([' ', '\t'])
        .chars()
        .rev()
        .take_while(|&c| c == '\n')
        .count()
}

/// Few-shot construction (reference §1.5, fixed). Returns a *template* (the
/// shots are brace-escaped, so they render verbatim):
///
/// - shots given, template has sections holding `{few_shots}`: each such
///   placeholder becomes the shots joined by blank lines, those sections'
///   wrapper tags are dropped, and stray `{few_shots}` outside them are removed;
/// - shots given, placeholder but no section: every placeholder gets the shots;
/// - shots given, no placeholder: the shots are appended after a blank line;
/// - no shots: every section holding `{few_shots}` is deleted (blank lines
///   around it collapse to one) and stray placeholders are removed.
///
/// Sections without the placeholder, and tag mentions in prose, are left as is.
pub fn apply_few_shots<S: AsRef<str>>(template: &str, shots: &[S]) -> String {
    let pieces = lex(template);
    let fs: Vec<(usize, usize)> = pieces
        .iter()
        .filter_map(|p| match *p {
            Piece::Var(s, e, ns, ne) if &template[ns..ne] == FEW_SHOTS => Some((s, e)),
            _ => None,
        })
        .collect();
    let joined = escape(
        &shots
            .iter()
            .map(AsRef::as_ref)
            .collect::<Vec<_>>()
            .join("\n\n"),
    );
    if !shots.is_empty() && fs.is_empty() {
        let mut out = template.trim_end().to_string();
        out.push_str("\n\n");
        out.push_str(&joined);
        return out;
    }
    let active: Vec<_> = few_shot_sections(template)
        .into_iter()
        .filter(|&(o, _, _, ce)| fs.iter().any(|&(s, e)| s >= o && e <= ce))
        .collect();
    let inside = |s: usize| active.iter().any(|&(o, _, _, ce)| s >= o && s < ce);
    // Edits: (start, end, replacement), non-overlapping, sorted by start.
    let mut edits: Vec<(usize, usize, String)> = Vec::new();
    if shots.is_empty() {
        for &(o, _, _, ce) in &active {
            edits.push((o, ce, String::new()));
        }
        for &(s, e) in fs.iter().filter(|(s, _)| !inside(*s)) {
            edits.push((s, e, String::new()));
        }
    } else {
        for &(o, oe, c, ce) in &active {
            edits.push((o, oe, String::new()));
            edits.push((c, ce, String::new()));
        }
        for &(s, e) in &fs {
            let fill = if inside(s) || active.is_empty() {
                joined.clone()
            } else {
                String::new()
            };
            edits.push((s, e, fill));
        }
    }
    edits.sort_by_key(|e| e.0);
    let mut out = String::with_capacity(template.len() + joined.len());
    let mut pos = 0;
    for (s, e, rep) in edits {
        out.push_str(&template[pos..s]);
        out.push_str(&rep);
        pos = e;
        if shots.is_empty() && rep.is_empty() {
            // Collapse the blank lines around a removed span to one blank line.
            let before = trailing_newlines(&out);
            let rest = &template[pos..];
            let lead: usize = rest.chars().take_while(|&c| c == '\n').count();
            if before > 0 && before + lead > 2 {
                pos += lead.min(before + lead - 2);
            }
        }
    }
    out.push_str(&template[pos..]);
    out
}

/// A per-field token cap: values longer than `max_tokens` tokens are cut by
/// `truncate` and get [`TRUNCATION_SUFFIX`]. `max_tokens == 0` disables it.
#[derive(Clone, Copy)]
pub struct FieldCap<'a> {
    /// Largest number of tokens a field value keeps.
    pub max_tokens: usize,
    /// `truncate(text, n)`: the longest prefix of `text` with at most `n` tokens.
    pub truncate: &'a dyn Fn(&str, usize) -> String,
}

impl<'a> FieldCap<'a> {
    /// Cap a value; the suffix is added only when the value was actually cut.
    pub fn apply(&self, value: &str) -> String {
        cap_field(value, self.max_tokens, self.truncate)
    }
}

/// Cut `value` to `max_tokens` tokens with `truncate`, appending
/// [`TRUNCATION_SUFFIX`] when it was cut. `max_tokens == 0` means no cap.
pub fn cap_field(
    value: &str,
    max_tokens: usize,
    truncate: &dyn Fn(&str, usize) -> String,
) -> String {
    if max_tokens == 0 {
        return value.to_string();
    }
    let cut = truncate(value, max_tokens);
    if cut.len() < value.len() {
        format!("{}{TRUNCATION_SUFFIX}", cut.trim_end())
    } else {
        value.to_string()
    }
}

/// Render an agent prompt: few-shot construction ([`apply_few_shots`]), then
/// placeholder filling from `vars` with each value capped by `cap`.
/// `vars["few_shots"]` is ignored (shots only come from `shots`); names not
/// in `vars` stay literal.
pub fn render<S: AsRef<str>>(
    template: &str,
    vars: &BTreeMap<String, String>,
    shots: &[S],
    cap: Option<FieldCap<'_>>,
) -> String {
    let t = apply_few_shots(template, shots);
    fill_with(&t, &mut |name| {
        if name == FEW_SHOTS {
            return Some(String::new());
        }
        let v = vars.get(name)?;
        Some(match cap {
            Some(c) => c.apply(v),
            None => v.clone(),
        })
    })
}

/// [`render`] with field caps measured by `llm`'s tokenizer.
pub fn render_with_llm<S: AsRef<str>>(
    template: &str,
    vars: &BTreeMap<String, String>,
    shots: &[S],
    field_token_cap: usize,
    llm: &dyn Llm,
) -> String {
    let truncate = |t: &str, n: usize| llm.truncate_tokens(t, n);
    render(
        template,
        vars,
        shots,
        Some(FieldCap {
            max_tokens: field_token_cap,
            truncate: &truncate,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const NO_SHOTS: &[&str] = &[];

    #[test]
    fn fills_known_and_keeps_unknown() {
        let v = vars(&[("query", "2+2"), ("plan", "add")]);
        assert_eq!(
            fill("Q: {query} P: {plan} X: {other}", &v),
            "Q: 2+2 P: add X: {other}"
        );
    }

    #[test]
    fn escapes_and_literal_groups() {
        let v = vars(&[("query", "q")]);
        assert_eq!(fill("{{query}} {query}", &v), "{query} q");
        assert_eq!(fill("{{{query}}}", &v), "{q}");
        assert_eq!(
            fill(
                r#"<tool_call>{{"name": "read_code", "arguments": {{}}}}</tool_call>"#,
                &v
            ),
            r#"<tool_call>{"name": "read_code", "arguments": {}}</tool_call>"#
        );
        // Unknown single-brace groups, empty and positional fields, lone braces: literal.
        assert_eq!(
            fill(r#"{"a": 1} {} {0} { query} {a.b} x } {"#, &v),
            r#"{"a": 1} {} {0} { query} {a.b} x } {"#
        );
        assert_eq!(fill("{query:>5}", &v), "{query:>5}");
        // Unbalanced braces never fail.
        assert_eq!(fill("{query", &v), "{query");
        assert_eq!(fill("}{query}{", &v), "}q{");
    }

    #[test]
    fn values_are_not_reinterpreted() {
        let v = vars(&[("code", "d = {x}; e = {{}}"), ("x", "BAD")]);
        assert_eq!(fill("{code}", &v), "d = {x}; e = {{}}");
    }

    #[test]
    fn unicode_text_is_preserved() {
        let v = vars(&[("query", "ünï")]);
        assert_eq!(fill("→ {query} ← {ß}", &v), "→ ünï ← {ß}");
    }

    #[test]
    fn placeholder_helpers() {
        let t = "A {query} B {{plan}} {code} {query} {few_shots}";
        assert_eq!(placeholders(t), vec!["query", "code", "few_shots"]);
        assert_eq!(
            missing_placeholders(t, &["query", "plan", "few_shots", "code"]),
            vec!["plan"]
        );
        assert!(missing_placeholders("no shots {q}", &["q", "few_shots"]).is_empty());
        assert!(output_tags_present("say <a>x</a> and `<b>`", &["a", "b"]));
        assert_eq!(missing_output_tags("say <a>x</a>", &["a", "b"]), vec!["b"]);
    }

    #[test]
    fn extracts_first_tag_non_greedy() {
        let r = "x <p> 1\n2 </p> y <p>3</p>";
        assert_eq!(extract_tag(r, "p").as_deref(), Some("1\n2"));
        assert_eq!(extract_tag("<p>open only", "p"), None);
        assert_eq!(extract_tag("nothing", "p"), None);
        assert_eq!(extract_tag("<p></p>", "p").as_deref(), Some(""));
        assert_eq!(extract_tag("<pp>1</pp><p>2</p>", "p").as_deref(), Some("2"));
    }

    #[test]
    fn few_shot_section_removed_without_shots() {
        let t = "Solve {query}.\n\n<few_shots_section>Examples:\n{few_shots}\n</few_shots_section>\n\nAnswer in <x>.";
        assert_eq!(
            apply_few_shots(t, NO_SHOTS),
            "Solve {query}.\n\nAnswer in <x>."
        );
        let t2 = "A<few_shots_section> {few_shots}</few_shots_section>B";
        assert_eq!(apply_few_shots(t2, NO_SHOTS), "AB");
    }

    #[test]
    fn few_shot_section_filled_with_shots() {
        let t =
            "Solve {query}.\n<few_shots_section>Examples:\n{few_shots}\n</few_shots_section>\nGo.";
        let out = apply_few_shots(t, &["e1 {x}", "e2"]);
        assert_eq!(out, "Solve {query}.\nExamples:\ne1 {{x}}\n\ne2\n\nGo.");
        let r = render(
            t,
            &vars(&[("query", "q"), ("x", "BAD")]),
            &["e1 {x}", "e2"],
            None,
        );
        assert_eq!(r, "Solve q.\nExamples:\ne1 {x}\n\ne2\n\nGo.");
    }

    #[test]
    fn prose_mentioning_the_tag_is_not_eaten() {
        // Reference defect: the non-greedy deletion from the prose mention to the real
        // closing tag removed steps 3 and 4.
        let t = "1. Read {query}.\n2. Examples appear in the `<few_shots_section>` block.\n3. Solve.\n4. Output.<few_shots_section>\nData:\n{few_shots}</few_shots_section>\nEnd";
        let out = apply_few_shots(t, NO_SHOTS);
        assert!(out.contains("3. Solve.\n4. Output."), "{out}");
        assert!(!out.contains("Data:"), "{out}");
        assert!(out.contains("`<few_shots_section>` block"), "{out}");
        let with = apply_few_shots(t, &["S"]);
        assert!(
            with.contains("3. Solve.\n4. Output.\nData:\nS\nEnd"),
            "{with}"
        );
    }

    #[test]
    fn section_without_placeholder_is_kept() {
        let t = "Keep <few_shots_section>this</few_shots_section> and {query}";
        assert_eq!(apply_few_shots(t, NO_SHOTS), t);
    }

    #[test]
    fn stray_and_missing_placeholders() {
        assert_eq!(apply_few_shots("A {few_shots} B", NO_SHOTS), "A  B");
        assert_eq!(apply_few_shots("A {few_shots} B", &["s"]), "A s B");
        assert_eq!(
            apply_few_shots("A {query}\n", &["s1", "s2"]),
            "A {query}\n\ns1\n\ns2"
        );
        // Stray mention outside a real section is dropped when a section takes the shots.
        let t = "Use {few_shots} wisely.<few_shots_section>\n{few_shots}</few_shots_section>";
        assert_eq!(apply_few_shots(t, &["s"]), "Use  wisely.\ns");
        // Escaped placeholder is literal text, not a few-shot slot.
        assert_eq!(apply_few_shots("{{few_shots}}", NO_SHOTS), "{{few_shots}}");
    }

    #[test]
    fn render_forces_few_shots_and_caps_fields() {
        let words = |t: &str, n: usize| t.split_whitespace().take(n).collect::<Vec<_>>().join(" ");
        let cap = FieldCap {
            max_tokens: 3,
            truncate: &words,
        };
        let v = vars(&[
            ("query", "a b c d e"),
            ("plan", "x y"),
            ("few_shots", "LEAK"),
        ]);
        let r = render("{query}|{plan}|{few_shots}", &v, NO_SHOTS, Some(cap));
        assert_eq!(r, "a b c ... [truncated]|x y|");
        assert_eq!(cap_field("a b", 0, &words), "a b");
    }

    #[test]
    fn render_with_scripted_llm() {
        let llm = crate::llm::ScriptedLlm::new(|_| String::new());
        let v = vars(&[("query", "one two three")]);
        assert_eq!(
            render_with_llm("{query}", &v, NO_SHOTS, 2, &llm),
            "one two ... [truncated]"
        );
        assert_eq!(
            render_with_llm("{query}", &v, NO_SHOTS, 0, &llm),
            "one two three"
        );
    }
}
