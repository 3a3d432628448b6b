"""Installs vit_jax. Extras: test, torch, tf, gpu."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.7",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "tensorflow-datasets>=4.9.7",
    "grain>=0.2.10",
    "array-record>=0.7",
    "ml-collections>=1.0",
    "numpy>=1.26",
    "scipy>=1.11",
    "pillow>=10",
    "scikit-learn>=1.4",
    "threadpoolctl>=3.1",
    "matplotlib>=3.8",
    "tensorboardX>=2.6",
    "tqdm>=4.66",
    "absl-py>=2.0",
]

TORCH = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "timm>=1.0.16",  # local-dir: model directories
    "transformers>=4.57",
    "safetensors>=0.4",
]

EXTRAS = {
    "torch": TORCH,
    "test": ["pytest>=8", "portpicker>=1.6"] + TORCH,
    "tf": ["tensorflow>=2.16"],
    "gpu": ["jax[cuda13]"],
}

setup(
    name="vit_jax",
    version="0.1.0",
    description="Vision Transformers in JAX/Flax: train, few-shot evaluate, convert to PyTorch.",
    packages=find_packages(include=["vit_jax", "vit_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
