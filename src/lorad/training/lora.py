"""Model and adapter setup, and the trl trainers (SFT, DPO, KTO, GRPO). Imported by the worker only.

One code path for every device: on the CPU fp32 and nothing else; on CUDA bf16 where the
device supports it (fp16 otherwise), gradient checkpointing, and 4-bit QLoRA when asked
(``quantization = "4bit"``, or "auto") and bitsandbytes is importable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorad.config import TrainingSettings

# Columns each method's trainer reads; everything else in a row (metadata, ids) is dropped.
COLUMNS = {
    "sft": ("prompt", "completion"),
    "dpo": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
    "grpo": ("prompt", "specification"),
}


@dataclass(frozen=True)
class Precision:
    dtype: str  # "float32", "bfloat16", "float16" or "4bit"
    bf16: bool
    fp16: bool
    gradient_checkpointing: bool
    use_cpu: bool


def precision(device_kind: str, dtype: str, gradient_checkpointing: bool) -> Precision:
    cuda = device_kind == "cuda"
    return Precision(
        dtype,
        bf16=cuda and dtype in ("bfloat16", "4bit"),
        fp16=cuda and dtype == "float16",
        gradient_checkpointing=cuda and gradient_checkpointing,
        use_cpu=not cuda,
    )


def load_model(
    model_dir: str, prec: Precision, *, local_files_only: bool = True, sharded: bool = False, whole: bool = False
):
    """The base model and its tokenizer (which must carry a chat template).

    Args:
        sharded: the model will be sharded by FSDP2: a 4-bit model is loaded with its quantized
            storage and every other weight in the compute dtype (:func:`quantization_config`),
            and is not prepared by peft's ``prepare_model_for_kbit_training``, which would cast
            the norms to fp32 (FSDP2 shards a module's parameters only when they share a dtype).
        whole: the one-process reload after a sharded run: on CUDA spread over every visible
            device (``device_map="auto"``), as the model may not fit one.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=local_files_only)
    if not tokenizer.chat_template:
        raise ValueError(
            f"the tokenizer of {model_dir} has no chat template; lorad formats every "
            f"example with the model's own template"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict = {"local_files_only": local_files_only}
    if prec.dtype == "4bit":
        kwargs["quantization_config"] = quantization_config(sharded)
        if sharded:
            kwargs["dtype"] = COMPUTE_DTYPE
    else:
        kwargs["dtype"] = getattr(torch, prec.dtype)
    if whole and not prec.use_cpu:
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if prec.dtype == "4bit" and not (sharded or whole):  # (whole: scored, not trained)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=prec.gradient_checkpointing)
    return model, tokenizer


# 4-bit QLoRA computes in bf16 (lorad takes 4-bit only where CUDA and bitsandbytes are).
COMPUTE_DTYPE = "bfloat16"


def quantization_config(sharded: bool):
    """bitsandbytes' NF4 config lorad loads a 4-bit base with.

    Sharded (FSDP2), the quantized weights are stored in the compute dtype
    (``bnb_4bit_quant_storage``) rather than uint8: FSDP shards floating-point tensors only, and
    shards a layer's weights together only when they share one dtype (bitsandbytes' FSDP-QLoRA
    guide). Otherwise bitsandbytes' default storage (uint8) is kept.
    """
    import torch
    from transformers import BitsAndBytesConfig

    compute = getattr(torch, COMPUTE_DTYPE)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        **({"bnb_4bit_quant_storage": compute} if sharded else {}),
    )


def load_adapter(model, adapter_dir: str):
    """A PeftModel of ``model`` with the saved adapter in ``adapter_dir`` (for scoring, not training)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir).eval()


def attach_adapter(model, *, r: int, alpha: int, dropout: float, target_modules, parent_adapter: str | None = None):
    """A PeftModel: warm-started from ``parent_adapter`` (trainable), or a fresh LoRA.

    A fresh adapter's B matrices are zero, so before any step it changes nothing.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    if parent_adapter:
        return PeftModel.from_pretrained(model, parent_adapter, is_trainable=True)
    targets = list(target_modules)
    if "all-linear" in targets:
        targets = linear_module_names(model)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM", bias="none", target_modules=targets
    )
    return get_peft_model(model, config)


def linear_module_names(model) -> list[str]:
    """Short names of every linear layer but the output head ("all-linear").

    Why spelled out: peft would record "all-linear" as full module paths, and inference
    servers (vLLM's --lora-modules) expect the short names (q_proj, ...) in the config.
    """
    import torch

    output = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        quantized = type(module).__name__ in ("Linear4bit", "Linear8bitLt")  # bitsandbytes' linears
        if (isinstance(module, torch.nn.Linear) or quantized) and module is not output:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def dataset(rows: list[dict], method: str):
    """A datasets.Dataset with only the columns the method's trainer reads."""
    from datasets import Dataset

    columns = COLUMNS[method]
    missing = [c for c in columns if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"training rows lack {missing} needed by method {method!r} (the rows have {sorted(rows[0])})")
    return Dataset.from_list([{c: r[c] for c in columns} for r in rows])


def training_arguments(
    method: str,
    *,
    output_dir: str,
    prec: Precision,
    learning_rate: float,
    max_steps: int,
    epochs: float,
    batch_size: int,
    grad_accum: int,
    max_seq_length: int,
    save_steps: int,
    seed: int,
    packing: bool = False,
    padding_free: bool = False,
    liger: bool = False,
    num_generations: int = TrainingSettings.num_generations,
    max_completion_length: int = TrainingSettings.max_completion_length,
    temperature: float = TrainingSettings.temperature,
    beta: float = TrainingSettings.beta,
):
    """The trl config for ``method``; checkpoints go to ``output_dir`` every ``save_steps``.

    Logging every step (NaN filter off) is what lets the worker see a NaN loss at the step it
    happens and stream progress. For GRPO ``batch_size`` counts completions (whole groups of
    ``num_generations``); the last four arguments are GRPO's alone.
    """
    from trl import DPOConfig, GRPOConfig, KTOConfig, SFTConfig

    common: dict[str, Any] = dict(
        output_dir=output_dir,
        learning_rate=learning_rate,
        max_steps=max_steps or -1,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=None,
        logging_steps=1,
        logging_nan_inf_filter=False,
        report_to=[],
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        bf16=prec.bf16,
        fp16=prec.fp16,
        use_cpu=prec.use_cpu,
        activation_checkpointing=prec.gradient_checkpointing,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        max_length=max_seq_length,
        dataset_num_proc=None,
        remove_unused_columns=True,
        ddp_find_unused_parameters=False,
        # Liger's layer kernels; trl keeps its own chunked LM head (Liger's fused linear
        # cross-entropy would replace the forward it patches), which already never holds the logits.
        use_liger_kernel=liger,
    )
    if method == "grpo":
        # Why no max_length, and no token counting by the Trainer: GRPOConfig has neither
        # (prompts are not cut; GRPO counts prompt and completion tokens itself).
        for key in ("max_length", "dataset_num_proc", "include_num_input_tokens_seen", "remove_unused_columns"):
            common.pop(key)
        return GRPOConfig(
            **common,
            num_generations=num_generations,
            max_completion_length=max_completion_length,
            temperature=temperature,
            beta=beta,
            remove_unused_columns=False,
            include_num_input_tokens_seen="no",
        )
    if method == "sft":
        return SFTConfig(**common, packing=packing, padding_free=padding_free or packing, completion_only_loss=True)
    if method == "dpo":
        return DPOConfig(**common)
    if method == "kto":
        return KTOConfig(**common)
    raise ValueError(f"unknown training method {method!r} (expected sft, dpo, kto or grpo)")


def trainer(method: str, model, tokenizer, train_dataset, args, callbacks, reward=None):
    """The trl trainer for ``method``; for DPO and KTO the reference is the model with its
    adapter disabled (peft), so no second copy of the base is loaded. GRPO takes ``reward``
    (see :class:`lorad.training.grpo.GuardReward`); with beta > 0 its reference is a frozen
    copy of the starting adapter (trl's "ref" adapter, dropped again before saving)."""
    from trl import DPOTrainer, GRPOTrainer, KTOTrainer, SFTTrainer

    if method == "grpo":
        return GRPOTrainer(
            model=model,
            reward_funcs=[reward],
            args=args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    cls = {"sft": SFTTrainer, "dpo": DPOTrainer, "kto": KTOTrainer}[method]
    return cls(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer, callbacks=callbacks)
