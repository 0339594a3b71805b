"""The typed configuration tree of a flagscale run.

One dataclass per concern; every field carries a docstring (the string literal under it). The YAML
file mirrors this tree (``model.hidden_size``, ``parallel.tp``...). Values that follow from others
(padded vocabulary, data-parallel size, microbatches per step) are computed by :class:`Layout`,
never stored twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from flagscale.config.parallel_dims import ParallelDims


@dataclass
class ModelConfig:
    """Architecture of a dense RMSNorm/SwiGLU/RoPE decoder of one model family."""

    preset: Optional[str] = None
    """Named architecture (see ``flagscale.config.presets``); explicit fields below override it."""
    family: str = "llama"
    """Model family (``llama``, ``mistral``, ``qwen2``; see ``flagscale.models``): which Hugging
    Face architecture it converts to and which of the options below it allows."""
    num_layers: int = 0
    """Number of transformer layers."""
    hidden_size: int = 0
    """Model (residual stream) width."""
    num_attention_heads: int = 0
    """Query heads per layer."""
    num_query_groups: Optional[int] = None
    """Key/value heads (grouped-query attention); ``None`` means one per query head."""
    ffn_hidden_size: int = 0
    """Inner width of the SwiGLU MLP (size of gate and of up projection each)."""
    vocab_size: int = 0
    """True vocabulary size of the tokenizer; the embedding is padded above it (see Layout)."""
    max_position_embeddings: int = 4096
    """Longest sequence the model is meant for; ``train.seq_length`` may not exceed it (RoPE
    needs no table, so raising it is how a run extends the context on purpose)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling_factor: Optional[float] = None
    """Llama-3.1 (``rope_type: llama3``) frequency scaling factor; ``None`` disables scaling."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    qkv_bias: bool = False
    """Add a bias to the query, key and value projections (Qwen2; the other projections never
    have one)."""
    tie_word_embeddings: bool = False
    """Share one matrix between the input embedding and the output layer (Qwen2's small sizes)."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    params_dtype: str = "fp32"
    """Training precision: ``fp32``, or ``bf16`` (bf16 weights and activations, fp32 master weights)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this times ``parallel.tp`` (Megatron's convention)."""
    fp8: Optional[str] = None
    """FP8 matrix multiplies through Transformer Engine: ``hybrid`` (E4M3 forward, E5M2 gradients,
    what Megatron-LM and NeMo train with) or ``e4m3``; ``None`` trains in ``params_dtype`` only.
    Needs Transformer Engine on the cuda platform and ``params_dtype: bf16``."""
    fp8_recipe: str = "tensorwise"
    """FP8 scaling (megatron-core ``fp8_recipe``): ``tensorwise`` (current per-tensor scaling) or
    ``delayed`` (scales from an amax history)."""


@dataclass
class ParallelConfig:
    """How the model and data are split across processes (all carried out by megatron-core)."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    cp: int = 1
    """Context-parallel size: each sequence split across ``cp`` ranks (megatron-core's context
    parallelism, for long contexts). Needs Transformer Engine's attention (cuda platform) and
    ``train.seq_length`` divisible by ``2 * cp * tp``."""
    dp: Optional[int] = None
    """Data-parallel size; ``None`` takes whatever the world size leaves (world / (tp*pp*cp))."""
    vpp: Optional[int] = None
    """Virtual pipeline stages per pipeline rank (interleaved 1F1B); ``None`` or 1 disables."""
    sequence_parallel: bool = False
    """Shard layer-norm and dropout activations along the sequence across the TP group (needs tp > 1)."""
    distributed_optimizer: bool = True
    """Shard optimizer state and fp32 master weights across data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: Optional[bool] = None
    """Overlap the data-parallel gradient reduction with the backward pass (megatron-core DDP
    buckets reduced as soon as they are complete). ``None``: on for the cuda platform, off on
    cpu."""
    overlap_param_gather: Optional[bool] = None
    """Overlap the distributed optimizer's parameter all-gather with the next forward pass.
    ``None``: on for the cuda platform with ``distributed_optimizer``, off otherwise."""
    align_param_gather: Optional[bool] = None
    """With ``overlap_param_gather`` and virtual pipeline stages, start every chunk's parameter
    all-gather together at the first forward (fewer, aligned collectives). ``None``: on exactly
    then."""
    ddp_bucket_size: Optional[int] = None
    """Parameters per data-parallel communication bucket; ``None`` is megatron-core's default
    (``max(40M, 1M * dp)``)."""
    grad_reduce_dtype: str = "fp32"
    """Precision of the gradient buffer and its data-parallel reduction: ``fp32`` (default) or
    ``bf16`` (half the communication volume of a bf16 run, less precise sums)."""
    tp_comm_overlap: bool = False
    """Overlap tensor-parallel communication with the GEMMs (Transformer Engine userbuffers);
    needs Transformer Engine, ``tp > 1`` and ``sequence_parallel``."""
    overlap_p2p_comm: Optional[bool] = None
    """Overlap pipeline send/receive with compute in the interleaved schedule (needs ``vpp``).
    ``None``: on for the cuda platform with ``vpp``, off otherwise."""
    num_layers_in_first_pipeline_stage: Optional[int] = None
    """Uneven pipeline split: layers of the first stage (the rest split evenly over the others);
    ``None`` splits evenly."""
    num_layers_in_last_pipeline_stage: Optional[int] = None
    """Uneven pipeline split: layers of the last stage; ``None`` splits evenly."""
    account_for_embedding_in_pipeline_split: bool = False
    """Count the input embedding as one layer when splitting layers over pipeline stages (the
    first stage gets one layer fewer): ``(num_layers + 1)`` must split evenly."""
    account_for_loss_in_pipeline_split: bool = False
    """Count the output layer and loss as one layer when splitting (the last stage gets one layer
    fewer)."""
    cp_comm_type: str = "p2p"
    """Context-parallel attention communication (megatron-core ``cp_comm_type``): ``p2p`` (ring),
    ``all_gather``, ``a2a`` or ``a2a+p2p``."""


@dataclass
class TrainConfig:
    """The optimisation loop."""

    micro_batch_size: int = 1
    """Sequences per microbatch on each data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step across all data-parallel ranks."""
    seq_length: int = 128
    """Tokens per training sequence."""
    iterations: int = 10
    """Optimizer steps to run (a resumed run stops at the same total)."""
    stop_iteration: Optional[int] = None
    """Stop after this iteration (saving a checkpoint if saving is on) while the LR schedule still
    follows ``iterations``: for time-limited allocations; resume with ``checkpoint.load=auto``."""
    seed: int = 1234
    """Seed of weight initialisation, dropout and data shuffling."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: Optional[float] = None
    """Learning rate at the end of the decay; ``None`` means ``lr / 10`` (so lowering ``lr`` alone
    never leaves the floor above the peak)."""
    warmup_iterations: int = 0
    """Linear warmup steps from 0 to ``lr``."""
    lr_decay_iterations: Optional[int] = None
    """Steps over which the rate decays to ``min_lr``; ``None`` means ``iterations``."""
    lr_decay_style: str = "cosine"
    """``cosine``, ``linear`` or ``constant``."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norms)."""
    adam_beta1: float = 0.9
    """AdamW first-moment decay."""
    adam_beta2: float = 0.95
    """AdamW second-moment decay."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    recompute: str = "none"
    """Activation recomputation: ``none``, ``selective`` (the modules of ``recompute_modules``) or
    ``full`` (whole layers, see ``recompute_method``)."""
    log_interval: int = 1
    """Iterations between console/metrics lines."""
    eval_interval: int = 0
    """Iterations between validation passes; 0 disables."""
    eval_iterations: int = 2
    """Batches per validation pass."""
    recompute_method: str = "uniform"
    """With ``recompute: full``: ``uniform`` checkpoints every layer in groups of
    ``recompute_num_layers``; ``block`` recomputes only the first ``recompute_num_layers`` layers of
    each pipeline stage (virtual stage with ``vpp``) and stores the rest."""
    recompute_num_layers: Optional[int] = None
    """With ``recompute: full``: layers per checkpoint (``uniform``, default 1) or layers recomputed
    per stage (``block``, default all)."""
    recompute_modules: Optional[list] = None
    """With ``recompute: selective``: megatron-core modules recomputed in the backward pass,
    among ``core_attn``, ``layernorm``, ``mlp``; ``None`` is ``[core_attn]`` (which saves
    nothing with flash attention: prefer ``[layernorm, mlp]`` there)."""
    manual_gc_interval: Optional[int] = None
    """Disable Python's automatic garbage collection and collect every this many steps on every
    rank at once (a collection on one rank stalls every collective); 0 keeps automatic GC.
    ``None``: 100 on the cuda platform, 0 on cpu."""
    check_for_nan_in_grad: bool = False
    """Stop with an error naming the rank when a gradient is NaN or infinite (megatron-core DDP's
    check, Megatron-LM's default). Off by default because flagscale never applies such a step
    anyway (the optimizer drops it) and ``trace.on_spike`` then reports, skips or rewinds past
    its batch, which a stopped run cannot."""
    rampup_batch_size: Optional[list] = None
    """Batch-size ramp-up ``[start, increment, samples]`` (Megatron-LM's ``--rampup-batch-size``,
    run by megatron-core's microbatch calculator): the global batch starts at ``start`` sequences
    and grows by ``increment`` in equal steps over the first ``samples`` samples until it reaches
    ``global_batch_size``; ``null`` (default) trains at the full batch from the first step.
    ``start`` and ``increment`` must be multiples of ``micro_batch_size * dp``. Iterations stay
    optimizer steps (ramp steps are smaller); the LR schedule then counts samples, so
    ``warmup_iterations`` and ``lr_decay_iterations`` still end at those iterations."""

    @property
    def final_lr(self) -> float:
        """The rate the decay ends at: ``min_lr``, or ``lr / 10`` when it is unset."""
        return self.lr / 10 if self.min_lr is None else self.min_lr


@dataclass
class DataConfig:
    """Training data: megatron-core indexed datasets produced by ``flagscale preprocess``."""

    paths: list = field(default_factory=list)
    """Dataset prefixes (``PREFIX.bin``/``.idx``), optionally weighted: ``[0.7, a, 0.3, b]``."""
    tokenizer: Optional[str] = None
    """Tokenizer: a sentencepiece ``.model`` file, a HF ``tokenizer.json`` or a directory holding one."""
    split: str = "98,2,0"
    """Train/valid/test proportions of each dataset's documents."""
    skip_iterations: list = field(default_factory=list)
    """1-based iterations whose global batch is never trained on: that iteration and every later
    one read the next unused batch. For resuming past batches that made the loss spike (see
    ``flagscale trace``)."""


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    save_interval: int = 0
    """Iterations between saves; 0 disables saving."""
    load: Optional[str] = None
    """Checkpoint directory to start from, ``auto`` for the newest complete one of this run, or none."""
    save_final: bool = True
    """Also save after the last iteration (when saving is enabled)."""
    keep_last: Optional[int] = None
    """Keep only this many newest checkpoints; ``None`` keeps all."""
    async_save: bool = False
    """Write checkpoints in the background: each save's tensors are copied to host memory and
    written by a separate process while training goes on; the checkpoint gets its final name and
    ``latest`` moves once every rank has finished writing (checked at each following step, and
    waited for at the end of the run or before the next save)."""


@dataclass
class MetricsConfig:
    """Throughput accounting and loggers."""

    device: Optional[str] = None
    """Device name used to look up peak FLOP/s; ``None`` detects it."""
    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s per device; overrides the built-in table."""
    wandb: bool = False
    """Log to Weights & Biases (offline unless ``WANDB_API_KEY`` is set)."""
    wandb_project: str = "flagscale"
    """W&B project name."""
    tensorboard: bool = False
    """Also write TensorBoard event files under ``run.dir/tensorboard``."""


@dataclass
class TraceConfig:
    """Automatic trace reports: which documents a loss spike or a non-finite loss came from."""

    enabled: bool = True
    """Watch every step's per-sample losses (one all-reduce of ``global_batch_size`` numbers per
    step) and write ``run.dir/traces/iter_XXXXXXX.jsonl`` when the loss spikes or is not finite."""
    spike_factor: float = 1.5
    """A step whose loss exceeds this factor times the median of the last ``window`` losses is a
    spike."""
    window: int = 50
    """Recent finite losses whose median is the spike reference; no spike is reported before the
    window is full (after a resume it fills again)."""
    on_nan: bool = True
    """Also report steps whose loss or gradient norm is NaN or infinite."""
    text_chars: int = 200
    """Decoded text of each document span is cut to this many characters in trace records; 0
    leaves the text out (fastest)."""
    max_reports: int = 10
    """Reports one training process writes at most (a diverged run would otherwise write one per
    step)."""
    on_spike: str = "report"
    """What a reported step does to the run: ``report`` (write the report and train on),
    ``skip`` (a non-finite step is retried on the next batch, its batch joining the skipped ones;
    a finite spike is only reported, its update already applied) or ``rewind`` (reload the newest
    complete checkpoint in the same processes, skip the step's batch, and train on). The skipped
    batches are saved in every checkpoint, so a resumed run keeps skipping them. A non-finite
    gradient never reaches the weights in any mode."""
    max_rewinds: int = 3
    """Rewinds (``rewind``) or skips (``skip``) a run makes at most; one more stops it with an
    error. The train dataset is sized up front for that many skipped batches, so a rewind never
    changes the data order."""
    rewind_skip_around: int = 0
    """With ``rewind``, also skip this many batches before and after the spiking one (those not
    trained on before the checkpoint it rewinds to)."""


@dataclass
class RunConfig:
    """Where a run writes."""

    dir: str = "runs/default"
    """Everything a run writes goes under this directory."""
    name: Optional[str] = None
    """Human-readable run name (loggers); defaults to the directory name."""
    allow_config_change: bool = False
    """Let ``checkpoint.load=auto`` resume a checkpoint trained with a config that differs in
    keys a resume normally may not change (lr, model, data, seed...); the earlier config is kept
    as ``config.<iteration>.yaml``. Without it such a resume is refused, naming the keys."""


@dataclass
class LaunchConfig:
    """Batch-system settings of ``flagscale launch``."""

    signal_seconds: int = 300
    """Seconds before the Slurm time limit at which the job is sent SIGUSR1 (``#SBATCH
    --signal=B:USR1@N``): the run saves after its current step and the job requeues itself. Give
    it at least one step plus one checkpoint save; 0 turns the warning off."""


@dataclass
class Config:
    """A complete flagscale run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation loop."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Throughput accounting and loggers."""
    trace: TraceConfig = field(default_factory=TraceConfig)
    """Automatic trace reports of loss spikes."""
    run: RunConfig = field(default_factory=RunConfig)
    """Output location."""
    platform: str = "auto"
    """``auto`` (cuda when a GPU is visible, else cpu), ``cuda`` or ``cpu``."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """How ``flagscale launch`` submits the run."""


@dataclass(frozen=True)
class Layout:
    """What :func:`flagscale.config.validate` derives from a config and a world size: the parallel
    degrees (:class:`ParallelDims`) and the values that follow from them and the run."""

    dims: ParallelDims
    """Parallel degrees; ``tp``, ``pp``, ``cp``, ``dp``, ``vpp`` and ``world_size`` read them."""
    num_microbatches: int
    """Microbatches per optimizer step on each data-parallel rank at the full global batch (a
    ``train.rampup_batch_size`` step has fewer: ``flagscale.data.datasets.BatchSchedule``)."""
    padded_vocab_size: int
    """Embedding rows: the vocabulary padded to a multiple of make_vocab_size_divisible_by * tp."""
    kv_channels: int
    """Width of one attention head."""
    num_query_groups: int
    """Key/value heads (the query heads when attention is not grouped)."""

    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def pp(self) -> int:
        return self.dims.pp

    @property
    def cp(self) -> int:
        return self.dims.cp

    @property
    def dp(self) -> int:
        return self.dims.dp

    @property
    def vpp(self) -> Optional[int]:
        return self.dims.vpp

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    def describe(self) -> str:
        return (f"world={self.world_size} {self.dims.describe()} "
                f"microbatches/step={self.num_microbatches}")
