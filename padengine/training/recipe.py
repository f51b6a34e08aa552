"""`padengine train --recipe default` (`make persrm`): a PersRM for the default model, on a 2-core CPU.

Builds pairs with the engine (make_pairs.py) for the preferences `checkers.SPLIT` trains on, over a seeded
sample of AlpacaEval instructions (never the P-Soups evaluation prompts), then trains stage 1 (DPO on the
top `train_layers` layers, float32) on a seeded subsample of them into the cache. Sized for a 2-core CPU
(AVX2, ~50 GFLOP/s in float32): generation ~16 min (~150 tokens/s at batch 128), training ~10 s per pair
(the reference forward, then forward and backward of chosen and rejected through the top 8 layers), ~40
min. Every step is resumable: the pair file is reused once written, and training resumes from its
checkpoints.
"""
import json
import logging
import os
import random
from dataclasses import asdict, dataclass

from padengine.default_model import cache_dir, default_model_path
from padengine.training import checkers
from padengine.training.data import read_pairs, write_pairs
from padengine.training.make_pairs import PairConfig, alpaca_eval_path, load_prompts, make_pairs

logger = logging.getLogger(__name__)
NAME = "PersRM-SmolLM2-135M"


@dataclass
class Recipe:
    prompts: int = 100           # AlpacaEval instructions (of those up to max_chars long), seeded sample
    max_chars: int = 200         # short instructions keep training sequences short
    samples: int = 2
    bare_samples: int = 1
    temperature: float = 0.9
    max_tokens: int = 64         # as in the evaluation
    max_pairs: int = 240         # trained on (of ~650 built), sampled at random
    train_layers: int = 8        # of 30: the backward pass stops there (a third of the cost of all layers)
    loss: str = "dpo"
    beta: float = 0.1
    lr: float = 5e-5
    batch_size: int = 4
    epochs: float = 1.0
    seed: int = 0


def persrm_path(cache: str | None = None) -> str:
    return os.path.join(cache or cache_dir(), NAME)


def run(recipe: Recipe = Recipe(), out: str | None = None) -> str:
    from padengine import Engine
    from padengine.training.trainer import TrainConfig, train    # the [train] extra

    base = default_model_path()
    out = out or persrm_path()
    data = out + ".pairs.jsonl"
    if not os.path.isfile(data):
        prompts = load_prompts(alpaca_eval_path(), max_chars=recipe.max_chars)
        prompts = random.Random(recipe.seed).sample(prompts, min(recipe.prompts, len(prompts)))
        engine = Engine(base, base, dtype="float32", max_num_seqs=128)
        pairs, stats = make_pairs(engine, prompts, [checkers.get(n) for n in checkers.SPLIT["train"]],
                                  PairConfig(recipe.samples, recipe.bare_samples, recipe.temperature,
                                             recipe.max_tokens, recipe.seed))
        del engine
        os.makedirs(os.path.dirname(data), exist_ok=True)
        with open(out + ".pairs.json", "w") as f:
            json.dump(dict(recipe=asdict(recipe), prompts=len(prompts), pairs=len(pairs), checkers=stats,
                           split=checkers.SPLIT), f, indent=1)
        write_pairs(pairs, data + ".tmp")
        os.replace(data + ".tmp", data)
        logger.info("%d pairs written to %s", len(pairs), data)
    pairs = read_pairs(data)
    train_data = out + ".train.jsonl"
    write_pairs(random.Random(recipe.seed).sample(pairs, min(recipe.max_pairs, len(pairs))), train_data)
    return train(TrainConfig(base, train_data, out, loss=recipe.loss, beta=recipe.beta, lr=recipe.lr, epochs=recipe.epochs,
                             batch_size=recipe.batch_size, train_layers=recipe.train_layers, seed=recipe.seed))
