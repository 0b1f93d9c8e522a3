//! The tokenizer rebuilt from GGUF metadata must encode and decode exactly like
//! the independent oracle tokenizers in ../shared/models/oracle-tokenizers, on
//! a few hundred varied strings (code, math, unicode, chat markup, dataset text).
//! Needs the real GGUF files: run `models/fetch.sh` first.

use cantante::llm::chat::ChatTemplate;
use cantante::llm::gguf_tokenizer::{chat_template_from_gguf, tokenizer_json_from_gguf};
use cantante::llm::tokenizer::Tokenizer;
use cantante::llm::Message;
use std::path::PathBuf;

pub fn models_dir() -> PathBuf {
    std::env::var("CANTANTE_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/cantante/models")
        })
}

pub fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

pub fn model_file(name: &str) -> PathBuf {
    let p = models_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: run models/fetch.sh (it caches the models there)",
        p.display()
    );
    p
}

fn corpus() -> Vec<String> {
    let mut v: Vec<String> = vec![
        "Hello world".into(),
        " leading space".into(),
        "trailing spaces   ".into(),
        "multiple\n\nnewlines\r\n\r\nand\ttabs".into(),
        "def f(x):\n    return x ** 2  # square\n".into(),
        "for i in range(10):\n\tprint(f\"{i:03d}\")".into(),
        "12345678901234567890 and 3.14159 and -42 and 1,000,000".into(),
        "$18.50 + 7% = ?".into(),
        "Ünïcödé façade naïve café — “quotes” ‘single’".into(),
        "日本語のテキストと中文字符".into(),
        "emoji 🚀🔥👍🏽 family 👨‍👩‍👧".into(),
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n".into(),
        "<|endoftext|>text after special".into(),
        "<tool_call>{\"name\": \"run_code\", \"arguments\": {}}</tool_call>".into(),
        "I'm sure they'll say it's fine, we've done it, you'd agree".into(),
        "ALL CAPS SHOUTING'S FUN".into(),
        "    indented with four spaces".into(),
        "a\u{00a0}non-breaking space and \u{2003} em space".into(),
        "<prediction>42</prediction>".into(),
        "x".repeat(50),
        " ".repeat(17),
        "\n".repeat(5),
    ];
    let data = shared().join("datasets");
    if let Ok(t) = std::fs::read_to_string(data.join("gsm8k/test.jsonl")) {
        for line in t.lines().take(120) {
            let j: serde_json::Value = serde_json::from_str(line).unwrap();
            v.push(j["question"].as_str().unwrap().to_string());
            v.push(j["answer"].as_str().unwrap().to_string());
        }
    }
    if let Ok(t) = std::fs::read_to_string(data.join("mbpp/mbpp.jsonl")) {
        for line in t.lines().take(80) {
            let j: serde_json::Value = serde_json::from_str(line).unwrap();
            v.push(j["code"].as_str().unwrap().to_string());
            v.push(j["test_list"][0].as_str().unwrap().to_string());
        }
    }
    assert!(
        v.len() > 300,
        "corpus too small ({}): datasets missing?",
        v.len()
    );
    v
}

/// A model file's GGUF metadata and the tokenizer built from it.
fn gguf_tokenizer(gguf_name: &str) -> (candle_core::quantized::gguf_file::Content, Tokenizer) {
    let path = model_file(gguf_name);
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let (json, _special) = tokenizer_json_from_gguf(&ct, &path.display().to_string()).unwrap();
    (ct, Tokenizer::from_json_str(&json.to_string()).unwrap())
}

fn check(gguf_name: &str, oracle: &str) {
    let (ct, ours) = gguf_tokenizer(gguf_name);
    let odir = shared().join("models/oracle-tokenizers").join(oracle);
    // The oracle tokenizers are project files beside the clone (../shared),
    // not something a user's fresh clone has; CI requires them.
    if !odir.join("tokenizer.json").is_file() {
        assert!(
            std::env::var_os("CANTANTE_REQUIRE_ORACLES").is_none(),
            "{} is missing (CANTANTE_REQUIRE_ORACLES is set)",
            odir.display()
        );
        eprintln!(
            "skipped {oracle}: no oracle tokenizer at {} (set CANTANTE_REQUIRE_ORACLES to make this an error)",
            odir.display()
        );
        return;
    }
    let theirs = Tokenizer::from_file(&odir.join("tokenizer.json")).unwrap();
    assert_eq!(ours.vocab_size(), theirs.vocab_size());
    for s in corpus() {
        let a = ours.encode(&s).unwrap();
        let b = theirs.encode(&s).unwrap();
        assert_eq!(a, b, "{oracle}: encodings differ for {s:?}");
        assert_eq!(
            ours.decode(&a, false).unwrap(),
            theirs.decode(&b, false).unwrap(),
            "{oracle}: decode differs for {s:?}"
        );
    }
    // Chat template comes from the GGUF metadata and renders with minijinja.
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(odir.join("tokenizer_meta.json")).unwrap())
            .unwrap();
    let tmpl = chat_template_from_gguf(&ct).expect("GGUF has a chat template");
    assert_eq!(tmpl, meta["chat_template"].as_str().unwrap());
    let ct = ChatTemplate::new(&tmpl, "", "").unwrap();
    let text = ct
        .render(&[Message::system("Be brief."), Message::user("Hi")])
        .unwrap();
    assert!(
        text.contains("<|im_start|>system\nBe brief.<|im_end|>"),
        "{text}"
    );
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");
    // The judge attributer's labels are single tokens after its prefix, and
    // the tag guard's literals encode on their own.
    let prompt = format!("{text}Rating: ");
    let ids = ours.encode(&prompt).unwrap();
    for (label, _) in cantante::attribution::JUDGE_SCALE {
        let with = ours.encode(&format!("{prompt}{label}")).unwrap();
        assert_eq!(with.len(), ids.len() + 1, "{oracle}: label {label:?}");
        assert_eq!(with[..ids.len()], ids[..], "{oracle}: label {label:?}");
    }
    for lit in ["<prediction>", "</prediction>", "\n<code>"] {
        let lit_ids = ours.encode(lit).unwrap();
        assert_eq!(ours.decode(&lit_ids, true).unwrap(), lit, "{oracle}");
    }
}

#[test]
fn qwen_gguf_tokenizer_matches_oracle() {
    check(
        "qwen2.5-coder-0.5b-instruct.gguf",
        "qwen2.5-coder-0.5b-instruct",
    );
}

#[test]
fn smollm_gguf_tokenizer_matches_oracle() {
    check("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct");
}

/// Qwen2.5's `<tool_call>` / `</tool_call>` are added tokens but not special
/// ones (GGUF token type 4, `"special": false` in the HF tokenizer): a reply's
/// text, decoded with special tokens skipped, keeps them, or the tool-call
/// parser and the tag guard's escape never see a call the model made.
#[test]
fn qwen_tool_call_tags_survive_decoding() {
    let (_, tok) = gguf_tokenizer("qwen2.5-coder-0.5b-instruct.gguf");
    let text = "<tool_call>\n{\"name\": \"check_tests\", \"arguments\": {}}\n</tool_call>";
    let ids = tok.encode(text).unwrap();
    assert_eq!(ids.first(), Some(&151657), "{ids:?}");
    assert_eq!(tok.decode(&ids, true).unwrap(), text);
    assert_eq!(tok.decode(&ids[..1], true).unwrap(), "<tool_call>");
}
