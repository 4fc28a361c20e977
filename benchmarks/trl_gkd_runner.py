"""The TRL side of ``benchmarks/bench_vs_trl.py``: TRL's GKDTrainer in its supervised setting, one process.

Design:
- Same models: ``kdscale.controller.prepare.prepare_models`` on the same config gives the teacher and student
  directories (the cached GGUF conversion and derived student) and the tokenizer.
- Same data, same tokens: the rows are tokenized by kdscale's own ``tokenize_rows`` (same chat template, same
  truncation, the loss mask ends at the end-of-turn token) and each step's 8 samples are drawn by kdscale's
  ``StepSampler`` with the run seed. The trainer reads them in that order (``train_sampling_strategy=
  "sequential"``, batch = the global batch, no gradient accumulation). Each example carries ``input_ids`` and
  ``completion_mask``, so TRL's ``DataCollatorForChatML`` takes the prompt/response boundary from the mask instead
  of re-tokenizing; before training every step's collated ``labels != -100`` is checked to equal kdscale's loss mask.
- Same objective: ``lmbda=0`` (never on-policy: ``GKDTrainer.training_step`` generates only when
  ``random.random() <= lmbda``), ``seq_kd=False``, ``beta=0`` (``generalized_jsd_loss`` then computes
  ``F.kl_div(student_log_probs, teacher_log_probs, log_target=True)`` = KL(teacher || student), forward KL),
  temperature from the config, fp32 (TRL's default ``bf16=True`` and ``gradient_checkpointing=True`` are turned off;
  kdscale's student runs fp32 without activation checkpointing), AdamW with kdscale's parameter groups and
  kdscale's own warmup + cosine ``LambdaLR``, gradient clipping at ``optim.grad_clip``.
- Measured: per optimizer step, the time from ``on_step_begin`` to ``on_step_end`` (teacher forward, student
  forward/backward, loss, clipping, AdamW, schedule), the real tokens (``attention_mask.sum()``), the tokens the
  models compute (``attention_mask.numel()``: TRL left-pads each batch to its longest row), the loss tokens and the
  logged loss; also the time inside the teacher's forward (hooks). The result is one JSON file (``--out``).

Run by bench_vs_trl.py; alone: python benchmarks/trl_gkd_runner.py --out trl.json [--steps 20] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vs_trl import (  # noqa: E402  (the helpers live next to this file)
    DEFAULT_CONFIG,
    common_overrides,
    label_mismatches,
    layout_padded_tokens,
    steps_samples,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    parser.add_argument("--config", default=str(REPO / DEFAULT_CONFIG))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cache-dir", default=str(REPO / ".kdscale_cache"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--output-dir", default=None, help="Trainer output_dir (nothing is saved; default: a tmp dir)")
    parser.add_argument("--done-file", default=None, help="touched when the training loop ends (memory window)")
    parser.add_argument("--niceness", type=int, default=None,
                        help="run at this niceness (bench_vs_trl.py passes Ray's worker niceness, 15)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.niceness is not None:
        os.nice(args.niceness - os.nice(0))
    import torch

    torch.set_num_threads(args.threads)
    import tempfile

    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from trl.experimental.utils import DataCollatorForChatML

    from kdscale.config.load import load_config
    from kdscale.controller.prepare import prepare_models
    from kdscale.data import read_jsonl, tokenize_rows
    from kdscale.student.common import adam_kwargs
    from kdscale.student.schedule import warmup_cosine_lambda

    cfg = load_config(args.config, common_overrides(steps=args.steps, cache_dir=args.cache_dir, threads=args.threads))
    models = prepare_models(cfg)
    tokenizer = models.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows, stats = read_jsonl(cfg.data.train_path, max_bad_fraction=cfg.data.max_bad_fraction)
    samples, stats = tokenize_rows(rows, tokenizer, max_seq_len=cfg.data.max_seq_len, truncation=cfg.data.truncation,
                                   stats=stats)
    per_step = steps_samples(len(samples), num_steps=args.steps, global_batch_size=cfg.data.global_batch_size,
                             seed=cfg.run.seed, shuffle=cfg.data.shuffle)
    ordered = [samples[i] for step in per_step for i in step]
    examples = [
        {"prompt": "", "input_ids": s.input_ids.tolist(), "completion_mask": s.loss_mask.astype(int).tolist()}
        for s in ordered
    ]

    # The loss must cover exactly kdscale's tokens: check TRL's collated labels against kdscale's loss masks.
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=cfg.data.max_seq_len)
    batch = cfg.data.global_batch_size
    for step, start in enumerate(range(0, len(examples), batch), 1):
        step_samples = ordered[start : start + batch]
        collated = collator(examples[start : start + batch])
        bad = label_mismatches(collated["labels"].tolist(), [s.loss_mask.tolist() for s in step_samples],
                               ignore_index=collator.ignore_index)
        if bad:
            raise SystemExit(f"step {step}: TRL's labels differ from kdscale's loss mask for samples "
                             f"{[step_samples[i].sample_id for i in bad]}: the two sides would not train on the "
                             "same tokens")

    def load(path: Path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")

    teacher, student = load(models.teacher_dir), load(models.student_dir)
    teacher_seconds = [0.0]

    def teacher_pre(module, inputs):
        teacher_seconds.append(time.perf_counter())

    def teacher_post(module, inputs, output):
        teacher_seconds[0] += time.perf_counter() - teacher_seconds.pop()

    teacher.register_forward_pre_hook(teacher_pre)
    teacher.register_forward_hook(teacher_post)

    decay = [p for p in student.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in student.parameters() if p.requires_grad and p.dim() < 2]
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=o.lr,
        **adam_kwargs(weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine_lambda(warmup_steps=o.warmup_steps, total_steps=args.steps,
                                        min_lr_ratio=o.min_lr_ratio)
    )

    records: list[dict] = []

    class Timing(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            self.train_begin = time.perf_counter()

        def on_step_begin(self, a, state, control, **kw):
            self.step_begin = time.perf_counter()
            self.teacher_before = teacher_seconds[0]

        def on_step_end(self, a, state, control, **kw):
            records[-1]["seconds"] = time.perf_counter() - self.step_begin
            records[-1]["end_time"] = time.monotonic()  # system-wide clock: compared with the sampler's
            records[-1]["teacher_s"] = teacher_seconds[0] - self.teacher_before

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs and records:
                records[-1]["loss"] = float(logs["loss"])
                records[-1]["grad_norm"] = float(logs.get("grad_norm", float("nan")))

        def on_train_end(self, a, state, control, **kw):
            self.loop_wall_s = time.perf_counter() - self.train_begin
            if args.done_file:
                Path(args.done_file).touch()

    class CountingGKDTrainer(GKDTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs["attention_mask"]
            records.append({
                "step": len(records) + 1,
                "real_tokens": int(mask.sum()),
                "computed_tokens": int(mask.numel()),
                "loss_tokens": int((inputs["labels"][:, 1:] != -100).sum()),
            })
            return super().training_step(model, inputs, num_items_in_batch)

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="bench-trl-")
    gkd_args = GKDConfig(
        output_dir=output_dir,
        lmbda=0.0,
        beta=0.0,
        seq_kd=False,
        temperature=cfg.loss.temperature,
        max_length=cfg.data.max_seq_len,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        max_grad_norm=o.grad_clip,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=cfg.run.seed,
    )
    timing = Timing()
    trainer = CountingGKDTrainer(
        model=student,
        teacher_model=teacher,
        args=gkd_args,
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
        data_collator=collator,
        optimizers=(optimizer, scheduler),
        callbacks=[timing],
    )
    setup_s = time.perf_counter() - started
    trainer.train()

    result = {
        "side": "trl",
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "trainer": "trl.experimental.gkd.GKDTrainer (lmbda=0, beta=0, seq_kd=False)",
        "threads": torch.get_num_threads(),
        "setup_s": setup_s,
        "loop_wall_s": timing.loop_wall_s,
        "steps": records,
        "kdscale_layout_computed_tokens": [
            layout_padded_tokens([samples[i] for i in step],
                             max_tokens_per_micro_batch=cfg.data.max_tokens_per_micro_batch) for step in per_step
        ],
        "num_samples": len(samples),
        "niceness": os.nice(0),
        "teacher_params": param_split(teacher),
        "student_params": param_split(student),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def param_split(model) -> dict[str, int]:
    """Unique parameters of a causal LM: total, the output head (V x H), and the decoder body (total minus the
    input embedding and, when untied, the head)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    body = total - embedding.numel() - (0 if head is embedding else head.numel())
    return {"total": total, "head": head.numel(), "body": body, "tied": head is embedding}


if __name__ == "__main__":
    sys.exit(main())
