"""The quality benchmark's CPU smoke mode (`python -m bench.quality_gpu --smoke`), so the GPU run cannot rot.

One vLLM engine with the connector on SmolLM2 (fp32, eager), both tasks, both splits, tiny n and
short contexts (a few minutes on 2 cores). It measures nothing about quality at scale: it checks
the issue-24 JSON shape, that the hybrid row was chosen on the tune split, that compute is what
the connector measured (ordered as the settings are), and, from the per-question state, that
full prefill's F1 is the SQuAD F1 of its own answers against the gold answers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"f1", "em", "compute", "f1_minus_full", "ci95"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, child_env, smollm2_path) -> dict:
    out, state = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("state")
    cmd = [sys.executable, "-m", "bench.quality_gpu", "--smoke", "--out", str(out),
           "--state", str(state), "--budget-s", "1500"]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env, capture_output=True, text=True,
                          timeout=1800)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "every planned run is done" in proc.stdout
    return {"out": out, "state": state, "doc": json.loads((out / "quality_gpu.json").read_text())}


def test_json_has_the_issue_shape(smoke):
    from bench.quality_gpu import HELDOUT_ROWS, PROFILES

    doc = smoke["doc"]
    assert doc["model"] == "SmolLM2-135M-Instruct" and doc["complete"]
    assert set(doc["tasks"]) == {"squad", "notes2hop", "squad@tune", "notes2hop@tune"}
    for name, t in doc["tasks"].items():
        tune = name.endswith("@tune")
        assert t["split"] == ("tune" if tune else "heldout")
        assert t["n"] == PROFILES["smoke"]["n_tune" if tune else "n"]
        want = ["full", "deviation", "cheap", *PROFILES["smoke"]["hybrids"]] if tune \
            else HELDOUT_ROWS
        assert set(t["rows"]) == set(want)
        for r, v in t["rows"].items():
            assert ROW_KEYS <= set(v), (name, r)
            assert 0 <= v["f1"] <= 100 and 0 <= v["em"] <= v["f1"] + 1e-9
            lo, hi = v["ci95"]
            assert lo <= v["f1_minus_full"] + 1e-6 and v["f1_minus_full"] <= hi + 1e-6
            assert v["f1_minus_full"] == pytest.approx(v["f1"] - t["rows"]["full"]["f1"],
                                                       abs=0.02)
    assert (smoke["out"] / "quality_gpu.png").stat().st_size > 10_000


def test_compute_is_measured_by_the_connector(smoke):
    for name, t in smoke["doc"]["tasks"].items():
        rows = t["rows"]
        assert rows["full"]["compute"] == 1.0
        for r, v in rows.items():
            if r != "full":  # every blended request was blended (chunks precomputed) and traced
                assert v["blended"] == 1.0, (name, r)
        # reuse < cheap < deviation < full: the order of the settings' nominal work.
        if "reuse" in rows:
            assert rows["reuse"]["compute"] < rows["cheap"]["compute"]
        assert 0.02 < rows["cheap"]["compute"] < rows["deviation"]["compute"] < 0.3
        # deviation at check layer 1, r=0.15 of 30 layers: 1/30 + 0.15 * 29/30 plus forced text
        assert rows["deviation"]["compute"] == pytest.approx(0.178, abs=0.06)


def test_hybrid_was_chosen_on_tune(smoke):
    from bench.quality_gpu import HYBRIDS

    for task in ("squad", "notes2hop"):
        row = smoke["doc"]["tasks"][task]["rows"]["hybrid"]
        tune = smoke["doc"]["tasks"][f"{task}@tune"]["rows"]
        cands = {k: v for k, v in tune.items() if k in HYBRIDS}
        best = max(cands.values(), key=lambda v: (v["f1"], -v["compute"]))
        assert tune[row["chosen_on_tune"]]["f1"] == best["f1"]
        assert row["cache_fuse_metadata"] == HYBRIDS[row["chosen_on_tune"]]


def test_full_prefill_f1_is_scored_against_gold(smoke):
    """Re-score full prefill's stored answers against the gold answers of freshly built items:
    the JSON's F1 must be that, and not every answer may score 0 or every one 1 (SmolLM2 finds
    some SQuAD answers in short contexts, and misses others)."""
    from transformers import AutoTokenizer

    from bench.quality_gpu import PROFILES, State, em_f1, make_items
    from blend.assets import model_path

    doc = smoke["doc"]
    state = State(Path(doc["state"]).parent, Path(doc["state"]).name)
    tok = AutoTokenizer.from_pretrained(model_path())
    items = make_items("squad", tok, "heldout", PROFILES["smoke"]["n"], 0, PROFILES["smoke"])
    full = state.load("squad", "heldout", "full")["q"]
    assert set(full) == {it["id"] for it in items}
    f1s = [em_f1(full[it["id"]]["pred"], it["answers"])[1] for it in items]
    assert doc["tasks"]["squad"]["rows"]["full"]["f1"] == pytest.approx(
        100 * sum(f1s) / len(f1s), abs=0.01)
    # A wrong gold list would give 0 for every answer; so would a model that says nothing.
    assert any(full[it["id"]]["pred"] for it in items)
    wrong = [em_f1(full[it["id"]]["pred"], ["zzqx unrelated"])[1] for it in items]
    assert sum(wrong) == 0
