"""The megatron-core configs flagscale builds for a GPU run carry Megatron-LM's performance
settings, each fused kernel only where the platform really has it, and the CPU configs none of
them (CPU runs stay exact). Built for a ``cuda`` platform description without a GPU: no CUDA
tensor is created."""

from __future__ import annotations

from pathlib import Path

import torch

from flagscale.config import load_config, validate
from flagscale.models import get_model_spec
from flagscale.platform import Platform, setup_platform

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _platform(kind="cuda", te=True, apex=True, fused_wgrad=True):
    setup_platform("cpu")  # megatron-core imports need the CPU shim on this machine
    return Platform(kind, torch.device("cpu"), "nccl" if kind == "cuda" else "gloo", te, apex,
                    fused_wgrad)


def _build(overrides=(), world=16, **platform):
    cfg = load_config(EXAMPLES / "llama3_8b/h100_1node.yaml",
                      ["parallel.pp=2", "parallel.vpp=2", *overrides])
    layout = validate(cfg, world, check_paths=False)
    plat = _platform(**platform)
    return cfg, layout, plat, get_model_spec(cfg.model).transformer_config_kwargs(cfg, layout,
                                                                                   plat)


def test_cuda_with_transformer_engine_gets_every_fusion_and_p2p_setting():
    _, _, _, kw = _build()
    assert kw["apply_rope_fusion"] and kw["bias_activation_fusion"] and kw["persist_layer_norm"]
    assert kw["cross_entropy_loss_fusion"] and kw["cross_entropy_fusion_impl"] == "te"
    assert kw["gradient_accumulation_fusion"]
    # Interleaved schedule: p2p overlapped with compute, hence unbatched; never a device sync.
    assert kw["overlap_p2p_comm"] and not kw["batch_p2p_comm"] and not kw["batch_p2p_sync"]
    assert kw["calculate_per_token_loss"]


def test_fusions_follow_the_kernels_that_really_import():
    _, _, _, kw = _build(te=False, apex=True, fused_wgrad=False)
    assert not kw["apply_rope_fusion"]  # TE's kernel
    assert kw["cross_entropy_loss_fusion"] and kw["cross_entropy_fusion_impl"] == "native"
    assert not kw["gradient_accumulation_fusion"]  # apex present but without its CUDA extension
    _, _, _, kw = _build(["parallel.vpp=null"])
    assert kw["batch_p2p_comm"] and not kw["overlap_p2p_comm"] and not kw["batch_p2p_sync"]


def test_cpu_configs_keep_every_fusion_off():
    _, _, _, kw = _build(kind="cpu", te=False, apex=False, fused_wgrad=False)
    for key in ("apply_rope_fusion", "bias_activation_fusion", "cross_entropy_loss_fusion",
                "gradient_accumulation_fusion", "batch_p2p_comm", "overlap_p2p_comm"):
        assert not kw[key], key


def test_megatron_core_accepts_the_gpu_config():
    """Everything but TE's RoPE kernel (absent here) is checked by TransformerConfig itself."""
    from megatron.core.transformer import TransformerConfig

    _, _, _, kw = _build(["train.recompute=full", "train.recompute_method=block",
                          "train.recompute_num_layers=2", "parallel.cp=2",
                          "parallel.tp_comm_overlap=true", "model.fp8=hybrid",
                          "model.fp8_recipe=delayed"], world=32)
    tc = TransformerConfig(**{**kw, "apply_rope_fusion": False})
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == (
        "full", "block", 2)
    assert (tc.context_parallel_size, tc.cp_comm_type) == (2, "p2p")
    assert tc.tp_comm_overlap and (tc.fp8, tc.fp8_recipe) == ("hybrid", "delayed")


def test_selective_recompute_modules_and_uneven_split_reach_megatron_core():
    _, _, _, kw = _build(["train.recompute=selective", "train.recompute_modules=[layernorm,mlp]",
                          "parallel.vpp=null", "parallel.num_layers_in_first_pipeline_stage=15"])
    assert kw["recompute_granularity"] == "selective"
    assert kw["recompute_modules"] == ["layernorm", "mlp"]
    assert kw["num_layers_in_first_pipeline_stage"] == 15
    _, _, _, kw = _build(["parallel.account_for_embedding_in_pipeline_split=true",
                          "parallel.account_for_loss_in_pipeline_split=true", "parallel.vpp=null"])
    assert kw["account_for_embedding_in_pipeline_split"] and kw[
        "account_for_loss_in_pipeline_split"]


def test_ddp_and_optimizer_configs_overlap_communication_on_cuda():
    from flagscale.train.setup import ddp_config, optimizer_config

    cfg, layout, plat, _ = _build(["parallel.ddp_bucket_size=40000000"])
    ddp = ddp_config(cfg, layout, plat)
    assert ddp.overlap_grad_reduce and ddp.overlap_param_gather and ddp.align_param_gather
    # Off by default: the optimizer drops a non-finite step and trace.on_spike handles it.
    assert not ddp.check_for_nan_in_grad and ddp.grad_reduce_in_fp32
    assert ddp.use_distributed_optimizer and ddp.bucket_size == 40_000_000
    assert optimizer_config(cfg, ddp).overlap_param_gather

    cfg, layout, plat, _ = _build(["parallel.grad_reduce_dtype=bf16", "parallel.vpp=null",
                                   "parallel.overlap_grad_reduce=false"])
    ddp = ddp_config(cfg, layout, plat)
    assert not ddp.grad_reduce_in_fp32 and not ddp.overlap_grad_reduce
    assert ddp.overlap_param_gather and not ddp.align_param_gather  # aligned only with vpp

    cfg, layout, plat, _ = _build(kind="cpu", te=False, apex=False, fused_wgrad=False)
    ddp = ddp_config(cfg, layout, plat)
    assert not ddp.overlap_grad_reduce and not ddp.overlap_param_gather
    cfg, layout, plat, _ = _build(["train.check_for_nan_in_grad=true"], kind="cpu", te=False,
                                  apex=False, fused_wgrad=False)
    assert ddp_config(cfg, layout, plat).check_for_nan_in_grad


def test_sdpa_core_attention_is_chosen_on_gpus_without_transformer_engine():
    from megatron.core.transformer import TransformerConfig

    from flagscale.models.layers import SDPAttention

    cfg, layout, plat, kw = _build(["parallel.vpp=null", "parallel.pp=1", "parallel.tp=1",
                                    "parallel.sequence_parallel=false"], world=8, te=False)
    spec = get_model_spec(cfg.model)
    from megatron.core import parallel_state

    from flagscale.platform import world_of_one

    with world_of_one():
        parallel_state.initialize_model_parallel()
        try:
            tconfig = TransformerConfig(**kw)
            gpu = spec.layer_spec(plat, tconfig, None).layer_specs[0]
            cpu = spec.layer_spec(_platform("cpu", False, False, False), tconfig,
                                  None).layer_specs[0]
        finally:
            parallel_state.destroy_model_parallel()
    assert gpu.submodules.self_attention.submodules.core_attention is SDPAttention
    assert cpu.submodules.self_attention.submodules.core_attention is not SDPAttention


def test_fp8_runs_report_mfu_against_the_fp8_peak():
    from flagscale.metrics.devices import mfu_precision, peak_tflops

    cfg = load_config(None, ["model.preset=llama3_8b", "model.params_dtype=bf16",
                             "model.fp8=hybrid"])
    assert peak_tflops("h100-sxm", mfu_precision(cfg.model)) == 1979.0
    cfg.model.fp8 = None
    assert peak_tflops("h100-sxm", mfu_precision(cfg.model)) == 989.0
