//! Continuous executor of the agent graph: every run advances on its own, with
//! no barrier across runs (the paper's rollouts are independent; batching them
//! is our engineering, §3 of the design notes).
//!
//! Each run is a small state machine over the same steps as the super-step
//! executor ([`super::runtime`]): its ready agents start together, their
//! model turns go to the backend's [`Llm::serve`] queue as soon as they are
//! known, a run's tool calls of a turn execute in order on a bounded worker
//! pool while other sequences keep decoding, then its format-repair turns,
//! then its outputs are applied and its out-edges followed — and its next
//! step's requests join the running batch at the engine's next decode step.
//! Only the calls of one run wait for each other (a run's turn or repair
//! attempt ends when all of its calls in that step have answered), which is
//! exactly the per-run order of the super-step executor: a run's requests,
//! seeds and tool-call order are the same, so its trace is byte-identical
//! whatever the timing and whatever else is in the batch.

use super::runtime::{
    absorb_repair, absorb_tool, absorb_turn, execute_jobs, finish_step, repair_requests,
    start_step, turn_request, Graph, Pending, Run, RunOptions, ToolJob,
};
use super::{GraphError, ToolEnv};
use crate::llm::{Generation, Llm, LlmError, Next, Request, RequestQueue};
use std::collections::{HashMap, VecDeque};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// What an in-flight request is for.
enum Kind {
    /// A model turn of call `pend[i]`; whether it is a tool turn.
    Turn(bool),
    /// A format-repair turn asking for these tags.
    Repair(Vec<String>),
}

/// A run's current step.
#[derive(Default)]
struct StepState {
    pend: Vec<Pending>,
    deferred: Vec<usize>,
    /// Requests of this turn (or repair attempt) not answered yet.
    outstanding: usize,
    /// Tool calls made in this turn, executed when the turn is complete.
    jobs: Vec<ToolJob>,
    /// Format-repair attempts made so far.
    repairs: usize,
}

/// A run's tool calls of one turn, sent to the worker pool with the run's
/// environment (handed back with the results).
struct ToolTask {
    run: usize,
    tools: Option<Box<dyn ToolEnv>>,
    agents: Vec<usize>,
    jobs: Vec<ToolJob>,
}

struct Driver<'a, 'g> {
    llm: &'a dyn Llm,
    g: &'a Graph<'g>,
    opts: &'a RunOptions,
    runs: &'a mut [Run],
    steps: Vec<StepState>,
    out: VecDeque<(usize, Request)>,
    inflight: HashMap<usize, (usize, usize, Kind)>,
    next_id: usize,
    live: usize,
    finished: usize,
    progress: Option<&'a (dyn Fn(usize) + Sync)>,
    tool_tx: Option<mpsc::Sender<ToolTask>>,
    tool_rx: mpsc::Receiver<ToolTask>,
    tools_in_flight: usize,
    stalled: bool,
}

impl Driver<'_, '_> {
    fn submit(&mut self, run: usize, call: usize, kind: Kind, req: Request) {
        let id = self.next_id;
        self.next_id += 1;
        self.inflight.insert(id, (run, call, kind));
        self.steps[run].outstanding += 1;
        self.out.push_back((id, req));
    }

    /// Start run `ri`'s next step.
    fn begin(&mut self, ri: usize) {
        let (pend, deferred) = start_step(self.llm, self.g, &mut self.runs[ri], ri, self.opts);
        self.steps[ri] = StepState {
            pend,
            deferred,
            ..StepState::default()
        };
        self.submit_turns(ri);
    }

    /// Send the next model turn of every unfinished call of run `ri`'s step;
    /// when none is left, go on to format repair.
    fn submit_turns(&mut self, ri: usize) {
        let seed = self.runs[ri].seed;
        let reqs: Vec<(usize, Request, bool)> = self.steps[ri]
            .pend
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.finished)
            .map(|(i, p)| {
                let (req, tt) = turn_request(self.g, seed, p, self.opts);
                (i, req, tt)
            })
            .collect();
        if reqs.is_empty() {
            return self.submit_repairs(ri);
        }
        for (i, req, tt) in reqs {
            self.submit(ri, i, Kind::Turn(tt), req);
        }
    }

    /// A turn of run `ri` is complete: execute its tool calls, or go on.
    fn after_turn(&mut self, ri: usize) {
        let mut jobs = std::mem::take(&mut self.steps[ri].jobs);
        if jobs.is_empty() {
            return self.submit_turns(ri);
        }
        jobs.sort_by_key(|j| j.pending);
        let agents: Vec<usize> = self.steps[ri].pend.iter().map(|p| p.agent).collect();
        let mut task = ToolTask {
            run: ri,
            tools: self.runs[ri].tools.take(),
            agents,
            jobs,
        };
        if let Some(tx) = &self.tool_tx {
            match tx.send(task) {
                Ok(()) => {
                    self.tools_in_flight += 1;
                    return;
                }
                Err(mpsc::SendError(t)) => task = t,
            }
        }
        // No pool (or it is gone): run the tools here.
        execute_jobs(
            self.g,
            task.tools.as_deref_mut(),
            &task.agents,
            &mut task.jobs,
        );
        self.tool_done(task);
    }

    fn tool_done(&mut self, task: ToolTask) {
        let ri = task.run;
        self.runs[ri].tools = task.tools;
        for j in task.jobs {
            let i = j.pending;
            absorb_tool(self.llm, self.opts, &mut self.steps[ri].pend[i], j);
        }
        self.submit_turns(ri);
    }

    /// The next format-repair attempt of run `ri`'s step, or the end of the step.
    fn submit_repairs(&mut self, ri: usize) {
        if self.steps[ri].repairs < self.opts.format_repairs {
            let seed = self.runs[ri].seed;
            let todo = repair_requests(
                self.llm,
                self.g,
                &|_| seed,
                &mut self.steps[ri].pend,
                self.opts,
            );
            if !todo.is_empty() {
                self.steps[ri].repairs += 1;
                for (i, missing, req) in todo {
                    self.submit(ri, i, Kind::Repair(missing), req);
                }
                return;
            }
        }
        self.end_step(ri);
    }

    fn end_step(&mut self, ri: usize) {
        let st = std::mem::take(&mut self.steps[ri]);
        finish_step(self.g, &mut self.runs[ri], st.pend, &st.deferred, self.opts);
        if self.runs[ri].done {
            self.live -= 1;
            self.finished += 1;
            if let Some(p) = self.progress {
                p(self.finished);
            }
        } else {
            self.begin(ri);
        }
    }

    /// Step index of the least advanced live run (for error messages).
    fn step(&self) -> usize {
        self.runs
            .iter()
            .filter(|r| !r.done)
            .map(|r| r.steps)
            .min()
            .unwrap_or(0)
    }
}

impl RequestQueue for Driver<'_, '_> {
    fn next(&mut self, block: bool) -> Next {
        loop {
            while let Ok(task) = self.tool_rx.try_recv() {
                self.tools_in_flight -= 1;
                self.tool_done(task);
            }
            if let Some((id, req)) = self.out.pop_front() {
                return Next::Ready(id, req);
            }
            if self.live == 0 {
                return Next::Closed;
            }
            if !block {
                return Next::Wait;
            }
            if self.tools_in_flight == 0 {
                if self.inflight.is_empty() {
                    // Nothing queued, running or executing, yet runs are live: a bug.
                    self.stalled = true;
                    return Next::Closed;
                }
                return Next::Wait;
            }
            match self.tool_rx.recv() {
                Ok(task) => {
                    self.tools_in_flight -= 1;
                    self.tool_done(task);
                }
                Err(_) => {
                    self.stalled = true;
                    return Next::Closed;
                }
            }
        }
    }

    fn done(&mut self, id: usize, result: crate::llm::Result<Generation>) {
        let Some((ri, i, kind)) = self.inflight.remove(&id) else {
            return;
        };
        let gen = result.map_err(|e| match e {
            LlmError::BadRequest { message, .. } => message,
            other => other.to_string(),
        });
        self.steps[ri].outstanding -= 1;
        match kind {
            Kind::Turn(tt) => {
                if let Some((name, args)) =
                    absorb_turn(self.g, self.opts, &mut self.steps[ri].pend[i], gen, tt)
                {
                    self.steps[ri].jobs.push(ToolJob {
                        pending: i,
                        name,
                        args,
                        result: String::new(),
                    });
                }
                if self.steps[ri].outstanding == 0 {
                    self.after_turn(ri);
                }
            }
            Kind::Repair(missing) => {
                absorb_repair(&mut self.steps[ri].pend[i], &missing, gen);
                if self.steps[ri].outstanding == 0 {
                    self.submit_repairs(ri);
                }
            }
        }
    }
}

/// Number of tool workers: `opts.tool_workers`, or the machine's cores when 0.
fn tool_workers(opts: &RunOptions) -> usize {
    if opts.tool_workers > 0 {
        opts.tool_workers
    } else {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    }
}

/// Drive every run to its end through `llm.serve` (see the module docs).
pub(super) fn run_continuous(
    llm: &dyn Llm,
    g: &Graph<'_>,
    runs: &mut [Run],
    opts: &RunOptions,
    progress: Option<&(dyn Fn(usize) + Sync)>,
) -> Result<(), GraphError> {
    let live = runs.iter().filter(|r| !r.done).count();
    let finished = runs.len() - live;
    if live == 0 {
        return Ok(());
    }
    let uses_tools = g.setup.agents.iter().any(|a| !a.tools.is_empty());
    let (task_tx, task_rx) = mpsc::channel::<ToolTask>();
    let (done_tx, done_rx) = mpsc::channel::<ToolTask>();
    let task_rx = Arc::new(Mutex::new(task_rx));
    std::thread::scope(|scope| {
        if uses_tools {
            for _ in 0..tool_workers(opts) {
                let rx = Arc::clone(&task_rx);
                let tx = done_tx.clone();
                scope.spawn(move || loop {
                    let task = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    let Ok(mut task) = task else { return };
                    execute_jobs(g, task.tools.as_deref_mut(), &task.agents, &mut task.jobs);
                    if tx.send(task).is_err() {
                        return;
                    }
                });
            }
        }
        drop(done_tx);
        let n = runs.len();
        let mut d = Driver {
            llm,
            g,
            opts,
            runs,
            steps: (0..n).map(|_| StepState::default()).collect(),
            out: VecDeque::new(),
            inflight: HashMap::new(),
            next_id: 0,
            live,
            finished,
            progress,
            tool_tx: uses_tools.then_some(task_tx),
            tool_rx: done_rx,
            tools_in_flight: 0,
            stalled: false,
        };
        for ri in 0..n {
            if !d.runs[ri].done {
                d.begin(ri);
            }
        }
        let served = llm.serve(&mut d);
        let step = d.step();
        let stalled = d.stalled || (served.is_ok() && d.live > 0);
        // Closing the task channel stops the workers (the scope joins them).
        d.tool_tx = None;
        drop(d);
        match served {
            Err(source) => Err(GraphError::Llm { step, source }),
            Ok(()) if stalled => Err(GraphError::Llm {
                step,
                source: LlmError::Other(
                    "the backend stopped serving before every run finished".into(),
                ),
            }),
            Ok(()) => Ok(()),
        }
    })
}
