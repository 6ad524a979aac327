"""Solutions to the exercises of lessons 2-6: what the lessons run unless you pass --exercise.

Try each exercise before reading its solution. Each is a loop or a whole kernel, with the same name and
signature as the lesson's EXERCISE function; `python tutorials/0N_*.py --exercise` runs yours instead and scores
it: its answer against the expected one, and (in the simulator) its counted reads per thread against the budget
its docstring states.
"""
import math

from numba import cuda, float32


@cuda.jit
def online_max_sum(s, m_out, l_out):
    """Lesson 2: thread i takes row i; one pass over it with a running max m and a running sum l relative to m.
    When the max grows, every term already in l, exp(x_k - m_old), becomes exp(x_k - m_new) by the factor
    alpha = exp(m_old - m_new). Each score is read once (x), not once per use."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i < s.shape[0]:                              # the last block has spare threads
        m, l = -math.inf, 0.0
        for j in range(s.shape[1]):
            x = s[i, j]
            m_new = max(m, x)
            l = l * math.exp(m - m_new) + math.exp(x - m_new)
            m = m_new
        m_out[i] = m
        l_out[i] = l


BM_EX, BN_EX, D_EX = 4, 4, 16       # lesson 3's block: query rows (= threads), keys per tile, head dim


@cuda.jit(device=True)
def load_tile(k, j0, t, Ks):
    """Lesson 3: element idx of the tile is row idx // D_EX, column idx % D_EX. Thread t copies idx = t, t + BM_EX,
    ...: at each step the block's threads copy consecutive elements, i.e. read consecutive addresses of k
    (coalesced), and each element is read once by the block. Keys past the end of k become 0."""
    for idx in range(t, BN_EX * D_EX, BM_EX):
        r, c = idx // D_EX, idx % D_EX
        Ks[r, c] = k[j0 + r, c] if j0 + r < k.shape[0] else float32(0.0)


BM4, BN4 = 4, 4                     # lesson 4's block: query rows (= threads), keys per tile
load_kv = attend_tile = None        # lesson 4's device functions: the lesson puts them here before launching


@cuda.jit(device=True)
def causal_tiles(q, k, v, q0, t, Ks, Vs, state, out):
    """Lesson 4: the block's last row, q0 + BM4 - 1, is token q0 + BM4 - 1 + (kv_len - q_len) of the sequence
    (bottom-right alignment) and sees keys up to it: the loop stops at key q0 + BM4 + offset (or kv_len). The
    tiles past it are above the diagonal for every row of the block: never loaded. The barriers: the first
    keeps this tile's loads from overwriting a tile others still read, the second lets nobody read a tile
    before it is complete. Every thread runs the loop (and reaches the barriers), even one past q_len."""
    kv_end = min(k.shape[0], q0 + BM4 + k.shape[0] - q.shape[0])
    for j0 in range(0, kv_end, BN4):
        cuda.syncthreads()
        load_kv(k, v, j0, t, Ks, Vs)
        cuda.syncthreads()
        attend_tile(q, Ks, Vs, j0, q0 + t, k.shape[0], state, out)


@cuda.jit
def append_tokens(k_new, v_new, k_cache, v_cache, lengths):
    """Lesson 5a: the (row, head) of this block from its y and z indices; its elements in a grid-stride loop, so
    that consecutive threads copy consecutive elements (contiguous in k_new and in the cache row: coalesced)
    and every element is copied by exactly one thread, however many blocks the launch has."""
    hk, b = cuda.blockIdx.y, cuda.blockIdx.z
    t_new, head_dim = k_new.shape[2], k_new.shape[3]
    start = lengths[b]
    stride = cuda.gridDim.x * cuda.blockDim.x
    for e in range(cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x, t_new * head_dim, stride):
        j, d = e // head_dim, e % head_dim
        k_cache[b, hk, start + j, d] = k_new[b, hk, j, d]
        v_cache[b, hk, start + j, d] = v_new[b, hk, j, d]


@cuda.jit
def merge_partials(part, n_splits, out):
    """Lesson 5b: lesson 2's online rule between splits: a running max M, and L and A taken relative to it; when a
    split's m_s raises M, what was summed so far is rescaled by exp2(M_old - M_new). Each split's acc_s[d], m_s
    and l_s are read once. A split that saw no key (m_s = -inf) adds nothing (its weight exp2(-inf) = 0)."""
    h, d = cuda.blockIdx.x, cuda.threadIdx.x
    D = part.shape[2] - 2
    M, L, A = -math.inf, 0.0, 0.0
    for s in range(n_splits):
        m_s, l_s, a_s = part[h, s, D], part[h, s, D + 1], part[h, s, d]
        M_new = max(M, m_s)
        if M_new == -math.inf:
            continue
        alpha, w = math.exp2(M - M_new), math.exp2(m_s - M_new)
        L = L * alpha + l_s * w
        A = A * alpha + a_s * w
        M = M_new
    out[h, d] = A / L if L > 0 else 0.0


@cuda.jit
def dequantize_q4_k(q, d, dmin, sc, m, out):
    """Lesson 6: thread t reads byte t of each of the 4 stripes once; its low nibble is weight 64j + t (group 2j),
    its high nibble weight 64j + 32 + t (group 2j + 1), each an affine function of its code: w = (d sc_g) c -
    (dmin m_g)."""
    t = cuda.threadIdx.x
    for j in range(4):
        byte = q[32 * j + t]
        lo, hi = byte & 15, byte >> 4
        out[64 * j + t] = d * sc[2 * j] * float32(lo) - dmin * m[2 * j]
        out[64 * j + 32 + t] = d * sc[2 * j + 1] * float32(hi) - dmin * m[2 * j + 1]
