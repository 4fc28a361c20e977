"""MegatronBackend: the Megatron-Core student (TP/PP/VPP/DP, Megatron DDP and optimizer), one process per rank.

Design:
- The caller initializes ``torch.distributed`` (gloo on CPU, NCCL on GPU with the device set). :meth:`setup`
  activates the CPU compatibility layer (a no-op with CUDA), initializes Megatron's ``parallel_state`` with the
  requested TP/PP/VPP (or checks the sizes of an already initialized one), builds this rank's GPTModel chunk(s)
  from the HF ``config.json`` and streams the HF weights into them (:mod:`~kdscale.student.megatron.weights`).
- Padded vocabulary: a multiple of ``make_vocab_size_divisible_by`` (NOT times TP, unlike Megatron-LM), so that
  checkpoints reshard across TP sizes; TP must divide it.
- Each post-process chunk returns final-norm hidden states instead of logits; the last stage gathers the
  prediction rows (:mod:`kdscale.data.batch`) and computes the chunked (vocab-parallel at TP>1) loss with the
  student head shard and the teacher head padded to the student's vocabulary and sharded the same way
  (:mod:`~kdscale.student.megatron.loss`). Only the last stage needs teacher hidden states:
  ``layout() == {dp_rank: [global ranks of the TP ranks of that DP rank's last pipeline stage]}``.
- Normalization: every micro-batch's loss is ``sum / global_num_loss_tokens`` and ``calculate_per_token_loss``
  is set, so the schedule does not divide by the number of micro-batches, Megatron DDP SUMS gradients across
  data-parallel ranks, and ``finalize_model_grads`` is called without a token count (no second division): the
  gradient is that of the per-token mean over the GLOBAL batch whatever the DP/TP/PP split (as in FSDP2).
- All micro-batches of a step are right-padded to one ``[B, L]`` (pipeline p2p needs fixed shapes; right
  padding is invisible to causal attention for real tokens; padded rows have empty loss masks).
- Packed micro-batches (:mod:`kdscale.data.batch`) keep their restarting position ids (the padding added to reach
  ``L`` restarts them once more: a segment of its own) and get a block-diagonal causal ``attention_mask``
  (``[B, 1, L, L]`` bool, True = masked, Megatron's convention) on every pipeline stage. This needs the local
  ``DotProductAttention`` (checked: Transformer Engine's causal attention ignores the mask), and RoPE is made to
  follow the position ids (``GPTModel`` alone would rotate by the column index; equal in exact arithmetic, not in
  floating point).
- Optimizer: Megatron's Adam (torch AdamW without Apex) with clipping on the global norm, no weight decay on
  1-D parameters and biases; the learning rate of every param group is set each step from
  :func:`kdscale.student.schedule.warmup_cosine_lambda` (the same schedule as FSDP2).

Assumptions: every rank of a DP group (all its TP and PP ranks) gets the same micro-batches; teacher hidden
states are needed only on ranks where :attr:`MegatronBackend.consumes_teacher_outputs` is True (others may pass
an empty list). The model fits in host memory once per rank at load time (one global tensor at a time).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kdscale.data.batch import MicroBatch, block_causal_mask, gather_labels, gather_prediction_rows
from kdscale.student.base import StepMetrics
from kdscale.student.common import (
    LOSS_KEYS,  # noqa: F401 (re-exported: a public name of this module)
    MIXED_PRECISION,  # noqa: F401 (re-exported: a public name of this module)
    adam_kwargs,
    all_reduce_sum,
    as_dtype,
    check_global_loss_tokens,
    eval_metrics,
    per_token_losses,
    teacher_hidden_error,
    validate_student_args,
)
from kdscale.student.schedule import warmup_cosine_lambda


@dataclass
class _StepInput:
    """One padded micro-batch as the schedule's data iterator yields it."""

    index: int
    input_ids: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L]
    loss_mask: torch.Tensor  # [B, L] bool
    attention_mask: torch.Tensor | None = None  # [B, 1, L, L] bool, True = masked; None: causal (not packed)


def _finalize_grads_without_token_scaling(model: list, num_tokens: Any = None, **kwargs: Any) -> None:
    """``finalize_model_grads`` (DP all-reduce, tied-embedding sync) WITHOUT dividing by the token count: the
    loss is already normalized by the global number of loss tokens."""
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(model, None, **kwargs)


class MegatronBackend:
    """Student backend on Megatron-Core. See the module docstring; all methods are collective."""

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
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        virtual_pipeline_parallel_size: int | None = None,
        use_distributed_optimizer: bool = False,
        recompute_activations: bool = False,
        make_vocab_size_divisible_by: int = 128,
    ) -> None:
        """Same keyword arguments as ``FSDP2Backend`` (``attn_implementation`` is ignored: Megatron's own
        attention runs), plus the Megatron parallel sizes, the distributed optimizer, full activation
        recomputation (``recompute_activations`` or ``activation_checkpointing``) and the vocabulary padding."""
        loss = validate_student_args(
            teacher_head=teacher_head,
            vocab_size=vocab_size,
            loss=loss,
            mixed_precision=mixed_precision,
            device=device,
            grad_clip=grad_clip,
        )
        if tensor_parallel_size < 1 or pipeline_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size ({tensor_parallel_size}) and pipeline_parallel_size "
                f"({pipeline_parallel_size}) must be >= 1"
            )
        if virtual_pipeline_parallel_size is not None and (
            virtual_pipeline_parallel_size < 2 or pipeline_parallel_size < 2
        ):
            raise ValueError(
                f"virtual_pipeline_parallel_size ({virtual_pipeline_parallel_size}) needs pipeline_parallel_size "
                f">= 2 (got {pipeline_parallel_size}) and a value >= 2: set it to None to disable interleaving"
            )
        if make_vocab_size_divisible_by < 1:
            raise ValueError(f"make_vocab_size_divisible_by must be >= 1, got {make_vocab_size_divisible_by}")
        self.model_path = str(model_path)
        self.vocab_size = vocab_size
        self.loss_kwargs = loss
        self.lr = float(lr)
        self.optim_kwargs = adam_kwargs(weight_decay=weight_decay, betas=betas, eps=eps)
        self.grad_clip = grad_clip
        self.lr_lambda = warmup_cosine_lambda(
            warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio
        )
        self.mixed_precision = mixed_precision
        self.recompute_activations = recompute_activations or activation_checkpointing
        self.seed = seed
        self.device_type = device
        self.teacher_head_dtype = as_dtype(teacher_head_dtype, "teacher_head_dtype")
        self.tp_size = tensor_parallel_size
        self.pp_size = pipeline_parallel_size
        self.vpp_size = virtual_pipeline_parallel_size
        self.use_distributed_optimizer = use_distributed_optimizer
        self.make_vocab_size_divisible_by = make_vocab_size_divisible_by
        self._teacher_head_source = teacher_head
        self._step = 0
        self._is_setup = False
        self._packing_ready = False
        self._rope_position_ids: torch.Tensor | None = None  # of the packed micro-batch being forwarded

    # ---------------------------------------------------------------- setup and layout

    def setup(self) -> None:
        """Initialize Megatron parallelism, build and load the student, DDP, optimizer (collective; idempotent)."""
        if self._is_setup:
            return
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "MegatronBackend.setup() needs torch.distributed initialized by the caller "
                "(dist.init_process_group('gloo' on CPU or 'nccl' on GPU))"
            )
        from kdscale.student.megatron import cpu_compat

        if self.device_type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("device='cuda' but CUDA is not available: set device='cpu'")
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
            cpu_compat.activate()
        self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        self._init_parallel_state()
        self._build_model()
        self._build_optimizer()
        self._build_teacher_head()
        self._is_setup = True

    def _init_parallel_state(self) -> None:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel = self.tp_size * self.pp_size
        if self._world_size % model_parallel:
            raise ValueError(
                f"world size ({self._world_size}) must be a multiple of tensor_parallel_size ({self.tp_size}) x "
                f"pipeline_parallel_size ({self.pp_size}) = {model_parallel}: data-parallel size = world / (TP x PP)"
            )
        if parallel_state.model_parallel_is_initialized():
            sizes = (
                parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size(),
                parallel_state.get_virtual_pipeline_model_parallel_world_size(),
            )
            if sizes != (self.tp_size, self.pp_size, self.vpp_size):
                raise ValueError(
                    f"Megatron parallel_state is already initialized with (TP, PP, VPP) = {sizes}, but the backend "
                    f"was configured with {(self.tp_size, self.pp_size, self.vpp_size)}: configure the same sizes"
                )
        else:
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=self.tp_size,
                pipeline_model_parallel_size=self.pp_size,
                virtual_pipeline_model_parallel_size=self.vpp_size,
            )
        model_parallel_cuda_manual_seed(self.seed)
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self._dp_rank = parallel_state.get_data_parallel_rank()
        self._dp_size = parallel_state.get_data_parallel_world_size()
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        # (dp_rank, pp_rank, tp_rank) of every global rank, for layout() and the step checks.
        mine = torch.tensor([self._dp_rank, self.pp_rank, self.tp_rank], dtype=torch.int64, device=self.device)
        gathered = [torch.zeros_like(mine) for _ in range(self._world_size)]
        dist.all_gather(gathered, mine)
        self._rank_coords = [tuple(int(v) for v in coords.cpu()) for coords in gathered]

    def _build_model(self) -> None:
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.transformer.module import Float16Module

        from kdscale.checkpoint import hf_io
        from kdscale.checkpoint.convert.formats import vocab_divisor_for
        from kdscale.student.megatron.loss import return_hidden_states
        from kdscale.student.megatron.model import build_gpt_model, padded_vocab_size, transformer_config_from_hf
        from kdscale.student.megatron.weights import load_hf_into_chunks

        hf_config = hf_io.read_model_config(self.model_path)
        self.hf_config = hf_config
        student_vocab = int(hf_config["vocab_size"])
        if self.vocab_size > student_vocab:
            raise ValueError(
                f"vocab_size ({self.vocab_size}) exceeds the student head's {student_vocab} rows: pass the "
                "tokenizer's vocabulary size, and a student whose vocabulary covers it"
            )
        self.padded_vocab = padded_vocab_size(student_vocab, self.make_vocab_size_divisible_by, 1)
        if self.padded_vocab % self.tp_size:
            raise ValueError(
                f"the padded vocabulary ({self.padded_vocab} = {student_vocab} rounded up to a multiple of "
                f"make_vocab_size_divisible_by={self.make_vocab_size_divisible_by}) is not divisible by "
                f"tensor_parallel_size ({self.tp_size}): set make_vocab_size_divisible_by to a multiple of "
                f"{self.tp_size}"
            )
        bf16 = self.mixed_precision == "bf16"
        overrides: dict[str, Any] = {
            "calculate_per_token_loss": True,
            "bf16": bf16,
            "pipeline_dtype": torch.bfloat16 if bf16 else torch.float32,
        }
        if self.vpp_size is not None:
            overrides["batch_p2p_comm"] = False  # PP=2 + VPP on gloo is silently wrong otherwise
        if self.recompute_activations:
            overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        config = transformer_config_from_hf(
            hf_config,
            tensor_parallel_size=self.tp_size,
            pipeline_parallel_size=self.pp_size,
            virtual_pipeline_parallel_size=self.vpp_size,
            params_dtype=torch.float32,
            use_cpu_initialization=True,
            **overrides,
        )
        self.config = config
        divisor = vocab_divisor_for(self.padded_vocab, self.tp_size)
        torch.manual_seed(self.seed)
        num_chunks = self.vpp_size or 1
        models = []
        for vp_stage in range(num_chunks):
            vp = vp_stage if self.vpp_size is not None else None
            models.append(
                build_gpt_model(
                    hf_config,
                    pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                    post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
                    vp_stage=vp,
                    config=config,
                    make_vocab_size_divisible_by=divisor,
                )
            )
        load_hf_into_chunks(
            models,
            self.model_path,
            hf_config,
            padded_vocab=self.padded_vocab,
            tp_rank=self.tp_rank,
            tp_size=self.tp_size,
        )
        for model in models:
            return_hidden_states(model)
            if self.device.type == "cuda":
                model.cuda(self.device)
        self.models = models  # unwrapped GPTModel chunks (state dicts, checkpoints)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=self.use_distributed_optimizer,
        )
        self.chunks = [
            DistributedDataParallel(
                config,
                ddp_config,
                Float16Module(config, model) if bf16 else model,
                disable_bucketing=index > 0,
            )
            for index, model in enumerate(models)
        ]
        self._model_of_chunk = {id(chunk): model for chunk, model in zip(self.chunks, models)}
        no_sync = [chunk.no_sync for chunk in self.chunks]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        config.finalize_model_grads_func = _finalize_grads_without_token_scaling
        self.post_process_model = next((model for model in models if model.post_process), None)

    def _build_optimizer(self) -> None:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        beta1, beta2 = self.optim_kwargs["betas"]
        optimizer_config = OptimizerConfig(
            optimizer="adam",
            lr=self.lr,
            weight_decay=self.optim_kwargs["weight_decay"],
            adam_beta1=beta1,
            adam_beta2=beta2,
            adam_eps=self.optim_kwargs["eps"],
            # 0 disables clipping; Megatron then skips the norm, so clip at a norm no gradient reaches instead.
            clip_grad=self.grad_clip if self.grad_clip > 0 else 1e30,
            bf16=self.mixed_precision == "bf16",
            params_dtype=torch.float32,
            use_distributed_optimizer=self.use_distributed_optimizer,
        )
        self.optimizer = get_megatron_optimizer(optimizer_config, self.chunks)

    def _build_teacher_head(self) -> None:
        """The teacher head padded (zero rows) or cut to the student's padded vocabulary, on the last stage."""
        from kdscale.student.megatron.loss import StageLoss

        source = self._teacher_head_source
        del self._teacher_head_source
        self.stage_loss = None
        if self.post_process_model is None:
            return
        head = source.detach().to(self.device, self.teacher_head_dtype)[: self.padded_vocab]
        if head.shape[0] < self.padded_vocab:
            padding = head.new_zeros(self.padded_vocab - head.shape[0], head.shape[1])
            head = torch.cat([head, padding])  # rows >= vocab_size are excluded by the loss
        self.stage_loss = StageLoss(
            vocab_size=self.vocab_size,
            loss_kwargs=self.loss_kwargs,
            teacher_head=head.contiguous(),
            tp_rank=self.tp_rank,
            tp_size=self.tp_size,
            tp_group=self.tp_group,
        )

    def layout(self) -> dict[int, list[int]]:
        """``{dp_rank: [global ranks of the TP ranks of that DP rank's LAST pipeline stage]}``."""
        self._require_setup()
        layout: dict[int, list[int]] = {dp: [] for dp in range(self._dp_size)}
        for rank, (dp, pp, _) in enumerate(self._rank_coords):
            if pp == self.pp_size - 1:
                layout[dp].append(rank)
        return layout

    @property
    def consumes_teacher_outputs(self) -> bool:
        """Whether this rank needs the teacher hidden states (it runs the loss: the last pipeline stage)."""
        self._require_setup()
        return self.pp_rank == self.pp_size - 1

    @property
    def dp_rank(self) -> int:
        self._require_setup()
        return self._dp_rank

    @property
    def dp_size(self) -> int:
        self._require_setup()
        return self._dp_size

    @property
    def step(self) -> int:
        return self._step

    def _require_setup(self) -> None:
        if not self._is_setup:
            raise RuntimeError("call MegatronBackend.setup() first")

    # ---------------------------------------------------------------- input checks

    def _local_input_error(
        self, micro_batches: list[MicroBatch], teacher_hidden: list[torch.Tensor]
    ) -> RuntimeError | ValueError | None:
        """The first problem with this rank's inputs, or None."""
        if not micro_batches:
            return ValueError("no micro-batches: every rank must run at least one micro-batch per step")
        if any(mb.is_packed for mb in micro_batches):
            try:
                self._enable_packing()
            except ValueError as error:
                return error
        if not self.consumes_teacher_outputs:
            return None
        error = teacher_hidden_error(micro_batches, teacher_hidden, self.stage_loss.teacher_head.shape[1])
        if error is not None:
            return error
        if self.pp_size > 1 and self.vpp_size is not None and len(micro_batches) < self.pp_size:
            return ValueError(
                f"{len(micro_batches)} micro-batches per step but the interleaved pipeline schedule needs at least "
                f"pipeline_parallel_size ({self.pp_size}): lay out more micro-batches per DP rank"
            )
        return None

    def _check_step_inputs(
        self, micro_batches: list[MicroBatch], teacher_hidden: list[torch.Tensor], global_num_loss_tokens: int
    ) -> tuple[int, int]:
        """Validate the inputs of every rank (one all-gather, so that all ranks raise together instead of some
        waiting forever in a collective); returns (global loss tokens, global tokens)."""
        error = self._local_input_error(micro_batches, teacher_hidden)
        local = torch.tensor(
            [
                int(error is not None),
                len(micro_batches),
                sum(mb.num_loss_tokens for mb in micro_batches),
                sum(mb.num_tokens for mb in micro_batches),
            ],
            dtype=torch.int64,
            device=self.device,
        )
        gathered = [torch.zeros_like(local) for _ in range(self._world_size)]
        dist.all_gather(gathered, local)
        table = torch.stack(gathered).cpu()
        if error is not None:
            raise error
        if table[:, 0].any():
            failed_ranks = table[:, 0].nonzero().flatten().tolist()
            raise RuntimeError(f"rank(s) {failed_ranks} got invalid step inputs (see their error); step skipped")
        per_dp: dict[int, set[tuple[int, ...]]] = {}
        for rank, (dp, _, _) in enumerate(self._rank_coords):
            per_dp.setdefault(dp, set()).add(tuple(table[rank, 1:].tolist()))
        inconsistent = {dp: sorted(counts) for dp, counts in per_dp.items() if len(counts) > 1}
        if inconsistent:
            raise ValueError(
                f"the TP/PP ranks of one data-parallel rank got different micro-batches (counts of (micro-batches, "
                f"loss tokens, tokens) per DP rank: {inconsistent}): send every rank of a DP group the same shard"
            )
        representatives = [next(iter(counts)) for _, counts in sorted(per_dp.items())]
        total_loss_tokens = sum(counts[1] for counts in representatives)
        total_tokens = sum(counts[2] for counts in representatives)
        check_global_loss_tokens(total_loss_tokens, global_num_loss_tokens)
        return total_loss_tokens, total_tokens

    # ---------------------------------------------------------------- steps

    def _enable_packing(self) -> None:
        """Check that the chunks can run packed micro-batches and make their RoPE follow the position ids (once)."""
        if self._packing_ready:
            return
        from kdscale.student.megatron.model import attention_takes_mask, rope_follows_position_ids

        for model in self.models:
            unsupported = attention_takes_mask(model)
            if unsupported is not None:
                raise ValueError(
                    f"packed micro-batches need attention that applies a block-diagonal mask, but this student's "
                    f"attention is {unsupported} (e.g. Transformer Engine's, which ignores a mask with the causal "
                    "mask type): set data.packing: false"
                )
        for model in self.models:
            rope_follows_position_ids(model, lambda: self._rope_position_ids)
        self._packing_ready = True

    def _step_inputs(self, micro_batches: list[MicroBatch]) -> tuple[list[_StepInput], int, int]:
        """Micro-batches right-padded to one [B, L] (pipeline p2p needs fixed shapes); packed ones with their
        position ids and block-diagonal causal mask."""
        batch_size = max(mb.input_ids.shape[0] for mb in micro_batches)
        seq_len = max(mb.input_ids.shape[1] for mb in micro_batches)
        inputs = []
        for index, mb in enumerate(micro_batches):
            rows, cols = mb.input_ids.shape
            input_ids = torch.zeros(batch_size, seq_len, dtype=torch.int64)
            loss_mask = torch.zeros(batch_size, seq_len, dtype=torch.bool)
            input_ids[:rows, :cols] = mb.input_ids
            loss_mask[:rows, :cols] = mb.loss_mask
            position_ids = torch.arange(seq_len, dtype=torch.int64).expand(batch_size, seq_len).contiguous()
            attention_mask = None
            if mb.is_packed:
                position_ids[:rows, :cols] = mb.position_ids
                position_ids[:rows, cols:] = torch.arange(seq_len - cols)  # padding to L: a segment of its own
                attention_mask = ~block_causal_mask(position_ids).unsqueeze(1)
            inputs.append(
                _StepInput(
                    index=index,
                    input_ids=input_ids.to(self.device),
                    position_ids=position_ids.to(self.device),
                    loss_mask=loss_mask.to(self.device),
                    attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                )
            )
        return inputs, batch_size, seq_len

    def _loss_func(
        self,
        step_input: _StepInput,
        teacher_hidden: list[torch.Tensor],
        normalizer: float,
        with_forward_kl: bool,
        output_tensor: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch on the last stage: (loss, token count, {"stats": float64 sums})."""
        model = self.post_process_model
        hidden_rows = gather_prediction_rows(output_tensor, step_input.loss_mask)
        labels = gather_labels(step_input.input_ids, step_input.loss_mask)
        student_head = _output_weight(model)
        num_stats = 3 if with_forward_kl else 2
        num_rows = hidden_rows.shape[0]
        count = torch.tensor(num_rows, dtype=torch.int, device=self.device)
        if num_rows == 0:
            # Keep the head and every layer in the graph (zero gradients) so that all ranks reduce the same grads.
            loss = (output_tensor.sum() + student_head.sum()) * 0.0
            return loss, count, {"stats": torch.zeros(num_stats, dtype=torch.float64)}
        rows = teacher_hidden[step_input.index].to(self.device)  # callers may pass host tensors (no-op on CPU)
        out = self.stage_loss(hidden_rows, student_head, rows, labels, normalizer=normalizer)
        stats = [out.kd_sum, out.ce_sum]
        if with_forward_kl:
            kl = self.stage_loss(
                hidden_rows,
                student_head,
                rows,
                labels,
                normalizer=normalizer,
                divergence="forward_kl",
                temperature=1.0,
                kd_ratio=1.0,
            )
            stats.append(kl.kd_sum)
        return out.loss, count, {"stats": torch.tensor(stats, dtype=torch.float64)}

    def _forward_step(self, teacher_hidden, normalizer, with_forward_kl, data_iterator, chunk):
        step_input: _StepInput = next(data_iterator)
        packed = step_input.attention_mask is not None
        self._rope_position_ids = step_input.position_ids if packed else None  # read by the RoPE hook
        try:
            output = chunk(step_input.input_ids, step_input.position_ids, step_input.attention_mask)
        finally:
            self._rope_position_ids = None
        model = self._model_of_chunk[id(chunk)]
        if not model.post_process:
            return output, None
        return output, functools.partial(self._loss_func, step_input, teacher_hidden, normalizer, with_forward_kl)

    def _run_schedule(
        self,
        micro_batches: list[MicroBatch],
        teacher_hidden: list[torch.Tensor],
        normalizer: float,
        *,
        forward_only: bool,
        with_forward_kl: bool = False,
    ) -> torch.Tensor:
        """Run the pipeline schedule; returns this rank's float64 stats sums (zeros off the last stage)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if any(mb.is_packed for mb in micro_batches):
            self._enable_packing()
        inputs, batch_size, seq_len = self._step_inputs(micro_batches)
        iterators = [iter(inputs) for _ in self.chunks]
        forward_step = functools.partial(self._forward_step, teacher_hidden, normalizer, with_forward_kl)
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.chunks,
            num_microbatches=len(inputs),
            seq_length=seq_len,
            micro_batch_size=batch_size,
            forward_only=forward_only,
        )
        sums = torch.zeros(3 if with_forward_kl else 2, dtype=torch.float64)
        # Count each DP shard once: on its last stage's first TP rank (TP ranks hold identical losses).
        if self.consumes_teacher_outputs and self.tp_rank == 0:
            for item in outputs:
                sums += item["stats"].cpu()
        return sums

    def _set_learning_rate(self) -> float:
        lr = self.lr * self.lr_lambda(self._step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(
        self,
        micro_batches: list[MicroBatch],
        teacher_hidden: list[torch.Tensor],
        *,
        global_num_loss_tokens: int,
    ) -> StepMetrics:
        """Forward/backward over this DP shard's micro-batches (pipeline schedule), then clip and Adam step."""
        self._require_setup()
        start = time.perf_counter()
        num_loss_tokens, num_tokens = self._check_step_inputs(micro_batches, teacher_hidden, global_num_loss_tokens)
        for chunk in self.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        sums = self._run_schedule(micro_batches, teacher_hidden, float(global_num_loss_tokens), forward_only=False)
        kd_sum, ce_sum = all_reduce_sum(sums, self.device).tolist()
        lr = self._set_learning_rate()
        update_ok, grad_norm, _ = self.optimizer.step()
        if not update_ok:
            raise RuntimeError("the Megatron optimizer skipped the update (non-finite gradients)")
        self._step += 1
        mean_loss, kd, ce = per_token_losses(self.loss_kwargs, kd_sum, ce_sum, num_loss_tokens)
        return StepMetrics(
            loss=mean_loss,
            kd=kd,
            ce=ce,
            grad_norm=float(grad_norm),
            lr=lr,
            num_loss_tokens=num_loss_tokens,
            num_tokens=num_tokens,
            seconds=time.perf_counter() - start,
        )

    @torch.no_grad()
    def evaluate(
        self,
        micro_batches: list[MicroBatch],
        teacher_hidden: list[torch.Tensor],
        *,
        global_num_loss_tokens: int,
    ) -> dict[str, float]:
        """Per-token forward KL(teacher || student) at T=1 and the configured loss over the global eval batch."""
        self._require_setup()
        num_loss_tokens, _ = self._check_step_inputs(micro_batches, teacher_hidden, global_num_loss_tokens)
        for chunk in self.chunks:
            chunk.eval()
        sums = self._run_schedule(
            micro_batches, teacher_hidden, float(global_num_loss_tokens), forward_only=True, with_forward_kl=True
        )
        for chunk in self.chunks:
            chunk.train()
        kd_sum, ce_sum, kl_sum = all_reduce_sum(sums, self.device).tolist()
        return eval_metrics(self.loss_kwargs, kd_sum, ce_sum, kl_sum, num_loss_tokens)

    # ---------------------------------------------------------------- checkpoints

    def save(self, path: str) -> None:
        """Write a resumable checkpoint into the EXISTING directory ``path`` (shared by all ranks): ``model/``
        (torch_dist, convertible with ``kdscale convert mcore-to-hf --hf-config-dir``), ``optim/`` and per-rank
        step/RNG files."""
        self._require_setup()
        from kdscale.student.megatron import checkpoint

        checkpoint.save_checkpoint(self, path)

    def load(self, path: str) -> None:
        """Restore model, optimizer, schedule, step and RNG from ``path`` (any TP/PP/DP layout at save time)."""
        self._require_setup()
        from kdscale.student.megatron import checkpoint

        self._step = checkpoint.load_checkpoint(self, path)

    def hf_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full weights by Hugging Face name on global rank 0 (None elsewhere; every rank must call): what an
        on-policy rollout engine loads after each optimizer step (gathered over TP and PP in memory)."""
        self._require_setup()
        from megatron.core import parallel_state

        from kdscale.student.megatron.weights import gather_hf_state_dict

        return gather_hf_state_dict(
            self.models, self.hf_config, padded_vocab=self.padded_vocab, tp_group=self.tp_group,
            tp_size=self.tp_size, tp_rank=self.tp_rank, pp_group=parallel_state.get_pipeline_model_parallel_group(),
            pp_size=self.pp_size, pp_rank=self.pp_rank, dp_rank=self._dp_rank,
        )  # fmt: skip

    def export_hf(self, path: str) -> None:
        """Write the student as a Hugging Face directory at ``path`` (rank 0 writes; every rank must call)."""
        self._require_setup()
        from kdscale.student.megatron import checkpoint

        checkpoint.export_hf(self, path)


def _output_weight(model: torch.nn.Module) -> torch.Tensor:
    from kdscale.student.megatron.loss import output_weight

    return output_weight(model)
