//! Planted-effect credit check (`cargo bench --bench credit_sim`): the real
//! optimizer loop on a simulated world whose per-agent prompt effects are
//! known (see `cantante::optimize::simulate`), with identity, generative and
//! judge credits on the paper's joint design and exact counterfactual credits
//! on the one-factor design, at equal rollouts per round. One table per
//! (attributer observation accuracy, rollout budget), then the one-factor
//! design with a cap on candidates per agent and round at the same rollouts
//! (fewer configurations, more queries each); prints Markdown (and the rows
//! as JSON with `--json`).

use cantante::optimize::simulate::{compare, markdown, Method, METHODS};
use cantante::optimize::OptimizeConfig;

fn main() -> anyhow::Result<()> {
    let json = std::env::args().any(|a| a == "--json");
    let seeds: Vec<u64> = (1..=20).collect();
    let dir = tempfile::tempdir()?;
    let mut all = Vec::new();
    println!(
        "# Planted-effect simulator\n\n4 agents in a chain, {} worlds (seeds 1-{}), 3 rounds of CAPO (population 4, 3 offspring per agent and round, max 3 blocks per race), effect scale 0.3 on each agent's success rate; the system scores 1 when at most one agent's work is flawed. Rollouts per round are equal across designs: the joint design runs 8 configurations x block B, the one-factor design 25 configurations x B*8/25.\n",
        seeds.len(),
        seeds.len()
    );
    for (accuracy, block) in [(0.8, 24), (0.65, 24), (0.5, 24), (0.8, 96), (0.5, 96)] {
        let base = OptimizeConfig {
            seed: 5,
            rounds: 3,
            block_size: block,
            max_blocks: 3,
            ..Default::default()
        };
        let t = std::time::Instant::now();
        let rows = compare(&METHODS, &seeds, 4, accuracy, &base, dir.path())?;
        println!(
            "## Attributer reads an agent's work correctly with p = {accuracy}; joint block {block} ({:.1} s)\n",
            t.elapsed().as_secs_f64()
        );
        println!("{}", markdown(&rows));
        all.push(serde_json::json!({"accuracy": accuracy, "block": block, "rows": rows}));
    }
    // One-factor design, capped: at equal rollouts, fewer candidates per
    // agent and round get a larger block each.
    let capped: Vec<Method> = [METHODS[3], METHODS[4]]
        .into_iter()
        .chain([Method {
            name: "ofat + judge ties (weight 1)",
            tie_weight: 1.0,
            ..METHODS[4]
        }])
        .collect();
    for cap in [2, 3, 4] {
        let base = OptimizeConfig {
            seed: 5,
            rounds: 3,
            block_size: 24,
            max_blocks: 3,
            ofat_max_candidates: Some(cap),
            ..Default::default()
        };
        let rows = compare(&capped, &seeds, 4, 0.8, &base, dir.path())?;
        println!(
            "## One-factor design, at most {cap} candidates per agent and round (p = 0.8; rollouts of joint block 24, so block {})\n\nρ here ranks {} prompts per agent and round (the incumbent at credit 0 and the candidates run), not 7 as above: a coarser ranking, not directly comparable.\n",
            (24.0 * 8.0 / (1 + 4 * cap) as f64).round(),
            cap + 1
        );
        println!("{}", markdown(&rows));
        all.push(serde_json::json!({"accuracy": 0.8, "block": 24, "ofat_max_candidates": cap, "rows": rows}));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    }
    Ok(())
}
