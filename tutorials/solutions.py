"""Solutions to the exercises of lessons 2-5: what the lessons run unless you pass --exercise.

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
