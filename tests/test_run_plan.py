"""`RunPlan`: the host-side sizes of a blend run, on hand-worked cases and random odd sizes."""

import math
import random

import pytest
import torch

from blend.config import BlendConfig
from blend.run_plan import cumsum, plan_run, sizes, tail_rows


def _mask(n: int, forced_rows) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[list(forced_rows)] = True
    return m


def test_deviation_with_outputs_and_probes_by_hand():
    # Sequence 0: 10 tokens, 2 forced, its last 3 are outputs. Sequence 1: 6 tokens, nothing
    # forced, its last 2 are probes. Forced 5 and 2, cached 5 and 4; r=0.5 keeps 3 and 2 more.
    plan = plan_run(BlendConfig(recomp_ratio=0.5), [10, 6], [10, 6], [_mask(10, [0, 1]), None],
                    [3, 0], [0, 2], blend=True)
    assert plan.outputs == (3, 0) and plan.probes == (0, 2) and plan.question == (3, 2)
    assert plan.takes == {1: (8, 4)}
    # after layer 1: 8 + 4 rows, then sequence 1's two probes leave
    assert plan.phase_cu == ((0, 10, 16), (0, 8, 10))
    assert plan.rows_without_probes == tuple(range(10))
    assert plan.output_rows == (5, 6, 7)
    assert plan.context_rows == ((7, 4), (5, 2))
    assert plan.dense == (True, False)
    assert plan.query_rows == {} and plan.preload_rows == (tuple(range(10)),)
    assert not plan.cheap and plan.last_check == 1


def test_query_selection_reads_the_question_rows_by_hand():
    plan = plan_run(BlendConfig(recomp_ratio=0.5, selection="query"), [10, 6], [10, 6],
                    [_mask(10, [0, 1]), None], [3, 0], [0, 2], blend=True)
    assert plan.query_rows == {1: (7, 8, 9, 14, 15)}
    assert plan.preload_rows == ((7, 8, 9, 14, 15), tuple(range(10)))


def test_gradual_filtering_by_hand():
    # 20 tokens, the last 4 the question (outputs), nothing else forced: 16 cached.
    cfg = BlendConfig(check_layers=(1, 3), recomp_ratios=(0.5, 0.25))
    plan = plan_run(cfg, [20], [20], [None], [4], [0], blend=True)
    assert plan.takes == {1: (12,), 3: (8,)}
    assert plan.phase_cu == ((0, 20), (0, 12), (0, 8))
    assert plan.context_rows == ((16,), (8,), (4,))
    assert plan.output_rows == (4, 5, 6, 7)
    assert plan.rows_without_probes is None and plan.last_check == 3


def test_cheap_probe_pass_by_hand():
    # 8 tokens, the last 3 probes: 3 forced, 5 cached; r=0.25 keeps ceil(1.25) = 2 of those.
    cfg = BlendConfig(recomp_ratio=0.25, check_layers=(2,), selection="cheap")
    plan = plan_run(cfg, [8], [8], [None], [0], [3], blend=True)
    assert plan.cheap and plan.takes == {} and plan.last_check is None
    assert plan.probe_rows == (5, 6, 7) and plan.question_cu == (0, 3)
    assert plan.cheap_takes == (5,)
    assert plan.rows_without_probes == (0, 1)  # the probe pass was the probes' only use
    assert plan.phase_cu == ((0, 2),) and plan.context_rows == ((2,),)
    assert plan.output_rows == () and plan.dense == (False,)
    assert plan.preload_rows == ((5, 6, 7), (0, 1))


def test_cheap_without_a_question_is_deviation():
    cfg = BlendConfig(recomp_ratio=0.25, check_layers=(2,), selection="cheap")
    plan = plan_run(cfg, [8], [8], [None], [0], [0], blend=True)
    assert not plan.cheap and plan.takes == {2: (2,)}


def test_plain_prefill_is_one_dense_phase():
    # A decode-like step: 3 new tokens after 90 cached keys; forced masks and probes are ignored.
    plan = plan_run(BlendConfig(), [3], [93], [_mask(3, [0])], [1], [2], blend=False)
    assert plan.takes == {} and not plan.cheap and plan.probes == (0,)
    assert plan.phase_cu == ((0, 3),) and plan.dense == (True,)
    assert plan.seq_lens == (93,) and plan.output_rows == (2,) and plan.output_cu == (0, 1)
    assert plan.context_rows == ((2,),)


def _random_case(rng: random.Random):
    selection = rng.choice(["deviation", "query", "hybrid", "cheap"])
    layers = tuple(sorted(rng.sample(range(1, 8), rng.randint(1, 3))))
    if selection == "cheap" or rng.random() < 0.5:
        cfg = BlendConfig(recomp_ratio=rng.choice([0.0, 0.15, 1.0, rng.random()]),
                          check_layers=layers, selection=selection)
    else:
        ratios = sorted((rng.choice([0.0, 0.15, 1.0, rng.random()]) for _ in layers), reverse=True)
        cfg = BlendConfig(check_layers=layers, recomp_ratios=tuple(ratios), selection=selection)
    nseq = rng.randint(1, 4)
    lens = [rng.randint(0, 37) for _ in range(nseq)]
    forced = [None if rng.random() < 0.3 else torch.rand(n) < rng.random() for n in lens]
    outputs = [rng.choice([0, rng.randint(0, 7)]) for _ in lens]
    probes = [rng.choice([0, rng.randint(0, 9)]) for _ in lens]
    return cfg, lens, forced, outputs, probes


@pytest.mark.parametrize("seed", range(300))
def test_random_plans_are_consistent(seed):
    rng = random.Random(seed)
    cfg, lens, forced, outputs, probes = _random_case(rng)
    blend = rng.random() < 0.85
    plan = plan_run(cfg, lens, [n + 5 for n in lens], forced, outputs, probes, blend=blend)
    nseq = len(lens)
    assert plan.token_cu == cumsum(lens) and plan.lens == tuple(lens)
    assert all(0 <= o <= n and 0 <= o + p <= n for o, p, n in zip(plan.outputs, plan.probes, lens))
    assert len(plan.phase_cu) == len(plan.takes) + 1
    for cu in plan.phase_cu:
        assert len(cu) == nseq + 1 and cu[0] == 0 and all(x >= 0 for x in sizes(cu))
    # every phase keeps at most the rows of the one before, and no phase grows past the input
    for before, after in zip((plan.token_cu, *plan.phase_cu), plan.phase_cu):
        assert all(a <= b for a, b in zip(sizes(after), sizes(before)))
    # the question stays until the probes leave, and the outputs to the end
    for p, cu in enumerate(plan.phase_cu):
        tail = plan.outputs if p == len(plan.phase_cu) - 1 else plan.question
        assert all(n >= t for n, t in zip(sizes(cu), tail))
        assert plan.context_rows[p] == tuple(n - t for n, t in zip(sizes(cu), tail))
        assert plan.dense[p] == (cu == plan.token_cu)
    # the output rows are the last rows of each sequence in the last phase
    final = plan.phase_cu[-1]
    assert len(plan.output_rows) == sum(plan.outputs)
    want = [i for b in range(nseq) for i in range(final[b + 1] - plan.outputs[b], final[b + 1])]
    assert list(plan.output_rows) == want
    if plan.rows_without_probes is not None:
        rows = plan.rows_without_probes
        assert any(plan.probes) and len(rows) == final[-1]
        assert list(rows) == sorted(set(rows))  # ascending, no repeats
    else:
        assert not any(plan.probes) or not (plan.cheap or plan.takes)
    if not blend:
        assert plan.takes == {} and not plan.cheap and plan.phase_cu == (plan.token_cu,)
    for layer, take in plan.takes.items():
        assert layer in cfg.check_layers and len(take) == nseq
        forced_n = [q + (0 if f is None else int(f[:n - q].sum()))
                    for f, n, q in zip(forced, lens, plan.question)]
        assert all(t >= f for t, f in zip(take, forced_n))
    for phase, layer in enumerate(sorted(plan.query_rows)):  # the question among a check's rows
        assert cfg.selection in ("query", "hybrid") and layer in plan.takes
        assert plan.query_rows[layer] == tail_rows(plan.phase_cu[phase], plan.question)


@pytest.mark.parametrize("seed", range(100))
def test_ratio_one_keeps_every_row_and_zero_only_the_forced(seed):
    rng = random.Random(seed)
    _, lens, forced, outputs, _ = _random_case(rng)
    layers = tuple(sorted(rng.sample(range(1, 8), rng.randint(1, 3))))
    for selection in ("deviation", "hybrid"):
        everything = plan_run(BlendConfig(recomp_ratio=1.0, check_layers=layers,
                                          selection=selection),
                              lens, lens, forced, outputs, [0] * len(lens), blend=True)
        assert everything.phase_cu == (everything.token_cu,) * (len(layers) + 1)
        assert all(everything.dense)
        nothing = plan_run(BlendConfig(recomp_ratio=0.0, check_layers=layers), lens, lens, forced,
                           outputs, [0] * len(lens), blend=True)
        forced_n = [o + (0 if f is None else int(f[:n - o].sum()))
                    for f, n, o in zip(forced, lens, nothing.outputs)]
        assert sizes(nothing.phase_cu[-1]) == forced_n


def test_cheap_takes_the_ratio_of_the_cached_rows():
    cfg = BlendConfig(recomp_ratio=0.15, check_layers=(4,), selection="cheap")
    for n in (7, 33, 101):
        plan = plan_run(cfg, [n], [n], [None], [2], [0], blend=True)
        assert plan.cheap_takes == (2 + math.ceil(0.15 * (n - 2) - 1e-9),)
        assert plan.phase_cu == ((0, min(n, plan.cheap_takes[0])),)
