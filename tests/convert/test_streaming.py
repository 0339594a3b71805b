"""Streaming import and layer-by-layer validation: megatron-core loads the streamed checkpoint, a
conversion error planted in one layer is caught and named, and tensors the mapping would drop
(a Qwen2 relabeled as Llama) or a window it would ignore (a Mistral relabeled as Llama) are
refused."""

import json
import shutil

import pytest
import torch

from flagscale.checkpoint.reader import CheckpointReader
from flagscale.convert import hf_to_mcore, mcore_to_hf
from flagscale.convert.export import checkpoint_config
from flagscale.convert.validate import compare_layerwise
from flagscale.errors import ConversionError
from tests.convert.test_qwen2_round_trip import hf_qwen2  # noqa: F401  (fixture)
from tests.convert.test_round_trip import VOCAB, hf_model, mcore_ckpt  # noqa: F401  (fixtures)


def _rewrite(src, dst, change):
    """Copy HF directory ``src`` to ``dst`` with ``change(tensors)`` applied to its weights."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for path in dst.glob("*.safetensors"):
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path, metadata={"format": "pt"})
    return dst


def _interleave_rows(weight, head_dim):
    """Each head's rows from rotate-half order to interleaved pairs: the classic RoPE
    permutation bug of Llama converters."""
    heads = weight.shape[0] // head_dim
    return (weight.reshape(heads, 2, head_dim // 2, -1).transpose(1, 2)
            .reshape(weight.shape))


def test_megatron_core_loads_the_streamed_checkpoint_with_the_hf_logits(hf_model, mcore_ckpt):
    from megatron.core import dist_checkpointing

    from flagscale.convert.common import single_process_layout, single_process_megatron
    from flagscale.models import build_model

    cfg = checkpoint_config(mcore_ckpt)
    padded = CheckpointReader(mcore_ckpt).shape("embedding.word_embeddings.weight")[0]
    one, layout = single_process_layout(cfg, padded)
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), single_process_megatron() as platform:
        model = build_model(one, layout, platform)[0]
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(mcore_ckpt))
        model.load_state_dict(state["model"], strict=False)
        model.eval()
        logits = model(ids, torch.arange(24).unsqueeze(0), attention_mask=None)[..., :VOCAB]
        expected = hf_model[1](ids).logits
    assert torch.allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_rotary_permutation_planted_in_one_layer_is_caught_naming_it(hf_model, tmp_path):
    src = hf_model[0]
    head_dim = 64 // 4

    def plant(tensors):
        for proj in ("q_proj", "k_proj"):
            name = f"model.layers.2.self_attn.{proj}.weight"
            tensors[name] = _interleave_rows(tensors[name], head_dim).contiguous()

    bad = _rewrite(src, tmp_path / "bad", plant)
    ckpt = hf_to_mcore(bad, tmp_path / "ckpt", tp=2, pp=2, validate=False)
    cfg = checkpoint_config(ckpt)
    # The checkpoint against the true weights (what hf-to-mcore and mcore-to-hf both run).
    with pytest.raises(ConversionError, match=r"Validation failed at layer 2\b") as err:
        compare_layerwise(ckpt, cfg, src, round_to="fp32")
    assert "every earlier point agreed" in str(err.value)
    report = compare_layerwise(ckpt, cfg, bad)
    assert [s.name for s in report.stages] == ["embedding", *(f"layer {i}" for i in range(4)),
                                               "logits"]
    assert all(s.ok for s in report.stages)


def test_import_refuses_a_qwen2_relabeled_as_llama_naming_the_dropped_biases(hf_qwen2,
                                                                               tmp_path):
    relabeled = tmp_path / "relabeled"
    shutil.copytree(hf_qwen2[0], relabeled)
    config = json.loads((relabeled / "config.json").read_text())
    # Qwen2 from 7B up has untied embeddings; only the biases tell it from a Llama.
    config.update(architectures=["LlamaForCausalLM"], model_type="llama",
                  tie_word_embeddings=False)
    (relabeled / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.self_attn\.q_proj\.bias.*"
                                              r"Qwen2ForCausalLM"):
        hf_to_mcore(relabeled, tmp_path / "ckpt", validate=False)
    assert not (tmp_path / "ckpt").exists()


def test_import_refuses_an_unknown_tensor_by_name(hf_model, tmp_path):
    def add(tensors):
        tensors["model.layers.1.mlp.extra_scale"] = torch.ones(4)

    bad = _rewrite(hf_model[0], tmp_path / "bad", add)
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.extra_scale.*drop"):
        hf_to_mcore(bad, tmp_path / "ckpt", validate=False)
    assert not (tmp_path / "ckpt").exists()


def test_import_names_a_truncated_safetensors_file_before_any_output(hf_model, tmp_path):
    # The import copies tensor bytes without reading them, so a short file is caught up front.
    bad = tmp_path / "bad"
    shutil.copytree(hf_model[0], bad)
    (path,) = bad.glob("*.safetensors")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 10)
    with pytest.raises(ConversionError, match=rf"{path} is truncated: tensor '[\w.]+' ends at"):
        hf_to_mcore(bad, tmp_path / "ckpt", validate=False)
    assert not (tmp_path / "ckpt").exists()


def test_import_refuses_a_mistral_window_relabeled_as_llama(hf_model, tmp_path):
    relabeled = tmp_path / "relabeled"
    shutil.copytree(hf_model[0], relabeled)
    config = json.loads((relabeled / "config.json").read_text())
    config["sliding_window"] = 4096  # below max_position_embeddings (131072)
    (relabeled / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"sliding_window=4096 is smaller than "
                                              r"max_position_embeddings=131072"):
        hf_to_mcore(relabeled, tmp_path / "ckpt", validate=False)


def test_export_validates_layer_by_layer_by_default(mcore_ckpt, tmp_path):
    result = mcore_to_hf(mcore_ckpt, tmp_path / "hf", dtype="bf16")
    names = [s.name for s in result.validation.stages]
    assert names == ["embedding", "layer 0", "layer 1", "layer 2", "layer 3", "logits"]
    assert result.max_abs_diff <= result.tolerance


def test_progress_bars_count_bytes_and_layers_and_summaries_give_the_numbers(hf_model, tmp_path,
                                                                            capsys):
    import re

    lines = []
    ckpt = hf_to_mcore(hf_model[0], tmp_path / "ckpt", tp=2, log=lines.append, progress=True)
    bars = capsys.readouterr().err
    assert re.search(r"import: 100%\|.*\| [\d.]+M/[\d.]+M \[.*B/s, layer 4/4\]", bars), bars
    assert re.search(r"validate: .*\d/4 \[", bars), bars  # counts layers (cleared at the end)
    assert re.search(r"\d+\.\d\dM params, 4 layers, \d+\.\d\d GB in \d+\.\ds; .* max \|logit "
                     r"diff\| [\d.e-]+ \(tolerance [\d.e-]+\)", lines[-1]), lines[-1]

    result = mcore_to_hf(ckpt, tmp_path / "hf", dtype="bf16", log=lines.append, progress=True)
    bars = capsys.readouterr().err
    assert re.search(r"export: 100%\|.*\| [\d.]+M/[\d.]+M \[.*B/s, layer 4/4\]", bars), bars
    assert re.search(r"\d+\.\d\dM params, \d+\.\d\d GB in \d+\.\ds; max \|logit diff\| "
                     r"[\d.e-]+ \(tolerance [\d.e-]+\)", result.summary()), result.summary()


def test_imported_chunks_are_read_from_their_raw_bytes(mcore_ckpt):
    # The importer writes its archives without CRCs; a reader that checked them would fall back
    # to torch.load for every chunk (the export then runs several times slower).
    from torch.distributed.checkpoint.metadata import MetadataIndex

    from flagscale.checkpoint.reader import _locate

    reader = CheckpointReader(mcore_ckpt)
    for key, md in reader.tensors.items():
        for chunk in md.chunks:
            info = reader._storage[MetadataIndex(key, chunk.offsets)]
            raw = _locate(reader._fd(info.relative_path), info.offset, info.length)
            assert raw is not None and raw.size == tuple(chunk.sizes), key
    reader.close()



SPLIT_ROWS = {"decoder.layers.self_attention.linear_proj.weight",
              "decoder.layers.mlp.linear_fc2.weight"}
"""Row-parallel weights: a training save at TP > 1 splits each of their rows across shards."""


def copied_entries(ckpt, dtype, layer=0) -> tuple[set, set]:
    """(megatron-core keys an export to ``dtype`` copies file to file, all keys) of ``ckpt``'s
    head, tail and layer ``layer``."""
    from flagscale.convert import mapping as M
    from flagscale.convert.export import _file_bytes, open_checkpoint

    _, cfg, reader, prefix = open_checkpoint(ckpt)
    wm = M.WeightMap.of(cfg.model, padded_vocab_size=reader.shape(prefix + M.EMBEDDING)[0])
    groups = ((wm.head + wm.tail, None), (wm.layer, layer))
    copied = {e.mcore for entries, at in groups for e in entries
              if _file_bytes(reader, prefix + e.mcore, e, wm, at, dtype) is not None}
    reader.close()
    return copied, {e.mcore for e in wm.entries}


def test_export_copies_tensors_stored_in_its_dtype_file_to_file(mcore_ckpt):
    # The importer stores whole global rows, so an export in the stored dtype (fp32 here) copies
    # every tensor's bytes in the kernel (the bitwise round trip above checks them); another
    # dtype is read and converted.
    copied, everything = copied_entries(mcore_ckpt, torch.float32, layer=3)
    assert copied == everything
    assert copied_entries(mcore_ckpt, torch.bfloat16)[0] == set()


@pytest.mark.parametrize("stored, kept", [(torch.bfloat16, torch.bfloat16),
                                          (torch.float16, torch.float32)])
def test_import_keeps_every_weight_exactly_whether_copied_or_cast(hf_model, tmp_path, stored,
                                                                  kept):
    # Weights the checkpoint keeps in their dtype (bf16 here, fp32 in the fixtures above) are
    # copied from the safetensors into the archives without being read; fp16 widens to fp32 on
    # the read-and-cast path. Either way every megatron-core tensor holds the source's values.
    from safetensors.torch import load_file

    from flagscale.convert import mapping as M

    src = _rewrite(hf_model[0], tmp_path / "src",
                   lambda tensors: tensors.update({k: v.to(stored) for k, v in tensors.items()}))
    ckpt = hf_to_mcore(src, tmp_path / "ckpt", tp=2, log=lambda line: None)
    hf = {k: v for path in src.glob("*.safetensors") for k, v in load_file(path).items()}
    reader = CheckpointReader(ckpt)
    wm = M.WeightMap.of(checkpoint_config(ckpt).model,
                        padded_vocab_size=reader.shape(M.EMBEDDING)[0])
    for layer, entries in wm.groups():
        keys = [e.mcore for e in entries]
        got = ({k: reader.read_full(k) for k in keys} if layer is None
               else reader.read_layer(keys, layer))
        for key, expected in wm.from_hf(hf, entries, layer).items():
            assert got[key].dtype == kept and torch.equal(got[key], expected.to(kept)), \
                (key, layer)
    assert not reader.read_full(M.EMBEDDING)[VOCAB:].any()  # the padding rows are zeros
    reader.close()
