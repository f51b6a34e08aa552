"""padengine train on a tiny random model: the losses against hand-computed values, the identity value head,
training that raises log p(chosen) - log p(rejected) into a folder the Engine loads, resuming, bad flags."""
import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from padengine import Engine, SamplingParams
from padengine.cli import main
from padengine.errors import InvalidInput
from padengine.models import value_head
from padengine.training import trainer as trainer_module
from padengine.training.data import tokenize_pair, write_pairs
from padengine.training.trainer import TrainConfig, make_trainer, train

PREF = "be concise"
# rejected: chosen's words reversed, so both answers are about equally long (a margin from length alone
# would leave the reference-free loss near zero from the start)
PAIRS = [dict(prompt=p, preference=PREF, chosen=c, rejected=" ".join(reversed(c.split()))) for p, c in [
    ("write a short poem about the sea", "the sea and the sky"),
    ("explain how a computer works", "a computer works in simple words"),
    ("answer in french please", "the quick brown fox"),
    ("the lazy dog", "the dog jumps over the lazy fox")]]


@pytest.fixture
def pairs_file(tmp_path):
    path = str(tmp_path / "pairs.jsonl")
    write_pairs(PAIRS, path)
    return path


def logps(model, tokenizer, pair, head=None) -> tuple[float, float]:
    """log p(chosen | prompt), log p(rejected | prompt), summed over the answer tokens, by hand."""
    ids = tokenize_pair(tokenizer, pair)
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        full = torch.tensor([ids["prompt_ids"] + ids[key]])
        with torch.no_grad():
            hidden = model.model(full).last_hidden_state
            logits = model.lm_head(head(hidden) if head is not None else hidden)
        lp = torch.log_softmax(logits[0, :-1].double(), -1).gather(1, full[0, 1:, None])[:, 0]
        out.append(lp[len(ids["prompt_ids"]) - 1:].sum().item())
    return tuple(out)


def margin(path, tokenizer, head=None) -> float:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return sum(c - r for c, r in (logps(model, tokenizer, p, head) for p in PAIRS)) / len(PAIRS)


@pytest.mark.parametrize("loss", ["dpo", "arm"])
def test_loss_matches_hand_computation(llama, tokenizer, tmp_path, loss):
    from datasets import Dataset
    cfg = TrainConfig(llama, "unused", str(tmp_path / "out"), loss=loss, beta=0.7, batch_size=1)
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    ref = logps(model, tokenizer, PAIRS[0])
    dataset = Dataset.from_list([tokenize_pair(tokenizer, PAIRS[0])])
    trainer = make_trainer(cfg, "stage1", model, dataset, tokenizer, 1e-3, False, None)   # reference: the model now
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pol = logps(model, tokenizer, PAIRS[0])
    batch = next(iter(trainer.get_train_dataloader()))
    got = trainer.compute_loss(trainer.model, batch).item()
    delta = (pol[0] - ref[0]) - (pol[1] - ref[1]) if loss == "dpo" else pol[0] - pol[1]
    want = math.log1p(math.exp(-0.7 * delta))      # -log sigmoid(beta * delta)
    assert abs(pol[0] - ref[0]) > 0.05 and got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_identity_value_head_gives_the_backbone_logits(llama, tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    ids = torch.tensor([tokenize_pair(tokenizer, PAIRS[0])["prompt_ids"]])
    with torch.no_grad():
        plain = model(ids).logits
        model.model.norm = trainer_module._HeadAfterNorm(model.model.norm, value_head.identity(64))
        headed = model(ids).logits
    assert torch.equal(plain, headed)
    folder = str(tmp_path / "rm")
    shutil.copytree(llama, folder)
    value_head.save(value_head.identity(64), folder)
    params = SamplingParams(max_tokens=12, weight=1.5)
    prompts = ["write a short poem", "explain how a computer works"]
    same = Engine(llama, llama).generate(prompts, params, preferences=PREF)
    headed = Engine(llama, folder).generate(prompts, params, preferences=PREF)
    assert [o.token_ids for o in same] == [o.token_ids for o in headed]


@pytest.mark.parametrize("loss, lora_rank, train_layers, with_head",
                         [("dpo", 0, 0, False), ("arm", 4, 1, False), ("dpo", 0, 1, True)])
def test_training_raises_the_margin_and_loads_in_the_engine(llama, tokenizer, pairs_file, tmp_path, loss, lora_rank,
                                                           train_layers, with_head):
    out = str(tmp_path / "persrm")
    lr = 1e-2 if lora_rank else 1e-3
    train(TrainConfig(llama, pairs_file, out, loss=loss, beta=0.5, max_steps=6, lr=lr, head_lr=3e-3, batch_size=2,
                      lora_rank=lora_rank, train_layers=train_layers, value_head=with_head))
    before, after = load_file(os.path.join(llama, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    frozen = [k for k in before if ".layers.0." in k or "embed" in k] if train_layers else []
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["model.layers.1.mlp.up_proj.weight"], after["model.layers.1.mlp.up_proj.weight"])
    head = value_head.load(out, 64, torch.float32, "cpu", "reward") if with_head else None
    assert (head is not None) == with_head and not os.path.exists(os.path.join(out, "checkpoints"))
    assert margin(out, tokenizer, head) > margin(llama, tokenizer) + 1.0
    if with_head:     # stage 2 moved the head away from the identity, on top of stage 1
        assert not torch.equal(head.weight, torch.eye(64))
        assert margin(out, tokenizer, head) > margin(out, tokenizer) + 0.1
    log = [json.loads(l) for l in open(os.path.join(out, "loss_stage1.jsonl"))]
    assert [r["step"] for r in log] == list(range(1, 7)) and all("rewards/margins" in r for r in log)
    outs = Engine(llama, out).generate(["write a short poem"], SamplingParams(max_tokens=8, weight=1.0),
                                       preferences=PREF)
    assert len(outs[0].token_ids) > 0


def test_interrupted_run_resumes_to_the_same_weights(llama, pairs_file, tmp_path, monkeypatch):
    cfg = lambda out: TrainConfig(llama, pairs_file, str(tmp_path / out), max_steps=4, save_steps=2, lr=1e-3,
                                  batch_size=2, seed=3)
    train(cfg("straight"))
    original = trainer_module._LossLog.on_log

    def crash(self, args, state, control, logs=None, **kw):
        original(self, args, state, control, logs, **kw)
        if state.global_step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module._LossLog, "on_log", crash)
    with pytest.raises(KeyboardInterrupt):
        train(cfg("resumed"))
    assert os.path.isdir(str(tmp_path / "resumed" / "checkpoints" / "stage1" / "checkpoint-2"))
    monkeypatch.setattr(trainer_module._LossLog, "on_log", original)
    train(cfg("resumed"))
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(InvalidInput, match=r"--out.*other settings \(lr\)"):
        train(TrainConfig(llama, pairs_file, str(tmp_path / "resumed"), max_steps=4, save_steps=2, lr=2e-3,
                          batch_size=2, seed=3))


@pytest.mark.parametrize("flags, message", [
    (["--loss", "kl"], "--loss: must be one of dpo, arm"),
    (["--beta", "0"], "--beta: must be > 0"),
    (["--lora-rank", "-1"], "--lora-rank: must be >= 0"),
    (["--max-steps", "0"], "--max-steps: must be > 0"),
    (["--train-layers", "3"], "--train-layers: the model has 2 layers, got 3"),
    (["--data", "/nonexistent.jsonl"], "data: pair file '/nonexistent.jsonl' does not exist"),
])
def test_bad_flags_are_clear_errors(llama, pairs_file, tmp_path, capsys, flags, message):
    argv = ["train", llama, "--data", pairs_file, "--out", str(tmp_path / "o")] + flags
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_missing_base_is_a_clear_error(capsys):
    assert main(["train", "--data", "x.jsonl", "--out", "o"]) == 2
    assert "BASE: required" in capsys.readouterr().err
