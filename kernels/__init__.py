"""squeeze.kernels: sparse kernels (Triton, torch references, CPU fast paths). Never imports the passes.

Public API:

2:4 format (sparse24_format)
    pack_24(W) -> (values [N, K/2], meta [N, ceil(K/8)] uint8);  unpack_24(values, meta, K=None) -> W
    to_cutlass(values, meta) / from_cutlass(values, meta_reordered)  (torch's CUTLASS layout)
    is_24_sparse(W), compressed_bytes(n, k, dtype)
2:4 linear (sparse24_matmul)
    linear_24(x, values, meta, bias=None, *, backend="auto", cache=None);  DenseWeightCache
    linear_24_reference(x, values, meta, bias=None)
Weight-only quantized linear (quant_format, quant_matmul): int8 / int4 (sym, asym) / fp8 e4m3 codes,
fp32 scales per group of K, uint8 zero points; int4 packed two per byte, low nibble = even column
    quant_linear(x, codes, scale, zero=None, *, bits, symmetric, group_size, bias=None, backend="auto")
    pack_int4(u) -> uint8 [N, ceil(K/2)];  unpack_int4(packed, K) -> uint8 [N, K]
    dequantize_reference(codes, scale, zero, *, bits, symmetric, group_size, K=None) -> fp32 [N, K]
    quant_linear_reference(x, codes, scale, zero=None, *, bits, symmetric, group_size, bias=None) -> fp32
    check_quant_args(...), quant_bytes(n, k, *, bits, group_size=None, symmetric=True, sparse24=False)
    2:4 + int8 (pack_24's values as int8 codes, fp32 scales over the original K):
    quant_linear_24(x, values, meta, scale, *, group_size, bias=None, backend="auto")
    dequantize_24_reference(values, meta, scale, *, group_size, K=None), check_quant24_args(...)
Activation-sparse FFN (chunk_ffn, cpu_ffn, ffn_reference)
    chunk_sparse_ffn(x, w_gate, w_up, w_downT, act, threshold=None, *, threshold_on="h", backend="auto")
    sparse_ffn_from_indices(x, w_gate, w_up, w_downT, indices, act, count=None, *, backend="auto")
    SparseFFNWorkspace(w_gate, w_up, w_downT, act, *, w_down=None, max_tokens=8, block_rows=128)
        ws(x, indices) / ws(x, mask=...) / ws.chunk(x, threshold=None, threshold_on="h") / ws.calibrate()
    chunk_sparse_ffn_reference, sparse_ffn_reference, dense_ffn_reference, active_neurons, act_mul

Activation-sparse linear, CPU (cpu_input_sparse): TEAL/WINA-style zero inputs skip weight rows
    input_sparse_linear_cpu(x, w_t, bias=None, *, dense=None, plan=None, entries=None)  (bag / gather / dense)
    linear_rows_bag(x, w_t, bias, entries), linear_rows_gather(x, w_t, idx, bias), plan_for(dtype, tokens)
    nonzero_entries(x) -> (token, column, value): what the bags read (shareable by one input's consumers)

Weight-only quantized linear, CPU (quant_cpu): torch's int8 / int4 ops on the quantized-weight layout
    prepare_int8_cpu(codes, scale) -> Int8CPUWeight | None  (symmetric per-channel int8 only)
    prepare_int4_cpu(u, scale, zero, group_size) -> Int4CPUWeight | None  (sym / asym, groups of 32k)
    int8_linear_cpu(x, prepared, bias=None), int4_linear_cpu(x, prepared, bias=None)  (x [..., K])
    prepare_int8_rows_cpu(prepared, blocks=None) -> Int8RowsWeight | None, prepare_int4_rows_cpu(u, prepared) -> Int4RowsWeight | None,
    quant_rows_supported(); int8_rows_linear_cpu / int4_rows_linear_cpu(x, rows, bias=None, entries=None)
        (activation-sparse x [T, K]: reads only the codes of non-zero inputs; quant_rows_pay(rows, tokens, active))
    quant_site_rows(rows, bias, tokens, active) -> (cpu_native.SiteRows, most kept fraction) | None
    QUANT_CPU_FAST_DTYPES  (activation dtypes where torch's ops beat dense F.linear: bfloat16)
    quant_cpu_kernel_pays(bits, n, k, dtype)  (never below 512 x 512 weights; bf16; int8 in fp32 / fp16 with our kernel built)
Our own CPU kernels (cpu_native: C in csrc/, compiled with the system cc on first use, else None)
    library(), unavailable_reason(), int8_gemv(x fp32 [M, Kp], codes int8 [N, Kp], scale fp32 [N])
    rows_mv / rows4_mv(rows, idx, val, offsets, out, ...)  (input-sparse row sums, the bags' entries)
    select(x, threshold, scale=None), SiteRows(w, ...)(x, threshold, scale, max_entries, out)
        (the same from an unmasked activation: mask, search and sums in one C call)

Custom ops (torch.compile-traceable, with fake implementations): torch.ops.squeeze.linear_24,
torch.ops.squeeze.chunk_sparse_ffn, torch.ops.squeeze.sparse_ffn_from_indices,
torch.ops.squeeze.quant_linear, torch.ops.squeeze.quant_linear_24.
Triton is imported only when a Triton path runs; everything else works without it.
"""

from ._triton_utils import interpreting, triton_available
from .chunk_ffn import chunk_sparse_ffn, sparse_ffn_from_indices
from .cpu_ffn import FFNPlan, SparseFFNWorkspace, default_plan
from .cpu_input_sparse import InputSparsePlan, input_sparse_linear_cpu, nonzero_entries
from .ffn_reference import (
    ACTIVATIONS,
    act_mul,
    active_neurons,
    chunk_sparse_ffn_reference,
    dense_ffn_reference,
    sparse_ffn_reference,
)
from .quant_cpu import FAST_DTYPES as QUANT_CPU_FAST_DTYPES
from .quant_cpu import kernel_pays as quant_cpu_kernel_pays
from .quant_cpu import ROWS_ACTIVE as QUANT_CPU_ROWS_ACTIVE
from .quant_cpu import rows_pay as quant_rows_pay
from .quant_cpu import site_rows as quant_site_rows
from .quant_cpu import (
    Int4CPUWeight,
    Int4RowsWeight,
    Int8CPUWeight,
    Int8RowsWeight,
    int4_linear_cpu,
    int4_rows_linear_cpu,
    int8_linear_cpu,
    int8_rows_linear_cpu,
    quant_rows_supported,
    prepare_int4_cpu,
    prepare_int4_rows_cpu,
    prepare_int8_cpu,
    prepare_int8_rows_cpu,
)
from .quant_format import (
    check_quant24_args,
    check_quant_args,
    dequantize_24_reference,
    dequantize_reference,
    pack_int4,
    quant_bytes,
    quant_linear_reference,
    unpack_int4,
)
from .quant_matmul import quant_linear, quant_linear_24
from .sparse24_format import compressed_bytes, from_cutlass, is_24_sparse, pack_24, to_cutlass, unpack_24
from .sparse24_matmul import DenseWeightCache, linear_24, linear_24_reference

__all__ = [
    "ACTIVATIONS",
    "DenseWeightCache",
    "FFNPlan",
    "InputSparsePlan",
    "Int4CPUWeight",
    "Int4RowsWeight",
    "Int8CPUWeight",
    "Int8RowsWeight",
    "QUANT_CPU_FAST_DTYPES",
    "quant_cpu_kernel_pays",
    "QUANT_CPU_ROWS_ACTIVE",
    "SparseFFNWorkspace",
    "act_mul",
    "active_neurons",
    "check_quant24_args",
    "check_quant_args",
    "chunk_sparse_ffn",
    "chunk_sparse_ffn_reference",
    "compressed_bytes",
    "default_plan",
    "dense_ffn_reference",
    "dequantize_24_reference",
    "dequantize_reference",
    "from_cutlass",
    "input_sparse_linear_cpu",
    "nonzero_entries",
    "int4_linear_cpu",
    "int4_rows_linear_cpu",
    "int8_linear_cpu",
    "int8_rows_linear_cpu",
    "quant_rows_pay",
    "quant_site_rows",
    "quant_rows_supported",
    "interpreting",
    "is_24_sparse",
    "linear_24",
    "linear_24_reference",
    "pack_24",
    "prepare_int4_cpu",
    "prepare_int4_rows_cpu",
    "prepare_int8_cpu",
    "prepare_int8_rows_cpu",
    "pack_int4",
    "quant_bytes",
    "quant_linear",
    "quant_linear_24",
    "quant_linear_reference",
    "sparse_ffn_from_indices",
    "sparse_ffn_reference",
    "to_cutlass",
    "triton_available",
    "unpack_24",
    "unpack_int4",
]
