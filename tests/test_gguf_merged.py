"""The adapter merged into the base GGUF on a tiny Llama built in the test: metadata and untouched
tensors copied byte for byte, each adapted weight W + alpha/r * B A in llama.cpp's layout (checked
against peft's own merge), refusals, and merged.gguf as a version file."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lorad import config
from lorad.release import gguf as gguf_export
from lorad.release.gguf import ExportRefused, write_merged
from test_gguf_export import MODULES, copy_adapter, tiny_lora, write_base_gguf

# How the base GGUF below stores each adapted weight: every storage the merge has to read.
STORED = {
    "attn_q": "F32",
    "attn_k": "F16",
    "attn_v": "Q8_0",
    "attn_output": "F32",
    "ffn_gate": "Q8_0",
    "ffn_up": "BF16",
    "ffn_down": "Q4_0",
}
ALIGNMENT = 64  # not gguf's default 32: the data must follow the base's general.alignment


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama, a LoRA on all its linear layers (B random), peft's merged weights, and a base
    GGUF holding the real weights as llama.cpp's converter would (q/k rows permuted)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("merged")
    base, model = tiny_lora(root)
    merged = {k: v.detach().float().numpy().copy() for k, v in model.merge_and_unload().state_dict().items()}
    original = {
        k: v.detach().float().numpy() for k, v in AutoModelForCausalLM.from_pretrained(base).state_dict().items()
    }
    return {
        "base": base,
        "adapter": root / "adapter",
        "gguf": write_weighted_base_gguf(root / "tiny.gguf", base, original),
        "hf": original,
        "peft_merged": merged,
    }


def hf_layout_to_gguf(name: str, weight: np.ndarray, hp: dict) -> np.ndarray:
    """What llama.cpp's converter does to a Llama weight: q/k rows reordered for its rope."""
    if name == "attn_q":
        return gguf_export.permute_rows(weight, hp["num_attention_heads"])
    if name == "attn_k":
        return gguf_export.permute_rows(weight, hp["num_key_value_heads"])
    return weight


def write_weighted_base_gguf(path: Path, base: Path, weights: dict) -> Path:
    """A base GGUF of the tiny model's real weights, stored as STORED says, with metadata of every kind."""
    import gguf

    hp = json.loads((base / "config.json").read_text())
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_custom_alignment(ALIGNMENT)
    writer.add_name("tiny base")
    writer.add_block_count(hp["num_hidden_layers"])
    writer.add_head_count(hp["num_attention_heads"])
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(8)])
    writer.add_array("tokenizer.ggml.token_type", [1] * 8)
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    for i in range(hp["num_hidden_layers"]):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", weights[f"model.layers.{i}.input_layernorm.weight"])
        for module, name in MODULES.items():
            w = hf_layout_to_gguf(name, weights[f"model.layers.{i}.{module}.weight"], hp)
            kind = STORED[name]
            if kind == "F32":
                writer.add_tensor(f"blk.{i}.{name}.weight", w.astype(np.float32))
            elif kind == "F16":
                writer.add_tensor(f"blk.{i}.{name}.weight", w.astype(np.float16))
            else:
                qtype = gguf.GGMLQuantizationType[kind]
                writer.add_tensor(f"blk.{i}.{name}.weight", gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", weights[f"model.layers.{i}.post_attention_layernorm.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.add_tensor("output.weight", weights["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def reader(path: Path):
    import gguf

    return gguf.GGUFReader(path)


def as_float(tensor) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)


def test_metadata_and_every_tensor_not_adapted_are_the_bases_byte_for_byte(tiny, tmp_path):
    done = write_merged(tiny["adapter"], tiny["base"], tiny["gguf"], tmp_path / "merged.gguf")
    base, merged = reader(tiny["gguf"]), reader(done.path)
    # the header and every key/value pair: the same bytes, so the same metadata in the same order
    head = base.tensors[0].field.offset
    assert bytes(merged.data[: merged.tensors[0].field.offset]) == bytes(base.data[:head])
    assert merged.fields["general.name"].contents() == "tiny base"
    assert merged.fields["tokenizer.ggml.tokens"].contents() == [f"t{i}" for i in range(8)]
    assert merged.alignment == ALIGNMENT and merged.data_offset % ALIGNMENT == 0
    assert [t.name for t in merged.tensors] == [t.name for t in base.tensors]
    adapted = {f"blk.{i}.{name}.weight" for i in range(2) for name in MODULES.values()}
    untouched = [t for t in base.tensors if t.name not in adapted]
    assert len(untouched) == 7  # token_embd, 2 x (attn_norm, ffn_norm), output_norm, output
    by_name = {t.name: t for t in merged.tensors}
    for t in untouched:
        mine = by_name[t.name]
        assert mine.tensor_type == t.tensor_type and list(mine.shape) == list(t.shape)
        assert bytes(mine.data) == bytes(t.data), t.name
        assert mine.data_offset % ALIGNMENT == 0
    assert done.merged == len(adapted) == 14 and done.tensors == len(base.tensors) == 21
    assert done.size == done.path.stat().st_size and not list(tmp_path.glob(".*tmp"))
    from lorad.release.registry import sha256_file

    assert done.sha256 == sha256_file(done.path)


def test_each_adapted_weight_is_w_plus_scale_b_a_in_the_bases_layout(tiny, tmp_path):
    """W + (alpha / r) * B A with B's q/k rows permuted, from the plan; and the change each weight
    got is peft's own merge, put in llama.cpp's layout."""
    import gguf

    done = write_merged(tiny["adapter"], tiny["base"], tiny["gguf"], tmp_path / "merged.gguf")
    base = {t.name: t for t in reader(tiny["gguf"]).tensors}
    merged = {t.name: t for t in reader(done.path).tensors}
    adapter = gguf_export.read_safetensors(tiny["adapter"] / "adapter_model.safetensors")
    hp = json.loads((tiny["base"] / "config.json").read_text())
    scale = 8 / 4
    for layer in range(2):
        for module, name in MODULES.items():
            key = f"blk.{layer}.{name}.weight"
            got, w = as_float(merged[key]), as_float(base[key])
            want_type = "F32" if STORED[name] == "F32" else "F16"
            assert merged[key].tensor_type == gguf.GGMLQuantizationType[want_type], key
            a = adapter[f"base_model.model.model.layers.{layer}.{module}.lora_A.weight"]
            b = adapter[f"base_model.model.model.layers.{layer}.{module}.lora_B.weight"]
            delta = hf_layout_to_gguf(name, b, hp) @ a  # permuting B's rows permutes B A's
            tol = 1e-6 if want_type == "F32" else 2e-3 * max(1.0, float(np.abs(w).max()))
            np.testing.assert_allclose(got, w + scale * delta, rtol=0, atol=tol, err_msg=key)
            # peft's merge: W' - W in Hugging Face's layout, permuted as the converter permutes W
            hf = f"model.layers.{layer}.{module}.weight"
            peft_delta = hf_layout_to_gguf(name, tiny["peft_merged"][hf] - tiny["hf"][hf], hp)
            np.testing.assert_allclose(got - w, peft_delta, rtol=0, atol=tol, err_msg=key)
            assert np.abs(peft_delta).max() > 20 * tol  # the adapter moved this weight
            if name in ("attn_q", "attn_k"):
                assert not np.allclose(got - w, tiny["peft_merged"][hf] - tiny["hf"][hf], atol=tol)


@pytest.mark.parametrize(
    "change, match",
    [({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"), ({"bias": "all"}, "bias")],
)
def test_refuses_what_the_adapter_export_refuses_and_writes_nothing(tiny, tmp_path, change, match):
    bad = copy_adapter(tiny["adapter"], tmp_path / "bad", **change)
    with pytest.raises(ExportRefused, match=match):
        write_merged(bad, tiny["base"], tiny["gguf"], tmp_path / "out" / "merged.gguf")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_refuses_a_base_gguf_of_another_architecture_or_shape(tiny, tmp_path):
    other = write_base_gguf(tmp_path / "qwen.gguf", tiny["base"], arch="qwen2")
    with pytest.raises(ExportRefused, match="architecture 'qwen2'"):
        write_merged(tiny["adapter"], tiny["base"], other, tmp_path / "merged.gguf")
    wide = write_base_gguf(tmp_path / "wide.gguf", tiny["base"], q_out=48)
    with pytest.raises(ExportRefused, match=r"blk.0.attn_q.weight is \[32, 48\]"):
        write_merged(tiny["adapter"], tiny["base"], wide, tmp_path / "merged.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen.gguf", "wide.gguf"]


def test_a_weight_of_a_type_gguf_cannot_dequantize_is_refused(tiny, tmp_path, monkeypatch):
    import gguf

    def cannot(data, qtype):
        raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")

    monkeypatch.setattr(gguf.quants, "dequantize", cannot)
    with pytest.raises(ExportRefused, match=r"blk.0.attn_q.weight \(F32\) cannot be dequantized"):
        write_merged(tiny["adapter"], tiny["base"], tiny["gguf"], tmp_path / "merged.gguf")
    assert list(tmp_path.iterdir()) == []


def ollama_table(base: Path, mode: str) -> config.PublishSettings:
    return config.PublishSettings(kind="ollama", url="http://127.0.0.1:11434", base=str(base), ollama_mode=mode)


@pytest.mark.parametrize("mode", ["merged", "auto"])
def test_version_export_writes_merged_gguf_beside_the_adapter_when_an_ollama_table_wants_it(tiny, tmp_path, mode):
    work = shutil.copytree(tiny["adapter"], tmp_path / "job-adapter")
    record = gguf_export.version_export([ollama_table(tiny["gguf"], mode)], work, tiny["base"], "", name="job-1")
    from lorad.release.registry import sha256_file

    assert record["merged"]["file"] == "merged.gguf" and record["merged"]["merged"] == 14
    assert record["merged"]["sha256"] == sha256_file(work / "merged.gguf") == record["merged"]["sha256"]
    assert {"adapter.gguf", "Modelfile", "merged.gguf"} <= {p.name for p in work.iterdir()}
    assert gguf_export.merged_problem(tmp_path, "job-adapter") is None
    gguf_export.drop_merged(work)
    assert not (work / "merged.gguf").exists() and (work / "adapter.gguf").exists()


def test_version_export_writes_no_merged_gguf_for_the_adapter_mode(tiny, tmp_path):
    work = shutil.copytree(tiny["adapter"], tmp_path / "job-adapter")
    record = gguf_export.version_export([ollama_table(tiny["gguf"], "adapter")], work, tiny["base"], "")
    assert "merged" not in record and not (work / "merged.gguf").exists() and (work / "adapter.gguf").exists()


def test_a_full_disk_while_merging_is_a_refusal_recorded_and_the_adapter_export_stays(tiny, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    work = shutil.copytree(tiny["adapter"], tmp_path / "job-adapter")
    monkeypatch.setattr(gguf_export, "_write_merged_file", full)
    record = gguf_export.version_export([ollama_table(tiny["gguf"], "merged")], work, tiny["base"], "")
    assert record["merged"] == {"refused": "cannot write merged.gguf into the version: No space left on device"}
    assert record["sha256"] and (work / "adapter.gguf").exists()
    assert not (work / "merged.gguf").exists() and not list(work.glob(".*tmp"))
    (work / "lorad.json").write_text(json.dumps({"gguf": record}))
    assert "No space left on device" in gguf_export.merged_problem(tmp_path, "job-adapter")


def test_config_takes_ollama_mode_on_ollama_tables_with_a_gguf_base_only():
    def problems(text):
        with pytest.raises(config.ConfigError) as e:
            config.loads(text)
        return str(e.value)

    table = '[[publish]]\nkind = "ollama"\nurl = "http://127.0.0.1:11434"\n'
    assert config.loads(table + 'base = "/m/base.gguf"\n').publish[0].ollama_mode == "adapter"
    assert config.loads(table + 'base = "/m/base.gguf"\nollama_mode = "auto"\n').publish[0].ollama_mode == "auto"
    assert "publish[0].ollama_mode: must be one of ['adapter', 'merged', 'auto']" in problems(
        table + 'base = "/m/base.gguf"\nollama_mode = "fused"\n'
    )
    assert (
        'publish[0].ollama_mode: "merged" merges the adapter into the base GGUF file, but the base is the '
        "Ollama model 'smollm2:135m'" in problems(table + 'base = "smollm2:135m"\nollama_mode = "merged"\n')
    )
    assert 'publish[0].ollama_mode: only a kind = "ollama" hook has a mode, not kind = "gguf"' in problems(
        '[[publish]]\nkind = "gguf"\nbase = "/m/base.gguf"\nollama_mode = "merged"\n'
    )
    # the base may come from a .gguf training.base_model
    s = config.loads('[training]\nbase_model = "/m/base.gguf"\n' + table + 'ollama_mode = "merged"\n')
    assert gguf_export.wants_merged(s.publish)
