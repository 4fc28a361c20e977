"""FSDP2Backend: the PyTorch FSDP2 student (``fully_shard`` per decoder layer, then the root), one process per rank.

Design:
- The caller initializes ``torch.distributed`` (gloo on CPU, NCCL on GPU, with ``torch.cuda.set_device`` done)
  and the thread count; the backend builds a 1-D ``("dp",)`` device mesh over the whole world. Every rank is its
  own data-parallel shard: ``layout() == {r: [r]}``.
- The student is loaded with ``AutoModelForCausalLM.from_pretrained`` (fp32 master weights) on every rank, wrapped
  in a :class:`~kdscale.student.fsdp2.module.DistillationModule` (the loss runs inside the root's forward), then
  parallelized by :mod:`kdscale.student.fsdp2.parallelize`.
- The loss of every micro-batch is ``sum / global_num_loss_tokens``; FSDP2 is set to SUM gradients across ranks
  (not average), so the gradient is that of the per-token mean over the GLOBAL batch whatever the DP split.
  Gradients are reduce-scattered after every micro-batch (no unsharded gradient accumulation: ZeRO-3 memory).
- The teacher head is a plain replicated tensor (not a parameter) in ``teacher_head_dtype``.
- Optimizer: AdamW (no weight decay on 1-D parameters: norms, biases), warmup + cosine ``LambdaLR``, gradient
  clipping on the global norm of the sharded (DTensor) gradients.

Assumptions: every rank runs the same number of micro-batches per step (checked; FSDP collectives would hang
otherwise). The model fits in host memory once per rank at load time.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from kdscale.data.batch import MicroBatch
from kdscale.student.base import StepMetrics
from kdscale.student.common import (
    LOSS_KEYS,  # noqa: F401 (re-exported: a public name of this module)
    adam_kwargs,
    all_reduce_sum,
    as_dtype,
    check_global_loss_tokens,
    eval_metrics,
    per_token_losses,
    teacher_hidden_error,
    validate_student_args,
)
from kdscale.student.fsdp2 import checkpoint
from kdscale.student.fsdp2.module import DistillationModule
from kdscale.student.fsdp2.parallelize import (
    apply_activation_checkpointing,
    apply_fsdp,
    decoder_layers,
    sum_gradients_across_ranks,
)
from kdscale.student.schedule import warmup_cosine_lambda

_HF_PREFIX = "model."  # attribute path of the HF model inside DistillationModule


class FSDP2Backend:
    """Student backend on PyTorch FSDP2. See the module docstring; all methods are collective."""

    def __init__(
        self,
        *,
        model_path: str,
        teacher_head: torch.Tensor,
        vocab_size: int,
        loss: dict[str, Any] | None = None,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        grad_clip: float = 1.0,
        warmup_steps: int = 0,
        total_steps: int = 1000,
        min_lr_ratio: float = 0.1,
        mixed_precision: str = "none",
        activation_checkpointing: bool = False,
        seed: int = 0,
        device: str = "cpu",
        attn_implementation: str = "eager",
        teacher_head_dtype: str | torch.dtype = torch.bfloat16,
        cross_tokenizer: dict[str, Any] | None = None,
    ) -> None:
        loss = validate_student_args(
            teacher_head=teacher_head,
            vocab_size=vocab_size,
            cross_tokenizer=cross_tokenizer is not None,
            loss=loss,
            mixed_precision=mixed_precision,
            device=device,
            grad_clip=grad_clip,
        )
        self.model_path = str(model_path)
        self.vocab_size = vocab_size
        self.loss_kwargs = loss
        self.optim_kwargs = {"lr": lr, **adam_kwargs(weight_decay=weight_decay, betas=betas, eps=eps)}
        self.grad_clip = grad_clip
        self.lr_lambda = warmup_cosine_lambda(
            warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio
        )
        self.mixed_precision = mixed_precision
        self.activation_checkpointing = activation_checkpointing
        self.seed = seed
        self.device_type = device
        self.attn_implementation = attn_implementation
        self.teacher_head_dtype = as_dtype(teacher_head_dtype, "teacher_head_dtype")
        self._teacher_head_source = teacher_head
        self.cross_tokenizer = None
        if cross_tokenizer is not None:  # the projector maps the teacher's hidden size to the student's
            self.cross_tokenizer = {**cross_tokenizer, "teacher_hidden_size": int(teacher_head.shape[1])}
        self._step = 0
        self._is_setup = False

    # ---------------------------------------------------------------- setup and layout

    def setup(self) -> None:
        """Load the student, shard it, build optimizer and schedule (collective; idempotent)."""
        if self._is_setup:
            return
        from transformers import AutoModelForCausalLM

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "FSDP2Backend.setup() needs torch.distributed initialized by the caller "
                "(dist.init_process_group('gloo' on CPU or 'nccl' on GPU))"
            )
        if self.device_type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("device='cuda' but CUDA is not available: set device='cpu'")
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        self.mesh = init_device_mesh(self.device.type, (self._world_size,), mesh_dim_names=("dp",))

        torch.manual_seed(self.seed)
        model = AutoModelForCausalLM.from_pretrained(
            self.model_path,
            dtype=torch.float32,
            attn_implementation=self.attn_implementation,
            trust_remote_code=False,
        )
        student_vocab = model.get_output_embeddings().weight.shape[0]
        if self.vocab_size > student_vocab:
            raise ValueError(
                f"vocab_size ({self.vocab_size}) exceeds the student head's {student_vocab} rows: pass the "
                "tokenizer's vocabulary size, and a student whose vocabulary covers it"
            )
        self.hf_config = model.config
        self.module = DistillationModule(
            model, vocab_size=self.vocab_size, loss_kwargs=self.loss_kwargs, cross_tokenizer=self.cross_tokenizer
        )
        apply_activation_checkpointing(model, enabled=self.activation_checkpointing)
        apply_fsdp(self.module, decoder_layers(model), mesh=self.mesh, mixed_precision=self.mixed_precision)
        # If this torch cannot make FSDP2 sum gradients, scale the loss so that its average is the sum.
        self._grad_scale = 1.0 if sum_gradients_across_ranks(self.module) else float(self._world_size)

        self.optimizer = torch.optim.AdamW(self._param_groups(), **self.optim_kwargs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_lambda)
        self.teacher_head = self._teacher_head_source.detach().to(self.device, self.teacher_head_dtype).contiguous()
        del self._teacher_head_source
        torch.manual_seed(self.seed + self._rank)  # per-rank stream for stochastic layers (dropout)
        self._is_setup = True

    def _param_groups(self) -> list[dict[str, Any]]:
        decay, no_decay = [], []
        for param in self.module.parameters():
            if param.requires_grad:
                (decay if param.dim() >= 2 else no_decay).append(param)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def layout(self) -> dict[int, list[int]]:
        """Every rank is its own data-parallel shard: ``{r: [r]}``."""
        self._require_setup()
        return {rank: [rank] for rank in range(self._world_size)}

    @property
    def dp_rank(self) -> int:
        self._require_setup()
        return self._rank

    @property
    def dp_size(self) -> int:
        self._require_setup()
        return self._world_size

    @property
    def step(self) -> int:
        return self._step

    def _require_setup(self) -> None:
        if not self._is_setup:
            raise RuntimeError("call FSDP2Backend.setup() first")

    # ---------------------------------------------------------------- steps

    def _local_input_error(
        self, micro_batches: list[MicroBatch], teacher_hidden: list[torch.Tensor]
    ) -> RuntimeError | ValueError | None:
        """The first problem with this rank's inputs, or None."""
        return teacher_hidden_error(micro_batches, teacher_hidden, self.teacher_head.shape[1])

    def _check_step_inputs(
        self,
        micro_batches: list[MicroBatch],
        teacher_hidden: list[torch.Tensor],
        global_num_loss_tokens: int,
        global_num_kd_tokens: int | None = None,
    ) -> tuple[int, int]:
        """Validate the inputs of every rank (one all-gather, so that all ranks raise together instead of some
        waiting forever in an FSDP collective); returns (global loss tokens, global tokens)."""
        error = self._local_input_error(micro_batches, teacher_hidden)
        if error is None and (self.cross_tokenizer is not None) != (global_num_kd_tokens is not None):
            error = ValueError(
                "global_num_kd_tokens (the step's aligned predictions) must be given exactly when the backend "
                f"distills across tokenizers (cross_tokenizer={self.cross_tokenizer is not None})"
            )
        local = torch.tensor(
            [
                int(error is not None),
                len(micro_batches),
                sum(mb.num_loss_tokens for mb in micro_batches),
                sum(mb.num_tokens for mb in micro_batches),
                sum(mb.num_kd_tokens for mb in micro_batches),
            ],
            dtype=torch.int64,
            device=self.device,
        )
        gathered = [torch.zeros_like(local) for _ in range(self._world_size)]
        dist.all_gather(gathered, local)
        failed, counts = torch.stack(gathered).cpu().split([1, 4], dim=1)
        if error is not None:
            raise error
        if failed.any():
            failed_ranks = failed.flatten().nonzero().flatten().tolist()
            raise RuntimeError(f"rank(s) {failed_ranks} got invalid step inputs (see their error); step skipped")
        num_micro_batches = counts[:, 0].tolist()
        if len(set(num_micro_batches)) != 1 or num_micro_batches[0] == 0:
            raise ValueError(
                f"micro-batches per rank are {num_micro_batches}: every FSDP2 rank must run the same, non-zero "
                "number of micro-batches per step (lay the global batch out with equal counts per DP rank)"
            )
        total_loss_tokens, total_tokens = int(counts[:, 1].sum()), int(counts[:, 2].sum())
        check_global_loss_tokens(total_loss_tokens, global_num_loss_tokens)
        if global_num_kd_tokens is not None and int(counts[:, 3].sum()) != global_num_kd_tokens:
            raise ValueError(
                f"global_num_kd_tokens={global_num_kd_tokens} but the micro-batches of all ranks hold "
                f"{int(counts[:, 3].sum())} aligned predictions: pass StepLayout.global_num_kd_tokens of this step"
            )
        return total_loss_tokens, total_tokens

    def _forward(
        self,
        micro_batch: MicroBatch,
        teacher_hidden: torch.Tensor,
        normalizer: float,
        with_forward_kl: bool = False,
        kd_normalizer: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kd_mask = micro_batch.kd_mask
        return self.module(
            micro_batch.input_ids.to(self.device, non_blocking=True),
            micro_batch.attention_mask.to(self.device, non_blocking=True),
            micro_batch.loss_mask.to(self.device, non_blocking=True),
            teacher_hidden,
            self.teacher_head,
            normalizer,
            with_forward_kl,
            None if micro_batch.position_ids is None else micro_batch.position_ids.to(self.device, non_blocking=True),
            None if kd_mask is None else kd_mask.to(self.device, non_blocking=True),
            kd_normalizer,
        )

    def train_step(
        self,
        micro_batches: list[MicroBatch],
        teacher_hidden: list[torch.Tensor],
        *,
        global_num_loss_tokens: int,
        global_num_kd_tokens: int | None = None,
    ) -> StepMetrics:
        """Forward/backward over this rank's micro-batches, then clip, AdamW step, schedule step, zero grads.

        ``global_num_kd_tokens``: cross-tokenizer only, the step's aligned predictions (the KD normalizer)."""
        self._require_setup()
        start = time.perf_counter()
        num_loss_tokens, num_tokens = self._check_step_inputs(
            micro_batches, teacher_hidden, global_num_loss_tokens, global_num_kd_tokens
        )
        kd_normalizer = None if global_num_kd_tokens is None else float(max(global_num_kd_tokens, 1))
        self.module.train()
        sums = torch.zeros(2, dtype=torch.float64)
        for micro_batch, hidden in zip(micro_batches, teacher_hidden):
            loss, stats = self._forward(micro_batch, hidden, float(global_num_loss_tokens), kd_normalizer=kd_normalizer)
            (loss * self._grad_scale if self._grad_scale != 1.0 else loss).backward()
            sums += stats
        kd_sum, ce_sum = all_reduce_sum(sums, self.device).tolist()

        grad_norm = self._clip_gradients()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._step += 1

        mean_loss, kd, ce = per_token_losses(self.loss_kwargs, kd_sum, ce_sum, num_loss_tokens, global_num_kd_tokens)
        return StepMetrics(
            loss=mean_loss,
            kd=kd,
            ce=ce,
            grad_norm=grad_norm,
            lr=lr,
            num_loss_tokens=num_loss_tokens,
            num_tokens=num_tokens,
            seconds=time.perf_counter() - start,
        )

    def _clip_gradients(self) -> float:
        """Global L2 norm of the sharded gradients (clipped to ``grad_clip`` when > 0), as a float."""
        params = [param for param in self.module.parameters() if param.grad is not None]
        total_norm = torch.nn.utils.get_total_norm([param.grad for param in params], norm_type=2.0)
        if isinstance(total_norm, DTensor):
            total_norm = total_norm.full_tensor()  # the per-shard norms are partial: reduce across ranks
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, total_norm)
        return float(total_norm)

    @torch.no_grad()
    def evaluate(
        self,
        micro_batches: list[MicroBatch],
        teacher_hidden: list[torch.Tensor],
        *,
        global_num_loss_tokens: int,
        global_num_kd_tokens: int | None = None,
    ) -> dict[str, float]:
        """Per-token forward KL(teacher || student) at T=1 and the configured loss over the global eval batch.

        Cross-tokenizer: ``kl`` is over the aligned predictions, on the vocabulary the tokenizers share."""
        self._require_setup()
        num_loss_tokens, _ = self._check_step_inputs(
            micro_batches, teacher_hidden, global_num_loss_tokens, global_num_kd_tokens
        )
        kd_normalizer = None if global_num_kd_tokens is None else float(max(global_num_kd_tokens, 1))
        self.module.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        for micro_batch, hidden in zip(micro_batches, teacher_hidden):
            _, stats = self._forward(
                micro_batch, hidden, float(global_num_loss_tokens), with_forward_kl=True, kd_normalizer=kd_normalizer
            )
            sums += stats
        self.module.reshard()  # the root stays unsharded after a forward without backward: free it
        self.module.train()
        kd_sum, ce_sum, kl_sum = all_reduce_sum(sums, self.device).tolist()
        return eval_metrics(self.loss_kwargs, kd_sum, ce_sum, kl_sum, num_loss_tokens, global_num_kd_tokens)

    # ---------------------------------------------------------------- checkpoints

    def save(self, path: str) -> None:
        """Write a resumable checkpoint into the EXISTING, empty directory ``path`` (shared by all ranks).

        The caller owns atomicity: save into a temporary directory, then rename it once this returned everywhere.
        """
        self._require_setup()
        checkpoint.save_checkpoint(
            path,
            module=self.module,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            step=self._step,
            device=self.device,
        )

    def load(self, path: str) -> None:
        """Restore model, optimizer, schedule, step and RNG from ``path`` (any data-parallel size at save time)."""
        self._require_setup()
        self._step = checkpoint.load_checkpoint(
            path, module=self.module, optimizer=self.optimizer, scheduler=self.scheduler, device=self.device
        )

    def hf_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full weights by Hugging Face name on rank 0 (None elsewhere; every rank must call): what a rollout
        engine loads after each optimizer step."""
        self._require_setup()
        return checkpoint.full_hf_state_dict(self.module, prefix=_HF_PREFIX)

    def export_hf(self, path: str) -> None:
        """Write the student as a Hugging Face directory at ``path`` (rank 0 writes; every rank must call)."""
        self._require_setup()
        checkpoint.export_hf(
            path, module=self.module, prefix=_HF_PREFIX, hf_config=self.hf_config, model_path=self.model_path
        )
