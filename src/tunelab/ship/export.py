"""Export a run to the formats other tools load: a merged HF folder, GGUF, or a PEFT adapter.

Each export is built in a temporary folder beside the target and renamed into place once it is
complete and its checks pass, so an interrupted or failed export leaves nothing half-written.
The checks are the ones a user would run by hand: the merged folder and the GGUF file reloaded
by transformers (no tunelab code on that path) give the run's logits within a stated
tolerance; the adapter is checked against vLLM's rules for LoRA adapters.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.config import Config
from tunelab.errors import ConfigError, ModelError, RunError
from tunelab.run.directory import RunDir, open_run
from tunelab.run.load import load_run_model, run_base

KINDS = ("merged", "gguf", "adapter")

#: Largest |logit difference| a check allows, as a fraction of the largest |logit|. Merged
#: float32 weights differ from base + adapter only by float rounding (measured 1.5e-6); a GGUF
#: read back must reproduce the merged model with the same quantisation applied to its weights
#: just as closely, so any layout mistake (names, q/k order, vocabulary) fails. The quantisation
#: error itself (vs the unquantised merged model) is reported, not bounded: it depends on the
#: weights (SmolLM2: F16 0.1 %, Q8_0 4 % of the largest logit).
RELATIVE_TOLERANCE = {"merged": 1e-4, "merged-16bit": 2e-2, "gguf": 1e-4}

# A few prompts of different shapes; the chat one is rendered with the run's template.
_PROBES = ("The capital of France is", "Review: the plot was slow but the cast was great.\n"
           "Sentiment:", "Translate to German: Good morning, 2 + 2 = 4!")
_CHAT_PROBE = "What is a good name for a cat?"

#: vLLM's accepted --max-lora-rank values (vllm/config/lora.py); 16 is its default.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16


@dataclass
class Check:
    """One verification of an export: what was compared, the number, the bound, the verdict."""

    name: str
    passed: bool
    detail: str
    value: float | None = None
    tolerance: float | None = None


@dataclass
class ExportResult:
    """What an export wrote (file name -> bytes) and how it was checked."""

    kind: str
    path: Path
    files: dict[str, int] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    usage: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def export_run(run_dir: str | Path, to: str, *, out: str | Path | None = None,
               quant: str = "f16", check: bool = True,
               max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK) -> ExportResult:
    """Export the run at ``run_dir`` as ``to`` (merged | gguf | adapter) into ``out``.

    ``out`` defaults to ``RUN/export/<kind>`` and must not exist yet. ``quant`` is the GGUF's
    tensor type; ``max_lora_rank`` the vLLM setting the adapter is checked against.
    """
    from tunelab.model.adapters import METHODS
    from tunelab.ship.gguf import QUANTS

    if to not in KINDS:
        raise ConfigError(f"unknown export kind {to!r}", where="--to",
                          fix=f"use one of: {', '.join(KINDS)}")
    if quant not in QUANTS:
        raise ConfigError(f"unknown GGUF quantisation {quant!r}", where="--quant",
                          fix=f"use one of: {', '.join(QUANTS)}")
    run, config = open_run(run_dir, need_data=False)
    if to == "adapter" and not METHODS[config.method.kind].adapter:
        raise RunError(f"{run} is a {METHODS[config.method.kind].title}: it has no adapter to "
                       "export", where=str(run),
                       fix="export its weights with --to merged or --to gguf")
    default_name = f"gguf-{quant}" if to == "gguf" else to
    target = Path(out) if out is not None else run.export_folder(default_name)
    if target.exists():
        raise RunError(f"{target} already exists; an export never overwrites", where="--out",
                       fix="pass another --out, or delete that folder first")
    run_dir = run.path
    with _staging(target) as scratch:
        if to == "adapter":
            result = export_adapter(run, config.name, scratch, max_lora_rank)
        else:
            result = _export_weights(run_dir, to, scratch, quant=quant, check=check)
        result.path = target
        failed = [c for c in result.checks if not c.passed and c.tolerance is not None]
        if failed:
            raise ModelError(
                f"the exported {to} model does not reproduce the run: "
                + "; ".join(f"{c.name}: {c.detail}" for c in failed)
                + " (nothing was written)",
                where=str(run_dir),
                fix="report this as a tunelab bug with the run's config and library versions",
            )
        result.files = {p.name: p.stat().st_size for p in sorted(scratch.iterdir())}
        (scratch / "tunelab_export.json").write_text(
            json.dumps({"run": str(run_dir.resolve()), **result.to_json()}, indent=2) + "\n")
    return result


@contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A private folder beside ``target``, renamed to it when the block ends without error."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield scratch
        scratch.chmod(0o755)  # mkdtemp makes it private; an export is an ordinary folder
        os.rename(scratch, target)  # atomic; fails rather than merge into a folder made meanwhile
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- merged and GGUF ------------------------------------------------------------------------


def _export_weights(run_dir: Path, to: str, folder: Path, *, quant: str,
                    check: bool) -> ExportResult:
    """Merge the adapter into the base; save it as a HF folder, or write GGUF + Modelfile."""
    from tunelab.data.render import chat_template_of

    notes = []
    if to == "gguf":  # refuse a model the writer cannot write before loading and merging it
        from tunelab.ship.gguf import check_gguf_support

        notes = check_gguf_support(merge_source(run_dir)).notes
    # QLoRA: the adapter goes into the de-quantised 4-bit base it was trained on.
    model, tokenizer, config = load_run_model(run_dir, dequantize=True)
    template = chat_template_of(tokenizer, config.data.chat_template)
    probes = probe_prompts(tokenizer, template)
    tuned_logits = logits_of(model, probes)
    merged = merge(model)
    tokenizer.chat_template = template
    if to == "merged":
        result = ExportResult("merged", folder)
        save_merged(merged, tokenizer, folder)
        if check:
            result.checks.append(check_merged_folder(folder, probes, tuned_logits))
        result.usage = _merged_usage()
        return result
    from tunelab.ship.gguf import write_gguf

    result = ExportResult("gguf", folder, notes=notes)
    gguf_name = f"{config.name}-{quant}.gguf"
    shapes = write_gguf(merged, tokenizer, folder / gguf_name, quant=quant, name=config.name,
                        chat_template=template)
    modelfile, notes = modelfile_text(gguf_name, tokenizer, template)
    (folder / "Modelfile").write_text(modelfile)
    result.notes.extend(notes)
    if check:
        result.checks.append(check_gguf_metadata(folder / gguf_name, shapes, merged.config))
        checks, note = check_gguf_in_transformers(folder, gguf_name, probes, tokenizer,
                                                  merged, quant)
        result.checks.extend(checks)
        result.notes.append(note)
    result.usage = (f"ollama create {config.name} -f {{path}}/Modelfile && ollama run "
                    f"{config.name}\nllama-cli -m {{path}}/{gguf_name} -cnv")
    return result


def merge_source(run_dir: Path) -> str:
    """The folder (or cached hub id) whose config.json and tokenizer the merged model has: the
    base an adapter trained on, or a full fine-tune's own weights folder."""
    from tunelab.model.adapters import METHODS
    from tunelab.model.load import resolve_model_path

    run, config = open_run(run_dir, need_data=False)
    if METHODS[config.method.kind].adapter:
        return resolve_model_path(*run_base(run, config))
    return str(run.final_weights(config.method.kind))


def merge(model: Any) -> Any:
    """The adapter folded into the base weights (a full fine-tune is returned as it is)."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def save_merged(model: Any, tokenizer: Any, folder: Path) -> None:
    """An ordinary HF folder: config, safetensors, generation config, tokenizer, chat template."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def probe_prompts(tokenizer: Any, chat_template: str) -> list[list[int]]:
    """Token ids of the check prompts: plain text ones and one chat turn."""
    from tunelab.data.render import chat_prompt

    ids = [tokenizer(text).input_ids for text in _PROBES]
    ids.append(chat_prompt([{"role": "user", "content": _CHAT_PROBE}], tokenizer,
                           chat_template=chat_template).ids)
    return ids


@torch.no_grad()
def logits_of(model: Any, probes: list[list[int]]) -> list[torch.Tensor]:
    """Float32 logits on CPU for each probe, one forward pass per probe (no padding)."""
    device = next(model.parameters()).device
    return [model(torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in probes]


def logit_gap(actual: list[torch.Tensor], expected: list[torch.Tensor]
              ) -> tuple[float, float, str]:
    """Max |logit difference| over all probes and positions, max |expected logit|, and how
    often the top token agrees."""
    pairs = list(zip(actual, expected, strict=True))
    difference = max((a - e).abs().max().item() for a, e in pairs)
    scale = max(e.abs().max().item() for e in expected)
    agree = sum(int((a.argmax(-1) == e.argmax(-1)).sum()) for a, e in pairs)
    return difference, scale, f"same top token at {agree}/{sum(len(e) for e in expected)} positions"


def compare_logits(name: str, actual: list[torch.Tensor], expected: list[torch.Tensor],
                   relative_tolerance: float) -> Check:
    """A check that the max |logit difference| is within ``relative_tolerance`` x max |logit|."""
    difference, scale, agreement = logit_gap(actual, expected)
    bound = relative_tolerance * scale
    return Check(name, difference <= bound,
                 f"max |logit difference| {difference:.3g} (bound {bound:.3g} = "
                 f"{relative_tolerance:g} x max |logit| {scale:.3g}); {agreement}",
                 value=difference, tolerance=bound)


def check_merged_folder(folder: Path, probes: list[list[int]],
                        tuned_logits: list[torch.Tensor]) -> Check:
    """Reload the folder with plain transformers and compare with base + adapter."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(folder))
    dtype = next(reloaded.parameters()).dtype
    key = "merged" if dtype == torch.float32 else "merged-16bit"
    return compare_logits("merged folder (transformers) vs base + adapter",
                          logits_of(reloaded, probes), tuned_logits, RELATIVE_TOLERANCE[key])


def check_gguf_metadata(path: Path, shapes: dict[str, list[int]], config: Any) -> Check:
    """Read the file back with gguf.GGUFReader: the keys llama.cpp requires for the
    architecture (``required_keys``) and every tensor's shape."""
    from gguf import GGUFReader

    from tunelab.ship.gguf import required_keys

    reader = GGUFReader(path)
    read_shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    expected = required_keys(config, n_vocab)
    problems = [f"{key} is {_field(reader, key)!r}, expected {value!r}"
                for key, value in expected.items() if _field(reader, key) != value]
    problems += [f"tensor {name} has shape {read_shapes.get(name)}, expected {shape}"
                 for name, shape in shapes.items() if read_shapes.get(name) != shape]
    problems += [f"unexpected tensor {name}" for name in set(read_shapes) - set(shapes)]
    detail = "; ".join(problems) or (f"{len(read_shapes)} tensors and the "
                                     f"{expected['general.architecture']} metadata read back "
                                     "as written")
    return Check("GGUF read back (gguf.GGUFReader)", not problems, detail,
                 value=float(len(problems)), tolerance=0.0)


def _field(reader: Any, key: str) -> Any:
    field_ = reader.fields.get(key)
    if field_ is None:
        return None
    value = field_.contents()
    return int(value) if isinstance(value, int) else value


def check_gguf_in_transformers(folder: Path, gguf_name: str, probes: list[list[int]],
                               tokenizer: Any, merged: Any, quant: str
                               ) -> tuple[list[Check], str]:
    """Load the GGUF with transformers (``gguf_file=``): the run's tokens, and the logits of the
    merged model with the same quantisation; plus a note on the quantisation error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.ship.gguf import quantised_copy, transformers_config

    gguf_tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_name)
    texts = [*_PROBES, _CHAT_PROBE, "  spaces,\ttabs\nand 1234567 digits: ünïcödé 🙂"]
    mismatched = [t for t in texts if gguf_tokenizer(t).input_ids != tokenizer(t).input_ids]
    tokens = Check("GGUF tokenizer (transformers) vs the run's tokenizer", not mismatched,
                   f"{len(texts) - len(mismatched)}/{len(texts)} texts tokenize identically"
                   + (f"; differs on {mismatched[0]!r}" if mismatched else ""),
                   value=float(len(mismatched)), tolerance=0.0)
    from gguf import GGUFReader

    n_vocab = len(GGUFReader(folder / gguf_name).fields["tokenizer.ggml.tokens"].data)
    config = transformers_config(merged.config, n_vocab)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_name,
                                                      dtype=torch.float32, config=config)
    gguf_logits = logits_of(gguf_model, probes)
    del gguf_model
    read = "metadata and tensors" if config is None else "tensors, with the run's config"
    with _window_as_in_gguf(merged, config) as dropped:
        read += ", both without the sliding window llama.cpp drops" if dropped else ""
        # logits over the GGUF's vocabulary: Gemma 3's drops embedding rows past the
        # tokenizer's, as llama.cpp's converter does
        logits = compare_logits(
            f"GGUF {quant} (transformers, {read}) vs merged model with {quant} weights",
            gguf_logits, [e[..., :n_vocab] for e in logits_of(quantised_copy(merged, quant),
                                                              probes)],
            RELATIVE_TOLERANCE["gguf"])
        difference, scale, agreement = logit_gap(
            gguf_logits, [e[..., :n_vocab] for e in logits_of(merged, probes)])
    note = (f"{quant} quantisation error: max |logit difference| {difference:.3g} from the "
            f"unquantised merged model ({difference / scale:.2%} of max |logit| {scale:.3g}); "
            f"{agreement}")
    return [tokens, logits], note


@contextmanager
def _window_as_in_gguf(merged: Any, gguf_config: Any) -> Iterator[bool]:
    """The merged model without its sliding window while the GGUF is loaded without one
    (Mistral, which llama.cpp runs as a Llama: the export notes it), so the check compares the
    tensors, not the window; True if a window was taken off."""
    text = merged.config.get_text_config()
    window = getattr(text, "sliding_window", None)
    dropped = (gguf_config is not None and window is not None
               and getattr(gguf_config, "sliding_window", None) is None)
    if dropped:
        text.sliding_window = None
    try:
        yield dropped
    finally:
        if dropped:
            text.sliding_window = window


def _merged_usage() -> str:
    return ("python -c \"from transformers import AutoModelForCausalLM, AutoTokenizer; "
            "AutoModelForCausalLM.from_pretrained('{path}'); AutoTokenizer.from_pretrained("
            "'{path}')\"\nvllm serve {path}")


# --- Ollama Modelfile -----------------------------------------------------------------------


def modelfile_text(gguf_name: str, tokenizer: Any, chat_template: str) -> tuple[str, list[str]]:
    """An Ollama Modelfile: FROM the GGUF, the chat template in Go-template form, stop tokens.

    ChatML-style templates (SmolLM2's, the tiny test model's) are translated, with a default
    system prompt the template injects becoming SYSTEM. For other templates the TEMPLATE line
    is left out and Ollama uses the template embedded in the GGUF; a note says so.
    """
    lines = [f"FROM ./{gguf_name}"]
    notes = []
    chatml = chatml_form(tokenizer, chat_template)
    if chatml is None:
        notes.append("the chat template is not ChatML-style, so the Modelfile has no TEMPLATE; "
                     "Ollama falls back to the template stored in the GGUF")
        stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    else:
        default_system, stops = chatml
        if default_system:
            lines.append(f'SYSTEM """{default_system}"""')
        lines.append('TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n'
                     '{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"""')
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    return "\n".join(lines) + "\n", notes


def chatml_form(tokenizer: Any, chat_template: str) -> tuple[str | None, list[str]] | None:
    """``(default system prompt or None, stop strings)`` when the template renders ChatML.

    Decided by rendering sample conversations with the real template and comparing them with
    ChatML, so a template that merely looks similar is not mistaken for it.
    """
    def render(messages: list[dict]) -> str | None:
        try:
            return tokenizer.apply_chat_template(messages, chat_template=chat_template,
                                                 tokenize=False, add_generation_prompt=True)
        except Exception:  # a template that rejects a sample (jinja raises many types)
            return None

    def chatml(messages: list[dict]) -> str:
        turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return turns + "<|im_start|>assistant\n"

    conversation = [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"},
                    {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    if render(conversation) != chatml(conversation):
        return None
    alone = render([{"role": "user", "content": "U1"}])
    if alone == chatml([{"role": "user", "content": "U1"}]):
        return None, ["<|im_end|>"]
    prefix, suffix = "<|im_start|>system\n", "<|im_end|>\n" + chatml([{"role": "user",
                                                                       "content": "U1"}])
    if alone and alone.startswith(prefix) and alone.endswith(suffix):
        return alone[len(prefix):-len(suffix)], ["<|im_end|>"]
    return None


# --- adapter --------------------------------------------------------------------------------


def export_adapter(run: RunDir, name: str, folder: Path,
                   max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK) -> ExportResult:
    """Copy the run's PEFT adapter with its base named portably; check it against vLLM."""
    from tunelab.model.load import BASE_SIDECAR

    config = run.read_config(need_data=False)
    shutil.copytree(run.final_weights(config.method.kind), folder, dirs_exist_ok=True)
    if not (folder / BASE_SIDECAR).is_file():
        _name_base_of_old_adapter(config, folder)
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    base = json.loads((folder / BASE_SIDECAR).read_text())
    result = ExportResult("adapter", folder)
    result.checks = vllm_checks(adapter_config, folder / "adapter_model.safetensors",
                                max_lora_rank)
    rank = _vllm_rank(adapter_config)
    rank_flag = f" --max-lora-rank {rank}" if rank > VLLM_DEFAULT_MAX_LORA_RANK else ""
    base_name = base.get("hub_id") or base["reference"]
    result.usage = (f"vllm serve {base_name} --enable-lora --lora-modules {name}={{path}}"
                    f"{rank_flag}")
    if base.get("dequantised_from_gguf"):
        result.notes.append(f"the adapter was trained on a copy of {base_name} de-quantised from "
                            "GGUF; on the hub weights its outputs differ slightly (export --to "
                            "merged serves exactly what was trained)")
    return result


def _name_base_of_old_adapter(config: Config, folder: Path) -> None:
    """Adapters saved before bases were named portably: name the base from the run's config."""
    from tunelab.model.load import BASE_SIDECAR, describe_base, resolve_model_path

    base = describe_base(resolve_model_path(config.model.path, config.model.gguf_file))
    (folder / BASE_SIDECAR).write_text(json.dumps(base, indent=2) + "\n")
    config_path = folder / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = base["hub_id"] or base["reference"]
    config_path.write_text(json.dumps(adapter_config, indent=2) + "\n")


def vllm_checks(adapter_config: dict, weights_path: Path, max_lora_rank: int) -> list[Check]:
    """vLLM's rules for a LoRA adapter, each with the config change that satisfies it.

    These are advisory (``tolerance`` None): a failing rule does not stop the export, since the
    adapter is still a valid PEFT adapter for transformers, peft and tunelab.
    """
    from safetensors import safe_open

    with safe_open(str(weights_path), "pt") as weights:
        names = list(weights.keys())
    targets = adapter_config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    rank = _vllm_rank(adapter_config)
    embedding = [t for t in targets if t in ("lm_head", "embed_tokens", "wte", "output")] + \
        sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names if "lora_embedding" in n})
    saved = adapter_config.get("modules_to_save") or []
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        rank_detail = (f"rank {rank} is above vLLM's largest --max-lora-rank "
                       f"{VLLM_LORA_RANKS[-1]}. Fix: re-train with a smaller method.r, e.g. "
                       f"method.r: {VLLM_DEFAULT_MAX_LORA_RANK}")
    elif rank <= max_lora_rank:
        rank_detail = f"rank {rank} <= --max-lora-rank {max_lora_rank}"
    else:
        rank_detail = (f"rank {rank} > --max-lora-rank {max_lora_rank}: serve with "
                       f"--max-lora-rank {fits[0]}, or re-train with method.r: {max_lora_rank}")
    return [
        Check("vLLM: no modules_to_save", not saved,
              f"modules_to_save {saved} are full layer copies, which vLLM does not load. Fix: "
              "re-train without them (method.targets naming linear layers only)" if saved
              else "none"),
        Check("vLLM: no lm_head or embedding LoRA", not embedding,
              f"LoRA on {', '.join(embedding)}, which vLLM rejects. Fix: re-train with "
              "method.targets: all-linear (it leaves lm_head out) or a list without "
              "lm_head/embed_tokens" if embedding else "LoRA on linear layers only"),
        Check("vLLM: no DoRA", not adapter_config.get("use_dora"),
              "DoRA adapters are rejected by vLLM. Fix: re-train with method.kind: lora"
              if adapter_config.get("use_dora") else "plain LoRA"),
        Check("vLLM: rank within --max-lora-rank", bool(fits) and rank <= max_lora_rank,
              rank_detail),
    ]


def _vllm_rank(adapter_config: dict) -> int:
    """The largest rank in the adapter (``r`` or any per-module ``rank_pattern`` entry)."""
    pattern = adapter_config.get("rank_pattern") or {}
    return max([int(adapter_config.get("r", 0)), *map(int, pattern.values())])


def render_export(result: ExportResult, console: Any) -> None:
    """Print what was written, each check with its number and verdict, and how to use it."""
    console.print(f"[bold]Exported {result.kind}[/] to {result.path}")
    for name, size_bytes in result.files.items():
        console.print(f"  {name:<32} {size_bytes / 1e6:>10.1f} MB", highlight=False)
    for check_ in result.checks:
        mark = "[green]pass[/]" if check_.passed else (
            "[red]FAIL[/]" if check_.tolerance is not None else "[yellow]fails[/]")
        console.print(f"  {mark}  {check_.name}: ", end="")
        console.print(check_.detail, markup=False, highlight=False)
    for note in result.notes:
        console.print(f"  note: {note}", markup=False, highlight=False)
    if result.usage:
        console.print("Use it:", style="bold")
        console.print(result.usage.replace("{path}", str(result.path)), markup=False,
                      highlight=False, soft_wrap=True)
