"""A tiny Llama and its tokenizer, built in-process: no download, a few seconds on a CPU.

Tests, ``lorad demo --tiny`` and the benchmark use it wherever a real model is not the point.
The tokenizer is a byte-level BPE trained on a small corpus of chat-formatted code, so it
encodes any text; the chat template is ChatML (the format SmolLM2-Instruct uses), which
makes the rendered prompt a prefix of prompt + completion, as trl needs for completion-only
loss.

    from lorad.training.tiny import build_tiny_model
    build_tiny_model("/tmp/tiny")       # config.json, model.safetensors, tokenizer files
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>")

_CORPUS = [
    "def is_even(n):\n    return n % 2 == 0\n",
    "def add(a, b):\n    return a + b\n",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n"
    "    def push(self, x):\n        self.items.append(x)\n",
    "Write a function that returns the sum of a list of numbers.",
    "The guard rejected the attempt: AssertionError: expected 4, got 5. Fix the off-by-one error.",
    "Previous attempt failed with feedback: SyntaxError: invalid syntax on line 3.",
    "You are a careful Python programmer. Answer with code only.",
    "import pytest\n\ndef test_add():\n    assert add(2, 2) == 4\n",
    "for i in range(10):\n    print(i * i)\n",
    "Specification: implement reverse(s) returning the string reversed.",
    "def reverse(s):\n    return s[::-1]\n",
]


def train_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (``PreTrainedTokenizerFast``) with the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    chat = [
        f"<|im_start|>user\n{a}<|im_end|>\n<|im_start|>assistant\n{b}<|im_end|>\n"
        for a, b in zip(_CORPUS, reversed(_CORPUS), strict=True)
    ]
    tok.train_from_iterator((_CORPUS + chat) * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def build_tiny_model(
    directory, *, hidden_size: int = 32, layers: int = 2, vocab_size: int = 512, seed: int = 0
) -> Path:
    """Write a randomly initialised tiny Llama and its tokenizer to ``directory``.

    Args:
        directory: created if missing; receives config.json, model.safetensors, the tokenizer
            files and generation_config.json, loadable with ``from_pretrained(directory)``.
        hidden_size, layers, vocab_size: the model's size (defaults: 32, 2, 512).
        seed: the same seed gives the same weights.

    Returns:
        The directory, as a Path.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
