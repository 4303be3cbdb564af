"""The quality benchmark's task builders (bench/quality_gpu.py), engine-free: each HotpotQA
item holds both gold paragraphs among its documents, fits the context range, and comes from
its own split; documents stay within the chunk size unless one paragraph alone is longer."""

from __future__ import annotations

import pytest

from blend.assets import AssetError


@pytest.fixture(scope="module")
def hotpot_dev():
    from bench import hotpot

    try:
        return {q["_id"]: q for q in hotpot.load_hotpot_dev()}
    except AssetError as exc:
        pytest.skip(f"no HotpotQA dev set here: {exc}")


@pytest.mark.parametrize("split", ["tune", "heldout"])
def test_hotpot_items_hold_their_gold_paragraphs(tok, hotpot_dev, split):
    from bench.quality_gpu import _ntok, hotpot_items, split_of

    lo, hi, doc_tokens = 1500, 3000, 300
    items = hotpot_items(tok, split, 12, 0, lo, hi, doc_tokens)
    assert len(items) == 12 and len({it["id"] for it in items}) == 12
    for it in items:
        q = hotpot_dev[it["id"]]
        assert split_of(it["id"]) == split and it["answers"] == [q["answer"]]
        assert it["question"] == q["question"]
        paras = {t: f"{t}\n" + "".join(s).strip() for t, s in q["context"]}
        gold = {t for t, _ in q["supporting_facts"]}
        assert gold and set(it["gold_titles"]) == gold
        for title in gold:  # each gold paragraph whole inside one document
            assert sum(paras[title] in d for d in it["docs"]) == 1, title
        sizes = _ntok(tok, it["docs"])
        assert lo - 700 <= sum(sizes) <= hi + 64, sum(sizes)
        for d, n in zip(it["docs"], sizes):
            assert n <= doc_tokens + 8 or "\n\n" not in d, n
