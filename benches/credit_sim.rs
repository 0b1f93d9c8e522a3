//! Planted-effect credit check (`cargo bench --bench credit_sim`): the real
//! optimizer loop on a simulated world whose per-agent prompt effects are
//! known (see `cantante::optimize::simulate`), with identity, generative and
//! judge credits on the paper's joint design and exact counterfactual credits
//! on the one-factor design, at equal rollouts per round. One table per
//! (attributer observation accuracy, rollout budget); prints Markdown (and
//! the rows as JSON with `--json`).

use cantante::optimize::simulate::{compare, markdown, METHODS};
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
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    }
    Ok(())
}
