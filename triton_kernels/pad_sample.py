"""Fused PAD sampler: the Triton twin of `padengine.layers.sampler.pad_sample`.

Two launches, neither of which waits on the host, so a CUDA graph can hold them:

1. `_chunk_kernel`, grid (rows, chunks). Each program reads one chunk of a row's base logits. For a top-k
   row (k <= K_MAX) it finds the chunk's own top k by bisection over the order-preserving int32 image of
   the float values and compacts (value, token id) into a scratch buffer; the row's top k lies in the
   union of its chunks' top k. For a whole-vocabulary row it reduces the chunk to partial softmax and
   Gumbel-argmax statistics instead.
2. `_merge_kernel`, grid (rows,). It selects the row's top k from the union, gathers the reward logits
   at the candidates, scores them, applies top-p / min-p (a sort of the tile; compiled in only when a
   row filters), draws with the torch sampler's noise and writes the token and its log-probability, and
   the row's most likely candidates when asked for alternatives.

Splitting the vocabulary into chunks keeps the GPU busy at batch 1. Rows with K_MAX < k < vocab are rare
and go to the torch reference, as do whole-vocabulary rows in a step with filters or alternatives (that
costs one host sync, skipped while a CUDA graph is captured).
"""
import torch
import triton
import triton.language as tl

from padengine.layers.sampler import MAX_FUSED_TOP_K as K_MAX
from padengine.layers.sampler import Sample, num_candidates
from padengine.layers.sampler import pad_sample as torch_pad_sample

MAX_CHUNKS = 32         # bounds the merge kernel's tile to MAX_CHUNKS * K_TILE entries (K_TILE <= K_MAX)
MIN_CHUNK = 1024
KEY_BITS = {torch.bfloat16: 16, torch.float16: 19, torch.float32: 32}   # see _top_keys


@triton.jit
def _mix32(x):
    """lowbias32, as `padengine.layers.sampler._mix32` (uint32 arithmetic wraps like its & MASK32)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _gumbel(seed_ptr, pos_ptr, row, tok):
    """`gumbel_noise` of the torch sampler for token ids `tok` of one row."""
    seed = tl.load(seed_ptr + row)
    key = _mix32(seed.to(tl.uint32) ^ _mix32((seed >> 32).to(tl.uint32)))
    key = _mix32(key + tl.load(pos_ptr + row).to(tl.uint32))
    u = ((_mix32(key ^ tok.to(tl.uint32)) >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608)
    return -tl.log(-tl.log(u))


@triton.jit
def _top_keys(x, valid, KEY_BITS: tl.constexpr):
    """int32 keys that sort like the float32 values x, padding (~valid) below them all. Values that came
    from bf16 (fp16) leave the low 16 (13) bits of their float32 pattern zero, so KEY_BITS = 16 (19)
    keep every distinction and let `_top_mask` bisect in KEY_BITS steps instead of 32."""
    b = x.to(tl.int32, bitcast=True)
    key = (b ^ ((b >> 31) & 0x7FFFFFFF)) >> (32 - KEY_BITS)
    return tl.where(valid, key, -(1 << (KEY_BITS - 1)))


@triton.jit
def _top_mask(key, k, KEY_BITS: tl.constexpr):
    """Mask of the k largest keys of a 1-D tile (1 <= k <= its length); among equal keys the earliest
    positions win, so the choice is deterministic."""
    lo = tl.full((), -(1 << (KEY_BITS - 1)), tl.int64)   # invariant: count(key >= lo) >= k > count(key >= hi)
    hi = tl.full((), 1 << (KEY_BITS - 1), tl.int64)
    for _ in range(KEY_BITS):
        mid = (lo + hi) >> 1
        enough = tl.sum((key >= mid).to(tl.int32), 0) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    above = key > lo
    tie = key == lo
    need = k - tl.sum(above.to(tl.int32), 0)
    return above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= need))


@triton.jit
def _scaled_score(zb, reward_ptr, row_r, tok, mask, w_ptr, t_ptr, row, HAS_REWARD: tl.constexpr):
    """PAD score / T, less the per-row constant w * (logsumexp_C(z_b) - logsumexp_C(z_r)), which moves
    every candidate alike and so changes neither the choice nor the log-probability; this lets the
    whole-vocabulary path score in one pass. T = 1 when greedy."""
    u = tl.where(mask, zb, 0.0)             # keeps -inf padding out of the arithmetic
    if HAS_REWARD:
        zr = tl.load(reward_ptr + row_r + tok, mask=mask, other=0.0).to(tl.float32)
        u = u + tl.load(w_ptr + row) * (zr - u)
    temp = tl.load(t_ptr + row)
    return tl.where(mask, u / tl.where(temp > 0, temp, 1.0), float("-inf")), temp <= 0


@triton.jit
def _draw(s, greedy, toks, seed_ptr, pos_ptr, row):
    """Softmax statistics of the scaled scores s (-inf off the candidates) and the Gumbel-max draw:
    (max, sum of exp(s - max), noisy value, s and token id of the draw)."""
    m = tl.max(s, 0)
    noisy = tl.where(greedy, s, s + _gumbel(seed_ptr, pos_ptr, row, toks))
    best = tl.argmax(noisy, 0)
    pick = tl.arange(0, s.shape[0]) == best
    return (m, tl.sum(tl.exp(s - m), 0), tl.max(noisy, 0), tl.sum(tl.where(pick, s, 0.0), 0),
            tl.sum(tl.where(pick, toks, 0), 0))


@triton.jit
def _filter(s, tp_ptr, mp_ptr, row):
    """`padengine.layers.sampler.filter_scores` on one row's tile of scaled scores s (-inf off the
    candidates): min_p against the most likely candidate, top_p by the mass before each candidate in
    descending order (a sort of the tile), ties at the cut kept."""
    m = tl.max(s, 0)
    lse = m + tl.log(tl.sum(tl.exp(s - m), 0))
    lp = s - lse
    drop = lp < (m - lse) + tl.log(tl.load(mp_ptr + row))      # min_p = 0: log 0 = -inf drops nothing
    top_p = tl.load(tp_ptr + row)
    ranked = -tl.sort(-lp)                  # descending (the interpreter rejects descending=True)
    p = tl.exp(ranked)
    cut = tl.min(tl.where(tl.cumsum(p, 0) - p < top_p, ranked, float("inf")), 0)
    cut = tl.where(top_p < 1, cut, float("-inf"))
    return tl.where(drop | (lp < cut), float("-inf"), s)


@triton.jit
def _store_top(lp, toks, top_tok_ptr, top_lp_ptr, row, NUM_TOP: tl.constexpr):
    """The NUM_TOP most likely candidates (finite lp) of a row, in token order (the host sorts them)."""
    ok = lp > float("-inf")
    sel = _top_mask(_top_keys(lp, ok, 32), NUM_TOP, 32) & ok
    dst = row * NUM_TOP + tl.cumsum(sel.to(tl.int32), 0) - 1
    tl.store(top_tok_ptr + dst, toks.to(tl.int64), mask=sel)
    tl.store(top_lp_ptr + dst, lp, mask=sel)


@triton.jit
def _chunk_kernel(base_ptr, stride_b, reward_ptr, stride_r, k_ptr, w_ptr, t_ptr, seed_ptr, pos_ptr,
                  val_ptr, tok_ptr, V, HAS_REWARD: tl.constexpr, CHUNK: tl.constexpr,
                  K_TILE: tl.constexpr, KEY_BITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    slot = val_ptr + (row * tl.num_programs(1) + chunk) * K_TILE
    tok_slot = tok_ptr + (row * tl.num_programs(1) + chunk) * K_TILE
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = offs < V
    zb = tl.load(base_ptr + row * stride_b + offs, mask=valid, other=float("-inf")).to(tl.float32)
    k = tl.load(k_ptr + row)
    if k >= V:
        s, greedy = _scaled_score(zb, reward_ptr, row * stride_r, offs, valid, w_ptr, t_ptr, row,
                                  HAS_REWARD)
        m, total, noisy, s_best, tok = _draw(s, greedy, offs, seed_ptr, pos_ptr, row)
        tl.store(slot, m)
        tl.store(slot + 1, total)
        tl.store(slot + 2, noisy)
        tl.store(slot + 3, s_best)
        tl.store(tok_slot, tok)
    else:
        k_chunk = tl.minimum(tl.minimum(k, K_TILE), V - chunk * CHUNK)
        sel = _top_mask(_top_keys(zb, valid, KEY_BITS), k_chunk, KEY_BITS)
        dst = tl.cumsum(sel.to(tl.int32), 0) - 1
        tl.store(slot + dst, zb, mask=sel)
        tl.store(tok_slot + dst, offs, mask=sel)


@triton.jit
def _merge_whole(val_ptr, tok_ptr, n_chunks, K_TILE: tl.constexpr, CHUNKS_PAD: tl.constexpr):
    """(token, log-prob) of a whole-vocabulary row from its chunks' statistics."""
    c = tl.arange(0, CHUNKS_PAD)
    cm = c < n_chunks
    m = tl.load(val_ptr + c * K_TILE, mask=cm, other=float("-inf"))
    top = tl.max(m, 0)
    total = tl.sum(tl.load(val_ptr + c * K_TILE + 1, mask=cm, other=0.0) * tl.exp(m - top), 0)
    pick = c == tl.argmax(tl.load(val_ptr + c * K_TILE + 2, mask=cm, other=float("-inf")), 0)
    s = tl.sum(tl.where(pick, tl.load(val_ptr + c * K_TILE + 3, mask=cm, other=0.0), 0.0), 0)
    tok = tl.sum(tl.where(pick, tl.load(tok_ptr + c * K_TILE, mask=cm, other=0), 0), 0)
    return tok, s - top - tl.log(total)


@triton.jit
def _merge_top_k(val_ptr, tok_ptr, reward_ptr, row_r, k, w_ptr, t_ptr, seed_ptr, pos_ptr, tp_ptr, mp_ptr,
                 top_tok_ptr, top_lp_ptr, row, V, n_chunks, HAS_REWARD: tl.constexpr, CHUNK: tl.constexpr,
                 K_TILE: tl.constexpr, CHUNKS_PAD: tl.constexpr, KEY_BITS: tl.constexpr,
                 HAS_FILTER: tl.constexpr, NUM_TOP: tl.constexpr):
    """(token, log-prob) of a top-k row from the union of its chunks' top k; with HAS_FILTER, top-p and
    min-p first; with NUM_TOP, also its most likely candidates."""
    # chunk-major, and each chunk's entries in token order: tile order is token order, as the tie rule
    # of _top_mask needs to agree with the chunk kernel's
    e = tl.arange(0, CHUNKS_PAD * K_TILE)
    c = e // K_TILE
    kk = tl.minimum(k, K_TILE)
    ok = (c < n_chunks) & (e % K_TILE < tl.minimum(kk, V - c * CHUNK))
    zb = tl.load(val_ptr + e, mask=ok, other=float("-inf"))
    toks = tl.load(tok_ptr + e, mask=ok, other=0)
    cand = _top_mask(_top_keys(zb, ok, KEY_BITS), kk, KEY_BITS) & ok
    s, greedy = _scaled_score(zb, reward_ptr, row_r, toks, cand, w_ptr, t_ptr, row, HAS_REWARD)
    if HAS_FILTER:
        s = _filter(s, tp_ptr, mp_ptr, row)
    m, total, _, s_best, tok = _draw(s, greedy, toks, seed_ptr, pos_ptr, row)
    if NUM_TOP > 0:
        _store_top(s - m - tl.log(total), toks, top_tok_ptr, top_lp_ptr, row, NUM_TOP)
    return tok, s_best - m - tl.log(total)


@triton.jit
def _merge_kernel(val_ptr, tok_ptr, reward_ptr, stride_r, k_ptr, w_ptr, t_ptr, seed_ptr, pos_ptr, tp_ptr, mp_ptr,
                  out_tok_ptr, out_lp_ptr, top_tok_ptr, top_lp_ptr, V, n_chunks, HAS_REWARD: tl.constexpr,
                  CHUNK: tl.constexpr, K_TILE: tl.constexpr, CHUNKS_PAD: tl.constexpr, KEY_BITS: tl.constexpr,
                  HAS_FILTER: tl.constexpr, NUM_TOP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * n_chunks * K_TILE
    k = tl.load(k_ptr + row)
    if k >= V:      # (with HAS_FILTER or NUM_TOP, the torch fallback redoes these rows)
        tok, logprob = _merge_whole(val_ptr + base, tok_ptr + base, n_chunks, K_TILE, CHUNKS_PAD)
    else:
        tok, logprob = _merge_top_k(val_ptr + base, tok_ptr + base, reward_ptr, row * stride_r, k, w_ptr,
                                    t_ptr, seed_ptr, pos_ptr, tp_ptr, mp_ptr, top_tok_ptr, top_lp_ptr, row, V,
                                    n_chunks, HAS_REWARD, CHUNK, K_TILE, CHUNKS_PAD, KEY_BITS, HAS_FILTER,
                                    NUM_TOP)
    tl.store(out_tok_ptr + row, tok.to(tl.int64))
    tl.store(out_lp_ptr + row, logprob)


def _warps(tile: int) -> int:
    """Warps for a program holding `tile` values: about 16 per thread keeps registers from spilling."""
    return max(4, min(16, tile // 512))


def pad_sample(base_logits, reward_logits, top_k, weight, temperature, seed, position, top_p=None, min_p=None,
               max_k=None, num_top=0, out=None) -> Sample:
    """Same contract as `padengine.layers.sampler.pad_sample`: base_logits [N, V] (bf16/fp16/fp32),
    reward_logits [N, >= V] or None, then per-row top_k, weight, temperature, seed, position [N], top_p
    and min_p [N] or None, and `num_top` alternatives per row (in token order: sort them on the host).
    Token ids go into `out` when given. `max_k` <= K_MAX (a host int bounding every row's k) tells that
    no row needs the torch fallback, which spares the host sync of looking, and lets the kernels keep
    fewer candidates per chunk. Inside CUDA-graph capture, rows need top_k in [1, K_MAX], or 0 or >= V
    without filters or alternatives (others are not checked)."""
    n, vocab = base_logits.shape
    dev = base_logits.device
    tokens = out if out is not None else torch.empty(n, dtype=torch.int64, device=dev)
    logprobs = torch.empty(n, dtype=torch.float32, device=dev)
    top_ids = torch.zeros(n, num_top, dtype=torch.int64, device=dev)
    top_lps = torch.full((n, num_top), float("-inf"), dtype=torch.float32, device=dev)
    if n == 0:
        return Sample(tokens, logprobs, top_ids, top_lps)
    top_k = top_k.to(dev)
    k = num_candidates(top_k, vocab).to(torch.int32)
    weight, temperature = weight.to(dev, torch.float32), temperature.to(dev, torch.float32)
    seed, position = seed.to(dev, torch.int64), position.to(dev, torch.int64)
    has_filter = top_p is not None or min_p is not None
    if has_filter:
        top_p = (torch.ones(n, device=dev) if top_p is None else top_p).to(dev, torch.float32)
        min_p = (torch.zeros(n, device=dev) if min_p is None else min_p).to(dev, torch.float32)
    base = base_logits if base_logits.stride(-1) == 1 else base_logits.contiguous()
    has_reward = reward_logits is not None
    reward = base
    if has_reward:
        reward = reward_logits if reward_logits.stride(-1) == 1 else reward_logits.contiguous()
    chunk = max(MIN_CHUNK, triton.next_power_of_2(triton.cdiv(vocab, MAX_CHUNKS)))
    key_bits = KEY_BITS[base.dtype]
    # candidates kept per chunk: the batch's largest k, rounded up (k = 10 keeps 16, not 256)
    k_tile = K_MAX if max_k is None or max_k > K_MAX else max(16, triton.next_power_of_2(max_k))
    n_chunks = triton.cdiv(vocab, chunk)
    chunks_pad = triton.next_power_of_2(n_chunks)
    vals = torch.empty(n, n_chunks, k_tile, dtype=torch.float32, device=dev)
    toks = torch.empty(n, n_chunks, k_tile, dtype=torch.int32, device=dev)
    _chunk_kernel[(n, n_chunks)](base, base.stride(0), reward, reward.stride(0), k, weight, temperature,
                                 seed, position, vals, toks, vocab, HAS_REWARD=has_reward, CHUNK=chunk,
                                 K_TILE=k_tile, KEY_BITS=key_bits, num_warps=_warps(chunk))
    filters = (top_p, min_p) if has_filter else (weight, weight)      # unread without HAS_FILTER
    _merge_kernel[(n,)](vals, toks, reward, reward.stride(0), k, weight, temperature, seed, position, *filters,
                        tokens, logprobs, top_ids, top_lps, vocab, n_chunks, HAS_REWARD=has_reward, CHUNK=chunk,
                        K_TILE=k_tile, CHUNKS_PAD=chunks_pad, KEY_BITS=key_bits, HAS_FILTER=has_filter,
                        NUM_TOP=num_top, num_warps=_warps(chunks_pad * k_tile))
    maybe_wide = vocab > K_MAX and (max_k is None or max_k > K_MAX)
    whole_needs_torch = has_filter or num_top > 0
    if (maybe_wide or whole_needs_torch) and not (dev.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        rows = torch.nonzero(((k > K_MAX) & (k < vocab)) | ((k >= vocab) & whole_needs_torch)).squeeze(1)
        if rows.numel():
            pick = lambda t: None if t is None else t[rows]
            ref = torch_pad_sample(base_logits[rows], pick(reward_logits), top_k[rows], weight[rows],
                                   temperature[rows], seed[rows], position[rows], pick(top_p), pick(min_p),
                                   num_top=num_top)
            tokens[rows], logprobs[rows], top_ids[rows], top_lps[rows] = ref
    return Sample(tokens, logprobs, top_ids, top_lps)
