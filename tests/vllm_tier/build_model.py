"""Build a tiny randomly initialised Llama and its tokenizer, locally, with no downloads.

The real-vLLM tier needs *a* model that vLLM's CPU backend loads and runs; its
weights do not matter (random output is fine: we count tokens, not meaning).
Shape: hidden 256, head_dim 64 (vLLM's CPU attention needs head_dim 64 or more;
16 fails), 2 layers, 4 heads, vocab 4096. The tokenizer is a ``tokenizers``
WordLevel model over a generated vocabulary, wrapped in
``PreTrainedTokenizerFast`` so vLLM's Hugging Face loader accepts it.

Runs inside ``.venv-vllm`` (it needs torch and transformers, which the project
venv does not carry): ``.venv-vllm/bin/python -m tests.vllm_tier.build_model DIR``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

VOCAB_SIZE = 4096
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
# A few real words first, so prompts read as text in logs; the rest are generated.
WORDS = ("the", "a", "of", "to", "and", "in", "is", "it", "that", "for", "on", "with",
         "as", "was", "at", "by", "be", "this", "from", "or", "an", "are", "but", "not",
         "token", "decode", "prefill", "cache", "model", "server", "request", "stream")


def build_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for word in (*SPECIALS, *WORDS):
        vocab.setdefault(word, len(vocab))
    n = 0
    while len(vocab) < VOCAB_SIZE:
        vocab.setdefault(f"w{n}", len(vocab))
        n += 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")   # joins word tokens with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.model_max_length = 2048
    fast.save_pretrained(out_dir)


def build_model(out_dir: Path, *, seed: int = 0) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=512,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=64,
        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)


def build(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir)
    build_model(out_dir)
    (out_dir / "heteroscale-tiny.json").write_text(json.dumps({"vocab_size": VOCAB_SIZE}))
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    print(build(args.out_dir))


if __name__ == "__main__":
    main()
