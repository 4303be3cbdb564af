"""Triton kernels for blending; installed as `blend.triton_kernels`.

Each module holds the Triton kernel, its launcher and a plain-PyTorch reference
(`*_ref`) side by side. All cache arguments use one paged layout:
`[num_blocks, block_size, num_kv_heads, head_dim]` K and V views, which may be
strided (vLLM's CPU cache is heads-before-positions); a contiguous cache is the
same thing with `num_blocks == 1`. A token's *slot* is `block * block_size + offset`.
"""
