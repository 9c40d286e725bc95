"""The bodies of the gate's checks: each returns a one-line summary or raises the failure."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from hypothesis import settings

import sync_guard
from lockstep.engine import LLM, SamplingParams
from lockstep.property_tests.adapters import engine_modes
from lockstep.property_tests.capabilities import narrow_workload
from lockstep.property_tests.comparator import compare_runs
from lockstep.property_tests.differential import is_exact
from lockstep.property_tests.driver import RequestResult, RunRecord
from lockstep.property_tests.engine_under_test import ASYNC_MODES, Mode, heartbeat
from lockstep.property_tests.properties import async_matches_sync_property, check_workload
from lockstep.property_tests.workload import EngineSpec, RequestSpec, Workload

from .targeted import targeted_workloads

if TYPE_CHECKING:
    from .gate import GateOptions

SKEWED = Mode(True, "sim", "skewed")
# the collect variants: tokens must not depend on which steps the host knew when it scheduled
# (eager collect; skewed: the compute stream done, the outputs' copy not), nor on how it waited
COLLECT_MODES = (Mode(True, "sim", "threaded", collect="eager"),
                 Mode(True, "sim", "skewed", collect="eager"),
                 Mode(True, "sim", "lazy", output_wait="poll"))
SIM_MODES = (*ASYNC_MODES, SKEWED, *COLLECT_MODES)
CUDA_MODES = (Mode(True, "cuda"), Mode(True, "cuda", collect="eager"),
              Mode(True, "cuda", output_wait="poll"))
QUICK_EXAMPLES = 10


def _targeted(modes: tuple[Mode, ...], label: str) -> str:
    preemptions = overlapped = 0
    workloads = targeted_workloads("oracle")
    for name, workload in workloads.items():
        try:
            report = check_workload(workload, f"targeted-{name}{label}", modes)
        except AssertionError as exc:
            exc.add_note(f"  workload: targeted {name} (lockstep.ci.targeted.{name})")
            raise
        preemptions += report.stat("num_preemptions")
        overlapped += report.stat("overlapped_launches")
    return (f"{len(workloads)} workloads: sync = {', '.join(m.name for m in modes)} = solo; "
            f"{preemptions} preemptions, {overlapped} overlapped launches (oracle)")


def check_targeted(options: GateOptions) -> str:
    if options.foreign:
        return _targeted_on_engine(options)
    return _targeted(SIM_MODES, "")


def _targeted_on_engine(options: GateOptions) -> str:
    """The targeted workloads on another engine, narrowed to what it declares."""
    factory = options.factory
    caps = factory.capabilities
    reference, modes = engine_modes(factory, options.device)
    workloads = targeted_workloads("oracle")
    narrowed = []
    for name, workload in workloads.items():
        runnable = narrow_workload(dataclasses.replace(
            workload, engine=dataclasses.replace(workload.engine, model=None)), caps)
        narrowed += [name] if runnable.requests != workload.requests or \
            runnable.aborts != workload.aborts else []
        try:
            check_workload(runnable, f"targeted-{caps.engine}-{name}", modes, factory=factory,
                           reference=reference)
        except AssertionError as exc:
            exc.add_note(f"  workload: targeted {name} (lockstep.ci.targeted.{name}), "
                         f"narrowed to what {caps.engine} declares")
            raise
    return (f"{len(workloads)} workloads ({len(narrowed)} narrowed): "
            f"{' = '.join([reference.name, *(m.name for m in modes), 'solo'])} ({caps.engine})")


def check_targeted_cuda(options: GateOptions) -> str:
    return _targeted(CUDA_MODES, "-cuda")


def _property(prop, options: GateOptions) -> str:
    examples = QUICK_EXAMPLES if options.quick else settings().max_examples
    settings(max_examples=examples)(prop)()
    return f"{examples} examples, ci profile (derandomized)"


def check_property(options: GateOptions) -> str:
    if options.foreign:
        reference, modes = engine_modes(options.factory, options.device)
        prop = async_matches_sync_property(None, modes, factory=options.factory,
                                           reference=reference)
        return _property(prop, options) + f" ({options.factory.capabilities.engine})"
    return _property(async_matches_sync_property("oracle"), options) + " (oracle)"


def check_property_cuda(options: GateOptions) -> str:
    # the eager collect beside the lazy one: on a real device, timing decides what it collects
    modes = CUDA_MODES[:2]
    return _property(async_matches_sync_property("oracle", modes), options) + " (oracle)"


def check_property_model(options: GateOptions) -> str:
    prop = async_matches_sync_property(options.model, vocab=options.vocab)
    return _property(prop, options) + f" (model {options.model or 'default'})"


def check_machine(options: GateOptions) -> str:
    from lockstep.property_tests.machine import TestEngineMachine, machine_for
    if options.foreign:
        reference, modes = engine_modes(options.factory, options.device)
        machine = machine_for(options.factory, (reference, *modes))
        machine.TestCase("runTest").runTest()
        return f"{settings().max_examples} programs, ci profile " \
               f"({options.factory.capabilities.engine})"
    TestEngineMachine("runTest").runTest()
    return f"{settings().max_examples} programs, ci profile (oracle)"


def _generate_workload(model: str | None, vocab: int) -> Workload:
    params = [SamplingParams(temperature=0.8 * (i % 3 != 0), seed=i, max_tokens=16,
                             min_tokens=2 * (i % 3), stop_token_ids=[11, 12],
                             presence_penalty=0.7 * (i % 2),
                             repetition_penalty=1.0 + 0.3 * (i % 3 == 1), logprobs=2)
              for i in range(12)]
    prompts = [tuple((7 * i + 13 * j) % (vocab - 3) + 3 for j in range(5 + 9 * i))
               for i in range(12)]
    return Workload(EngineSpec(model=model, block_size=4, num_kv_blocks=48,
                               max_num_batched_tokens=32, max_num_seqs=6),
                    tuple(RequestSpec(f"gen1-{i}", p, sp) for i, (p, sp) in
                          enumerate(zip(prompts, params))))


def _llm(workload: Workload, device: str, policy: str, async_scheduling: bool) -> LLM:
    """An LLM whose engine steps beat the watchdog's heartbeat (a slow model is not a hang)."""
    spec = workload.engine
    llm = LLM(model=spec.model, device=device, sim_policy=policy if device == "sim" else None,
               async_scheduling=async_scheduling, block_size=spec.block_size,
               num_kv_blocks=spec.num_kv_blocks,
               max_num_batched_tokens=spec.max_num_batched_tokens,
               max_num_seqs=spec.max_num_seqs, dtype="float32" if device == "cuda" else None)
    core, name = llm.engine, Mode(async_scheduling, device, policy).name
    step = core.step

    def beating_step():
        heartbeat.beat(f"generate {name}", core.num_steps, True, core.activity)
        try:
            return step()
        finally:
            heartbeat.beat(f"generate {name}", core.num_steps, False)
    core.step = beating_step
    return llm


def _generate(workload: Workload, device: str, policy: str, async_scheduling: bool,
              llm: LLM | None = None, name: str | None = None) -> RunRecord:
    llm = llm or _llm(workload, device, policy, async_scheduling)
    name = name or Mode(async_scheduling, device, policy).name
    with sync_guard.race_check(), sync_guard.disallow():
        outs = llm.generate([list(r.prompt) for r in workload.requests],
                            [r.params for r in workload.requests])
    stats = llm.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"], f"{name}: KV blocks leaked"
    return RunRecord(name, {(o.request_id, 0): RequestResult(o.token_ids, o.finish_reason,
                                                             o.logprobs, o.error)
                            for o in outs}, stats=stats)


def _solo(workload: Workload, device: str) -> RunRecord:
    """Each request alone (sync, one engine, one ``generate`` call per request): what the batch
    must equal, whatever its mode."""
    llm, solo = _llm(workload, device, "eager", False), RunRecord(f"solo {device}")
    for i, request in enumerate(workload.requests):
        one = dataclasses.replace(workload, requests=(request,))
        result = _generate(one, device, "eager", False, llm, f"solo {request.request_id}")
        [(_, value)] = result.results.items()
        solo.results[(f"gen1-{i}", 0)] = value
    return solo


def check_generate(options: GateOptions) -> str:
    """LLM.generate, whole calls under sync_guard: each request alone = sync = async, and sync on
    every sim policy too (near-ties for float models). ``--quick``: lazy only, solo kept."""
    workload = _generate_workload(options.model, options.vocab or 512)
    policies = ["lazy"] if options.quick else ["lazy", "threaded", "skewed"]
    devices = ["sim"] + (["cuda"] if options.device == "cuda" else [])
    exact = is_exact(workload.engine)
    runs = 0
    for device in devices:
        solo = _solo(workload, device)
        reference = _generate(workload, device, "eager", False)
        compare_runs(solo, reference, workload, exact)
        targets = [(p, m) for p in (policies if device == "sim" else ["eager"])
                   for m in (False, True)]
        for policy, async_scheduling in targets:
            compare_runs(reference, _generate(workload, device, policy, async_scheduling),
                         workload, exact)
        runs += 2 + len(targets)
    where = ", ".join(["sim/" + p for p in policies] + (["cuda"] if "cuda" in devices else []))
    return (f"12 requests, sync and async on {where} = sync eager = each request alone "
            f"({runs} runs), whole calls guarded (model {options.model or 'default'})")


def check_perf(options: GateOptions) -> str:
    from .perf import check_against_baseline
    return check_against_baseline()


def check_faults(options: GateOptions) -> str:
    """Injected faults: the sweep (every call of every phase of the retiring workload, every
    sim mode; ``--quick``: async lazy and sync) and the random property, by the contract."""
    from lockstep.property_tests import faults
    modes = (faults.SIM_FAULT_MODES[0], faults.SIM_FAULT_MODES[2]) if options.quick else \
        faults.SIM_FAULT_MODES
    from lockstep.property_tests.fault_machine import run_fault_machine
    report = faults.fault_sweep(modes=modes)
    random = _property(faults.random_faults_property(modes), options)
    machine = run_fault_machine(settings(max_examples=QUICK_EXAMPLES) if options.quick else None)
    return (f"{report.faults} swept faults, 7 phases, {len(modes)} sim modes "
            f"({report.bystander_faults} with a request's tokens in flight outside the failing "
            f"step); random: {random}; fault machine: {machine} (oracle)")


def check_graphs_cuda(options: GateOptions) -> str:
    from .graph_poison import check_graph_poison
    return check_graph_poison(options.model) + f" (model {options.model or 'default'})"
