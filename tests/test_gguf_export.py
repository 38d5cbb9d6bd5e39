"""GGUF LoRA export on a tiny Llama built in the test: metadata, names, shapes, the q/k permutation, refusals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from lorad import config
from lorad.release import gguf as gguf_export
from lorad.release.gguf import ExportRefused, write_adapter

MODULES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def tiny_lora(root: Path):
    """A tiny Llama (4 heads, 2 KV heads, 2 layers) in ``root/base`` and a LoRA adapter on all its
    linear layers, B random, saved in ``root/adapter``; returns the base's path and the peft model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorad.training.tiny import build_tiny_model

    base = build_tiny_model(root / "base", hidden_size=32, vocab_size=512)
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(root / "adapter")
    return base, model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama and a LoRA adapter on all its linear layers (:func:`tiny_lora`)."""
    root = tmp_path_factory.mktemp("gguf")
    base, _ = tiny_lora(root)
    return base, root / "adapter"


def copy_adapter(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    path = dst / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | config_changes))
    return dst


def write_base_gguf(path: Path, base: Path, arch: str = "llama", q_out: int | None = None) -> Path:
    """A weightless stand-in for the base GGUF: the tensor names and (ggml) shapes llama.cpp would have."""
    import gguf

    hp = json.loads((base / "config.json").read_text())
    hidden, inter = hp["hidden_size"], hp["intermediate_size"]
    kv = hp["num_key_value_heads"] * hidden // hp["num_attention_heads"]
    shapes = {
        "attn_q": (q_out or hidden, hidden),
        "attn_k": (kv, hidden),
        "attn_v": (kv, hidden),
        "attn_output": (hidden, hidden),
        "ffn_gate": (inter, hidden),
        "ffn_up": (inter, hidden),
        "ffn_down": (hidden, inter),
    }
    writer = gguf.GGUFWriter(path, arch)
    for i in range(hp["num_hidden_layers"]):
        for name, shape in shapes.items():
            writer.add_tensor(f"blk.{i}.{name}.weight", np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read(path: Path):
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def peft_tensors(adapter: Path) -> dict:
    return gguf_export.read_safetensors(adapter / "adapter_model.safetensors")


def test_writes_llamas_adapter_metadata_tensor_names_and_shapes(tiny, tmp_path):
    base, adapter = tiny
    done = write_adapter(adapter, base, tmp_path / "out" / "adapter.gguf", name="lorad v0001")
    fields, tensors = read(done.path)
    assert fields["general.type"] == "adapter" and fields["general.architecture"] == "llama"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == pytest.approx(8.0)
    assert fields["general.name"] == "lorad v0001"
    expected = {f"blk.{i}.{g}.weight.lora_{ab}" for i in range(2) for g in MODULES.values() for ab in "ab"}
    assert set(tensors) == expected and done.tensors == len(expected) == 28
    hp = json.loads((base / "config.json").read_text())
    kv = hp["num_key_value_heads"] * 32 // hp["num_attention_heads"]
    # ggml order: lora_a is [in, rank], lora_b [rank, out] (llama-adapter.cpp checks exactly this)
    assert list(tensors["blk.0.attn_q.weight.lora_a"].shape) == [32, 4]
    assert list(tensors["blk.0.attn_q.weight.lora_b"].shape) == [4, 32]
    assert list(tensors["blk.1.attn_k.weight.lora_b"].shape) == [4, kv]
    assert list(tensors["blk.1.ffn_down.weight.lora_a"].shape) == [64, 4]
    from lorad.release.registry import sha256_file

    assert done.sha256 == sha256_file(done.path)
    assert not list(done.path.parent.glob(".*tmp"))


def test_q_and_k_deltas_are_in_llama_cpps_row_order_the_rest_unchanged(tiny, tmp_path):
    """llama.cpp stores q/k rows per head as (first half, second half) interleaved; B @ A must follow."""
    base, adapter = tiny
    hp = json.loads((base / "config.json").read_text())
    heads = {"q_proj": hp["num_attention_heads"], "k_proj": hp["num_key_value_heads"]}
    _, tensors = read(write_adapter(adapter, base, tmp_path / "a.gguf").path)
    src = peft_tensors(adapter)
    for layer in range(2):
        for module, gname in MODULES.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            delta = src[key + ".lora_B.weight"] @ src[key + ".lora_A.weight"]
            a = np.asarray(tensors[f"blk.{layer}.{gname}.weight.lora_a"].data)
            b = np.asarray(tensors[f"blk.{layer}.{gname}.weight.lora_b"].data)
            exported = b @ a
            short = module.split(".")[-1]
            if short in heads:
                hd = delta.shape[0] // heads[short]
                # gguf row h*hd + 2i is HF row h*hd + i; gguf row h*hd + 2i + 1 is HF row h*hd + hd/2 + i
                order = [h * hd + (j // 2) + (j % 2) * (hd // 2) for h in range(heads[short]) for j in range(hd)]
                np.testing.assert_allclose(exported, delta[order], rtol=1e-5, atol=1e-7)
                assert not np.allclose(exported, delta)
            else:
                np.testing.assert_allclose(exported, delta, rtol=1e-5, atol=1e-7)


def test_version_export_writes_the_adapter_and_a_modelfile_checked_against_the_base_gguf(tiny, tmp_path):
    base, adapter = tiny
    work = shutil.copytree(adapter, tmp_path / "job-adapter")
    (tmp_path / "base dir").mkdir()
    base_gguf = write_base_gguf(tmp_path / "base dir" / "tiny.gguf", base)
    tables = [config.PublishSettings(kind="gguf", base=str(base_gguf))]
    record = gguf_export.version_export(tables, work, base, "HuggingFaceTB/x", name="job-1")
    assert record["base"] == str(base_gguf) and record["arch"] == "llama" and len(record["sha256"]) == 64
    assert (work / "Modelfile").read_text() == f'FROM "{base_gguf}"\nADAPTER ./adapter.gguf\n'
    assert gguf_export.check_version(tmp_path, "job-adapter")[0]
    # a base whose q projection has another width is refused, and nothing is left behind
    again = shutil.copytree(adapter, tmp_path / "job-2")
    wrong = write_base_gguf(tmp_path / "wrong.gguf", base, q_out=48)
    record = gguf_export.version_export([config.PublishSettings(kind="gguf", base=str(wrong))], again, base, "")
    assert "blk.0.attn_q.weight is [32, 48]" in record["refused"]
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in adapter.iterdir())
    ok, detail = gguf_export.check_version(tmp_path, "job-2")
    assert not ok and "no adapter.gguf" in detail
    # no gguf or ollama table: nothing to do
    assert gguf_export.version_export([config.PublishSettings(kind="command", argv=("x",))], again, base, "") is None


def test_base_gguf_of_another_architecture_is_refused(tiny, tmp_path):
    base, adapter = tiny
    other = write_base_gguf(tmp_path / "qwen.gguf", base, arch="qwen2")
    with pytest.raises(ExportRefused, match="architecture 'qwen2'"):
        write_adapter(adapter, base, tmp_path / "a.gguf", base_gguf=other)
    assert not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"alpha_pattern": {"q_proj": 32}}, "alpha_pattern"),
        ({"peft_type": "ADALORA"}, "plain LoRA"),
        ({"bias": "all"}, "bias"),
    ],
)
def test_refuses_adapter_configs_llama_cpp_would_apply_differently(tiny, tmp_path, change, match):
    base, adapter = tiny
    bad = copy_adapter(adapter, tmp_path / "bad", **change)
    with pytest.raises(ExportRefused, match=match):
        write_adapter(bad, base, tmp_path / "a.gguf")
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".*")) == []


def test_refuses_embedding_lm_head_and_extra_tensors():
    hp = {
        "architectures": ["LlamaForCausalLM"],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
    }
    cfg = {"peft_type": "LORA", "lora_alpha": 8}
    a, b = np.zeros((4, 32), np.float32), np.zeros((32, 4), np.float32)
    for tensors, match in [
        ({"base_model.model.lm_head.lora_A.weight": a, "base_model.model.lm_head.lora_B.weight": b}, "lm_head"),
        ({"base_model.model.model.embed_tokens.lora_embedding_A": a}, "embedding"),
        ({"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": a[0]}, "DoRA"),
        ({"base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias": a[0]}, "not a lora_A/lora_B"),
        ({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a}, "missing"),
    ]:
        with pytest.raises(ExportRefused, match=match):
            gguf_export.plan(cfg, tensors, hp)
    with pytest.raises(ExportRefused, match="GPT2LMHeadModel.*not supported"):
        gguf_export.plan(cfg, {}, hp | {"architectures": ["GPT2LMHeadModel"]})


@pytest.mark.parametrize("modules", [["embed_tokens"], ["q_proj", "embed_tokens"], ["lm_head"]])
def test_an_adapter_peft_trained_on_the_embedding_or_lm_head_is_refused_naming_the_module(tiny, tmp_path, modules):
    """peft saves such an adapter with the whole layer beside its LoRA (``base_layer.weight``),
    and that key, read first, was refused as "not a lora_A/lora_B weight" (issue 23)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, _ = tiny
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, target_modules=modules)
    )
    model.save_pretrained(tmp_path / "adapter")
    module = modules[-1]
    with pytest.raises(
        ExportRefused,
        match=rf"LoRA on {module} \((an embedding|the output) layer\) is not exported.*"
        r"leave it out of training.target_modules",
    ):
        write_adapter(tmp_path / "adapter", base, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_rslora_scaling_is_carried_in_alpha_and_mixed_scalings_are_refused():
    hp = {"architectures": ["Qwen2ForCausalLM"], "num_attention_heads": 4, "num_hidden_layers": 1}
    key = "base_model.model.model.layers.0.self_attn.{}.lora_{}.weight"
    tensors = {
        key.format("v_proj", "A"): np.ones((4, 8), np.float32),
        key.format("v_proj", "B"): np.ones((8, 4), np.float32),
    }
    arch, alpha, out = gguf_export.plan({"lora_alpha": 8, "use_rslora": True}, tensors, hp)
    # llama.cpp scales by alpha / rank; peft's rsLoRA by lora_alpha / sqrt(rank)
    assert arch == "qwen2" and alpha == pytest.approx(8 * math.sqrt(4)) and out[0][0] == "blk.0.attn_v.weight"
    tensors |= {
        key.format("o_proj", "A"): np.ones((2, 8), np.float32),
        key.format("o_proj", "B"): np.ones((8, 2), np.float32),
    }
    with pytest.raises(ExportRefused, match="one adapter.lora.alpha"):
        gguf_export.plan({"lora_alpha": 8, "use_rslora": True}, tensors, hp)
    # without rsLoRA a per-module rank still has one alpha: llama.cpp divides by each tensor's rank
    assert gguf_export.plan({"lora_alpha": 8}, tensors, hp)[1] == 8


def test_bf16_and_f16_adapters_are_read_without_torch(tmp_path):
    from safetensors.numpy import save_file

    values = np.array([[1.5, -2.25], [0.0, 3.0]], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    save_file({"x": values.astype(np.float16)}, tmp_path / "f16.safetensors")
    assert np.array_equal(gguf_export.read_safetensors(tmp_path / "f16.safetensors")["x"], values)
    # safetensors.numpy has no bfloat16; write its bytes with the BF16 dtype tag by hand
    header = json.dumps({"x": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "bf16.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bf16.tobytes())
    assert np.array_equal(gguf_export.read_safetensors(tmp_path / "bf16.safetensors")["x"], values)


def test_config_refuses_gguf_publishing_it_cannot_do():
    def problems(text):
        with pytest.raises(config.ConfigError) as e:
            config.loads(text)
        return str(e.value)

    assert "publish[0].base: required for kind 'gguf'" in problems('[[publish]]\nkind = "gguf"\n')
    assert "publish[0].base: must be an absolute path" in problems('[[publish]]\nkind = "gguf"\nbase = "x.gguf"\n')
    assert "publish[0].url" in problems('[[publish]]\nkind = "ollama"\nbase = "smollm2:135m"\n')
    assert "training.target_modules: ['lm_head']" in problems(
        '[training]\ntarget_modules = ["q_proj", "lm_head"]\n[[publish]]\nkind = "gguf"\nbase = "/m.gguf"\n'
    )
    assert "publish[1].base: every gguf and ollama table must name the same base" in problems(
        '[[publish]]\nkind = "gguf"\nbase = "/m.gguf"\n'
        '[[publish]]\nkind = "ollama"\nurl = "http://127.0.0.1:11434"\nbase = "/n.gguf"\n'
    )
    ok = config.loads(
        '[training]\nbase_model = "/models/base.gguf"\n[[publish]]\nkind = "gguf"\n'
        '[[publish]]\nkind = "ollama"\nurl = "http://127.0.0.1:11434"\n'
    )
    assert [t.kind for t in ok.publish] == ["gguf", "ollama"]
    assert gguf_export.publish_base(ok.publish, ok.training.base_model) == "/models/base.gguf"


def test_serve_preflight_refuses_a_missing_or_foreign_base_gguf(tiny, tmp_path):
    from lorad.daemon import preflight

    base, _ = tiny
    good = write_base_gguf(tmp_path / "llama.gguf", base)
    foreign = write_base_gguf(tmp_path / "phi.gguf", base, arch="phi3")

    def problems(path):
        s = config.loads(
            f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
            f'[[publish]]\nkind = "command"\nargv = ["true"]\n[[publish]]\nkind = "gguf"\nbase = "{path}"\n'
        )
        return [p for p in preflight.problems(s) if p.startswith("publish")]

    assert problems(good) == []
    assert problems(tmp_path / "gone.gguf") == [
        f"publish[1].base: {tmp_path / 'gone.gguf'} is not a readable GGUF file (No such file or directory)"
    ]
    assert problems(foreign) == [
        f"publish[1].base: {foreign} is architecture 'phi3'; GGUF adapters are written for llama, qwen2"
    ]


# -- misuse of export-adapter and of the export into a version ---------------------------------------


@pytest.fixture
def version(tiny, tmp_path):
    """A registry under tmp_path/state/adapters with one promoted version of the tiny adapter (with its GGUF)."""
    from lorad.release.registry import Registry

    base, adapter = tiny
    work = shutil.copytree(adapter, tmp_path / "job-adapter")
    base_gguf = write_base_gguf(tmp_path / "tiny.gguf", base)
    gguf_export.export_into_version(work, base, str(base_gguf))
    reg = Registry(tmp_path / "state" / "adapters")
    v = reg.create(work, {"base_model_path": str(base), "verdict": {"promote": True, "reasons": []}})
    reg.promote(v.name)
    return reg, v, base_gguf


def test_export_refuses_an_output_inside_the_registry(version, tmp_path):
    """`--output state/adapters/current/adapter.gguf` overwrote the version's own file, and
    `current` then failed verification; nothing inside the registry is an export target."""
    reg, v, base_gguf = version
    before = (v.path / "adapter.gguf").read_bytes()
    for out in (reg.root / "current" / "adapter.gguf", v.path / "other.gguf", reg.root / "stray.gguf"):
        with pytest.raises(ExportRefused, match="inside the adapter registry"):
            gguf_export.export_version(reg, v.name, out, str(base_gguf))
        assert not out.with_name(out.stem + ".Modelfile").exists()
    assert not (v.path / "other.gguf").exists() and not (reg.root / "stray.gguf").exists()
    assert (v.path / "adapter.gguf").read_bytes() == before
    assert reg.verify(v.name) == [] and reg.current() == v.name


def test_export_never_replaces_a_file_that_is_not_a_regular_one(version, tmp_path):
    """A device node (as root, /dev/null), a FIFO or a directory at --output is refused, left as it is."""
    import os
    import stat

    reg, v, base_gguf = version
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(ExportRefused, match="not a regular file"):
        gguf_export.export_version(reg, v.name, fifo, None)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    folder = tmp_path / "out.gguf"
    folder.mkdir()
    with pytest.raises(ExportRefused, match="is a directory"):
        gguf_export.export_version(reg, v.name, folder, None)
    assert folder.is_dir() and not list(folder.iterdir())
    # the Modelfile beside the output is held to the same rule
    (tmp_path / "m.Modelfile").mkdir()
    with pytest.raises(ExportRefused, match="m.Modelfile"):
        gguf_export.export_version(reg, v.name, tmp_path / "m.gguf", str(base_gguf))
    assert not (tmp_path / "m.gguf").exists()


def test_export_refuses_an_output_that_is_its_own_modelfile(version, tmp_path):
    """`--output v.Modelfile` wrote the GGUF, then the Modelfile over it, and reported success."""
    reg, v, base_gguf = version
    out = tmp_path / "v.Modelfile"
    with pytest.raises(ExportRefused, match="the Modelfile"):
        gguf_export.export_version(reg, v.name, out, str(base_gguf))
    assert not out.exists()
    done, modelfile = gguf_export.export_version(reg, v.name, tmp_path / "v.gguf", str(base_gguf))
    assert modelfile == tmp_path / "v.Modelfile" and done.path == tmp_path / "v.gguf"


@pytest.mark.parametrize("size", [24, 100])
def test_a_truncated_base_gguf_is_refused_in_one_line(tiny, tmp_path, size):
    """A cut base GGUF raised IndexError: `lorad serve` exited 1 with a traceback (systemd
    restarts that in a loop) instead of 78."""
    from lorad.daemon import preflight

    base, adapter = tiny
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(write_base_gguf(tmp_path / "whole.gguf", base).read_bytes()[:size])
    assert gguf_export.base_problem(str(cut)).startswith(f"{cut} is not a readable GGUF file")
    with pytest.raises(ExportRefused, match="not a readable GGUF file"):
        write_adapter(adapter, base, tmp_path / "a.gguf", base_gguf=cut)
    s = config.loads(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[[publish]]\nkind = "gguf"\nbase = "{cut}"\n')
    assert [p for p in preflight.problems(s) if p.startswith("publish")] == [
        f"publish[0].base: {gguf_export.base_problem(str(cut))}"
    ]


def test_serve_exits_78_on_a_truncated_base_gguf(tiny, tmp_path):
    import subprocess
    import sys

    base, _ = tiny
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(write_base_gguf(tmp_path / "whole.gguf", base).read_bytes()[:24])
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nsocket = "{tmp_path / "s.sock"}"\n'
        f'[[publish]]\nkind = "gguf"\nbase = "{cut}"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "lorad", "--config", str(cfg), "serve"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 78, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert f"publish[0].base: {cut} is not a readable GGUF file" in proc.stdout + proc.stderr


@pytest.mark.parametrize("failing", ["write_tensors_to_file", "modelfile"])
def test_a_full_disk_during_the_export_into_a_version_is_recorded_as_a_refusal(tiny, tmp_path, monkeypatch, failing):
    """ENOSPC while the GGUF (or its Modelfile) is written into a job's adapter failed the job,
    and the trained adapter was never kept; now the version is made without them."""
    import errno

    import gguf

    from lorad.training import jobdir

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    base, adapter = tiny
    work = shutil.copytree(adapter, tmp_path / "job-adapter")
    base_gguf = write_base_gguf(tmp_path / "tiny.gguf", base)
    if failing == "modelfile":
        monkeypatch.setattr(jobdir, "atomic_write", full)
    else:
        monkeypatch.setattr(gguf.GGUFWriter, failing, full)
    record = gguf_export.version_export(
        [config.PublishSettings(kind="gguf", base=str(base_gguf))], work, base, "HuggingFaceTB/x", name="job-1"
    )
    assert "No space left on device" in record["refused"]
    assert sorted(p.name for p in work.iterdir()) == sorted(p.name for p in adapter.iterdir())


def test_export_adapter_says_in_one_line_why_it_cannot_write(version, tmp_path, capsys):
    """An unwritable place for --output gave a traceback."""
    from lorad import cli

    _, v, _ = version
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    (tmp_path / "a-file").write_text("x")
    for out, why in ((tmp_path / "a-file" / "x.gguf", "Not a directory"), (Path("/proc/lorad-x.gguf"), "cannot write")):
        capsys.readouterr()
        code = cli.main(["--config", str(cfg), "export-adapter", v.name, "--output", str(out)])
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert str(out) in err and why in err
