"""Small real checkpoints for tests and demos: random weights, a real byte-level BPE tokenizer, a chat template.

Nothing is downloaded: the tokenizer is trained on a short embedded text in well under a second.
"""
from __future__ import annotations

import json
import os

import torch

from .models.config import get_preset

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<|role_end|>"]  # ids 0, 1, 2
# Ring-2.0 style turns: <role>HUMAN</role>...<|role_end|>; the generation prompt is <role>ASSISTANT</role>.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% set role = {'system': 'SYSTEM', 'user': 'HUMAN', 'assistant': 'ASSISTANT', 'tool': 'OBSERVATION'}"
    "[m['role']] %}"
    "<role>{{ role }}</role>{{ m['content'] }}<|role_end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}"
)
_TEXT = """The hybrid model interleaves linear attention layers with softmax attention layers.
Each linear layer keeps a fixed-size state, so long prompts are cheap to prefill and decode.
def add(a, b):\n    return a + b\n\nclass Cache:\n    def __init__(self):\n        self.items = {}\n
<role>HUMAN</role>Hello, who are you?<|role_end|><role>ASSISTANT</role>I am a small test model.<|role_end|>
Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation: , . ; : ! ? ( ) [ ] { } = + - * / # @ ' \"
"""


@torch.no_grad()
def perturb_norms_and_biases(model, seed: int = 0, bias_std: float = 0.05):
    """Give norm weights (1 + 0.1 N) and expert biases (bias_std N) random values, so no term of a test hides
    behind a weight of 1 or a bias of 0. Returns the model."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if hasattr(mod, "expert_bias"):
            mod.expert_bias.copy_(torch.randn(mod.expert_bias.shape, generator=g) * bias_std)
        if hasattr(mod, "variance_epsilon") and hasattr(mod, "weight"):
            mod.weight.copy_(1 + 0.1 * torch.randn(mod.weight.shape, generator=g))
    return model


def train_tiny_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TEXT] * 4, trainer=trainer)
    return tok


def write_tokenizer_files(out_dir: str, tok, eos_ids=(1, 2), chat_template: str = CHAT_TEMPLATE) -> None:
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS[0],
                   "eos_token": SPECIAL_TOKENS[2], "pad_token": SPECIAL_TOKENS[1], "add_bos_token": False,
                   "add_eos_token": False, "chat_template": chat_template}, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": list(eos_ids), "pad_token_id": 1}, f, indent=2)


def make_tiny_checkpoint(path: str, preset: str = "tiny", seed: int = 0, dtype=torch.float32, **overrides) -> str:
    """Write a random-weight checkpoint (config, safetensors, tokenizer files) to `path` and return it."""
    from .models.modeling import RingLinearForCausalLM
    cfg = get_preset(preset).replace(eos_token_id=[1, 2], pad_token_id=1, bos_token_id=0, **overrides)
    model = RingLinearForCausalLM.from_config(cfg, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for mod in model.modules():  # a non-zero bias exercises the selection-only path
        if hasattr(mod, "expert_bias"):
            mod.expert_bias.copy_(torch.randn(mod.expert_bias.shape, generator=gen) * 0.01)
    staging = path + ".tok"
    os.makedirs(staging, exist_ok=True)
    tok = train_tiny_tokenizer(min(cfg.vocab_size, 4096))
    write_tokenizer_files(staging, tok)
    model.save_pretrained(path, tokenizer_dir=staging)
    for fn in os.listdir(staging):
        os.remove(os.path.join(staging, fn))
    os.rmdir(staging)
    return path
