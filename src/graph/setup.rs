//! Loading and validating setup files (reference spec §1.1).
//!
//! The YAML shape is the reference's (`edges`, `agents`,
//! `init_agent_prompt_pool`), so a setup written for the reference loads
//! unchanged. [`Setup::validate`] checks everything the runtime relies on and
//! reports the first problem as one [`GraphError::Invalid`] naming the file,
//! the agent and the field.

use super::{GraphError, Setup, END, START};
use crate::prompt::{self, FEW_SHOTS};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// What a setup is validated against: the state variables the task provides
/// before the first agent runs, and the tool names it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validation {
    /// Variables present initially (`query` and `few_shots` are always included).
    pub provided_vars: Vec<String>,
    /// Tool names agents may use; `None` skips the tool check.
    pub known_tools: Option<Vec<String>>,
}

impl Default for Validation {
    /// `query` and `few_shots` provided, tools not checked.
    fn default() -> Self {
        Self {
            provided_vars: vec!["query".into(), FEW_SHOTS.into()],
            known_tools: None,
        }
    }
}

impl Validation {
    /// Rules for a task that provides `provided_vars` (e.g. `test_cases`) and offers `tools`.
    pub fn new<S: AsRef<str>, T: AsRef<str>>(provided_vars: &[S], tools: &[T]) -> Self {
        let mut v = Self::default();
        for p in provided_vars {
            if !v.provided_vars.iter().any(|x| x == p.as_ref()) {
                v.provided_vars.push(p.as_ref().to_string());
            }
        }
        v.known_tools = Some(tools.iter().map(|t| t.as_ref().to_string()).collect());
        v
    }
}

/// File name used in errors of setups that did not come from a file.
const NO_FILE: &str = "<setup>";

fn invalid(
    agent: Option<&str>,
    field: impl Into<String>,
    message: impl Into<String>,
) -> GraphError {
    GraphError::Invalid {
        file: NO_FILE.to_string(),
        agent: agent.map(str::to_string),
        field: field.into(),
        message: message.into(),
    }
}

impl Setup {
    /// Read a setup YAML file (not validated; see [`Setup::validate`]).
    pub fn load(path: impl AsRef<Path>) -> Result<Setup, GraphError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| GraphError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text, &path.display().to_string())
    }

    /// Parse setup YAML; `name` is used in error messages.
    pub fn from_yaml(text: &str, name: &str) -> Result<Setup, GraphError> {
        serde_yaml::from_str(text).map_err(|e| GraphError::Parse {
            path: name.to_string(),
            message: e.to_string(),
        })
    }

    /// [`Setup::load`] then [`Setup::validate`], with the file named in errors.
    pub fn load_validated(path: impl AsRef<Path>, rules: &Validation) -> Result<Setup, GraphError> {
        let path = path.as_ref();
        let s = Self::load(path)?;
        s.validate(rules).map_err(|e| e.in_file(path))?;
        Ok(s)
    }

    /// Whether `name` is an agent.
    fn is_agent(&self, name: &str) -> bool {
        self.agents.iter().any(|a| a.name == name)
    }

    /// Check the setup; the first problem found is returned as
    /// [`GraphError::Invalid`] (file `<setup>`; use [`Setup::load_validated`] or
    /// [`GraphError::in_file`] to name the file). Rules, in order:
    ///
    /// 1. agent names are non-empty, unique and not `__start__`/`__end__`;
    /// 2. every agent has a non-empty prompt pool, and no pool belongs to an unknown agent;
    /// 3. every edge joins known nodes (`__start__` only as a source, `__end__`
    ///    only as a target); a conditional edge has all of `condition_fix`,
    ///    `max_retries` and `fallback_target`; `__start__` has an out-edge;
    /// 4. no cycle made only of unconditional edges (a fallback edge counts as
    ///    unconditional: it resets the retry counter, so it never ends a loop);
    /// 5. every tool is known (when `rules.known_tools` is set);
    /// 6. some agent reads `query` and some agent writes `prediction`;
    /// 7. every input var is written by some agent or provided initially;
    /// 8. every pool prompt has a `{var}` placeholder for each of its agent's
    ///    input vars (except `few_shots`, which is optional);
    /// 9. `output_grammars` only name the agent's output vars, compile (with
    ///    the `grammar` feature), and only on agents without tools;
    /// 10. `fenced_outputs` only name the agent's output vars.
    pub fn validate(&self, rules: &Validation) -> Result<(), GraphError> {
        // 1. names
        let mut seen = BTreeSet::new();
        for (i, a) in self.agents.iter().enumerate() {
            let field = format!("agents[{i}].name");
            if a.name.trim().is_empty() {
                return Err(invalid(None, field, "agent name is empty"));
            }
            if a.name == START || a.name == END {
                return Err(invalid(
                    Some(&a.name),
                    field,
                    "agent name is reserved for a pseudo-node",
                ));
            }
            if !seen.insert(a.name.as_str()) {
                return Err(invalid(Some(&a.name), field, "duplicate agent name"));
            }
        }
        if self.agents.is_empty() {
            return Err(invalid(None, "agents", "no agents defined"));
        }
        // 2. pools
        for a in &self.agents {
            match self.init_agent_prompt_pool.get(&a.name) {
                None => {
                    return Err(invalid(
                        Some(&a.name),
                        "init_agent_prompt_pool",
                        "agent has no prompt pool",
                    ))
                }
                Some(p) if p.is_empty() => {
                    return Err(invalid(
                        Some(&a.name),
                        "init_agent_prompt_pool",
                        "prompt pool is empty",
                    ))
                }
                _ => {}
            }
        }
        if let Some(k) = self
            .init_agent_prompt_pool
            .keys()
            .find(|k| !self.is_agent(k))
        {
            return Err(invalid(
                Some(k),
                "init_agent_prompt_pool",
                "prompt pool for an unknown agent",
            ));
        }
        // 3. edges
        let known = |n: &str| self.is_agent(n);
        for (i, e) in self.edges.iter().enumerate() {
            let who = Some(e.from.as_str()).filter(|f| known(f));
            if !(e.from == START || known(&e.from)) {
                let why = if e.from == END {
                    "`__end__` cannot be a source".to_string()
                } else {
                    unknown_node(self, &e.from)
                };
                return Err(invalid(None, format!("edges[{i}].from"), why));
            }
            if !(e.to == END || known(&e.to)) {
                let why = if e.to == START {
                    "`__start__` cannot be a target".to_string()
                } else {
                    unknown_node(self, &e.to)
                };
                return Err(invalid(who, format!("edges[{i}].to"), why));
            }
            let parts = [
                ("condition_fix", e.condition_fix.is_some()),
                ("max_retries", e.max_retries.is_some()),
                ("fallback_target", e.fallback_target.is_some()),
            ];
            if parts.iter().any(|p| p.1) {
                if let Some((missing, _)) = parts.iter().find(|p| !p.1) {
                    return Err(invalid(
                        who,
                        format!("edges[{i}].{missing}"),
                        format!(
                            "conditional edge {} → {} lacks `{missing}` (a conditional edge needs condition_fix, max_retries and fallback_target)",
                            e.from, e.to
                        ),
                    ));
                }
                if e.condition_fix
                    .as_deref()
                    .is_some_and(|c| c.trim().is_empty())
                {
                    return Err(invalid(
                        who,
                        format!("edges[{i}].condition_fix"),
                        "empty condition variable",
                    ));
                }
                let fb = e.fallback_target.as_deref().unwrap_or_default();
                if !(fb == END || known(fb)) {
                    return Err(invalid(
                        who,
                        format!("edges[{i}].fallback_target"),
                        unknown_node(self, fb),
                    ));
                }
            }
        }
        if !self.edges.iter().any(|e| e.from == START) {
            return Err(invalid(None, "edges", "no edge leaves `__start__`"));
        }
        // 4. unconditional cycles
        if let Some(cycle) = self.unconditional_cycle() {
            return Err(invalid(
                Some(&cycle[0]),
                "edges",
                format!(
                    "cycle without a conditional edge: {} (it would loop until the step limit)",
                    cycle.join(" → ")
                ),
            ));
        }
        // 5. tools
        if let Some(tools) = &rules.known_tools {
            for a in &self.agents {
                if let Some(t) = a.tools.iter().find(|t| !tools.contains(t)) {
                    return Err(invalid(
                        Some(&a.name),
                        "tools",
                        format!("unknown tool `{t}` (known: {})", list_or_none(tools)),
                    ));
                }
            }
        }
        // 6. query in, prediction out
        if !self
            .agents
            .iter()
            .any(|a| a.input_vars.iter().any(|v| v == "query"))
        {
            return Err(invalid(None, "input_vars", "no agent reads `query`"));
        }
        if !self
            .agents
            .iter()
            .any(|a| a.output_vars.iter().any(|v| v == "prediction"))
        {
            return Err(invalid(None, "output_vars", "no agent writes `prediction`"));
        }
        // 7. inputs available
        let produced: BTreeSet<&str> = self
            .agents
            .iter()
            .flat_map(|a| a.output_vars.iter().map(String::as_str))
            .chain(rules.provided_vars.iter().map(String::as_str))
            .chain(["query", FEW_SHOTS])
            .collect();
        for a in &self.agents {
            if let Some(v) = a.input_vars.iter().find(|v| !produced.contains(v.as_str())) {
                return Err(invalid(
                    Some(&a.name),
                    "input_vars",
                    format!(
                        "input `{v}` is written by no agent and not provided initially (provided: {})",
                        list_or_none(&rules.provided_vars)
                    ),
                ));
            }
        }
        // 8. placeholders
        for a in &self.agents {
            for (i, p) in self.init_agent_prompt_pool[&a.name].iter().enumerate() {
                let missing = prompt::missing_placeholders(p, &a.input_vars);
                if !missing.is_empty() {
                    let m: Vec<String> = missing.iter().map(|v| format!("{{{v}}}")).collect();
                    return Err(invalid(
                        Some(&a.name),
                        format!("init_agent_prompt_pool[{i}]"),
                        format!("prompt lacks placeholder {}", m.join(", ")),
                    ));
                }
            }
        }
        // 9. output grammars
        for a in &self.agents {
            if let Some(v) = a
                .output_grammars
                .keys()
                .find(|v| !a.output_vars.contains(v))
            {
                return Err(invalid(
                    Some(&a.name),
                    format!("output_grammars.{v}"),
                    format!("`{v}` is not one of the agent's output_vars"),
                ));
            }
            for (v, g) in &a.output_grammars {
                if let Err(e) = crate::llm::grammar::check(g) {
                    return Err(invalid(
                        Some(&a.name),
                        format!("output_grammars.{v}"),
                        format!("{} grammar does not compile: {e}", g.kind()),
                    ));
                }
            }
            if let Some(v) = a.fenced_outputs.iter().find(|v| !a.output_vars.contains(v)) {
                return Err(invalid(
                    Some(&a.name),
                    "fenced_outputs",
                    format!("`{v}` is not one of the agent's output_vars"),
                ));
            }
            if !a.output_grammars.is_empty() && !a.tools.is_empty() {
                return Err(invalid(
                    Some(&a.name),
                    "output_grammars",
                    "output grammars are not supported on agents with tools (a tool call is another way to end a turn)",
                ));
            }
        }
        Ok(())
    }

    /// Non-fatal remarks: pool prompts that never mention one of their output
    /// tags, agents unreachable from `__start__`, tools with `max_tool_calls: 0`.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for a in &self.agents {
            for (i, p) in self
                .init_agent_prompt_pool
                .get(&a.name)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let missing = prompt::missing_output_tags(p, &a.output_vars);
                if !missing.is_empty() {
                    let m: Vec<String> = missing.iter().map(|v| format!("<{v}>")).collect();
                    out.push(format!(
                        "agent `{}`, init_agent_prompt_pool[{i}]: never mentions output tag {}",
                        a.name,
                        m.join(", ")
                    ));
                }
            }
            if !a.tools.is_empty() && a.max_tool_calls == 0 {
                out.push(format!(
                    "agent `{}`: has tools but max_tool_calls is 0",
                    a.name
                ));
            }
        }
        let reach = self.reachable_from(START);
        for a in &self.agents {
            if !reach.contains(a.name.as_str()) {
                out.push(format!(
                    "agent `{}` is unreachable from `__start__`",
                    a.name
                ));
            }
        }
        out
    }

    /// Successor nodes of `node` over every edge kind (targets and fallbacks).
    pub(crate) fn successors<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.edges
            .iter()
            .filter(move |e| e.from == node)
            .flat_map(|e| std::iter::once(e.to.as_str()).chain(e.fallback_target.as_deref()))
    }

    /// Nodes reachable from `node` in one or more steps.
    pub(crate) fn reachable_from<'a>(&'a self, node: &'a str) -> BTreeSet<&'a str> {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<&str> = self.successors(node).collect();
        while let Some(n) = stack.pop() {
            if seen.insert(n) {
                stack.extend(self.successors(n));
            }
        }
        seen
    }

    /// A cycle over unconditional edges and fallback edges, as node names
    /// with the first node repeated at the end.
    fn unconditional_cycle(&self) -> Option<Vec<String>> {
        let mut adj: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for e in &self.edges {
            if e.is_conditional() {
                if let Some(fb) = e.fallback_target.as_deref() {
                    adj.entry(e.from.as_str()).or_default().push(fb);
                }
            } else {
                adj.entry(e.from.as_str()).or_default().push(e.to.as_str());
            }
        }
        // Iterative DFS with colors: 0 new, 1 on stack, 2 done.
        let mut color: BTreeMap<&str, u8> = BTreeMap::new();
        for a in &self.agents {
            let root = a.name.as_str();
            if color.get(root).copied().unwrap_or(0) != 0 {
                continue;
            }
            let mut path: Vec<(&str, usize)> = vec![(root, 0)];
            color.insert(root, 1);
            while let Some(&mut (node, ref mut next)) = path.last_mut() {
                let succ = adj.get(node).map(Vec::as_slice).unwrap_or(&[]);
                if *next < succ.len() {
                    let s = succ[*next];
                    *next += 1;
                    match color.get(s).copied().unwrap_or(0) {
                        0 => {
                            color.insert(s, 1);
                            path.push((s, 0));
                        }
                        1 => {
                            let from = path.iter().position(|(n, _)| *n == s).unwrap_or(0);
                            let mut cyc: Vec<String> =
                                path[from..].iter().map(|(n, _)| n.to_string()).collect();
                            cyc.push(s.to_string());
                            return Some(cyc);
                        }
                        _ => {}
                    }
                } else {
                    color.insert(node, 2);
                    path.pop();
                }
            }
        }
        None
    }
}

fn unknown_node(s: &Setup, n: &str) -> String {
    let names: Vec<String> = s.agents.iter().map(|a| a.name.clone()).collect();
    format!("unknown node `{n}` (agents: {})", list_or_none(&names))
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
edges:
  - from: "__start__"
    to: "a"
  - from: "a"
    to: "b"
  - from: "b"
    to: "a"
    condition_fix: "again"
    fallback_target: "__end__"
    max_retries: 2
agents:
  - name: "a"
    task_description: >
      Does a.
    input_vars: ["query", "few_shots"]
    output_vars: ["x"]
    tools: []
    max_tool_calls: 0
  - name: "b"
    input_vars: ["query", "x", "extra"]
    output_vars: ["again", "prediction"]
    tools: ["t1"]
    max_tool_calls: 2
init_agent_prompt_pool:
  a: ["Q {query} <few_shots_section>{few_shots}</few_shots_section> <x>", "{query} <x>"]
  b: ["{query} {x} {extra} <again> <prediction>"]
"#;

    fn rules() -> Validation {
        Validation::new(&["extra"], &["t1", "t2"])
    }

    fn base() -> Setup {
        Setup::from_yaml(BASE, "base.yaml").unwrap()
    }

    fn err(s: &Setup) -> String {
        s.validate(&rules()).unwrap_err().to_string()
    }

    #[test]
    fn base_is_valid() {
        base().validate(&rules()).unwrap();
        assert!(base().warnings().is_empty(), "{:?}", base().warnings());
    }

    #[test]
    fn parse_errors_name_the_file() {
        let e = Setup::from_yaml("edges: [", "bad.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.yaml"), "{e}");
        let e = Setup::from_yaml(
            "edges: []\nagents: [{name: a, inputs: []}]\ninit_agent_prompt_pool: {}",
            "typo.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("inputs"), "{e}");
    }

    #[test]
    fn file_named_in_validation_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.yaml");
        std::fs::write(&p, BASE.replace("[\"t1\"]", "[\"nope\"]")).unwrap();
        let e = Setup::load_validated(&p, &rules()).unwrap_err().to_string();
        assert!(
            e.contains("s.yaml")
                && e.contains("agent `b`")
                && e.contains("`tools`")
                && e.contains("nope"),
            "{e}"
        );
    }

    #[test]
    fn unknown_edge_node() {
        let mut s = base();
        s.edges[1].to = "zz".into();
        let e = err(&s);
        assert!(
            e.contains("edges[1].to") && e.contains("zz") && e.contains("agent `a`"),
            "{e}"
        );
        let mut s = base();
        s.edges[0].from = "yy".into();
        assert!(err(&s).contains("edges[0].from"), "{}", err(&s));
        let mut s = base();
        s.edges[2].fallback_target = Some("ww".into());
        assert!(err(&s).contains("edges[2].fallback_target"), "{}", err(&s));
    }

    #[test]
    fn input_not_produced() {
        let e = base()
            .validate(&Validation::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("agent `b`") && e.contains("input_vars") && e.contains("`extra`"),
            "{e}"
        );
    }

    #[test]
    fn query_and_prediction_required() {
        let mut s = base();
        for a in &mut s.agents {
            a.input_vars.retain(|v| v != "query");
        }
        for p in s.init_agent_prompt_pool.values_mut() {
            for t in p {
                *t = t.replace("{query}", "");
            }
        }
        let e = err(&s);
        assert!(e.contains("input_vars") && e.contains("`query`"), "{e}");
        let mut s = base();
        s.agents[1].output_vars.retain(|v| v != "prediction");
        let e = err(&s);
        assert!(
            e.contains("output_vars") && e.contains("`prediction`"),
            "{e}"
        );
    }

    #[test]
    fn unconditional_cycle_rejected() {
        let mut s = base();
        s.edges[2] = crate::graph::EdgeSpec {
            from: "b".into(),
            to: "a".into(),
            condition_fix: None,
            max_retries: None,
            fallback_target: None,
        };
        let e = err(&s);
        assert!(
            e.contains("cycle") && e.contains("a → b → a") && e.contains("`edges`"),
            "{e}"
        );
        // A fallback back into the loop never terminates either.
        let mut s = base();
        s.edges[2].fallback_target = Some("a".into());
        assert!(err(&s).contains("cycle"), "{}", err(&s));
    }

    #[test]
    fn missing_placeholder() {
        let mut s = base();
        s.init_agent_prompt_pool
            .get_mut("b")
            .unwrap()
            .push("{query} {x} <again>".into());
        let e = err(&s);
        assert!(
            e.contains("agent `b`")
                && e.contains("init_agent_prompt_pool[1]")
                && e.contains("{extra}"),
            "{e}"
        );
    }

    #[test]
    fn unknown_tool() {
        let mut s = base();
        s.agents[1].tools.push("hammer".into());
        let e = err(&s);
        assert!(
            e.contains("agent `b`")
                && e.contains("`tools`")
                && e.contains("hammer")
                && e.contains("t1, t2"),
            "{e}"
        );
        // Without a tool list, tools are not checked.
        s.validate(&Validation {
            known_tools: None,
            ..rules()
        })
        .unwrap();
    }

    #[test]
    fn conditional_edge_incomplete() {
        for (field, f) in [
            (
                "max_retries",
                (|e: &mut crate::graph::EdgeSpec| e.max_retries = None) as fn(&mut _),
            ),
            ("fallback_target", |e| e.fallback_target = None),
            ("condition_fix", |e| e.condition_fix = None),
        ] {
            let mut s = base();
            f(&mut s.edges[2]);
            let e = err(&s);
            assert!(
                e.contains(&format!("edges[2].{field}")) && e.contains("agent `b`"),
                "{field}: {e}"
            );
        }
    }

    #[test]
    fn agent_without_pool() {
        let mut s = base();
        s.init_agent_prompt_pool.remove("b");
        let e = err(&s);
        assert!(
            e.contains("agent `b`") && e.contains("init_agent_prompt_pool"),
            "{e}"
        );
        let mut s = base();
        s.init_agent_prompt_pool.insert("b".into(), vec![]);
        assert!(err(&s).contains("empty"), "{}", err(&s));
        let mut s = base();
        s.init_agent_prompt_pool
            .insert("ghost".into(), vec!["{query}".into()]);
        assert!(err(&s).contains("agent `ghost`"), "{}", err(&s));
    }

    #[test]
    fn duplicate_and_reserved_names() {
        let mut s = base();
        s.agents[1].name = "a".into();
        assert!(err(&s).contains("duplicate"), "{}", err(&s));
        let mut s = base();
        s.agents[1].name = END.into();
        assert!(err(&s).contains("reserved"), "{}", err(&s));
    }

    #[test]
    fn warnings_list_missing_tags_and_unreachable() {
        let mut s = base();
        s.init_agent_prompt_pool
            .get_mut("a")
            .unwrap()
            .push("{query}".into());
        s.edges.remove(1);
        s.edges[1].fallback_target = Some(END.into());
        let w = s.warnings().join("\n");
        assert!(
            w.contains("init_agent_prompt_pool[2]") && w.contains("<x>"),
            "{w}"
        );
        assert!(w.contains("agent `b` is unreachable"), "{w}");
    }
}
