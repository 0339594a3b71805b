# syntax=docker/dockerfile:1
# flagscale on NVIDIA's NGC PyTorch container: CUDA, cuDNN, NCCL and a CUDA build of PyTorch,
# plus Transformer Engine and NVIDIA apex, built and tested together by NVIDIA.
#
#   docker build -t flagscale .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 -it \
#       -v /shared:/shared flagscale flagscale train examples/llama3_8b/h100_1node.yaml
#
# --ipc=host: worker processes share tensors through /dev/shm, which Docker limits to 64 MB.
# On Slurm with enroot/pyxis, import the image (`enroot import dockerd://flagscale`) and run the
# sbatch script written by `flagscale launch --slurm` with FLAGSCALE_PYTHON=python inside it.
#
# Base image 25.12 (released 2025-12): PyTorch 2.10.0a0, CUDA 13.1, Python 3.12. Like every NGC
# PyTorch image it carries Transformer Engine (its fused/flash attention and fused layers are the
# layer spec flagscale uses on GPUs) and NVIDIA apex (fused kernels megatron-core picks up, e.g.
# gradient-accumulation fusion); the exact versions are in the image's release notes and are
# printed by the last RUN below. Pick another tag with --build-arg BASE_IMAGE=...; images before
# 25.03 have no /etc/pip/constraint.txt (see below).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /workspace/flagscale

# Remember the image's torch: installing flagscale must not replace it with a PyPI wheel (which
# would drop NVIDIA's build and break Transformer Engine and apex, compiled against it).
RUN python -c "import torch; print(torch.__version__)" > /opt/ngc-torch-version

COPY . .

# Editable install with the dev extra (pytest, transformers). pyproject asks for torch>=2.6: pip
# accepts the image's pre-release build (2.10.0a0+...) as installed, and the image's pip
# constraints file (/etc/pip/constraint.txt, PIP_CONSTRAINT) pins it and NVIDIA's other packages,
# so a conflicting requirement fails the build instead of swapping them. The `gpu` extra
# (transformer-engine from PyPI) is deliberately not installed: the image's build is used.
RUN pip install -e ".[dev]" \
 && python - <<'PY'
import sys
import torch
want = open("/opt/ngc-torch-version").read().strip()
if torch.__version__ != want:
    sys.exit(f"pip replaced the image's torch {want} with {torch.__version__}")
import apex, megatron.core, transformer_engine  # fail the build if the image lacks them
print(f"torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
      f"transformer-engine {transformer_engine.__version__}, apex {apex.__file__}")
PY

CMD ["bash"]
