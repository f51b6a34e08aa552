"""The PersRM value-head format, the one definition the engine's loader, the HF reference and the trainer share.

PAD's released PersRMs carry a linear `summary` (hidden -> hidden, with bias) applied to the final hidden
state before the LM head, stored beside the weights as `value_head.safetensors` (or the older `value_head.bin`)
with the keys `summary.weight` and `summary.bias` (any prefix before `summary.` is ignored).
"""
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from padengine.errors import InvalidInput, require

FILES = ("value_head.safetensors", "value_head.bin")
KEYS = ("summary.weight", "summary.bias")


def identity(hidden: int) -> torch.nn.Linear:
    """A value head that changes nothing: identity weight, zero bias (a PersRM equal to its backbone)."""
    head = torch.nn.Linear(hidden, hidden, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.eye(hidden))
        head.bias.zero_()
    return head


def save(head: torch.nn.Linear, folder: str) -> str:
    file = os.path.join(folder, FILES[0])
    save_file({KEYS[0]: head.weight.detach().float().cpu().contiguous(),
               KEYS[1]: head.bias.detach().float().cpu().contiguous()}, file)
    return file


def load(folder: str, hidden: int, dtype, device, field: str) -> torch.nn.Linear | None:
    """The value head of a model folder, or None if it has none. Problems raise InvalidInput naming `field`."""
    for name in FILES:
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            continue
        try:
            state = torch.load(file, map_location="cpu", weights_only=True) if name.endswith(".bin") else load_file(file)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise InvalidInput(field, f"corrupt or truncated value head {file!r}: {e}") from e
        state = {k[k.index("summary."):]: v for k, v in state.items() if "summary." in k}
        head = torch.nn.Linear(hidden, hidden, bias=True)
        for key in KEYS:
            require(key in state, field, f"{file!r} has no {key}")
            param = getattr(head, key.split(".")[1])
            require(state[key].shape == param.shape, field,
                    f"{key} has shape {tuple(state[key].shape)}, expected {tuple(param.shape)}")
            param.data.copy_(state[key])
        return head.to(device=device, dtype=dtype).eval()
    return None
