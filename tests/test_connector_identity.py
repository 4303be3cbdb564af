"""What goes into the store fingerprint of a vLLM engine (engine-free)."""

import vllm

from blend.connector.identity import _with_yarn_impl
from blend.patches.table import version_key


def test_yarn_chunk_kv_is_keyed_by_the_vllm_minor_version():
    for rope in ({"rope_scaling": {"type": "yarn", "factor": 4.0}},
                 {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}):
        assert _with_yarn_impl(rope)["vllm_yarn"] == version_key(vllm.__version__)


def test_other_ropes_keep_their_fingerprint_across_versions():
    for rope in ({"rope_theta": 1e4}, {"rope_parameters": {"rope_type": "llama3"}},
                 {"rope_scaling": {"type": "linear", "factor": 2.0}}):
        assert _with_yarn_impl(rope) == rope
