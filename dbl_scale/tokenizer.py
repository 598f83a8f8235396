"""The run's tokenizer: where it is (`tokenizer_path`), and a small WordPiece tokenizer trained
offline on the training captions when a data set has none (`ensure_tokenizer`)."""
from __future__ import annotations

import shutil
from pathlib import Path

from .data import read_samples, sample_meta, split_shards
from .hub import local_folder
from .shards import DataError, is_shard_list


def build_tokenizer(captions: list[str], out_dir: str | Path, vocab_size: int = 2000):
    """Train a small WordPiece tokenizer on the captions (offline) and save it as a HF folder."""
    # heavy (seconds): only a data set without a tokenizer needs them
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(captions, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                show_progress=False))  # a second of work: no bars
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(str(tmp))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)  # atomic: a reader sees no folder or a complete one
    return fast


def tokenizer_path(data_cfg, text_cfg) -> Path:
    """Where the tokenizer is: data.tokenizer; the pretrained text tower's own; else a
    `tokenizer/` folder beside the data (built there from the training captions when missing):
    in data.root when it is a folder, in data.eval_root for shard patterns and URLs."""
    if data_cfg.tokenizer:
        return Path(data_cfg.tokenizer)
    if text_cfg.pretrained:
        return Path(local_folder(text_cfg.pretrained, "model.text.pretrained"))
    if not is_shard_list(data_cfg.root):
        return Path(data_cfg.root) / "tokenizer"
    if data_cfg.eval_root:
        return Path(data_cfg.eval_root) / "tokenizer"
    raise DataError(f"data.root {data_cfg.root} names shards, with no folder to keep a tokenizer in: set "
                    "data.tokenizer=FOLDER (a Hugging Face tokenizer) or data.eval_root=FOLDER")


def ensure_tokenizer(data_cfg, text_cfg):
    """Load the tokenizer; build it from the training captions when the default one is missing."""
    from transformers import AutoTokenizer  # heavy: imported when a tokenizer is needed

    path = tokenizer_path(data_cfg, text_cfg)
    if not path.exists():
        if data_cfg.tokenizer or text_cfg.pretrained:
            raise DataError(f"tokenizer folder {path} does not exist")
        urls, _ = split_shards(data_cfg.root, data_cfg.train_split, data_cfg.samples_per_epoch)
        captions = [c for s in read_samples(urls) for c in sample_meta(s)[1]]
        build_tokenizer(captions, path)
    return AutoTokenizer.from_pretrained(str(path))
