"""vLLM's paged KV cache seen as per-layer K and V views `[num_blocks, block_size, H, D]`.

The blender reads and writes a paged cache through such views and block
tables. How vLLM lays a layer's tensor out depends on the attention backend:

- GPU backends (FLASH_ATTN, TRITON_ATTN, FLASHINFER, FLEX_ATTENTION) in
  vLLM 0.32/0.33: per-layer logical `[num_blocks, H, block_size, 2*D]`;
  `kv.transpose(1, 2).split(D, -1)` gives K and V `[B, N, H, D]` (the
  backends' own code does exactly this).
- CPU_ATTN (0.32): per-layer `[num_blocks, H, block_size, 2*D]`, viewed by
  the backend as `[B, H, 2*block_size, D]` and cut in two along dim 2: the
  first `block_size` rows of each (block, head) hold K, the next hold V.
  Inside those rows the ISA decides: the VEC kernels store K column-major
  (`[D, block_size]`) and V row-major. We do not hard-code that: we let
  vLLM's own `cpu_attn_reshape_and_cache` write a probe pattern and derive
  the strides from where the values land. A layout that is not a strided
  view (a packed/VNNI one) is refused, and the connector falls back to
  plain prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GPU_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN", "FLASHINFER", "FLEX_ATTENTION")


class UnsupportedLayoutError(RuntimeError):
    """The attention backend's KV layout cannot be viewed as strided K/V."""


@dataclass(frozen=True)
class InBlockStrides:
    """Element strides of (token, head, dim) inside one block, and where the region starts."""

    token: int
    head: int
    dim: int
    offset: int


@dataclass(frozen=True)
class CpuLayout:
    k: InBlockStrides
    v: InBlockStrides


def _fit(pos: torch.Tensor, n: torch.Tensor, h: torch.Tensor, d: torch.Tensor
         ) -> InBlockStrides | None:
    """Strides with pos == off + n*sn + h*sh + d*sd for every probed element, if any."""
    def at(nn: int, hh: int, dd: int) -> int:
        m = (n == nn) & (h == hh) & (d == dd)
        idx = torch.nonzero(m).flatten()
        return int(pos[idx[0]]) if idx.numel() == 1 else -1

    base = at(0, 0, 0)
    sn = at(1, 0, 0) - base
    sh = at(0, 1, 0) - base if int(h.max()) > 0 else 0
    sd = at(0, 0, 1) - base
    if base < 0:
        return None
    pred = base + n * sn + h * sh + d * sd
    if not torch.equal(pred, pos):
        return None
    return InBlockStrides(sn, sh, sd, base)


def probe_cpu_layout(isa: str, num_heads: int, block_size: int, head_dim: int,
                     dtype: torch.dtype) -> CpuLayout:
    """Let vLLM's CPU cache-write op place a known pattern; read the layout back."""
    from vllm import _custom_ops as ops

    H, N, D = num_heads, block_size, head_dim
    n_idx = torch.arange(N).view(N, 1, 1).expand(N, H, D)
    h_idx = torch.arange(H).view(1, H, 1).expand(N, H, D)
    d_idx = torch.arange(D).view(1, 1, D).expand(N, H, D)
    # Exact small integers in any float dtype: one pass per coordinate (value = coord + 1).
    slots = torch.arange(N, dtype=torch.int64) + N  # block 1; block 0 stays untouched
    found = []
    for coord in (n_idx, h_idx, d_idx):
        kv = torch.zeros(2, H, N, 2 * D, dtype=dtype)
        view = kv.view(2, H, 2 * N, D)
        k_cache, v_cache = view.chunk(2, dim=2)
        vals = (coord + 1).to(dtype).contiguous()
        ops.cpu_attn_reshape_and_cache(vals, vals.clone(), k_cache, v_cache, slots, isa)
        found.append(kv[1].reshape(-1).float())
    n_at, h_at, d_at = (f.round().long() - 1 for f in found)
    pos = torch.nonzero(found[0] > 0).flatten()
    if pos.numel() != 2 * N * H * D:
        raise UnsupportedLayoutError(f"CPU KV layout probe ({isa}): {pos.numel()} of "
                                     f"{2 * N * H * D} elements written")
    # Each head's slab is 2*N*D elements: the first N*D belong to K, the rest to V.
    is_v = (pos % (2 * N * D)) // (N * D)
    out = []
    for region in (0, 1):
        p = pos[is_v == region]
        fit = _fit(p, n_at[p], h_at[p], d_at[p])
        if fit is None:
            raise UnsupportedLayoutError(
                f"CPU KV layout for ISA {isa!r} is not a strided view; cacheblend supports "
                "the strided CPU layouts (e.g. 'vec') and GPU backends " + ", ".join(GPU_BACKENDS))
        out.append(fit)
    return CpuLayout(out[0], out[1])


def _view(kv: torch.Tensor, s: InBlockStrides) -> torch.Tensor:
    B, H, N, twoD = kv.shape
    D = twoD // 2
    assert kv.is_contiguous(), "CPU KV cache must be contiguous"
    block = H * N * twoD
    return torch.as_strided(kv, (B, N, H, D), (block, s.token, s.head, s.dim),
                            kv.storage_offset() + s.offset)


def layer_views(kv: torch.Tensor, backend: str, cpu_layout: CpuLayout | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V views `[num_blocks, block_size, H, D]` over one layer's cache tensor."""
    if kv.dim() != 4:
        raise UnsupportedLayoutError(f"{backend}: expected a 4-D per-layer KV tensor, got "
                                     f"{tuple(kv.shape)}")
    if backend == "CPU_ATTN":
        if cpu_layout is None:
            raise UnsupportedLayoutError("CPU_ATTN needs a probed layout")
        return _view(kv, cpu_layout.k), _view(kv, cpu_layout.v)
    if backend in GPU_BACKENDS:
        D = kv.shape[-1] // 2
        t = kv.transpose(1, 2)
        return t[..., :D], t[..., D:]
    raise UnsupportedLayoutError(
        f"attention backend {backend!r} is not supported by cacheblend; supported: CPU_ATTN, "
        + ", ".join(GPU_BACKENDS))
