"""The run configuration: typed sections, strict keys, defaults documented field by field.

One YAML file describes one run. ``student.backend`` and ``teacher.engine`` are discriminators: each backend or
engine has its own section schema, so a key that belongs to another backend is an error, not a silent no-op.
Unknown keys anywhere are errors (``extra="forbid"``); ``kdscale.config.load`` turns them into "did you mean"
messages. Cross-checks against the files on disk live in ``kdscale.config.checks``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """Base for every section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(StrictModel):
    """Where the run writes, how long it runs, when it logs, evaluates and saves."""

    name: str = Field("run", description="Run name, used in the default output directory.")
    output_dir: str = Field("runs/{name}", description="Run directory; '{name}' is replaced by run.name.")
    seed: int = Field(0, description="Seed for data order, model init randomness and dropout.")
    max_steps: int | None = Field(
        None, ge=1, description="Optimizer steps; default: num_epochs over the training data."
    )
    num_epochs: int = Field(1, ge=1, description="Epochs when max_steps is not set.")
    log_every: int = Field(1, ge=1, description="Print a metrics line every N steps (all steps go to JSONL).")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="How many most recent checkpoints to keep.")
    eval_every: int = Field(0, ge=0, description="Held-out evaluation every N steps (0: only before and after).")
    resume: str = Field(
        "auto",
        description="'auto' resumes from the latest checkpoint in the run directory if any, 'never' refuses "
        "to reuse a run directory that has checkpoints, or a path to a checkpoint directory.",
    )
    export_hf: bool = Field(True, description="Export the trained student as a Hugging Face directory at the end.")
    plot: bool = Field(True, description="Write loss_curve.png at the end.")
    progress_bar: bool = Field(True, description="Show a progress bar on a terminal.")
    cache_dir: str = Field(
        ".kdscale_cache", description="Where converted teachers (GGUF -> HF) and derived students are cached."
    )


class HFTeacherConfig(StrictModel):
    """Teacher engine ``hf``: a transformers causal LM (CPU default and reference engine)."""

    engine: Literal["hf"]
    model_path: str = Field(
        description="HF model directory, a .gguf file, or pkg://<package>/<file> for a file shipped in a package."
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weights and compute dtype.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto': cuda when available.")
    num_replicas: int = Field(1, ge=1, description="Teacher replicas (Ray actors); work goes to the least loaded.")
    num_threads: int | None = Field(
        None, ge=1, description="torch threads per replica (default: the cores split among the replicas, and also "
        "among the student ranks when controller.prefetch_steps > 0, since then they run at the same time).",
    )
    max_tokens_per_forward: int = Field(8192, ge=1, description="Split micro-batches above this many tokens.")
    attn_implementation: Literal["eager", "sdpa"] = "sdpa"

    @property
    def gpus_per_replica(self) -> int:
        return 1


class SGLangTeacherConfig(StrictModel):
    """Teacher engine ``sglang``: an offline ``sglang.Engine`` per replica (supported: SGLang 0.5.23 to < 0.6).

    Each replica is one Ray actor owning one SGLang engine (its scheduler and detokenizer are child processes) on
    tp_size x dp_size GPUs. Requests carry token ids; final-norm hidden states come back as numpy arrays through a
    patch of SGLang's prefill result path (``kdscale.teacher.sglang_engine``).
    """

    engine: Literal["sglang"]
    model_path: str = Field(
        description="HF model directory, a .gguf file, or pkg://<package>/<file> (a GGUF is converted once)."
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Weights and compute dtype.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto': cuda when available. 'cpu' needs SGLang's CPU engine (tools/dev/install_sglang_cpu.sh)."
    )
    num_replicas: int = Field(1, ge=1, description="Engines (Ray actors); work goes to the least loaded.")
    tp_size: int = Field(1, ge=1, description="Tensor parallelism inside one engine.")
    dp_size: int = Field(1, ge=1, description="Data parallelism inside one engine (its GPUs = tp_size x dp_size).")
    ep_size: int = Field(1, ge=1, description="Expert parallelism of MoE layers (within the tp_size x dp_size GPUs).")
    mem_fraction_static: float | None = Field(
        None, gt=0, lt=1, description="Fraction of GPU memory for weights and KV cache (SGLang's default if unset)."
    )
    quantization: str | None = Field(None, description="e.g. 'fp8', 'w8a8_fp8', 'modelopt_fp8' (GPU only).")
    kv_cache_dtype: str = Field("auto", description="e.g. 'fp8_e4m3' (GPU only).")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Any other sglang ServerArgs field, passed through (checked at start: an "
        "unknown name, or one kdscale sets itself, is an error).",
    )
    sleep_between_steps: bool | None = Field(
        None, description="Release the engine's GPU memory (weights and KV cache) while the student trains and "
        "resume it before the next teacher work (release/resume_memory_occupation). Default: on when teacher and "
        "student share GPUs (controller.placement colocated); forces controller.prefetch_steps to 0.",
    )
    num_threads: int | None = Field(
        None, ge=1, description="CPU engine only: OpenMP threads of the scheduler (default: as the hf engine).",
    )
    startup_timeout_s: float = Field(900.0, gt=0, description="Longest wait for an engine to start.")
    request_timeout_s: float = Field(600.0, gt=0, description="Longest wait for one micro-batch's hidden states.")

    @model_validator(mode="after")
    def _ep_fits(self):
        if (self.tp_size * self.dp_size) % self.ep_size:
            raise ValueError(
                f"teacher.ep_size={self.ep_size} must divide tp_size x dp_size = {self.tp_size * self.dp_size}"
            )
        return self

    @property
    def gpus_per_replica(self) -> int:
        return self.tp_size * self.dp_size


TeacherConfig = Annotated[Union[HFTeacherConfig, SGLangTeacherConfig], Field(discriminator="engine")]  # noqa: UP007


class _StudentCommon(StrictModel):
    """Keys every student backend has."""

    model_path: str | None = Field(None, description="HF student directory. Or set init_from_teacher_layers.")
    init_from_teacher_layers: list[int] | None = Field(
        None,
        description="Derive the student from these teacher decoder layers (same embeddings, norm and head); "
        "cached under run.cache_dir.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto': cuda when available.")
    mixed_precision: Literal["none", "bf16"] = Field("none", description="bf16 params, fp32 gradient reduction.")
    num_threads_per_rank: int | None = Field(
        None, ge=1, description="torch threads per rank (default: the cores split among the ranks, and also among "
        "the teacher replicas when controller.prefetch_steps > 0).",
    )
    teacher_head_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the teacher output head held on each student rank."
    )

    @model_validator(mode="after")
    def _one_source(self):
        if (self.model_path is None) == (self.init_from_teacher_layers is None):
            raise ValueError(
                "set exactly one of student.model_path (an HF directory) and student.init_from_teacher_layers "
                "(e.g. [0, 10, 20, 29])"
            )
        return self


class FSDP2StudentConfig(_StudentCommon):
    """Student backend ``fsdp2``: PyTorch FSDP2 (``fully_shard`` per decoder layer, then the root)."""

    backend: Literal["fsdp2"]
    num_ranks: int = Field(1, ge=1, description="Student ranks = data-parallel size (one Ray actor each).")
    activation_checkpointing: bool = False
    attn_implementation: Literal["eager", "sdpa"] = "sdpa"

    @property
    def world_size(self) -> int:
        return self.num_ranks

    @property
    def dp_size(self) -> int:
        return self.num_ranks


class MegatronStudentConfig(_StudentCommon):
    """Student backend ``megatron``: Megatron-Core GPTModel with tensor, pipeline and data parallelism.

    World size = tensor_parallel_size x pipeline_parallel_size x data_parallel_size (one Ray actor per rank).
    """

    backend: Literal["megatron"]
    tensor_parallel_size: int = Field(1, ge=1, description="Must divide the attention heads and KV heads.")
    pipeline_parallel_size: int = Field(1, ge=1, description="Must divide the number of layers.")
    virtual_pipeline_parallel_size: int | None = Field(
        None, ge=2, description="Interleaved pipeline chunks per stage (needs pipeline_parallel_size > 1)."
    )
    data_parallel_size: int = Field(1, ge=1)
    use_distributed_optimizer: bool = False
    recompute_activations: bool = Field(False, description="Full activation recomputation per layer.")
    make_vocab_size_divisible_by: int = Field(128, ge=1, description="Vocabulary padding multiple (TP must divide).")

    @model_validator(mode="after")
    def _vpp_needs_pp(self):
        if self.virtual_pipeline_parallel_size is not None and self.pipeline_parallel_size < 2:
            raise ValueError(
                f"virtual_pipeline_parallel_size={self.virtual_pipeline_parallel_size} needs "
                f"pipeline_parallel_size >= 2 (got {self.pipeline_parallel_size}): unset it or raise pipeline_parallel_size"
            )
        return self

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size

    @property
    def dp_size(self) -> int:
        return self.data_parallel_size


StudentConfig = Annotated[Union[FSDP2StudentConfig, MegatronStudentConfig], Field(discriminator="backend")]  # noqa: UP007


class LossConfig(StrictModel):
    """The distillation objective: loss = kd_ratio * divergence + (1 - kd_ratio) * CE, per-token mean."""

    divergence: Literal[
        "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "adaptive_kl"
    ] = "forward_kl"
    temperature: float = Field(1.0, gt=0)
    kd_ratio: float = Field(1.0, ge=0, le=1, description="Weight of the divergence; 1 - kd_ratio goes to CE.")
    jsd_beta: float = Field(0.5, gt=0, lt=1)
    skew_lambda: float = Field(0.1, ge=0, le=1)
    adaptive_alpha: float = Field(0.5, gt=0, le=1)
    chunk_size: int = Field(1024, ge=1, description="Tokens per chunk of the head matmul + divergence.")


class OptimConfig(StrictModel):
    """AdamW with linear warmup then cosine decay to min_lr_ratio * lr."""

    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="Max global grad norm (0: no clipping).")
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)


class DataConfig(StrictModel):
    """Training and held-out data: JSONL rows of {prompt, response} or {messages}."""

    train_path: str
    eval_path: str | None = None
    max_eval_samples: int | None = Field(None, ge=1)
    max_seq_len: int = Field(1024, ge=8)
    truncation: Literal["right", "drop"] = Field(
        "right", description="'right': cut the end of long rows; 'drop': skip rows longer than max_seq_len."
    )
    global_batch_size: int = Field(8, ge=1, description="Samples per optimizer step, over all DP ranks.")
    max_tokens_per_micro_batch: int = Field(
        4096, ge=1, description="Padded tokens (rows x longest) per micro-batch, or real tokens under packing; "
        "more micro-batches accumulate."
    )
    max_bad_fraction: float = Field(0.01, ge=0, le=1, description="Stop if more rows than this are malformed.")
    shuffle: bool = True
    packing: bool = Field(
        False,
        description="Padding-free micro-batches: samples packed end to end in one row, position ids restarting "
        "per sample and attention kept within each sample; max_tokens_per_micro_batch then bounds real tokens.",
    )


class TransportConfig(StrictModel):
    """How teacher hidden states travel to the student ranks."""

    backend: Literal["ray"] = "ray"
    dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="bf16 travels as int16 bits (half the bytes); float32 for exactness checks."
    )


class TeacherCacheConfig(StrictModel):
    """Optional on-disk cache of off-policy teacher hidden states, reused on later epochs and reruns.

    Entries are keyed by each sample's token ids and loss mask under a directory named by the teacher's
    fingerprint and the transport dtype, so a changed teacher or changed data never reads stale states.
    """

    enabled: bool = Field(False, description="Read cached teacher outputs and write the missing ones.")
    dir: str = Field("{cache_dir}/teacher_outputs", description="Cache root; '{cache_dir}' is run.cache_dir.")


class ControllerConfig(StrictModel):
    """How the driver schedules teacher work: prefetch depth, fault handling, placement of the actors."""

    prefetch_steps: int | None = Field(
        None, ge=0, description="Future steps of off-policy teacher work kept in flight while the student trains "
        "(0: teacher then student, strictly one after the other). Bounds the object-store use to "
        "(prefetch_steps + 1) steps of teacher outputs. Default: 2 when the teacher or the student runs on GPUs, 0 "
        "when both run on CPU cores, where overlapping them only splits the same cores.",
    )
    max_teacher_restarts: int = Field(
        2, ge=0, description="Restarts per teacher replica after it dies; past that it is dropped with a "
        "warning (the run stops if no replica is left).",
    )
    placement: Literal["auto", "colocated", "separate"] = Field(
        "auto", description="'separate': teacher replicas on their own GPUs (first nodes), student ranks on "
        "the last nodes; 'colocated': every node hosts student ranks and teacher replicas sharing its GPUs; "
        "'auto': separate when the GPUs suffice, else colocated. Ignored on CPU-only clusters.",
    )


class RayConfig(StrictModel):
    """Ray cluster: start a local one (address unset) or join an existing one."""

    address: str | None = Field(None, description="Existing cluster address ('auto' or host:port).")
    num_cpus: int | None = Field(None, ge=1, description="Logical CPUs of a local cluster (default: enough).")
    object_store_memory_mb: int = Field(512, ge=64)
    temp_dir: str | None = Field(None, description="Ray temp dir of a local cluster (default: a fresh /tmp dir).")
    timeout_s: float = Field(1800.0, gt=0, description="Longest wait for any one teacher or student call.")


class OnPolicyConfig(StrictModel):
    """``algorithm: on_policy``: the student samples completions of the training prompts with its current weights
    (a rollout engine, synced after every optimizer step), the teacher scores them through the same hidden-state
    path, and the student trains on them, token ids exactly as generated (see ``kdscale.algorithms.rollout``)."""

    rollout_engine: Literal["hf", "sglang"] = Field(
        "hf", description="'hf': transformers in a Ray actor (the CPU path); 'sglang': an SGLang engine, weights "
        "pushed with update_weights_from_tensor.",
    )
    lmbda: float = Field(
        1.0, ge=0, le=1, description="Fraction of steps trained on student rollouts (GKD's lambda, drawn per step "
        "from the run seed); the other steps train on the dataset's responses to the same prompts.",
    )
    samples_per_prompt: int = Field(1, ge=1, description="Rollouts per prompt (data.global_batch_size is the "
                                    "number of rollouts per step, a multiple of this).")
    max_new_tokens: int = Field(128, ge=1, description="Longest completion; longer ones are cut (no EOS added).")
    temperature: float = Field(1.0, ge=0, description="0: greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, description="-1: off.")
    max_staleness: int = Field(
        0, ge=0, description="Train on rollouts at most this many optimizer updates old: k > 0 generates the next "
        "k steps' rollouts while the student trains (overlap); 0 generates each step's with the latest weights.",
    )
    weight_sync_bucket_mb: int = Field(512, ge=1, description="Weights pushed to the rollout engine per bucket.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Rollout engine weights and compute.")
    num_threads: int | None = Field(None, ge=1, description="CPU threads of the rollout engine (default: as the "
                                    "teacher's).")


class CrossTokenizerConfig(StrictModel):
    """Distillation between a teacher and a student with DIFFERENT tokenizers (``kdscale.algorithms.cross_tokenizer``).

    Every row is tokenized twice, with the student's tokenizer and chat template and with the teacher's; the two
    are aligned on the response text by character offsets, and the KD term runs over the aligned predictions only
    (the CE term, if any, over all of the student's targets).
    """

    method: Literal["none", "shared_vocab", "dskd"] = Field(
        "none", description="'none': one tokenizer on both sides (checked). 'shared_vocab': KD over the vocabulary "
        "entries the two tokenizers share, renormalized on both sides. 'dskd': a trained projection of the teacher's "
        "hidden states into the student's space, KD through the student's own head (DSKD).",
    )
    teacher_chat_template: str | None = Field(
        None, description="Jinja chat template of the teacher side (default: the teacher tokenizer's own)."
    )
    projector_ce_weight: float = Field(
        1.0, ge=0, description="dskd: weight of the projector's cross-entropy term (it trains the projector)."
    )
    min_aligned_fraction: float = Field(
        0.2, ge=0, le=1, description="Stop before training if fewer of the training set's student target tokens "
        "than this have an aligned teacher prediction (a sign of a wrong template or tokenizer).",
    )

    @property
    def enabled(self) -> bool:
        return self.method != "none"


class KDConfig(StrictModel):
    """A whole run."""

    algorithm: Literal["off_policy", "on_policy"] = Field(
        "off_policy", description="'off_policy': train on the dataset's responses; 'on_policy': on the student's "
        "own samples scored by the teacher (section on_policy).",
    )
    on_policy: OnPolicyConfig = OnPolicyConfig()
    cross_tokenizer: CrossTokenizerConfig = CrossTokenizerConfig()
    run: RunConfig = RunConfig()
    teacher: TeacherConfig
    student: StudentConfig
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig
    transport: TransportConfig = TransportConfig()
    teacher_cache: TeacherCacheConfig = TeacherCacheConfig()
    controller: ControllerConfig = ControllerConfig()
    ray: RayConfig = RayConfig()

    @property
    def run_dir(self) -> str:
        return self.run.output_dir.replace("{name}", self.run.name)

    @model_validator(mode="after")
    def _cross_tokenizer_supported(self):
        if not self.cross_tokenizer.enabled:
            return self
        method = self.cross_tokenizer.method
        if self.student.backend != "fsdp2":
            raise ValueError(
                f"cross_tokenizer.method={method} is not yet supported with student.backend=megatron (the aligned-row "
                "loss and the DSKD projector are wired into the FSDP2 student only): use student.backend=fsdp2"
            )
        if self.algorithm != "off_policy":
            raise ValueError(
                f"cross_tokenizer.method={method} is not yet supported with algorithm={self.algorithm} (rollouts "
                "would need re-tokenizing with the teacher's tokenizer): use algorithm=off_policy"
            )
        if self.student.model_path is None:
            raise ValueError(
                f"cross_tokenizer.method={method} needs a student with its own tokenizer (student.model_path); "
                "a student derived from teacher layers shares the teacher's tokenizer: set cross_tokenizer.method=none"
            )
        return self

    @model_validator(mode="after")
    def _on_policy_supported(self):
        if self.algorithm != "on_policy":
            return self
        if self.data.global_batch_size % self.on_policy.samples_per_prompt:
            raise ValueError(
                f"data.global_batch_size {self.data.global_batch_size} must be a multiple of "
                f"on_policy.samples_per_prompt {self.on_policy.samples_per_prompt} (rollouts per step)"
            )
        if self.controller.prefetch_steps:
            raise ValueError(
                "controller.prefetch_steps > 0 does not apply to algorithm=on_policy (a step's samples exist only "
                "once its rollouts are generated): use on_policy.max_staleness to overlap generation with training"
            )
        return self
