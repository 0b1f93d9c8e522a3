//! MBPP's per-run code tools (reference spec §2.3 "Tool environment per
//! query"): a code store with `write_code`, `read_code`, `run_code` and
//! `check_tests`, backed by the [`super::sandbox`]. The reference's AST safety
//! check is replaced by the sandbox itself. The last written code is the run's
//! artifact, which the MBPP metric scores.

use super::sandbox::{run_python, run_tests, shorten, SandboxLimits, Status};
use super::strip_code_fences;
use crate::graph::ToolEnv;

/// Longest tool result returned to an agent, in characters.
pub const MAX_RESULT_CHARS: usize = 2000;

/// The MBPP code tool environment of one run.
#[derive(Debug, Clone)]
pub struct McodeEnv {
    code: String,
    visible_tests: Vec<String>,
    setup_code: String,
    limits: SandboxLimits,
}

impl McodeEnv {
    /// Tool names, in the order they are offered.
    pub const TOOLS: [&'static str; 4] = ["write_code", "read_code", "run_code", "check_tests"];

    /// A fresh environment with an empty code store.
    pub fn new(visible_tests: Vec<String>, setup_code: String, limits: SandboxLimits) -> Self {
        Self {
            code: String::new(),
            visible_tests,
            setup_code,
            limits,
        }
    }

    /// The stored code.
    pub fn code(&self) -> &str {
        &self.code
    }

    fn write_code(&mut self, args: &serde_json::Value) -> String {
        let Some(raw) = string_arg(args, "code") else {
            return "error: write_code needs a string argument `code`".to_string();
        };
        let code = strip_code_fences(raw);
        if code.trim().is_empty() {
            return "error: the code is empty; nothing stored".to_string();
        }
        let lines = code.lines().count();
        self.code = code;
        format!("Code stored ({lines} lines).")
    }

    fn run_code(&self) -> String {
        if self.code.trim().is_empty() {
            return "error: no code stored; call write_code first".to_string();
        }
        match run_python(&self.code, &self.limits) {
            Err(e) => format!("error: {e}"),
            Ok(o) => {
                let mut s = String::new();
                s.push_str(&format!("stdout:\n{}", o.stdout.trim_end()));
                if !o.stderr.trim().is_empty() {
                    s.push_str(&format!("\n[stderr]\n{}", o.stderr.trim_end()));
                }
                match o.status {
                    Status::Ok => s.push_str("\n[exit code 0]"),
                    Status::Failed(c) => s.push_str(&format!("\n[exit code {c}]")),
                    Status::Timeout => s.push_str(&format!(
                        "\n[timeout after {}s]",
                        self.limits.wall.as_secs_f64()
                    )),
                    other => s.push_str(&format!("\n[{other}]")),
                }
                if o.truncated {
                    s.push_str("\n[output truncated]");
                }
                s
            }
        }
    }

    fn check_tests(&self) -> String {
        if self.code.trim().is_empty() {
            return "error: no code stored; call write_code first".to_string();
        }
        if self.visible_tests.is_empty() {
            return "No tests available.".to_string();
        }
        run_tests(
            &self.code,
            &self.setup_code,
            &self.visible_tests,
            &self.limits,
        )
        .summary()
    }
}

/// A string argument: `args[key]`, or the only string value of an object, or `args` itself.
fn string_arg<'a>(args: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    match args {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Object(m) => m.get(key).and_then(|v| v.as_str()).or_else(|| {
            let strings: Vec<&str> = m.values().filter_map(|v| v.as_str()).collect();
            (strings.len() == 1).then(|| strings[0])
        }),
        _ => None,
    }
}

impl ToolEnv for McodeEnv {
    fn tool_names(&self) -> Vec<String> {
        Self::TOOLS.iter().map(|s| s.to_string()).collect()
    }

    /// The tool's description in an agent's tool declaration.
    fn describe(&self, name: &str) -> Option<String> {
        Some(
            match name {
                "write_code" => "Store Python code as the current solution (markdown fences are removed); the last stored code is what gets graded. Arguments: `code` (string, the complete program).",
                "read_code" => "Return the currently stored code. Arguments: none.",
                "run_code" => "Run the stored code in a sandbox and return its stdout, stderr and exit status (10 s limit). Arguments: none.",
                "check_tests" => "Run the stored code against the example tests and report `Passed k/n` with PASS/FAIL/TIMEOUT/ERROR per test. Arguments: none.",
                _ => return None,
            }
            .to_string(),
        )
    }

    fn parameters(&self, name: &str) -> serde_json::Value {
        if name == "write_code" {
            serde_json::json!({
                "type": "object",
                "properties": {"code": {"type": "string", "description": "the complete program"}},
                "required": ["code"],
            })
        } else {
            serde_json::json!({"type": "object", "properties": {}})
        }
    }

    fn call(&mut self, name: &str, args: &serde_json::Value) -> String {
        let out = match name {
            "write_code" => self.write_code(args),
            "read_code" => {
                if self.code.is_empty() {
                    "(empty)".to_string()
                } else {
                    self.code.clone()
                }
            }
            "run_code" => self.run_code(),
            "check_tests" => self.check_tests(),
            other => format!(
                "error: unknown tool `{other}` (available: {})",
                Self::TOOLS.join(", ")
            ),
        };
        shorten(&out, MAX_RESULT_CHARS)
    }

    fn observe(&mut self, var: &str, value: &str) {
        // A coder that answers with a <code> tag instead of calling write_code
        // still gets its program tested by check_tests and scored.
        if var == "code" {
            let code = strip_code_fences(value);
            if !code.trim().is_empty() {
                self.code = code;
            }
        }
    }

    fn artifact(&self) -> Option<String> {
        (!self.code.is_empty()).then(|| self.code.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn env() -> McodeEnv {
        McodeEnv::new(
            vec![
                "assert square(3) == 9".into(),
                "assert square(-2) == 4".into(),
            ],
            String::new(),
            SandboxLimits {
                wall: Duration::from_secs(3),
                cpu_secs: 3,
                ..Default::default()
            },
        )
    }

    #[test]
    fn code_tag_output_becomes_the_program() {
        let mut e = env();
        e.observe("plan", "def square(x): pass");
        assert_eq!(e.artifact(), None);
        e.observe("code", "```python\ndef square(x):\n    return x * x\n```");
        assert_eq!(
            e.artifact().as_deref(),
            Some("def square(x):\n    return x * x")
        );
        assert!(e.call("check_tests", &json!({})).starts_with("Passed 2/2"));
        e.observe("code", "   ");
        assert!(
            e.artifact().is_some(),
            "an empty code tag must not erase the program"
        );
    }

    #[test]
    fn write_read_and_check_correct_and_wrong() {
        let mut e = env();
        assert_eq!(e.call("read_code", &json!({})), "(empty)");
        assert!(e
            .call("check_tests", &json!({}))
            .starts_with("error: no code"));
        assert_eq!(e.artifact(), None);
        let r = e.call(
            "write_code",
            &json!({"code": "```python\ndef square(x):\n    return x * x\n```"}),
        );
        assert!(r.starts_with("Code stored"), "{r}");
        assert_eq!(
            e.call("read_code", &json!({})),
            "def square(x):\n    return x * x"
        );
        let r = e.call("check_tests", &json!({}));
        assert!(r.starts_with("Passed 2/2"), "{r}");
        assert!(r.contains("1. PASS assert square(3) == 9"), "{r}");
        // Wrong solution: one test fails, the other passes.
        e.call(
            "write_code",
            &json!({"code": "def square(x):\n    return x * 3"}),
        );
        let r = e.call("check_tests", &json!({}));
        assert!(r.starts_with("Passed 1/2"), "{r}");
        assert!(r.contains("PASS assert square(3)"), "{r}");
        assert!(r.contains("FAIL assert square(-2)"), "{r}");
        assert_eq!(
            e.artifact().as_deref(),
            Some("def square(x):\n    return x * 3")
        );
        // A hanging solution is reported per test.
        e.call("write_code", &json!("def square(x):\n    while True: pass"));
        let r = e.call("check_tests", &json!({}));
        assert!(r.starts_with("Passed 0/2") && r.contains("TIMEOUT"), "{r}");
    }

    #[test]
    fn run_code_reports_output_and_status() {
        let mut e = env();
        e.call(
            "write_code",
            &json!({"code": "import sys\nprint(6 * 7)\nprint('oops', file=sys.stderr)\nsys.exit(2)"}),
        );
        let r = e.call("run_code", &json!({}));
        assert!(r.contains("42"), "{r}");
        assert!(r.contains("[stderr]\noops"), "{r}");
        assert!(r.contains("[exit code 2]"), "{r}");
        e.call("write_code", &json!({"code": "while True:\n    pass"}));
        let r = e.call("run_code", &json!({}));
        assert!(r.contains("[timeout after 3s]"), "{r}");
        e.call("write_code", &json!({"code": "print('x' * 100000)"}));
        let r = e.call("run_code", &json!({}));
        assert!(r.chars().count() <= MAX_RESULT_CHARS + 1, "{}", r.len());
    }

    #[test]
    fn bad_calls_and_descriptions() {
        let mut e = env();
        assert!(e.call("write_code", &json!({})).starts_with("error"));
        assert!(e
            .call("write_code", &json!({"code": "  "}))
            .starts_with("error"));
        assert!(e.call("nope", &json!({})).contains("unknown tool"));
        for t in McodeEnv::TOOLS {
            let d = e.describe(t).unwrap();
            assert!(d.contains("Arguments:"), "{d}");
        }
        assert!(e.describe("nope").is_none());
        assert_eq!(e.tool_names(), McodeEnv::TOOLS);
    }
}
