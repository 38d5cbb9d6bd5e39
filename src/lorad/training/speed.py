"""How fast a run trains, where it can be made faster without changing what it computes.

Imported by the worker (and the benchmarks) only; it imports torch and trl lazily.

- **Threads**: torch uses every core the process may run on (``os.sched_getaffinity``: a
  cgroup cpuset, ``taskset`` or systemd's ``CPUAffinity=``), shared between the ranks of a
  multi-process run; ``OMP_NUM_THREADS``, when set, wins.
- **Packing** (padding-free, exact): trl's BFD packing concatenates rows into one sequence
  with position ids restarting at each row and no attention mask; the attention stays within
  each row only if the model turns the restarting position ids into a block-diagonal mask
  (transformers' ``masking_utils`` does for eager, sdpa and flex attention; flash-attention's
  varlen kernels take the row boundaries instead). :func:`packing_problem` checks that on the
  loaded model itself rather than trusting a list of names.
- **Completion logits**: the loss reads only the positions whose label is not -100 (the
  answer; never the prompt and its feedback history). :func:`completion_head` runs the LM head
  and the log-softmax over the 49k-entry vocabulary on those positions alone.
"""

from __future__ import annotations

import functools
import os
import types

# Vocabulary columns per tile of the chunked LM head (trl's own default).
VOCAB_CHUNK = 32768
# The packed forward must differ from the rows run one by one by under this fraction of what a
# leaking attention (rows attending to earlier rows) would change: a mask bug moves the logits
# by the order of the leak itself, rounding (bf16 included) by orders of magnitude less.
PACKING_TOLERANCE = 0.01

# Config attributes that scale or cap the logits; a model with any of them keeps trl's head,
# which applies them (lorad's completion head assumes plain logits).
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def cpu_threads(environ=os.environ) -> int:
    """Torch threads for this process: ``OMP_NUM_THREADS`` when set, else the cores this process
    may run on divided among the local ranks (``LOCAL_WORLD_SIZE``), at least 1."""
    explicit = environ.get("OMP_NUM_THREADS", "")
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    cores = len(os.sched_getaffinity(0))
    ranks = int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(ranks, 1))


def configure_threads(environ=os.environ) -> int:
    """Set torch's intra-op threads from :func:`cpu_threads`; returns the number."""
    import torch

    n = cpu_threads(environ)
    torch.set_num_threads(n)
    return n


def packing_problem(model, tokenizer) -> str | None:
    """Why padding-free packing would not be exact on ``model``, or None when it is.

    Runs three tiny forwards (no gradient): a second row alone; the two rows packed the way
    trl's padding-free collator packs them (one sequence, restarting position ids, no mask);
    and the same packed sequence with an all-ones mask, which lets the second row attend to
    the first (what a model that ignores the restarting positions would do). Packing is exact
    when the packed logits of the second row match the row alone far more closely than the
    leaking ones do.
    """
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    implementation = getattr(model.config, "_attn_implementation", None)
    vocab = model.get_input_embeddings().weight.shape[0]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [i for i in range(min(vocab, 2000)) if i not in special]
    quarter = len(ids) // 4
    first, second = ids[quarter : quarter + 7], ids[3 * quarter : 3 * quarter + 5]
    device = model.get_input_embeddings().weight.device
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id or 0, padding_free=True)
    packed = collator([{"input_ids": first}, {"input_ids": second}])
    packed = {k: v.to(device) if torch.is_tensor(v) else v for k, v in packed.items() if k != "labels"}
    n = len(first)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([second], device=device)).logits[0].float()
            exact = model(**packed, use_cache=False).logits[0, n:].float()
            leaky = (
                model(
                    input_ids=packed["input_ids"],
                    position_ids=packed["position_ids"],
                    attention_mask=torch.ones_like(packed["input_ids"]),
                    use_cache=False,
                )
                .logits[0, n:]
                .float()
            )
    except Exception as e:  # a model whose forward refuses the packed inputs
        return f"the model's forward refuses padding-free inputs ({type(e).__name__}: {str(e)[:160]})"
    finally:
        model.train(was_training)
    error = (exact - alone).abs().max().item()
    leak = (leaky - alone).abs().max().item()
    if error <= PACKING_TOLERANCE * leak or error == 0.0:
        return None
    return (
        f"attention implementation {implementation!r} of {type(model).__name__} does not keep packed rows "
        f"apart (restarting position ids are not turned into a block-diagonal mask: a packed row's logits "
        f"moved by {error:.3g}, a leaking attention moves them by {leak:.3g})"
    )


def completion_head(model) -> bool:
    """Score only the completion positions in the SFT loss; returns whether it was installed.

    trl's SFTTrainer patches the model's forward with a chunked LM head (no full logits in
    memory) that, off Triton devices, still projects every position and also computes the
    entropy and top-1 accuracy it logs. This replaces it, for models with plain logits, by one
    that projects only the positions whose next-token label is not -100 and computes the
    log-probabilities alone: the same loss and gradients, without the LM head's work on prompt
    tokens (on lorad's rows, with their feedback history, most of them). trl's logged
    ``entropy`` and ``mean_token_accuracy`` read 0.

    Call after the trainer is built (trl installs its head in the constructor); the model may
    be a PeftModel.
    """
    import torch
    from torch.distributed.tensor import DTensor

    try:  # trl >= 1.16: the chunked head this builds on
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        from trl.trainer.utils import FusedCausalLMOutput
    except ImportError:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    text = base.config.get_text_config()
    if any(getattr(text, name, None) is not None for name in _LOGIT_TRANSFORMS):
        return False
    trl_forward = base.forward  # trl's head: kept for the cases below that this one does not cover

    @functools.wraps(type(base).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or shift_labels is not None or getattr(text, "output_router_logits", False):
            return trl_forward(
                *args,
                fused_lm_head=fused_lm_head,
                labels=labels,
                shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        kwargs["use_cache"] = False
        head = self.get_output_embeddings()
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1].to(head.weight.device)
        labels = labels[:, 1:].to(head.weight.device)
        mask = labels != -100
        weight, bias = head.weight, head.bias
        if isinstance(weight, DTensor):  # FSDP2's shard of the head: gathered (differentiably), as trl does
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        log_probs = ChunkedLogProbFunction.apply(
            hidden[mask], weight, bias, labels[mask], 1.0, VOCAB_CHUNK, None, 1.0, ("log_probs",)
        )[0]
        # masked_scatter keeps a batch without any label connected to the graph (a zero loss).
        per_token = log_probs.new_zeros(mask.shape).masked_scatter(mask, log_probs)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        zeros = torch.zeros_like(per_token)
        return FusedCausalLMOutput(
            loss=-per_token.sum() / count, log_probs=per_token, entropy=zeros, is_top1=zeros.bool(), label_mask=mask
        )

    base.forward = types.MethodType(forward, base)
    return True


class Refused(Exception):
    "A setting asks for a speed-up this run cannot have as it is; the message names the key and why."


def decide_packing(setting, method: str, model, tokenizer) -> tuple[bool, str]:
    """(pack?, why) for ``training.packing`` = "auto", True or False on this loaded model.

    Raises:
        Refused: packing = true where it would not be exact (or the method is not SFT).
    """
    if setting is False:
        return False, "training.packing = false"
    if method != "sft":
        if setting is True:
            raise Refused(f"training.packing = true packs SFT rows only; method is {method!r}")
        return False, f"packing applies to SFT only (method {method!r})"
    problem = packing_problem(model, tokenizer)
    if problem is None:
        return True, "exact: packed rows are kept apart by the attention mask (checked on the model)"
    if setting is True:
        raise Refused(f'training.packing = true would not be exact: {problem}; set it to "auto" or false')
    return False, problem


def liger_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def use_liger(setting, device_kind: str) -> bool:
    """Whether to apply Liger's kernels for ``training.liger_kernel`` = "auto", True or False.

    Raises:
        Refused: liger_kernel = true without CUDA or without the liger-kernel package.
    """
    if setting is False:
        return False
    usable = device_kind == "cuda" and liger_available()
    if setting is True and not usable:
        why = "this run is on the CPU" if device_kind != "cuda" else "the liger-kernel package is not installed"
        raise Refused(
            f"training.liger_kernel = true needs CUDA and liger-kernel (Triton kernels), but {why}; "
            f'set it to "auto" or false'
        )
    return usable
