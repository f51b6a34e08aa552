"""The fused Triton PAD sampler against the torch sampler it replaces.

Without CUDA the kernels run in Triton's interpreter, which has to be switched on before triton is
imported; it is slow, so the CPU tests use small vocabularies and few rows. `gpu` tests use real shapes.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import triton_kernels  # noqa: E402
from padengine.layers.sampler import gumbel_noise, pad_sample as torch_pad_sample, pad_scores  # noqa: E402
from triton_kernels.pad_sample import K_MAX  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def per_row(vocab, top_k, weight, temperature, n=None):
    """Per-row arguments over every (top_k, weight) pair (or n rows cycling through them), temperatures
    cycling, random 64-bit seeds and positions. top_k "over" stands for a k past the vocabulary."""
    pairs = [(vocab + 7 if k == "over" else k, w) for w in weight for k in top_k]
    n = n or len(pairs)
    ks, ws = zip(*(pairs[i % len(pairs)] for i in range(n)))
    temps = [temperature[i % len(temperature)] for i in range(n)]
    return (torch.tensor(ks, device=DEV), torch.tensor(ws, device=DEV), torch.tensor(temps, device=DEV),
            torch.randint(-2 ** 63, 2 ** 63 - 1, (n,), device=DEV),
            torch.randint(0, 1 << 40, (n,), device=DEV))


def distinct_logits(n, vocab, dtype):
    """Logits without a repeated value in a row, so low-precision top-k sets never hinge on a tie:
    drawn from the 2048 bf16 values of magnitude in [1/16, 16), or for fp16 its 2048 values of magnitude
    in [1, 2), which use every mantissa bit (the sampler's keys must tell them all apart)."""
    if dtype == torch.float16:
        mags = torch.arange(0x3C00, 0x4000, dtype=torch.int16)
        values = torch.cat([mags, mags | -0x8000]).view(torch.float16)
    else:
        mags = torch.arange(0x3D80, 0x4180, dtype=torch.int16)
        values = torch.cat([mags, mags | -0x8000]).view(torch.bfloat16)
    assert vocab <= len(values)
    return torch.stack([values[torch.randperm(len(values))[:vocab]] for _ in range(n)]).to(DEV, dtype)


def check(base, reward, args, out=None, tol=1e-4, max_k=None):
    """Triton picks the torch sampler's token in every row, unless the two tokens' perturbed scores are
    within tol (float rounding may then go either way), and its log-prob is the torch one of its token.
    A row whose k-th and (k+1)-th base logits tie (bf16 at a large vocabulary) has its candidates chosen
    by a tie rule torch leaves unspecified; it is only checked to pick a token at or above the tie."""
    tokens, logprobs, *_ = triton_kernels.pad_sample(base, reward, *args, out=out, max_k=max_k)
    ref, *_ = torch_pad_sample(base, reward, *args)
    top_k, weight, temperature, seed, position = args
    vocab = base.shape[1]
    k = torch.where((top_k <= 0) | (top_k >= vocab), vocab, top_k)[:, None]
    ranked = base.float().sort(-1, descending=True).values
    kth = ranked.gather(1, k - 1).squeeze(1)
    tied = (k.squeeze(1) < vocab) & (kth == ranked.gather(1, k.clamp(max=vocab - 1)).squeeze(1))
    assert (base.float().gather(1, tokens[:, None]).squeeze(1) >= kth).all(), "picked a non-candidate"
    cand, score = pad_scores(base, reward, top_k, weight)
    greedy = temperature <= 0
    scaled = score / torch.where(greedy, 1.0, temperature)[:, None]
    noisy = torch.where(greedy[:, None], scaled, scaled + gumbel_noise(seed, position, cand))
    hit = cand == tokens[:, None]
    at = hit.float().argmax(1, keepdim=True)
    gap = noisy.max(1).values - noisy.gather(1, at).squeeze(1)
    assert (tied | (tokens == ref) | (gap < tol)).all(), (tokens.tolist(), ref.tolist())
    expected = torch.log_softmax(scaled, -1).gather(1, at).squeeze(1)
    torch.testing.assert_close(logprobs[~tied], expected[~tied], atol=1e-4, rtol=1e-4)
    return tokens, logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_reward", [True, False])
def test_greedy_matches_torch_over_mixed_rows(dtype, with_reward):
    """k of 1, 10, whole vocabulary (0 or past it), K_MAX and past K_MAX (the torch fallback), times
    weights 0, 0.5, 1.5; reward vocabulary padded wider; several vocabulary chunks, the last partial."""
    vocab = 3000 if dtype == torch.float32 else 2000
    args = per_row(vocab, (1, 10, 0, K_MAX, K_MAX + 44, "over"), (0.0, 0.5, 1.5), (0.0,))
    n = len(args[0])
    if dtype == torch.float32:
        base, reward = torch.randn(n, vocab, device=DEV) * 3, torch.randn(n, vocab + 40, device=DEV) * 3
    else:
        base, reward = distinct_logits(n, vocab, dtype), torch.randn(n, vocab + 40, device=DEV).to(dtype) * 3
    check(base, reward if with_reward else None, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_k_keeps_fewer_candidates_per_chunk(dtype):
    """With max_k = 12 known on the host, each chunk keeps 16 candidates, not K_MAX; greedy and sampled
    rows of k 1, 5 and 12 still pick the torch sampler's token."""
    vocab = 2000
    args = per_row(vocab, (1, 5, 12), (0.0, 1.5), (0.0, 0.9), n=8)
    base = torch.randn(8, vocab, device=DEV) * 3 if dtype == torch.float32 else distinct_logits(8, vocab, dtype)
    check(base, torch.randn(8, vocab, device=DEV).to(dtype) * 3, args, max_k=12)


@pytest.mark.parametrize("vocab", [700, 3000])
def test_sampled_draws_use_the_torch_noise(vocab):
    """T > 0 draws the same token as the torch sampler (same seed, position and token ids give the same
    Gumbel noise), mixed with greedy rows, in one chunk and in several."""
    args = per_row(vocab, (1, 10, 0, 300, "over"), (0.0, 0.5, 1.5), (0.5, 1.0, 2.0, 0.0))
    n = len(args[0])
    check(torch.randn(n, vocab, device=DEV) * 2, torch.randn(n, vocab + 24, device=DEV) * 2, args)


@pytest.mark.parametrize("top_k", [0, 20])
def test_draws_follow_the_torch_sampler_across_positions(top_k):
    """One row drawn at 48 positions: every draw is torch's, so the distributions are the same."""
    n, vocab = 48, 500
    base = (torch.randn(vocab, device=DEV) * 1.5).expand(n, vocab)
    reward = (torch.randn(vocab, device=DEV) * 1.5).expand(n, vocab)
    top_k, weight, temperature, seed, _ = per_row(vocab, (top_k,), (0.7,), (1.0,), n=n)
    position = torch.arange(n, device=DEV)
    tokens, _ = check(base, reward, (top_k, weight, temperature, seed.fill_(1234), position))
    assert len(set(tokens.tolist())) > 1


def test_vocabulary_smaller_than_k_max():
    args = per_row(100, (1, 10, 0, 99, 100, 150), (0.0, 1.5), (0.0, 1.0))
    n = len(args[0])
    check(torch.randn(n, 100, device=DEV) * 3, torch.randn(n, 100, device=DEV) * 3, args)


def test_writes_token_ids_into_the_given_buffer():
    args = per_row(1500, (1, 10, 0), (0.5,), (0.0, 1.0))
    out = torch.full((3,), -1, dtype=torch.long, device=DEV)
    tokens, _ = check(torch.randn(3, 1500, device=DEV), torch.randn(3, 1500, device=DEV), args, out=out)
    assert tokens.data_ptr() == out.data_ptr() and (out >= 0).all()


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_llama3_vocabulary(dtype):
    """A 128256-token vocabulary (32 chunks of 4096), reward vocabulary padded; 64 rows, then one row at
    a time (the batch-1 split)."""
    vocab = 128256
    args = per_row(vocab, (1, 20, 0, K_MAX, 1000, "over"), (0.0, 0.5, 1.5), (0.0, 0.8), n=64)
    base = (torch.randn(64, vocab, device=DEV) * 4).to(dtype)
    reward = (torch.randn(64, vocab + 128, device=DEV) * 4).to(dtype)
    check(base, reward, args)
    check(base, None, args)
    for i in range(0, 64, 5):
        check(base[i:i + 1], reward[i:i + 1], [a[i:i + 1] for a in args])


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("top_k,weight,temperature", [(8, 1.0, 0.7), (0, 0.0, 1.0), (5, 2.0, 1.5)])
def test_gpu_sampling_frequencies_follow_softmax(top_k, weight, temperature):
    """Chi-square goodness of fit over 20000 draws (one per position) from one fixed row."""
    torch.manual_seed(1)
    vocab, n = 30, 20000
    zb, zr = torch.randn(vocab, device=DEV) * 1.5, torch.randn(vocab, device=DEV) * 1.5
    args = per_row(vocab, (top_k,), (weight,), (temperature,), n=n)
    tokens, *_ = triton_kernels.pad_sample(zb.expand(n, vocab), zr.expand(n, vocab), *args)
    cand, score = pad_scores(zb[None], zr[None], args[0][:1], args[1][:1])
    valid = score[0] > float("-inf")
    probs = torch.softmax(score[0][valid].double() / temperature, 0)
    counts = (tokens[:, None] == cand[0][valid][None, :]).sum(0).double()
    assert counts.sum() == n, "drew a token outside the candidate set"
    expected = probs * n
    keep = expected >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum(0, keepdim=True)])
    exp = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    p_value = float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2), torch.tensor(chi2 / 2)))
    assert p_value > 1e-3, f"chi2={chi2:.1f} p={p_value:.2e}"


@pytest.mark.gpu
@cuda_only
def test_gpu_cuda_graph_replays_with_new_logits():
    vocab, n = 32000, 8
    args = per_row(vocab, (1, 50, 0, K_MAX), (0.0, 1.5), (0.0, 1.0), n=n)
    base = torch.randn(n, vocab, device=DEV).bfloat16()
    reward = torch.randn(n, vocab, device=DEV).bfloat16()
    out = torch.empty(n, dtype=torch.long, device=DEV)
    triton_kernels.pad_sample(base, reward, *args, out=out)         # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, logprobs, *_ = triton_kernels.pad_sample(base, reward, *args, out=out)
    for _ in range(3):
        base.copy_(torch.randn(n, vocab, device=DEV))
        reward.copy_(torch.randn(n, vocab, device=DEV))
        graph.replay()
        expected, expected_lp, *_ = triton_kernels.pad_sample(base, reward, *args)
        assert torch.equal(out, expected)
        torch.testing.assert_close(logprobs, expected_lp)


@pytest.mark.parametrize("num_top,max_k", [(0, 40), (5, None)])
def test_filters_and_alternatives_match_torch(num_top, max_k):
    """top-p / min-p (the tile sorted in the merge kernel) and the most likely candidates, over several
    vocabulary chunks; whole-vocabulary rows go to the torch fallback."""
    torch.manual_seed(5)
    vocab, n = 2100, 8
    args = per_row(vocab, (1, 10, 40) if max_k else (1, 10, 40, 0), (0.0, 1.5), (0.0, 0.8), n=n)
    top_p = torch.linspace(0.2, 1.0, n, device=DEV)
    min_p = torch.tensor([0.0, 0.05, 0.3, 0.0] * (n // 4), device=DEV)
    base, reward = torch.randn(n, vocab, device=DEV) * 3, torch.randn(n, vocab + 64, device=DEV) * 3
    got = triton_kernels.pad_sample(base, reward, *args, top_p, min_p, max_k=max_k, num_top=num_top)
    ref = torch_pad_sample(base, reward, *args, top_p, min_p, num_top=num_top)
    assert torch.equal(got.tokens, ref.tokens)
    torch.testing.assert_close(got.logprobs, ref.logprobs, atol=1e-4, rtol=1e-4)
    for i in range(n):
        finite = lambda lp, ids: sorted((round(v, 4), t) for t, v in zip(ids.tolist(), lp.tolist()) if v > -1e30)
        assert finite(got.top_logprobs[i], got.top_ids[i]) == finite(ref.top_logprobs[i], ref.top_ids[i])
    plain = triton_kernels.pad_sample(base, reward, *args, torch.ones(n, device=DEV), torch.zeros(n, device=DEV),
                                      max_k=max_k)
    unfiltered = triton_kernels.pad_sample(base, reward, *args, max_k=max_k)
    assert torch.equal(plain.tokens, unfiltered.tokens)
