"""HF -> megatron-core (TP=2, PP=2) -> HF on a random tiny Llama-3.1-style model, and the errors a
user can hit on the way."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flagscale.cli.main import main as cli
from flagscale.convert import hf_to_mcore, mcore_to_hf
from flagscale.checkpoint.reader import CheckpointReader
from flagscale.convert.tokenizer import export_tokenizer
from flagscale.errors import ConversionError

REPO = Path(__file__).resolve().parents[2]
VOCAB = 4100  # above the bundled tokenizer's 4096 and not a multiple of 256: padding is exercised


def _load_safetensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A random Llama with GQA, untied embeddings and Llama-3.1 rope scaling, saved to disk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=131072, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=2, eos_token_id=3,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                          "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("hf") / "src"
    model.save_pretrained(path)
    export_tokenizer(REPO / "flagscale" / "data" / "corpus" / "tokenizer.model", path)
    return path, model


@pytest.fixture(scope="module")
def mcore_ckpt(hf_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("mcore") / "ckpt"
    hf_to_mcore(hf_model[0], out, tp=2, pp=2)
    return out


def test_import_writes_global_tensors_padded_for_tp2_and_no_optimizer(mcore_ckpt):
    from megatron.core import dist_checkpointing

    reader = CheckpointReader(mcore_ckpt)
    assert reader.shape("embedding.word_embeddings.weight") == (4352, 64)  # 4100 -> 17 * 256
    assert reader.shape("decoder.layers.self_attention.linear_qkv.weight") == (4, 128, 64)
    assert reader.shape("decoder.layers.mlp.linear_fc1.weight") == (4, 192, 64)
    assert not any(k.startswith("optimizer") for k in reader.tensors)
    common = dist_checkpointing.load_common_state_dict(str(mcore_ckpt))
    assert common["flagscale"]["has_optimizer"] is False
    assert common["flagscale"]["config"]["parallel"]["tp"] == 2
    assert common["flagscale"]["config"]["model"]["rope_scaling_factor"] == 8.0


def test_round_trip_is_bitwise_with_equal_logits(hf_model, mcore_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    src_dir, src_model = hf_model
    result = mcore_to_hf(mcore_ckpt, tmp_path / "hf", dtype="fp32")
    assert result.max_abs_diff is not None and result.max_abs_diff <= result.tolerance
    source, exported = _load_safetensors(src_dir), _load_safetensors(tmp_path / "hf")
    assert exported.keys() == source.keys()
    for name, tensor in source.items():
        assert torch.equal(exported[name], tensor), name
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_parameters"]["factor"] == 8.0 and config["eos_token_id"] == 3
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, src_model(ids).logits)


def test_bf16_export_rounds_weights_and_validates(hf_model, mcore_ckpt, tmp_path):
    result = mcore_to_hf(mcore_ckpt, tmp_path / "hf", dtype="bf16")
    assert result.max_abs_diff <= result.tolerance
    source, exported = _load_safetensors(hf_model[0]), _load_safetensors(tmp_path / "hf")
    assert all(exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], v.bfloat16())
               for k, v in source.items())


def test_non_empty_output_is_refused_and_left_alone(mcore_ckpt, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = cli(["convert", "mcore-to-hf", "--input", str(mcore_ckpt), "--output", str(out),
                "--skip-validation"])
    assert code == 1 and "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def _edited_copy(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_shape_mismatch_names_tensor_and_leaves_no_partial_output(hf_model, tmp_path):
    bad = _edited_copy(hf_model[0], tmp_path / "bad", intermediate_size=80)
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*"
                                              r"\(96, 64\), expected \(80, 64\)"):
        hf_to_mcore(bad, tmp_path / "out" / "ckpt")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("change, message", [
    ({"num_attention_heads": None}, "missing key.*num_attention_heads"),
    ({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}, "MixtralForCausalLM"),
])
def test_bad_config_is_named(hf_model, tmp_path, change, message):
    bad = _edited_copy(hf_model[0], tmp_path / "bad", **change)
    with pytest.raises(ConversionError, match=message):
        hf_to_mcore(bad, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_standalone_script_runs_the_same_converter(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert" / "convert.py"),
                           "hf-to-mcore", "--input", str(tmp_path / "missing"), "--output",
                           str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "is not a directory" in proc.stderr and "Traceback" not in proc.stderr
