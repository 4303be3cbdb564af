"""cacheblend: CacheBlend for vLLM.

Reuse each retrieved chunk's KV cache wherever it appears in a prompt, fix its
RoPE positions, and recompute only the tokens whose KV deviates most from a
full prefill.
"""

__version__ = "0.1.0"

# vLLM integration: helpers, and patches applied when vLLM is imported.
from blend.api import BlendPrompt, build_prompt, kv_transfer_config, precompute  # noqa: E402, F401
from blend.patches import install_import_hook as _install_import_hook  # noqa: E402

_install_import_hook()


def __getattr__(name: str):
    """Offline API, imported on first use (it pulls in transformers)."""
    if name == "HFBlender":
        from blend.offline import HFBlender

        return HFBlender
    if name == "BlendConfig":
        from blend.config import BlendConfig

        return BlendConfig
    raise AttributeError(f"module 'blend' has no attribute {name!r}")
