"""Train the embedded demo model: a small Llama that writes Python, from the standard library's own source.

Every machine with Python has the corpus, so the model can be re-created anywhere without a
download. Patch releases change stdlib files, so the file list is pinned with sha256 hashes
(scripts/demo_corpus.json); a file that differs stops the run with its name.

    python scripts/train_demo_model.py --out splitfuse/data/demo_model     # about 18 min on 2 cores
    python scripts/train_demo_model.py --pin                               # rewrite the pinned list

Reproducible: fixed seed, 2 threads, fixed number of steps. The model is trained with
transformers' own LlamaForCausalLM in float32 and saved in bfloat16 safetensors with its
tokenizer (byte-level BPE built with `tokenizers`), a generation config and a model card that
records the held-out loss.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import pathlib
import sys
import sysconfig
import time

CORPUS_LIST = pathlib.Path(__file__).with_name("demo_corpus.json")
# Files never trained on: the held-out loss and the parity tests read them.
HELD_OUT = ("fractions.py", "textwrap.py", "heapq.py", "bisect.py", "colorsys.py", "shlex.py", "queue.py", "sched.py")
VOCAB_SIZE = 4096
SPECIAL = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2, as the tiny test tokenizer
MODEL_SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                   intermediate_size=768, max_position_embeddings=1024, rope_theta=10000.0)


def stdlib_dir() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def candidate_files() -> list[pathlib.Path]:
    """Top-level stdlib modules, except the machine-specific sysconfig data."""
    return sorted(p for p in stdlib_dir().glob("*.py") if not p.name.startswith("_sysconfigdata"))


def pin() -> None:
    files = {p.name: sha256(p) for p in candidate_files()}
    CORPUS_LIST.write_text(json.dumps({"python": sys.version.split()[0], "files": files}, indent=1) + "\n")
    print(f"pinned {len(files)} files of Python {sys.version.split()[0]} in {CORPUS_LIST}")


def pinned_texts() -> dict[str, str]:
    """name -> text of every pinned file, after checking its hash."""
    pinned = json.loads(CORPUS_LIST.read_text())
    root, texts, bad = stdlib_dir(), {}, []
    for name, digest in pinned["files"].items():
        path = root / name
        if not path.exists() or sha256(path) != digest:
            bad.append(name)
            continue
        texts[name] = path.read_text(encoding="utf-8")
    if bad:
        raise SystemExit(f"these stdlib files are missing or differ from Python {pinned['python']}'s "
                         f"(this is {sys.version.split()[0]}): {', '.join(bad[:10])}; the demo model is "
                         "reproducible only with the pinned files")
    return texts


def build_tokenizer(train_texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train_texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    assert [tok.token_to_id(t) for t in SPECIAL] == [0, 1, 2]
    return tok


def encode_corpus(tok, texts: list[str]):
    """One long id stream: each file starts with BOS and ends with EOS, so the model learns both."""
    import torch

    ids: list[int] = []
    for encoding in tok.encode_batch(texts, add_special_tokens=False):
        ids += [1] + encoding.ids + [2]
    return torch.tensor(ids, dtype=torch.int64)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def evaluate(model, stream, seq_len: int, max_windows: int = 64) -> float:
    """Mean next-token loss over consecutive windows of the held-out stream."""
    import torch

    windows = stream[: (len(stream) // seq_len) * seq_len].view(-1, seq_len)[:max_windows]
    model.eval()
    losses = []
    with torch.no_grad():
        for batch in windows.split(16):
            losses.append(model(input_ids=batch, labels=batch).loss.item() * len(batch))
    model.train()
    return sum(losses) / len(windows)


def train(args) -> None:
    import torch
    import transformers

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    texts = pinned_texts()
    held = [texts.pop(name) for name in HELD_OUT]
    train_texts = [texts[n] for n in sorted(texts)]
    tok = build_tokenizer(train_texts)
    train_ids, held_ids = encode_corpus(tok, train_texts), encode_corpus(tok, held)
    print(f"corpus: {len(train_texts)} files, {len(train_ids):,} training tokens, {len(held_ids):,} held-out")

    config = transformers.LlamaConfig(vocab_size=VOCAB_SIZE, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                      tie_word_embeddings=True, **MODEL_SHAPE)
    model = transformers.LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        offsets = torch.randint(0, len(train_ids) - args.seq_len, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[o: o + args.seq_len] for o in offsets.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - start
            print(f"step {step:5d}  loss {loss.item():.3f}  {elapsed / 60:5.1f} min", flush=True)
    minutes = (time.perf_counter() - start) / 60
    held_loss = evaluate(model, held_ids, args.seq_len)
    print(f"held-out loss {held_loss:.3f} (perplexity {math.exp(held_loss):.1f}) after {minutes:.1f} min")
    save(model, tok, args, held_loss, minutes, params, len(train_ids))


def save(model, tok, args, held_loss: float, minutes: float, params: int, train_tokens: int) -> None:
    import torch
    import transformers

    from splitfuse.testing.tiny_model import CHAT_TEMPLATE  # the tiny test models' template

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*"):
        old.unlink()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=True, temperature=0.7, top_p=0.95)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False, model_max_length=MODEL_SHAPE["max_position_embeddings"])
    fast.save_pretrained(out)
    tok_config = out / "tokenizer_config.json"
    data = json.loads(tok_config.read_text())
    data["tokenizer_class"] = "PreTrainedTokenizerFast"  # loads in transformers 4 and 5
    tok_config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    card = {
        "what": "splitfuse's embedded demo model: a small Llama trained on Python's standard library source",
        "python": sys.version.split()[0], "parameters": params, "training_tokens": train_tokens,
        "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed,
        "threads": args.threads, "train_minutes": round(minutes, 1), "held_out_files": list(HELD_OUT),
        "held_out_loss": round(held_loss, 4), "command": "python scripts/train_demo_model.py",
    }
    (out / "training.json").write_text(json.dumps(card, indent=1) + "\n")
    size = sum(p.stat().st_size for p in out.glob("*")) / 1e6
    print(f"saved to {out} ({size:.1f} MB)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="splitfuse/data/demo_model", help="model directory to write")
    p.add_argument("--pin", action="store_true", help="write the pinned file list of this Python and exit")
    p.add_argument("--steps", type=int, default=1400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=50)
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.pin:
        pin()
    else:
        train(arguments)
