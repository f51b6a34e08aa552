"""`padengine train`: a base model and pair data -> a PersRM folder that `Engine(BASE, DIR)` loads unchanged.

Stage 1 trains the backbone with TRL's DPOTrainer (batching, padding, reference log-probs, schedule,
checkpoints, accelerate for more devices): `dpo` against the frozen base as reference, or GenARM's
reference-free `arm` loss, run as DPO with zero reference log-probs (which is exactly
-log sigmoid(beta * (log pi(y_w|x) - log pi(y_l|x)))). Full fine-tuning, or LoRA (peft) merged at the end.
Stage 2 (`value_head`) puts an identity-initialized `summary` Linear after the final norm, freezes the
backbone and trains the head alone with the same objective (its reference: the stage-1 model, which the
identity head leaves unchanged), then saves it in the released PAD format (models/value_head.py).

Prompts are tokenized by data.tokenize_pair, i.e. exactly as the engine renders them for the reward model.
TRL, peft and datasets are the `[train]` extra: only this module imports them (the CLI imports it lazily).
Each stage checkpoints under DIR/checkpoints/stageN (removed when the stage is done); rerunning the same
command resumes from the last checkpoint, or skips a finished stage 1.
"""
import contextlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass

import peft
import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed
from transformers.trainer_utils import get_last_checkpoint

from padengine.errors import require
from padengine.models import value_head
from padengine.training.data import read_pairs, tokenize_pair

logger = logging.getLogger(__name__)
LOSSES = ("dpo", "arm")


@dataclass
class TrainConfig:
    base: str
    data: str
    out: str
    loss: str = "dpo"
    beta: float = 0.1
    epochs: float = 1.0
    max_steps: int = -1          # > 0 overrides epochs
    lr: float = 5e-6             # stage 1 (LoRA usually wants ~1e-4)
    head_lr: float = 1e-4        # stage 2
    batch_size: int = 8          # pairs per optimizer step
    lora_rank: int = 0           # 0: full fine-tuning
    train_layers: int = 0        # only the top N decoder layers (and the final norm) learn; 0: all of them
    value_head: bool = False
    seed: int = 0
    max_length: int = 512        # prompt + answer tokens; longer pairs are truncated at the end
    save_steps: int = 50
    device: str = "auto"         # auto: CUDA if available, else the CPU

    def validate(self) -> None:
        require(os.path.isdir(self.base), "base", f"model folder {self.base!r} does not exist")
        require(self.loss in LOSSES, "--loss", f"must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        require(self.beta > 0, "--beta", f"must be > 0, got {self.beta}")
        require(self.epochs > 0, "--epochs", f"must be > 0, got {self.epochs}")
        require(self.max_steps == -1 or self.max_steps > 0, "--max-steps", f"must be > 0, got {self.max_steps}")
        require(self.lr > 0, "--lr", f"must be > 0, got {self.lr}")
        require(self.head_lr > 0, "--head-lr", f"must be > 0, got {self.head_lr}")
        require(self.batch_size >= 1, "--batch-size", f"must be at least 1, got {self.batch_size}")
        require(self.lora_rank >= 0, "--lora-rank", f"must be >= 0 (0: full fine-tuning), got {self.lora_rank}")
        require(self.train_layers >= 0, "--train-layers", f"must be >= 0 (0: all layers), got {self.train_layers}")
        require(self.max_length >= 8, "--max-length", f"must be at least 8, got {self.max_length}")
        require(self.save_steps >= 1, "--save-steps", f"must be at least 1, got {self.save_steps}")
        require(self.device in ("auto", "cpu") or self.device.startswith("cuda"), "--device",
                f"must be auto, cpu or cuda[:N], got {self.device!r}")
        require(os.path.realpath(self.out) != os.path.realpath(self.base), "--out", "must not be the base folder")


class _HeadAfterNorm(torch.nn.Module):
    """The final norm followed by the value head: where the engine applies `summary`."""

    def __init__(self, norm: torch.nn.Module, summary: torch.nn.Linear):
        super().__init__()
        self.norm, self.summary = norm, summary

    def forward(self, x):
        return self.summary(self.norm(x))


def train(cfg: TrainConfig) -> str:
    cfg.validate()
    pairs = read_pairs(cfg.data)
    _check_run(cfg)
    set_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.base)
    dataset = Dataset.from_list([tokenize_pair(tokenizer, p) for p in pairs])
    logger.info("%d pairs from %s", len(pairs), cfg.data)
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    done = os.path.join(cfg.out, "stage1.done")
    if not os.path.isfile(done):
        model = AutoModelForCausalLM.from_pretrained(cfg.base, dtype=torch.float32)
        layers = _trainable_layers(model, cfg.train_layers)
        lora = None if cfg.lora_rank == 0 else peft.LoraConfig(
            r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0, task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            layers_to_transform=layers)
        trainer = make_trainer(cfg, "stage1", model, dataset, tokenizer, cfg.lr, cuda, lora)
        _fit(trainer, cfg, "stage1")
        model = trainer.model.merge_and_unload() if lora is not None else trainer.model
        model.save_pretrained(cfg.out)
        tokenizer.save_pretrained(cfg.out)
        open(done, "w").close()
    if cfg.value_head:
        model = AutoModelForCausalLM.from_pretrained(cfg.out, dtype=torch.float32)
        model.requires_grad_(False)
        head = value_head.identity(model.config.hidden_size)
        inner = model.get_decoder()
        inner.norm = _HeadAfterNorm(inner.norm, head)
        trainer = make_trainer(cfg, "stage2", model, dataset, tokenizer, cfg.head_lr, cuda, None)
        _fit(trainer, cfg, "stage2")
        value_head.save(head, cfg.out)
    logger.info("PersRM written to %s", cfg.out)
    return cfg.out


def _trainable_layers(model, top: int) -> list[int]:
    """Freeze all but the top `top` decoder layers and the final norm (0: train everything). The backward
    pass then stops at the lowest trainable layer: on a CPU, most of a training step's cost."""
    count = model.config.num_hidden_layers
    require(top <= count, "--train-layers", f"the model has {count} layers, got {top}")
    if top == 0:
        return list(range(count))
    layers = list(range(count - top, count))
    for name, param in model.named_parameters():
        final_norm = ".layers." not in name and name.endswith("norm.weight")
        param.requires_grad_(final_norm or any(f".layers.{i}." in name for i in layers))
    return layers


def _check_run(cfg: TrainConfig) -> None:
    """A rerun resumes only the same run: settings other than the output folder must match the first one."""
    os.makedirs(cfg.out, exist_ok=True)
    record, settings = os.path.join(cfg.out, "training.json"), asdict(cfg)
    if os.path.isfile(record):
        with open(record) as f:
            before = json.load(f)
        changed = sorted(k for k in settings if before.get(k) != settings[k])
        require(not changed, "--out", f"{cfg.out!r} holds a run with other settings ({', '.join(changed)}); "
                "use another --out or delete it to start over")
    with open(record, "w") as f:
        json.dump(settings, f, indent=1)


def make_trainer(cfg: TrainConfig, stage: str, model, dataset, tokenizer, lr: float, cuda: bool, lora):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token     # padding is masked out; any id will do
    args = trl.DPOConfig(
        output_dir=os.path.join(cfg.out, "checkpoints", stage), seed=cfg.seed, data_seed=cfg.seed,
        per_device_train_batch_size=cfg.batch_size, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0.1, beta=cfg.beta, max_length=cfg.max_length,
        # every pair's reference log-probs once, before training: the base (stage 1) or the stage-1 model
        # (stage 2); for `arm` they are zeros (PersRMTrainer), so no reference model is ever loaded
        precompute_ref_log_probs=True, gradient_checkpointing=False, bf16=cuda and torch.cuda.is_bf16_supported(),
        use_cpu=not cuda, logging_steps=1, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=1,
        report_to=[], dataset_num_proc=None)
    return PersRMTrainer(loss=cfg.loss, model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora, callbacks=[_LossLog(os.path.join(cfg.out, f"loss_{stage}.jsonl"))])


def _fit(trainer, cfg: TrainConfig, stage: str) -> None:
    last = get_last_checkpoint(trainer.args.output_dir) if os.path.isdir(trainer.args.output_dir) else None
    if last:
        logger.info("%s: resuming from %s", stage, last)
    trainer.train(resume_from_checkpoint=last)
    shutil.rmtree(trainer.args.output_dir, ignore_errors=True)   # the stage is done: its result is in DIR
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(trainer.args.output_dir))         # DIR/checkpoints, once no stage is left


class PersRMTrainer(trl.DPOTrainer):
    """TRL's DPOTrainer on pairs tokenized the engine's way; with `loss="arm"`, zero reference log-probs."""

    def __init__(self, *args, loss: str = "dpo", **kwargs):
        self.persrm_loss = loss
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset     # already tokenized by data.tokenize_pair

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if self.persrm_loss == "dpo":
            return super()._precompute_ref_logps(dataset, name, batch_size)
        zeros = [0.0] * len(dataset)
        return dataset.add_column("ref_chosen_logps", zeros).add_column("ref_rejected_logps", zeros)


class _LossLog(TrainerCallback):
    """Appends each logged step (loss, reward margin, accuracy, lr) to a JSONL file."""

    def __init__(self, path: str):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            with open(self.path, "a") as f:
                f.write(json.dumps(dict(step=state.global_step, **logs)) + "\n")
