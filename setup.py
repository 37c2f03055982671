"""jfe-jax: one-tower multimodal retrieval (JFE) in JAX/Flax for TPUs."""

from setuptools import find_packages, setup

# Pinned to the versions this project is tested with (see docs/dependencies.md).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml_collections==1.1.0",
    "scann==1.4.2",
    "tensorflow-datasets==4.9.10",
    "array_record==0.8.6",
    "grain==0.2.18",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "ml_dtypes>=0.5",
    "numpy>=2.0",
    "pillow>=11",
    "tqdm>=4.66",
    "matplotlib>=3.9",
    "tensorboardX==2.6.5",
    "absl-py>=2.1",
]

EXTRAS_REQUIRE = {
    # The PyTorch reference used by the parity tests. torch is pinned exactly: any other
    # spec pulls the CUDA build.
    "test": [
        "torch==2.13.0",
        "pytest>=8",
        "pytest-xdist==3.8.0",
        "ruff==0.17.5",
        "faiss-cpu==1.15.1",
        "nbclient>=0.10",
        "nbformat>=5.10",
        "ipykernel>=6.29",
    ],
    # Ahead-of-time compilation for TPU topologies (and running on TPU VMs).
    # gcsfs/google-cloud-storage: gs:// workdirs (Orbax, metrics, TensorBoard) on TPU VMs.
    "tpu": ["jax[tpu]==0.10.2", "gcsfs", "google-cloud-storage"],
}

setup(
    name="jfe-jax",
    version="0.1.0",
    description="Joint Fusion and Encoding (JFE) multimodal retrieval in JAX/Flax, TPU-first.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["jfe_jax", "jfe_jax.*"]),
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["jfe=jfe_jax.cli:main"]},
)
