"""Bytes the loader reads per training image: the data side of a plan."""

from __future__ import annotations

from dataclasses import dataclass

from sfd_train.config import Config


@dataclass(frozen=True)
class DataBytes:
    """Bytes read per image and what the figure rests on."""

    bytes_per_image: float
    source: str
    """``manifest <path>`` when the dataset's manifest was read, else the config's shapes."""
    dino_storage: str
    """How the REPA features are stored (``float16``, ``bfloat16``, ``int8``, or ``none``)."""


def data_bytes_per_image(config: Config, dino_storage: str | None = None) -> DataBytes:
    """What one training image costs the reader, in bytes.

    From the dataset's manifest when ``data.path`` holds one that can be read from here (its
    fields, storage dtypes and feature storage), else from the config's shapes: the latents and
    their flips in float16, the DINOv2 features in float16 when the model uses REPA. The count
    is the reader's own (:func:`sfd_train.data_pipeline.reader.bytes_per_image`: the latent block
    of every sample, one feature variant, and the gaps bridged when reading from object storage).

    Args:
        config: the job config.
        dino_storage: plan with the features stored this way (``float16``, ``int8``) instead of
            what the data or the config say; the data's other fields then come from the config.
    """
    from sfd_train.data_pipeline.errors import DataError
    from sfd_train.data_pipeline.format import FEATURES, SampleLayout
    from sfd_train.data_pipeline.manifest import read_manifest
    from sfd_train.data_pipeline.order import DEFAULT_CHUNK_SIZE
    from sfd_train.data_pipeline.reader import bytes_per_image

    data, model = config.data, config.model
    path = data.path
    remote = "://" in path
    layout, source = None, "the config's shapes (float16 latents and features)"
    if dino_storage is None and path and path != "synthetic":
        try:
            manifest = read_manifest(path, dict(data.storage_options))
            layout, source = manifest.layout, f"manifest {path}"
        except (DataError, OSError, ValueError):
            pass  # not reachable from here (a cluster path, no credentials): the config's shapes
    if layout is None:
        features = model.repa_feature_dim if model.use_repa else None
        storage = dino_storage if dino_storage and dino_storage != "float16" else None
        layout = SampleLayout.for_sizes(model.texture_channels, model.semantic_channels, model.input_size, features,
                                        storage_dtype="float16", dino_storage=storage)
    use_features = bool(model.use_repa and data.use_repa_features and config.objective.repa_weight > 0)
    stored = layout.dino_storage if FEATURES in layout.members else "none"
    run = data.chunk_size or DEFAULT_CHUNK_SIZE
    count = bytes_per_image(layout, use_features=use_features, use_flip=data.use_flip, remote=remote, run_length=run)
    return DataBytes(count, source, stored)
