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
    """Longest sequence the model is meant for (RoPE needs no table, this is informational)."""
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


@dataclass
class ParallelConfig:
    """How the model and data are split across processes (all carried out by megatron-core)."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    cp: int = 1
    """Context-parallel size: each sequence split across ``cp`` ranks (megatron-core's context
    parallelism; needs Transformer Engine's attention). Only 1 is accepted so far: the training loop
    does not split sequences across cp ranks yet."""
    dp: Optional[int] = None
    """Data-parallel size; ``None`` takes whatever the world size leaves (world / (tp*pp*cp))."""
    vpp: Optional[int] = None
    """Virtual pipeline stages per pipeline rank (interleaved 1F1B); ``None`` or 1 disables."""
    sequence_parallel: bool = False
    """Shard layer-norm and dropout activations along the sequence across the TP group (needs tp > 1)."""
    distributed_optimizer: bool = True
    """Shard optimizer state and fp32 master weights across data-parallel ranks (ZeRO-1)."""


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
    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
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
    """Activation recomputation: ``none``, ``selective`` (attention core) or ``full`` (whole layers)."""
    log_interval: int = 1
    """Iterations between console/metrics lines."""
    eval_interval: int = 0
    """Iterations between validation passes; 0 disables."""
    eval_iterations: int = 2
    """Batches per validation pass."""


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
    """Microbatches per optimizer step on each data-parallel rank."""
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
