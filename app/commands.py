"""The short-lived `moetune` commands the app runs for the user — plan, eval, chat, export — each as
a subprocess (the app itself never loads a model), with their output parsed and errors kept."""

from __future__ import annotations

import atexit
import json
import queue
import re
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import yaml

from engine.runs import child_env, moetune_command

from .paths import ROOT


@dataclass
class CliResult:
    """What a command returned."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def error(self) -> str:
        """The command's error message (its stderr's last lines), or '' when it succeeded."""
        if self.returncode == 0:
            return ""
        lines = [ln for ln in self.stderr.strip().splitlines() if ln.strip()]
        errs = [ln for ln in lines if "error" in ln.lower()]
        text = (errs[-1] if errs else "\n".join(lines[-5:])) or f"the command ended with exit status {self.returncode}"
        return re.sub(r"^moetune [a-z-]+: error: ", "", text.strip())  # the caller names the command once


def run_cli(args: list[str], timeout: float | None = 3600) -> CliResult:
    """Run `moetune ARGS` from the project root and collect its output."""
    try:
        p = subprocess.run(moetune_command() + args, cwd=str(ROOT), env=child_env(), capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return CliResult(124, "", f"error: `moetune {args[0]}` took longer than {timeout:.0f}s and was stopped.")
    return CliResult(p.returncode, p.stdout, p.stderr)


def _json_out(text: str):
    """The JSON object a command printed (ignoring any lines before it)."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        start = text.find("\n{")
        return json.loads(text[start + 1:]) if start >= 0 else json.loads(text[text.index("{"):])


def check_fit(config: dict, gpu_gb: float | None) -> tuple[bool | None, str]:
    """The planner's answer for a config (paths resolved): (fits, readable text); fits is None when
    the planner could not answer."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f, sort_keys=False)
        path = f.name
    try:
        args = ["plan", path] + (["--gpu-gb", str(gpu_gb)] if gpu_gb else [])
        r = run_cli(args, timeout=300)
    finally:
        Path(path).unlink(missing_ok=True)
    if r.returncode in (0, 3):
        return r.returncode == 0, r.stdout.strip()
    return None, r.error


def _accuracies(result: dict) -> dict[str, dict]:
    """{benchmark: {"accuracy", "n", ...}} from `moetune eval --json` (a mapping, or a list with names)."""
    benches = result.get("benchmarks", {})
    if isinstance(benches, list):
        benches = {b.get("name") or b.get("benchmark") or f"#{i}": b for i, b in enumerate(benches)}
    out = {}
    for name, b in benches.items():
        n = b.get("n", b.get("rows"))
        out[name] = {"accuracy": float(b["accuracy"]), "n": n}
    return out


def evaluate(run_dir: Path, benches: list[str], limit: int | None, with_base: bool,
             data_root: str | None = None) -> tuple[dict[str, dict], dict[str, dict]]:
    """Accuracies of a run's adapter and (with_base) of its base model on benchmarks, by one
    `moetune eval` process (the model loads once); raises RuntimeError."""
    args = ["eval", "--run", str(run_dir), "--json"] + [a for b in benches for a in ("--bench", b)]
    args += ["--limit", str(limit)] if limit else []
    args += (["--data-root", data_root] if data_root else []) + (["--with-base"] if with_base else [])
    r = run_cli(args)
    if r.returncode != 0:
        raise RuntimeError(f"`moetune eval` failed: {r.error}")
    try:
        result = _json_out(r.stdout)
        return _accuracies(result), _accuracies(result["base"]) if with_base else {}
    except (ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"could not read `moetune eval --json` output ({e}): {r.stdout[-400:]}") from None


def evaluate_both(run_dir: Path, benches: list[str], limit: int | None, with_base: bool,
                  data_root: str | None = None) -> list[dict]:
    """Rows {benchmark, n, base, tuned} for each benchmark. Benchmark names are looked up under
    `data_root` (LLM-Adapters' dataset/)."""
    tuned, base = evaluate(run_dir, benches, limit, with_base, data_root)
    return [{"benchmark": name, "n": t["n"], "tuned": t["accuracy"], "base": base.get(name, {}).get("accuracy")}
            for name, t in tuned.items()]


class ChatServer:
    """A `moetune chat --serve` process for one run: its model loads once and then answers every message,
    as the adapter and, from the same weights with the adapters switched off, as the base model."""

    def __init__(self, run_dir: Path, max_new_tokens: int = 128):
        self.run_dir = Path(run_dir)
        self.log = self.run_dir / "chat.log"
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.lock = threading.Lock()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                moetune_command() + ["chat", "--run", str(self.run_dir), "--serve", "--max-new-tokens",
                                     str(max_new_tokens)], cwd=str(ROOT), env=child_env(), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = False

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # the process ended

    @property
    def alive(self) -> bool:
        """The process still runs."""
        return self.proc.poll() is None

    def _next(self, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"`moetune chat` gave no answer within {timeout:.0f}s.") from None
        if line is None:
            tail = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()][-5:]
            errs = [ln for ln in tail if "error" in ln.lower()]
            raise RuntimeError((errs[-1] if errs else "\n".join(tail)) or "`moetune chat` stopped.")
        return json.loads(line)

    def ask(self, prompt: str, base: bool = True, timeout: float = 900) -> dict:
        """{"tuned": reply, "base": reply} for one message (waits for the model to load the first time)."""
        with self.lock:
            while not self.ready:
                self.ready = bool(self._next(timeout).get("ready"))
            self.proc.stdin.write(json.dumps({"prompt": prompt, "base": base}) + "\n")
            self.proc.stdin.flush()
            answer = self._next(timeout)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def close(self) -> None:
        """End the process (its model's memory is freed)."""
        if self.alive:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_servers: dict[Path, ChatServer] = {}
_servers_lock = threading.Lock()


def chat_server(run_dir: Path) -> ChatServer:
    """The live chat process of a run, started when needed; one at a time (a model can be large), so
    choosing another run ends the previous one."""
    run_dir = Path(run_dir).resolve()
    with _servers_lock:
        server = _servers.get(run_dir)
        if server is not None and server.alive:
            return server
        for other in list(_servers.values()):
            other.close()
        _servers.clear()
        server = _servers[run_dir] = ChatServer(run_dir)
        return server


atexit.register(lambda: [s.close() for s in list(_servers.values())])


def chat_both(run_dir: Path, prompt: str) -> tuple[str, str]:
    """Replies of the base model and the adapted model to one message; an error becomes both replies."""
    try:
        answer = chat_server(run_dir).ask(prompt)
    except (RuntimeError, OSError, ValueError) as e:
        return f"⚠️ {e}", f"⚠️ {e}"
    return answer.get("base", ""), answer.get("tuned", "")


def export(run_dir: Path, fmt: str, dtype: str, out: Path, base: bool = False) -> str:
    """Export a run's adapter (`moetune export`; `base`: its base model alone, --format gguf --base); returns its
    output, raises RuntimeError."""
    r = run_cli(["export", "--run", str(run_dir), "--format", fmt, "--dtype", dtype, "--out", str(out)]
                + ["--base"] * base)
    if r.returncode != 0:
        raise RuntimeError(r.error)
    return r.stdout.strip()
