"""Microbenchmarks of the Triton kernels: window-attention accumulation and paged KV compaction.

On a GPU: time per call (triton.testing.do_bench), the accumulation's cost relative to the attention its window
queries do anyway (torch SDPA over the same KV, output only), and achieved bytes/s against the HBM peak
(unique bytes: each key read once and the accumulator written once; compaction reads and writes each kept slot).
On CPU the kernels run under Triton's interpreter, so times mean nothing: the script only checks that each kernel
runs and matches its torch reference, at tiny sizes.

    python benchmarks/kernels.py            # GPU: Llama-3.1-8B-like shapes, bf16
    python benchmarks/kernels.py --smoke    # tiny sizes (what CI runs; always the case on CPU)
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass

import torch

# Dense peak bandwidth of the GPUs this project is measured on (vendor data sheets, SXM parts).
HBM_PEAK_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}


@dataclass(frozen=True)
class Shape:
    requests: int
    seq_len: int
    q_heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    window: int  # queries per request that score (prefill window 32, decode window 8)
    kept: int  # slots per request after compaction


@dataclass
class KernelResult:
    kernel: str
    shape: dict
    max_abs_error: float
    ms: float | None = None
    baseline_ms: float | None = None  # the attention of the same queries, without scoring
    bytes_per_s: float | None = None
    hbm_fraction: float | None = None


def paged_keys(shape: Shape, dtype: torch.dtype, device: str):
    """Keys on shuffled blocks of one pool, their block table, and the dense [reqs, kv_heads, L, D] view."""
    blocks_per_request = -(-shape.seq_len // shape.block_size)
    num_blocks = shape.requests * blocks_per_request
    table = torch.randperm(num_blocks, device=device).view(shape.requests, blocks_per_request).int()
    keys = torch.randn(num_blocks, shape.kv_heads, shape.block_size, shape.head_dim, dtype=dtype, device=device)
    slots = torch.arange(shape.seq_len, device=device)
    dense = keys[table[:, slots // shape.block_size].long(), :, slots % shape.block_size]  # [R, L, kv, D]
    return keys, table, dense.permute(0, 2, 1, 3)


def bench_window_attention(shape: Shape, dtype: torch.dtype, device: str, timed: bool) -> KernelResult:
    from infokv_vllm.kernels.window_attention import accumulate_window_attention_triton, window_attention_mass

    keys, table, dense_keys = paged_keys(shape, dtype, device)
    queries = torch.randn(shape.requests * shape.window, shape.q_heads, shape.head_dim, dtype=dtype, device=device)
    requests = torch.arange(shape.requests, device=device).repeat_interleave(shape.window).int()
    positions = torch.arange(shape.seq_len - shape.window, shape.seq_len, device=device).repeat(shape.requests).int()
    seq_lens = torch.full((shape.requests,), shape.seq_len, dtype=torch.int32, device=device)
    scale = shape.head_dim ** -0.5
    accumulator = torch.zeros(keys.shape[:3], dtype=torch.float32, device=device)

    def run() -> None:
        accumulate_window_attention_triton(queries, keys, table, accumulator, requests, positions, seq_lens, scale)

    run()
    expected = torch.stack([window_attention_mass(queries[r * shape.window:(r + 1) * shape.window],
                                                  dense_keys[r], positions[:shape.window].long(), scale)
                            for r in range(shape.requests)])  # [R, kv, L]
    slots = torch.arange(shape.seq_len, device=device)
    got = accumulator[table[:, slots // shape.block_size].long(), :, slots % shape.block_size].permute(0, 2, 1)
    result = KernelResult("window_attention", asdict(shape), (got - expected).abs().max().item())
    if timed:
        from triton.testing import do_bench

        values = torch.randn_like(dense_keys)
        dense_queries = queries.view(shape.requests, shape.window, shape.q_heads, -1).transpose(1, 2)
        mask = slots[None, :] <= positions[:shape.window, None].long()

        def attention() -> None:
            torch.nn.functional.scaled_dot_product_attention(dense_queries, dense_keys, values, attn_mask=mask,
                                                             enable_gqa=True)

        result.ms, result.baseline_ms = do_bench(run), do_bench(attention)
        unique = dense_keys.numel() * dense_keys.element_size() + dense_keys.numel() // shape.head_dim * 4
        _bandwidth(result, unique)
    return result


def bench_compaction(shape: Shape, dtype: torch.dtype, device: str, timed: bool) -> KernelResult:
    from infokv_vllm.kernels.compaction import compact_plane_triton

    plane, table, dense = paged_keys(shape, dtype, device)
    generator = torch.Generator(device=device).manual_seed(0)
    scores = torch.rand(shape.requests, shape.kv_heads, shape.seq_len, generator=generator, device=device)
    keep = scores.topk(shape.kept, dim=-1).indices.sort(dim=-1).values.int()
    n_keep = torch.full((shape.requests,), shape.kept, dtype=torch.int32, device=device)
    expected = torch.gather(dense, 2, keep.long()[..., None].expand(-1, -1, -1, shape.head_dim))
    original = plane.clone()
    compact_plane_triton(plane, table, keep, n_keep)
    slots = torch.arange(shape.kept, device=device)
    got = plane[table[:, slots // shape.block_size].long(), :, slots % shape.block_size].permute(0, 2, 1, 3)
    result = KernelResult("compaction", asdict(shape), (got.float() - expected.float()).abs().max().item())
    if timed:
        from triton.testing import do_bench

        # Each timed call compacts a fresh copy: compacting an already-compacted plane moves different slots.
        restore = lambda: plane.copy_(original)  # noqa: E731
        copy_ms = do_bench(restore)
        result.ms = do_bench(lambda: (restore(), compact_plane_triton(plane, table, keep, n_keep))) - copy_ms
        _bandwidth(result, 2 * shape.requests * shape.kv_heads * shape.kept * shape.head_dim * plane.element_size())
    return result


def _bandwidth(result: KernelResult, unique_bytes: int) -> None:
    result.bytes_per_s = unique_bytes / (result.ms / 1e3)
    name = torch.cuda.get_device_name()
    peak = next((value for gpu, value in HBM_PEAK_BYTES_PER_S.items() if gpu in name), None)
    result.hbm_fraction = result.bytes_per_s / peak if peak else None


def main() -> None:
    from report import write_report  # beside this script (benchmarks run as files)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no timing")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        # Triton picks its interpreter when a kernel is defined, so before the kernel modules are imported.
        os.environ["TRITON_INTERPRET"] = "1"
        args.smoke = True
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.smoke:
        shapes = [Shape(2, 100, 8, 2, 32, 16, 8, 40)]
    else:
        shapes = [Shape(16, 8192, 32, 8, 128, 16, 32, 2048), Shape(16, 8192, 32, 8, 128, 16, 8, 2048),
                  Shape(64, 2048, 32, 8, 128, 16, 8, 512)]
    results = [bench(shape, dtype, device, timed=not args.smoke)
               for shape in shapes for bench in (bench_window_attention, bench_compaction)]
    print(f"{'kernel':17} {'reqs':>4} {'len':>5} {'win':>4} {'kept':>5} {'max err':>9} {'ms':>8} "
          f"{'vs attn':>8} {'GB/s':>7} {'HBM':>5}")
    for r in results:
        s = r.shape
        timing = ("" if r.ms is None else f"{r.ms:>8.3f} "
                  + (f"{r.ms / r.baseline_ms:>7.2f}x " if r.baseline_ms else f"{'-':>8} ")
                  + f"{r.bytes_per_s / 1e9:>7.0f} " + (f"{r.hbm_fraction:>5.0%}" if r.hbm_fraction else ""))
        print(f"{r.kernel:17} {s['requests']:>4} {s['seq_len']:>5} {s['window']:>4} {s['kept']:>5} "
              f"{r.max_abs_error:>9.2e} {timing}")
    write_report("kernels", args.smoke, dtype=str(dtype).removeprefix("torch."), triton_interpreter=not on_gpu,
                 results=[asdict(r) for r in results])


if __name__ == "__main__":
    main()
