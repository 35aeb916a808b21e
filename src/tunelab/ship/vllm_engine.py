"""``tunelab serve --engine vllm``: ``vllm serve`` generates behind tunelab's own front.

vLLM is started on the base with ``--enable-lora --lora-modules NAME=ADAPTER`` per run (the
adapter as ``tunelab export --to adapter`` writes it, checked against vLLM's rules there), on a
free loopback port. :class:`VllmEngine` has the interface of ``ship/engine.py``'s Engine and
sends each prompt as token ids (rendered by tunelab, as training rendered them) to vLLM's
OpenAI completions endpoint, the adapter picked by its model name, and streams the text back.

Not tested in tunelab's suite: it needs vLLM and a CUDA GPU. Where either is missing it stops
with an error naming what is missing.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tunelab.errors import ModelError, RunError

logger = logging.getLogger(__name__)


def missing() -> str | None:
    """What this machine lacks for vLLM (None: nothing)."""
    if importlib.util.find_spec("vllm") is None:
        return "the vllm package is not installed (pip install vllm, on a CUDA machine)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (vLLM's default build serves on CUDA GPUs)"
    return None


class VllmEngine:
    """Engine's interface over ``vllm serve``: one thread per sequence streams its text."""

    def __init__(self, command: list[str], port: int, names: dict[str | None, str], *,
                 context_tokens: int) -> None:
        self.command, self.port, self.names = command, port, names
        self.context_tokens = context_tokens
        self.process: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile("w+", prefix="vllm-", suffix=".log",
                                               delete=False)
        self._running = 0
        self._lock = threading.Lock()

    def start(self, timeout_s: float = 900.0) -> None:
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ModelError(f"vllm serve exited ({self.process.returncode}):\n"
                                 + Path(self.log.name).read_text()[-3000:],
                                 where=" ".join(self.command), fix="see vLLM's log above")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise ModelError("vllm serve did not become healthy", where=" ".join(self.command),
                         fix=f"see its log: {self.log.name}")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def running_sequences(self) -> int:
        return self._running

    def submit(self, request) -> None:
        for number, prompt in enumerate(request.prompts):
            for choice in range(request.sampling.n):
                threading.Thread(target=self._one, daemon=True,
                                 args=(request, number * request.sampling.n + choice,
                                       prompt)).start()

    def _one(self, request, index: int, prompt: list[int]) -> None:
        from tunelab.ship.engine import Event

        sampling = request.sampling
        body = {"model": self.names[request.adapter], "prompt": prompt, "stream": True,
                "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "stop": list(sampling.stop) or None,
                "stream_options": {"include_usage": True}}
        if sampling.seed is not None:
            body["seed"] = (sampling.seed + index) & 0x7FFF_FFFF
        with self._lock:
            self._running += 1
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3600)
        try:
            connection.request("POST", "/v1/completions", json.dumps(body),
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                raise ModelError(f"vLLM answered {response.status}: "
                                 f"{response.read()[:500].decode(errors='replace')}")
            reason, tokens = None, 0
            for line in response:
                if request.cancelled.is_set():
                    return
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if choice.get("text"):
                        request.on_event(Event("delta", index, choice["text"]))
                    reason = choice.get("finish_reason") or reason
            request.on_event(Event("done", index, finish_reason=reason or "length",
                                   completion_tokens=tokens))
        except Exception as error:
            logger.exception("vLLM generation failed")
            request.on_event(Event("error", index, text=f"{type(error).__name__}: {error}"))
        finally:
            connection.close()
            with self._lock:
                self._running -= 1


def load_vllm(runs: list[str], *, base: str | None = None, console=None):
    """(tokenizer, served models, :class:`VllmEngine`) for ``runs`` on their common base."""
    from tunelab.model.architecture import text_config
    from tunelab.model.load import load_tokenizer, resolve_model_path
    from tunelab.ship.export import export_run
    from tunelab.ship.llamacpp import free_port
    from tunelab.ship.served import ServedModel, common_base, open_runs

    lacking = missing()
    if lacking:
        raise ModelError(f"--engine vllm cannot run here: {lacking}", where="--engine vllm",
                         fix="serve with the own engine (no --engine) or --engine llama.cpp "
                             "here, or on a CUDA machine with vLLM installed")
    if not runs:
        raise RunError("--engine vllm serves runs: name at least one run directory",
                       where="tunelab serve --engine vllm", fix="tunelab serve --engine vllm "
                       "RUN_DIR ...")
    opened = open_runs(runs)
    base_ref = common_base(opened, base)
    source = resolve_model_path(*base_ref)
    tokenizer = load_tokenizer(*base_ref)
    port = free_port()
    vllm = shutil.which("vllm")
    command = ([vllm] if vllm else [sys.executable, "-m", "vllm.entrypoints.cli.main"]) + [
        "serve", source, "--host", "127.0.0.1", "--port", str(port), "--enable-lora"]
    names: dict[str | None, str] = {None: source}
    served = [ServedModel(base_ref[0], None)]
    ranks = []
    for number, (name, run, config) in enumerate(opened):
        folder = Path(run.export_folder("adapter"))
        if not folder.exists():
            export_run(run.path, "adapter")
        command += ["--lora-modules", f"{name}={folder}"]
        ranks.append(json.loads((folder / "adapter_config.json").read_text())["r"])
        names[f"adapter{number}"] = name
        served.append(ServedModel(name, f"adapter{number}", config.data.chat_template,
                                  config.data.chat_template_kwargs))
    from tunelab.ship.export import VLLM_LORA_RANKS

    rank = next((r for r in VLLM_LORA_RANKS if r >= max(ranks)), max(ranks))
    command += ["--max-lora-rank", str(rank), "--max-loras", str(len(runs))]
    from transformers import AutoConfig

    context = int(getattr(text_config(AutoConfig.from_pretrained(source)),
                          "max_position_embeddings", 2048))
    if console is not None:
        console.print(f"Starting vLLM: {' '.join(command)}")
    return tokenizer, served, VllmEngine(command, port, names, context_tokens=context)
