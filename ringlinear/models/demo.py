"""Random-weight checkpoints in the published layout, with a real byte-level BPE tokenizer and chat template: what
`ringlinear demo` generates from, and what the tests and benchmarks load. Nothing is downloaded: the tokenizer is
learnt from a short embedded text in well under a second.
"""
from __future__ import annotations

import os
import tempfile

import torch

from .modeling import RingLinearForCausalLM
from .presets import get_preset
from .tokenizer import train_byte_level_bpe, write_tokenizer_files

_TEXT = """The hybrid model interleaves linear attention layers with softmax attention layers.
Each linear layer keeps a fixed-size state, so long prompts are cheap to prefill and decode.
def add(a, b):\n    return a + b\n\nclass Cache:\n    def __init__(self):\n        self.items = {}\n
<role>HUMAN</role>Hello, who are you?<|role_end|><role>ASSISTANT</role>I am a small test model.<|role_end|>
Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation: , . ; : ! ? ( ) [ ] { } = + - * / # @ ' \"
"""


def train_tiny_tokenizer(vocab_size: int):
    """A byte-level BPE learnt from the embedded text (at most a few hundred merges: the text is short)."""
    return train_byte_level_bpe([_TEXT] * 4, vocab_size)


def make_tiny_checkpoint(path: str, preset: str = "tiny", seed: int = 0, dtype=torch.float32, **overrides) -> str:
    """Write a random-weight checkpoint (config, safetensors, tokenizer files) to `path` and return it."""
    cfg = get_preset(preset).replace(eos_token_id=[1, 2], pad_token_id=1, bos_token_id=0, **overrides)
    model = RingLinearForCausalLM.from_config(cfg, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.modules():  # a non-zero bias exercises the selection-only path
            if hasattr(mod, "expert_bias"):
                mod.expert_bias.copy_(torch.randn(mod.expert_bias.shape, generator=gen) * 0.01)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as staging:
        write_tokenizer_files(staging, train_tiny_tokenizer(min(cfg.vocab_size, 4096)))
        model.save_pretrained(path, tokenizer_dir=staging)
    return path
