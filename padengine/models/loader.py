"""Loading a model folder: config and tokenizer through transformers, weights with safetensors.

Every problem with a folder becomes an `InvalidInput` naming the engine argument (`field`) it came
from: a missing folder or weight file, a corrupt or truncated safetensors file, a missing tensor,
an unsupported architecture or config field (rope type, a sliding window on some layers only).
"""
import json
import os
from glob import glob

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from padengine.distributed.parallel import Shard
from padengine.errors import InvalidInput, require
from padengine.layers.linear import FusedLinear
from padengine.models import value_head
from padengine.models.llama import PACKED, SUPPORTED, CausalLM, ModelConfig


def load_config(path: str, field: str) -> ModelConfig:
    require(os.path.isdir(path), field, f"model folder {path!r} does not exist")
    require(os.path.isfile(os.path.join(path, "config.json")), field, f"no config.json in {path!r}")
    try:
        hf = AutoConfig.from_pretrained(path)
    except (ValueError, OSError, KeyError) as e:
        raise InvalidInput(field, f"cannot read config of {path!r}: {e}") from e
    require(hf.model_type in SUPPORTED, field,
            f"unsupported architecture {hf.model_type!r} in {path!r} (supported: {', '.join(SUPPORTED)})")
    try:
        return ModelConfig.from_hf(hf)
    except ValueError as e:    # a config field the engine does not run (the message names it)
        raise InvalidInput(field, f"unsupported config in {path!r}: {e}") from e


def load_tokenizer(path: str, field: str):
    try:
        return AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError, KeyError) as e:
        raise InvalidInput(field, f"cannot load the tokenizer of {path!r}: {e}") from e


def eos_token_ids(path: str, tokenizer) -> set[int]:
    """End-of-sequence ids: generation_config.json's, else config.json's, plus the tokenizer's."""
    ids = set()
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        eos = json.load(open(os.path.join(path, "config.json"))).get("eos_token_id")
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def weight_files(path: str, field: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        names = sorted(set(json.load(open(index))["weight_map"].values()))
        files = [os.path.join(path, n) for n in names]
        for f in files:
            require(os.path.isfile(f), field, f"weight file {f!r} named in the index is missing")
        return files
    files = sorted(glob(os.path.join(path, "*.safetensors")))
    files = [f for f in files if os.path.basename(f) not in value_head.FILES]
    require(bool(files), field, f"no *.safetensors weight file in {path!r}")
    return files


def read_tensors(file: str, field: str):
    """Yield (name, tensor) from one safetensors file; corruption becomes InvalidInput."""
    try:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise InvalidInput(field, f"corrupt or truncated weight file {file!r}: {e}") from e


def load_model(path: str, cfg: ModelConfig, max_len: int, dtype, device, field: str, ops=None,
               tp: Shard | None = None) -> CausalLM:
    """`ops`: the op set (padengine.kernels.Ops) the model runs on; default the torch references. `tp`:
    this rank's shard of a tensor-parallel group (each split layer `take`s its part of a tensor)."""
    with torch.device("meta"):
        model = CausalLM(cfg, max_len, ops, tp)
    model.materialize(device, dtype)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = set()
    for file in weight_files(path, field):
        for name, tensor in read_tensors(file, field):
            target, shard = _resolve(name)
            if target not in params:
                continue  # e.g. rotary inv_freq buffers saved by old checkpoints
            dest, owner = params[target].data, _owner(model, target)
            if hasattr(owner, "take"):
                tensor = owner.take(target.rsplit(".", 1)[1], tensor, shard)
            if shard is not None:
                dest = owner.shard(dest, shard)
            require(dest.shape == tensor.shape, field,
                    f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
            dest.copy_(tensor)
            loaded.add((target, shard))
    if cfg.tie_word_embeddings:
        loaded.add(("lm_head.weight", None))
    _check_complete(model, loaded, path, field)
    return model.eval()


def _resolve(name: str) -> tuple[str, int | None]:
    for part, (fused, shard) in PACKED.items():
        if f".{part}." in name:
            return name.replace(f".{part}.", f".{fused}."), shard
    return name, None


def _owner(model, param_name: str):
    return model.get_submodule(param_name.rsplit(".", 1)[0])


def _check_complete(model, loaded, path, field):
    for name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{name}.{pname}"
            shards = range(len(module.shards)) if isinstance(module, FusedLinear) else [None]
            for s in shards:
                require((full, s) in loaded or (full, None) in loaded, field,
                        f"weight {full}{'' if s is None else f' (part {s})'} missing from {path!r}")
