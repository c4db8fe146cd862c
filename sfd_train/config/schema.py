"""The configuration of an SFD job: one typed dataclass per section.

Every field has an attribute docstring; ``sfd-train --help-config`` prints them.
Defaults follow the published SFD recipe (DESIGN.md §1, §4) for LightningDiT-XL/1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from sfd_train.config.base import ConfigError
from sfd_train.data_pipeline.config import DataConfig
from sfd_train.kernels.config import KernelConfig
from sfd_train.launchers.config import LauncherConfig
from sfd_train.models.sizes import MODEL_SIZES


@dataclass
class ModelConfig:
    """The dual-timestep LightningDiT."""

    size: str = "XL"
    """Named size: S, B, L, XL, XXL (= 1p0B), 1p6B; or 'custom' to give depth, hidden_size and num_heads."""
    depth: int | None = None
    """Number of transformer blocks; overrides the named size when set."""
    hidden_size: int | None = None
    """Transformer width d; overrides the named size when set."""
    num_heads: int | None = None
    """Attention heads; overrides the named size when set."""
    patch_size: int = 1
    """Side of the square patch turned into one token (1 for 16x16 latents; 2 for the /2 variants)."""
    input_size: int = 16
    """Side of the latent in pixels of the latent grid (256px images with an f16 VAE: 16)."""
    in_channels: int = 48
    """Channels of the composite latent: texture channels first, semantic channels last."""
    semantic_channels: int = 16
    """How many of the last channels are the semantic latent (0 = a plain texture-only model)."""
    num_classes: int = 1000
    """Number of class labels; the label table has one more row for the null class."""
    mlp_ratio: float = 4.0
    """MLP hidden width over d (SwiGLU uses int(2/3 * mlp_ratio * d))."""
    class_dropout_prob: float = 0.1
    """Probability of replacing a label by the null class in training (for guidance)."""
    use_qknorm: bool = True
    """RMSNorm (LayerNorm without use_rmsnorm) on q and k over the head dimension."""
    use_swiglu: bool = True
    """SwiGLU MLP (w12, w3) instead of the GELU MLP (fc1, fc2)."""
    use_rope: bool = True
    """2-D rotary position embedding on q and k."""
    use_rmsnorm: bool = True
    """RMSNorm with a weight instead of LayerNorm without affine parameters."""
    wo_shift: bool = False
    """adaLN without the shift terms (4 modulation vectors per block instead of 6)."""
    use_repa: bool = True
    """Build the REPA projector and return its projection in training mode."""
    repa_depth: int = 2
    """Block (counted from 1) whose output feeds the REPA projector."""
    repa_projector_dim: int = 2048
    """Hidden width P of the REPA projector MLP."""
    repa_feature_dim: int = 768
    """Width of the REPA target features (DINOv2-B: 768)."""
    delta_t: float = 0.3
    """Semantic-first offset dt in [0, 1): semantics run ahead of texture by dt; 0 = synchronous model."""

    def dims(self) -> tuple[int, int, int]:
        """Returns ``(depth, hidden_size, num_heads)`` after applying the named size."""
        if self.size == "custom":
            preset = (None, None, None)
        else:
            preset = MODEL_SIZES[self.size]
        depth = self.depth if self.depth is not None else preset[0]
        hidden = self.hidden_size if self.hidden_size is not None else preset[1]
        heads = self.num_heads if self.num_heads is not None else preset[2]
        return depth, hidden, heads  # type: ignore[return-value]

    @property
    def texture_channels(self) -> int:
        return self.in_channels - self.semantic_channels

    @property
    def name(self) -> str:
        """A LightningDiT-style name such as ``XL/1`` (``custom-d3w96h6/1`` when free-form)."""
        depth, hidden, heads = self.dims()
        if self.size != "custom" and (depth, hidden, heads) == tuple(MODEL_SIZES[self.size]):
            return f"{self.size}/{self.patch_size}"
        return f"custom-d{depth}w{hidden}h{heads}/{self.patch_size}"

    def validate(self) -> None:
        if self.size != "custom" and self.size not in MODEL_SIZES:
            raise ConfigError(
                "size", f"unknown model size {self.size!r}; choose one of {', '.join(MODEL_SIZES)}, custom"
            )
        depth, hidden, heads = self.dims()
        for key, value in (("depth", depth), ("hidden_size", hidden), ("num_heads", heads)):
            if value is None:
                raise ConfigError(key, "required when size is 'custom'")
            if value < 1:
                raise ConfigError(key, f"must be positive, got {value}")
        if hidden % heads:
            raise ConfigError("hidden_size", f"{hidden} is not divisible by num_heads={heads}")
        if hidden % 4:
            raise ConfigError("hidden_size", f"{hidden} must be a multiple of 4 (2-D sin-cos position table)")
        if self.use_rope and (hidden // heads) % 4:
            raise ConfigError("num_heads", f"head dim {hidden // heads} must be a multiple of 4 for 2-D RoPE")
        if self.patch_size < 1 or self.input_size % self.patch_size:
            raise ConfigError("patch_size", f"{self.patch_size} must divide input_size={self.input_size}")
        if self.in_channels < 1:
            raise ConfigError("in_channels", f"must be positive, got {self.in_channels}")
        if not 0 <= self.semantic_channels < self.in_channels:
            raise ConfigError(
                "semantic_channels",
                f"{self.semantic_channels} must be in [0, in_channels) = [0, {self.in_channels}): "
                "the composite latent needs at least one texture channel",
            )
        if not 0.0 <= self.delta_t < 1.0:
            raise ConfigError("delta_t", f"{self.delta_t} is outside [0, 1)")
        if self.delta_t > 0 and self.semantic_channels == 0:
            raise ConfigError("delta_t", "a semantic-first offset needs semantic_channels > 0")
        if self.use_repa and not 1 <= self.repa_depth <= depth:
            raise ConfigError("repa_depth", f"{self.repa_depth} is outside [1, depth={depth}]")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ConfigError("class_dropout_prob", f"{self.class_dropout_prob} is outside [0, 1)")
        if self.num_classes < 1:
            raise ConfigError("num_classes", f"must be positive, got {self.num_classes}")

    def with_size(self, size: str) -> "ModelConfig":
        """The same model family at another named size (e.g. the autoguidance model)."""
        return replace(self, size=size, depth=None, hidden_size=None, num_heads=None)


@dataclass
class ObjectiveConfig:
    """The asynchronous flow-matching objective."""

    time_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    """Distribution of the global time tau: sigmoid of a normal, or uniform on [0, 1]."""
    logit_mean: float = 0.0
    """Mean of the normal behind the logit-normal time."""
    logit_std: float = 1.0
    """Standard deviation of the normal behind the logit-normal time."""
    semantic_weight: float = 2.0
    """Weight of the semantic channels in the squared error (texture channels weigh 1)."""
    cos_weight: float = 1.0
    """Weight of the cosine loss between predicted and target velocity (0 = off)."""
    repa_weight: float = 1.0
    """Weight of the REPA alignment loss (used when the model has a projector and the data has features)."""
    repa_mode: Literal["cos", "mse", "cos_mse"] = "cos"
    """REPA alignment: ``cos`` = mean over tokens of 1 - cosine (the paper's), ``mse`` = mean squared
    error against the raw DINOv2 features, ``cos_mse`` = the average of the two (the 80-epoch recipe)."""

    def validate(self) -> None:
        if self.logit_std <= 0:
            raise ConfigError("logit_std", f"must be positive, got {self.logit_std}")
        for key in ("semantic_weight", "cos_weight", "repa_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")


@dataclass
class SamplerConfig:
    """Three-phase sampling (semantics only, both, texture only) with guidance."""

    method: Literal["euler", "heun", "dopri5"] = "euler"
    """ODE solver: fixed-grid Euler or Heun, or adaptive dopri5 (torchdiffeq)."""
    num_steps: int = 250
    """Steps of the fixed grid over global time [0, 1 + dt] (grid of num_steps + 1 points)."""
    atol: float = 1e-6
    """Absolute tolerance of dopri5."""
    rtol: float = 1e-3
    """Relative tolerance of dopri5."""
    timestep_shift: float = 0.0
    """Timestep shift s > 0 warps normalised time u to u / (u + s (1 - u)); 0 = no shift."""
    cfg_scale_sem: float = 1.0
    """Guidance scale of the semantic velocity (1 = no guidance)."""
    cfg_scale_tex: float = 1.0
    """Guidance scale of the texture velocity (1 = no guidance)."""
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    """Each part is guided only while its own time lies in [low, high]."""
    autoguidance_checkpoint: str | None = None
    """Checkpoint of the guidance model; when set, it replaces the unconditional branch (autoguidance)."""
    autoguidance_size: str = "B"
    """Named size of the autoguidance model (same family and channels as the main model)."""
    batch_size: int = 16
    """Images per sampling batch."""
    seed: int = 0
    """Seed of the initial noise."""

    def validate(self) -> None:
        if self.num_steps < 1:
            raise ConfigError("num_steps", f"must be >= 1, got {self.num_steps}")
        if self.timestep_shift < 0:
            raise ConfigError("timestep_shift", f"must be >= 0, got {self.timestep_shift}")
        low, high = self.guidance_interval
        if not 0.0 <= low <= high <= 1.0:
            raise ConfigError("guidance_interval", f"{list(self.guidance_interval)} must satisfy 0 <= low <= high <= 1")
        if self.autoguidance_size not in MODEL_SIZES:
            raise ConfigError(
                "autoguidance_size", f"unknown model size {self.autoguidance_size!r}; choose one of {', '.join(MODEL_SIZES)}"
            )
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class OptimizerConfig:
    """AdamW."""

    lr: float = 1e-4
    """Peak learning rate."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    fused: Literal["auto", "on", "off"] = "auto"
    """Fused AdamW kernel: 'auto' uses it where the device supports it."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up over this many optimizer steps."""
    warmup_start: float = 0.0
    """Where the warm-up starts, as a fraction of lr (0: from 0; a task may default it otherwise)."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warm-up, down to min_lr_ratio * lr at train.max_steps."""
    decay_start: int = 0
    """Step at which the cosine/linear decay begins (0 = right after the warm-up); constant lr until then."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the cosine/linear schedule, as a fraction of lr."""

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError("lr", f"must be positive, got {self.lr}")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(key, f"{getattr(self, key)} is outside [0, 1)")
        if self.warmup_steps < 0:
            raise ConfigError("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("min_lr_ratio", f"{self.min_lr_ratio} is outside [0, 1]")
        if not 0.0 <= self.warmup_start <= 1.0:
            raise ConfigError("warmup_start", f"{self.warmup_start} is outside [0, 1]")
        if self.decay_start < 0:
            raise ConfigError("decay_start", f"must be >= 0, got {self.decay_start}")


@dataclass
class TrainConfig:
    """The training loop."""

    max_steps: int = 4_000_000
    """Optimizer steps to train for."""
    global_batch_size: int = 256
    """Images per optimizer step over all ranks: micro_batch_size x ranks x accumulation steps."""
    micro_batch_size: int | None = None
    """Images per rank per forward/backward; null = global_batch_size / ranks (no accumulation)."""
    seed: int = 0
    """Global seed; each rank derives its own from it."""
    mixed_precision: Literal["bf16", "fp32"] = "bf16"
    """Autocast dtype of the forward pass (parameters and optimizer state stay fp32)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 = no clipping (as published)."""
    ema_decay: float = 0.9999
    """Decay of the exponential moving average of the weights, updated every step."""
    log_every: int = 100
    """Print and log a progress line every this many steps."""
    sample_every: int = 10000
    """Save a PNG grid of EMA samples every this many steps (0 = never)."""
    sample_steps: int = 50
    """Euler steps used for the periodic sample grids."""
    loss_spike_factor: float = 0.0
    """Stop when the loss exceeds this factor times its running mean (0 = only stop on NaN/inf)."""

    def validate(self) -> None:
        if self.max_steps < 1:
            raise ConfigError("max_steps", f"must be >= 1, got {self.max_steps}")
        if self.global_batch_size < 1:
            raise ConfigError("global_batch_size", f"must be >= 1, got {self.global_batch_size}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError("micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("ema_decay", f"{self.ema_decay} is outside [0, 1)")
        if self.grad_clip < 0:
            raise ConfigError("grad_clip", f"must be >= 0, got {self.grad_clip}")
        if self.log_every < 1:
            raise ConfigError("log_every", f"must be >= 1, got {self.log_every}")

    def accumulation_steps(self, world_size: int) -> int:
        """Gradient-accumulation steps for ``world_size`` ranks.

        Raises:
            ConfigError: the global batch is not micro batch x ranks x an integer.
        """
        micro = self.micro_batch_size
        if micro is None:
            if self.global_batch_size % world_size:
                raise ConfigError(
                    "train.global_batch_size",
                    f"{self.global_batch_size} is not divisible by the {world_size} ranks",
                )
            return 1
        if self.global_batch_size % (micro * world_size):
            raise ConfigError(
                "train.global_batch_size",
                f"{self.global_batch_size} is not divisible by train.micro_batch_size ({micro}) x ranks ({world_size})",
            )
        return self.global_batch_size // (micro * world_size)

    def per_rank_batch(self, world_size: int) -> int:
        return self.global_batch_size // (world_size * self.accumulation_steps(world_size))


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
"""torch.compile modes that capture and replay CUDA graphs."""


@dataclass
class ParallelConfig:
    """How the model is spread over ranks. Applied after the model is built:
    activation checkpointing, then compile, then sharding."""

    strategy: Literal["ddp", "fsdp2", "zero1", "zero2", "zero3"] = "fsdp2"
    """Data parallelism: DDP, FSDP2 (per-block fully_shard) or DeepSpeed ZeRO stage 1/2/3."""
    reshard_after_forward: bool = True
    """FSDP2: free the gathered parameters of each block after its forward (ZeRO-3 style)."""
    param_dtype: Literal["bf16", "fp32"] = "bf16"
    """FSDP2/ZeRO: dtype of the gathered parameters used in compute."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """FSDP2/ZeRO: dtype of the gradient reduction."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward to save memory."""
    compile: bool = False
    """torch.compile the model (what is compiled: compile_scope)."""
    compile_scope: Literal["blocks", "step"] = "blocks"
    """'blocks': each block is its own graph (torchtitan's way; every strategy). 'step': the whole loss computation (embedders, blocks, final layer, loss terms) is one graph, so Inductor fuses across block boundaries and the eager elementwise work of the objective disappears (ddp, fsdp2; FSDP2's hooks still split it per block)."""
    compile_mode: Literal["default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"] = "default"
    """torch.compile mode. 'reduce-overhead' and 'max-autotune' replay CUDA graphs, which need the parameters at fixed addresses: ddp on one device only."""
    compile_backend: str = "inductor"
    """torch.compile backend ('inductor'; 'aot_eager' compiles fast and is what the CPU tests use)."""
    backend: Literal["auto", "nccl", "gloo", "hccl"] = "auto"
    """Collective backend; 'auto' picks it from the installed stack (CUDA: nccl, Ascend: hccl, CPU: gloo)."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Expert keys merged last into the generated DeepSpeed JSON config."""
    dp_replicate: int = 1
    """Replica groups of hybrid sharding: parameters are sharded inside a group of dp_shard ranks (typically a node) and replicated across groups, so the per-layer parameter gathers stay inside a group. fsdp2: HSDP (gradients are reduce-scattered in the group, all-reduced across groups). zero3: ZeRO++ hpZ (optimizer state and gradients stay sharded over all ranks; a secondary copy of the parameters is sharded over dp_shard ranks). 1 = one flat group."""
    dp_shard: int = -1
    """Ranks that shard the parameters inside each replica group; -1 = the world size / (dp_replicate * tp)."""
    tp: int = 1
    """Tensor-parallel degree inside a sample (attention heads and the MLP); 1 = none."""
    collective_timeout: str = "5m"
    """How long a collective waits for the other ranks before the job fails, naming the ranks that stopped answering (e.g. 5m, 300s, 0:10:00). Raise it if ranks legitimately wait longer for each other (very slow checkpoint storage)."""

    def validate(self) -> None:
        for key in ("dp_replicate", "tp"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.dp_shard != -1 and self.dp_shard < 1:
            raise ConfigError("dp_shard", f"must be >= 1, or -1 for the rest of the world size; got {self.dp_shard}")
        if (self.dp_replicate > 1 or self.dp_shard != -1) and self.strategy not in ("fsdp2", "zero3"):
            raise ConfigError(
                "dp_replicate",
                f"a 2-D data-parallel mesh needs strategy fsdp2 (HSDP) or zero3 (ZeRO++ hpZ), not {self.strategy}",
            )
        if self.tp > 1 and self.strategy != "fsdp2":
            raise ConfigError("tp", f"tensor parallel composes with strategy fsdp2, not {self.strategy}")
        if self.tp > 1 and self.compile:
            raise ConfigError("tp", "tensor parallel runs eager: set parallel.compile=false (not tried with compile)")
        try:
            if parse_duration(self.collective_timeout) <= 0:
                raise ValueError(f"{self.collective_timeout!r} is not a positive duration")
        except ValueError as err:
            raise ConfigError("collective_timeout", str(err)) from None
        if not self.compile:
            return
        if self.compile_scope == "step" and self.strategy.startswith("zero"):
            raise ConfigError(
                "compile_scope",
                f"'step' works with ddp and fsdp2; DeepSpeed's engine ({self.strategy}) wraps the forward in its "
                "own hooks: use 'blocks'",
            )
        if self.compile_mode != "default" and self.compile_backend != "inductor":
            raise ConfigError(
                "compile_mode", f"{self.compile_mode!r} is an Inductor mode; compile_backend is {self.compile_backend!r}"
            )
        if self.compile_mode in CUDA_GRAPH_MODES and self.strategy != "ddp":
            raise ConfigError(
                "compile_mode",
                f"{self.compile_mode!r} replays CUDA graphs, which need every parameter at a fixed address; "
                f"{self.strategy} gathers and frees them each step: use 'default' or "
                "'max-autotune-no-cudagraphs', or parallel.strategy=ddp",
            )

    def mesh_shape(self, world_size: int) -> tuple[int, int, int]:
        """``(dp_replicate, dp_shard, tp)`` for ``world_size`` ranks, ``dp_shard = -1`` resolved.

        Raises:
            ConfigError: the three degrees do not multiply to the world size.
        """
        fixed = self.dp_replicate * self.tp
        shard = self.dp_shard if self.dp_shard != -1 else world_size // fixed
        if shard < 1 or self.dp_replicate * shard * self.tp != world_size:
            wanted = f"dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard if self.dp_shard != -1 else '-1 (the rest)'} x tp {self.tp}"
            raise ConfigError("parallel.dp_replicate", f"{wanted} does not make the {world_size} ranks of this job")
        return self.dp_replicate, shard, self.tp

    def data_world(self, world_size: int) -> int:
        """How many ranks read different samples: the ranks of a TP group share theirs."""
        return world_size // self.mesh_shape(world_size)[2]

    def data_rank(self, rank: int, world_size: int) -> int:
        """This rank's place among the :meth:`data_world` ranks (TP groups are consecutive ranks)."""
        return rank // self.mesh_shape(world_size)[2]

    def check_world_size(self, world_size: int) -> None:
        """The checks that depend on how many ranks run the job."""
        self.mesh_shape(world_size)
        if self.compile and self.compile_mode in CUDA_GRAPH_MODES and world_size > 1:
            raise ConfigError(
                "parallel.compile_mode",
                f"{self.compile_mode!r} (CUDA graphs) is supported on one device; this job has {world_size} ranks, "
                "whose gradient all-reduce runs outside the graphs: use 'default' or 'max-autotune-no-cudagraphs'",
            )


@dataclass
class CheckpointConfig:
    """Checkpoints with torch.distributed.checkpoint."""

    every: int = 10000
    """Save every this many steps (0 = only at the end and on preemption)."""
    keep: int = 3
    """Keep the newest this many complete checkpoints."""
    async_save: bool = True
    """Save in the background; the loop waits only for the copy to host memory."""
    resume: Literal["auto", "never"] = "auto"
    """'auto' resumes from the newest complete checkpoint in run.output_dir."""
    init_from: str | None = None
    """A published checkpoint (.pt with 'model'/'ema') or one of ours to start from (fine-tuning)."""

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError("every", f"must be >= 0, got {self.every}")
        if self.keep < 1:
            raise ConfigError("keep", f"must be >= 1, got {self.keep}")


_DURATION = re.compile(r"^(?:(\d+):)?(\d+):(\d+)$|^(\d+(?:\.\d+)?)([smhd])$")


def parse_duration(text: str) -> float:
    """Seconds in ``HH:MM:SS``, ``MM:SS`` or ``<number><s|m|h|d>``; raises ValueError otherwise."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 3:50:00, 230m or 4h")
    if match.group(4) is not None:
        return float(match.group(4)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(5)]
    hours = int(match.group(1) or 0)
    return hours * 3600 + int(match.group(2)) * 60 + int(match.group(3))


@dataclass
class RunConfig:
    """Where a run lives and how it reports."""

    output_dir: str = "outputs/run"
    """Folder of this run: checkpoints, samples, logs, the saved config."""
    name: str = "sfd"
    """Run name shown in logs and Weights & Biases."""
    time_limit: str = ""
    """Checkpoint and exit with the requeue code after this much wall time (e.g. 3:50:00, 230m); '' = none."""
    device: Literal["auto", "cpu", "cuda", "npu"] = "auto"
    """Device type; 'auto' takes the accelerator the installed stack has, else the CPU."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """Weights & Biases mode; online needs WANDB_API_KEY in the environment or a prior `wandb login`."""
    wandb_project: str = "sfd-train"
    """Weights & Biases project."""

    def validate(self) -> None:
        from sfd_train.data_pipeline.storage import url_output_error  # noqa: PLC0415 - keeps importing the schema light

        problem = url_output_error(self.output_dir)
        if problem:
            raise ConfigError("output_dir", problem)
        if self.time_limit:
            try:
                parse_duration(self.time_limit)
            except ValueError as err:
                raise ConfigError("time_limit", str(err)) from None


@dataclass
class EvalConfig:
    """Evaluation during training: EMA samples scored like ADM's evaluator, and a validation loss."""

    every: int = 0
    """Evaluate every this many steps, and at the end (0 = never)."""
    num_samples: int = 1000
    """EMA samples per evaluation (labels balanced over classes; the same noise every time)."""
    sampling_steps: int = 50
    """Steps of sampler.method for these samples (guidance and the rest as in the sampler section)."""
    batch_size: int = 64
    """Samples per sampling batch on each rank."""
    seed: int = 0
    """Seed of the samples' noise."""
    reference: str = ""
    """ADM reference batch (.npz with arr_0, or mu/sigma) for Inception FID; '' = the synthetic set's own metric when training on it, else no sample metrics."""
    inception: str = ""
    """Inception weights file (torch-fidelity's pt_inception-2015-12-05); '' = $SFD_INCEPTION_WEIGHTS."""
    vae: str = ""
    """Texture VAE weights that decode the samples (real models; the synthetic set has its own decoder)."""
    val_data: str = ""
    """Held-out latents for the validation loss: a dataset folder or URL; '' = the synthetic validation set when training on the synthetic set, else none."""
    val_samples: int = 256
    """Held-out samples in the validation loss (each at 5 fixed times with fixed noise)."""

    def validate(self) -> None:
        for key in ("every", "num_samples", "sampling_steps", "batch_size", "val_samples"):
            if getattr(self, key) < (0 if key == "every" else 1):
                raise ConfigError(key, f"must be >= {0 if key == 'every' else 1}, got {getattr(self, key)}")


@dataclass
class Config:
    """An SFD job."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """The training objective."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """Sampling (periodic grids, sfd-sample)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation during training."""
    data: DataConfig = field(default_factory=DataConfig)
    """The composite-latent shards."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW and its schedule."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallelism."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resumption."""
    run: RunConfig = field(default_factory=RunConfig)
    """Output folder, time limit, logging."""
    kernels: KernelConfig = field(default_factory=KernelConfig)
    """Fused kernel choices."""
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    """Cluster settings used by sfd-launch."""
