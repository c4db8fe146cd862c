"""Translation of the SFD authors' configs into ours.

Two inputs are understood: the authors' YAML files (sections ``data``, ``vae``,
``model``, ``train``, ``optimizer``, ``transport``, ``sample``; see
``reference/published_configs/``) and the keyword arguments of their model
constructor (the ``hparams`` of the reference file).
"""

from __future__ import annotations

import posixpath
from typing import Any, Mapping

from sfd_train.config.base import ConfigError
from sfd_train.models.sizes import MODEL_SIZES, parse_model_type

# DINOv2 variants used as REPA targets and their feature widths.
DINO_FEATURE_DIMS = {"vits14": 384, "vitb14": 768, "vitl14": 1024, "vitg14": 1536}

# Keys of the authors' YAML that describe evaluation or their file layout and have
# no counterpart in training or sampling here.
_IGNORED = {
    "data.fid_reference_file", "vae.model_name", "transport.loss_weight", "transport.sample_eps",
    "transport.train_eps", "sample.mode", "sample.reverse", "sample.likelihood", "sample.fid_num",
    "sample.balanced_sampling", "sample.autoguidance_config", "sample.autoguidance", "data.image_size",
    "vae.downsample_ratio", "train.output_dir", "train.exp_name", "model.model_type",
    "model.repa_dino_version", "data.latent_norm", "data.latent_sv_norm", "data.latent_multiplier",
    "transport.path_type", "transport.prediction", "transport.use_cosine_loss", "transport.use_lognorm",
    "model.in_chans", "model.semantic_chans", "model.semfirst_delta_t", "model.repa_feat_depth",
    "train.global_seed", "train.ckpt_every", "train.ckpt", "ckpt_path", "sample.cfg_scale",
    "sample.cfg_interval_start", "sample.sampling_method", "sample.num_sampling_steps",
    "sample.per_proc_batch_size", "data.data_path", "data.num_workers", "data.num_classes",
    "model.semantic_weight",
}

_DIRECT = {
    # authors' key -> our key, copied unchanged
    "model.use_qknorm": "model.use_qknorm",
    "model.use_swiglu": "model.use_swiglu",
    "model.use_rope": "model.use_rope",
    "model.use_rmsnorm": "model.use_rmsnorm",
    "model.wo_shift": "model.wo_shift",
    "model.use_repa": "model.use_repa",
    "model.repa_projector_dim": "model.repa_projector_dim",
    # The authors' trainer reads both from the model section (defaults 1.0 and "cos").
    "model.repa_weight": "objective.repa_weight",
    "model.repa_mode": "objective.repa_mode",
    "train.max_steps": "train.max_steps",
    "train.global_batch_size": "train.global_batch_size",
    "train.log_every": "train.log_every",
    "optimizer.lr": "optimizer.lr",
    "optimizer.beta1": "optimizer.beta1",
    "optimizer.beta2": "optimizer.beta2",
    "optimizer.weight_decay": "optimizer.weight_decay",
    "sample.atol": "sampler.atol",
    "sample.rtol": "sampler.rtol",
    "sample.timestep_shift": "sampler.timestep_shift",
}


def is_published_config(data: Mapping[str, Any]) -> bool:
    """True when ``data`` looks like one of the authors' YAML files."""
    model = data.get("model")
    return "transport" in data or (isinstance(model, Mapping) and "model_type" in model)


def dino_feature_dim(version: str) -> int:
    for tag, dim in DINO_FEATURE_DIMS.items():
        if tag in version:
            return dim
    raise ConfigError("model.repa_dino_version", f"unknown DINOv2 variant {version!r}; known: {', '.join(DINO_FEATURE_DIMS)}")


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def translate_published_config(data: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Turns an authors' YAML mapping into a mapping of our config.

    Args:
        data: the parsed YAML.

    Returns:
        ``(ours, notes)``: a nested mapping for :func:`sfd_train.config.loader.build_config`
        and human-readable notes on keys that were dropped.

    Raises:
        ConfigError: a key with no counterpart, or a value this system does not support
            (e.g. a path type other than Linear).
    """
    flat = _flatten(data)
    ours: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in flat.items():
        if key in _DIRECT:
            _set(ours, _DIRECT[key], value)
        elif key not in _IGNORED:
            raise ConfigError(key, "this key of the authors' config has no counterpart here")

    model = data.get("model", {}) or {}
    if "model_type" in model:
        size, patch = parse_model_type(str(model["model_type"]))
        _set(ours, "model.size", size)
        _set(ours, "model.patch_size", patch)
    for theirs, mine in (("in_chans", "in_channels"), ("semantic_chans", "semantic_channels"),
                         ("semfirst_delta_t", "delta_t"), ("repa_feat_depth", "repa_depth")):
        if theirs in model:
            _set(ours, f"model.{mine}", model[theirs])
    if "repa_dino_version" in model:
        _set(ours, "model.repa_feature_dim", dino_feature_dim(str(model["repa_dino_version"])))
    if "semantic_weight" in model:
        _set(ours, "objective.semantic_weight", model["semantic_weight"])

    data_sec = data.get("data", {}) or {}
    vae = data.get("vae", {}) or {}
    if "image_size" in data_sec:
        ratio = int(vae.get("downsample_ratio", 16))
        _set(ours, "model.input_size", int(data_sec["image_size"]) // ratio)
    if "num_classes" in data_sec:
        _set(ours, "model.num_classes", data_sec["num_classes"])
    if "num_workers" in data_sec:
        _set(ours, "data.num_workers", data_sec["num_workers"])
    if data_sec.get("data_path"):
        _set(ours, "data.path", data_sec["data_path"])
        notes.append(
            "data.data_path points at the published safetensors layout; convert it once with "
            "`sfd-data convert --from-published DIR --out SHARDS` and set data.path to SHARDS"
        )
    if float(data_sec.get("latent_multiplier", 1.0)) != 1.0:
        raise ConfigError("data.latent_multiplier", "only 1.0 is supported")
    norms = {data_sec.get("latent_norm", True), data_sec.get("latent_sv_norm", True)}
    if len(norms) > 1:
        raise ConfigError("data.latent_sv_norm", "texture and semantic normalisation must both be on or both off")
    _set(ours, "data.normalize", bool(norms.pop()))

    transport = data.get("transport", {}) or {}
    if transport.get("path_type", "Linear") != "Linear":
        raise ConfigError("transport.path_type", f"{transport['path_type']!r}: only Linear is supported")
    if transport.get("prediction", "velocity") != "velocity":
        raise ConfigError("transport.prediction", f"{transport['prediction']!r}: only velocity is supported")
    if "use_cosine_loss" in transport:
        _set(ours, "objective.cos_weight", 1.0 if transport["use_cosine_loss"] else 0.0)
    if "use_lognorm" in transport:
        _set(ours, "objective.time_sampling", "logit_normal" if transport["use_lognorm"] else "uniform")

    train = data.get("train", {}) or {}
    if "global_seed" in train:
        _set(ours, "train.seed", train["global_seed"])
    if "ckpt_every" in train:
        _set(ours, "checkpoint.every", train["ckpt_every"])
    if train.get("exp_name"):
        _set(ours, "run.name", str(train["exp_name"]))
        _set(ours, "run.output_dir", posixpath.join(str(train.get("output_dir", "outputs")), str(train["exp_name"])))
    start = train.get("ckpt") or data.get("ckpt_path")
    if start:
        _set(ours, "checkpoint.init_from", str(start))

    sample = data.get("sample", {}) or {}
    if "sampling_method" in sample:
        _set(ours, "sampler.method", str(sample["sampling_method"]).lower())
    if "num_sampling_steps" in sample:
        # The authors count grid points; we count steps between them.
        _set(ours, "sampler.num_steps", max(1, int(sample["num_sampling_steps"]) - 1))
    if "cfg_scale" in sample:
        _set(ours, "sampler.cfg_scale_sem", float(sample["cfg_scale"]))
        _set(ours, "sampler.cfg_scale_tex", float(sample["cfg_scale"]))
    if sample.get("cfg_interval_start"):
        _set(ours, "sampler.guidance_interval", [float(sample["cfg_interval_start"]), 1.0])
    if "per_proc_batch_size" in sample:
        _set(ours, "sampler.batch_size", sample["per_proc_batch_size"])
    if sample.get("autoguidance"):
        notes.append(
            "sample.autoguidance is on: set sampler.autoguidance_checkpoint to the guidance model's checkpoint "
            f"(the authors' file names it in {sample.get('autoguidance_config')!r})"
        )
    return ours, notes


_HPARAM_KEYS = {
    "input_size": "input_size", "patch_size": "patch_size", "in_channels": "in_channels",
    "hidden_size": "hidden_size", "depth": "depth", "num_heads": "num_heads", "mlp_ratio": "mlp_ratio",
    "class_dropout_prob": "class_dropout_prob", "num_classes": "num_classes", "use_qknorm": "use_qknorm",
    "use_swiglu": "use_swiglu", "use_rope": "use_rope", "use_rmsnorm": "use_rmsnorm", "wo_shift": "wo_shift",
    "use_repa": "use_repa", "repa_depth": "repa_depth", "repa_projector_dim": "repa_projector_dim",
    "semantic_chans": "semantic_channels", "semfirst_delta_t": "delta_t",
}


def model_mapping_from_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Turns the authors' model constructor arguments into our ``model`` section.

    Raises:
        ConfigError: an argument with no counterpart, or ``learn_sigma=True``.
    """
    model: dict[str, Any] = {}
    for key, value in hparams.items():
        if key in _HPARAM_KEYS:
            model[_HPARAM_KEYS[key]] = value
        elif key == "repa_dino_version":
            model["repa_feature_dim"] = dino_feature_dim(str(value))
        elif key == "learn_sigma":
            if value:
                raise ConfigError("learn_sigma", "learned variance is not part of SFD")
        elif key == "use_checkpoint":
            pass  # activation checkpointing is chosen by parallel.activation_checkpointing
        else:
            raise ConfigError(key, "this model argument has no counterpart here")
    dims = (model.get("depth"), model.get("hidden_size"), model.get("num_heads"))
    named = [name for name, size in MODEL_SIZES.items() if tuple(size) == dims and name != "XXL"]
    if named:
        model["size"] = named[0]
        for key in ("depth", "hidden_size", "num_heads"):
            model.pop(key)
    else:
        model["size"] = "custom"
    return model
