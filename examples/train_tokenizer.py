"""Train a small byte-level BPE tokenizer offline on the embedded corpus (the standard library's
sources), with the `tokenizers` library: about 2,000 ids and `<|endoftext|>` as the end of a
document, in seconds. It is the test tokenizer of moeflow's data tests and a starting point for
your own (train one on your corpus: `train_bpe(your_texts, "runs/my_tokenizer", 32_000)`).

    python examples/train_tokenizer.py runs/tokenizer            # writes runs/tokenizer/
    moeflow data prepare stdlib --tokenizer runs/tokenizer --out runs/stdlib_bpe

The folder holds `tokenizer.json` and a `tokenizer_config.json` naming the end-of-document token,
so both `tokenizers` and `transformers.AutoTokenizer` load it.

Example:
    >>> import tempfile
    >>> folder = train_bpe(["def f(x):\\n    return x\\n"] * 50, tempfile.mkdtemp(), 300)
    >>> from tokenizers import Tokenizer
    >>> tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    >>> tok.decode(tok.encode("return x").ids), tok.token_to_id("<|endoftext|>")
    ('return x', 0)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

EOD = "<|endoftext|>"
SAMPLE_BYTES = 2_000_000  # a few MB of text: seconds of training, ids that fit Python source


def train_bpe(texts: list[str], out_folder: str | Path, vocab_size: int = 2000) -> Path:
    """A byte-level BPE with `vocab_size` ids trained on `texts`, saved into `out_folder`
    (created) as `tokenizer.json` + `tokenizer_config.json`; the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Byte-level: every text encodes (no unknown ids) and decodes back exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOD], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    folder = Path(out_folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD, "bos_token": EOD}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return folder


def stdlib_sample(max_bytes: int = SAMPLE_BYTES, every: int = 5) -> list[str]:
    """Every `every`-th file of the embedded corpus, in path order, up to `max_bytes` of text."""
    from moeflow.data.byte_corpus import stdlib_files, stdlib_root

    root = stdlib_root()
    files = sorted(stdlib_files(root), key=lambda p: p.relative_to(root).as_posix())
    texts, size = [], 0
    for path in files[::every]:
        texts.append(path.read_text(encoding="utf-8"))
        size += len(texts[-1])
        if size >= max_bytes:
            break
    return texts


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/train_tokenizer.py OUT_FOLDER")
    out = train_bpe(stdlib_sample(), sys.argv[1])
    print(f"wrote {out}/tokenizer.json; use it with --tokenizer {out}")
