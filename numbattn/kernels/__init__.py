"""numbattn's kernels: device code only, one file per kernel family and version (llm.c's dev/cuda style).

Each file opens with its algorithm and its memory traffic. The host side that validates arguments, chooses launch
shapes and launches them is one level up (numbattn/prefill.py, decode.py, kvcache.py, linear.py); the NumPy
equation every kernel is tested against is numbattn/reference.py.

Attention, prefill (q_len query rows against kv_len keys; numbattn.attention / prefill.flash_attention, and
prefill.chunk_attention over the KV cache). Every version takes a sliding window and a logit soft cap, and reads
key j from slot j mod S of K and V (a ring-buffer cache layer's layout; a plain array: slot j):

    v0  prefill_naive.py       one thread per query row, K and V straight from global memory
    v1  prefill_tiled.py       Q, K, V tiles in shared memory, one thread per row: the teaching kernel
    v2  prefill_registers.py   register-tiled outer products, warp-shuffle row reductions (fastest on SIMT cores)
    v3  prefill_mma.py         v2's algorithm on tensor cores: TF32 mma.sync by inline PTX, 3xTF32 (the default);
                               head_dim 128 and 256 split each head's dims over 2 or 4 warps
    v1 and v3 also compile a with_lse variant that writes each row's log-sum-exp (what the backward takes)

Attention, decode (one new query token per row against the KV cache, or its sliding window, which may wrap
around a ring buffer; numbattn.decode_attention):

    v0  decode_naive.py        one block per (row, query head), the keys split over its threads
    v1  decode_slots.py        split-K: key slots of lanes that share a key (the default)
    v2  decode_lanes.py        split-K: one key per lane for the scores (faster past ~32K tokens, fp16 cache)
        decode_splitk.py       the frame v1 and v2 share: split blocks, the slots' merge, the last block's merge
        decode_paged.py        v1 over a paged KV cache: the same frame and scan, a page of the block table at a time

Attention, backward (dQ, dK, dV from the forward's output and log-sum-exp; numbattn.attention_backward), with the
forward's sliding window (tiles outside it skipped) and soft cap (a compile-time variant, as the forward's):

    v1  backward_tiled.py      one thread per row: dK/dV K/V-stationary, dQ Q-stationary (the teaching kernels)
    v3  backward_mma.py        the same two kernels on tensor cores, 3xTF32 (the default)
        backward_prep.py       D = rowsum(dO ∘ O), the zeroed dK/dV, P's reference from lse, and p and dS of one
                               pair (the soft cap and its slope), written once for both versions

The rest of a Llama block:

        kv_append.py           append K/V at each row's length, slot p mod S (the device lengths advanced by the
                               kernel); poison rewound slots
        paged_append.py        the paged cache's: append (alone or with RoPE) through block tables, gather, poison
        rowwise.py             embedding lookup, RMSNorm, RoPE fused with the KV-cache append
        gemv.py, gemm.py       y = x W^T on bf16/fp32 weight words: a few tokens (GEMV), a chunk (GEMM)
        gemm_mma.py            the chunk's GEMM on tensor cores: bf16 mma.sync on the bf16 weights as stored,
                               the fp32 activations split into bf16 terms (the default for bf16 weights)

Shared device code:

        common.py              the compile policy (fastmath, decided once), which keys a block sees (causal,
                               window), ring slots, the soft cap and its slope, group reductions, bit casts, the
                               last-block ticket, weight-word unpacking
        softmax.py             the online-softmax rule and the log-sum-exp merge, written once
        mma.py                 tensor-core MMAs from Numba (inline PTX: TF32 m16n8k8, bf16 m16n8k16) and their
                               simulator twins

CPU code (Numba's @njit, for numbattn/cpu_linear.py; cpu_attention.py and cpu_rowwise.py keep theirs):

        cpu_dot.py             int8 dot products of a group's codes with quantized activations (LLVM vector IR:
                               vpdpbusd where the CPU has VNNI), a group dequantized, fp16 widening, prefetch

Every kernel is compiled through common.kernel, which gives it numbattn's disk cache (numbattn/kernel_cache.py):
compiled once per machine, loaded by every later process.
"""
