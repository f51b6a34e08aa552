"""The readback reads the same tokens from a packed host copy (the CUDA path) as from the result tensors
(the CPU path): token ids, log-probabilities, alternatives sorted best first without -inf, base ones."""
import torch

from padengine.executor.step import StepResult
from padengine.executor.transfer import Pending, Readback, pack
from padengine.layers.sampler import Sample


def test_packed_rows_read_as_the_tensors():
    torch.manual_seed(0)
    rows, width = 5, 3
    top_lp = torch.randn(rows + 2, width)
    top_lp[1, 2] = float("-inf")
    sample = Sample(torch.randint(0, 50000, (rows + 2,)), torch.randn(rows + 2),
                    torch.randint(0, 50000, (rows + 2, width)), top_lp)
    result = StepResult(sample, torch.randn(rows + 2))
    direct = Readback.collect(Readback(torch.device("cpu")).start(result, rows))
    parts = [sample.tokens[:rows], sample.logprobs[:rows], sample.top_ids[:rows], top_lp[:rows],
             result.base_logprobs[:rows]]
    packed = Readback.collect(Pending(pack(parts, rows), None, width, True))
    assert direct.tokens == packed.tokens == sample.tokens[:rows].tolist()
    assert direct.logprobs == packed.logprobs
    assert direct.top == packed.top and len(direct.top[1]) == 2
    assert all(lps == sorted(lps, reverse=True) for lps in ([lp for _, lp in top] for top in direct.top))
    assert direct.base_logprobs == packed.base_logprobs
