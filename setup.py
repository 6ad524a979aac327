"""numbattn + tinyllm: FlashAttention-style Numba CUDA kernels and a NumPy TinyLlama that chats on them."""
from setuptools import find_packages, setup

setup(
    name="numbattn",
    version="0.1.0",
    description="Teaching-grade FlashAttention and KV-cache kernels in Numba CUDA, and a NumPy TinyLlama on top",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["numbattn", "numbattn.*", "tinyllm", "tinyllm.*"]),
    py_modules=["cli"],
    install_requires=[
        "numba>=0.60",
        "numba-cuda>=0.20",
        # numba-cuda 0.30 cannot compile kernels with NumPy 2.5 (np.row_stack is gone)
        "numpy>=1.24,<2.5",
        "tokenizers>=0.15",
        "click>=8.0",
        "jinja2>=3.0",  # chat templates, rendered in jinja2's sandbox
        "huggingface_hub>=0.20",  # the one explicit network step: downloading TinyLlama
        "gguf>=0.16",  # llama.cpp's reader for .gguf files (memory-mapped) and its NumPy dequantization
        # sets BLAS's thread count at run time, whichever BLAS NumPy carries (OpenBLAS, MKL, BLIS...): a busy
        # machine otherwise made CPU decode 15x slower (tinyllm/threads.py)
        "threadpoolctl>=3.1",
        "aiohttp>=3.9",  # `tinyllm serve`: HTTP/1.1 server, streaming responses, client-disconnect cancellation
    ],
    extras_require={
        # openai: the official client, which the server's tests talk to it with
        # pytest-xdist: the simulated kernels are CPU-bound Python, so the suite spreads over every core (-n auto)
        "test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6", "pexpect>=4.8", "openai>=1.0"],
        # what a GPU user adds: NVVM, NVRTC and the CUDA runtime as wheels, matched to a CUDA 13 driver
        "cuda": ["numba-cuda[cu13]"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["tinyllm=cli:main"]},
)
