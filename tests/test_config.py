"""`cache_fuse_metadata` validation: every bad key or value names itself and its range."""

import pytest

from blend.config import BlendConfig, BlendConfigError, num_recompute


@pytest.mark.parametrize("meta, needle", [
    ({"recomp_ratio": 1.5}, "recomp_ratio: 1.5 must be a number in [0, 1]"),
    ({"recomp_ratio": -0.1}, "recomp_ratio"),
    ({"recomp_ratio": float("nan")}, "recomp_ratio"),
    ({"recomp_ratio": True}, "recomp_ratio"),
    ({"check_layers": []}, "check_layers"),
    ({"check_layers": [0]}, "check_layers: 0"),
    ({"check_layers": [3, 1]}, "strictly increasing"),
    ({"check_layers": [1, 1]}, "strictly increasing"),
    ({"check_layers": ["1"]}, "check_layers"),
    ({"check_layers": [1, 4], "recomp_ratios": [0.3]}, "one per check layer"),
    ({"check_layers": [1, 4], "recomp_ratios": [0.1, 0.3]}, "non-increasing"),
    ({"recomp_ratios": [2.0]}, "recomp_ratios"),
    ({"deviation": "cosine"}, "deviation: 'cosine' not in"),
    ({"sink_tokens": -1}, "sink_tokens"),
    ({"attention_backend": "xformers"}, "attention_backend"),
    ({"cuda_graphs": "yes"}, "cuda_graphs"),
    ({"recomp_raito": 0.1}, "unknown key(s) ['recomp_raito']; allowed:"),
])
def test_bad_config_names_key_and_range(meta, needle):
    with pytest.raises(BlendConfigError) as err:
        BlendConfig.from_dict(meta)
    assert needle in str(err.value)


def test_check_layer_out_of_model_range():
    with pytest.raises(BlendConfigError, match=r"allowed 1..29"):
        BlendConfig.from_dict({"check_layers": [30]}).check_model(30)


def test_defaults_and_schedule():
    cfg = BlendConfig.from_dict(None)
    assert cfg.recomp_ratio == 0.15 and cfg.check_layers == (1,) and cfg.deviation == "v_l2"
    cfg = BlendConfig.from_dict({"check_layers": [1, 4, 8], "recomp_ratios": [0.4, 0.2, 0.1]})
    assert cfg.ratios() == (0.4, 0.2, 0.1)
    assert BlendConfig.from_dict({"check_layers": 2}).check_layers == (2,)
    assert BlendConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("ratio, n, expect", [(0.0, 100, 0), (1.0, 100, 100), (0.15, 100, 15),
                                              (0.15, 7, 2), (0.001, 5, 1), (0.5, 0, 0)])
def test_num_recompute(ratio, n, expect):
    assert num_recompute(ratio, n) == expect
