"""MoE dispatch/combine scenarios on every backend, checked against the NumPy reference
(tests/moe_reference.py): the CPU reference context (R ranks = R CPU devices of this process), the
inter-node host context on the same devices split into node groups (``cpu-nodes1``: every rank its
own node, ``cpu-nodes2``: pairs; rows between groups through the TransferEngine over tcp on
127.0.0.1; tests/test_moe_internode.py runs them across processes) and the CUDA NVLink kernels
(R GPUs driven by this process; marker ``gpu``, skipped without them). ``cpu-nodes8`` is the
inter-node context with one node group of all R ranks (1xR: no engine).
Each scenario body is written once, in tests/moe_scenarios.py. Backend-specific behaviour (errors
at trace time, timeouts, closing, process layouts, CUDA graphs) is in tests/test_moe_cpu.py and
tests/test_moe_gpu.py."""

from __future__ import annotations

import os

# GPU runs share the devices with other processes: no process grabs 75% of every GPU up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import pytest  # noqa: E402

import moe_scenarios as sc  # noqa: E402


def _on(backend: str, *values, id: str):
    """One parameter set on ``backend`` (GPU ones carry the gpu marker)."""
    marks = [pytest.mark.gpu] if backend == "gpu" else []
    return pytest.param(sc.BACKENDS[backend], *values, marks=marks, id=f"{backend}-{id}")


def _backends(cpu_values: tuple, gpu_values: tuple, id: str = "") -> list:
    return [_on("cpu", *cpu_values, id=id or "default"), _on("gpu", *gpu_values, id=id or "default")]


def _nodes(values: tuple, nodes: tuple = (1, 2), id: str = "default") -> list:
    """The same parameters on the CPU node-topology backends (cpu-nodes1, cpu-nodes2)."""
    return [_on(f"cpu-nodes{n}", *values, id=id) for n in nodes]


ROUND_TRIPS = (
    [_on("cpu", name, case, id=name) for name, case in sc.CPU_CASES.items()]
    # Every case with each rank its own node; pairs where that leaves at least two groups.
    + [_on("cpu-nodes1", name, case, id=name) for name, case in sc.CPU_CASES.items()]
    + [_on("cpu-nodes2", name, case, id=name) for name, case in sc.CPU_CASES.items() if case.r >= 4]
    + [_on("cpu-nodes8", name, sc.CPU_CASES[name], id=name)
       for name in ("random-R2", "fp8-computed-R4-pad16", "overflow-R2", "K8-R8-pad16")]
    + [_on("gpu", name, case, id=f"R{r}-{name}")
       for r in sc.GPU_RANKS for name, case in sc.gpu_cases(r).items()]
)


@pytest.mark.parametrize("backend, name, case", ROUND_TRIPS)
def test_round_trip_matches_reference(backend, name, case):
    """One dispatch + combine per case (routing patterns, bound_m, padding, K, fp8 given and
    computed, wide rows, capacity overflow): outputs bitwise, dropped rows as the reference."""
    backend.require(case.r)
    sc.assert_no_errors(sc.run_case(backend, name, case, backend.mesh(case.r)))


@pytest.mark.parametrize("backend, r", [_on("cpu", 8, id="R8"), _on("cpu-nodes1", 4, id="R4"),
                                        _on("cpu-nodes2", 4, id="R4")]
                         + [_on("gpu", r, id=f"R{r}") for r in sc.GPU_RANKS])
def test_determinism_bitwise(backend, r):
    backend.require(r)
    case = sc.determinism_case(backend, r)
    sc.assert_no_errors(sc.run_determinism(backend, case, backend.mesh(r)))


@pytest.mark.parametrize("backend, r", _backends((4,), (2,)) + _nodes((4,)))
def test_combine_adds_in_k_order(backend, r):
    backend.require(r)
    sc.assert_no_errors(sc.run_combine_in_k_order(backend, r))


@pytest.mark.parametrize("backend, r, h, bound_m",
                         _backends((4, 16, [6, 3, 0, 5]), (2, 64, [6, 3])) + _nodes((4, 16, [6, 3, 0, 5])))
def test_split_phases_with_expert_compute_and_layers(backend, r, h, bound_m):
    backend.require(r)
    sc.assert_no_errors(sc.run_split_phases_with_layers(backend, r, h, bound_m))


@pytest.mark.parametrize("backend, r, h, bound_m",
                         _backends((4, 16, [6, 3, 0, 5]), (1, 64, [5])) + [_on("gpu", 2, 64, [6, 3], id="R2")]
                         + _nodes((4, 16, [6, 3, 0, 5]), nodes=(1,)))
def test_dispatch_combine_and_split_halves_mixed(backend, r, h, bound_m):
    """dispatch()/combine() (one kernel each on CUDA) and the split halves in any order on one
    AllToAll: one protocol, the reference's results."""
    backend.require(r)
    sc.assert_no_errors(sc.run_mixed_calls(backend, r, h, bound_m))


@pytest.mark.parametrize("backend", _backends((), ()) + _nodes((), nodes=(1,)))
def test_dispatch_and_combine_in_separate_programs(backend):
    backend.require(2)
    sc.assert_no_errors(sc.run_separate_programs(backend))


RAGGED = (
    [_on("cpu", name, case, id=name) for name, case in sc.CPU_RAGGED_CASES.items()]
    + [_on("gpu", name, case, id=f"R{r}-{name}")
       for r in sc.GPU_RANKS[1:] for name, case in sc.gpu_ragged_cases(r).items()]
)


@pytest.mark.parametrize("backend, name, case", RAGGED)
def test_ragged_all_to_all_agrees(backend, name, case):
    """RaggedAllToAll (jax.lax.ragged_all_to_all; on XLA:CPU, which has none, the all_gather
    emulation) and AllToAll give the reference's layout and combine."""
    backend.require(case.r)
    sc.assert_no_errors(sc.run_ragged(backend, name, case, backend.mesh(case.r)))


@pytest.mark.parametrize("backend, case", _backends((sc.Case(r=2, e=4, k=2),),
                                                    (sc.GpuCase(r=2, e=8, k=2),))
                         + _nodes((sc.Case(r=2, e=4, k=2),), nodes=(1,)))
def test_combine_with_other_routing_is_an_error(backend, case):
    backend.require(case.r)
    sc.run_combine_with_other_routing(backend, case)


@pytest.mark.parametrize("backend, case", _backends((sc.Case(r=2, e=4, k=2),),
                                                    (sc.GpuCase(r=2, e=8, k=2),))
                         + _nodes((sc.Case(r=4, e=8, k=2),), nodes=(2,)))
def test_wrong_expert_counts_is_an_error(backend, case):
    backend.require(case.r)
    sc.run_wrong_expert_counts(backend, case)


SAME_BITS = ["fp8-computed-R4-pad16", "overflow-R2", "bound-mixed-R8", "skewed-R4"]


@pytest.mark.parametrize("backend, name", [_on(b, n, id=n) for b in ("cpu-nodes1", "cpu-nodes2", "cpu-nodes8")
                                           for n in SAME_BITS])
def test_node_split_gives_the_cpu_references_bits(backend, name):
    """Whatever the node split, the outputs are bit for bit those of the in-process CPU
    reference on the same inputs (and the same dropped rows)."""
    case = sc.CPU_CASES[name]
    backend.require(case.r)
    sc.assert_no_errors(sc.run_same_bits_as_reference(backend, name, case, backend.mesh(case.r)))
