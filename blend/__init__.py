"""cacheblend: CacheBlend for vLLM.

Reuse each retrieved chunk's KV cache wherever it appears in a prompt, fix its
RoPE positions, and recompute only the tokens whose KV deviates most from a
full prefill.
"""

__version__ = "0.1.0"
